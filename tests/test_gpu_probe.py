"""`tunewiz probe` on a CUDA GPU: one real step, measured peak next to the estimate. Skipped in CI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_probe_measures_close_to_the_estimate(method: str, tmp_path_factory: pytest.TempPathFactory,
                                              tokenizer_dir: Path) -> None:
    from bench.random_model import make

    model_dir = make("llama-3.2-1b", tmp_path_factory.getbasetemp() / "probe-1b", tokenizer_dir)
    result = subprocess.run(
        [PYTHON, "-m", "tunewiz.engine", "probe", "demo", "--json", "--set", f"model.name={model_dir}",
         "--set", f"method={method}", "--set", "training.max_seq_length=2048", "--set", "training.micro_batch_size=2",
         "--set", "training.gradient_checkpointing=true"],
        capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    print(json.dumps({k: v for k, v in data.items() if k != "estimate"}))
    assert data["measured_reserved_bytes"] > 0
    assert abs(data["error"]) < 0.15, data
