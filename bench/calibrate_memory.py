"""Measure peak GPU memory of real engine runs, and fit the estimator's coefficients to them.

On a GPU machine:
    python -m bench.calibrate_memory run --out rows.jsonl --tokenizer DIR
runs `tunewiz train` (the real CLI and engine) for a few steps per configuration on randomly
initialised models shaped like catalog models, with every sequence exactly `seq_len` tokens long,
and appends one row per run: the settings, the GPU, torch's peak reserved/allocated memory and
NVML's used memory. Then, anywhere:
    python -m bench.calibrate_memory fit tests/data/memory_calibration.jsonl
fits engine/planning/estimator.py's COEFFICIENTS and prints each row's error.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.config.catalog import models
from tunewiz.engine.planning import estimator
from tunewiz.engine.planning.estimator import ModelArch, Settings

SHAPES = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")
WORDS = ("alpha", "river", "stone", "market", "signal", "garden", "vector", "planet", "copper", "window",
         "silver", "engine", "harbor", "forest", "pencil", "rocket", "meadow", "bridge", "candle", "shadow")


def write_long_texts(path: Path, rows: int = 64, words: int = 6000) -> Path:
    """Plain-text rows long enough that every example is cut at any tested max_seq_length."""
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return path


def run_spec(model_dir: Path, data: Path, method: str, seq_len: int, checkpointing: bool, steps: int,
             micro_batch: int) -> spec_mod.RunSpec:
    spec = spec_mod.RunSpec(name=f"calib-{method}-{seq_len}-{'gc' if checkpointing else 'nogc'}", method=method)
    spec.model.name = str(model_dir)
    spec.dataset = dataclasses.replace(spec.dataset, source=str(data), format="text", eval_fraction=0.0)
    spec.training = dataclasses.replace(
        spec.training, max_steps=steps, micro_batch_size=micro_batch, gradient_accumulation=1,
        max_seq_length=seq_len, gradient_checkpointing=checkpointing, sample_prompts=0, save_every=10_000,
        warmup_ratio=0.0)
    return spec


def measure(spec: spec_mod.RunSpec, work: Path) -> dict[str, Any]:
    """Run the engine on `spec` through the CLI; return its peak memory readings."""
    spec_path = work / f"{spec.name}.toml"
    spec_mod.save(spec, spec_path)
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "tunewiz.engine", "train", str(spec_path)], capture_output=True,
                            text=True, timeout=900)
    runs = sorted((Path(os.environ["TUNEWIZ_HOME"]) / "state" / "runs").iterdir())
    events = [json.loads(line) for line in (runs[-1] / "events.jsonl").read_text().splitlines()]
    gpu = [d for e in events if e["type"] == "gpu" for d in e["devices"][:1]]
    steps = [e for e in events if e["type"] == "step"]
    status = events[-1].get("status")
    if result.returncode != 0 or status != "completed" or not gpu:
        error = next((e for e in events if e["type"] == "error"), {})
        return {"status": status or "failed", "error": error.get("message", result.stderr[-500:])}
    return {"status": "completed", "gpu": gpu[0].get("name"),
            "torch_peak_reserved_bytes": max(d.get("torch_peak_reserved_bytes", 0) for d in gpu),
            "torch_peak_allocated_bytes": max(d.get("torch_peak_allocated_bytes", 0) for d in gpu),
            "nvml_used_bytes": max(d.get("mem_used_bytes") or 0 for d in gpu),
            "tokens_per_s": statistics.median([e["tokens_per_s"] for e in steps[1:] if e.get("tokens_per_s")] or [0]),
            "wall_s": round(time.time() - started, 1)}


def cmd_run(args: argparse.Namespace) -> None:
    from bench.random_model import make

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TUNEWIZ_HOME", str(work / "home"))
    data = write_long_texts(work / "long.jsonl")
    for shape in args.shapes:
        model_dir = make(shape, work / shape, Path(args.tokenizer))
        for method, seq_len, checkpointing in itertools.product(args.methods, args.seq, (True, False)):
            spec = run_spec(model_dir, data, method, seq_len, checkpointing, args.steps, args.micro_batch)
            reading = measure(spec, work)
            row = {"model": shape, "method": method, "r": spec.lora.r, "targets": "all-linear",
                   "lora_dropout": spec.lora.dropout, "micro_batch_size": args.micro_batch, "seq_len": seq_len,
                   "gradient_checkpointing": checkpointing, "optimizer": spec.training.optimizer,
                   "steps": args.steps, **reading}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")


def row_settings(row: dict[str, Any]) -> tuple[ModelArch, Settings]:
    arch = ModelArch.from_entry(models()[row["model"]])
    # Rows measured before the speed levers existed have neither key: fp32 adapters, no fused kernels.
    settings = Settings(method=row["method"], r=row["r"], micro_batch_size=row["micro_batch_size"],
                        seq_len=row["seq_len"], gradient_checkpointing=row["gradient_checkpointing"],
                        optimizer=row["optimizer"], lora_dropout=row["lora_dropout"] > 0,
                        fused_kernels=row.get("fused_kernels", "off"), adapter_bytes=row.get("adapter_bytes", 4),
                        offload_checkpoints=row.get("offload_checkpoints", False),
                        fused_lora=row.get("fused_lora", False))
    return arch, settings


def rows_from_speed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Calibration rows from bench/speed.py results: the engine's runs at full length (not the baseline's,
    which is another stack, nor compiled ones, whose memory torch.compile reshapes)."""
    out = []
    for row in rows:
        settings = row.get("settings", {})
        if row["status"] != "completed" or "stack" in settings or settings.get("compile") or row["data"] != "long":
            continue
        out.append({"model": row["shape"], "method": row["method"], "r": row["r"], "targets": "all-linear",
                    "lora_dropout": settings["lora_dropout"],
                    "micro_batch_size": settings.get("micro_batch", row["micro_batch"]),  # the automatic choice's
                    "seq_len": row["seq_len"], "gradient_checkpointing": settings.get("checkpointing",
                                                                                      row["checkpointing"]),
                    "optimizer": settings["optimizer"], "fused_kernels": settings["fused_kernels"],
                    "adapter_bytes": 2 if settings["adapter_dtype"] == "bf16" else 4, "steps": row["steps"],
                    "offload_checkpoints": settings.get("offload_checkpoints", False),
                    "fused_lora": settings.get("fused_lora", False),
                    "status": "completed", "gpu": row["gpu"], "source": f"bench/results/speed.jsonl: {row['name']}",
                    "torch_peak_reserved_bytes": int(row["peak_reserved_gib"] * 2**30),
                    "torch_peak_allocated_bytes": int(row["peak_allocated_gib"] * 2**30),
                    "tokens_per_s": row["tokens_per_s"]})
    return out


