"""bench.host_gaps on hand-made traces: which idle gaps count and what they are charged to."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from bench import host_gaps


def _event(cat: str, name: str, start: float, end: float) -> dict[str, Any]:
    return {"ph": "X", "cat": cat, "name": name, "ts": start, "dur": end - start, "pid": 1, "tid": 1}


TRACE = {"traceEvents": [
    _event("kernel", "gemm", 0, 100), _event("kernel", "gemm", 150, 250), _event("gpu_memcpy", "copy", 245, 260),
    _event("kernel", "add", 265, 300), _event("kernel", "gemm", 400, 500),
    _event("python_function", "train.py(10): step", 0, 600),
    _event("python_function", "peft/layer.py(80): forward", 90, 170),
    _event("cpu_op", "aten::addmm", 110, 140),
    _event("cpu_op", "aten::isnan", 310, 390),
    {"ph": "i", "cat": "kernel", "name": "instant", "ts": 320},  # not a complete event: ignored
]}


def test_gaps_are_charged_to_the_innermost_frame_and_operator() -> None:
    report = host_gaps.analyse(TRACE, min_gap_us=20)
    assert (report.window_us, report.busy_us) == (500, 345)  # the copy overlaps a kernel: merged
    assert report.gaps == 2 and report.gap_us == 150  # 100..150 and 300..400; 260..265 is too short
    assert report.by_frame == [("train.py(10): step › aten::isnan", 100, 1),
                               ("peft/layer.py(80): forward › aten::addmm", 50, 1)]


def test_without_stacks_the_operator_alone_is_named(tmp_path: Path) -> None:
    no_stack = {"traceEvents": [e for e in TRACE["traceEvents"] if e.get("cat") != "python_function"]
                + [_event("kernel", "late", 900, 950)]}
    report = host_gaps.analyse(no_stack)
    assert report.by_frame == [("(no Python frame or operator at that time: the host was outside the profiled code)",
                                400, 1), ("aten::isnan", 100, 1), ("aten::addmm", 50, 1)]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump(no_stack, handle)
    text = host_gaps.render(host_gaps.analyse(host_gaps.load(path)), steps=2)
    assert text.splitlines()[0] == ("per step: 0.5 ms from the first kernel to the last, GPU busy 0.2 ms, idle 0.3 ms "
                                    "(0.3 ms of it in 2 gaps long enough to count)")
    assert "aten::isnan" in text


def test_a_trace_without_kernels_says_how_to_get_one() -> None:
    assert "no GPU kernels" in host_gaps.render(host_gaps.analyse({"traceEvents": [_event("cpu_op", "x", 0, 5)]}))


def test_the_sweep_finds_the_same_innermost_span_as_a_scan() -> None:
    import random

    rng = random.Random(0)
    starts = [rng.uniform(0, 100) for _ in range(300)]
    spans = [(start, start + rng.uniform(0.1, 30), f"s{i}") for i, start in enumerate(starts)]
    points = [rng.uniform(0, 130) for _ in range(200)]
    found = host_gaps._innermost_at(spans, points)
    for point in points:
        covering = [(end - start, end, name) for start, end, name in spans if start <= point <= end]
        assert found[point] == (min(covering)[2] if covering else None)
