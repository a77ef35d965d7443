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

from tests import demo_eval
from tests.conftest import DEMO_TRAIN_STEPS as TRAIN_STEPS
from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.runtools import wait_for
from tunewiz.engine.run import rundir
from tunewiz.engine.run.events import validate

pytestmark = pytest.mark.slow



def cli(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "tunewiz.engine", *args], capture_output=True, text=True, cwd=ROOT,
                          env=subprocess_env(), timeout=timeout)


def events(run: rundir.RunDir) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    for event in lines:
        assert validate(event) == [], event
    return lines


@pytest.fixture
def trained(trained_demo: tuple[rundir.RunDir, Path]) -> tuple[rundir.RunDir, Path]:
    """The session's real demo run (tests/conftest.py)."""
    return trained_demo


def test_events_tell_the_whole_story(trained: tuple[rundir.RunDir, Path]) -> None:
    run, _ = trained
    stream = events(run)
    kinds = [e["type"] for e in stream]
    assert kinds[0] == "started" and kinds[-1] == "finished" and stream[-1]["status"] == "completed"
    assert [e["seq"] for e in stream] == list(range(1, len(stream) + 1))
    steps = [e for e in stream if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, TRAIN_STEPS + 1))
    assert all(e["total_steps"] == TRAIN_STEPS and e["tokens_seen"] > 0 for e in steps)
    # Counted on the device and read at each step's end (engine/training/token_count.py): every step adds its
    # tokens, and each checkpoint holds the count of its step.
    assert all(b["tokens_seen"] > a["tokens_seen"] for a, b in zip(steps, steps[1:]))
    states = sorted(run.path.glob("output/checkpoints/checkpoint-*/trainer_state.json"))
    assert states
    for path in states:
        state = json.loads(path.read_text())
        assert state["num_input_tokens_seen"] == steps[state["global_step"] - 1]["tokens_seen"], path
    assert all(e["tokens_per_s"] > 0 for e in steps[1:])
    assert {"load_model", "prepare_data", "train", "save"} <= {e["phase"] for e in stream if e["type"] == "phase"}
    data_phase = next(e for e in stream if e["type"] == "phase" and e.get("stats", {}).get("train_examples"))
    assert data_phase["stats"]["dropped_total"] == 0 and data_phase["stats"]["token_lengths"]["p50"] > 0
    assert [e["step"] for e in stream if e["type"] == "eval"] == [12, 24, 36]
    samples = [e for e in stream if e["type"] == "sample"]
    assert [e["step"] for e in samples] == [0, 18, 36]
    assert all(s["reference"] in ("positive", "negative") for s in samples[0]["samples"])
    assert any(e["type"] == "checkpoint" for e in stream)
    assert not [e for e in stream if e["type"] == "alert"], "the coach raised alerts on the healthy CPU demo"
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


def test_eval_shows_the_real_gain_on_heldout_headlines(trained: tuple[rundir.RunDir, Path]) -> None:
    run, home = trained
    os.environ["TUNEWIZ_HOME"] = str(home)
    result = cli("eval", run.run_id, "--json", "--limit", "20")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    print("\n".join(report["summary"]))
    assert report["examples"] == 20 and report["task"] == "label" and "held-out file" in report["origin"]
    before, after = report["base"]["normalised"], report["tuned"]["normalised"]
    assert after >= 0.85 and after >= before + 0.5, (before, after)
    assert report["tuned"]["loss"] < report["base"]["loss"] / 3
    assert report["better"] > report["worse"]
    stored = json.loads((run.path / "eval" / "results.json").read_text())
    assert stored["tuned"] == report["tuned"] and (run.path / "eval" / "report.md").read_text().count("\n| ") >= 20


