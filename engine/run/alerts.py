"""The coach: plain-words alerts from a run's own metrics (docs/alerts.md lists the rules and thresholds).

`Coach` is pure: fed the fields of `step`, `eval`, `gpu` and `checkpoint` events (as the engine emits
them, or read back from a recorded events.jsonl), it returns the alerts they raise, each at most once.
It reads no files and asks no hardware: a slowdown's cause is found by a function the engine passes in.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

WINDOW = 8
"""Logged steps in each window the loss rules compare."""
DIVERGE_RATIO = 1.5
"""Diverging: the mean of the last window is this many times the lowest window mean seen so far..."""
DIVERGE_MIN_RISE = 0.1
"""...and above it by at least this share of the first window's mean (a rise from 0.01 to 0.02 is noise)."""
GRAD_EXPLOSION = 10.0
"""A gradient norm this many times the run's median so far, and above every norm of the first window."""
FLAT_MIN_STEPS = 24
"""Logged steps before the flat rule is judged (the first window and the last may not overlap)."""
FLAT_CHANGE = 0.03
"""Flat: the last window's mean differs from the first window's by less than this share."""
OVERFIT_RISE = 0.05
"""Overfitting: two evaluations in a row this share above the best eval loss..."""
OVERFIT_MIN_RISE = 0.005
"""...and at least this much above it in absolute terms."""
THROUGHPUT_SKIP = 2
"""Logged steps left out of the throughput baseline (the first ones include warm-up and compilation)."""
THROUGHPUT_RECENT = 5
THROUGHPUT_DROP = 0.5
"""Slowdown: the median of the last THROUGHPUT_RECENT readings below this share of the baseline."""
MEMORY_FULL = 0.95
"""GPU memory in use, as a share of the card's memory, that raises the memory alert."""

CRITICAL, WARNING = "critical", "warning"


@dataclass(frozen=True)
class Alert:
    """One alert: what happened (`message`), what to try (`hint`), and the numbers behind it."""

    code: str
    severity: str
    step: int | None
    message: str
    hint: str
    details: dict[str, Any] = field(default_factory=dict)

    def event_fields(self) -> dict[str, Any]:
        """The fields of the `alert` event that records it."""
        return {"code": self.code, "severity": self.severity, "step": self.step, "message": self.message,
                "hint": self.hint, "details": self.details}


