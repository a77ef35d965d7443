"""A Triton kernel that dequantises a bitsandbytes NF4 weight in one pass (QLoRA in engine/training/fused_lora.py).

bitsandbytes' `dequantize_4bit` on a double-quantised weight (QLoRA's default) runs three kernels and
allocates a float32 copy of the block scales on every call: it dequantises the 8-bit scales, adds their
offset, then dequantises the weight. The fused blocks call it three times per weight and step with
checkpointing (forward, recompute, backward): 672 calls per step on an 8B model. This kernel reads the
packed weight, the 8-bit scales and their second-level scales once and writes the weight in the
buffer's dtype, with the same float32 arithmetic as bitsandbytes' CUDA kernels (code[nibble] x scale,
the scale itself code2[q] x scale2 + offset), and allocates nothing.

Used on CUDA tensors where Triton is installed (`AVAILABLE`) for NF4 states (`supports`); the tests
also run it on a CPU through TRITON_INTERPRET=1 against bitsandbytes' own dequantisation.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None
BLOCK = 1024  # packed bytes per program: 2,048 weights

if AVAILABLE:  # the module imports without Triton (the CPU install), but offers no kernel there
    import triton
    import triton.language as tl

    @triton.jit
    def _dequantize_kernel(packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, n,
                           BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                           BLOCK: tl.constexpr):
        """out[2i], out[2i+1] = code[byte_i >> 4], code[byte_i & 15], each times its block's scale."""
        start = tl.program_id(0).to(tl.int64) * BLOCK
        index = start + tl.arange(0, BLOCK)  # packed bytes
        mask = index * 2 < n
        byte = tl.load(packed_ptr + index, mask=mask, other=0).to(tl.int32)
        block = index * 2 // BLOCKSIZE  # both weights of a byte share a block (block sizes are even)
        if NESTED:
            quantized = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale2 = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
            scale = tl.load(code2_ptr + quantized) * scale2 + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        high = tl.load(code_ptr + (byte >> 4)) * scale
        low = tl.load(code_ptr + (byte & 15)) * scale
        values = tl.reshape(tl.join(high, low), (2 * BLOCK,))  # high, low, high, low, ...
        out_index = start * 2 + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + out_index, values.to(out_ptr.dtype.element_ty), mask=out_index < n)


def supports(state: Any) -> bool:
    """An NF4 state this kernel computes exactly (FP4's code book is not a plain lookup in bitsandbytes)."""
    nested_ok = not state.nested or (state.state2.absmax.dtype == torch.float32 and state.absmax.dtype == torch.uint8)
    return AVAILABLE and state.quant_type == "nf4" and state.blocksize % 2 == 0 and nested_ok


def dequantize(packed: torch.Tensor, state: Any, out: torch.Tensor) -> torch.Tensor:
    """The weight of `packed` (bitsandbytes' uint8 NF4 data) and `state`, written into `out` (its shape, any
    float dtype); returns `out`."""
    n = out.numel()
    nested = state.nested
    absmax = state.absmax
    if nested:  # the scales are themselves 8-bit quantised (double quantisation)
        inner = state.state2
        code2, absmax2, offset, blocksize2 = inner.code, inner.absmax, state.offset, inner.blocksize
    else:  # unused by the kernel: any tensor will do
        code2 = absmax2 = offset = absmax
        blocksize2 = 1
    _dequantize_kernel[(triton.cdiv((n + 1) // 2, BLOCK),)](
        packed.view(torch.uint8), state.code, absmax, code2, absmax2, offset, out, n,
        BLOCKSIZE=state.blocksize, BLOCKSIZE2=blocksize2, NESTED=nested, BLOCK=BLOCK)
    return out
