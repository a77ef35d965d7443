"""How to write a `tunewiz` command in a hint so that it works as printed from where the user is."""

from __future__ import annotations

import functools
import shlex
import shutil
import sys
from pathlib import Path


@functools.cache
def tunewiz_command() -> str:
    """`tunewiz` when it is on PATH; else this environment's script (relative to the current folder when it is
    under it, as after `make run`: `.venv/bin/tunewiz`); else `python -m tunewiz.engine` with this interpreter."""
    script = Path(sys.executable).parent / "tunewiz"
    on_path = shutil.which("tunewiz")
    if on_path and (not script.exists() or Path(on_path).resolve() == script.resolve()):
        return "tunewiz"
    if script.exists():
        try:
            return shlex.quote(str(script.relative_to(Path.cwd())))
        except ValueError:
            return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m tunewiz.engine"


def command(args: str) -> str:
    """A full command line for a hint: `tunewiz_command() + ' ' + args`."""
    return f"{tunewiz_command()} {args}"


def clear() -> None:
    """Forget the answer (tests change PATH and the current folder)."""
    tunewiz_command.cache_clear()
