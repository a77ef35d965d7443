"""Training speed and memory: the engine's own step against a plain transformers + peft baseline.

On a GPU machine (one or more GPUs; cases run side by side, one per GPU):
    python -m bench.speed run --out bench/results/speed_h100.jsonl --tokenizer DIR [--suite all]
runs each case in its own process: `tunewiz train` (the real CLI and engine) for engine cases, and
bench/baseline.py for the baseline, on randomly initialised models shaped like Llama-3.2-1B and
Llama-3.1-8B (no download). Every sequence is exactly 2048 tokens, micro-batch 2, LoRA r=16 on all
seven projections. Each row holds tokens/s (median of the steps after the warm-up), MFU, peak
allocated and reserved GiB, the first step's loss and the whole loss curve. Then, anywhere:
    python -m bench.speed table bench/results/speed_h100.jsonl
prints the comparison tables (speed-up and memory against the baseline of the same case). Rows that
`.whl/vs-unsloth.sh` wrote in the same call (Unsloth's loop on the same random-init folder), labelled with
    python -m bench.speed label anchor.jsonl --machine LABEL --out bench/results/unsloth_anchor.jsonl
and given to `table` beside the engine's rows, add Unsloth columns to the rows of the same shape, method,
checkpointing, sequence, micro-batch and machine label.

Suites: `headline` (engine defaults and baseline, LoRA/QLoRA, checkpointing on/off, both shapes),
`levers` (each speed lever alone on top of the engine with every lever off), `curve` (a 50-step loss
curve of engine and baseline on the demo data), `packing` (variable-length data, padded vs packed),
`fused` (the engine with `speed.fused_lora` against its defaults and the baseline, and with
`speed.offload_checkpoints`, 8B; not in `all`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.calibrate_memory import WORDS, run_spec, write_long_texts
from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.config.catalog import models
from tunewiz.engine.planning import recommend
from tunewiz.engine.planning.estimator import ModelArch
from tunewiz.engine.planning.hardware import HardwareReport

SHAPES = ("llama-3.2-1b", "llama-3.1-8b")
# The shape names .whl/anchor.py (Unsloth's comparison loop) writes, as catalog models.
ANCHOR_SHAPES = {"1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "8b": "llama-3.1-8b"}
SEQ_LEN = 2048
MICRO_BATCH = 2
GIB = 1024**3
# Dense bf16 peak of each GPU (datasheets, without sparsity), for MFU.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12),
              ("L40S", 362e12), ("A10G", 125e12), ("RTX 4090", 165e12), ("L4", 121e12))
# The engine with every lever off, and each lever alone on top of that.
PLAIN = ("speed.fused_kernels=\"off\"", "speed.adapter_dtype=\"fp32\"", "training.optimizer=\"adamw_torch\"",
         "speed.lean_lora=false")
LEVERS = {
    "plain": (),
    "fused_loss": ("speed.fused_kernels=\"loss\"",),
    "fused_all": ("speed.fused_kernels=\"all\"",),
    "bf16_adapters": ("speed.adapter_dtype=\"bf16\"",),
    "lean_lora": ("speed.lean_lora=true",),
    "fused_adamw": ("training.optimizer=\"adamw_torch_fused\"",),
    "compile": ("speed.compile=true",),
}
# The suites' LoRA dropout: the engine's default until 2026-12-03 (now 0), kept so that rows stay comparable across
# sessions and the curve suite's noise floor (another draw of the masks) exists. The automatic choice's cases take
# the engine's defaults; the *_no_dropout variants set 0.
SUITE_DROPOUT = 0.05
# "engine_auto": the engine with the batch and checkpointing `tunewiz recommend` picks on a card of this much
# free memory (the "automatic choices on an 80 GB card").
AUTO_CARD_BYTES = 80 * 10**9
# The engine's defaults with one thing changed, and the baseline without LoRA dropout.
VARIANTS = {
    "engine_compile": ("speed.compile=true",),
    "engine_no_dropout": ("lora.dropout=0.0",),
    "engine_quarter_checkpointing": ("training.checkpoint_layers=8",),  # 8 of the 8B shape's 32 layers
    "engine_bf16_adapters": ("speed.adapter_dtype=\"bf16\"",),
    "engine_unfused": ("speed.fused_kernels=\"off\"",),
    "engine_no_lean": ("speed.lean_lora=false",),
    # Rows up to 2026-12-02's second session ran these with speed.fused_lora off by default, and each row's
    # settings say what it ran with. The fused blocks are the default since.
    "engine_fused_lora": ("speed.fused_lora=true",),
    "engine_fused_lora_no_dropout": ("speed.fused_lora=true", "lora.dropout=0.0"),
    "engine_fused_offload_no_dropout": ("speed.fused_lora=true", "speed.offload_checkpoints=true", "lora.dropout=0.0"),
    "engine_offload": ("speed.offload_checkpoints=true",),
    # each step read as it ends (before speed.lagged_logs): what the lag gains, and how this session's numbers
    # compare with earlier rows, which timed steps from their start on the host and left out the time between them
    "engine_fused_offload_sync_logs": ("speed.offload_checkpoints=true", "lora.dropout=0.0", "speed.lagged_logs=false"),
    "engine_fused_lora_sync_logs": ("lora.dropout=0.0", "speed.lagged_logs=false"),
    "engine_auto_fused": ("speed.fused_lora=true",),  # the automatic choice, with the fused blocks
    "engine_auto_no_dropout": ("lora.dropout=0.0",),  # the automatic choice at Unsloth's default dropout (now ours)
    "engine_auto_dropout": ("lora.dropout=0.05",),  # the automatic choice at the engine's dropout before 2026-12-03
    "engine_auto_fused_dropout": ("speed.fused_dropout=true", "lora.dropout=0.05"),  # ... its dropout in the kernels
    "engine_fused_dropout": ("speed.fused_dropout=true",),  # the suite's dropout (0.05) inside the kernels
    "engine_unfused_lora": ("speed.fused_lora=false",),  # the defaults before the fused blocks
    "engine_unfused_lora_no_dropout": ("speed.fused_lora=false", "lora.dropout=0.0"),
    "baseline_no_dropout": ("lora.dropout=0.0",),
}
# The same baseline run with other draws of its dropout masks (same init, same data order): the curves' noise
# floor is how far these draws lie from each other. Each variant's loop seed is the spec's seed + its number.
OTHER_DROPOUT_DRAWS = {"baseline_other_dropout": 1, **{f"baseline_other_dropout_{draw}": draw for draw in range(2, 8)}}
VARIANTS.update({variant: () for variant in OTHER_DROPOUT_DRAWS})


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured run."""

    suite: str
    shape: str
    method: str
    checkpointing: bool
    variant: str  # "baseline", "engine", a lever name, or "engine_compile"
    steps: int = 12
    warmup: int = 3
    data: str = "long"  # "long" (every example 2048 tokens), "demo" or "varied"
    micro_batch: int = MICRO_BATCH
    packing: bool = False
    learning_rate: float = 2e-4
    seq_len: int = SEQ_LEN

    @property
    def name(self) -> str:
        gc = "gc" if self.checkpointing else "nogc"
        extra = "-packed" if self.packing else ""
        if self.seq_len != SEQ_LEN:
            extra += f"-{self.seq_len}x{self.micro_batch}"
        return f"{self.suite}-{self.shape}-{self.method}-{gc}-{self.variant}{extra}"

    @property
    def is_baseline(self) -> bool:
        return self.variant.startswith("baseline")

    def overrides(self) -> tuple[str, ...]:
        if self.variant in ("baseline", "engine", "engine_auto"):
            return ()
        if self.variant in VARIANTS:
            return VARIANTS[self.variant]
        return PLAIN + LEVERS[self.variant]


