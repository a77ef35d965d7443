"""RMSNorm with a frozen weight in one Triton kernel each way (`speed.fused_lora`, on CUDA).

LoRA never trains the norms, so the backward computes the input's gradient only: one pass over the rows,
where liger-kernel's RMSNorm also sums a weight gradient per row block and resolves its implementation
through a dispatcher on every call (environment reads and device queries, about 30 µs of host time per
call that the GPU waits through: bench/profile_step's trace of the 8B step). The forward rounds as
transformers' Llama-family RMSNorm does: the normalised row in float32, cast to the input's dtype, then
times the weight, so its output is bit for bit transformers'.

`apply_frozen_rms_norm` gives every Llama-like RMSNorm module (transformers' own or as liger-kernel
patched it, with offset 0 and Llama casting) this forward. A norm whose weight is trained, an input not
on CUDA, or Triton missing takes the forward the module had before.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None
# Norm classes whose forward is weight * (x * rsqrt(mean(x^2) + eps)).to(input dtype) (checked in transformers 5.24).
LLAMA_LIKE_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})

if AVAILABLE:  # the module imports without Triton (the CPU install), but offers no kernels there
    import triton
    import triton.language as tl

    from tunewiz.engine.training.triton_rounding import as_rounded

    @triton.jit
    def _forward_kernel(x_ptr, weight_ptr, out_ptr, rstd_ptr, columns, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        mask = offsets < columns
        x = tl.load(x_ptr + row * columns + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / columns + eps)
        normed = as_rounded(x * rstd, x_ptr.dtype.element_ty)  # rounded to the input's dtype first
        weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * columns + offsets, as_rounded(normed * weight, dtype).to(dtype), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _backward_kernel(grad_ptr, x_ptr, weight_ptr, rstd_ptr, grad_x_ptr, columns, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        mask = offsets < columns
        x = tl.load(x_ptr + row * columns + offsets, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + row * columns + offsets, mask=mask, other=0.0).to(tl.float32)
        weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        normed = x * rstd
        grad_normed = grad * weight
        grad_x = rstd * (grad_normed - normed * (tl.sum(grad_normed * normed, axis=0) / columns))
        tl.store(grad_x_ptr + row * columns + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _launch(columns: int) -> dict[str, int]:
    block = 1 << (columns - 1).bit_length()
    return {"BLOCK": block, "num_warps": min(max(block // 512, 1), 16)}


class FrozenRMSNorm(torch.autograd.Function):
    """weight * normalise(x) over the last dimension; the gradient reaches x only (the weight is frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        _forward_kernel[(rows.shape[0],)](rows, weight, out, rstd, rows.shape[1], eps, **_launch(rows.shape[1]))
        ctx.save_for_backward(rows, weight, rstd)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        rows, weight, rstd = ctx.saved_tensors
        grad_rows = grad.reshape(rows.shape).contiguous()
        grad_x = torch.empty_like(rows)
        _backward_kernel[(rows.shape[0],)](grad_rows, rows, weight, rstd, grad_x, rows.shape[1],
                                           **_launch(rows.shape[1]))
        return grad_x.view(grad.shape), None, None


def _llama_like(module: torch.nn.Module) -> bool:
    """transformers' Llama-family RMSNorm, or one liger-kernel patched with the same maths."""
    return (type(module).__name__ in LLAMA_LIKE_NORMS and isinstance(getattr(module, "weight", None), torch.Tensor)
            and float(getattr(module, "offset", 0.0)) == 0.0 and getattr(module, "casting_mode", "llama") == "llama")


def _frozen_forward(module: torch.nn.Module, fallback: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    parameters, eps = module._parameters, float(module.variance_epsilon)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        weight = parameters["weight"]  # looked up at each call: the module's weight as it is now
        if args or kwargs or weight is None or weight.requires_grad or not x.is_cuda:
            return fallback(x, *args, **kwargs)
        return FrozenRMSNorm.apply(x, weight, eps)

    return forward


def apply_frozen_rms_norm(model: torch.nn.Module, cuda: bool) -> int:
    """Give every Llama-like RMSNorm of `model` the frozen-weight Triton forward; returns how many (0 where
    Triton or CUDA is missing)."""
    if not (AVAILABLE and cuda):
        return 0
    from tunewiz.engine.training.fused_lora import previous_forward

    patched = 0
    for module in model.modules():
        if _llama_like(module):
            module.forward = _frozen_forward(module, previous_forward(module))
            patched += 1
    return patched