def load_rows(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("status") == "completed"]


def features(arch: ModelArch, settings: Settings) -> list[float]:
    """The estimator's terms before its coefficients: reserved = (1 + o) * (fixed + a * kept + b * checkpointed
    + c * logits + d * fused logits) + k, linear in (1 + o), (1 + o) * a, ... and k."""
    fixed = estimator.weight_bytes(arch, settings) + estimator.adapter_bytes(arch, settings)
    checkpointed, kept = estimator.activation_terms(arch, settings)
    logits = 0.0 if settings.chunked_logits else arch.vocab * settings.tokens
    fused_logits = arch.hidden * settings.tokens if settings.chunked_logits else 0.0
    return [fixed, kept, checkpointed, logits, fused_logits, 1.0]


def fit(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Least-squares fit of the free coefficients to measured peak reserved memory."""
    import numpy as np

    x = np.array([features(*row_settings(row)) for row in rows], dtype=float)
    y = np.array([row["torch_peak_reserved_bytes"] for row in rows], dtype=float)
    weights = 1.0 / y  # minimise relative error
    solution, *_ = np.linalg.lstsq(x * weights[:, None], y * weights, rcond=None)
    scale = solution[0]
    return {"overhead_fraction": round(scale - 1.0, 4),
            "activations_no_checkpointing": round(solution[1] / scale, 4),
            "activations_checkpointing": round(solution[2] / scale, 4),
            "logits_bytes_per_vocab_token": round(solution[3] / scale, 3),
            "fused_loss_bytes_per_hidden_token": round(solution[4] / scale, 3),
            "overhead_bytes": int(solution[5])}


def report(rows: list[dict[str, Any]]) -> float:
    """Print each row's estimate against its measurement; return the worst relative error."""
    worst = 0.0
    print(f"{'model':<14}{'method':<7}{'seq':>6}{'gc':>4}{'fused':>8}{'measured GiB':>14}{'estimate GiB':>14}"
          f"{'error':>8}")
    for row in rows:
        arch, settings = row_settings(row)
        est = estimator.estimate(arch, settings).total
        measured = row["torch_peak_reserved_bytes"]
        error = (est - measured) / measured
        worst = max(worst, abs(error))
        levers = f"{row.get('fused_kernels', 'off')}/{row.get('adapter_bytes', 4)}B"
        gc = "on" if row["gradient_checkpointing"] else "off"
        print(f"{row['model']:<14}{row['method']:<7}{row['seq_len']:>6}{gc:>4}{levers:>8}{measured / 2**30:>14.2f}"
              f"{est / 2**30:>14.2f}{error:>+8.1%}")
    print(f"worst error: {worst:.1%}")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure on this GPU")
    run.add_argument("--out", required=True)
    run.add_argument("--tokenizer", required=True)
    run.add_argument("--work", default="/tmp/tunewiz-calibration")
    run.add_argument("--shapes", nargs="+", default=list(SHAPES))
    run.add_argument("--methods", nargs="+", default=["lora", "qlora"])
    run.add_argument("--seq", nargs="+", type=int, default=[512, 2048])
    run.add_argument("--steps", type=int, default=3)
    run.add_argument("--micro-batch", type=int, default=2)
    fitting = sub.add_parser("fit", help="fit the estimator's coefficients and report errors")
    fitting.add_argument("rows", type=Path)
    convert = sub.add_parser("from-speed", help="print calibration rows from bench/speed.py results")
    convert.add_argument("rows", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        cmd_run(args)
    elif args.command == "from-speed":
        for row in rows_from_speed([json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]):
            print(json.dumps(row))
    else:
        rows = load_rows(args.rows)
        coefficients = fit(rows)
        print(json.dumps(coefficients, indent=1))
        estimator.COEFFICIENTS.update(coefficients)
        report(rows)


if __name__ == "__main__":
    main()