def suite_cases(suite: str) -> list[Case]:
    if suite == "headline":
        return [Case("headline", shape, method, gc, variant) for shape in SHAPES for method in ("lora", "qlora")
                for gc in (True, False) for variant in ("baseline", "engine")] + [
            Case("headline", "llama-3.1-8b", "lora", False, "engine_auto", steps=6, warmup=2)]
    if suite == "levers":
        cases = [Case("levers", shape, "lora", True, lever, steps=20 if lever == "compile" else 12,
                      warmup=10 if lever == "compile" else 3) for shape in SHAPES for lever in LEVERS]
        cases += [Case("levers", "llama-3.1-8b", "qlora", True, lever) for lever in ("plain", "fused_all",
                                                                                      "bf16_adapters", "lean_lora")]
        cases += [Case("levers", shape, "lora", True, variant) for shape in SHAPES
                  for variant in ("engine_no_dropout", "baseline_no_dropout", "engine_no_lean")]
        cases.append(Case("levers", "llama-3.1-8b", "lora", True, "engine_quarter_checkpointing"))
        return cases + [Case("levers", shape, "lora", True, "engine_compile", steps=20, warmup=10) for shape in SHAPES]
    if suite == "curve":
        variants = ("baseline", "engine", "engine_bf16_adapters", "engine_unfused", "engine_no_lean",
                    "engine_fused_lora", "baseline_no_dropout", "engine_no_dropout", *OTHER_DROPOUT_DRAWS)
        return [Case("curve", "llama-3.2-1b", "lora", True, variant, steps=50, warmup=0, data="demo",
                     learning_rate=1e-4) for variant in variants]
    if suite == "fused":  # the fused LoRA blocks against the engine's defaults, the baseline and Unsloth, 8B;
        # the cases Unsloth's loop compares with (dropout 0) first, as a call's budget may end the list early
        shape = "llama-3.1-8b"
        return [Case("fused", shape, method, True, variant) for method in ("lora", "qlora")
                for variant in ("engine_fused_offload_no_dropout", "engine_fused_offload_sync_logs",
                                "engine_fused_lora_no_dropout")] + [
            Case("fused", shape, "lora", False, "engine_fused_lora_sync_logs"),
            Case("fused", shape, "lora", False, "engine_fused_lora_no_dropout"),
            Case("fused", shape, "lora", False, "engine_auto_fused", steps=6, warmup=2),
            Case("fused", shape, "lora", False, "engine_auto_no_dropout", steps=6, warmup=2),
            Case("fused", shape, "lora", False, "engine_auto_dropout", steps=6, warmup=2),
            Case("fused", shape, "lora", False, "engine_auto_fused_dropout", steps=6, warmup=2)] + [
            Case("fused", shape, method, True, "engine_fused_dropout") for method in ("lora", "qlora")] + [
            Case("fused", shape, method, True, variant) for method in ("lora", "qlora")
            for variant in ("engine_unfused_lora_no_dropout", "engine_no_dropout", "engine_offload", "engine",
                            "engine_unfused_lora", "baseline")] + [
            Case("fused", shape, "lora", False, variant) for variant in ("engine", "engine_unfused_lora")] + [
            Case("fused", "llama-3.2-1b", method, True, "engine_fused_offload_no_dropout")
            for method in ("lora", "qlora")]
    if suite == "shapes":  # the other shapes, held to the 8B's ratios against Unsloth (dropout 0, as its
        # loop): 1B and 3B at 2 x 2048, and the 8B at one sequence of 4096 (`SEQ=4096 BATCH=1` for vs-unsloth.sh)
        small = ("llama-3.2-1b", "llama-3.2-3b")
        return ([Case("shapes", shape, method, True, "engine_fused_offload_no_dropout") for shape in small
                 for method in ("lora", "qlora")]
                + [Case("shapes", shape, "lora", False, "engine_fused_lora_no_dropout") for shape in small]
                + [Case("shapes", "llama-3.1-8b", method, checkpointing, variant, seq_len=4096, micro_batch=1)
                   for method, checkpointing, variant in (("lora", True, "engine_fused_offload_no_dropout"),
                                                          ("qlora", True, "engine_fused_offload_no_dropout"),
                                                          ("lora", False, "engine_fused_lora_no_dropout"))])
    if suite == "packing":  # padded against packed batches of variable-length examples
        return [Case("packing", shape, method, True, "engine", data="varied", micro_batch=8, packing=packed)
                for shape, method in (("llama-3.2-1b", "lora"), ("llama-3.1-8b", "lora"), ("llama-3.1-8b", "qlora"))
                for packed in (False, True)]
    raise SystemExit(f"unknown suite {suite!r}: headline, levers, curve, packing, fused, shapes or all")


