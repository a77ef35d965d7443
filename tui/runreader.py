"""Reading a run's `events.jsonl` in bulk, for the dashboard (no Textual here).

A chunk of complete lines (tunewiz.engine.run.events.EventReader.poll_bytes) is split into runs of
consecutive step lines, read by one regular expression and handed over column by column, and every
other line, decoded as JSON and validated as every reader does. The step layout comes from the engine
(events.step_line_pattern); which step fields are read is the caller's choice (RunModel's CHARTED).
Replaying 100,000 events this way takes well under a second.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tunewiz.engine.run.events import EventReader, is_valid, step_line_pattern


def decode_object(line: bytes) -> dict[str, Any] | None:
    """A valid event as a dict, or None (tunewiz.engine.run.events.is_valid decides, as for every reader)."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if is_valid(obj) else None


@functools.cache
def _lines_pattern(fields: tuple[str, ...]) -> re.Pattern[bytes]:
    """One line: a step in the engine's layout (groups: time, step, then `fields`), or anything else (the last
    group)."""
    return re.compile(rb"^(?:" + step_line_pattern(("step", *fields)) + rb"|([^\n]*))$", re.MULTILINE)


@dataclass
class StepBlock:
    """Consecutive step lines of a chunk: their times, steps and the raw values of each field read."""

    times: tuple[bytes, ...]
    steps: list[int]
    columns: list[tuple[bytes, ...]]  # one per field, in the order asked for
    first_line: int  # index in the chunk's lines, for decoding the block line by line when needed


class Chunk:
    """The parts of a chunk of complete lines, in file order: StepBlocks, decoded events (dicts) and None for
    each malformed line."""

    def __init__(self, body: bytes, fields: tuple[str, ...]) -> None:
        self.body = body
        self._fields = fields
        self._lines: list[bytes] | None = None

    def __iter__(self) -> Iterator[StepBlock | dict[str, Any] | None]:
        rows = _lines_pattern(self._fields).findall(self.body)
        other = len(self._fields) + 2
        total, i = len(rows), 0
        while i < total:
            if not rows[i][1]:
                line = rows[i][other]
                i += 1
                if line.strip():
                    yield decode_object(line)
                continue
            j = i + 1
            while j < total and rows[j][1]:
                j += 1
            columns = list(zip(*rows[i:j]))
            yield StepBlock(columns[0], list(map(int, columns[1])), columns[2:other], i)
            i = j

    def decoded(self, block: StepBlock) -> Iterator[dict[str, Any] | None]:
        """The block's lines decoded one by one (for steps that need the whole event)."""
        if self._lines is None:
            self._lines = self.body.split(b"\n")  # one row of the expression per line, so rows index lines
        for line in self._lines[block.first_line:block.first_line + len(block.steps)]:
            yield decode_object(line)


class Folds(Protocol):
    """What a prefetch reads into (tunewiz.tui.runmodel.RunModel)."""

    def reset(self) -> None: ...

    def apply_bytes(self, body: bytes) -> int: ...


class Prefetch:
    """Reads a run's whole history into `model` in a plain thread, started before the app draws its first frame.

    `tunewiz attach` starts one as the app is created, so the replay overlaps the app's start-up (which
    waits on the terminal part of the time); the dashboard's worker then takes the reader and the model
    and goes on following from where the prefetch stopped. The thread touches no widget.
    """

    def __init__(self, events_path: Path, model: Folds, chunk: int = 8 << 20) -> None:
        self.reader = EventReader(events_path)
        self.model = model
        self._chunk = chunk
        self._thread = threading.Thread(target=self._read, name="tunewiz-prefetch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            body, reset = self.reader.poll_bytes(self._chunk)
            if reset:
                self.model.reset()
            if not body:
                return
            self.model.apply_bytes(body)

    def take(self) -> tuple[EventReader, Folds]:
        """The reader and the model, once the history is read (waits for the thread)."""
        self._thread.join()
        return self.reader, self.model
