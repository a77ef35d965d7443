"""Where tunewiz keeps its files: XDG config/state/data/cache dirs, or all under $TUNEWIZ_HOME."""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "tunewiz"
HOME_ENV = "TUNEWIZ_HOME"


PRIVATE = 0o700  # runs hold the user's data (prompts, answers, logs): only the user may read them


def _private_dir(path: Path, top: Path) -> Path:
    """Create `path` and any missing folders between it and `top` (included) readable only by the user."""
    missing = [p for p in (path, *path.parents) if not p.exists() and (p == top or top in p.parents)]
    top.parent.mkdir(parents=True, exist_ok=True)
    for folder in reversed(missing):
        folder.mkdir(mode=PRIVATE, exist_ok=True)
    return path


def _root_override() -> Path | None:
    value = os.environ.get(HOME_ENV)
    return Path(value).expanduser() if value else None


def _dir(kind: str) -> Path:
    override = _root_override()
    if override is not None:
        return _private_dir(override / kind, override)
    import platformdirs

    getter = {
        "config": platformdirs.user_config_path,
        "state": platformdirs.user_state_path,
        "data": platformdirs.user_data_path,
        "cache": platformdirs.user_cache_path,
    }[kind]
    path = getter(APP_NAME)
    return _private_dir(path, path)


def config_dir() -> Path:
    """User settings and user presets."""
    return _dir("config")


def state_dir() -> Path:
    """Run directories (the engine/TUI channel)."""
    return _dir("state")


def data_dir() -> Path:
    """Converted models and default training outputs."""
    return _dir("data")


def cache_dir() -> Path:
    """Prepared (tokenised) datasets; safe to delete."""
    return _dir("cache")


def runs_dir() -> Path:
    path = state_dir() / "runs"
    return _private_dir(path, path)


def user_presets_dir() -> Path:
    path = config_dir() / "presets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    path = data_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
