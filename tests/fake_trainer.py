"""A stand-in trainer for tests of the launcher and the TUI only (never for engine behaviour).

Set TUNEWIZ_TRAINER=tests.fake_trainer:train. FAKE_STEPS and FAKE_STEP_S set its pace;
FAKE_FAIL=1 makes it raise like a CUDA out-of-memory error at step 2 (on rank FAKE_FAIL_RANK only, when
that is set: tests of the multi-GPU supervisor run it as several ranks). FAKE_RECORD_ENV names a file
where it writes the allocator settings it was started with.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tunewiz.engine.run import worker
from tunewiz.engine.run.context import EngineContext, TrainOutcome


def train(ctx: EngineContext) -> TrainOutcome:
    total = int(os.environ.get("FAKE_STEPS", "20"))
    pause = float(os.environ.get("FAKE_STEP_S", "0.05"))
    start_step = int(ctx.run.status().get("step") or 0) if ctx.resume else 0
    if record := os.environ.get("FAKE_RECORD_ENV"):
        Path(record).write_text(json.dumps({name: os.environ.get(name) for name in worker.ALLOCATOR_ENV}))
    ctx.emit("phase", phase="train", message=f"fake training for {total} steps")
    started = time.monotonic()
    for step in range(start_step + 1, total + 1):
        if ctx.should_stop():
            ctx.emit("checkpoint", step=step - 1, path=str(ctx.run.path / f"checkpoint-{step - 1}"))
            return TrainOutcome("cancelled", step - 1)
        time.sleep(pause)
        failing_rank = os.environ.get("FAKE_FAIL_RANK", os.environ.get("RANK", "0"))
        if os.environ.get("FAKE_FAIL") and step == 2 and failing_rank == os.environ.get("RANK", "0"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        ctx.emit("step", step=step, total_steps=total, epoch=step / total, loss=2.0 / step,
                 learning_rate=1e-4, elapsed_s=time.monotonic() - started)
    return TrainOutcome("completed", total, {"train_loss": 2.0 / total})