def write_varied_texts(path: Path, rows: int = 400, seed: int = 0) -> Path:
    """Plain-text rows of log-uniform length (about 40 to 1,600 tokens), like instruction data."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            words = int(2 ** rng.uniform(5, 10.5))
            handle.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return path


def case_spec(case: Case, model_dir: Path, data: Path) -> spec_mod.RunSpec:
    spec = run_spec(model_dir, data, case.method, case.seq_len, case.checkpointing, case.steps, case.micro_batch)
    spec.name = case.name[:64]
    if case.data == "demo":
        spec.dataset = dataclasses.replace(spec.dataset, source=None, preset="demo", format="auto", eval_fraction=0.0)
    spec.training = dataclasses.replace(spec.training, packing=case.packing, learning_rate=case.learning_rate,
                                        save_every=10_000)
    if case.variant.startswith("engine_auto"):  # the engine's own defaults, as a user gets them
        choice = recommend.choice_for(str(model_dir), HardwareReport(), case.seq_len, AUTO_CARD_BYTES, gpus=1)
        spec = choice.apply(spec)
    else:
        spec.lora = dataclasses.replace(spec.lora, dropout=SUITE_DROPOUT)
    return spec_mod.apply_overrides(spec, list(case.overrides()))


def flops_per_token(arch: ModelArch, seq_len: int) -> float:
    """Model FLOPs of one LoRA training token: forward and input-gradient backward of every matmul
    (frozen weights get no weight gradient), plus causal attention (backward 2.5 x forward).
    Recomputation under checkpointing is not counted (MFU, not HFU); adapters are under 1%."""
    matmul_params = arch.linear_params + arch.vocab * arch.hidden
    attention_forward = 2 * seq_len * arch.q_dim * arch.layers  # QK^T and AV, halved by the causal mask
    return 4 * matmul_params + 3.5 * attention_forward


def peak_flops(gpu: str) -> float | None:
    return next((flops for name, flops in PEAK_FLOPS if name in gpu), None)


def _engine_result(run_dir: Path) -> dict[str, Any]:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["type"] == "step"]
    finished = next((e for e in reversed(events) if e["type"] == "finished"), {})
    error = next((e for e in events if e["type"] == "error"), None)
    if finished.get("status") != "completed":
        message = error["message"] if error else "no finished event"
        return {"status": "oom" if error and "out of memory" in message.lower() else "failed", "error": message[:400]}
    metrics = finished.get("metrics", {})
    seconds = [0.0] * len(steps)
    tokens = [0] * len(steps)
    for index, event in enumerate(steps):
        previous = steps[index - 1]["tokens_seen"] if index else 0
        tokens[index] = event["tokens_seen"] - previous
        seconds[index] = tokens[index] / event["tokens_per_s"] if event.get("tokens_per_s") else 0.0
    return {"status": "completed", "losses": [e["loss"] for e in steps], "step_seconds": seconds,
            "tokens_per_step": tokens, "peak_allocated_bytes": metrics.get("peak_allocated_bytes"),
            "peak_reserved_bytes": metrics.get("peak_reserved_bytes")}


def measure(case: Case, work: Path, model_dir: Path, data: Path, gpu: str) -> dict[str, Any]:
    """Run one case on CUDA device `gpu` in a fresh process; return its row."""
    home = work / "homes" / case.name
    home.mkdir(parents=True, exist_ok=True)
    spec = case_spec(case, model_dir, data)
    spec_path = home / "spec.toml"
    spec_mod.save(spec, spec_path)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "TUNEWIZ_HOME": str(home)}
    started = time.time()
    if case.is_baseline:
        result_path = home / "baseline.json"
        draw = OTHER_DROPOUT_DRAWS.get(case.variant)
        reseed = ["--dropout-seed", str(spec.training.seed + draw)] if draw else []
        done = subprocess.run([sys.executable, "-m", "bench.baseline", str(spec_path), str(result_path), *reseed],
                              env=env, capture_output=True, text=True, timeout=900)
        if done.returncode:
            tail = done.stderr[-600:]
            result = {"status": "oom" if "out of memory" in tail.lower() else "failed", "error": tail}
        else:
            result = {"status": "completed", **json.loads(result_path.read_text())}
    else:
        subprocess.run([sys.executable, "-m", "tunewiz.engine", "train", str(spec_path)], env=env, capture_output=True,
                       text=True, timeout=900)
        runs = sorted((home / "state" / "runs").iterdir()) if (home / "state" / "runs").exists() else []
        result = _engine_result(runs[-1]) if runs else {"status": "failed", "error": "no run directory"}
    return summarise(case, result, time.time() - started, spec)


def settings_of(case: Case, spec: spec_mod.RunSpec) -> dict[str, Any]:
    """What the case ran with, so a results file still reads right after the engine's defaults change."""
    if case.is_baseline:
        return {"stack": "transformers+peft", "lora_dropout": spec.lora.dropout}
    return {"fused_kernels": spec.speed.fused_kernels, "adapter_dtype": spec.speed.adapter_dtype,
            "optimizer": spec.training.optimizer, "lora_dropout": spec.lora.dropout, "compile": spec.speed.compile,
            "lean_lora": spec.speed.lean_lora, "fused_lora": spec.speed.fused_lora,
            "offload_checkpoints": spec.speed.offload_checkpoints,
            "micro_batch": spec.training.micro_batch_size,
            "gradient_accumulation": spec.training.gradient_accumulation,
            "checkpointing": spec.training.gradient_checkpointing, "checkpoint_layers": spec.training.checkpoint_layers}


