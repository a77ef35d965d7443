"""Event writer and follower: partial lines, truncation, unknown types, garbage, seq continuity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunewiz.engine.run.events import EventReader, EventWriter, validate


def test_writer_numbers_events_and_validates(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    writer.emit("log", level="info", message="hello")
    writer.emit("step", step=1, total_steps=10, epoch=0.1, loss=2.5, learning_rate=1e-4, elapsed_s=1.0)
    writer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["seq"] for e in lines] == [1, 2]
    assert all(not validate(e) for e in lines)
    assert lines[0]["v"] == 1 and isinstance(lines[0]["time"], float)
    with pytest.raises(ValueError, match="step.loss: missing"):
        EventWriter(path).emit("step", step=1, total_steps=1, epoch=0, learning_rate=0, elapsed_s=0)


def test_seq_continues_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    EventWriter(path).emit("log", level="info", message="a")
    event = EventWriter(path).emit("log", level="info", message="b")
    assert event["seq"] == 2


def test_validate_rejects_bad_events() -> None:
    assert validate([]) == ["not a JSON object"]
    assert any("unknown event type" in p for p in validate({"v": 1, "seq": 1, "time": 1.0, "type": "zap"}))
    assert any("finished.status" in p for p in validate({"v": 1, "seq": 1, "time": 1.0, "type": "finished",
                                                         "status": "exploded"}))
    assert any("seq" in p for p in validate({"v": 1, "seq": True, "time": 1.0, "type": "log", "level": "info",
                                             "message": "x"}))


def _line(seq: int, kind: str = "log", **data: object) -> bytes:
    body = {"v": 1, "seq": seq, "time": 1.0, "type": kind, **({"level": "info", "message": "m"} if kind == "log"
                                                               else data)}
    return (json.dumps(body) + "\n").encode()


def test_reader_holds_back_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    whole = _line(2)
    path.write_bytes(_line(1) + whole[:10])
    reader = EventReader(path)
    assert [e.seq for e in reader.poll().events] == [1]
    assert reader.poll().events == []
    with path.open("ab") as handle:
        handle.write(whole[10:])
    assert [e.seq for e in reader.poll().events] == [2]


def test_reader_skips_garbage_unknown_types_and_newer_versions(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    newer = json.dumps({"v": 99, "seq": 3, "time": 1.0, "type": "log", "level": "info", "message": "m"})
    path.write_bytes(_line(1) + b"{not json\n" + b'{"v":1,"seq":2,"time":1,"type":"teleport"}\n'
                     + newer.encode() + b"\n" + b"\n" + b"\xff\xfe\n" + _line(4))
    result = EventReader(path).poll()
    assert [e.seq for e in result.events] == [1, 4]
    assert result.skipped == 4 and not result.reset


def test_reader_restarts_when_file_shrinks_or_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(_line(1) + _line(2) + _line(3))
    reader = EventReader(path)
    assert len(reader.poll().events) == 3
    path.write_bytes(_line(1))  # truncated and rewritten, smaller
    result = reader.poll()
    assert result.reset and [e.seq for e in result.events] == [1]
    replacement = tmp_path / "new.jsonl"
    replacement.write_bytes(_line(1) + _line(2) + _line(3) + _line(4))
    os.replace(replacement, path)  # a different file, larger
    result = reader.poll()
    assert result.reset and [e.seq for e in result.events] == [1, 2, 3, 4]


def test_reader_on_missing_file(tmp_path: Path) -> None:
    reader = EventReader(tmp_path / "none.jsonl")
    assert reader.poll().events == [] and reader.read_all() == []


def test_reader_reads_in_bounded_chunks(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(_line(i) for i in range(1, 101)))
    reader = EventReader(path)
    seqs = []
    for _ in range(100):
        seqs += [e.seq for e in reader.poll(max_bytes=333).events]
    assert seqs == list(range(1, 101))


def test_step_events_are_written_in_the_layout_readers_match(tmp_path: Path) -> None:
    """However the trainer passes a step's fields, the line has STEP_FIELDS' order, so the dashboard's fast path
    (tunewiz.tui.runreader) reads it; a layout it was not built for is refused, not misread."""
    import re

    from tunewiz.engine.run.events import STEP_FIELDS, step_line_pattern

    writer = EventWriter(tmp_path / "events.jsonl")
    fields = {"step": 3, "total_steps": 10, "epoch": 0.3, "loss": 2.5, "learning_rate": 2e-4, "grad_norm": None,
              "tokens_per_s": 12.5, "samples_per_s": 1.0, "tokens_seen": 100, "elapsed_s": 3.0, "eta_s": 7.0}
    writer.emit("step", **dict(reversed(list(fields.items()))))
    writer.close()
    line = (tmp_path / "events.jsonl").read_bytes().strip()
    pattern = re.compile(step_line_pattern(("step", "loss", "grad_norm", "tokens_per_s")))
    assert pattern.fullmatch(line).groups()[1:] == (b"3", b"2.5", b"null", b"12.5")
    assert list(json.loads(line))[4:] == list(STEP_FIELDS)
    with pytest.raises(ValueError, match="order"):
        step_line_pattern(("loss", "step"))
