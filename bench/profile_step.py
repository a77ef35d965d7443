"""Where a training step's GPU time goes: the engine's model set-up, profiled with torch.profiler.

    python -m bench.profile_step MODEL_DIR [--method lora|qlora] [--no-checkpointing] [--plain] [--set KEY=VALUE ...]
                                 [--trace T.json.gz] [--memory S.pickle] [--unsloth]

It builds the model exactly as the engine's trainer does (tunewiz.engine.training.models.load_model and
tunewiz.engine.training.trainer.prepare_trainable; `--plain` turns the speed levers off), runs micro-batch 2 × 2048
random tokens under bf16 autocast with fused AdamW, and prints GPU kernel time per step grouped by
kind (matmuls, attention, fused kernels, 4-bit dequantisation, elementwise and copies, optimiser, ...),
plus the ten costliest kernels, and the wall time of a synchronised step (its excess over the GPU time
is time the GPU waits for the host). `--trace` also records the host side and charges those waits to
Python frames (bench/host_gaps.py). `--unsloth` profiles Unsloth's model instead, set up as
`.whl/anchor.py` sets it up (r=16, alpha=16, dropout 0, its own checkpointing), on the same step: run
it with Unsloth's wheels on the path, in the same call as the engine's profile. `--memory` records one more
step's CUDA memory history and prints what the GPU held at its peak reserved memory (bench/memory_peak.py).
The allocator runs with expandable segments, as the engine's runs do (unless the environment says otherwise).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

KINDS = (  # first match wins
    ("4-bit dequantise", r"dequant|kgemm_4bit|nf4"),
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention"),
    ("matmul", r"gemm|cutlass|sm90_xmma|nvjet|matmul|cublas|wgmma"),
    ("fused kernels (liger)", r"liger|_rms_norm|_swiglu|_rope|cross_entropy|triton"),
    ("optimiser", r"adam|foreach|multi_tensor"),
    ("norms and reductions", r"norm|reduce|sum_|mean|softmax"),
    ("elementwise and copies", r"elementwise|copy|cat|fill|mul|add|silu|cast|vectorized|index"),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--method", default="lora", choices=["lora", "qlora"])
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--plain", action="store_true", help="every speed lever off")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a spec override on top, as `tunewiz train --set` takes it (e.g. speed.fused_lora=true)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--unsloth", action="store_true", help="Unsloth's model instead of the engine's")
    parser.add_argument("--trace", type=Path, help="also record CPU activity with Python stacks, write this Chrome "
                        "trace (.json or .json.gz) and print where the GPU waits for the host (bench.host_gaps)")
    parser.add_argument("--sync-debug", action="store_true", help="also run one step with torch's CUDA sync debug "
                        "mode and print every place that made the host wait for the GPU inside the step")
    parser.add_argument("--memory", type=Path, help="also record one step's CUDA memory history, write it here and "
                        "print what was held at the peak reserved memory (bench.memory_peak)")
    args = parser.parse_args()
    from tunewiz.engine.run.worker import ALLOCATOR_ENV, ALLOCATOR_SETTING

    if not any(os.environ.get(name) for name in ALLOCATOR_ENV):  # before CUDA starts, as the engine's worker
        os.environ[ALLOCATOR_ENV[0]] = ALLOCATOR_SETTING

    if args.unsloth:
        model, note = unsloth_model(args.model, args.method, not args.no_checkpointing), "Unsloth"
    else:
        model, note = engine_model(args)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  fused=not args.plain)
    tokens = torch.randint(0, 32000, (2, 2048), device="cuda:0")
    step = training_step(model, optimizer, tokens, autocast=not args.unsloth)  # Unsloth's loop has no autocast
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):  # wall time of a step with nothing around it: the gap to the GPU time is host overhead
        step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - started) / args.steps * 1000
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    per_kind: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        cuda_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if event.device_type != torch.autograd.DeviceType.CUDA or not cuda_us:
            continue
        per_kind[kind_of(event.key)] += cuda_us / args.steps / 1000
        per_kernel[event.key] += cuda_us / args.steps / 1000
    total = sum(per_kind.values())
    stack = "unsloth" if args.unsloth else "plain" if args.plain else "engine"
    label = f"{args.model.name} {args.method} checkpointing {'off' if args.no_checkpointing else 'on'} {stack} ({note})"
    print(f"GPU time per step: {total:.1f} ms, wall time {wall_ms:.1f} ms  [{label}]")
    for kind, ms in sorted(per_kind.items(), key=lambda item: -item[1]):
        print(f"  {kind:<26}{ms:>9.1f} ms {ms / total:>6.1%}")
    print("  costliest kernels:")
    for name, ms in sorted(per_kernel.items(), key=lambda item: -item[1])[:10]:
        print(f"    {ms:>8.1f} ms  {name[:110]}")
    if args.trace:
        trace_host_gaps(step, args.trace, args.steps)
    if args.sync_debug:
        print_synchronising_calls(step)
    if args.memory:
        record_memory(step, args.memory)


def training_step(model: Any, optimizer: Any, tokens: Any, autocast: bool) -> Callable[[], None]:
    """One training step on `tokens` (forward, backward, optimiser), under bf16 autocast where asked."""
    import torch

    def step() -> None:
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def engine_model(args: argparse.Namespace) -> tuple[Any, str]:
    """The model as the engine's trainer builds it, and the notes of what the speed levers did."""
    import torch

    from tunewiz.engine.config import spec as spec_mod
    from tunewiz.engine.training import models, speed
    from tunewiz.engine.training.trainer import prepare_trainable

    spec = spec_mod.RunSpec(method=args.method)
    spec.model.name = str(args.model)
    spec.dataset.preset = "demo"  # unused: the step runs on random tokens
    if args.plain:
        spec = spec_mod.apply_overrides(spec, ['speed.fused_kernels="off"', 'speed.adapter_dtype="fp32"',
                                                   'speed.lean_lora=false'])
    spec = spec_mod.apply_overrides(spec, args.set)
    source = models.ModelSource(str(args.model), is_local=True, label=args.model.name)
    model = models.load_model(source, spec, torch.bfloat16, "cuda:0")
    model, prepared = prepare_trainable(model, spec, torch.bfloat16, True)
    note = "; ".join(prepared.notes)
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if checkpointing := speed.apply_checkpointing(model, spec, cuda=True, several_gpus=False):
            note += f"; {checkpointing}"
    return model, note


