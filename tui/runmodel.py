"""What the dashboard knows about one run, built only from its run directory (no Textual here).

`RunModel.apply(events)` folds events in as they are read; `RunModel.view(state)` takes a small, immutable
copy for the screen. Memory stays bounded however long the run: chart series merge neighbouring points
when they fill up (so they always span the whole run), resource histories are fixed-length deques, and
the log keeps its last lines. The worker that follows a run owns its RunModel; the screen only ever sees
views, so no state is shared between threads.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tunewiz.engine.run.events import Event
from tunewiz.engine.run.rundir import LIVE_STATES
from tunewiz.engine.run.worktime import finite as _num
from tunewiz.engine.run.worktime import training_time
from tunewiz.tui.runreader import Chunk, decode_object

SERIES_POINTS = 512
"""Points kept per chart series; a longer run is merged two points into one, again and again."""
RESOURCE_POINTS = 120
"""Resource samples kept per gauge (the engine writes one every 5 s: the last 10 minutes)."""
LOG_LINES = 400
ALERTS_KEPT = 50
SMOOTHING = 0.8
"""Weight of the debiased exponential moving average drawn over the training loss (TensorBoard's slider)."""
CHARTED = ("loss", "learning_rate", "grad_norm", "tokens_per_s")
"""Step fields kept as chart series, in the order of events.STEP_FIELDS (the fast path reads exactly these).
A new chart: its field here, its drawing in tunewiz.tui.panels.CHARTS."""
PREFERENCE_METRICS = ("chosen_reward", "rejected_reward", "margin", "accuracy")
"""The fields of `preference` events the dashboard charts (docs/run-protocol.md)."""
_finite = math.isfinite
_lt = operator.lt


class Series:
    """A chart series of (x, y) with at most `max_points` points that always covers everything added.

    Points arrive in x order. When the list fills up, neighbours are averaged pairwise and each kept point
    stands for twice as many raw ones (`stride`), so memory is bounded and the whole history stays drawn.
    """

    def __init__(self, max_points: int = SERIES_POINTS) -> None:
        self.max_points = max_points
        self.xs: list[float] = []
        self.ys: list[float] = []
        self.stride = 1
        self._n = 0
        self._sx = 0.0
        self._sy = 0.0
        self._first_x: float | None = None

    def __len__(self) -> int:
        return len(self.xs) + (1 if self._n else 0)

    def add(self, x: float, y: float) -> None:
        if self._n == 0:
            self._first_x = x
        self._n += 1
        self._sx += x
        self._sy += y
        if self._n >= self.stride:
            self.xs.append(self._sx / self._n)
            self.ys.append(self._sy / self._n)
            self._n, self._sx, self._sy = 0, 0.0, 0.0
            if len(self.xs) >= self.max_points:
                self._halve()

    def extend(self, xs: list[float], ys: list[float]) -> None:
        """Add many points at once: whole buckets are averaged with slices (the bulk replay's fast path)."""
        n, i = len(xs), 0
        while i < n and self._n:
            self.add(xs[i], ys[i])
            i += 1
        remaining = n - i
        while len(self.xs) + remaining // self.stride >= self.max_points:
            self._halve()
        stride = self.stride
        full_end = i + (remaining // stride) * stride
        if stride == 1:
            self.xs.extend(xs[i:full_end])
            self.ys.extend(ys[i:full_end])
        else:
            for j in range(i, full_end, stride):
                self.xs.append(sum(xs[j:j + stride]) / stride)
                self.ys.append(sum(ys[j:j + stride]) / stride)
        for j in range(full_end, n):
            self.add(xs[j], ys[j])

    def _halve(self) -> None:
        xs, ys = self.xs, self.ys
        pairs = len(xs) // 2
        self.xs = [(xs[2 * i] + xs[2 * i + 1]) / 2 for i in range(pairs)] + xs[2 * pairs:]
        self.ys = [(ys[2 * i] + ys[2 * i + 1]) / 2 for i in range(pairs)] + ys[2 * pairs:]
        self.stride *= 2

    def cut_from(self, x: float) -> None:
        """Forget points at or after `x` (a resumed run repeats the steps after its checkpoint)."""
        if self._n and self._first_x is not None and self._first_x >= x:
            self._n, self._sx, self._sy = 0, 0.0, 0.0
        while self.xs and self.xs[-1] >= x:
            self.xs.pop()
            self.ys.pop()

    def points(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        xs, ys = list(self.xs), list(self.ys)
        if self._n:
            xs.append(self._sx / self._n)
            ys.append(self._sy / self._n)
        return tuple(xs), tuple(ys)

    def clear(self) -> None:
        self.__init__(self.max_points)  # type: ignore[misc]


def smoothed(ys: Iterable[float], stride: int = 1, weight: float = SMOOTHING) -> tuple[float, ...]:
    """Debiased exponential moving average; `stride` raw points per value keeps the smoothing per step."""
    w = weight ** max(1, stride)
    out, avg, norm = [], 0.0, 0.0
    for y in ys:
        avg = w * avg + (1 - w) * y
        norm = w * norm + (1 - w)
        out.append(avg / norm)
    return tuple(out)


@dataclass
class GpuHistory:
    """One GPU's latest reading, its peaks and a short history per gauge."""

    index: int
    name: str = "GPU"
    mem_total: float | None = None
    latest: dict[str, float | None] = field(default_factory=dict)
    peak_mem: float = 0.0
    peak_torch: float = 0.0
    history: dict[str, deque[float]] = field(default_factory=dict)

    def add(self, device: dict[str, Any]) -> None:
        self.name = str(device.get("name") or self.name)
        self.mem_total = _num(device.get("mem_total_bytes")) or self.mem_total
        values = {"mem": _num(device.get("mem_used_bytes")), "util": _num(device.get("util_pct")),
                  "power": _num(device.get("power_w")), "temp": _num(device.get("temp_c"))}
        self.latest = values
        for key, value in values.items():
            if value is not None:
                self.history.setdefault(key, deque(maxlen=RESOURCE_POINTS)).append(value)
        self.peak_mem = max(self.peak_mem, values["mem"] or 0.0)
        self.peak_torch = max(self.peak_torch, _num(device.get("torch_peak_reserved_bytes")) or 0.0)


@dataclass(frozen=True)
class GpuView:
    index: int
    name: str
    mem_total: float | None
    latest: dict[str, float | None]
    peak_mem: float
    peak_torch: float
    history: dict[str, tuple[float, ...]]


@dataclass(frozen=True)
class LogLine:
    time: float
    level: str  # info, warning, error, phase, sample, ...
    text: str


@dataclass(frozen=True)
class RunView:
    """An immutable picture of a run for the screen (plain tuples: safe to hand across threads)."""

    run_id: str
    state: str
    name: str | None
    model: str | None
    method: str | None
    version: int
    """Grows whenever the events change what is shown (the screen redraws charts only then)."""
    events: int
    skipped: int
    first_time: float | None
    lives: tuple[tuple[float, float], ...]
    """[start, last event time] of each engine life (tunewiz.engine.run.worktime.training_time adds them up)."""
    live_since: float | None
    """Start of the current engine life while it runs (elapsed goes on from its last event to now)."""
    last_time: float | None
    step: int | None
    total_steps: int | None
    epoch: float | None
    loss: float | None
    best_loss: float | None
    eval_loss: float | None
    best_eval: float | None
    learning_rate: float | None
    tokens_per_s: float | None
    samples_per_s: float | None
    tokens_seen: int | None
    eta_s: float | None
    last_step_time: float | None
    phase: str | None
    phase_message: str | None
    checkpoint_step: int | None
    resumes: int
    series: dict[str, tuple[tuple[float, ...], tuple[float, ...]]]
    """(steps, values) of each CHARTED step field."""
    loss_smooth: tuple[float, ...]
    eval_xs: tuple[float, ...]
    eval_ys: tuple[float, ...]
    gpus: tuple[GpuView, ...]
    process: dict[str, float | None]
    process_history: dict[str, tuple[float, ...]]
    peak_rss: float
    samples_first: tuple[int, tuple[dict[str, Any], ...]] | None
    samples_latest: tuple[int, tuple[dict[str, Any], ...]] | None
    logs: tuple[LogLine, ...]
    log_total: int
    """Log lines ever added (`logs` keeps the last ones): the screen appends only lines it has not shown."""
    error: dict[str, Any] | None
    finished: dict[str, Any] | None
    output_dir: str | None
    alerts: tuple[dict[str, Any], ...] = ()
    """The coach's alerts (`alert` events: code, severity, step, message, hint), oldest first."""
    preference: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = field(default_factory=dict)
    """A preference run's training metrics by `preference` event field (margin, chosen_reward, ...): (steps,
    values); empty for supervised runs."""

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def elapsed(self, now: float) -> float | None:
        """Seconds the engine has worked on this run (gaps between stop and resume not counted)."""
        if self.first_time is None:
            return None
        running = self.state in ("running", "stopping") and self.live_since is not None
        return training_time(self.lives, now if running else None)

    def eta(self, now: float) -> float | None:
        if not self.live or self.eta_s is None or self.last_step_time is None:
            return None
        return max(0.0, self.eta_s - max(0.0, now - self.last_step_time))


class RunModel:
    """Folds a run's events into what the dashboard shows."""

    def __init__(self, run_id: str, status: dict[str, Any] | None = None) -> None:
        self.run_id = run_id
        status = status or {}
        self.name = status.get("name")
        self.model = status.get("model")
        self.method = status.get("method")
        self.reset()

    def reset(self) -> None:
        """Forget every event (the file was truncated or replaced)."""
        self.version = 0
        self.events = 0
        self.skipped = 0
        self.first_time: float | None = None
        self.last_time: float | None = None
        self.lives: list[list[float]] = []  # [start, last event time] per engine life
        self.resumes = 0
        self.last_step: dict[str, Any] = {}
        self.last_step_time: float | None = None
        self.best_loss: float | None = None
        self.eval_loss: float | None = None
        self.best_eval: float | None = None
        self.series = {name: Series() for name in CHARTED}
        self.evals = Series(128)
        self.gpus: dict[int, GpuHistory] = {}
        self.process: dict[str, float | None] = {}
        self.process_history: dict[str, deque[float]] = {}
        self.peak_rss = 0.0
        self.samples_first: tuple[int, tuple[dict[str, Any], ...]] | None = None
        self.samples_latest: tuple[int, tuple[dict[str, Any], ...]] | None = None
        self.logs: deque[LogLine] = deque(maxlen=LOG_LINES)
        self.log_total = 0
        self.error: dict[str, Any] | None = None
        self.finished: dict[str, Any] | None = None
        self.phase: str | None = None
        self.phase_message: str | None = None
        self.checkpoint_step: int | None = None
        self.output_dir: str | None = None
        self.alerts: deque[dict[str, Any]] = deque(maxlen=ALERTS_KEPT)
        self.preference: dict[str, Series] = {}
        self._buffer = _empty_buffer()
        self._last_step_no = 0

    # ------------------------------------------------------------------ folding events

    def apply(self, events: Iterable[Event]) -> None:
        """Fold in decoded events (tunewiz.engine.run.events.Event)."""
        self.apply_raw([{"type": e.type, "time": e.time, "seq": e.seq, **e.data} for e in events])

    def apply_raw(self, events: Iterable[dict[str, Any]]) -> None:
        """Fold in events as decoded JSON objects (no per-event objects).

        Step values are gathered in plain lists and handed to the series a batch at a time.
        """
        count = 0
        apply_one = self._apply
        self._buffer = _empty_buffer()
        for event in events:
            apply_one(event)
            count += 1
        self._flush()
        self.events += count
        self.version += 1

    def apply_bytes(self, body: bytes) -> int:
        """Fold in complete lines of events.jsonl; returns how many lines were skipped as malformed.

        Runs of step lines in the engine's own layout arrive from tunewiz.tui.runreader column by column and are
        converted with map(float, ...), without a dict per line; every other line arrives decoded and checked
        as tunewiz.engine.run.events.EventReader does. The result is the same as `apply_raw` on the decoded
        events (tests/test_tui_dashboard.py checks it on every fixture).
        """
        self._buffer = _empty_buffer()
        count = skipped = 0
        fast_line_step: int | None = None
        chunk = Chunk(body, CHARTED)
        for part in chunk:
            if part is None:
                skipped += 1
                continue
            if isinstance(part, dict):
                self._apply(part)
                if part["type"] == "step":
                    fast_line_step = None
                count += 1
                continue
            steps = part.steps
            count += len(steps)
            if not self.lives or steps[0] <= self._last_step_no or not all(map(_lt, steps, steps[1:])):
                # before any `started`, or a resumed run repeating steps: one decoded event at a time
                for event in chunk.decoded(part):
                    if event is not None:
                        self._apply(event)
                fast_line_step = None
                continue
            fast_line_step = steps[-1]
            self._last_step_no = steps[-1]
            self.last_time = self.lives[-1][1] = float(part.times[-1])
            buffer = self._buffer  # not kept across blocks: folding a decoded step may flush it
            for name, raw in zip(CHARTED, part.columns):
                if b"null" in raw:
                    xs = [step for step, value in zip(steps, raw) if value != b"null"]
                    values = [float(value) for value in raw if value != b"null"]
                else:
                    xs, values = steps, list(map(float, raw))
                if not all(map(_finite, values)):
                    kept = [(x, v) for x, v in zip(xs, values) if _finite(v)]
                    xs, values = [x for x, _ in kept], [v for _, v in kept]
                buffer[name][0].extend(xs)
                buffer[name][1].extend(values)
        if fast_line_step is not None:
            self._settle_fast_steps(body, fast_line_step)
        self._flush()
        self.events += count
        self.skipped += skipped
        self.version += 1
        return skipped

    def _settle_fast_steps(self, body: bytes, step: int) -> None:
        """After fast-path step lines: the last one, decoded whole, becomes `last_step`."""
        at = body.rfind(b'"type": "step", "step": %d,' % step)  # no step line comes after this one
        end = body.find(b"\n", at)
        event = decode_object(body[body.rfind(b"\n", 0, at) + 1:end if end >= 0 else len(body)]) if at >= 0 else None
        if event is None:
            return
        self.last_step = event
        self.last_step_time = event["time"]

    def _flush(self) -> None:
        """Hand the gathered step values to their series."""
        losses = self._buffer["loss"][1]
        if losses:
            low = min(losses)
            if self.best_loss is None or low < self.best_loss:
                self.best_loss = low
        for name, (xs, ys) in self._buffer.items():
            if xs:
                self.series[name].extend(xs, ys)
        self._buffer = _empty_buffer()

    def _log(self, when: float, level: str, text: str) -> None:
        self.logs.append(LogLine(when, level, text))
        self.log_total += 1

    def _apply(self, d: dict[str, Any]) -> None:
        kind = d["type"]
        when = d["time"]
        if self.first_time is None:
            self.first_time = when
        self.last_time = when
        if kind == "step":  # the hot path: nearly every event of a long run
            if self.lives:
                self.lives[-1][1] = when
            else:
                self.lives.append([when, when])
            step = d.get("step")
            if not isinstance(step, int):
                return
            if self._last_step_no and step <= self._last_step_no:
                self._flush()
                for series in self.series.values():
                    series.cut_from(step)
            self.last_step = d
            self.last_step_time = when
            self._last_step_no = step
            buffer = self._buffer  # this runs once per step of the whole history: no function calls
            for name in CHARTED:
                value = d.get(name)
                if (value.__class__ is float or value.__class__ is int) and _finite(value):
                    xs, ys = buffer[name]
                    xs.append(step)
                    ys.append(value)
            return
        if kind == "started":
            if self.lives:
                self.resumes += 1
            self.lives.append([when, when])
            self.error = None
            self.finished = None
            resumed = d.get("resumed_from_step")
            where = f" on {d.get('host')}" if d.get("host") else ""
            text = f"engine started{where} (pid {d.get('pid')})"
            if self.resumes:
                text += (f", resuming from step {resumed}" if resumed
                         else ", resumed without a checkpoint (from the start)")
            self._log(when, "info", text)
            return
        if self.lives:
            self.lives[-1][1] = when
        else:
            self.lives.append([when, when])
        if kind == "gpu":
            for device in d.get("devices") or ():
                if isinstance(device, dict) and isinstance(device.get("index"), int):
                    self.gpus.setdefault(device["index"], GpuHistory(device["index"])).add(device)
            process = d.get("process")
            if isinstance(process, dict):
                values = {"rss": _num(process.get("rss_bytes")), "cpu": _num(process.get("cpu_pct")),
                          "cpu_count": _num(process.get("cpu_count"))}
                self.process = values
                for key in ("rss", "cpu"):
                    value = values[key]
                    if value is not None:
                        self.process_history.setdefault(key, deque(maxlen=RESOURCE_POINTS)).append(value)
                self.peak_rss = max(self.peak_rss, values["rss"] or 0.0)
        elif kind == "eval":
            value = _num(d.get("eval_loss"))
            if value is not None and isinstance(d.get("step"), int):
                self.evals.cut_from(d["step"])
                self.evals.add(d["step"], value)
                self.eval_loss = value
                self.best_eval = value if self.best_eval is None else min(self.best_eval, value)
                self._log(when, "eval", f"eval loss {value:.4f} at step {d['step']}")
        elif kind == "preference":
            step = d.get("step")
            if d.get("split") == "train" and isinstance(step, int):
                for key in PREFERENCE_METRICS:
                    value = _num(d.get(key))
                    if value is not None:
                        series = self.preference.setdefault(key, Series())
                        series.cut_from(step)
                        series.add(step, value)
            elif d.get("split") == "eval":
                self._log(when, "eval", f"eval reward margin {_num(d.get('margin')) or 0:.3f}, accuracy "
                                        f"{_num(d.get('accuracy')) or 0:.0%} at step {step}")
        elif kind == "sample":
            samples = tuple(s for s in d.get("samples") or () if isinstance(s, dict))
            entry = (int(d.get("step") or 0), samples)
            if self.samples_first is None or entry[0] == 0:
                self.samples_first = entry
            self.samples_latest = entry
            matched = sum(bool(s.get("match")) for s in samples)
            self._log(when, "sample", f"samples at step {entry[0]}: {matched}/{len(samples)} match the reference")
        elif kind == "phase":
            self.phase, self.phase_message = d.get("phase"), d.get("message")
            self._log(when, "phase", f"[{d.get('phase')}] {d.get('message')}")
        elif kind == "checkpoint":
            self.checkpoint_step = d.get("step")
            self._log(when, "checkpoint", f"checkpoint saved at step {d.get('step')}")
        elif kind == "log":
            level = str(d.get("level")) if d.get("level") in ("debug", "info", "warning", "error") else "info"
            if level != "debug":
                self._log(when, level, str(d.get("message")))
        elif kind == "alert":
            self.alerts.append({k: d.get(k) for k in ("code", "severity", "step", "message", "hint")})
            self._log(when, "alert", f"coach: {d.get('message')} Try: {d.get('hint')}")
        elif kind == "error":
            self.error = {k: v for k, v in d.items() if k not in ("v", "seq", "time", "type")}
            self._log(when, "error", f"{d.get('error_type')}: {d.get('message')}")
        elif kind == "finished":
            self.finished = {k: v for k, v in d.items() if k not in ("v", "seq", "time", "type")}
            self.output_dir = d.get("output_dir") or self.output_dir
            text = f"engine finished: {d.get('status')} at step {d.get('step', '-')}"
            if d.get("status") == "completed" and d.get("output_dir"):
                text += f"; the adapter is in {d['output_dir']}/adapter"
            self._log(when, "finished", text)

    # ------------------------------------------------------------------ the view

    def view(self, state: str) -> RunView:
        s = self.last_step
        series = {name: values.points() for name, values in self.series.items()}
        eval_xs, eval_ys = self.evals.points()
        live = state in LIVE_STATES
        return RunView(
            run_id=self.run_id, state=state, name=self.name, model=self.model, method=self.method,
            version=self.version, events=self.events, skipped=self.skipped, first_time=self.first_time,
            lives=tuple((start, last) for start, last in self.lives),
            live_since=self.lives[-1][0] if live and self.lives else None,
            last_time=self.last_time, step=s.get("step"), total_steps=s.get("total_steps"), epoch=_num(s.get("epoch")),
            loss=_num(s.get("loss")), best_loss=self.best_loss, eval_loss=self.eval_loss, best_eval=self.best_eval,
            learning_rate=_num(s.get("learning_rate")), tokens_per_s=_num(s.get("tokens_per_s")),
            samples_per_s=_num(s.get("samples_per_s")),
            tokens_seen=s.get("tokens_seen") if isinstance(s.get("tokens_seen"), int) else None,
            eta_s=_num(s.get("eta_s")), last_step_time=self.last_step_time, phase=self.phase,
            phase_message=self.phase_message, checkpoint_step=self.checkpoint_step, resumes=self.resumes,
            series=series, loss_smooth=smoothed(series["loss"][1], self.series["loss"].stride),
            eval_xs=eval_xs, eval_ys=eval_ys,
            gpus=tuple(GpuView(g.index, g.name, g.mem_total, dict(g.latest), g.peak_mem, g.peak_torch,
                               {k: tuple(v) for k, v in g.history.items()})
                       for _, g in sorted(self.gpus.items())),
            process=dict(self.process), process_history={k: tuple(v) for k, v in self.process_history.items()},
            peak_rss=self.peak_rss, samples_first=self.samples_first, samples_latest=self.samples_latest,
            logs=tuple(self.logs), log_total=self.log_total, error=dict(self.error) if self.error else None,
            finished=dict(self.finished) if self.finished else None, output_dir=self.output_dir,
            alerts=tuple(self.alerts),
            preference={key: series.points() for key, series in self.preference.items()},
        )


def _empty_buffer() -> dict[str, tuple[list[float], list[float]]]:
    """Step values gathered for each series until the next flush."""
    return {name: ([], []) for name in CHARTED}
