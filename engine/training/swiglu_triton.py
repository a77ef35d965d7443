"""Triton kernels for SwiGLU's elementwise work in the fused LoRA MLP (engine/training/fused_lora.py).

One pass each way over the intermediate activations, in fp32 registers, where torch's operations
take two passes forward and about ten backward. Intermediate results are rounded to the tensors' dtype
where torch's operations round them (SiLU's output; the gradient reaching it), so that a bf16 MLP computes
what transformers' computes. The fused MLP uses them on CUDA tensors where Triton
is installed (`AVAILABLE`); the tests also run them on a CPU through TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib.util

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None
BLOCK = 1024

if AVAILABLE:  # the module imports without Triton (the CPU install), but offers no kernels there
    import triton
    import triton.language as tl

    from tunewiz.engine.training.triton_rounding import as_rounded

    @triton.jit
    def _forward_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        gate = tl.load(gate_ptr + offsets, mask=mask).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=mask).to(tl.float32)
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        silu = as_rounded(gate / (1.0 + tl.exp(-gate)), dtype)  # rounded first, as torch's silu is
        tl.store(out_ptr + offsets, as_rounded(silu * up, dtype).to(dtype), mask=mask)

    @triton.jit
    def _backward_kernel(gate_ptr, up_ptr, grad_ptr, grad_up_ptr, n, BLOCK: tl.constexpr):
        """grad (the gradient of silu(gate) * up) is overwritten with the gate's gradient."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        gate = tl.load(gate_ptr + offsets, mask=mask).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=mask).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
        dtype: tl.constexpr = grad_ptr.dtype.element_ty
        sigmoid = 1.0 / (1.0 + tl.exp(-gate))  # as torch's silu_backward computes it
        grad_up = grad * as_rounded(gate / (1.0 + tl.exp(-gate)), dtype)  # silu(gate) as the forward has it
        grad_silu = as_rounded(grad * up, dtype)  # the gradient reaching silu, rounded as autograd's is
        grad_gate = grad_silu * sigmoid * (1.0 + gate * (1.0 - sigmoid))
        tl.store(grad_up_ptr + offsets, as_rounded(grad_up, dtype).to(dtype), mask=mask)
        tl.store(grad_ptr + offsets, as_rounded(grad_gate, dtype).to(dtype), mask=mask)


def _grid(n: int) -> tuple[int]:
    return ((n + BLOCK - 1) // BLOCK,)


def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for contiguous tensors of one shape and dtype."""
    out = torch.empty_like(gate)
    _forward_kernel[_grid(gate.numel())](gate, up, out, gate.numel(), BLOCK=BLOCK)
    return out


def backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor,
             spare: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of gate, grad of up) of silu(gate) * up: the first written into `grad`, the second into `spare`."""
    _backward_kernel[_grid(gate.numel())](gate, up, grad, spare, gate.numel(), BLOCK=BLOCK)
    return grad, spare