def unsloth_model(path: Path, method: str, checkpointing: bool) -> Any:
    """Unsloth's model with LoRA as .whl/anchor.py builds it (Unsloth's defaults: alpha = r, dropout 0)."""
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=str(path), max_seq_length=2048, dtype=torch.bfloat16,
                                                 load_in_4bit=method == "qlora")
    return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"],
                                            use_gradient_checkpointing="unsloth" if checkpointing else False)


def print_synchronising_calls(step: Callable[[], None]) -> None:
    """Run one step in torch's sync debug mode; print each call site that synchronised, with its callers.

    A synchronisation inside a step drains the GPU's queue: the host then has to launch the next
    kernels while the GPU idles, instead of running ahead of it."""
    import collections
    import traceback
    import warnings

    import torch

    sites: collections.Counter[str] = collections.Counter()

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
        sites[" < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-4:]))] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    print(f"synchronising calls in one step: {sum(sites.values())}")
    for site, count in sites.most_common(15):
        print(f"  {count:>5}  {site[:200]}")


def trace_host_gaps(step: Any, path: Path, steps: int) -> None:
    """Profile `steps` more steps with CPU activity and Python stacks; write the trace; print the host gaps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench import host_gaps

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    print(f"trace: {path}")
    print(host_gaps.render(host_gaps.analyse(host_gaps.load(path)), steps=steps))


def record_memory(step: Callable[[], None], path: Path) -> None:
    """Run one step with torch's CUDA memory history on; write it with the memory held before; print its peak."""
    import pickle

    import torch

    from bench import memory_peak

    torch.cuda.synchronize()
    recorded: dict[str, Any] = {"start_allocated": torch.cuda.memory_allocated(),
                                "start_reserved": torch.cuda.memory_reserved()}
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    try:
        step()
        torch.cuda.synchronize()
        recorded["snapshot"] = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    with path.open("wb") as handle:
        pickle.dump(recorded, handle)
    print(f"memory history: {path}")
    print(memory_peak.render(memory_peak.analyse(recorded)))


if __name__ == "__main__":
    main()
