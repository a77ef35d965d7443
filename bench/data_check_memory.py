"""Peak memory of `tunewiz data check` on a large generated file (the checker must stream).

`python -m bench.data_check_memory [--mb 200] [--out bench/results/data_check_memory.txt]` writes a
jsonl file of chat examples of varied length (with a few broken lines and duplicates) to /tmp, runs
`python -m tunewiz.engine.cli.main data check FILE --json` on it as a child process with the bundled demo model,
and reports the child's peak resident memory (getrusage, cross-checked by sampling with psutil).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MB = 500
WORDS = ("the of and to in is for on that with as by at from it an be this are was have not or can will "
         "data model train token example answer question market price report growth risk customer order "
         "refund account invoice delivery court contract clause law proof number step because therefore").split()


def generate(path: Path, megabytes: int, seed: int = 0) -> int:
    """Write about `megabytes` MB of chat rows (1 in 5,000 broken or duplicated); return the row count."""
    rng = random.Random(seed)
    target, written, rows = megabytes * 1_000_000, 0, 0
    previous = ""
    with path.open("w", encoding="utf-8") as handle:
        while written < target:
            rows += 1
            if rows % 5000 == 0:
                line = previous if rows % 10000 == 0 else '{"messages": [{"role": "user", "content": "cut off'
            else:
                turns = []
                for _ in range(rng.choice((1, 1, 1, 2, 3))):
                    turns.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(10, 120)))})
                    turns.append({"role": "assistant",
                                  "content": " ".join(rng.choices(WORDS, k=rng.randint(5, 400)))})
                line = json.dumps({"messages": turns})
                previous = line
            handle.write(line + "\n")
            written += len(line) + 1
    return rows


def warm_up() -> None:
    """Convert the bundled demo model once here, so the measured child only loads its tokenizer."""
    from tunewiz.engine.config import catalog
    from tunewiz.engine.config.spec import RunSpec
    from tunewiz.engine.training import models

    spec = RunSpec(name="bench")
    spec.model.name = next(name for name, entry in catalog.models().items() if entry.bundled_gguf)
    models.converted_folder(models.resolve(spec))


def measure(path: Path) -> dict[str, object]:
    """Run the checker on `path` in a child process and return its peak RSS and what it reported."""
    command = [sys.executable, "-m", "tunewiz.engine.cli.main", "data", "check", str(path), "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampled_peak = 0
    watcher = psutil.Process(child.pid)
    while child.poll() is None:
        try:
            sampled_peak = max(sampled_peak, watcher.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    out, err = child.communicate()
    seconds = time.monotonic() - started
    if child.returncode not in (0, 1):
        raise SystemExit(f"data check failed ({child.returncode}):\n{err[-3000:]}")
    report = json.loads(out)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: kilobytes
    return {"peak_rss_mb": round(peak_kb / 1024, 1), "sampled_peak_rss_mb": round(sampled_peak / 2**20, 1),
            "seconds": round(seconds, 1), "rows": report["rows"], "examples": report["examples"],
            "problems": report["problem_counts"], "token_lengths": report["token_lengths"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the generated file in MB (default 200)")
    parser.add_argument("--file", type=Path, default=Path("/tmp/tunewiz-data-check-bench.jsonl"))
    parser.add_argument("--out", type=Path, help="also write the result here")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    args = parser.parse_args()
    warm_up()
    rows = generate(args.file, args.mb)
    size_mb = args.file.stat().st_size / 1e6
    try:
        result = measure(args.file)
    finally:
        if not args.keep:
            args.file.unlink(missing_ok=True)
    verdict = "PASS" if result["peak_rss_mb"] < LIMIT_MB else "FAIL"
    text = (f"tunewiz data check memory benchmark ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
            f"Python {platform.python_version()})\n"
            f"file: {size_mb:.0f} MB jsonl, {rows:,} rows (chat examples, 1 in 5,000 broken or duplicated)\n"
            f"model: smollm2-135m-demo tokenizer and chat template, max_seq_length 2048\n"
            f"peak RSS of the checker process: {result['peak_rss_mb']} MB (psutil sampling: "
            f"{result['sampled_peak_rss_mb']} MB); limit {LIMIT_MB} MB: {verdict}\n"
            f"wall time: {result['seconds']} s\n"
            f"report: {result['rows']:,} rows, {result['examples']:,} trainable, problems {result['problems']}, "
            f"token lengths {result['token_lengths']}\n")
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
