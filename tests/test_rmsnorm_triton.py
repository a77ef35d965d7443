"""The frozen-weight Triton RMSNorm (engine/training/rmsnorm_triton.py) against transformers' LlamaRMSNorm:
the same output bit for bit in bf16, the same input gradient; which modules it takes over and when it
steps aside."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from tunewiz.engine.training import rmsnorm_triton

needs_triton = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="Triton runs on CUDA, or on a CPU with TRITON_INTERPRET=1")


def _norm(hidden: int, dtype: torch.dtype, device: str) -> Any:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(hidden, eps=1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(False)
    return norm


@needs_triton
@pytest.mark.parametrize(("dtype", "hidden"), [(torch.float32, 96), (torch.bfloat16, 96), (torch.bfloat16, 4096)])
def test_kernels_match_transformers(dtype: torch.dtype, hidden: int) -> None:
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    norm = _norm(hidden, dtype, device)
    x = (torch.randn(3, 5, hidden, device=device) * 3).to(dtype).requires_grad_()
    mine = x.detach().clone().requires_grad_()
    expected = norm(x)
    out = rmsnorm_triton.FrozenRMSNorm.apply(mine, norm.weight, norm.variance_epsilon)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if dtype == torch.bfloat16:  # rounded where transformers rounds (on a GPU and in Triton's interpreter alike:
        # engine/training/triton_rounding.py); its rsqrt and mean may differ from ours in float32's last bit,
        # which moves a rare element by one bf16 step
        assert (out == expected).float().mean() > 0.99
        assert torch.allclose(out.float(), expected.float(), rtol=2 ** -7, atol=0)
    else:
        assert torch.allclose(out, expected, atol=1e-6)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    out.backward(grad)
    assert x.grad is not None and mine.grad is not None
    tolerance = {"atol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    assert torch.allclose(mine.grad.float(), x.grad.float(), **tolerance)


def _model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


def test_takes_every_llama_like_norm_only_with_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rmsnorm_triton.apply_frozen_rms_norm(_model(), cuda=False) == 0
    monkeypatch.setattr(rmsnorm_triton, "AVAILABLE", True)
    assert rmsnorm_triton.apply_frozen_rms_norm(_model(), cuda=True) == 2 * 2 + 1  # two per layer and the final one


def test_steps_aside_off_cuda_and_for_a_trained_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU input, or a norm whose weight is trained, runs the forward the module had before."""
    monkeypatch.setattr(rmsnorm_triton, "AVAILABLE", True)
    monkeypatch.setattr(rmsnorm_triton.FrozenRMSNorm, "apply", lambda *args: pytest.fail("the kernel ran"))
    model = _model()
    tokens = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    rmsnorm_triton.apply_frozen_rms_norm(model, cuda=True)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, before)  # CPU tensors: transformers' forward
    norm = model.model.norm
    assert norm.weight.requires_grad  # a fresh model trains its norms: the kernel, with no weight gradient, steps aside
    x = torch.randn(2, 64, requires_grad=True)
    norm(x).sum().backward()
    assert norm.weight.grad is not None


def test_liger_patched_norms_with_other_maths_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma-style norms (offset 1, Gemma casting) as liger-kernel patches them keep their forward."""
    monkeypatch.setattr(rmsnorm_triton, "AVAILABLE", True)
    model = _model()
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.offset, module.casting_mode = 1.0, "gemma"
    assert rmsnorm_triton.apply_frozen_rms_norm(model, cuda=True) == 0
