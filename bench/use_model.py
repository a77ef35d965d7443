"""After training on a GPU: chat, evaluation and export of LoRA and QLoRA runs, timed, through the real CLI.

    python -m bench.use_model --shape llama-3.2-1b --tokenizer DIR --work /tmp/tw-use --out results.jsonl

It writes a random-init model of the catalog shape (bench.random_model), trains it for a few steps with
LoRA and with QLoRA on the demo data (`tunewiz train`), then for each run: one chat answer and one
compare answer (`tunewiz chat --prompt`, first-token latency and tokens/s from its stats line), a
short `tunewiz eval`, and, for the LoRA run, GGUF exports (`tunewiz export --gguf`) with their time,
size and round-trip line. It also measures the CUDA context: what NVML sees the device
use once a process has made its first CUDA call, and after its first matrix product (cuBLAS' handle
and workspace), which the memory estimator adds to every GPU estimate. One JSON row per measurement goes to
--out; a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONTEXT_PROBE = """
import json, pynvml, torch
pynvml.nvmlInit()
handle = pynvml.nvmlDeviceGetHandleByIndex(0)
used = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
before = used()                      # no CUDA context in this process yet
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
context = used()                     # the driver's context, torch's kernels, one allocator block
a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
(a @ a).sum().item()
del a
torch.cuda.empty_cache()
cublas = used()                      # plus cuBLAS' handle and workspace
print(json.dumps({"context_bytes": context - before, "context_and_cublas_bytes": cublas - before,
                  "torch_reserved_after": torch.cuda.memory_reserved(), "gpu": torch.cuda.get_device_name(0),
                  "torch": torch.__version__, "cuda": torch.version.cuda}))
"""


def _tunewiz(*args: str, env: dict[str, str], timeout: float = 900, stdin: str | None = None
             ) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "tunewiz.engine", *args], capture_output=True, text=True, env=env,
                            timeout=timeout, input=stdin)
    return result, time.monotonic() - started


def _stats(text: str) -> dict[str, float | None]:
    first = re.search(r"first token ([\d.]+) s", text)
    rate = re.search(r"([\d.]+) tok/s", text)
    return {"first_token_s": float(first.group(1)) if first else None,
            "tokens_per_s": float(rate.group(1)) if rate else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tw-use"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gguf", default="f16 q8_0 q4_k_m", help="GGUF types to export, space-separated")
    args = parser.parse_args()

    from bench.random_model import make

    env = {**os.environ, "TUNEWIZ_HOME": str(args.work / "home"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    rows: list[dict[str, Any]] = []

    args.out.parent.mkdir(parents=True, exist_ok=True)

    def record(**row: Any) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        with args.out.open("a") as handle:  # row by row: a call cut short keeps what it measured
            handle.write(json.dumps({"shape": args.shape, **row}) + "\n")

    probe = subprocess.run([sys.executable, "-c", CONTEXT_PROBE], capture_output=True, text=True, env=env)
    if probe.returncode == 0:
        record(what="cuda_context", **json.loads(probe.stdout.strip().splitlines()[-1]))
    else:
        print(probe.stderr[-2000:], file=sys.stderr)

    folder = make(args.shape, args.work / args.shape, args.tokenizer)
    prompt = ("Headline: Quorvia Pharma wins approval for its new drug\nDoes this headline affect Quorvia Pharma "
              "positively or negatively? Answer with one word: positive or negative.")
    for method in ("lora", "qlora"):
        result, seconds = _tunewiz("train", "demo", "--name", f"use-{method}", "--set", f"method=\"{method}\"",
                                   "--set", f"model.name=\"{folder}\"", "--set", f"training.max_steps={args.steps}",
                                   "--set", "training.sample_every=1000", env=env)
        record(what="train", method=method, ok=result.returncode == 0, seconds=round(seconds, 1))
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-3000:], file=sys.stderr)
            continue
        run_id = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("run "))
        for mode in ("tuned", "compare"):
            extra = ["--compare"] if mode == "compare" else []
            chat, seconds = _tunewiz("chat", run_id, "--prompt", prompt, "--max-new-tokens", "64", *extra, env=env)
            lines = [line for line in chat.stdout.splitlines() if "first token" in line]
            record(what="chat", method=method, mode=mode, ok=chat.returncode == 0, seconds=round(seconds, 1),
                   answers=[_stats(line) for line in lines], error=chat.stderr[-500:] if chat.returncode else None)
        evaluation, seconds = _tunewiz("eval", run_id, "--limit", "10", "--json", env=env)
        summary = json.loads(evaluation.stdout) if evaluation.returncode == 0 else {}
        record(what="eval", method=method, ok=evaluation.returncode == 0, seconds=round(seconds, 1),
               base=summary.get("base"), tuned=summary.get("tuned"),
               error=evaluation.stderr[-500:] if evaluation.returncode else None)
        if method != "lora":
            continue
        for kind in args.gguf.split():
            export, seconds = _tunewiz("export", run_id, "--gguf", kind, "--verify-limit", "10", env=env, timeout=1800)
            files = sorted((args.work / "home").rglob(f"*{kind}*.gguf"))
            record(what="export_gguf", type=kind, ok=export.returncode == 0, seconds=round(seconds, 1),
                   bytes=files[-1].stat().st_size if files else None,
                   round_trip=[line for line in export.stdout.splitlines() if "answers" in line][-1:],
                   error=export.stderr[-800:] if export.returncode else None)
    print("\n| what | method/type | ok | seconds | detail |\n|---|---|---|---|---|")
    for row in rows:
        detail = {k: v for k, v in row.items() if k not in ("what", "method", "type", "ok", "seconds")}
        print(f"| {row['what']} | {row.get('method') or row.get('type') or ''} | {row.get('ok', '')} | "
              f"{row.get('seconds', '')} | {json.dumps(detail)[:160]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
