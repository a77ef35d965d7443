"""Recovery from running out of GPU memory: retry with half the micro-batch and the same effective batch.

When a training step raises torch.OutOfMemoryError, `Recovery.train` halves the micro-batch, multiplies the
gradient accumulation to keep micro-batch x accumulation the same, turns on gradient checkpointing on every
layer, goes back to the last complete checkpoint (or the start, with the adapter's first weights) and trains
on, at most `training.oom_recovery` times. Each attempt is an `alert` event (code `out_of_memory`) with the
new settings and how far the memory estimate was off; the estimator's calibration learns nothing from it.

Test seam: TUNEWIZ_INJECT_OOM=STEP[xTIMES] makes the engine raise torch.OutOfMemoryError as it begins
optimiser step STEP, on each of its first TIMES training attempts (default 1). Only this engine process
reads it; tests/test_oom_recovery.py uses it to test recovery on a CPU.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunewiz.engine.config.spec import RunSpec, TrainingSpec
from tunewiz.engine.errors import TunewizError
from tunewiz.engine.run.alerts import WARNING, Alert
from tunewiz.engine.run.context import EngineContext

INJECT_ENV = "TUNEWIZ_INJECT_OOM"


def smaller_batch(training: TrainingSpec) -> TrainingSpec | None:
    """The next settings to try: the largest micro-batch at most half the current one that divides it (so the
    effective batch stays exactly the same), with checkpointing on every layer; None when it is already 1."""
    micro = training.micro_batch_size
    smaller = max((d for d in range(1, micro // 2 + 1) if micro % d == 0), default=None)
    if smaller is None:
        return None
    return dataclasses.replace(training, micro_batch_size=smaller,
                               gradient_accumulation=training.gradient_accumulation * (micro // smaller),
                               gradient_checkpointing=True, checkpoint_layers=None)


def injected_fault() -> tuple[int, int] | None:
    """(step, times) from TUNEWIZ_INJECT_OOM, or None when it is not set."""
    text = os.environ.get(INJECT_ENV, "").strip()
    if not text:
        return None
    step, _, times = text.partition("x")
    try:
        return int(step), int(times or 1)
    except ValueError:
        raise TunewizError(f"{INJECT_ENV}={text!r} is not STEP or STEPxTIMES", hint="e.g. 3 or 3x2") from None


class Recovery:
    """Runs `trainer.train`, rebuilding the trainer with smaller batches after each out-of-memory error."""

    def __init__(self, ctx: EngineContext, spec: RunSpec, model: Any,
                 find_resume: Callable[[], tuple[Path, int] | None], single_process: bool) -> None:
        from peft import get_peft_model_state_dict

        self.ctx = ctx
        self.spec = spec
        self.model = model
        self.find_resume = find_resume
        self.attempts = 0
        self.allowed = spec.training.oom_recovery if single_process else 0  # ranks would have to agree on it
        self.fault = injected_fault()
        # The adapter as it started, to start over from when no checkpoint was saved yet (LoRA weights: small).
        self.initial = ({k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}
                        if self.allowed else {})

    def train(self, build: Callable[[RunSpec], Any], resume: str | None) -> tuple[Any, Any]:
        """(the train() result, the trainer that finished); raises the error when recovery is off or used up."""
        import torch

        while True:
            trainer = self._build(build)
            try:
                return trainer.train(resume_from_checkpoint=resume), trainer
            except torch.OutOfMemoryError as exc:
                settings = smaller_batch(self.spec.training) if self.attempts < self.allowed else None
                if settings is None:
                    raise
                failed_at = trainer.state.global_step + 1
                peak = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None
                message = str(exc).splitlines()[0] if str(exc) else "out of memory"
            # Out of the except block: the traceback no longer holds the failed step's tensors.
            trainer.model.zero_grad(set_to_none=True)
            del trainer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            resume = self._rewind()
            self.attempts += 1
            old, self.spec = self.spec, dataclasses.replace(self.spec, training=settings)
            self.ctx.spec = dataclasses.replace(self.ctx.spec, training=settings)  # the run card's settings
            alert = self._alert(old, failed_at, resume, peak, message)
            self.ctx.emit("alert", **alert.event_fields())

    def _build(self, build: Callable[[RunSpec], Any]) -> Any:
        trainer = build(self.spec)
        if self.fault and self.attempts < self.fault[1]:
            trainer.add_callback(_inject_at(self.fault[0]))
        return trainer

    def _rewind(self) -> str | None:
        """The checkpoint to continue from; without one, the adapter's first weights are put back."""
        found = self.find_resume()
        if found is None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, self.initial)
            return None
        return str(found[0])

    def _alert(self, old: RunSpec, failed_at: int, resume: str | None, peak: int | None, error: str) -> Alert:
        new = self.spec.training
        estimate, limit = _estimate_and_limit(old)
        if estimate and limit:
            verdict = (f"it said they would fit, so it was at least {limit / estimate - 1:.0%} low" if estimate < limit
                       else "it already said they would not fit")
            off = f"The memory estimate for the old settings was {_gib(estimate)} of {_gib(limit)}: {verdict}."
        else:
            off = "No GPU memory figures to compare the estimate with (no CUDA here)."
        where = f"from {Path(resume).name}" if resume else "from the start (no checkpoint yet)"
        return Alert("out_of_memory", WARNING, failed_at,
                     f"Step {failed_at} ran out of GPU memory ({error}). Retrying {where} with micro-batch "
                     f"{new.micro_batch_size} x accumulation {new.gradient_accumulation} (was "
                     f"{old.training.micro_batch_size} x {old.training.gradient_accumulation}: the same effective "
                     f"batch) and gradient checkpointing on every layer; attempt {self.attempts} of {self.allowed}. "
                     + off,
                     "Nothing to do: the run goes on. Next time start with these settings "
                     "(`tunewiz recommend` for the model), or a shorter training.max_seq_length.",
                     {"attempt": self.attempts, "max_attempts": self.allowed,
                      "micro_batch_size": new.micro_batch_size, "gradient_accumulation": new.gradient_accumulation,
                      "gradient_checkpointing": True, "resumed_from_step": _step_of(resume),
                      "estimated_bytes": estimate, "limit_bytes": limit, "peak_reserved_bytes": peak,
                      "estimate_low_by_at_least": round(limit / estimate - 1, 3) if estimate and limit else None})


def _step_of(resume: str | None) -> int | None:
    return int(resume.rpartition("-")[2]) if resume else None


def _gib(n: int) -> str:
    return f"{n / 1024 ** 3:.1f} GiB"


def _estimate_and_limit(spec: RunSpec) -> tuple[int | None, int | None]:
    """(the estimator's figure for `spec` with the CUDA context, this GPU's memory), None where unknown."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    from tunewiz.engine.planning.estimator import CUDA_CONTEXT_BYTES
    from tunewiz.engine.planning.recommend import estimate_spec

    try:
        estimate = estimate_spec(spec).total + CUDA_CONTEXT_BYTES
    except Exception:  # noqa: BLE001 - an architecture the estimator does not know
        estimate = None
    return estimate, torch.cuda.mem_get_info()[1]


def _inject_at(step: int) -> Any:
    """A callback that raises torch.OutOfMemoryError as optimiser step `step` begins (the test seam)."""
    import torch
    from transformers import TrainerCallback

    class InjectOOM(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step + 1 == step:
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {INJECT_ENV} at step {step})")

    return InjectOOM()