def summarise(case: Case, result: dict[str, Any], wall_s: float, spec: spec_mod.RunSpec) -> dict[str, Any]:
    row: dict[str, Any] = {**dataclasses.asdict(case), "name": case.name, "r": 16,
                           "wall_s": round(wall_s, 1), "status": result["status"], "settings": settings_of(case, spec)}
    if result["status"] != "completed":
        return {**row, "error": result.get("error", "")}
    timed = [(t, s) for t, s in zip(result["tokens_per_step"][case.warmup:], result["step_seconds"][case.warmup:])
             if s > 0]
    tokens_per_s = statistics.median(t / s for t, s in timed) if timed else None
    arch = ModelArch.from_entry(models()[case.shape])
    gpu = result.get("gpu") or os.environ.get("BENCH_GPU_NAME", "")
    peak = peak_flops(gpu)
    losses = result["losses"]
    mfu = tokens_per_s * flops_per_token(arch, case.seq_len) / peak if peak and tokens_per_s else None
    return {**row, "gpu": gpu, "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
            "mfu": round(mfu, 4) if mfu else None,
            "peak_allocated_gib": round((result["peak_allocated_bytes"] or 0) / GIB, 3),
            "peak_reserved_gib": round((result["peak_reserved_bytes"] or 0) / GIB, 3),
            "first_loss": losses[0] if losses else None, "losses": [round(x, 4) for x in losses]}


