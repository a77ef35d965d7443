"""The Triton rotary embedding (engine/training/rope_triton.py) against transformers' apply_rotary_pos_emb:
the same rotated queries and keys and the same gradients; where it is used and where it steps aside."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from tunewiz.engine.training import rope_triton

needs_triton = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="Triton runs on CUDA, or on a CPU with TRITON_INTERPRET=1")


def _angles(batch: int, seq: int, head_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin as Llama's rotary embedding makes them: cat(freqs, freqs), one row of angles per position."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=4096)
    rotary = LlamaRotaryEmbedding(config).to(device)
    positions = torch.arange(seq, device=device).expand(batch, seq) + torch.arange(batch, device=device)[:, None] * 7
    return rotary(torch.empty(1, device=device), positions)


def _projected(batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """[batch, heads, seq, head_dim] as the attention makes it: a projection's output, viewed, transposed."""
    flat = torch.randn(batch, seq, heads * head_dim, device=device).to(dtype)
    return flat.view(batch, seq, heads, head_dim).transpose(1, 2).detach().requires_grad_()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch_angles", [True, False], ids=["angles-per-sequence", "shared-angles"])
def test_rotation_and_gradients_match_transformers(dtype: torch.dtype, batch_angles: bool) -> None:
    pytest.importorskip("triton")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cos, sin = _angles(2, 6, 16, device)
    if not batch_angles:
        cos, sin = cos[:1], sin[:1]
    cos, sin = cos.to(dtype), sin.to(dtype)
    q, k = _projected(2, 4, 6, 16, dtype, device), _projected(2, 2, 6, 16, dtype, device)
    mine_q, mine_k = (t.detach().clone().requires_grad_() for t in (q, k))
    expected = apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float())  # exact, for both dtypes
    got = rope_triton.RotaryEmbedding.apply(mine_q, mine_k, cos, sin)
    tolerance = {"atol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    for mine, reference in zip(got, expected, strict=True):
        assert mine.shape == reference.shape and mine.dtype == dtype
        assert torch.allclose(mine.float(), reference, **tolerance)
    grad_q, grad_k = torch.randn_like(expected[0]), torch.randn_like(expected[1])
    torch.autograd.backward(expected, (grad_q, grad_k))
    torch.autograd.backward(got, (grad_q.to(dtype), grad_k.to(dtype)))
    assert q.grad is not None and k.grad is not None and mine_q.grad is not None and mine_k.grad is not None
    assert torch.allclose(mine_q.grad.float(), q.grad.float(), **tolerance)
    assert torch.allclose(mine_k.grad.float(), k.grad.float(), **tolerance)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton runs on CUDA, or on a CPU with TRITON_INTERPRET=1")
def test_bf16_rotation_and_gradients_are_transformers_bit_for_bit() -> None:
    """In bf16 each product is rounded before the sum, as transformers' operations round: the same bits, forward
    and backward (the first step's loss of a run is then the same as transformers')."""
    pytest.importorskip("triton")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cos, sin = (t.to(torch.bfloat16) for t in _angles(2, 6, 16, device))
    q, k = _projected(2, 4, 6, 16, torch.bfloat16, device), _projected(2, 2, 6, 16, torch.bfloat16, device)
    mine_q, mine_k = (t.detach().clone().requires_grad_() for t in (q, k))
    expected = apply_rotary_pos_emb(q, k, cos, sin)
    got = rope_triton.RotaryEmbedding.apply(mine_q, mine_k, cos, sin)
    assert all(torch.equal(mine, reference) for mine, reference in zip(got, expected, strict=True))
    grads = (torch.randn_like(expected[0]), torch.randn_like(expected[1]))
    torch.autograd.backward(expected, grads)
    torch.autograd.backward(got, grads)
    assert torch.equal(mine_q.grad, q.grad) and torch.equal(mine_k.grad, k.grad)


def _model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


@pytest.fixture
def restored_llama_rope() -> Any:
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    yield modeling_llama
    modeling_llama.apply_rotary_pos_emb = original


def test_patches_the_models_module_once_and_steps_aside_on_a_cpu(restored_llama_rope: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    original = restored_llama_rope.apply_rotary_pos_emb
    assert not rope_triton.apply_rope(_model(), cuda=False)
    assert restored_llama_rope.apply_rotary_pos_emb is original
    monkeypatch.setattr(rope_triton, "AVAILABLE", True)
    model = _model()
    tokens = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    assert rope_triton.apply_rope(model, cuda=True) and rope_triton.apply_rope(model, cuda=True)
    patched = restored_llama_rope.apply_rotary_pos_emb
    assert patched is not original and patched.tunewiz_fallback is original  # wrapped once, not twice
    monkeypatch.setattr(rope_triton.RotaryEmbedding, "apply", lambda *args: pytest.fail("the kernel ran"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, before)  # CPU tensors: transformers' rotation


def test_other_architectures_are_not_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rope_triton, "AVAILABLE", True)
    model = _model()
    model.config.model_type = "gemma"
    assert not rope_triton.apply_rope(model, cuda=True)
