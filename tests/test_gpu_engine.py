"""The real engine on a CUDA GPU: LoRA and QLoRA through the real CLI on randomly initialised
Llama-shaped models (the demo model's shape and a 1B shape). Skipped without a GPU (CI).

Set TUNEWIZ_GPU_RESULTS=path.jsonl to record each run's numbers (bench/results/ keeps them).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.runtools import train_through_cli
from tunewiz.engine.planning.recommend import estimate_spec
from tunewiz.engine.run import rundir

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 24
MEMORY_TOLERANCE = 0.10
"""How far the measured peak may be from the estimate on these small shapes (one H200, 2026-12-02: 0.2% to 4.6%
off, bench/results/engine_gpu_smoke_h200.jsonl); the calibration (±7%) is for 1B-8B runs at full length."""


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("shape", ["smollm2-135m-demo", "llama-3.2-1b"])
def test_train_on_gpu(shape: str, method: str, tokenizer_dir: Path, model_root: Path) -> None:
    from bench.random_model import make

    model_dir = make(shape, model_root / shape, tokenizer_dir)
    run, stream = train_through_cli("demo", f"gpu-{shape}-{method}", [
        f"model.name={model_dir}", f"method={method}", f"training.max_steps={STEPS}", "training.micro_batch_size=8",
        "training.gradient_accumulation=2", "training.gradient_checkpointing=true", "training.sample_every=12",
        "training.eval_every=12"])
    steps = [e for e in stream if e["type"] == "step"]
    assert len(steps) == STEPS and stream[-1]["status"] == "completed"
    assert [e for e in stream if e["type"] == "eval"], "no eval events"  # eval under the fused loss too
    gpu = [e for e in stream if e["type"] == "gpu" and e["devices"]]
    assert gpu, "no gpu events with devices"
    device = max((e["devices"][0] for e in gpu), key=lambda d: d.get("torch_peak_reserved_bytes", 0))
    assert device["mem_used_bytes"] > 0 and device["torch_peak_allocated_bytes"] > 0
    losses = [e["loss"] for e in steps]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < 0.8 * losses[0], f"the loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"
    data_stats = next(e["stats"] for e in stream if e["type"] == "phase" and e["phase"] == "prepare_data"
                      and e.get("stats"))
    estimated = estimate_spec(run.load_spec(), True, data_stats["token_lengths"]["max"]).total
    measured = device["torch_peak_reserved_bytes"]
    assert abs(measured / estimated - 1) < MEMORY_TOLERANCE, (
        f"peak reserved {measured / 2**30:.2f} GiB against an estimate of {estimated / 2**30:.2f} GiB")
    record: dict[str, Any] = {
        "shape": shape, "method": method, "steps": STEPS, "gpu": device.get("name"),
        "micro_batch": 8, "grad_accum": 2, "gradient_checkpointing": True,
        "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
        "median_tokens_per_s": sorted(e["tokens_per_s"] for e in steps[1:])[len(steps[1:]) // 2],
        "torch_peak_allocated_gib": round(device["torch_peak_allocated_bytes"] / 2**30, 3),
        "torch_peak_reserved_gib": round(device["torch_peak_reserved_bytes"] / 2**30, 3),
        "estimated_gib": round(estimated / 2**30, 3),
        "nvml_used_gib": round(max(e["devices"][0]["mem_used_bytes"] for e in gpu) / 2**30, 3),
        "gpu_events": len(gpu),
    }
    print(json.dumps(record))
    results = os.environ.get("TUNEWIZ_GPU_RESULTS")
    if results:
        with open(results, "a") as handle:
            handle.write(json.dumps(record) + "\n")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_through_the_supervisor(tokenizer_dir: Path, model_root: Path) -> None:
    from bench.random_model import make

    model_dir = make("smollm2-135m-demo", model_root / "smollm2-135m-demo", tokenizer_dir)
    result = subprocess.run(
        [PYTHON, "-m", "tunewiz.engine", "train", "demo", "--name", "gpu-ddp", "--set", f"model.name={model_dir}",
         "--set", "training.max_steps=10", "--set", "training.gpus=2", "--set", "training.eval_every=5"],
        capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=900)
    run = rundir.list_runs()[0]
    log = run.log_path.read_text(errors="replace")[-4000:] if run.log_path.exists() else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + log
    stream = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    kinds = [e["type"] for e in stream]
    assert kinds.count("started") == 1 and kinds.count("finished") == 1 and stream[-1]["status"] == "completed"
    assert [e["step"] for e in stream if e["type"] == "step"] == list(range(1, 11))
    assert max(len(e["devices"]) for e in stream if e["type"] == "gpu") >= 2  # every GPU of the run
    assert len(stream[-1]["metrics"]["peak_reserved_bytes_per_gpu"]) == 2
