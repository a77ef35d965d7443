"""The real engine on the CPU with the bundled demo model and data, through the real CLI and processes.

These are the slow tests (a few minutes in all): they train for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engine import rundir
from engine.events import validate
from tests import demo_eval
from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.runtools import wait_for

pytestmark = pytest.mark.slow

TRAIN_STEPS = 36


def cli(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "engine", *args], capture_output=True, text=True, cwd=ROOT,
                          env=subprocess_env(), timeout=timeout)


def events(run: rundir.RunDir) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    for event in lines:
        assert validate(event) == [], event
    return lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shared_demo_model: Path) -> tuple[rundir.RunDir, Path]:
    """One real demo run, shared by the tests below."""
    home = tmp_path_factory.mktemp("trained-home")
    (home / "data").mkdir()
    (home / "data" / "models").symlink_to(shared_demo_model.parent)
    os.environ["TUNEWIZ_HOME"] = str(home)  # the autouse fixture resets it for each test
    result = cli("train", "demo", "--set", f"training.max_steps={TRAIN_STEPS}", "--set", "training.eval_every=12",
                 "--set", "training.sample_every=18", "--set", "training.gradient_checkpointing=true",
                 "--set", "training.checkpoint_layers=10")  # partial checkpointing, which the recommender uses
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = rundir.list_runs(home / "state" / "runs")[0]
    return run, home


def test_events_tell_the_whole_story(trained: tuple[rundir.RunDir, Path]) -> None:
    run, _ = trained
    stream = events(run)
    kinds = [e["type"] for e in stream]
    assert kinds[0] == "started" and kinds[-1] == "finished" and stream[-1]["status"] == "completed"
    assert [e["seq"] for e in stream] == list(range(1, len(stream) + 1))
    steps = [e for e in stream if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, TRAIN_STEPS + 1))
    assert all(e["total_steps"] == TRAIN_STEPS and e["tokens_seen"] > 0 for e in steps)
    assert all(e["tokens_per_s"] > 0 for e in steps[1:])
    assert {"load_model", "prepare_data", "train", "save"} <= {e["phase"] for e in stream if e["type"] == "phase"}
    data_phase = next(e for e in stream if e["type"] == "phase" and e.get("stats", {}).get("train_examples"))
    assert data_phase["stats"]["dropped_total"] == 0 and data_phase["stats"]["token_lengths"]["p50"] > 0
    assert [e["step"] for e in stream if e["type"] == "eval"] == [12, 24, 36]
    samples = [e for e in stream if e["type"] == "sample"]
    assert [e["step"] for e in samples] == [0, 18, 36]
    assert all(s["reference"] in ("positive", "negative") for s in samples[0]["samples"])
    assert any(e["type"] == "checkpoint" for e in stream)
    assert any(e["type"] == "log" and e["message"] == "gradient checkpointing on 10 of 30 layers" for e in stream)
    resources = [e for e in stream if e["type"] == "gpu"]
    assert resources and resources[0]["devices"] == [] and resources[0]["process"]["rss_bytes"] > 0
    assert run.state() == "completed"


def test_loss_falls(trained: tuple[rundir.RunDir, Path]) -> None:
    run, _ = trained
    losses = [e["loss"] for e in events(run) if e["type"] == "step"]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first / 3, losses
    evals = [e["eval_loss"] for e in events(run) if e["type"] == "eval"]
    assert evals[-1] < evals[0]


def test_outputs_and_run_card(trained: tuple[rundir.RunDir, Path]) -> None:
    run, _ = trained
    output = run.output_dir()
    assert (output / "adapter" / "adapter_model.safetensors").exists()
    assert (output / "adapter" / "chat_template.jinja").exists() or "chat_template" in (
        output / "adapter" / "tokenizer_config.json").read_text()
    card = json.loads((output / "run_card.json").read_text())
    assert card["spec"]["training"]["max_steps"] == TRAIN_STEPS
    assert card["versions"]["torch"] and card["versions"]["peft"]
    assert len(card["dataset"]["fingerprint"]) == 16
    assert card["metrics"]["steps"] == TRAIN_STEPS and card["metrics"]["train_loss"] > 0


def test_heldout_accuracy_rises_and_merged_export_answers_the_same(trained: tuple[rundir.RunDir, Path]) -> None:
    from peft import PeftModel

    run, home = trained
    os.environ["TUNEWIZ_HOME"] = str(home)
    prompts = demo_eval.heldout_prompts()
    model_dir = Path(json.loads((run.output_dir() / "run_card.json").read_text())["base_model"])
    base, tokenizer = demo_eval.load_base(model_dir)
    before = demo_eval.accuracy(base, tokenizer, prompts)
    tuned = PeftModel.from_pretrained(base, str(run.output_dir() / "adapter"))
    adapter_replies = demo_eval.replies(tuned, tokenizer, prompts)
    after = sum(r == ref for r, (_, ref) in zip(adapter_replies, prompts)) / len(prompts)
    print(f"held-out accuracy before {before:.2f}, after {after:.2f}")
    assert after >= 0.85 and after >= before + 0.3, (before, after)

    out = home / "merged"
    result = cli("export", run.run_id[:15], "--merged", "--out", str(out))
    assert result.returncode == 0, result.stderr
    merged, merged_tokenizer = demo_eval.load_base(out)  # plain transformers, no peft
    merged_replies = demo_eval.replies(merged, merged_tokenizer, prompts)
    agree = sum(a == b for a, b in zip(merged_replies, adapter_replies)) / len(prompts)
    assert agree >= 0.95, list(zip(merged_replies, adapter_replies))


def test_sigterm_leaves_a_checkpoint_and_resume_continues(demo_model: Path) -> None:
    result = cli("train", "demo", "--detach", "--set", "training.max_steps=10", "--set", "training.lr_scheduler=linear",
                 "--set", "training.warmup_ratio=0.0", "--set", "training.save_every=100",
                 "--set", "training.sample_every=100", "--set", "training.sample_prompts=1",
                 "--set", "dataset.eval_fraction=0.0")
    assert result.returncode == 0, result.stderr
    run = rundir.list_runs()[0]
    step_count = lambda: sum(1 for e in events(run) if e["type"] == "step") if run.events_path.exists() else 0  # noqa: E731
    wait_for(lambda: step_count() >= 3, timeout=300, what="three training steps", interval=0.5, run=run)
    os.killpg(run.status()["pgid"], signal.SIGTERM)
    wait_for(lambda: run.state() == "cancelled", timeout=180, what="cancelled", interval=0.5, run=run)
    first_life = events(run)
    assert first_life[-1]["type"] == "finished" and first_life[-1]["status"] == "cancelled"
    checkpoint = [e for e in first_life if e["type"] == "checkpoint"][-1]
    stopped_at = checkpoint["step"]
    assert 3 <= stopped_at < 10

    from peft import PeftModel

    base, _ = demo_eval.load_base(demo_model)
    PeftModel.from_pretrained(base, checkpoint["path"])  # the checkpoint loads

    resumed = cli("resume", run.run_id)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    stream = events(run)
    assert [e["seq"] for e in stream] == list(range(1, len(stream) + 1))
    restart = next(e for e in stream[len(first_life):] if e["type"] == "started")
    assert restart["resumed_from_step"] == stopped_at
    second = [e for e in stream[len(first_life):] if e["type"] == "step"]
    assert [e["step"] for e in second] == list(range(stopped_at + 1, 11))
    rates = [e["learning_rate"] for e in stream if e["type"] == "step"]
    steps_seen = [e["step"] for e in stream if e["type"] == "step"]
    by_step = dict(zip(steps_seen, rates))
    deltas = [by_step[s] - by_step[s + 1] for s in range(2, 10)]
    assert all(d > 0 for d in deltas) and max(deltas) - min(deltas) < 1e-9, by_step  # the schedule continues
    first_losses = [e["loss"] for e in first_life if e["type"] == "step"]
    assert second[0]["loss"] < first_losses[0]  # no jump back to the untrained loss
    assert stream[-1]["type"] == "finished" and stream[-1]["status"] == "completed"
    assert run.state() == "completed"
