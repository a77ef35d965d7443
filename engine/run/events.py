"""Typed, versioned events: the engine appends them to `events.jsonl`; readers follow the file.

Each line is one JSON object written whole, with at least `v` (protocol version), `seq` (1, 2, 3,
... across the run's life, resumes included), `time` (Unix seconds) and `type`. The fields of each
type are listed in `SCHEMA`; docs/run-protocol.md describes them for other clients.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROTOCOL_VERSION = 1

NUM = (int, float)
OPT_NUM = (int, float, type(None))

# type -> {field: (allowed python types, required)}
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "started": {"pid": ((int,), True), "host": ((str,), True), "run_id": ((str,), True),
                "resumed_from_step": ((int, type(None)), False), "version": ((str,), True),
                "python": ((str,), False), "argv": ((list,), False)},
    "phase": {"phase": ((str,), True), "message": ((str,), True), "stats": ((dict,), False),
              "done_bytes": ((int,), False), "total_bytes": ((int,), False)},
    "step": {"step": ((int,), True), "total_steps": ((int,), True), "epoch": (NUM, True),
             "loss": (NUM, True), "learning_rate": (NUM, True), "grad_norm": (OPT_NUM, False),
             "tokens_per_s": (OPT_NUM, False), "samples_per_s": (OPT_NUM, False),
             "tokens_seen": ((int,), False), "elapsed_s": (NUM, True), "eta_s": (OPT_NUM, False)},
    "eval": {"step": ((int,), True), "eval_loss": (NUM, True), "eval_tokens": ((int,), False)},
    "preference": {"step": ((int,), True), "split": ((str,), True), "chosen_reward": (NUM, True),
                   "rejected_reward": (NUM, True), "margin": (NUM, True), "accuracy": (NUM, True)},
    "gpu": {"devices": ((list,), True), "process": ((dict,), False)},
    "sample": {"step": ((int,), True), "samples": ((list,), True)},
    "checkpoint": {"step": ((int,), True), "path": ((str,), True)},
    "log": {"level": ((str,), True), "message": ((str,), True)},
    "alert": {"code": ((str,), True), "severity": ((str,), True), "step": ((int, type(None)), False),
              "message": ((str,), True), "hint": ((str,), True), "details": ((dict,), False)},
    "error": {"error_type": ((str,), True), "message": ((str,), True), "hint": ((str, type(None)), False),
              "traceback": ((str,), False)},
    "finished": {"status": ((str,), True), "step": ((int,), False), "metrics": ((dict,), False),
                 "output_dir": ((str,), False)},
}

STEP_FIELDS = tuple(SCHEMA["step"])
"""A step event's fields in the order EventWriter writes them (whatever order they were passed in): nearly
every line of a long run is a step, and readers' fast paths (the dashboard's) match this layout."""
NUMBER_PATTERN = rb"(-?[0-9][0-9.eE+-]*|null)"
"""A JSON number or null, as one regex group."""


def step_line_pattern(captured: tuple[str, ...]) -> bytes:
    """A regex matching one step line as EventWriter writes it (protocol 1): groups for its time, then for each
    field of `captured` (a subset of STEP_FIELDS, in their order), each a number or null (digits for whole-number
    fields). Fields between them
    match as anything; a step without one of them, or with fields in another order, does not match."""
    if list(captured) != [name for name in STEP_FIELDS if name in captured]:
        raise ValueError(f"{captured} is not in the order of STEP_FIELDS")
    parts = [rb'\{"v": 1, "seq": \d+, "time": ([0-9][0-9.eE+-]*), "type": "step"']
    last = STEP_FIELDS.index(captured[-1]) if captured else -1
    for name in STEP_FIELDS[:last + 1]:
        whole = SCHEMA["step"][name][0] == (int,)  # e.g. `step`: digits only, so int() always takes it
        value = (rb"(\d+)" if whole else NUMBER_PATTERN) if name in captured else rb"[^,]+"
        parts.append(b', "' + name.encode() + b'": ' + value)
    parts.append(rb"(?:, [^\n]*)?\}")
    return b"".join(parts)


FINISHED_STATUSES = ("completed", "failed", "cancelled")
LOG_LEVELS = ("debug", "info", "warning", "error")
ALERT_SEVERITIES = ("warning", "critical")
PREFERENCE_SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Event:
    """One decoded event; `data` holds the type's own fields."""

    v: int
    seq: int
    time: float
    type: str
    data: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


def validate(obj: Any) -> list[str]:
    """Every way `obj` breaks the schema (an empty list means it is a valid event)."""
    if not isinstance(obj, dict):
        return ["not a JSON object"]
    problems = []
    envelope: tuple[tuple[str, tuple[type, ...], str], ...] = (
        ("v", (int,), "int"), ("seq", (int,), "int"), ("time", NUM, "a number"), ("type", (str,), "str"))
    for key, types_, name in envelope:
        if not isinstance(obj.get(key), types_) or isinstance(obj.get(key), bool):
            problems.append(f"{key}: missing or not {name}")
    kind = obj.get("type")
    fields = SCHEMA.get(kind) if isinstance(kind, str) else None
    if fields is None:
        return problems + [f"type: unknown event type {kind!r}"]
    for name, (types_, required) in fields.items():
        if name not in obj:
            if required:
                problems.append(f"{kind}.{name}: missing")
        elif not isinstance(obj[name], types_) or (isinstance(obj[name], bool) and bool not in types_):
            problems.append(f"{kind}.{name}: {obj[name]!r} has the wrong type")
    if kind == "finished" and obj.get("status") not in FINISHED_STATUSES:
        problems.append(f"finished.status: {obj.get('status')!r} is not one of {FINISHED_STATUSES}")
    if kind == "preference" and obj.get("split") not in PREFERENCE_SPLITS:
        problems.append(f"preference.split: {obj.get('split')!r} is not one of {PREFERENCE_SPLITS}")
    if kind == "log" and obj.get("level") not in LOG_LEVELS:
        problems.append(f"log.level: {obj.get('level')!r} is not one of {LOG_LEVELS}")
    if kind == "alert" and obj.get("severity") not in ALERT_SEVERITIES:
        problems.append(f"alert.severity: {obj.get('severity')!r} is not one of {ALERT_SEVERITIES}")
    return problems


