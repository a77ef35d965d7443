"""Each step's numbers read one step late, so that the host does not wait for the GPU at each step's end.

transformers' Trainer reads the loss and the gradient norm with `.item()` at every logging step (every step,
as the engine logs), right after queueing the optimiser: the host waits there until the GPU has finished the
whole step, and the GPU then idles while the host logs, collates the next batch and queues its first kernels.
Where the host's share of a step is close to the GPU's (LoRA without checkpointing), that idle time is a few
per cent of every step. Here, on one CUDA device:

- the step's loss, gradient norm and token count are copied to pinned host memory without waiting, behind a
  CUDA event, and turned into the step's log at the next step's logging point, when the GPU is a whole step
  further on and the copy has long landed (`LaggedLogMixin`);
- a step's duration comes from CUDA events on the GPU's own clock (`StepClock`), so no wait is needed to time
  it either.

Before an evaluation, a checkpoint, a stop or the end, the held log is written first: a checkpoint's
trainer state and the event stream always hold every step up to it, in order.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tunewiz.engine.training.token_count import TokenCounter


def wanted(lagged_logs: bool, cuda: bool, processes: int) -> bool:
    """Whether a run lags its step logs: where `speed.lagged_logs` asks for it, on one CUDA device (on a CPU the
    host waits for every operation anyway; several processes gather their losses with collectives at each log)."""
    return lagged_logs and cuda and processes == 1


class StepClock:
    """How long each training step took, measured where the work runs and read without waiting for it.

    On CUDA each step's end is an event on the GPU's stream, and a step lasts from the previous step's end to
    its own (so time the GPU idled between steps, waiting for the host, counts against the step); the first
    step after a pause (training begins, evaluation, samples, a checkpoint) is measured from its own beginning
    instead. On a CPU the work is done when the host returns, so the host's clock measures it."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._began: Any = None
        self._last_end: Any = None  # the previous step's end mark, None after a pause
        self._unread: list[tuple[int, Any, Any]] = []  # (step, from mark, end mark) not yet added up

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self) -> None:
        self._began = self._mark()

    def end(self, step: int) -> None:
        end = self._mark()
        start = self._last_end if self._last_end is not None else self._began
        if start is not None:
            self._unread.append((step, start, end))
        self._last_end = end

    def pause(self) -> None:
        """Work that is not training comes next: the next step counts from its own beginning."""
        self._last_end = None

    def seconds_through(self, step: int) -> float:
        """Seconds of the steps up to `step` not read before (waits for their end, done by the time their log is)."""
        total, unread = 0.0, []
        for entry in self._unread:
            if entry[0] > step:
                unread.append(entry)
                continue
            _, start, end = entry
            if self.cuda:
                end.synchronize()
                total += start.elapsed_time(end) / 1000
            else:
                total += end - start
        self._unread = unread
        return total


@dataclass
class HeldLog:
    """A step's log on its way from the device: what the Trainer would have logged, its numbers still copying."""

    step: int
    epoch: float | None
    steps: int  # optimiser steps its loss averages over
    learning_rate: float | None
    has_grad_norm: bool
    values: Any  # [mean loss, gradient norm, tokens]: a pinned host tensor while the copy runs, else on the host
    ready: Any  # the CUDA event after the copy, or None

    def read(self) -> tuple[float, float, int]:
        """(mean loss, gradient norm, tokens), waiting for the copy if it has not landed yet."""
        if self.ready is not None:
            self.ready.synchronize()
        loss, grad_norm, tokens = self.values.tolist()
        return loss, grad_norm, int(tokens)


