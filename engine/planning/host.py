"""The host around the GPUs: CPUs this process may use, RAM (lowered to the container's cgroup limit)
and the free space of the disk a run writes to. Never raises: what cannot be read is None."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def cpu_count() -> int | None:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / container cpusets
    except (AttributeError, OSError):
        return os.cpu_count()


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) gives None


def _read_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, number = line.partition(" ")
            if name == key and number.strip().isdigit():
                return int(number)
    except OSError:
        pass
    return 0


def cgroup_memory(root: Path = Path("/sys/fs/cgroup")) -> tuple[int | None, int | None]:
    """(limit, usage without reclaimable page cache) of this container's memory cgroup.

    Reads cgroup v2 (``memory.max``) or v1 (``memory/memory.limit_in_bytes``) at the cgroup
    root as mounted in our namespace. (None, None) when there is no limit.
    """
    if (root / "memory.max").exists():  # cgroup v2
        limit = _read_int(root / "memory.max")
        usage = _read_int(root / "memory.current")
        inactive = _read_stat(root / "memory.stat", "inactive_file")
    else:  # cgroup v1
        base = root / "memory"
        limit = _read_int(base / "memory.limit_in_bytes")
        usage = _read_int(base / "memory.usage_in_bytes")
        inactive = _read_stat(base / "memory.stat", "total_inactive_file")
    if limit is None or limit >= 2**60:  # v1 says "no limit" with a huge number
        return None, None
    if usage is not None:
        usage = max(0, usage - inactive)
    return limit, usage


def memory() -> tuple[int | None, int | None]:
    """(total, available) RAM in bytes, lowered to the container's limit where there is one."""
    total = available = None
    try:
        import psutil

        vm = psutil.virtual_memory()
        total, available = int(vm.total), int(vm.available)
    except Exception as exc:
        log.debug("psutil.virtual_memory failed: %r", exc)
    try:
        limit, usage = cgroup_memory()
    except Exception as exc:
        log.debug("cgroup memory read failed: %r", exc)
        limit, usage = None, None
    if limit is not None and (total is None or limit < total):
        total = limit
        if usage is not None:
            room = max(0, limit - usage)
            available = room if available is None else min(available, room)
    return total, available


def disk(output_dir: Path | None) -> tuple[str | None, int | None]:
    """(existing directory measured, free bytes) for output_dir or, when None, the cwd."""
    try:
        path = Path(output_dir).expanduser().absolute() if output_dir is not None else Path.cwd()
        while not path.exists() and path != path.parent:
            path = path.parent  # the output dir may not exist yet: measure where it will be
        return str(path), int(shutil.disk_usage(path).free)
    except Exception as exc:
        log.debug("disk_usage failed: %r", exc)
        return None, None
