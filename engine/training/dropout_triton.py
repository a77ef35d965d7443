"""LoRA dropout from a counter-based generator, in Triton (`speed.fused_dropout`, on CUDA).

peft drops out the input of each LoRA A matrix: a mask the size of the layer's input per projection (seven
a layer, one of them the MLP's wide hidden state), drawn, multiplied in, and drawn again in the backward
(engine/training/fused_lora.py redraws them rather than keep them): with torch, each draw writes the mask,
and each use reads the input and the mask and writes their product. Here no mask is ever written: each
element's keep-or-drop comes from a counter-based generator (Philox, `tl.rand`) keyed by a seed tensor and
the element's index, so a kernel that reads the input computes it on the fly:

- `dropped`: x with the dropped elements zeroed, in one pass (read x, write the copy), for cuBLAS's matmuls
  with A (the forward's rank-r product, A's gradient);
- `x_grad_`: adds the LoRA part of the input's gradient, (g @ A) masked and scaled, into it, in one pass.

(A first version ran the two matmuls with A in Triton too, never writing the copy; its matmuls were slower
than cuBLAS's: 0.93x and 0.96x the speed of torch's masks, docs/speed.md.)

The seed is a one-element tensor drawn from torch's generator on the device (no host synchronisation),
so a run's masks follow `training.seed`, and checkpointing's recompute (which replays the random state)
draws the same seed again. The masks are not those torch's dropout would draw (another generator), only
distributed as they are. x must be contiguous and 2-D, with fewer than 2**31 elements (the generator's
counter is 32-bit); the callers check.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None
MAX_ELEMENTS = 2**31 - 1  # tl.rand's offsets are 32-bit
BLOCK_T, BLOCK_H = 16, 256  # the dropped-out copy's tile: 4,096 elements a program

if AVAILABLE:  # the module imports without Triton (the CPU install), but offers no kernels there
    import triton
    import triton.language as tl

    @triton.jit
    def _kept(seed, rows, cols, columns, p):
        """[rows, cols] of the keep mask: True where the element survives dropout."""
        return tl.rand(seed, rows[:, None] * columns + cols[None, :]) >= p

    @triton.jit
    def _dropped_kernel(x_ptr, out_ptr, seed_ptr, rows_n, columns, p, BLOCK_T: tl.constexpr,
                        BLOCK_H: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        inside = (rows[:, None] < rows_n) & (cols[None, :] < columns)
        offsets = rows[:, None].to(tl.int64) * columns + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
        kept = _kept(tl.load(seed_ptr), rows, cols, columns, p)
        tl.store(out_ptr + offsets, tl.where(kept, x, tl.zeros_like(x)), mask=inside)

    @triton.jit
    def _x_grad_kernel(g_ptr, a_ptr, grad_x_ptr, seed_ptr, rows_n, columns, rank, p, scale, rows_bucket,
                       BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        ranks = tl.arange(0, BLOCK_R)
        seed = tl.load(seed_ptr)
        g = tl.load(g_ptr + rows[:, None] * rank + ranks[None, :],
                    mask=(rows[:, None] < rows_n) & (ranks[None, :] < rank), other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * columns + cols[None, :],
                    mask=(ranks[:, None] < rank) & (cols[None, :] < columns), other=0.0)
        product = tl.dot(g, a.to(g.dtype)) * scale
        inside = (rows[:, None] < rows_n) & (cols[None, :] < columns)
        offsets = rows[:, None].to(tl.int64) * columns + cols[None, :]
        current = tl.load(grad_x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        added = tl.where(_kept(seed, rows, cols, columns, p), product, tl.zeros_like(product))
        tl.store(grad_x_ptr + offsets, (current + added).to(grad_x_ptr.dtype.element_ty), mask=inside)



def usable(like: torch.Tensor, elements: int) -> bool:
    """Whether the kernels take an input of `elements` elements of `like`'s dtype and device: 16-bit on CUDA,
    few enough for a 32-bit counter. (fp32 stays with torch's masks: Triton's fp32 dot rounds through tf32.)"""
    return AVAILABLE and like.is_cuda and like.dtype in (torch.bfloat16, torch.float16) and elements <= MAX_ELEMENTS


def new_seed(like: torch.Tensor) -> torch.Tensor:
    """A seed for one mask, drawn from torch's generator of `like`'s device (no host synchronisation)."""
    return torch.randint(0, 2**31 - 1, (1,), device=like.device, dtype=torch.int64)


def _rank_block(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())  # tl.dot's smallest tile side is 16


def dropped(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """x [T, H] with the elements the mask of `seed` drops zeroed (not scaled by 1 / (1 - p): the callers put
    that in their matmul's alpha), as a new tensor."""
    x = x.contiguous()
    rows, columns = x.shape
    out = torch.empty_like(x)
    _dropped_kernel[(triton.cdiv(rows, BLOCK_T), triton.cdiv(columns, BLOCK_H))](x, out, seed, rows, columns, p,
                                                                                  BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H)
    return out


def _bucket(rows: int) -> int:
    """The rows' power of two: the tuned launch settings are kept per bucket, not per padded batch length."""
    return 1 << max(rows - 1, 1).bit_length()


# Launch settings tried once per shape (columns, rank, bucket of rows) on a GPU, the fastest kept (Triton's
# autotuner): the kernel reads and writes the input's gradient once and is bound by memory.
_TILES = [{"BLOCK_T": t, "BLOCK_H": h} for t, h in ((32, 64), (64, 64), (64, 128), (128, 64))]
_CONFIGS = ([triton.Config(tile, num_warps=warps, num_stages=stages) for tile in _TILES
             for warps, stages in ((4, 3), (8, 4))] if AVAILABLE else [])
_x_grad_tuned: Any = (triton.autotune(_CONFIGS, key=["columns", "rank", "rows_bucket"], restore_value=["grad_x_ptr"])(
    _x_grad_kernel) if AVAILABLE else None)


def x_grad_(grad_x: torch.Tensor, g: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float,
            scale: float) -> torch.Tensor:
    """grad_x += scale * mask * (g @ a) in place (the mask only: fold 1 / (1 - p) into `scale`): the LoRA
    part of the input's gradient, for grad_x [T, H], g [T, R] and a [R, H]."""
    assert grad_x.is_contiguous(), "the input's gradient is added to in place"
    g, a = g.contiguous(), a.contiguous()
    rows, columns = grad_x.shape
    rank = g.shape[1]
    arguments = (g, a, grad_x, seed, rows, columns, rank, p, scale, _bucket(rows))
    if grad_x.is_cuda:
        _x_grad_tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_T"]), triton.cdiv(columns, meta["BLOCK_H"]))](
            *arguments, BLOCK_R=_rank_block(rank))
    else:
        _x_grad_kernel[(triton.cdiv(rows, 64), triton.cdiv(columns, 64))](*arguments, BLOCK_T=64, BLOCK_H=64,
                                                                           BLOCK_R=_rank_block(rank))
    return grad_x
