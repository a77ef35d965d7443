"""tunewiz's headless core: spec, presets, run directory, engine process and CLI (never imports textual)."""

__version__ = "0.1.0"