def prepare(work: Path, tokenizer: Path, gpus: list[str], shapes: list[str]) -> dict[str, Path]:
    """Random-init model folders (made side by side, one per GPU) and the data files."""
    work.mkdir(parents=True, exist_ok=True)
    write_long_texts(work / "long.jsonl")
    write_varied_texts(work / "varied.jsonl")
    folders = {shape: work / shape for shape in shapes}
    makers = [subprocess.Popen([sys.executable, "-m", "bench.random_model", shape, str(folder), "--tokenizer",
                                str(tokenizer)], env={**os.environ, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]})
              for i, (shape, folder) in enumerate(folders.items())]
    for maker in makers:
        if maker.wait():
            raise SystemExit("making a random-init model failed")
    return folders


def gpu_name(index: str) -> str:
    done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", index],
                          capture_output=True, text=True)
    return done.stdout.strip()


def cmd_run(args: argparse.Namespace) -> None:
    suites = ["headline", "levers", "curve", "packing"] if args.suite == ["all"] else args.suite
    cases = [case for suite in suites for case in suite_cases(suite)]
    if args.only:
        cases = [case for case in cases if case.name in args.only
                 or (not args.exact and any(part in case.name for part in args.only))]
    work = Path(args.work)
    gpus = args.gpus.split(",")
    folders = prepare(work, Path(args.tokenizer), gpus, sorted({case.shape for case in cases}))
    data = {"long": work / "long.jsonl", "varied": work / "varied.jsonl", "demo": work / "long.jsonl"}
    # Longest first, so the GPUs finish together.
    pending: queue.Queue[Case] = queue.Queue()
    order = ((lambda c: args.only.index(c.name)) if args.exact  # the order asked for, most wanted first
             else (lambda c: (c.shape != "llama-3.1-8b", -c.steps)))
    for case in sorted(cases, key=order):
        pending.put(case)
    lock = threading.Lock()
    deadline = time.monotonic() + args.budget_s
    # Cases are compared only within one machine: the same GPU model on another host (another CPU,
    # clocks, neighbours) moved the engine's tokens/s by up to 25%.
    machine = args.machine or socket.gethostname()

    def worker(gpu: str) -> None:
        os.environ["BENCH_GPU_NAME"] = gpu_name(gpu)
        while time.monotonic() < deadline:
            try:
                case = pending.get_nowait()
            except queue.Empty:
                return
            row = measure(case, work, folders[case.shape], data[case.data], gpu)
            row["gpu"] = row.get("gpu") or gpu_name(gpu)
            row["machine"] = machine
            with lock:
                print(f"{case.name:<58} {row['status']:<9} {row.get('tokens_per_s')!s:>9} tok/s "
                      f"{row.get('peak_reserved_gib')!s:>7} GiB  loss {row.get('first_loss')}  {row['wall_s']} s",
                      flush=True)
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")

    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in gpus]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if not pending.empty():
        print(f"budget of {args.budget_s} s spent; {pending.qsize()} cases not run", flush=True)


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value and reference else ""


