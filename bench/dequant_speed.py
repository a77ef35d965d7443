"""NF4 dequantisation: bitsandbytes' `dequantize_4bit` into a buffer against our Triton kernel
(engine/training/nf4_triton.py).

    python -m bench.dequant_speed [--calls 200]

On one CUDA GPU, for each projection shape of the 8B Llama (double-quantised NF4, as QLoRA loads it),
prints the GPU time per call (synchronised) and the host time per call (calls queued without a
synchronise: what the Python side costs when the GPU is ahead), and checks that both give the same weight.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

SHAPES = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096), "gate/up_proj": (14336, 4096),
          "down_proj": (4096, 14336)}


def _per_call_us(call: Callable[[], object], calls: int, synchronise: Callable[[], None]) -> tuple[float, float]:
    """(host microseconds per queued call, GPU-bound microseconds per call)."""
    for _ in range(10):
        call()
    synchronise()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    host = time.perf_counter() - started
    synchronise()
    total = time.perf_counter() - started
    return host / calls * 1e6, total / calls * 1e6


def main() -> None:
    import bitsandbytes.functional as bnb_functional
    import torch

    from tunewiz.engine.training import nf4_triton

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    for name, shape in SHAPES.items():
        weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        ours, theirs = torch.empty_like(weight), torch.empty_like(weight)
        bnb_host, bnb_total = _per_call_us(functools.partial(bnb_functional.dequantize_4bit, packed, state, out=theirs),
                                           args.calls, torch.cuda.synchronize)
        host, total = _per_call_us(functools.partial(nf4_triton.dequantize, packed, state, ours), args.calls,
                                   torch.cuda.synchronize)
        same = torch.equal(ours, theirs)
        gigabytes = weight.numel() * 2.5 / 1e9  # read 0.5 B, write 2 B per weight
        print(f"{name:<14} {shape!s:<14} bitsandbytes {bnb_total:7.1f} us/call (host {bnb_host:5.1f}), "
              f"triton {total:7.1f} us/call (host {host:5.1f}, {gigabytes / total * 1e6:6.0f} GB/s); same: {same}")


if __name__ == "__main__":
    main()
