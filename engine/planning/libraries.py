"""The training libraries, found without importing them (importing torch costs seconds): torch's version
and CUDA build read from `torch/version.py` as text, optional libraries by their import spec."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from tunewiz.engine.planning import nvml

_VERSION_RE = r"^{name}\s*(?::[^=\n]*)?=\s*(?:['\"]([^'\"]*)['\"]|None)"


def _version_py_field(text: str, name: str) -> str | None:
    """``name = '...'`` or ``name: Optional[str] = '...'`` from torch/version.py text."""
    match = re.search(_VERSION_RE.format(name=re.escape(name)), text, re.MULTILINE)
    return match.group(1) if match and match.group(1) else None


def _dist_version(dist: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(dist)
    except Exception:
        return None


def _find_spec(name: str) -> Any:
    try:
        from importlib.util import find_spec

        return find_spec(name)  # a top-level name: finds the package without importing it
    except Exception:
        return None


def check_torch() -> tuple[str | None, str | None]:
    """(version, CUDA version of the build) of the installed torch; (None, None) if absent."""
    module = sys.modules.get("torch")
    if module is not None:  # already imported by someone else: ask it, that costs nothing
        version_mod = getattr(module, "version", None)
        return (
            nvml.text(getattr(module, "__version__", None)),
            nvml.text(getattr(version_mod, "cuda", None)),
        )
    spec = _find_spec("torch")
    if spec is None:
        return None, None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    version = cuda = None
    for location in locations:
        try:
            text = (Path(location) / "version.py").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        version = _version_py_field(text, "__version__")
        cuda = _version_py_field(text, "cuda")
        break
    return version or _dist_version("torch") or "unknown version", cuda


def check_installed(module: str, dist: str) -> str | None:
    """The installed version of an optional library (found without importing it); None if absent."""
    if _find_spec(module) is None:
        return None
    return _dist_version(dist) or "unknown version"
