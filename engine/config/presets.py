"""Run presets: built-in ones shipped in presets/runs/, user ones under the config dir."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tunewiz.engine import locations
from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.config.spec import Problem, RunSpec, SpecError


@dataclass(frozen=True)
class PresetInfo:
    """One preset as listed by `tunewiz presets` and the app."""

    name: str
    description: str
    origin: str  # "built-in" or "user"
    path: Path
    error: str | None = None  # why the file cannot be used (the preset is still listed)
    shadows: bool = False  # a user preset with a built-in's name (saved before that was refused): it wins

    @property
    def key(self) -> str:
        """Unique among the listed presets (a user preset may have a built-in's name)."""
        return f"{self.origin}:{self.name}"


NAME_RULE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


def presets_root() -> Path:
    """The shipped presets/ folder (works from a checkout and from an installed wheel)."""
    return Path(str(resources.files("tunewiz.presets")))


def builtin_dir() -> Path:
    return presets_root() / "runs"


def _describe(path: Path, origin: str) -> PresetInfo:
    try:
        spec = spec_mod.load(path)
    except SpecError as exc:
        return PresetInfo(path.stem, f"(cannot be used: {exc.problems[0].message})", origin, path, error=exc.render())
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # unreadable, not UTF-8, not TOML
        return PresetInfo(path.stem, f"(cannot be used: {exc})", origin, path, error=f"{path}: {exc}")
    return PresetInfo(path.stem, spec.description or "(no description)", origin, path)


def builtin_names() -> set[str]:
    return {p.stem for p in builtin_dir().glob("*.toml")}


def list_presets() -> list[PresetInfo]:
    """Built-in presets, then user presets (a broken file is listed with its error). A user preset with a
    built-in's name (saving one is refused now; older ones may exist) is marked: it is the one that runs."""
    found = [_describe(p, "built-in") for p in sorted(builtin_dir().glob("*.toml"))]
    builtins = builtin_names()
    for path in sorted(locations.user_presets_dir().glob("*.toml")):
        info = _describe(path, "user")
        found.append(dataclasses.replace(info, shadows=True) if info.name in builtins else info)
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


def check_new_name(name: str, overwrite: bool = False) -> Path:
    """Where a user preset called `name` goes; raises SpecError when the name is not allowed or taken."""
    if not re.fullmatch(NAME_RULE, name):
        raise SpecError([Problem("name", f"{name!r}: use 1-64 letters, digits, '.', '_' or '-'")])
    if name in builtin_names():
        raise SpecError([Problem("name", f"{name!r} is a built-in preset; a user preset of that name would hide "
                                         f"it. Choose another name, e.g. {free_name(name)!r}")])
    path = locations.user_presets_dir() / f"{name}.toml"
    if path.exists() and not overwrite:
        raise SpecError([Problem("name", f"a user preset {name!r} exists already ({path}); choose another "
                                         "name or overwrite it")])
    return path


def free_name(name: str) -> str:
    """`name`, or `name-2`, `name-3`...: the first that is neither a built-in nor a user preset."""
    taken = builtin_names() | {p.stem for p in locations.user_presets_dir().glob("*.toml")}
    if name not in taken:
        return name
    return next(f"{name}-{i}" for i in range(2, 10_000) if f"{name}-{i}" not in taken)


def save_user_preset(spec: RunSpec, name: str, overwrite: bool = False) -> Path:
    """Save `spec` as a user preset that relaunches the same run with `tunewiz train NAME`; its runs are named
    after the preset."""
    path = check_new_name(name, overwrite)
    spec_mod.save(dataclasses.replace(spec, name=name), path,
                  header=f"tunewiz preset {name}\nRun it with: tunewiz train {name}")
    return path


def _user_preset(name: str) -> Path:
    path = locations.user_presets_dir() / f"{name}.toml"
    if not path.exists():
        builtin = " (built-in presets cannot be changed)" if name in builtin_names() else ""
        raise SpecError([Problem("", f"no user preset of this name{builtin}")], name)
    return path


def delete_user_preset(name: str) -> Path:
    """Delete a user preset; raises SpecError for a built-in or unknown one."""
    path = _user_preset(name)
    path.unlink()
    return path


def rename_user_preset(old: str, new: str) -> Path:
    """Rename a user preset (its runs will carry the new name); a broken file is moved as it is."""
    source = _user_preset(old)
    target = check_new_name(new)
    try:
        spec = spec_mod.load(source)
    except SpecError:
        source.rename(target)
        return target
    save_user_preset(spec, new)
    source.unlink()
    return target
