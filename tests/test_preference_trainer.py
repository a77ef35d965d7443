"""The preference trainers on a tiny random model, in-process (seconds): DPO and ORPO train on pairs the
engine encoded, write `preference` events, and DPO's reference is the base model with the adapter
switched off (no copy of the adapter, no second model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.data.pairs import prepare_pairs
from tunewiz.engine.run.events import validate
from tunewiz.engine.training import preference
from tunewiz.engine.training.sealing import SealingTrainerMixin
from tunewiz.engine.training.trainer import _training_arguments, prepare_trainable

PAIRS = [{"prompt": f"Question {i}?", "chosen": f"Short {i}.", "rejected": f"A long and winding answer number {i}, "
          "which goes on and on about many things."} for i in range(8)]


class Recorder:
    """Stands in for the engine context: keeps the events, checked against the schema."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, kind: str, **data: Any) -> dict[str, Any]:
        event = {"v": 1, "seq": len(self.events) + 1, "time": 0.0, "type": kind, **data}
        assert validate(event) == [], event
        self.events.append(event)
        return event


def _tiny_model(tokenizer: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _train(objective: str, tmp_path: Path, tokenizer: Any) -> tuple[Any, Recorder]:
    import torch

    data_file = tmp_path / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    spec = RunSpec(name="t")
    spec.dataset.source = str(data_file)
    spec.dataset.eval_fraction = 0.25
    spec.training.objective = objective  # type: ignore[assignment]
    spec.training.max_steps = 3
    spec.training.micro_batch_size = 2
    spec.training.gradient_accumulation = 1
    spec.training.learning_rate = 1e-2
    spec.training.max_seq_length = 128
    spec.training.eval_every = 3
    spec.training.save_every = 3
    data = prepare_pairs(spec, tokenizer)
    model, _ = prepare_trainable(_tiny_model(tokenizer), spec, torch.float32, cuda=False)
    args = _training_arguments(spec, tmp_path / "out", 3, False, torch.float32, True,
                               preference.config_class(objective), **preference.config_options(spec))
    recorder = Recorder()
    trainer = preference.make_trainer(spec, model, tokenizer, args, data, [preference.events_callback(recorder)])
    trainer.train()
    return trainer, recorder


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_pairs_train_and_write_preference_events(objective: str, tmp_path: Path, demo_tokenizer: Any) -> None:
    trainer, recorder = _train(objective, tmp_path, demo_tokenizer)
    assert isinstance(trainer, SealingTrainerMixin)
    train = [e for e in recorder.events if e["split"] == "train"]
    evals = [e for e in recorder.events if e["split"] == "eval"]
    assert [e["step"] for e in train] == [1, 2, 3] and [e["step"] for e in evals] == [3]
    assert train[-1]["margin"] > train[0]["margin"]
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-3" / "tunewiz-complete.json").exists()  # sealed
    if objective == "dpo":
        _check_reference(trainer, recorder)


def _check_reference(trainer: Any, recorder: Recorder) -> None:
    """DPO's reference is the base model with the adapter switched off."""
    import torch

    model = trainer.model
    assert list(model.peft_config) == ["default"]  # trl's copy of the adapter was dropped
    first = recorder.events[0]
    assert first["chosen_reward"] == first["rejected_reward"] == 0.0  # a fresh adapter changes nothing
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ref_chosen, _ = trainer.compute_ref_log_probs(model, batch)
    with torch.no_grad():
        base = model.get_base_model()
        trained_chosen, _ = trainer.compute_ref_log_probs(model, batch)
        with model.disable_adapter():
            logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"][:, 1:]
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    base_chosen = (logps * batch["completion_mask"][:, 1:]).sum(-1).chunk(2)[0]
    assert torch.allclose(ref_chosen, base_chosen, atol=1e-3)
    with torch.no_grad():
        adapted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(adapted, logits)  # training moved the policy away from its reference
