"""DPO on a CUDA GPU: LoRA and QLoRA through the real CLI on a randomly initialised 1B Llama shape, on the
`concise` preference pairs, for 24 steps; the peak memory is recorded against the estimator's number.
Skipped without a GPU (CI). Set TUNEWIZ_GPU_RESULTS=path.jsonl to record each run's numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.runtools import train_through_cli
from tunewiz.engine.planning import recommend

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 24
MICRO_BATCH = 8
SEQ_LEN = 512  # the pairs are shorter (up to ~120 tokens): the estimate is made for the data's longest pair


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_dpo_on_a_1b_shape(method: str, tokenizer_dir: Path, model_root: Path) -> None:  # noqa: F811
    from bench.random_model import make

    shape = "llama-3.2-1b"
    model_dir = make(shape, model_root / shape, tokenizer_dir)
    run, stream = train_through_cli("concise", f"gpu-dpo-{method}", [
        f"model.name={model_dir}", f"method={method}", f"training.max_steps={STEPS}",
        f"training.micro_batch_size={MICRO_BATCH}", "training.gradient_accumulation=1",
        f"training.max_seq_length={SEQ_LEN}", "training.learning_rate=0.0001", "training.sample_every=12",
        "training.eval_every=12", "training.sample_max_new_tokens=16"])
    assert sum(e["type"] == "step" for e in stream) == STEPS and stream[-1]["status"] == "completed"
    margins = [e["margin"] for e in stream if e["type"] == "preference" and e["split"] == "train"]
    assert len(margins) == STEPS and margins[-1] > margins[0]
    data = next(e["stats"] for e in stream if e["type"] == "phase" and "train_examples" in e.get("stats", {}))
    card = json.loads((run.output_dir() / "run_card.json").read_text())
    peak = card["metrics"]["peak_reserved_bytes"]
    estimate = recommend.estimate_spec(run.load_spec(), on_gpu=True, longest=data["token_lengths"]["max"])
    record: dict[str, Any] = {
        "objective": "dpo", "shape": shape, "method": method, "steps": STEPS, "micro_batch": MICRO_BATCH,
        "longest_pair_tokens": data["token_lengths"]["max"], "gpu": torch.cuda.get_device_name(0),
        "first_margin": margins[0], "last_margin": margins[-1],
        "peak_allocated_gib": round(card["metrics"]["peak_allocated_bytes"] / 2**30, 3),
        "peak_reserved_gib": round(peak / 2**30, 3), "estimate_gib": round(estimate.total / 2**30, 3),
        "estimate": {k: round(v / 2**30, 3) for k, v in estimate.breakdown().items()},
    }
    print(json.dumps(record))
    results = os.environ.get("TUNEWIZ_GPU_RESULTS")
    if results:
        with open(results, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    assert peak <= estimate.total * 1.15, record  # an estimate far below the real peak would let runs OOM