def is_valid(obj: Any) -> bool:
    """Whether a decoded line is an event this reader understands: the one check every reader uses."""
    return (isinstance(obj, dict) and isinstance(obj.get("v"), int) and obj["v"] <= PROTOCOL_VERSION
            and not validate(obj))


def _last_seq(path: Path) -> int:
    """The highest `seq` in an existing file (read from its tail), or 0."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            tail = handle.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(tail):
        try:
            seq = json.loads(line).get("seq")
        except (ValueError, AttributeError):
            continue
        if isinstance(seq, int):
            return seq
    return 0


def repair_tail(path: Path) -> int:
    """Make the file end with a whole line; return the bytes cut.

    A crash or a full disk can leave half a line at the end; the next event appended to it would be
    glued to that half and lost to every reader. A tail that is a complete event missing only its
    newline gets the newline; anything else after the last newline is cut off.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - 65536)
        tail = os.pread(fd, size - start, start)
        if not tail or tail.endswith(b"\n"):
            return 0
        cut = tail.rfind(b"\n") + 1
        fragment = tail[cut:]
        try:
            whole = is_valid(json.loads(fragment))
        except ValueError:
            whole = False
        if whole:
            os.pwrite(fd, b"\n", size)
            return 0
        if cut == 0 and start > 0:  # a torn line longer than the window: find its start the slow way
            cut = _last_newline_before(fd, start) - start
        os.ftruncate(fd, start + cut)
        os.fsync(fd)
        return len(fragment)
    finally:
        os.close(fd)


def _last_newline_before(fd: int, end: int) -> int:
    """The offset just past the last newline before `end` (0 when there is none)."""
    while end > 0:
        start = max(0, end - 65536)
        at = os.pread(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (a write may be short, e.g. on a nearly full disk)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, "short write")
        view = view[written:]


class EventWriter:
    """Appends events, each as one whole line; safe to call from several threads.

    A line is either written whole or not at all: when a write fails part-way (a full disk, an I/O
    error), the file is cut back to where the line began and the error is raised.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        repair_tail(path)
        self._seq = _last_seq(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.last_event: dict[str, Any] | None = None

    @property
    def seq(self) -> int:
        return self._seq

    def emit(self, kind: str, **data: Any) -> dict[str, Any]:
        """Write one event and return it; raises ValueError if it would break the schema."""
        if kind == "step":  # the layout readers' fast paths match (step_line_pattern)
            data = {**{k: data[k] for k in STEP_FIELDS if k in data}, **data}
        with self._lock:
            event = {"v": PROTOCOL_VERSION, "seq": self._seq + 1, "time": round(time.time(), 3),
                     "type": kind, **data}
            problems = validate(event)
            if problems:
                raise ValueError(f"invalid {kind} event: {'; '.join(problems)}")
            line = (json.dumps(event, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
            before = os.fstat(self._fd).st_size
            try:
                _write_all(self._fd, line)
            except OSError:
                try:
                    os.ftruncate(self._fd, before)  # no torn line; if this fails too, the next open repairs it
                except OSError:
                    pass
                raise
            self._seq += 1
            self.last_event = event
            return event

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


@dataclass
class ReadResult:
    """What one poll of the file brought."""

    events: list[Event]
    reset: bool = False
    skipped: int = 0


class EventReader:
    """Follows `events.jsonl` by byte offset.

    A partial last line is held back until its newline arrives; malformed lines, unknown types and
    newer protocol versions are skipped (counted in `skipped`); a file that shrank or was replaced
    is read again from the start and the result says `reset`, so a viewer clears what it had.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._pending = b""
        self._inode: int | None = None

    def poll_bytes(self, max_bytes: int | None = None) -> tuple[bytes, bool]:
        """(the complete lines written since the last poll, without the last newline; reset)."""
        reset = False
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return b"", False
        if self._inode is not None and (stat.st_ino != self._inode or stat.st_size < self.offset):
            self.offset, self._pending, reset = 0, b"", True
        self._inode = stat.st_ino
        if stat.st_size == self.offset:
            return b"", reset
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read(max_bytes if max_bytes else -1)
        self.offset += len(chunk)
        data = self._pending + chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            self._pending = data
            return b"", reset
        self._pending = data[cut + 1:]
        return data[:cut], reset

    def poll(self, max_bytes: int | None = None) -> ReadResult:
        complete, reset = self.poll_bytes(max_bytes)
        events, skipped = [], 0
        for line in complete.split(b"\n") if complete else ():
            event = decode_line(line)
            if event is None:
                skipped += line.strip() != b""
            else:
                events.append(event)
        return ReadResult(events, reset, skipped)

    def read_all(self) -> list[Event]:
        """Everything currently complete in the file (for one-shot readers)."""
        events = []
        while True:
            result = self.poll()
            events.extend(result.events)
            if not result.events and not result.skipped:
                return events


def decode_line(line: bytes) -> Event | None:
    """An Event from one line, or None for garbage, unknown types, newer protocol versions and events
    that break the schema (a missing or mistyped required field)."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not is_valid(obj):
        return None
    data = {k: val for k, val in obj.items() if k not in ("v", "seq", "time", "type")}
    return Event(obj["v"], obj["seq"], float(obj["time"]), obj["type"], data)
