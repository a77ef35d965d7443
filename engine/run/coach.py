"""The engine's side of the coach: feeds the events it writes to tunewiz.engine.run.alerts.Coach and writes each
alert the coach raises as an `alert` event; names the cause of a slowdown from NVML."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tunewiz.engine.run.alerts import Coach
from tunewiz.engine.run.context import EngineContext

Watch = Callable[[str, dict[str, Any]], None]
"""Feeds one event's (type, fields) to the coach and writes the alerts it raises."""

HOT_C = 83
"""A GPU this hot (°C) is likely lowering its clocks to cool down (most NVIDIA cards start near 83-87 °C)."""


def explain_slowdown() -> str | None:
    """What NVML says may slow the GPUs down: other processes on them, a high temperature; None when nothing."""
    from tunewiz.engine.planning import hardware
    from tunewiz.engine.render import memory

    causes = []
    for gpu in hardware.probe(check_libraries=False, ignore_pids=[os.getpid()]).gpus:  # never raises
        if gpu.other_processes:
            names = ", ".join(f"{p.name} (pid {p.pid}, {memory(p.used_bytes)})"
                              for p in gpu.other_processes[:3])
            causes.append(f"{gpu.label} is shared with {names}")
        if gpu.temperature_c is not None and gpu.temperature_c >= HOT_C:
            causes.append(f"{gpu.label} is at {gpu.temperature_c} °C, hot enough to throttle its clocks")
    return "Likely cause: " + "; ".join(causes) + "." if causes else None


def attach(ctx: EngineContext) -> Watch:
    """Make a coach watch every event `ctx` writes, its alerts written as `alert` events; returns its watch, for
    what cannot be an event (a NaN loss)."""
    coach = Coach(explain_slowdown)

    def watch(kind: str, data: dict[str, Any]) -> None:
        if kind == "alert":
            return
        try:
            alerts = coach.observe(kind, data)
        except Exception as exc:  # noqa: BLE001 - the coach must never break training
            ctx.log(f"the coach failed on a {kind} event: {exc!r}", level="debug")
            return
        for alert in alerts:
            ctx.emit("alert", **alert.event_fields())

    ctx.observers.append(watch)
    return watch
