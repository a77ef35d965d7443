"""The real trainer with one fault injected, chosen by TUNEWIZ_FAULT (tests/faults/ starts engines with it).

Faults (`NAME` or `NAME:STEP`):
  load                  SIGKILL while the model loads
  mid_step:N            SIGKILL inside optimiser step N, after its backward pass
  mid_checkpoint:N      checkpoint-N's files are written but it is not yet sealed: cut optimizer.pt to half,
                        then SIGKILL (a kill or a power cut part-way through the save)
  after_checkpoint:N    SIGKILL right after checkpoint-N is complete
  final_save            SIGKILL with the final adapter written but not yet renamed into place
  fill_disk:N           after checkpoint-N is complete, fill the disk holding the run (FAULT_FILLER names the
                        file that takes the space; FAULT_LEAVE_BYTES of it are given back) so that the next
                        larger writes fail with ENOSPC
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from tunewiz.engine.run.context import EngineContext, TrainOutcome
from tunewiz.engine.training import models, sealing, trainer

FAULT_ENV = "TUNEWIZ_FAULT"
FILLER_ENV = "FAULT_FILLER"
LEAVE_ENV = "FAULT_LEAVE_BYTES"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fill_disk(filler: Path, leave: int = 0) -> None:
    """Write `filler` until the disk holding it has no byte left, then give back `leave` bytes."""
    chunk = b"\0" * (1 << 20)
    with filler.open("wb", buffering=0) as handle:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    handle.write(chunk[:size])
            except OSError:
                continue
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))


def _inject(fault: str) -> None:
    name, _, arg = fault.partition(":")
    step = int(arg) if arg else None
    real_seal, real_fsync_tree = sealing.seal_checkpoint, trainer.fsync_tree

    def at(folder: Path) -> bool:
        return folder.name == f"checkpoint-{step}"

    if name == "load":
        def load_model(*args: Any, **kwargs: Any) -> Any:
            _die()
        models.load_model = load_model
    elif name == "mid_step":
        from transformers import Trainer

        real_step = Trainer.training_step

        def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
            loss = real_step(self, *args, **kwargs)
            if self.state.global_step + 1 == step:
                _die()
            return loss
        Trainer.training_step = training_step
    elif name == "mid_checkpoint":
        def seal(folder: Path) -> None:
            if at(folder):
                optimizer = folder / "optimizer.pt"
                os.truncate(optimizer, optimizer.stat().st_size // 2)
                _die()
            real_seal(folder)
        sealing.seal_checkpoint = seal
    elif name in ("after_checkpoint", "fill_disk"):
        def seal(folder: Path) -> None:
            real_seal(folder)
            if at(folder):
                if name == "after_checkpoint":
                    _die()
                fill_disk(Path(os.environ[FILLER_ENV]), int(os.environ.get(LEAVE_ENV, "0")))
        sealing.seal_checkpoint = seal
    elif name == "final_save":
        def fsync_tree(folder: Path) -> dict[str, int]:
            sizes = real_fsync_tree(folder)
            if folder.name == "adapter.partial":
                _die()
            return sizes
        trainer.fsync_tree = fsync_tree
    elif name:
        raise ValueError(f"unknown fault {fault!r}")


def train(ctx: EngineContext) -> TrainOutcome:
    _inject(os.environ.get(FAULT_ENV, ""))
    return trainer.train(ctx)
