"""The keys of the screen in front, as the Help dialog lists them: exactly the ones that work there, aligned."""

from __future__ import annotations

from typing import Any

GENERIC = ("Focus Next", "Focus Previous", "Copy selected text")
"""Textual's keys on every screen: listed after the screen's own."""


def keys_help(screen: Any) -> str:
    """One line per action of `screen` and of the app that is enabled now: its keys, then what it does (with the
    binding's tooltip, where it has one)."""
    rows: dict[str, list[str]] = {}
    ordered = sorted(screen.active_bindings.values(),
                     key=lambda active: (active.binding.description in GENERIC, active.node is screen.app))
    for active in ordered:
        binding = active.binding
        if active.node not in (screen, screen.app) or binding.system or not binding.description or not active.enabled:
            continue  # a focused widget's own keys (arrows in a list, editing in a text box) go without saying
        key = screen.app.get_key_display(binding)
        text = f"{binding.description}: {binding.tooltip}" if binding.tooltip else binding.description
        keys = rows.setdefault(text, [])
        if key not in keys:
            keys.append(key)
    width = max((len(" ".join(keys)) for keys in rows.values()), default=0)
    return "\n".join(f"{' '.join(keys):<{width}}  {description}" for description, keys in rows.items())
