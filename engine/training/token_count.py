"""Counting the tokens a run trains on without making the host wait for the GPU in the middle of a step.

transformers' Trainer adds each micro-batch's non-padding tokens to `state.num_input_tokens_seen` with
`.item()` right after its backward: the host then waits for the whole backward to finish before it can
queue gradient clipping and the optimiser, and the GPU idles while it does (`python -m bench.profile_step
MODEL --sync-debug` lists such waits). Here the count stays a tensor on the device until the step is logged:
on one GPU it travels with the step's lagged log (engine/training/step_log.py), else it is read at the
step's end, where the Trainer's log waits for the GPU anyway.
"""

from __future__ import annotations

from typing import Any

from tunewiz.engine.run import ranks


class TokenCounter:
    """Tokens counted on the device since the last `take`."""

    def __init__(self) -> None:
        self._pending: Any = None

    def add(self, count: Any) -> None:
        """Add a 0-d tensor (on any device); nothing waits for it."""
        self._pending = count if self._pending is None else self._pending + count

    def discard(self) -> None:
        """Forget what was counted since the last `take` (a step that did not finish)."""
        self._pending = None

    def take_pending(self) -> Any:
        """The count since the last `take`, as the device tensor it is (None where nothing was counted), without
        waiting: a lagged step log reads it with the step's loss (engine/training/step_log.py). One process only."""
        pending, self._pending = self._pending, None
        return pending

    def take(self) -> int:
        """The tokens counted since the last call, summed over every rank; waits for the device.

        Every rank must call it at the same step (it gathers), as the engine's step-end callback does."""
        pending, self._pending = self._pending, None
        local = int(pending.item()) if pending is not None else 0
        return sum(ranks.gather_int(local))


class DeferredTokenCountMixin:
    """For a transformers Trainer: count the tokens into `token_counter` instead of reading them at once.

    Counts what the Trainer's "non_padding" setting counts (the attention mask's ones, else every input
    id, as with packed batches). Without a `token_counter`, or on a transformers version that counts
    elsewhere, the Trainer counts as it always does."""

    token_counter: TokenCounter | None = None
    args: Any  # transformers.Trainer's, on the class this is mixed into
    model: Any

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        import torch

        if self.token_counter is None or self.args.include_num_input_tokens_seen == "no":
            super()._track_num_input_tokens(inputs)  # type: ignore[misc]
            return
        mask = inputs.get("attention_mask")
        if mask is not None and self.args.include_num_input_tokens_seen == "non_padding":
            self.token_counter.add(mask.sum())
            return
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        if ids is None:
            super()._track_num_input_tokens(inputs)  # type: ignore[misc]
            return
        self.token_counter.add(torch.tensor(ids.numel(), dtype=torch.int64))
