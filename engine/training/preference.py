"""Preference tuning (`training.objective = "dpo" | "orpo"`) through trl's trainers.

engine/training/trainer.py loads the model, puts the adapter and the speed levers on it, streams events and
saves; this module supplies what differs for preference pairs: the data (engine/data/pairs.py), trl's
config and trainer classes (with the engine's checkpoint sealing), and the preference metrics as
`preference` events. trl takes seconds to import, so it is imported here, and only when a preference
run builds its trainer.

DPO needs a reference model. Ours is the base model with the adapter switched off: a fresh LoRA
adapter adds nothing (its B matrices start at zero), so the base is exactly where training starts,
and no second copy of the weights is held. ORPO needs no reference.
"""

from __future__ import annotations

import math
from typing import Any

from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.data.pairs import EncodedPair, PreparedPairs
from tunewiz.engine.run.context import EngineContext

# trl's log keys -> the `preference` event's fields (the same keys for DPO and ORPO).
METRICS = {"rewards/chosen": "chosen_reward", "rewards/rejected": "rejected_reward", "rewards/margins": "margin",
           "rewards/accuracies": "accuracy"}


def config_class(objective: str) -> type:
    """trl's training arguments for the objective (subclasses of transformers' TrainingArguments)."""
    if objective == "dpo":
        from trl import DPOConfig

        return DPOConfig
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig


def config_options(spec: RunSpec) -> dict[str, Any]:
    """What a preference run adds to the engine's training arguments."""
    # Pairs are already cut to max_seq_length (engine/data/pairs.py); trl's own limit is a second guard.
    return {"beta": spec.training.beta, "max_length": spec.training.max_seq_length}


def _dataset(pairs: list[EncodedPair]) -> Any:
    from datasets import Dataset

    return Dataset.from_list([pair.as_row() for pair in pairs])


def _orpo_row(feature: dict[str, Any]) -> dict[str, list[int]]:
    """One encoded pair in the columns trl's ORPO collator pads: each side is prompt + answer, labelled on the
    answer only."""
    prompt = feature["prompt_ids"]
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = feature[f"{side}_ids"]
        row[f"{side}_input_ids"] = prompt + answer
        row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        row[f"{side}_labels"] = [-100] * len(prompt) + answer
    return row


def trainer_class(objective: str) -> type:
    """trl's trainer for the objective, with the engine's checkpoint sealing, reading pairs that
    engine/data/pairs.py has already encoded (so the chat template and masking are the same as for SFT)."""
    from tunewiz.engine.training.sealing import SealingTrainerMixin

    if objective == "dpo":
        from trl import DPOTrainer

        class SealingDPOTrainer(SealingTrainerMixin, DPOTrainer):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                # trl keeps a copy of a passed-in adapter ("ref") as the reference. Ours is fresh, so that copy
                # equals the base model: drop it, and trl computes the reference with the adapter switched off.
                if "ref" in self.model.peft_config:
                    self.model.delete_adapter("ref")

            def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
                return dataset  # already tokenised and trimmed

            def create_model_card(self, *args: Any, **kwargs: Any) -> None:
                pass  # output/run_card.json describes the run

        return SealingDPOTrainer

    from trl.experimental.orpo import ORPOTrainer

    class SealingORPOTrainer(SealingTrainerMixin, ORPOTrainer):
        def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, list[int]]:
            return _orpo_row(feature)

        def create_model_card(self, *args: Any, **kwargs: Any) -> None:
            pass

    return SealingORPOTrainer


def make_trainer(spec: RunSpec, model: Any, tokenizer: Any, args: Any, data: PreparedPairs,
                 callbacks: list[Any]) -> Any:
    """The trl trainer for this run's objective over the prepared pairs."""
    cls = trainer_class(spec.training.objective)
    return cls(model=model, args=args, train_dataset=_dataset(data.train),
               eval_dataset=_dataset(data.eval) if data.eval else None, processing_class=tokenizer,
               callbacks=callbacks)


def preference_event(logs: dict[str, Any], prefix: str = "") -> dict[str, float] | None:
    """The `preference` event's metrics from one of trl's logs (`eval_`-prefixed for evaluation), or None when
    the log has none (or a metric is not a finite number)."""
    values = {}
    for key, name in METRICS.items():
        value = logs.get(prefix + key)
        if value is None or not math.isfinite(float(value)):
            return None
        values[name] = round(float(value), 6)
    return values


def events_callback(ctx: EngineContext) -> Any:
    """A callback that writes trl's preference metrics as `preference` events, for training and evaluation."""
    from transformers import TrainerCallback

    class PreferenceEvents(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            for prefix, split in (("", "train"), ("eval_", "eval")):
                values = preference_event(logs or {}, prefix)
                if values is not None:
                    ctx.emit("preference", step=state.global_step, split=split, **values)

    return PreferenceEvents()
