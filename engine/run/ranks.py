"""Which engine process this is when a run spans several GPUs, and the two collectives it needs.

`accelerate launch` (or torchrun) starts one engine process per GPU and tells each its place through
RANK, LOCAL_RANK and WORLD_SIZE; transformers' Trainer sets up the process group from them. A single
process (one GPU or the CPU) is rank 0 of a world of 1, and the collectives below are then no-ops.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 alone writes the run directory."""
    return rank() == 0


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any: ranks must agree to stop at the same step, or the
    ones still training wait forever in their next gradient exchange."""
    if not _distributed():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_int(value: int) -> list[int]:
    """`value` from every rank, in rank order (just [value] in a single process)."""
    if not _distributed():
        return [value]
    import torch
    import torch.distributed as dist

    mine = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]
