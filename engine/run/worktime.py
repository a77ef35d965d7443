"""A run's training time, one definition for `tunewiz runs`, the Runs screen and the dashboard, and a cheap scan of
its events.jsonl for that time and its losses (reading only the bytes added since the last scan)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def training_time(lives: Sequence[Sequence[float]], now: float | None = None) -> float | None:
    """Seconds the engine worked on a run: each engine life from its `started` event to its last event, added up
    over resumes (the time between a stop and a resume does not count). `now` carries the current life on to the
    present while the engine runs. None before any event."""
    if not lives:
        return None
    total = sum(max(0.0, last - start) for start, last in lives)
    if now is not None:
        total += max(0.0, now - lives[-1][1])
    return total


def finite(value: object) -> float | None:
    """A JSON value as a finite float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


_LOSS = re.compile(rb'"loss": (-?[0-9][0-9.eE+-]*)')
_STEP_TYPE = b'"type": "step"'
_TIME = re.compile(rb'"time": ([0-9][0-9.eE+-]*)')


def _time_of(line: bytes | None) -> float | None:
    match = _TIME.search(line) if line else None
    try:
        return float(match.group(1)) if match else None
    except ValueError:
        return None


@dataclass
class LossScan:
    """Last and best training loss, and the engine's working time, of one run, for the Runs screen.

    Kept up to date by reading only the bytes added since the last update, and decoding only step lines'
    losses and the times at the borders of engine lives (a `started` line, the last line).
    """

    path: Path
    offset: int = 0
    inode: int | None = None
    last: float | None = None
    best: float | None = None
    pending: bytes = b""
    lives: list[list[float]] = field(default_factory=list)
    """[start, last event time] of each engine life seen so far."""

    def update(self, max_bytes: int = 64 << 20) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        if self.inode is not None and (stat.st_ino != self.inode or stat.st_size < self.offset):
            self.offset, self.pending, self.last, self.best, self.lives = 0, b"", None, None, []
        self.inode = stat.st_ino
        if stat.st_size == self.offset:
            return
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read(max_bytes)
        self.offset += len(chunk)
        lines = (self.pending + chunk).split(b"\n")
        self.pending = lines.pop()
        previous = None
        for line in lines:
            if _STEP_TYPE not in line:
                if b'"type": "started"' in line:
                    self._new_life(line, previous)
                if line.strip():
                    previous = line
                continue
            previous = line
            match = _LOSS.search(line)
            try:
                loss = float(match.group(1)) if match else finite(json.loads(line).get("loss"))
            except (ValueError, AttributeError):
                continue
            if loss is None or not math.isfinite(loss):
                continue
            self.last = loss
            self.best = loss if self.best is None else min(self.best, loss)
        if previous is not None:
            when = _time_of(previous)
            if not self.lives:
                first = _time_of(lines[0]) if lines else None
                self.lives.append([first or when or 0.0, when or first or 0.0])
            elif when is not None:
                self.lives[-1][1] = when

    def _new_life(self, line: bytes, previous: bytes | None) -> None:
        end = _time_of(previous) if previous is not None else None
        if self.lives and end is not None:
            self.lives[-1][1] = end
        when = _time_of(line)
        if when is not None:
            self.lives.append([when, when])

    def worked(self, now: float | None = None) -> float | None:
        """The run's training time (training_time); `now` extends a live engine's life to the present."""
        return training_time(self.lives, now)