def _table_row(r: dict[str, Any], ref: dict[str, Any] | None,
               unsloth: dict[str, Any] | None = None, with_unsloth: bool = False) -> str:
    done = r["status"] == "completed"
    ref = ref if done and ref else {}
    cells = ([r["tokens_per_s"], f"{r['mfu']:.1%}" if r.get("mfu") else "", r["peak_allocated_gib"],
              r["peak_reserved_gib"], f"{r['first_loss']:.4f}"] if done else [r["status"], "", "", "", ""])
    cells += [_ratio(r.get("tokens_per_s"), ref.get("tokens_per_s")),
              _ratio(r.get("peak_reserved_gib"), ref.get("peak_reserved_gib"))]
    if with_unsloth:
        other = unsloth if done and unsloth else {}
        cells += [other.get("tokens_per_s", ""), other.get("peak_reserved_gib", ""),
                  _ratio(r.get("tokens_per_s"), other.get("tokens_per_s")),
                  _ratio(r.get("peak_reserved_gib"), other.get("peak_reserved_gib"))]
    seq_len = r.get("seq_len", SEQ_LEN)
    length = "" if seq_len == SEQ_LEN else f" ({seq_len} x {r.get('micro_batch', MICRO_BATCH)})"
    head = [r["shape"], r["method"], "on" if r["checkpointing"] else "off", r["variant"] + length]
    return "| " + " | ".join(str(c) for c in head + cells) + " |"


def unsloth_key(row: dict[str, Any]) -> tuple[Any, ...] | None:
    """(shape, method, checkpointing, sequence, micro-batch, machine) of a row of Unsloth's loop
    (.whl/anchor.py: stacks `unsloth` and `unsloth-nogc`), or None for any other row."""
    stack = str(row.get("stack", ""))
    if not stack.startswith("unsloth") or row.get("shape") not in ANCHOR_SHAPES:
        return None
    return (ANCHOR_SHAPES[row["shape"]], row["method"], not stack.endswith("-nogc"), row["seq"], row["batch"],
            row.get("machine"))


def engine_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """The same key for a bench.speed row; the automatic choice is held against Unsloth's default
    (checkpointing on), as the issue's target reads."""
    checkpointing = True if row["variant"].startswith("engine_auto") else row["checkpointing"]
    micro_batch = (row.get("settings") or {}).get("micro_batch", row.get("micro_batch", MICRO_BATCH))
    return row["shape"], row["method"], checkpointing, row.get("seq_len", SEQ_LEN), micro_batch, row.get("machine")


def label(rows: list[dict[str, Any]], machine: str) -> list[dict[str, Any]]:
    """`rows` with the machine label that `run --machine` gave the engine's rows of the same call."""
    return [{**row, "machine": machine} for row in rows]


