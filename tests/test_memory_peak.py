"""bench.memory_peak on a hand-made memory history: the peak reserved moment and what held it."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from bench import memory_peak

GIB = memory_peak.GIB


def _event(action: str, addr: int, size: int, stream: int = 0, filename: str = "", line: int = 0) -> dict[str, Any]:
    frames = [{"filename": "/venv/site-packages/torch/utils/checkpoint.py", "line": 1, "name": "inner"}]
    if filename:
        frames.append({"filename": filename, "line": line, "name": "forward"})
    return {"action": action, "addr": addr, "size": size, "stream": stream, "frames": frames}


RECORDED = {"start_allocated": 10 * GIB, "start_reserved": 11 * GIB, "snapshot": {"device_traces": [[
    _event("segment_map", 1, 2 * GIB),
    _event("alloc", 100, GIB, filename="/repo/engine/training/fused_lora.py", line=40),
    _event("alloc", 200, GIB // 2, stream=7, filename="/repo/engine/training/offload_checkpoint.py", line=90),
    _event("free_requested", 100, GIB),  # still in use by a stream: not yet free
    _event("alloc", 300, GIB // 4, filename="/repo/engine/training/fused_lora.py", line=40),
    _event("free_completed", 100, GIB),
    _event("segment_map", 2, GIB),  # the peak: 14 GiB reserved, 10.75 allocated ...
    _event("alloc", 400, GIB // 4),  # ... then 11: the moment of the peak with the least cached but free
    _event("segment_unmap", 1, 2 * GIB),
    _event("free_completed", 200, GIB // 2),
]]}}


def test_the_peak_reserved_moment_and_what_was_live_then() -> None:
    report = memory_peak.analyse(RECORDED)
    assert report.peak_reserved == 14 * GIB
    assert report.allocated_then == 11 * GIB  # A freed; B, C and D live
    assert report.cached_free == 3 * GIB
    assert report.peak_allocated == 10 * GIB + GIB + GIB // 2 + GIB // 4  # A, B and C live at once
    assert report.streams == {0: GIB + GIB // 4 + GIB // 4, 7: GIB // 2}
    assert report.live_then == [("offload_checkpoint.py:90 forward", GIB // 2, 1),  # torch's own frames skipped
                                ("fused_lora.py:40 forward", GIB // 4, 1), (memory_peak.NO_FRAME, GIB // 4, 1)]


def test_an_allocation_without_a_python_frame_is_named_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = {"start_allocated": 0, "start_reserved": 0, "snapshot": {"device_traces": [[
        _event("segment_alloc", 1, GIB), _event("alloc", 5, GIB // 2)]]}}
    path = tmp_path / "memory.pickle"
    path.write_bytes(pickle.dumps(recorded))
    monkeypatch.setattr("sys.argv", ["memory_peak", str(path)])
    memory_peak.main()
    out = capsys.readouterr().out
    assert "peak reserved 1.000 GiB: allocated then 0.500 GiB, cached but free 0.500 GiB" in out
    assert memory_peak.NO_FRAME in out and "0: 0.500 GiB" in out
