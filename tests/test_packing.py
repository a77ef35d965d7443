"""Padding-free packing gives the same loss as padded batches (so `training.packing` is safe to use)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tunewiz.engine.data import formats
from tunewiz.engine.data.chat import ChatEncoder


def test_packed_loss_equals_padded_loss(demo_model: Path, demo_tokenizer: Any) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

    from tunewiz.engine.training.trainer import PaddingCollator

    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False  # as the engine loads it: packed sequences are only recognised without a cache
    encoder = ChatEncoder(demo_tokenizer)
    rows = [{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
            {"messages": [{"role": "user", "content": "What is two plus three, written as a word?"},
                          {"role": "assistant", "content": "Five, because two plus three makes five."}]}]
    batch = [vars(encoder.encode(formats.normalise(r, "messages", {}))) for r in rows]
    padded = PaddingCollator(demo_tokenizer.pad_token_id)(batch)
    packed = DataCollatorWithFlattening()(batch)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        padded_loss = model(**padded).loss
        packed_loss = model(**packed).loss
    assert torch.allclose(padded_loss, packed_loss, rtol=1e-4), (padded_loss, packed_loss)
