"""Rotary position embedding of the queries and keys in one Triton kernel each way (`speed.fused_lora`, on CUDA).

transformers' `apply_rotary_pos_emb` takes about ten elementwise kernels forward (rotate_half's slices and
concatenation, two products and a sum, for Q and for K) and autograd as many backward; liger-kernel's one
kernel goes through a dispatcher on every call (environment reads and device queries, host time the GPU
waits through). Here one kernel rotates Q and K of a token together, in float32 registers, and the
backward is the same rotation by the opposite angle. Each product is rounded to the tensors' dtype before
the sum, as transformers' bf16 operations round: the rotated queries and keys, and their gradients, are
bit for bit transformers'. It serves the Llama-like attentions
(`LLAMA_LIKE_MODULES`), whose cos and sin are `cat(freqs, freqs)`: both halves of a head share an angle.
CPU tensors, other layouts and a missing Triton take the function the model's module had before.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None
# transformers modules whose attention calls the module-level apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1).
LLAMA_LIKE_MODULES = ("llama", "mistral", "qwen2", "qwen3")

if AVAILABLE:  # the module imports without Triton (the CPU install), but offers no kernels there
    import triton
    import triton.language as tl

    from tunewiz.engine.training.triton_rounding import as_rounded

    @triton.jit
    def _rotate(x_ptr, out_ptr, token, cos, sin, columns, heads: tl.constexpr, HEADS: tl.constexpr,
                HALF: tl.constexpr):
        rows = tl.arange(0, HEADS)[:, None]
        offsets = token * heads * 2 * HALF + rows * 2 * HALF + columns[None, :]
        mask = rows < heads
        first = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        second = tl.load(x_ptr + offsets + HALF, mask=mask, other=0.0).to(tl.float32)
        dtype: tl.constexpr = out_ptr.dtype.element_ty  # each product rounded to it before the sum, as
        # transformers' operations round them
        first_cos, second_sin = as_rounded(first * cos, dtype), as_rounded(second * sin, dtype)
        second_cos, first_sin = as_rounded(second * cos, dtype), as_rounded(first * sin, dtype)
        tl.store(out_ptr + offsets, as_rounded(first_cos - second_sin, dtype).to(dtype), mask=mask)
        tl.store(out_ptr + offsets + HALF, as_rounded(second_cos + first_sin, dtype).to(dtype), mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, seq_len, cos_batch_stride,
                     SIGN: tl.constexpr, Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, Q_BLOCK: tl.constexpr,
                     K_BLOCK: tl.constexpr, HALF: tl.constexpr):
        """One token's query and key heads ([tokens, heads, 2 * HALF] rows), rotated by SIGN times the angle."""
        token = tl.program_id(0).to(tl.int64)
        angles = (token // seq_len) * cos_batch_stride + (token % seq_len) * 2 * HALF
        columns = tl.arange(0, HALF)
        cos = tl.load(cos_ptr + angles + columns).to(tl.float32)[None, :]
        sin = SIGN * tl.load(sin_ptr + angles + columns).to(tl.float32)[None, :]
        _rotate(q_ptr, q_out_ptr, token, cos, sin, columns, Q_HEADS, Q_BLOCK, HALF)
        _rotate(k_ptr, k_out_ptr, token, cos, sin, columns, K_HEADS, K_BLOCK, HALF)


def _rotated(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k ([batch, heads, seq, head_dim]) rotated by `sign` times the angles of cos and sin ([batch or 1,
    seq, head_dim]); the results in the [batch, seq, heads, head_dim] memory layout transformers' projections give."""
    batch, q_heads, seq_len, head_dim = q.shape
    q_rows, k_rows = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    q_out, k_out = torch.empty_like(q_rows), torch.empty_like(k_rows)
    cos, sin = cos.contiguous(), sin.contiguous()
    _rope_kernel[(batch * seq_len,)](
        q_rows, k_rows, q_out, k_out, cos, sin, seq_len, 0 if cos.shape[0] == 1 else seq_len * head_dim,
        SIGN=sign, Q_HEADS=q_heads, K_HEADS=k.shape[1], Q_BLOCK=triton.next_power_of_2(q_heads),
        K_BLOCK=triton.next_power_of_2(k.shape[1]), HALF=head_dim // 2)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


class RotaryEmbedding(torch.autograd.Function):
    """(q, k) rotated by the angles of (cos, sin); cos and sin are constants (no gradient)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        return _rotated(q, k, cos, sin, 1.0)

    @staticmethod
    def backward(ctx: Any, grad_q: torch.Tensor, grad_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        grad_q_in, grad_k_in = _rotated(grad_q, grad_k, cos, sin, -1.0)  # a rotation's transpose is its inverse
        return grad_q_in, grad_k_in, None, None


def _supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, unsqueeze_dim: int) -> bool:
    head_dim = q.shape[-1]
    return (q.is_cuda and unsqueeze_dim == 1 and q.dim() == k.dim() == 4 and cos.dim() == 3
            and head_dim % 2 == 0 and (head_dim // 2) & (head_dim // 2 - 1) == 0  # a power of two: Triton's block
            and k.shape[-1] == head_dim == cos.shape[-1] and cos.shape[0] in (1, q.shape[0])
            and cos.shape[1] == q.shape[2] == k.shape[2] and q.dtype == k.dtype)


def _with_fallback(fallback: Callable[..., Any]) -> Callable[..., Any]:
    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             unsqueeze_dim: int = 1) -> Any:
        if not _supported(q, k, cos, unsqueeze_dim):
            return fallback(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return RotaryEmbedding.apply(q, k, cos, sin)

    apply_rotary_pos_emb.tunewiz_fallback = fallback  # type: ignore[attr-defined]  # marks it ours: patched once
    return apply_rotary_pos_emb


def apply_rope(model: torch.nn.Module, cuda: bool) -> bool:
    """Route the attention of `model`'s transformers module (a Llama-like one) through the Triton rotation.

    The module-level function is replaced, as liger-kernel replaces it, keeping the one it had as the
    fallback. Returns whether the model's attention now uses it.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not (AVAILABLE and cuda and model_type in LLAMA_LIKE_MODULES):
        return False
    module: Any = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    current = module.apply_rotary_pos_emb
    if not hasattr(current, "tunewiz_fallback"):
        module.apply_rotary_pos_emb = _with_fallback(current)
    return True
