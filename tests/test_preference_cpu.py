"""The preference demo for real, through the CLI on the CPU: DPO teaches the bundled model to answer in one
short sentence. One run, stopped part-way like the app stops it and resumed: the reward margin rises and
the held-out answers get at least twice as short."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.runtools import wait_for
from tunewiz.engine.run import rundir
from tunewiz.engine.run.events import validate

pytestmark = pytest.mark.slow

STEPS = 6


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "tunewiz.engine", *args], capture_output=True, text=True, cwd=ROOT,
                          env=subprocess_env(), timeout=1800)


def events(run: rundir.RunDir) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    assert all(validate(event) == [] for event in lines)
    return lines


def mean_words(sample: dict[str, Any]) -> float:
    return statistics.mean(len(s["answer"].split()) for s in sample["samples"])


def test_dpo_demo_teaches_short_answers_and_survives_a_stop(demo_model: Path) -> None:
    started = cli("train", "concise", "--detach", "--set", f"training.max_steps={STEPS}",
                  "--set", f"training.sample_every={STEPS}", "--set", f"training.eval_every={STEPS}",
                  "--set", "training.save_every=100", "--set", "training.sample_prompts=3",
                  "--set", "training.sample_max_new_tokens=40")
    assert started.returncode == 0, started.stderr
    run = rundir.list_runs()[0]
    steps = lambda: sum(e["type"] == "step" for e in events(run)) if run.events_path.exists() else 0  # noqa: E731
    wait_for(lambda: steps() >= 2, timeout=600, what="two training steps", interval=0.5, run=run)
    run.request_stop()  # what the app's stop button does
    wait_for(lambda: run.state() == "cancelled", timeout=300, what="cancelled", interval=0.5, run=run)
    first_life = events(run)
    stopped_at = [e for e in first_life if e["type"] == "checkpoint"][-1]["step"]
    assert 2 <= stopped_at < STEPS

    resumed = cli("resume", run.run_id)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    stream = events(run)
    assert stream[-1]["type"] == "finished" and stream[-1]["status"] == "completed"
    second = [e["step"] for e in stream[len(first_life):] if e["type"] == "step"]
    assert second == list(range(stopped_at + 1, STEPS + 1))

    margins = {e["step"]: e["margin"] for e in stream if e["type"] == "preference" and e["split"] == "train"}
    assert sorted(margins) == list(range(1, STEPS + 1))
    assert margins[STEPS] > margins[1] + 1.0, margins  # the chosen answers pull away from the rejected ones
    final_eval = [e for e in stream if e["type"] == "preference" and e["split"] == "eval"][-1]
    assert final_eval["step"] == STEPS and final_eval["margin"] > 0 and final_eval["accuracy"] >= 0.5

    samples = {e["step"]: e for e in stream if e["type"] == "sample"}
    before, after = mean_words(samples[0]), mean_words(samples[STEPS])
    assert after <= before / 2, (samples[0]["samples"], samples[STEPS]["samples"])  # the taught style

    card = json.loads((run.output_dir() / "run_card.json").read_text())
    assert card["spec"]["training"]["objective"] == "dpo" and card["dataset"]["format"] == "preference"
    assert (run.output_dir() / "adapter" / "adapter_model.safetensors").exists()
