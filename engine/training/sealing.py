"""The engine's checkpoint sealing for transformers' Trainer and trl's: one mixin, so that every trainer class the
engine builds (supervised, DPO, ORPO) keeps a complete checkpoint at all times."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunewiz.engine.run.rundir import seal_checkpoint, unseal_checkpoint


class SealingTrainerMixin:
    """Marks each checkpoint complete once all of it is on disk (engine/run/rundir.py: seal_checkpoint),
    and only then lets transformers delete older ones, so a complete checkpoint always exists."""

    args: Any  # transformers.Trainer's, on the class this is mixed into
    state: Any

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        unseal_checkpoint(folder)  # a folder being written again stops counting at once
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            seal_checkpoint(folder)
            rotate_checkpoints(output_dir=self.args.output_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
