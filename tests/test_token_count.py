"""The engine counts trained tokens on the device and reads them once a step (engine/training/token_count.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tunewiz.engine.training.token_count import DeferredTokenCountMixin, TokenCounter


class _CountingBase:
    """Stands in for transformers' Trainer: counts at once, as it does."""

    def __init__(self, setting: str = "non_padding") -> None:
        self.args = type("Args", (), {"include_num_input_tokens_seen": setting})()
        self.model = object()
        self.counted_at_once = 0

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        self.counted_at_once += int(inputs["input_ids"].numel())


class _Counting(DeferredTokenCountMixin, _CountingBase):
    pass


def _forbid_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any) -> None:
        raise AssertionError("the count was read inside the step: the host would wait for the GPU there")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__int__", refuse)


def test_padded_batches_count_their_mask_without_reading_it(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _Counting()
    trainer.token_counter = counter = TokenCounter()
    batches = [{"input_ids": torch.zeros(2, 4, dtype=torch.long),
                "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])},
               {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 1]])}]
    with monkeypatch.context() as patch:
        _forbid_reads(patch)
        for batch in batches:  # two micro-batches of one step
            trainer._track_num_input_tokens(batch)
    assert counter.take() == 9 and trainer.counted_at_once == 0
    assert counter.take() == 0  # taken once


def test_packed_batches_count_every_input_id(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _Counting()
    trainer.token_counter = counter = TokenCounter()
    with monkeypatch.context() as patch:
        _forbid_reads(patch)
        trainer._track_num_input_tokens({"input_ids": torch.zeros(1, 7, dtype=torch.long),
                                         "position_ids": torch.arange(7)[None]})
    assert counter.take() == 7


def test_without_a_counter_or_with_counting_off_the_trainer_counts_as_before() -> None:
    plain = _Counting()
    plain._track_num_input_tokens({"input_ids": torch.zeros(1, 5, dtype=torch.long)})
    assert plain.counted_at_once == 5
    off = _Counting("no")
    off.token_counter = counter = TokenCounter()
    off._track_num_input_tokens({"input_ids": torch.zeros(1, 5, dtype=torch.long)})
    assert counter.take() == 0 and off.counted_at_once == 5  # the base class decides what "no" means


def test_a_step_that_did_not_finish_is_forgotten() -> None:
    counter = TokenCounter()
    counter.add(torch.tensor(12))
    counter.discard()
    counter.add(torch.tensor(3))
    assert counter.take() == 3


def test_the_engines_trainer_overrides_the_method_transformers_calls() -> None:
    """If transformers renamed its counting method, the override would silently stop working (and the host
    would wait for the GPU again in every step): this says so."""
    from transformers import Trainer

    from tunewiz.engine.training.trainer import _trainer_class

    assert callable(getattr(Trainer, "_track_num_input_tokens", None))
    for fused_loss in (False, True):
        cls = _trainer_class(fused_loss)
        assert cls._track_num_input_tokens is DeferredTokenCountMixin._track_num_input_tokens
