"""Rounding float32 values to bf16 inside a Triton kernel, exactly as torch's bf16 operations round them.

The fused kernels compute in float32 registers; to give what a chain of torch's bf16 operations gives (each
operation rounds its result to bf16, to nearest, ties to even), they round their intermediate results where
torch would. A cast there (`x.to(tl.bfloat16).to(tl.float32)`) says so, but the compiler need not keep a
narrowing cast whose result is widened at once, and Triton's interpreter (the CPU tests) truncates instead
of rounding; the integer form below is kept by every compiler and rounds the same everywhere.
"""

from __future__ import annotations

import importlib.util

AVAILABLE = importlib.util.find_spec("triton") is not None

if AVAILABLE:  # the module imports without Triton (the CPU install), but offers no kernels there
    import triton
    import triton.language as tl

    @triton.jit
    def as_rounded(x, dtype: tl.constexpr):
        """float32 `x` rounded to `dtype` (to nearest, ties to even), still in float32; NaN stays NaN."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            kept = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return tl.where(x != x, x, kept.to(tl.float32, bitcast=True))
        else:
            return x.to(dtype).to(tl.float32)
