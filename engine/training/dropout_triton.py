"""LoRA dropout inside the adapter's matmuls, in Triton (`speed.fused_dropout`, on CUDA).

peft drops out the input of each LoRA A matrix: a mask the size of the layer's input per projection (seven
a layer, one of them the MLP's wide hidden state), drawn, multiplied in, and drawn again in the backward
(engine/training/fused_lora.py redraws them rather than keep them). Here the mask is never stored: each
element's keep-or-drop comes from a counter-based generator (Philox, `tl.rand`) keyed by a seed tensor and
the element's index, so the three kernels that read the dropped-out input compute it on the fly:

- `a_forward`: mask * x @ A^T, scaled (by the LoRA scaling and 1 / (1 - p): the rank-r product);
- `a_grad`: the gradient of A, g^T @ dropout(x), scaled;
- `x_grad_`: adds the LoRA part of the input's gradient, (g @ A) masked and scaled, into it.

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

if AVAILABLE:  # the module imports without Triton (the CPU install), but offers no kernels there
    import triton
    import triton.language as tl

    @triton.jit
    def _kept(seed, rows, cols, columns, p):
        """[rows, cols] of the keep mask: True where the element survives dropout."""
        return tl.rand(seed, rows[:, None] * columns + cols[None, :]) >= p

    @triton.jit
    def _dropped_out(x_ptr, seed, rows, cols, rows_n, columns, p):
        """The [rows, cols] tile of x, the dropped elements zeroed (not yet scaled by 1 / (1 - p))."""
        inside = (rows[:, None] < rows_n) & (cols[None, :] < columns)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * columns + cols[None, :], mask=inside, other=0.0)
        return tl.where(_kept(seed, rows, cols, columns, p), x, tl.zeros_like(x))

    @triton.jit
    def _a_forward_kernel(x_ptr, a_ptr, out_ptr, seed_ptr, rows_n, columns, rank, p, scale, rows_bucket,
                          BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        ranks = tl.arange(0, BLOCK_R)
        seed = tl.load(seed_ptr)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for start in range(0, columns, BLOCK_H):
            cols = start + tl.arange(0, BLOCK_H)
            x = _dropped_out(x_ptr, seed, rows, cols, rows_n, columns, p)
            a_t = tl.load(a_ptr + ranks[None, :] * columns + cols[:, None],  # A^T's [cols, ranks] tile
                          mask=(ranks[None, :] < rank) & (cols[:, None] < columns), other=0.0)
            acc += tl.dot(x, a_t.to(x.dtype))
        tl.store(out_ptr + rows[:, None] * rank + ranks[None, :], (acc * scale).to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < rows_n) & (ranks[None, :] < rank))

    @triton.jit
    def _a_grad_kernel(g_ptr, x_ptr, out_ptr, seed_ptr, rows_n, columns, rank, p, scale, rows_per_split,
                       BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
        """One [ranks, cols] block of A's gradient over one slice of the rows: fp32 partial sums, one slice a
        program, so that a few thousand rows fill the GPU (the slices are summed after)."""
        cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
        part = tl.program_id(1)
        ranks = tl.arange(0, BLOCK_R)
        seed = tl.load(seed_ptr)
        acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
        first = part * rows_per_split
        end = tl.minimum(first + rows_per_split, rows_n)
        for start in range(first, end, BLOCK_T):
            rows = start + tl.arange(0, BLOCK_T)
            g_t = tl.load(g_ptr + rows[None, :] * rank + ranks[:, None],  # g^T's [ranks, rows] tile
                          mask=(rows[None, :] < end) & (ranks[:, None] < rank), other=0.0)
            x = _dropped_out(x_ptr, seed, rows, cols, end, columns, p)
            acc += tl.dot(g_t.to(x.dtype), x)
        tl.store(out_ptr + part * rank * columns + ranks[:, None] * columns + cols[None, :], acc * scale,
                 mask=(ranks[:, None] < rank) & (cols[None, :] < columns))

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


def _bucket(rows: int) -> int:
    """The rows' power of two: the tuned launch settings are kept per bucket, not per padded batch length."""
    return 1 << max(rows - 1, 1).bit_length()


# Launch settings tried once per shape (columns, rank, bucket of rows) on a GPU, the fastest kept (Triton's
# autotuner): the kernels read x once and are bound by memory, so what matters is how many tiles are in flight.
_TILES = [{"BLOCK_T": t, "BLOCK_H": h} for t, h in ((32, 64), (64, 64), (64, 128), (128, 64))]
_CONFIGS = ([triton.Config(tile, num_warps=warps, num_stages=stages) for tile in _TILES
             for warps, stages in ((4, 3), (8, 4))] if AVAILABLE else [])
_a_forward_tuned: Any = (triton.autotune(_CONFIGS, key=["columns", "rank", "rows_bucket"])(_a_forward_kernel)
                         if AVAILABLE else None)
_x_grad_tuned: Any = (triton.autotune(_CONFIGS, key=["columns", "rank", "rows_bucket"], restore_value=["grad_x_ptr"])(
    _x_grad_kernel) if AVAILABLE else None)


def a_forward(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    """scale * mask * x @ a^T, for x [T, H] and a [R, H] of x's dtype: the rank-r product [T, R] (dropout's
    1 / (1 - p) is not applied: fold it into `scale`)."""
    x, a = x.contiguous(), a.contiguous()
    rows, columns = x.shape
    rank = a.shape[0]
    out = torch.empty(rows, rank, dtype=x.dtype, device=x.device)
    arguments = (x, a, out, seed, rows, columns, rank, p, scale, _bucket(rows))
    if x.is_cuda:
        _a_forward_tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_T"]),)](*arguments, BLOCK_R=_rank_block(rank))
    else:  # Triton's interpreter (the CPU tests): one fixed tile
        _a_forward_kernel[(triton.cdiv(rows, 32),)](*arguments, BLOCK_T=32, BLOCK_H=64, BLOCK_R=_rank_block(rank))
    return out


def _splits(rows: int, column_blocks: int, device: torch.device) -> int:
    """Row slices for A's gradient: enough programs for about four per multiprocessor, each slice at least 256
    rows (the sum of the slices' partials costs a pass over [slices, R, H] floats)."""
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(rows // 256, -(-4 * processors // column_blocks)))


def a_grad(g: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, p: float, scale: float,
           dtype: torch.dtype) -> torch.Tensor:
    """scale * g^T @ dropout(x, p) (the mask only, no 1 / (1 - p): fold it into `scale`), in `dtype`: A's
    gradient [R, H] for g [T, R], the gradient reaching A's output."""
    g, x = g.contiguous(), x.contiguous()
    rows, columns = x.shape
    rank = g.shape[1]
    block_h = 64
    splits = _splits(rows, triton.cdiv(columns, block_h), x.device)
    per_split = triton.cdiv(triton.cdiv(rows, splits), 64) * 64
    splits = triton.cdiv(rows, per_split)
    partials = torch.empty(splits, rank, columns, dtype=torch.float32, device=x.device)
    _a_grad_kernel[(triton.cdiv(columns, block_h), splits)](g, x, partials, seed, rows, columns, rank, p, scale,
                                                             per_split, BLOCK_T=64, BLOCK_H=block_h,
                                                             BLOCK_R=_rank_block(rank))
    return (partials[0] if splits == 1 else partials.sum(0)).to(dtype)


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
