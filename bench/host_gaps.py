"""Where the GPU waits for the host: idle gaps between kernels in a torch.profiler trace, each put on
the Python frame the CPU was in at the time.

    python -m bench.host_gaps TRACE.json[.gz] [--min-gap-us 20] [--top 15]

TRACE is a Chrome trace from torch.profiler with CPU and CUDA activity and `with_stack=True`
(`python -m bench.profile_step MODEL --trace TRACE.json.gz` writes one). A gap is a stretch of at
least `--min-gap-us` in which no kernel, copy or memset runs, between the first and the last one. Each
gap is charged to the innermost Python frame and the innermost operator that span the gap's middle
("frame › operator"). The profiler's own overhead slows the host, so the gaps are longer than in a plain run; their
shares still say which code starves the GPU.
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GPU_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
NO_FRAME = "(no Python frame or operator at that time: the host was outside the profiled code)"


@dataclass(frozen=True)
class GapReport:
    """GPU time, idle gaps, and the gap time charged to each frame."""

    window_us: float  # first GPU event's start to the last one's end
    busy_us: float
    gaps: int
    gap_us: float
    by_frame: list[tuple[str, float, int]]  # ("frame › operator", gap time, how many gaps), most time first


def _complete(events: list[dict[str, Any]], categories: frozenset[str]) -> list[tuple[float, float, str]]:
    """(start, end, name) of the complete ("X") events of these categories."""
    return [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), str(e.get("name", "")))
            for e in events if e.get("ph") == "X" and e.get("cat") in categories]


def _merged(intervals: list[tuple[float, float, str]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end, _ in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _innermost_at(spans: list[tuple[float, float, str]], points: list[float]) -> dict[float, str | None]:
    """For each point, the name of the shortest span that covers it (None if none does).

    One sweep over the spans by start, with a heap of the spans begun so far by duration: a trace of
    a large model holds hundreds of thousands of Python frames, too many to scan per gap.
    """
    ordered = sorted(spans)
    begun: list[tuple[float, float, str]] = []  # (duration, end, name)
    found: dict[float, str | None] = {}
    index = 0
    for point in sorted(points):
        while index < len(ordered) and ordered[index][0] <= point:
            start, end, name = ordered[index]
            heapq.heappush(begun, (end - start, end, name))
            index += 1
        while begun and begun[0][1] < point:  # ended before this point, so before every later one too
            heapq.heappop(begun)
        found[point] = begun[0][2] if begun else None
    return found


def analyse(trace: dict[str, Any], min_gap_us: float = 20.0) -> GapReport:
    """The idle gaps of a Chrome trace's GPU timeline, charged to what the CPU was doing."""
    events = trace.get("traceEvents", [])
    busy = _merged(_complete(events, GPU_CATEGORIES))
    if not busy:
        return GapReport(0.0, 0.0, 0, 0.0, [])
    frames = _complete(events, frozenset({"python_function"}))
    operators = _complete(events, frozenset({"cpu_op", "user_annotation"}))
    gaps = [(idle_from, idle_to) for (_, idle_from), (idle_to, _) in zip(busy, busy[1:])
            if idle_to - idle_from >= min_gap_us]
    middles = [(idle_from + idle_to) / 2 for idle_from, idle_to in gaps]
    frame_at, operator_at = _innermost_at(frames, middles), _innermost_at(operators, middles)
    charged: dict[str, list[float]] = defaultdict(list)
    for (idle_from, idle_to), middle in zip(gaps, middles):
        where = [name for name in (frame_at[middle], operator_at[middle]) if name]
        charged[" › ".join(where) or NO_FRAME].append(idle_to - idle_from)
    by_frame = sorted(((name, sum(gaps), len(gaps)) for name, gaps in charged.items()), key=lambda row: -row[1])
    return GapReport(window_us=busy[-1][1] - busy[0][0], busy_us=sum(end - start for start, end in busy),
                     gaps=sum(count for _, _, count in by_frame), gap_us=sum(time for _, time, _ in by_frame),
                     by_frame=by_frame)


def load(path: Path) -> dict[str, Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def render(report: GapReport, top: int = 15, steps: int = 1) -> str:
    """The report per step (divide by `steps`, the number of steps the trace holds)."""
    if not report.window_us:
        return "no GPU kernels in this trace: profile with CUDA activity on a GPU"
    ms = 1000 * steps
    idle = report.window_us - report.busy_us
    lines = [f"per step: {report.window_us / ms:.1f} ms from the first kernel to the last, GPU busy "
             f"{report.busy_us / ms:.1f} ms, idle {idle / ms:.1f} ms ({report.gap_us / ms:.1f} ms of it in "
             f"{report.gaps / steps:.0f} gaps long enough to count)",
             "  idle ms  gaps  the CPU was in"]
    lines += [f"  {time / ms:>7.2f} {count / steps:>5.0f}  {name[:120]}" for name, time, count in report.by_frame[:top]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--min-gap-us", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--steps", type=int, default=1, help="steps the trace holds (the report is per step)")
    args = parser.parse_args()
    print(render(analyse(load(args.trace), args.min_gap_us), args.top, args.steps))


if __name__ == "__main__":
    main()
