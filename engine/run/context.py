"""What a trainer gets from the engine process: the run, its spec, the event writer and stop state."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.run.events import EventWriter
from tunewiz.engine.run.rundir import RunDir

STATUS_INTERVAL_S = 1.0


@dataclass
class TrainOutcome:
    """How a trainer ended (exceptions end a run as `failed` instead)."""

    status: str  # "completed" or "cancelled"
    step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineContext:
    """Shared by the engine process and the trainer it runs."""

    run: RunDir
    spec: RunSpec
    events: EventWriter
    resume: bool = False
    writes: bool = True  # False on the ranks after the first of a multi-GPU run: rank 0 alone writes
    stop_event: threading.Event = field(default_factory=threading.Event)
    last_step: int = 0  # the newest `step` event's step, for the final events
    observers: list[Callable[[str, dict[str, Any]], None]] = field(default_factory=list)
    """Called with each event written (type, fields): the coach (engine/run/coach.py) watches the metrics."""
    _last_status: float = 0.0
    _unwritten_step: dict[str, Any] = field(default_factory=dict)
    """The last step's summary when throttling kept it out of status.json: the next write carries it."""

    def should_stop(self) -> bool:
        """True once a stop file or SIGTERM asked the run to end."""
        if not self.stop_event.is_set() and self.run.stop_requested():
            self.stop_event.set()
        return self.stop_event.is_set()

    def emit(self, kind: str, **data: Any) -> dict[str, Any]:
        """Write an event and keep status.json's summary current (throttled for `step`/`gpu`)."""
        if kind == "step":
            self.last_step = data["step"]
        if not self.writes:
            return {"type": kind, **data}
        event = self.events.emit(kind, **data)
        for observer in self.observers:
            observer(kind, data)
        now = time.monotonic()
        last_step = kind == "step" and data["step"] >= data["total_steps"]
        if kind == "step":
            self._unwritten_step = dict(step=data["step"], total_steps=data["total_steps"], loss=data["loss"],
                                        epoch=data["epoch"], eta_s=data.get("eta_s"))
        if kind in ("step", "gpu") and now - self._last_status < STATUS_INTERVAL_S and not last_step:
            return event
        self._last_status = now
        # a run stopped right after a throttled step still shows that step, its total and its loss
        summary: dict[str, Any] = {**self._unwritten_step, "last_seq": event["seq"], "last_event": kind}
        self._unwritten_step = {}
        if kind == "phase":
            summary["phase"] = data["phase"]
        elif kind == "eval":
            summary["eval_loss"] = data["eval_loss"]
        self.run.update_status(**summary)
        return event

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)