def hold(tr_loss: Any, grad_norm: Any, steps: int, tokens: Any, step: int, epoch: float | None,
         learning_rate: float | None) -> HeldLog:
    """Start copying a step's numbers to the host without waiting: the loss summed over `steps` optimiser steps,
    the gradient norm (a tensor, a number or None) and the device's token count (a tensor or None)."""
    import torch

    device = tr_loss.device
    norm = (grad_norm.detach().to(device, torch.float64).reshape(()) if isinstance(grad_norm, torch.Tensor)
            else torch.tensor(math.nan if grad_norm is None else float(grad_norm), dtype=torch.float64, device=device))
    count = (tokens.to(device, torch.float64).reshape(()) if tokens is not None
             else torch.zeros((), dtype=torch.float64, device=device))
    values = torch.stack([tr_loss.detach().to(torch.float64).reshape(()) / steps, norm, count])  # a copy: the
    # Trainer zeroes tr_loss in place next, and the stream runs this first
    ready = None
    if device.type == "cuda":
        host = torch.empty(3, dtype=torch.float64, pin_memory=True)
        host.copy_(values, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        values = host
    return HeldLog(step, epoch, steps, learning_rate, grad_norm is not None, values, ready)


class LaggedLogMixin:
    """For transformers' Trainer: log each step at the next step's logging point (`lag_logs`), from numbers
    copied without waiting (`hold`); the evaluation and checkpoint logic stays the Trainer's.

    Only for one process: several ranks gather their losses with collectives at every log."""

    lag_logs: bool = False
    token_counter: TokenCounter | None  # DeferredTokenCountMixin's: its count travels with the step's log
    control: Any  # transformers.Trainer's, on the class this is mixed into
    state: Any
    _globalstep_last_logged: int
    _total_loss_scalar: float
    _held: HeldLog | None = None

    def _maybe_log_save_evaluate(self, tr_loss: Any, grad_norm: Any, model: Any, trial: Any, epoch: float,
                                 ignore_keys_for_eval: Any, start_time: float, *args: Any, **kwargs: Any) -> None:
        if self.lag_logs:
            if self.control.should_log and self.state.global_step > self._globalstep_last_logged:
                learning_rate = kwargs.get("learning_rate", args[0] if args else None)
                previous, self._held = self._held, self._hold(tr_loss, grad_norm, learning_rate)
                if previous is not None:
                    self._write(previous, start_time)  # may stop training (a NaN loss): checked just below
                self.control.should_log = False  # logged here, not by the Trainer
            if self.control.should_evaluate or self.control.should_save or self.control.should_training_stop:
                self.catch_up(start_time)
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch,  # type: ignore[misc]
                                         ignore_keys_for_eval, start_time, *args, **kwargs)

    def _hold(self, tr_loss: Any, grad_norm: Any, learning_rate: float | None) -> HeldLog:
        """What the Trainer's log branch does at once, without its reads: the loss total restarts, the step
        counts as logged."""
        steps = self.state.global_step - self._globalstep_last_logged
        tokens = self.token_counter.take_pending() if self.token_counter is not None else None
        held = hold(tr_loss, grad_norm, steps, tokens, self.state.global_step, self.state.epoch,
                    learning_rate if learning_rate is not None else self._get_learning_rate())  # type: ignore[attr-defined]
        tr_loss -= tr_loss
        self._globalstep_last_logged = self.state.global_step
        self.store_flos()  # type: ignore[attr-defined]
        return held

    def catch_up(self, start_time: float | None = None) -> None:
        """Write the log still held, if any, and count the tokens since (both wait for the GPU): the state is then
        exact, as a checkpoint, an evaluation or the end needs it."""
        self._write_held(start_time)
        if self.token_counter is not None:
            self.state.num_input_tokens_seen += self.token_counter.take()  # steps not logged yet (log_every > 1)

    def _write_held(self, start_time: float | None = None) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._write(held, start_time)

    def _write(self, held: HeldLog, start_time: float | None) -> None:
        loss, grad_norm, tokens = held.read()
        self.state.num_input_tokens_seen += tokens
        self._total_loss_scalar += loss * held.steps
        logs: dict[str, float] = {"loss": loss}
        if held.has_grad_norm:
            logs["grad_norm"] = grad_norm
        if held.learning_rate is not None:
            logs["learning_rate"] = held.learning_rate
        wanted = self.control.should_log  # the callback handler clears it for any log: the current step's stays
        with _state_at(self.state, held.step, held.epoch):
            self.log(logs, start_time)  # type: ignore[attr-defined]
        self.control.should_log = wanted

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if not self.lag_logs:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        try:
            result = super().train(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            with contextlib.suppress(Exception):  # the finished step's log if it can still be read (not the
                self._write_held()  # tokens of the step that failed: they trained nothing); the error goes on
            raise
        self.catch_up()  # a loop that ended without the Trainer saying it would stop
        return result


@contextlib.contextmanager
def _state_at(state: Any, step: int, epoch: float | None) -> Iterator[None]:
    """The Trainer's state reading as at `step` while its log is written (the log's step, its epoch)."""
    now = state.global_step, state.epoch
    state.global_step, state.epoch = step, epoch
    try:
        yield
    finally:
        state.global_step, state.epoch = now