def _packing_summary(packing: dict[bool, dict[str, Any]]) -> str:
    padded, packed = packing[False], packing[True]
    return (f"Packing, {padded['shape']} {padded['method']} ({padded.get('machine') or 'earlier sessions'}; "
            f"variable-length data, micro-batch 8): {padded['tokens_per_s']} real tokens/s padded, "
            f"{packed['tokens_per_s']} packed ({_ratio(packed['tokens_per_s'], padded['tokens_per_s'])}); "
            f"peak reserved {padded['peak_reserved_gib']} vs {packed['peak_reserved_gib']} GiB.")


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown tables, one per suite and machine session: each case against the baseline (or the plain
    engine) of the same suite, settings, card and session."""
    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return row["suite"], row["shape"], row["method"], row["checkpointing"], row.get("gpu"), row.get("machine")

    def reference_key(row: dict[str, Any]) -> tuple[Any, ...]:
        """The automatic choice is held against the baseline as the issue defines it: checkpointing on."""
        return (*key(row)[:3], True, *key(row)[4:]) if row["variant"].startswith("engine_auto") else key(row)

    def references(variant: str) -> dict[tuple[Any, ...], dict[str, Any]]:
        return {key(r): r for r in rows if r["variant"] == variant and r["status"] == "completed"}

    unsloth = {k: r for r in rows if (k := unsloth_key(r)) is not None}
    rows = [r for r in rows if "stack" not in r]  # Unsloth's rows serve as columns only
    baselines, no_dropout, plains = references("baseline"), references("baseline_no_dropout"), references("plain")
    out = [f"Sequence {SEQ_LEN}, micro-batch {MICRO_BATCH} unless a row's settings say otherwise, LoRA r=16 on all "
           "7 projections.", ""]
    if unsloth:
        out += ["Unsloth columns: Unsloth's loop (.whl/anchor.py: dropout 0, alpha = r) on the same random-init "
                "folder in the same call; compare it with the rows at dropout 0.", ""]
    sessions = list(dict.fromkeys(r.get("machine") for r in rows))
    for suite, reference in (("headline", baselines), ("fused", baselines), ("shapes", baselines),
                             ("levers", plains)):
        against = "plain engine (every lever off)" if suite == "levers" else "baseline"
        for session in sessions:
            chosen = [r for r in rows if r["suite"] == suite and r.get("machine") == session]
            if not chosen:
                continue
            gpus = ", ".join(sorted({r.get("gpu") or "?" for r in chosen}))
            with_unsloth = any(engine_key(r) in unsloth for r in chosen)
            extra = (" Unsloth tok/s | Unsloth reserved GiB | vs Unsloth | memory vs Unsloth |" if with_unsloth else "")
            out += [f"### {suite}: against the {against} ({session or 'earlier sessions'}; {gpus})", "",
                    "| shape | method | checkpointing | variant | tokens/s | MFU | peak alloc GiB | peak reserved GiB "
                    "| first loss | speed-up | memory |" + extra, "|---" * (15 if with_unsloth else 11) + "|"]
            out += [_table_row(r, (no_dropout if "no_dropout" in r["variant"] else reference).get(reference_key(r)),
                               unsloth.get(engine_key(r)), with_unsloth) for r in chosen]
            out.append("")
    for session in sessions:
        curve = {r["variant"]: r for r in rows
                 if r["suite"] == "curve" and r["status"] == "completed" and r.get("machine") == session}
        for variant in sorted(set(curve) - {"baseline", "baseline_no_dropout"}):
            reference = "baseline_no_dropout" if variant.endswith("no_dropout") else "baseline"
            if reference in curve:
                out += [f"{variant} against {reference} ({session or 'earlier sessions'}): "
                        + curve_summary(curve[reference]["losses"], curve[variant]["losses"]), ""]
    if noise := curve_noise(rows):
        out += [noise_summary(noise), ""]
    pairs: dict[tuple[Any, ...], dict[bool, dict[str, Any]]] = {}
    for r in rows:
        if r["suite"] == "packing" and r["status"] == "completed":
            pairs.setdefault((r.get("machine"), r["shape"], r["method"]), {})[r["packing"]] = r
    out += [_packing_summary(pair) for pair in pairs.values() if {True, False} <= pair.keys()]
    return "\n".join(out)


def curve_gap(baseline: list[float], engine: list[float], window: int = 5) -> float:
    """The largest relative gap between the two curves' `window`-step moving averages."""
    def smooth(values: list[float]) -> list[float]:
        return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]

    return max(abs(x - y) / abs(x) for x, y in zip(smooth(baseline), smooth(engine)))


def curve_gaps(rows: list[dict], variant: str, reference: str = "baseline") -> list[float]:
    """`curve_gap` of `variant` against `reference`, for each session that measured both."""
    sessions: dict[Any, dict[str, dict]] = {}
    for r in rows:
        if r["suite"] == "curve" and r["status"] == "completed":
            sessions.setdefault(r.get("machine"), {})[r["variant"]] = r
    return [curve_gap(s[reference]["losses"], s[variant]["losses"]) for s in sessions.values()
            if reference in s and variant in s]


@dataclasses.dataclass(frozen=True)
class CurveNoise:
    """The curves' noise floor and one variant measured against it."""

    floor: list[float]  # curve_gap between each pair of the baseline's dropout draws
    against: list[float]  # curve_gap between the variant and each draw
    baseline_spread: float  # the widest curve_gap between the baseline's own rows of different calls
    ranks: list[int]  # for each draw, the variant's place (1 = nearest) among the other draws and itself

    @property
    def within(self) -> bool:
        return max(self.against) <= max(self.floor)

    @property
    def typical_rank(self) -> float:
        """The mean place one more draw would take: the middle of the draws' count (the variant included)."""
        return (len(self.ranks) + 1) / 2


