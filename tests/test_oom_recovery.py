"""Out-of-memory recovery (engine/training/oom.py, docs/alerts.md): the run goes on with half the micro-batch and
the same effective batch, from the last complete checkpoint, each attempt an `out_of_memory` alert; steps counted once.

On the CPU the out-of-memory error is injected (TUNEWIZ_INJECT_OOM, the engine's test seam); on a GPU
(`gpu` marker, run on the device) a micro-batch that cannot fit runs out of memory for real.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.faults.engine_runs import engine_life, of_type, tiny_run
from tunewiz.engine.config.spec import TrainingSpec
from tunewiz.engine.run import rundir
from tunewiz.engine.training.oom import INJECT_ENV, smaller_batch

torch = pytest.importorskip("torch")


def _card(run: rundir.RunDir) -> dict[str, Any]:
    return json.loads((run.output_dir(run.load_spec()) / "run_card.json").read_text())


def _last_per_step(stream: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {e["step"]: e for e in of_type(stream, "step")}


@pytest.mark.parametrize(("micro", "accumulation", "expected"), [(8, 2, (4, 4)), (6, 1, (3, 2)), (5, 3, (1, 15))])
def test_the_micro_batch_halves_and_the_effective_batch_stays(micro: int, accumulation: int,
                                                               expected: tuple[int, int]) -> None:
    training = TrainingSpec(micro_batch_size=micro, gradient_accumulation=accumulation, gradient_checkpointing=False,
                            checkpoint_layers=4)
    smaller = smaller_batch(training)
    assert smaller is not None
    assert (smaller.micro_batch_size, smaller.gradient_accumulation) == expected
    assert smaller.micro_batch_size * smaller.gradient_accumulation == micro * accumulation
    assert smaller.gradient_checkpointing and smaller.checkpoint_layers is None
    assert smaller_batch(TrainingSpec(micro_batch_size=1)) is None


@pytest.mark.slow
def test_an_injected_out_of_memory_error_is_recovered_twice_from_the_last_checkpoint() -> None:
    run = tiny_run("training.max_steps=3", "training.micro_batch_size=4", "training.gradient_accumulation=1",
                   "training.gradient_checkpointing=false")
    stream = engine_life(run, **{INJECT_ENV: "2x2"})  # step 2 runs out of memory on the first two attempts
    assert stream[-1]["type"] == "finished" and stream[-1]["status"] == "completed", stream[-3:]
    alerts = of_type(stream, "alert")
    assert [a["code"] for a in alerts] == ["out_of_memory", "out_of_memory"]
    settings = [(a["details"]["micro_batch_size"], a["details"]["gradient_accumulation"]) for a in alerts]
    assert settings == [(2, 2), (1, 4)]
    assert all(a["step"] == 2 and a["details"]["resumed_from_step"] == 1 for a in alerts)
    assert [a["details"]["attempt"] for a in alerts] == [1, 2] and "checkpoint-1" in alerts[0]["message"]
    # steps counted once: step 2 never finished before recovery, so each step is written once
    assert [e["step"] for e in of_type(stream, "step")] == [1, 2, 3]
    assert stream[-1]["step"] == 3 and stream[-1]["metrics"]["steps"] == 3
    assert stream[-1]["metrics"]["tokens_seen"] == of_type(stream, "step")[-1]["tokens_seen"]
    training = _card(run)["spec"]["training"]  # the settings that finally worked
    assert (training["micro_batch_size"], training["gradient_accumulation"]) == (1, 4)
    assert training["gradient_checkpointing"] is True
    assert run.load_spec().training.micro_batch_size == 4  # spec.toml keeps what was asked for


def test_without_recovery_the_error_goes_through_and_nothing_is_retried(tmp_path: Path) -> None:
    from tests.runtools import make_run
    from tunewiz.engine.run.context import EngineContext
    from tunewiz.engine.run.events import EventWriter
    from tunewiz.engine.training.oom import Recovery

    run = make_run()
    spec = run.load_spec()
    spec.training.oom_recovery = 0
    ctx = EngineContext(run, spec, EventWriter(run.events_path))
    built: list[Any] = []

    class Failing:
        def __init__(self) -> None:
            built.append(self)

        def train(self, resume_from_checkpoint: str | None) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        Recovery(ctx, spec, None, lambda: None, single_process=True).train(lambda s: Failing(), None)
    assert len(built) == 1 and not run.events_path.read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_micro_batch_that_cannot_fit_is_recovered_on_the_gpu(tokenizer_dir: Path, model_root: Path) -> None:
    """The test holds all but 2.5 GiB of the GPU, so a micro-batch of 128 cannot fit a random-init model of the
    demo's shape without checkpointing; the engine halves it until it fits and completes with the same
    effective batch."""
    from bench.random_model import make

    model_dir = make("smollm2-135m-demo", model_root / "smollm2-135m-demo", tokenizer_dir)
    free, _total = torch.cuda.mem_get_info()
    hog = torch.empty(max(0, free - int(2.5 * 2**30)), dtype=torch.uint8, device="cuda")
    try:
        result = subprocess.run(
            [PYTHON, "-m", "tunewiz.engine", "train", "demo", "--name", "gpu-oom", "--set", f"model.name={model_dir}",
             "--set", "training.max_steps=4", "--set", "training.save_every=1",
             "--set", "training.micro_batch_size=128",
             "--set", "training.gradient_accumulation=1", "--set", "training.gradient_checkpointing=false",
             "--set", "training.oom_recovery=6", "--set", "training.sample_prompts=0"],
            capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=900)
    finally:
        del hog
        torch.cuda.empty_cache()
    run = rundir.list_runs()[0]
    log = run.log_path.read_text(errors="replace")[-4000:] if run.log_path.exists() else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + log
    stream = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    recoveries = [e for e in stream if e["type"] == "alert" and e["code"] == "out_of_memory"]
    assert recoveries, "the micro-batch of 128 fitted: hold more of the GPU"
    for alert in recoveries:
        assert alert["details"]["micro_batch_size"] * alert["details"]["gradient_accumulation"] == 128
        assert alert["details"]["limit_bytes"] and alert["details"]["estimated_bytes"]
    assert stream[-1]["status"] == "completed" and stream[-1]["metrics"]["steps"] == 4
    assert sorted(_last_per_step(stream)) == [1, 2, 3, 4]
    training = _card(run)["spec"]["training"]
    assert training["micro_batch_size"] == recoveries[-1]["details"]["micro_batch_size"]
    assert training["micro_batch_size"] * training["gradient_accumulation"] == 128

