"""GGUF files written by engine/gguf_export.py: per architecture, the weights, names and metadata are
right when transformers' own GGUF loader rebuilds the same model (same logits) from the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.errors import TunewizError
from engine.gguf_export import FAMILIES, family_of, write_gguf

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5}


def tiny_config(model_type: str, vocab_size: int, **overrides: Any) -> Any:
    from transformers import AutoConfig

    extra: dict[str, Any] = {"tie_word_embeddings": False}
    if model_type == "qwen2":
        extra = {"tie_word_embeddings": True}
    if model_type == "qwen3":
        # head_dim != hidden / heads, as in Qwen3-0.6B; 128 because transformers' loader assumes it
        # (it does not read attention.key_length back for qwen3; llama.cpp does)
        extra = {"head_dim": 128, "tie_word_embeddings": True}
    if model_type == "gemma2":
        extra = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 128, "tie_word_embeddings": True}
    if model_type == "mistral":
        extra = {"sliding_window": None, "tie_word_embeddings": False}
    if model_type == "phi3":
        extra = {"pad_token_id": 0, "tie_word_embeddings": False}
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**TINY, **extra, **overrides})


def random_model(config: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at exactly 1 (or 0 for Gemma); make them matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_round_trips_through_transformers_gguf_loader(model_type: str, demo_tokenizer: Any,
                                                                  tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = random_model(tiny_config(model_type, len(demo_tokenizer)))
    path = tmp_path / "model.gguf"
    write_gguf(model, demo_tokenizer, demo_tokenizer.chat_template, [], path, "f16", "tiny")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = demo_tokenizer("The quick brown fox jumps over the lazy dog, twice.")["input_ids"]
    expected, got = logits(model, ids), logits(reloaded, ids)
    assert torch.allclose(got, expected, atol=2e-2, rtol=1e-2), (got - expected).abs().max()


def test_unsupported_architecture_names_the_supported_ones() -> None:
    with pytest.raises(TunewizError) as caught:
        family_of("gpt_neox")
    assert "gpt_neox" in str(caught.value) and "Qwen3" in caught.value.hint and "Phi-3" in caught.value.hint
