"""Several GPUs of one host: scaling of the same spec on 1 and N GPUs, and stop/resume on N GPUs.

On a machine with two or more GPUs, once the random-init models and long.jsonl exist in WORK
(`python -m bench.speed run` makes them, or bench.random_model and bench.calibrate_memory):
    python -m bench.multi_gpu scaling --out rows.jsonl --work WORK --gpus 1
    python -m bench.multi_gpu scaling --out rows.jsonl --work WORK --gpus 2
runs `tunewiz train` (the real CLI, engine and launcher) for LoRA and QLoRA on the Llama-3.1-8B shape,
sequence 2048, micro-batch 2 per GPU, on one GPU and on N (the N-GPU run goes through the engine's
supervisor and `accelerate launch`), and writes tokens/s and peak memory per GPU;
`python -m bench.multi_gpu table rows.jsonl` adds the scaling efficiency.
    python -m bench.multi_gpu stop-resume --out rows.jsonl --work /tmp/tunewiz-speed [--gpus 2]
starts an N-GPU run detached, asks it to stop once it has made some steps (`tunewiz stop`), checks
that it ended `cancelled` with a checkpoint, resumes it on N GPUs (`tunewiz resume`) and checks that
the step count continues from the checkpoint to the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.calibrate_memory import run_spec
from tunewiz.engine.config import spec as spec_mod

GIB = 1024**3


def _cli(*args: str, home: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunewiz.engine", *args],
                          env={**os.environ, "TUNEWIZ_HOME": str(home)}, capture_output=True, text=True,
                          timeout=timeout)


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def _only_run(home: Path) -> Path:
    (run_dir,) = sorted((home / "state" / "runs").iterdir())
    return run_dir


def _spec(work: Path, method: str, gpus: int, steps: int, shape: str, overrides: list[str] | None = None) -> Path:
    spec = run_spec(work / shape, work / "long.jsonl", method, 2048, True, steps, 2)
    spec = spec_mod.apply_overrides(spec, overrides or [])
    spec.name = f"ddp-{shape}-{method}-{gpus}gpu"
    spec.training.gpus = gpus
    path = work / f"{spec.name}.toml"
    spec_mod.save(spec, path)
    return path


def _summary(run_dir: Path, gpus: int, warmup: int = 3) -> dict[str, Any]:
    events = _events(run_dir)
    steps = [e for e in events if e["type"] == "step"]
    finished = next((e for e in reversed(events) if e["type"] == "finished"), {})
    errors = [e["message"][:300] for e in events if e["type"] == "error"]
    metrics = finished.get("metrics", {})
    rates = [e["tokens_per_s"] for e in steps[warmup:] if e.get("tokens_per_s")]
    per_gpu = metrics.get("peak_reserved_bytes_per_gpu") or [metrics.get("peak_reserved_bytes") or 0]
    logs = [e["message"] for e in events if e["type"] == "log" and "effective batch" in e["message"]]
    return {"gpus": gpus, "status": finished.get("status"), "errors": errors, "steps": len(steps),
            "tokens_per_s": round(statistics.median(rates), 1) if rates else None,
            "peak_reserved_gib_per_gpu": [round(b / GIB, 2) for b in per_gpu],
            "first_loss": steps[0]["loss"] if steps else None, "batch": logs[0] if logs else None}


def cmd_scaling(args: argparse.Namespace) -> None:
    """One run per method on `--gpus` GPUs (run it once with 1 and once with N; `table` compares them)."""
    work = Path(args.work)
    for method in args.methods:
        home = work / "homes" / f"ddp-{method}-{args.gpus}"
        spec_path = _spec(work, method, args.gpus, args.steps, args.shape, args.set)
        started = time.time()
        done = _cli("train", str(spec_path), home=home)
        row = {"bench": "scaling", "shape": args.shape, "method": method, **_summary(_only_run(home), args.gpus),
               "wall_s": round(time.time() - started, 1), "gpu": _gpu_name(), "overrides": args.set,
               "machine": socket.gethostname()}
        if done.returncode and not row["errors"]:
            row["errors"] = [done.stderr[-400:]]
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def _gpu_name() -> str:
    done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return done.stdout.splitlines()[0].strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def table(rows: list[dict[str, Any]]) -> str:
    """Tokens/s on 1 and N GPUs, scaling efficiency and peak memory per GPU; then the stop/resume check."""
    out = ["| machine | shape | method | steps | GPUs | tokens/s | scaling efficiency | peak reserved GiB per GPU |",
           "|---|---|---|---|---|---|---|---|"]
    # 1 and N GPUs are compared only within one machine session
    single = {(r["shape"], r["method"], r.get("machine")): r for r in rows
              if r.get("bench") == "scaling" and r["gpus"] == 1}
    for r in (r for r in rows if r.get("bench") == "scaling"):
        one = single.get((r["shape"], r["method"], r.get("machine")), {})
        efficiency = (f"{r['tokens_per_s'] / (r['gpus'] * one['tokens_per_s']):.0%}"
                      if r["gpus"] > 1 and r.get("tokens_per_s") and one.get("tokens_per_s") else "")
        out.append(f"| {r.get('machine') or 'earlier session'} | {r['shape']} | {r['method']} | {r['steps']} | "
                   f"{r['gpus']} | {r.get('tokens_per_s') or r.get('status')} | {efficiency} | "
                   f"{', '.join(str(g) for g in r['peak_reserved_gib_per_gpu'])} |")
    for r in (r for r in rows if r.get("bench") == "stop-resume"):
        out.append(f"\nStop/resume on {r['gpus']} GPUs: stopped `{r['stopped_status']}` at step {r['stopped_at']} "
                   f"(checkpoints {', '.join(r['checkpoints'])}); resumed steps {r['steps_after_resume']} ... "
                   f"{r['last_step']}, final `{r['final_status']}`.")
    return "\n".join(out)


def cmd_stop_resume(args: argparse.Namespace) -> None:
    work = Path(args.work)
    home = work / "homes" / "stop-resume"
    spec_path = _spec(work, "lora", args.gpus, 60, "llama-3.2-1b")
    started = _cli("train", str(spec_path), "--detach", home=home)
    run_dir = _only_run(home)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and sum(e["type"] == "step" for e in _events(run_dir)) < 8:
        time.sleep(1)
    stop = _cli("stop", run_dir.name, home=home)
    first = _events(run_dir)
    stopped = next((e for e in reversed(first) if e["type"] == "finished"), {})
    checkpoints = sorted(p.name for p in (run_dir / "output" / "checkpoints").glob("checkpoint-*"))
    resume = _cli("resume", run_dir.name, home=home)
    events = _events(run_dir)
    steps = [e["step"] for e in events if e["type"] == "step"]
    finals = [e for e in events if e["type"] == "finished"]
    row = {"bench": "stop-resume", "gpus": args.gpus, "detach_rc": started.returncode,
           "stop": stop.stdout.strip()[-200:],
           "stopped_status": stopped.get("status"), "stopped_at": stopped.get("step"), "checkpoints": checkpoints,
           "resume_rc": resume.returncode, "final_status": finals[-1].get("status") if finals else None,
           "steps_after_resume": steps[len([e for e in first if e["type"] == "step"]):][:5],
           "last_step": steps[-1] if steps else None,
           "errors": [e["message"][:300] for e in events if e["type"] == "error"]}
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("table")
    show.add_argument("rows", type=Path)
    for name in ("scaling", "stop-resume"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--work", default="/tmp/tunewiz-speed")
        p.add_argument("--gpus", type=int, default=2)
        if name == "scaling":
            p.add_argument("--methods", nargs="+", default=["lora", "qlora"])
            p.add_argument("--steps", type=int, default=24)
            p.add_argument("--shape", default="llama-3.1-8b")
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="a spec override for every run, recorded in the rows (repeatable)")
    args = parser.parse_args()
    if args.command == "table":
        print(table([json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]))
    else:
        (cmd_scaling if args.command == "scaling" else cmd_stop_resume)(args)


if __name__ == "__main__":
    main()