def curve_noise(rows: list[dict], variant: str = "engine") -> CurveNoise | None:
    """`variant`'s latest curve against the latest curve of each draw of the baseline's dropout masks (the
    baseline is draw 0), all on the variant's GPU. One gap against the baseline is one sample of the floor; the
    pairs of draws give many. Pooling draws of different calls holds only while the baseline repeats itself
    from call to call, which `baseline_spread` shows."""
    curves = [r for r in rows if r["suite"] == "curve" and r["status"] == "completed"]
    measured = [r for r in curves if r["variant"] == variant]
    if not measured:
        return None
    gpu = measured[-1].get("gpu")
    draws = {r["variant"]: r["losses"] for r in curves if r.get("gpu") == gpu
             and (r["variant"] == "baseline" or r["variant"] in OTHER_DROPOUT_DRAWS)}
    if len(draws) < 2:
        return None
    baselines = [r["losses"] for r in curves if r.get("gpu") == gpu and r["variant"] == "baseline"]
    curves_of_draws = list(draws.values())
    against = [curve_gap(draw, measured[-1]["losses"]) for draw in curves_of_draws]
    ranks = [1 + sum(curve_gap(draw, other) < gap for other in curves_of_draws if other is not draw)
             for draw, gap in zip(curves_of_draws, against)]
    return CurveNoise(
        floor=[curve_gap(a, b) for i, a in enumerate(curves_of_draws) for b in curves_of_draws[i + 1:]],
        against=against, baseline_spread=max(curve_gap(baselines[0], other) for other in baselines), ranks=ranks)


def noise_summary(noise: CurveNoise, variant: str = "engine") -> str:
    draws = len(noise.against)
    return (f"Noise floor: {draws} draws of the baseline's dropout masks (same init and data order; the baseline's "
            f"own rows of different calls agree to {noise.baseline_spread:.2%}) lie {min(noise.floor):.2%} to "
            f"{max(noise.floor):.2%} apart ({len(noise.floor)} pairs, median {statistics.median(noise.floor):.2%}). "
            f"{variant} against each draw: {min(noise.against):.2%} to {max(noise.against):.2%} (median "
            f"{statistics.median(noise.against):.2%}): {'within' if noise.within else 'outside'} the floor. Its "
            f"place among each draw's neighbours: {statistics.fmean(noise.ranks):.1f} of {draws} on average "
            f"(one more draw: {noise.typical_rank:.1f}).")


def curve_summary(baseline: list[float], engine: list[float], window: int = 5) -> str:
    """How far apart two loss curves are: first step, and the worst gap of their moving averages."""
    worst = curve_gap(baseline, engine, window)
    steps = min(len(baseline), len(engine))
    return (f"Loss curve over {steps} steps: first step {baseline[0]:.4f} (baseline) vs "
            f"{engine[0]:.4f} (engine), difference {abs(baseline[0] - engine[0]):.4f}; last step {baseline[-1]:.4f} vs "
            f"{engine[-1]:.4f}; largest gap of the {window}-step moving averages {worst:.2%}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure on this machine's GPUs")
    run.add_argument("--out", required=True)
    run.add_argument("--tokenizer", required=True, help="folder with tokenizer files for the random models")
    run.add_argument("--work", default="/tmp/tunewiz-speed")
    run.add_argument("--gpus", default="0", help="comma-separated CUDA indices; cases run side by side")
    run.add_argument("--suite", nargs="+", default=["all"])
    run.add_argument("--only", nargs="*", help="run only cases whose name contains one of these")
    run.add_argument("--exact", action="store_true", help="--only names whole case names")
    run.add_argument("--budget-s", type=float, default=540, help="start no case after this many seconds")
    run.add_argument("--machine", help="label of this call's rows (default: the host name)")
    show = sub.add_parser("table", help="print the comparison tables")
    show.add_argument("rows", type=Path, nargs="+", help="bench.speed rows, and Unsloth's (labelled) if any")
    tag = sub.add_parser("label", help="append Unsloth's rows (.whl/vs-unsloth.sh) with this call's machine label")
    tag.add_argument("rows", type=Path)
    tag.add_argument("--machine", required=True)
    tag.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "run":
        cmd_run(args)
    elif args.command == "label":
        with args.out.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in label(load(args.rows), args.machine))
    else:
        print(table([row for path in args.rows for row in load(path)]))


if __name__ == "__main__":
    main()
