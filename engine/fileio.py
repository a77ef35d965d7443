"""Small file helpers shared by the engine and its readers."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = ("no space left on device", "disk quota exceeded")
_WRITE_FAILED_TEXT = "file write failed"  # torch's checkpoint writer: it drops the errno
LOW_SPACE_BYTES = 16 * 1024 * 1024


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see either the old or the new file, never a mix.

    The file is private to the user (0600), like every file tunewiz writes about a run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def slug(text: str, limit: int | None = None) -> str:
    """`text` as a safe file or run name: letters, digits, '.', '_' and '-' (other runs of characters become one
    '-'), never starting or ending with '-' or '.', at most `limit` characters; "run" when nothing is left."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return (cleaned[:limit].rstrip("-.") if limit else cleaned) or "run"


def free_bytes(path: Path) -> int:
    """Free space on the disk holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return 0


def disk_trouble(exc: BaseException, path: Path) -> str | None:
    """`full` when `exc` (or what caused it) means the disk holding `path` is full, `io` for an I/O
    error, else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return "full"
        if isinstance(seen, OSError) and seen.errno == errno.EIO:
            return "io"
        text = str(seen).lower()
        if any(t in text for t in _FULL_TEXTS) or (_WRITE_FAILED_TEXT in text
                                                    and free_bytes(path) < LOW_SPACE_BYTES):
            return "full"
        seen = seen.__cause__ or seen.__context__
    return None