def _warning(code: str, step: int, message: str, hint: str, details: dict[str, Any]) -> list[Alert]:
    return [Alert(code, WARNING, step, message, hint, details)]


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class Coach:
    """A small stateful detector: feed it events with `observe`, get the new alerts back.

    `explain_slowdown` (optional) returns a sentence naming what slows the GPU down (heat, another
    process), or None; the engine passes one that asks NVML. Safe to call from several threads.
    """

    def __init__(self, explain_slowdown: Callable[[], str | None] | None = None) -> None:
        self._explain = explain_slowdown
        self._lock = threading.Lock()
        self.raised: set[str] = set()
        self.step = 0
        self.losses: list[float] = []
        self.steps: list[int] = []
        self.window_means: list[float] = []
        self.grad_norms: list[float] = []
        self.throughput: list[float] = []
        self.evals: list[tuple[int, float, float | None]] = []  # (step, eval loss, train loss then)
        self.checkpoints: list[tuple[int, str]] = []
        self.on_gpu = False

    def observe(self, kind: str, data: dict[str, Any]) -> list[Alert]:
        """The alerts this event raises (each code is raised once per engine life)."""
        with self._lock:
            if kind == "step":
                found = self._step(data)
            elif kind == "eval":
                found = self._eval(data)
            elif kind == "gpu":
                found = self._gpu(data)
            elif kind == "checkpoint":
                if isinstance(data.get("step"), int):
                    self.checkpoints.append((data["step"], str(data.get("path", ""))))
                found = []
            else:
                found = []
            fresh = [a for a in found if a.code not in self.raised]
            self.raised.update(a.code for a in fresh)
            return fresh

    def observe_all(self, events: Iterable[tuple[str, dict[str, Any]]]) -> list[Alert]:
        """Every alert a whole stream of (type, fields) raises, in order."""
        return [alert for kind, data in events for alert in self.observe(kind, data)]

    # ------------------------------------------------------------------ rules

    def _step(self, d: dict[str, Any]) -> list[Alert]:
        given = d.get("step")
        step = given if isinstance(given, int) else self.step
        self.step = step
        raw_loss = d.get("loss")
        if isinstance(raw_loss, (int, float)) and not isinstance(raw_loss, bool) and not math.isfinite(raw_loss):
            return [self._non_finite(step, float(raw_loss))]
        loss = _finite(raw_loss)
        if loss is None:
            return []
        alerts: list[Alert] = []
        self.losses.append(loss)
        self.steps.append(step)
        if len(self.losses) >= WINDOW:
            self.window_means.append(_mean(self.losses[-WINDOW:]))
        grad = _finite(d.get("grad_norm"))
        if grad is not None:
            alerts += self._grad(step, grad)
            self.grad_norms.append(grad)
        alerts += self._diverging(step) + self._flat(step)
        tokens = _finite(d.get("tokens_per_s"))
        if tokens is not None and tokens > 0:
            self.throughput.append(tokens)
            alerts += self._slowdown(step)
        return alerts

    def _non_finite(self, step: int, loss: float) -> Alert:
        last = self.checkpoints[-1] if self.checkpoints else None
        keep = (f"checkpoint-{last[0]} (step {last[0]}) is the last one saved before it" if last
                else "no checkpoint was saved before it")
        return Alert("loss_not_finite", CRITICAL, step,
                     f"The loss became {loss} at step {step}: the weights are broken from here on, so training "
                     f"stopped at once; {keep}.",
                     "Lower training.learning_rate (by 2 to 10 times), keep training.max_grad_norm at 1.0, and check "
                     "the data with `tunewiz data check`; then start a new run.",
                     {"loss": str(loss), "last_checkpoint_step": last[0] if last else None,
                      "last_checkpoint": last[1] if last else None})

    def _grad(self, step: int, grad: float) -> list[Alert]:
        if len(self.grad_norms) < WINDOW:
            return []
        median = statistics.median(self.grad_norms)
        early = max(self.grad_norms[:WINDOW])
        if grad <= GRAD_EXPLOSION * median or grad <= early:
            return []
        return _warning("diverging", step,
                        f"The gradient norm jumped to {grad:.3g} at step {step}, {grad / median:.0f} times its usual "
                        f"{median:.3g}: the updates are blowing up, and the loss usually follows.",
                        "Lower training.learning_rate (2 to 10 times) or training.max_grad_norm; if the loss keeps "
                        "rising, stop the run and start again from the last checkpoint with the lower rate.",
                        {"grad_norm": grad, "median_grad_norm": median})

    def _diverging(self, step: int) -> list[Alert]:
        if len(self.window_means) < WINDOW + 1:
            return []
        first, now = self.window_means[0], self.window_means[-1]
        lowest = min(self.window_means[:-WINDOW])  # windows that do not overlap the last one
        if now < DIVERGE_RATIO * lowest or now - lowest < DIVERGE_MIN_RISE * first:
            return []
        return _warning("diverging", step,
                        f"The loss is rising: its mean over the last {WINDOW} logged steps is {now:.4g}, up from "
                        f"{lowest:.4g} earlier. Training is moving away from what it learned.",
                        "Lower training.learning_rate (2 to 10 times), or use more warm-up (training.warmup_ratio); "
                        "resume from a checkpoint made before the rise.",
                        {"window_mean": now, "lowest_window_mean": lowest})

    def _flat(self, step: int) -> list[Alert]:
        if len(self.losses) < FLAT_MIN_STEPS:
            return []
        first, now = self.window_means[0], self.window_means[-1]
        if abs(now - first) > FLAT_CHANGE * max(abs(first), 1e-12):
            return []
        return _warning("loss_flat", step,
                        f"The loss has barely moved in {len(self.losses)} logged steps ({first:.4g} then, {now:.4g} "
                        "now): the model is not learning.",
                        "The learning rate may be too low (raise training.learning_rate), or the labels may be "
                        "masked out so there is nothing to learn: run `tunewiz data check` on the dataset.",
                        {"first_window_mean": first, "window_mean": now})

    def _eval(self, d: dict[str, Any]) -> list[Alert]:
        value, step = _finite(d.get("eval_loss")), d.get("step")
        if value is None or not isinstance(step, int):
            return []
        train_now = _mean(self.losses[-WINDOW:]) if self.losses else None
        self.evals.append((step, value, train_now))
        best_at = min(range(len(self.evals)), key=lambda i: self.evals[i][1])
        after = self.evals[best_at + 1:]
        best_step, best, train_then = self.evals[best_at]
        margin = max(OVERFIT_RISE * best, OVERFIT_MIN_RISE)
        if len(after) < 2 or any(loss < best + margin for _, loss, _ in after[-2:]):
            return []
        if train_then is None or train_now is None or train_now >= train_then:
            return []  # both rising is divergence, not overfitting
        began = after[0][0]
        checkpoint = self._checkpoint_near(best_step)
        where = (f"checkpoint-{checkpoint[0]} is the saved checkpoint nearest to it" if checkpoint
                 else "no checkpoint was saved near it")
        return _warning("overfitting", step,
                        f"The eval loss has been rising since step {began} while the training loss falls: the model "
                        f"is memorising its training data. The best eval loss was {best:.4g} at step {best_step}; "
                        f"{where}.",
                        "Stop here and use the best checkpoint, or train fewer epochs, add data, or raise "
                        "lora.dropout.",
                        {"began_at_step": began, "best_eval_step": best_step, "best_eval_loss": best,
                         "best_checkpoint_step": checkpoint[0] if checkpoint else None,
                         "best_checkpoint": checkpoint[1] if checkpoint else None})

    def _checkpoint_near(self, step: int) -> tuple[int, str] | None:
        if not self.checkpoints:
            return None
        return min(self.checkpoints, key=lambda c: (abs(c[0] - step), c[0] > step))

    def _slowdown(self, step: int) -> list[Alert]:
        # CPU throughput on a shared machine swings tenfold from step to step: judged on GPU runs only.
        needed = THROUGHPUT_SKIP + WINDOW + THROUGHPUT_RECENT
        if not self.on_gpu or len(self.throughput) < needed:
            return []
        baseline = statistics.median(self.throughput[THROUGHPUT_SKIP:THROUGHPUT_SKIP + WINDOW])
        recent = statistics.median(self.throughput[-THROUGHPUT_RECENT:])
        if recent >= THROUGHPUT_DROP * baseline:
            return []
        cause = self._explain() if self._explain else None
        return _warning("throughput_drop", step,
                        f"Training slowed down to {recent:,.0f} tokens/s from {baseline:,.0f} "
                        f"({1 - recent / baseline:.0%} slower). " + (cause or "NVML names no cause: no other process "
                                                                     "on the GPU and no high temperature."),
                        "Check the GPU's cooling and `nvidia-smi` for other processes; the run goes on meanwhile.",
                        {"tokens_per_s": recent, "baseline_tokens_per_s": baseline, "cause": cause})

    def _gpu(self, d: dict[str, Any]) -> list[Alert]:
        alerts = []
        for device in d.get("devices") or ():
            if not isinstance(device, dict):
                continue
            self.on_gpu = True
            used, total = _finite(device.get("mem_used_bytes")), _finite(device.get("mem_total_bytes"))
            if not used or not total or used < MEMORY_FULL * total:
                continue
            gib = 1024 ** 3
            alerts.append(Alert("memory_high", WARNING, self.step or None,
                                f"GPU {device.get('index')} is {used / total:.0%} full ({used / gib:.1f} of "
                                f"{total / gib:.1f} GiB): a longer batch could run out of memory.",
                                "If it does, the engine retries with a smaller micro-batch (training.oom_recovery); "
                                "to avoid it, lower training.max_seq_length or training.micro_batch_size, or turn "
                                "on training.gradient_checkpointing.",
                                {"index": device.get("index"), "used_bytes": int(used), "total_bytes": int(total)}))
        return alerts[:1]