def test_merged_export_answers_as_the_adapter(trained: tuple[rundir.RunDir, Path]) -> None:
    run, home = trained
    os.environ["TUNEWIZ_HOME"] = str(home)
    result = cli("export", run.run_id[:15], "--merged", "--verify-limit", "20")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == "", result.stderr  # no library warnings or raw progress bars
    out = run.path / "exports" / "merged-bf16"
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    card = json.loads((run.output_dir() / "run_card.json").read_text())
    entry = next(e for e in card["exports"] if e["kind"] == "merged")
    assert entry["total"] == 20 and entry["identical"] >= 19, entry
    assert f"{entry['identical']}/20 answers identical to the adapter" in result.stdout


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


# ---------------------------------------------------------------------------------------------
# Chat through the real chat process


HEADLINES = [e for e in (json.loads(line) for line in demo_eval.HELDOUT.read_text().splitlines()) if e][:6]


def _answer(client: Any, messages: list[dict[str, str]], adapter: bool = True, **settings: Any) -> tuple[str, dict]:
    from tunewiz.engine.use.chat_client import SamplingSettings

    request_id = client.generate(messages, adapter, SamplingSettings(**settings))
    pieces = []
    for reply in client.replies():
        if reply.id != request_id:
            continue
        if reply.type == "token":
            pieces.append(reply.data["text"])
        elif reply.type in ("done", "error"):
            return "".join(pieces), reply.data
    raise AssertionError("the chat process ended")


def test_chat_streams_compares_cancels_and_refuses_a_too_long_prompt(trained: tuple[rundir.RunDir, Path]) -> None:
    from tunewiz.engine.use.chat_client import ChatClient

    run, home = trained
    client = ChatClient(run.path, env=subprocess_env(TUNEWIZ_HOME=str(home)))
    client.start()
    try:
        info = client.wait_ready()
        assert info["run_id"] == run.run_id and info["checkpoint"] is None and info["device"] == "cpu"
        differ = 0
        for row in HEADLINES:
            prompt = row["messages"][:-1]
            streamed, done = _answer(client, prompt, max_new_tokens=12)
            assert done["text"] == streamed.strip() and done["stats"]["first_token_s"] > 0
            assert done["text"] == row["messages"][-1]["content"] or done["text"] in ("positive", "negative")
            base, _ = _answer(client, prompt, adapter=False, max_new_tokens=12)
            differ += base.strip() != done["text"]
        assert differ >= len(HEADLINES) // 2, differ  # the base model answers differently (it rambles)

        story = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
        request_id = client.generate(story, False, None)
        tokens = 0
        for reply in client.replies():
            if reply.id == request_id and reply.type == "token":
                tokens += 1
                if tokens == 3:
                    client.cancel(request_id)
            if reply.id == request_id and reply.type == "done":
                assert reply.data["stats"]["finish"] == "cancelled" and reply.data["stats"]["tokens"] < 50
                break

        too_long = [{"role": "user", "content": "word " * 9000}]
        _, error = _answer(client, too_long)
        assert "this model reads at most 8192" in error["message"] and error["fatal"] is False
        again, done = _answer(client, HEADLINES[0]["messages"][:-1], max_new_tokens=12)  # still answering
        assert done["stats"]["finish"] == "stop" and again.strip()
    finally:
        client.close()
    assert client.process is not None and client.process.returncode == 0


def test_chat_command_compares_on_a_checkpoint(trained: tuple[rundir.RunDir, Path]) -> None:
    run, home = trained
    os.environ["TUNEWIZ_HOME"] = str(home)
    step = min(rundir.checkpoint_steps(run.output_dir()))
    question = HEADLINES[1]["messages"][0]["content"].replace("\n", " ")
    result = subprocess.run([PYTHON, "-m", "tunewiz.engine", "chat", run.run_id, "--checkpoint", str(step),
                             "--max-new-tokens", "10"], input=f"/compare\n{question}\n/quit\n", capture_output=True,
                            text=True, cwd=ROOT, env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "comparing base and tuned answers" in result.stdout
    assert result.stdout.index("base> ") < result.stdout.index("tuned> ") and "first token" in result.stdout
    missing = cli("chat", run.run_id, "--checkpoint", "999", "--prompt", "hi")
    assert missing.returncode == 2 and "no checkpoint at step 999" in missing.stderr
