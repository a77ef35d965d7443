"""`tunewiz doctor`, `recommend`, `models` and `probe`: what this machine can train, and a real check.

Only `probe` imports torch (it runs a real training step); the rest answer in well under a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import json
import shlex
from typing import Any

from tunewiz.engine import hints
from tunewiz.engine.config import catalog
from tunewiz.engine.errors import TunewizError
from tunewiz.engine.planning import hardware
from tunewiz.engine.planning.estimator import CUDA_CONTEXT_BYTES, GIB
from tunewiz.engine.render import memory, method_name

SUGGESTED_DATA = "ultrachat"
"""The data `recommend` suggests training a GPU's choice on when none is named: a general chat assistant, 2048
tokens long."""

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "datasets", "textual",
             "nvidia-ml-py")


def add_commands(sub: Any) -> None:
    """Register the commands on the top-level subparsers."""
    p = sub.add_parser("doctor", help="check the GPU, drivers and libraries, and say how to fix problems")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("recommend", help="which model and method fit this GPU (or another: --vram)")
    p.add_argument("--data", metavar="DATASET", help="the catalog dataset you will train on: estimates use its "
                                                      f"sequence length and the suggested command trains on it "
                                                      f"(default {SUGGESTED_DATA})")
    p.add_argument("--seq-len", type=int, help="longest training sequence in tokens (default: the dataset's)")
    p.add_argument("--vram", type=float, metavar="GIB", help="advise for a GPU with this much free memory, in GiB "
                                                             "(a '24 GB' card has 24 GiB)")
    p.add_argument("--gpus", type=int, metavar="N", help="use at most N of this machine's GPUs (default: all "
                                                         "those of the best model; 1 for one GPU)")
    p.add_argument("--model", help="only this model (catalog name, hub id or local folder)")
    p.add_argument("--top", type=int, default=8, help="how many choices to show (default 8)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("models", help="list the model catalog")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("probe", help="run one real training step at full length on the GPU: measured peak "
                                     "memory next to the estimate")
    p.add_argument("preset", metavar="PRESET_OR_FILE")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_probe)


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def doctor_report() -> dict[str, Any]:
    """Hardware, library versions and problems (each with a fix)."""
    report = hardware.probe()
    versions = _versions()
    problems = [{"problem": w, "fix": ""} for w in report.warnings]
    for name in ("torch", "transformers", "peft", "accelerate"):
        if versions.get(name) is None:
            problems.append({"problem": f"{name} is not installed", "fix": "run `make run` (or pip install -e .)"})
    if not report.has_gpu:
        verdict = f"No GPU: tunewiz can train the bundled demo model on the CPU ({hints.command('train demo')})."
    else:
        best = max(report.gpus, key=lambda g: g.memory_free_bytes or 0)
        verdict = (f"Ready: {best.name} with {(best.memory_free_bytes or 0) / GIB:.1f} GiB free. "
                   "See `tunewiz recommend` for what fits.")
    return {"verdict": verdict, "hardware": report.to_dict(), "versions": versions, "problems": problems}


GPU_ONLY = {"liger-kernel": "only used on NVIDIA GPUs", "bitsandbytes": "for QLoRA, on NVIDIA GPUs only",
            "nvidia-ml-py": "reads NVIDIA GPUs"}
"""Libraries a machine without an NVIDIA GPU does not need, and why."""


def _missing(name: str, gpu: bool) -> str:
    """How `doctor` lists a library that is not installed."""
    return "MISSING" if gpu or name not in GPU_ONLY else f"not installed ({GPU_ONLY[name]}: not needed here)"


def cmd_doctor(args: argparse.Namespace) -> int:
    data = doctor_report()
    if args.json:
        print(json.dumps(data, indent=1, default=str))
        return 0
    hw = data["hardware"]
    print(f"tunewiz doctor\n\n{data['verdict']}\n")
    for gpu in hw.get("gpus", []):
        total = (gpu.get("memory_total_bytes") or 0) / GIB
        free = (gpu.get("memory_free_bytes") or 0) / GIB
        print(f"  GPU {gpu['index']}: {gpu['name']}  {free:.1f} of {total:.1f} GiB free  "
              f"compute {gpu.get('compute_capability')}  bf16 {'yes' if gpu.get('bf16_supported') else 'no'}")
    if hw.get("driver_version"):
        print(f"  driver {hw['driver_version']}, CUDA {hw.get('cuda_driver_version')}")
    ram = (hw.get("ram_total_bytes") or 0) / GIB
    disk = (hw.get("disk_free_bytes") or 0) / GIB
    print(f"  CPU cores {hw.get('cpu_count')}, RAM {ram:.1f} GiB, free disk {disk:.0f} GiB")
    gpu = bool(hw.get("gpus"))
    print("\nlibraries: " + ", ".join(f"{k} {v or _missing(k, gpu)}" for k, v in data["versions"].items()))
    if data["problems"]:
        print("\nto look at:")
        for item in data["problems"]:
            print(f"  - {item['problem']}" + (f"\n    fix: {item['fix']}" if item["fix"] else ""))
    else:
        print("\nno problems found")
    return 0


OFFLOADED = "on+cpu"


def _checkpointing_cell(choice: Any) -> str:
    if not choice.gradient_checkpointing:
        return "off"
    return OFFLOADED if choice.offload_checkpoints else "on"


def _choice_dict(choice: Any) -> dict[str, Any]:
    data = {k: v for k, v in dataclasses.asdict(choice).items() if k != "estimate"}
    data["estimate"] = choice.estimate.breakdown()
    data["needed_bytes"] = choice.needed_bytes
    return data


def cmd_recommend(args: argparse.Namespace) -> int:
    from tunewiz.engine.planning import recommend as rec

    report = hardware.probe(check_libraries=False)
    vram = int(args.vram * GIB) if args.vram else None
    if args.gpus is not None and args.gpus < 1:
        raise TunewizError(f"--gpus {args.gpus}: a run needs at least one GPU", hint="Use --gpus 1 or more.")
    on_cpu = vram is None and not report.has_gpu
    data = args.data or ("demo" if on_cpu else SUGGESTED_DATA)  # the CPU trains the demo model on its data
    if data not in catalog.datasets():
        raise TunewizError(f"--data {data!r} is not a catalog dataset",
                           hint=f"use one of: {', '.join(catalog.datasets())} (`tunewiz data list`)")
    seq_len = args.seq_len or catalog.datasets()[data].max_seq_length
    objective = "dpo" if catalog.datasets()[data].format == "preference" else "sft"  # pairs: two sequences each
    if args.model:
        choices = [rec.choice_for(args.model, report, seq_len, vram, gpus=args.gpus, objective=objective)]
        summary = choices[0].reason
    else:
        result = rec.recommend(report, seq_len, vram, gpus=args.gpus, objective=objective)
        choices, summary = result.choices[: args.top], result.summary
    if args.json:
        print(json.dumps({"summary": summary, "choices": [_choice_dict(c) for c in choices]}, indent=1))
        return 0
    several = any(c.gpus > 1 for c in choices)
    print(summary + "\n")
    print(f"{'MODEL':<20} {'METHOD':<6} {'NEEDS':>8} {'FIT':<12} {'BATCH':>5} {'CKPT':<5}"
          + (" GPUS STRATEGY" if several else ""))
    for c in choices:
        print(f"{c.model:<20} {method_name(c.method):<6} {memory(c.needed_bytes):>8} {rec.FIT_WORDS[c.fit]:<12} "
              f"{f'{c.micro_batch_size}x{c.gradient_accumulation}':>5} {_checkpointing_cell(c):<5}"
              + (f" {c.gpus:>4} {c.strategy}" if several else ""))
    per = " per GPU" if several else ""
    print("\nNEEDS is RAM in GiB (a CPU run makes no CUDA context)." if on_cpu else
          f"\nNEEDS is GPU memory{per} in GiB, with {memory(CUDA_CONTEXT_BYTES)} for the CUDA context.")
    if any(c.offload_checkpoints for c in choices):
        print(f"CKPT {OFFLOADED}: checkpointing on, the checkpointed layers' inputs in CPU memory "
              "(speed.offload_checkpoints).")
    if choices:
        print(rec.batch_words(choices[0]) + (" On several GPUs each runs its share of the steps." if several else ""))
        command = " ".join([hints.command("train demo"),
                            *(f"--set {shlex.quote(o)}" for o in choices[0].train_overrides(data))])
        print(f"\nTrain the first one on {data}:\n  {command}")
        if several:
            print("(--gpus 1 advises for one GPU)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    entries = catalog.models()
    if args.json:
        print(json.dumps([dataclasses.asdict(e) for e in entries.values()], indent=1))
        return 0
    for e in entries.values():
        gated = " (gated: accept its licence on the hub and log in first)" if e.gated else ""
        print(f"{e.name:<20} {e.params / 1e9:>6.2f}B  {e.license:<14} {e.description}{gated}")
        if e.source_note():
            print(f"{'':<37}{e.source_note()}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from tunewiz.engine.config import presets
    from tunewiz.engine.training.probe_step import probe_step

    spec, _ = presets.resolve(args.preset, args.set or [])
    result = probe_step(spec)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"one training step of {spec.model.name} ({spec.method}), micro-batch {spec.training.micro_batch_size} "
          f"x {spec.training.max_seq_length} tokens, checkpointing "
          f"{'on' if spec.training.gradient_checkpointing else 'off'}, on {result['gpu']}:")
    print(f"  measured peak {result['measured_reserved_bytes'] / GIB:.2f} GiB reserved by torch "
          f"({result['measured_allocated_bytes'] / GIB:.2f} GiB allocated)")
    print(f"  estimated     {result['estimate']['total'] / GIB:.2f} GiB ({result['error']:+.1%})")
    print(f"  free on the GPU before the step: {result['free_bytes_before'] / GIB:.1f} GiB")
    return 0
