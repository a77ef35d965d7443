"""Run presets: built-in ones shipped in presets/runs/, user ones under the config dir."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from engine import locations, spec as spec_mod
from engine.spec import Problem, RunSpec, SpecError


@dataclass(frozen=True)
class PresetInfo:
    """One preset as listed by `tunewiz presets`."""

    name: str
    description: str
    origin: str  # "built-in" or "user"
    path: Path


def presets_root() -> Path:
    """The shipped presets/ folder (works from a checkout and from an installed wheel)."""
    return Path(str(resources.files("presets")))


def builtin_dir() -> Path:
    return presets_root() / "runs"


def _describe(path: Path, origin: str) -> PresetInfo:
    try:
        spec = spec_mod.load(path)
        description = spec.description or "(no description)"
    except SpecError as exc:
        description = f"(invalid: {exc.problems[0].message})"
    return PresetInfo(path.stem, description, origin, path)


def list_presets() -> list[PresetInfo]:
    """Built-in presets, then user presets; a user preset may shadow a built-in one of the same name."""
    found = [_describe(p, "built-in") for p in sorted(builtin_dir().glob("*.toml"))]
    found += [_describe(p, "user") for p in sorted(locations.user_presets_dir().glob("*.toml"))]
    return found


def find_preset(name: str) -> Path | None:
    """A preset file by name: user presets first (they may override), then built-in ones."""
    for folder in (locations.user_presets_dir(), builtin_dir()):
        candidate = folder / f"{name}.toml"
        if candidate.exists():
            return candidate
    return None


def resolve(preset_or_file: str, overrides: list[str] | None = None) -> tuple[RunSpec, str]:
    """Load a preset by name or a spec file by path, apply `--set` overrides, and validate."""
    path = Path(preset_or_file).expanduser()
    if not (path.suffix == ".toml" and path.exists()):
        found = find_preset(preset_or_file)
        if found is None:
            names = ", ".join(sorted({p.name for p in list_presets()}))
            if path.suffix == ".toml" or "/" in preset_or_file:
                message = "file not found"
            else:
                import difflib

                close = difflib.get_close_matches(preset_or_file, names.split(", "), n=1)
                message = f"no preset of this name{f'; did you mean {close[0]!r}?' if close else ''} " \
                          f"(presets: {names})"
            raise SpecError([Problem("", message)], preset_or_file)
        path = found
    spec = spec_mod.load(path)
    if overrides:
        spec = spec_mod.apply_overrides(spec, overrides, source=str(path))
    return spec, str(path)


def save_user_preset(spec: RunSpec, name: str, overwrite: bool = False) -> Path:
    """Save `spec` as a user preset that relaunches the same run with `tunewiz train NAME`."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise SpecError([Problem("name", f"{name!r}: use 1-64 letters, digits, '.', '_' or '-'")])
    path = locations.user_presets_dir() / f"{name}.toml"
    if path.exists() and not overwrite:
        raise SpecError([Problem("name", f"a user preset {name!r} exists already ({path}); choose another "
                                         "name or overwrite it")])
    spec_mod.save(spec, path, header=f"tunewiz preset {name}\nRun it with: tunewiz train {name}")
    return path
