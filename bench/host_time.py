"""The host's share of a training step, measured on a CPU: the engine's Python and dispatch work per step.

    python -m bench.host_time [--layers 32] [--steps 20] [--variant NAME KEY=VALUE ...] [--no-checkpointing]
                              [--torch-checkpointing] [--profile N]

On a GPU the engine's step is host-bound where Unsloth's is not (docs/speed.md): the GPU waits while Python
prepares the next kernel. This measures that Python without a GPU: a Llama model with the 8B shape's 32
layers but tiny matrices (hidden 64, 16 tokens), prepared exactly as the trainer prepares it, so that the
arithmetic takes next to nothing and a step's time is the host's work: module calls, autograd nodes, the
LoRA layers' and fused blocks' Python, checkpointing's hooks and one operator dispatch per kernel a GPU
would launch. Compare settings within one run of this command (`--variant NAME KEY=VALUE ...`, repeatable);
`--torch-checkpointing` keeps torch's checkpointing instead of the engine's node; `--autocast` runs as a GPU run
does: frozen weights in bf16, bf16 autocast (fp32 adapters cast once a step), fused AdamW; `--profile N` prints the
N costliest functions (cProfile) of the first variant.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from typing import Any


def build(layers: int, overrides: list[str], checkpointing: bool, torch_checkpointing: bool = False,
          autocast: bool = False) -> tuple[Any, Any]:
    """The tiny model as the trainer prepares it (speed levers, LoRA on all seven projections) and its optimiser:
    with `autocast` as on a GPU, the frozen weights in bf16 (the adapters stay fp32) and fused AdamW."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunewiz.engine.config import spec as spec_mod
    from tunewiz.engine.training import speed
    from tunewiz.engine.training.trainer import prepare_trainable

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    spec = spec_mod.RunSpec()
    spec.dataset.preset = "demo"
    spec = spec_mod.apply_overrides(spec, ['lora.target_modules=["all-linear"]', *overrides])
    dtype = torch.bfloat16 if autocast else torch.float32
    model, _ = prepare_trainable(base.to(dtype), spec, dtype, cuda=False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        if not torch_checkpointing:  # as the trainer does once the Trainer has turned checkpointing on
            speed.apply_checkpointing(model, spec, cuda=False, several_gpus=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=autocast)
    return model, optimizer


def step_ms(model: Any, optimizer: Any, steps: int, autocast: bool = False) -> float:
    """Median milliseconds of a training step (forward, backward, optimiser) on one sequence of 16 tokens."""
    import torch

    from bench.profile_step import training_step

    step = training_step(model, optimizer, torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1)),
                         autocast=autocast)
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                        help="a named set of spec overrides (repeatable); default: the engine's defaults and "
                             "the defaults without the fused blocks")
    parser.add_argument("--profile", type=int, default=0, help="print this many costliest functions")
    parser.add_argument("--autocast", action="store_true", help="as on a GPU: frozen weights in bf16, bf16 "
                        "autocast (the fp32 adapters are then cast to bf16, once a step) and fused AdamW")
    parser.add_argument("--torch-checkpointing", action="store_true",
                        help="checkpoint through torch's checkpointing instead of the engine's own node")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # the host's work, not the arithmetic's parallelism
    variants = [(v[0], v[1:]) for v in args.variant] if args.variant else [
        ("defaults", []), ("without fused blocks", ["speed.fused_lora=false"])]
    checkpointing = "off" if args.no_checkpointing else "torch's" if args.torch_checkpointing else "the engine's"
    print(f"{args.layers} layers, hidden 64, 16 tokens, checkpointing {checkpointing}, "
          f"{'bf16 autocast' if args.autocast else 'fp32'}, one CPU thread: ms per step (host work only)")
    for index, (name, overrides) in enumerate(variants):
        model, optimizer = build(args.layers, overrides, not args.no_checkpointing, args.torch_checkpointing,
                                 args.autocast)
        print(f"  {name:<28} {step_ms(model, optimizer, args.steps, args.autocast):8.2f} ms")
        if index == 0 and args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            step_ms(model, optimizer, 5, args.autocast)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
