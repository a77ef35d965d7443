"""What the GPU holds at a step's peak reserved memory: a replay of torch's CUDA memory history.

    python -m bench.memory_peak SNAPSHOT.pickle [--top 12]

SNAPSHOT is what `python -m bench.profile_step MODEL --memory SNAPSHOT.pickle` writes: one training step
recorded with `torch.cuda.memory._record_memory_history`, the snapshot torch takes after it, and the
allocated and reserved bytes when the recording began (the history holds only what changed since). The
replay follows every allocation and free, and every segment the caching allocator maps or releases, and
reports the moment reserved memory peaks: how much of it is allocated then, how much is cached but free
(memory the allocator holds that no tensor uses: the part of the peak to explain), on which streams
memory was allocated, and the largest live allocations with the Python line that made them.
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
# Actions of torch's memory history that change what is allocated, and what is reserved (expandable segments
# map and unmap pages of a segment; fixed segments are allocated and freed whole).
ALLOCATE, RELEASE = "alloc", "free_completed"
RESERVE, UNRESERVE = frozenset({"segment_alloc", "segment_map"}), frozenset({"segment_free", "segment_unmap"})
NO_FRAME = "(no Python frame recorded)"


@dataclass(frozen=True)
class PeakReport:
    """The step's peak reserved memory and what held it."""

    peak_reserved: int
    allocated_then: int
    peak_allocated: int
    streams: dict[int, int]  # stream -> bytes allocated on it over the step
    live_then: list[tuple[str, int, int]] = field(default_factory=list)  # (where, bytes, how many), largest first

    @property
    def cached_free(self) -> int:
        """Reserved but held by no tensor at the peak."""
        return self.peak_reserved - self.allocated_then


def _where(event: dict[str, Any]) -> str:
    """The innermost Python frame of the project or a library that made an allocation (torch's own skipped)."""
    for frame in event.get("frames") or []:
        filename = str(frame.get("filename", ""))
        if filename.endswith(".py") and "/torch/" not in filename:
            return f"{Path(filename).name}:{frame.get('line')} {frame.get('name')}"
    return NO_FRAME


def analyse(recorded: dict[str, Any], device: int = 0, top: int = 12) -> PeakReport:
    """Replay `recorded` (as `profile_step --memory` writes it) on `device`. Of the moments reserved memory is at
    its peak, the one with the most allocated is reported (the least left to explain)."""
    allocated, reserved = int(recorded["start_allocated"]), int(recorded["start_reserved"])
    peak_reserved, allocated_then, peak_allocated = reserved, allocated, allocated
    live: dict[int, dict[str, Any]] = {}
    live_then: dict[int, dict[str, Any]] = {}
    streams: dict[int, int] = defaultdict(int)
    for event in recorded["snapshot"]["device_traces"][device]:
        action, size = event.get("action"), int(event.get("size", 0))
        if action == ALLOCATE:
            allocated += size
            live[event["addr"]] = event
            streams[int(event.get("stream", 0))] += size
        elif action == RELEASE:
            allocated -= size
            live.pop(event["addr"], None)
        elif action in RESERVE:
            reserved += size
        elif action in UNRESERVE:
            reserved -= size
        peak_allocated = max(peak_allocated, allocated)
        if reserved > peak_reserved or (reserved == peak_reserved and allocated > allocated_then):
            peak_reserved, allocated_then, live_then = reserved, allocated, dict(live)
    grouped: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in live_then.values():
        entry = grouped[_where(event)]
        entry[0] += int(event["size"])
        entry[1] += 1
    largest = sorted(((where, size, count) for where, (size, count) in grouped.items()), key=lambda row: -row[1])
    return PeakReport(peak_reserved, allocated_then, peak_allocated, dict(streams), largest[:top])


def render(report: PeakReport) -> str:
    lines = [f"peak reserved {report.peak_reserved / GIB:.3f} GiB: allocated then {report.allocated_then / GIB:.3f} "
             f"GiB, cached but free {report.cached_free / GIB:.3f} GiB (peak allocated "
             f"{report.peak_allocated / GIB:.3f} GiB)",
             "allocated in the step, by stream: " + ", ".join(f"{stream}: {size / GIB:.3f} GiB"
                                                              for stream, size in sorted(report.streams.items())),
             "allocated at the peak since the step began, by where (GiB, tensors):"]
    lines += [f"  {size / GIB:>8.3f} {count:>5}  {where}" for where, size, count in report.live_then]
    return "\n".join(lines)


def load(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        loaded: dict[str, Any] = pickle.load(handle)  # noqa: S301 (a file this project's profile_step wrote)
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshot", type=Path)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    print(render(analyse(load(args.snapshot), top=args.top)))


if __name__ == "__main__":
    main()
