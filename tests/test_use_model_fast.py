"""Chat protocol, evaluation scores and their bad inputs, without loading a model."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.runtools import make_run
from tunewiz.engine.cli.main import main
from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.errors import TunewizError
from tunewiz.engine.run import rundir
from tunewiz.engine.use import chat_server, evaluate
from tunewiz.engine.use.chat_client import SamplingSettings
from tunewiz.engine.use.inference import Generation, adapter_path

# ---------------------------------------------------------------------------------------------- scores

def test_normalised_match_ignores_case_punctuation_articles_and_spacing() -> None:
    assert evaluate.normalise("  The  Positive. ") == "positive"
    assert evaluate.normalise("An answer!") == "answer"
    assert evaluate.normalise("negative") != evaluate.normalise("positive")


def test_token_f1() -> None:
    assert evaluate.token_f1("the cat sat", "cat sat") == 1.0
    assert evaluate.token_f1("dog", "cat") == 0.0
    assert evaluate.token_f1("cat sat on mat", "cat sat") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert evaluate.token_f1("", "") == 1.0 and evaluate.token_f1("", "cat") == 0.0


def test_task_kind() -> None:
    assert evaluate.task_kind(["positive", "negative", "positive"]) == "label"
    assert evaluate.task_kind(["The refund is on its way; it takes five days.", "positive"]) == "open"
    assert evaluate.task_kind([f"label{i}" for i in range(30)]) == "open"


def test_report_counts_and_summary() -> None:
    rows = [evaluate.Row("p1", "positive", "The headline is positive", "positive"),
            evaluate.Row("p2", "negative", "negative", "negative"),
            evaluate.Row("p3", "negative", "negative", "positive")]
    refs = [r.reference for r in rows]
    report = evaluate.Report("run", None, "file", evaluate.task_kind(refs), rows,
                             evaluate.score([r.base for r in rows], refs, 2.0),
                             evaluate.score([r.tuned for r in rows], refs, 0.5), 8, "cpu", 1.0)
    assert report.counts() == (1, 1, 1)
    assert report.base.normalised == pytest.approx(2 / 3) and report.tuned.normalised == pytest.approx(2 / 3)
    assert report.base.exact == pytest.approx(2 / 3) and report.base.f1 == pytest.approx(2.5 / 3)
    text = report.summary_text()
    assert "normalised match" in text and "<- the score for this task" in text and "eval loss" in text
    data = report.to_dict()
    assert data["rows"][0]["base_match"] is False and data["rows"][0]["tuned_match"] is True
    assert "| 1 | p1 | positive | ✗ The headline is positive | ✓ positive |" in report.markdown()


# ---------------------------------------------------------------------------------------------- adapters

def test_a_run_without_an_adapter_is_a_clear_error() -> None:
    run = make_run()
    with pytest.raises(TunewizError, match="no trained adapter yet"):
        adapter_path(run)


def test_checkpoints_and_the_final_adapter_are_found() -> None:
    run = make_run()
    output = run.output_dir()
    for step in (3, 6, 9):
        (output / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (output / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        if step != 9:  # checkpoint-9 was cut short (never sealed): it does not count
            rundir.seal_checkpoint(output / "checkpoints" / f"checkpoint-{step}")
    assert adapter_path(run) == (output / "checkpoints" / "checkpoint-6", 6)  # a stopped run: the newest
    assert adapter_path(run, 3) == (output / "checkpoints" / "checkpoint-3", 3)
    with pytest.raises(TunewizError, match="no checkpoint at step 4 .checkpoints: 3, 6."):
        adapter_path(run, 4)
    (output / "adapter").mkdir()
    (output / "adapter" / "adapter_config.json").write_text("{}")
    assert adapter_path(run) == (output / "adapter", None)


def test_chat_and_eval_refuse_a_run_with_nothing_trained(capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run()
    for command in (["chat", run.run_id], ["eval", run.run_id]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "no trained adapter yet" in err and f"tunewiz resume {run.run_id}" in err


def test_bad_settings_and_eval_arguments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run = make_run()
    assert main(["chat", run.run_id, "--temperature", "9"]) == 2
    assert "temperature 9 is out of range" in capsys.readouterr().err
    assert main(["chat", run.run_id, "--top-p", "0"]) == 2
    assert "top-p 0 is out of range" in capsys.readouterr().err
    assert main(["eval", run.run_id, "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", run.run_id, "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- protocol

class FakeLoaded:
    """Stands in for tunewiz.engine.use.inference.RunModel: streams the prompt back word by word."""

    label, checkpoint, device, system_prompt, context_length, notes = "fake", None, "cpu", None, 100, []

    def __init__(self, step_s: float = 0.0) -> None:
        self.step_s = step_s
        self.calls: list[tuple[bool, SamplingSettings]] = []

    def generate(self, messages: list[dict[str, str]], settings: SamplingSettings, adapter: bool, on_text: Any,
                 should_stop: Any) -> Generation:
        self.calls.append((adapter, settings))
        words = messages[-1]["content"].split()
        sent = []
        for word in words:
            if should_stop():
                return Generation(" ".join(sent), len(sent), 3, 0.01, 0.02, "cancelled")
            on_text(("" if not sent else " ") + word)
            sent.append(word)
            time.sleep(self.step_s)
        return Generation(" ".join(sent), len(sent), 3, 0.01, 0.02, "stop")


def converse(lines: list[str], loaded: Any, run_path: str) -> list[dict[str, Any]]:
    out = io.StringIO()
    code = chat_server.serve(run_path, None, chat_server.Channel(out), io.StringIO("".join(lines)),
                             load=lambda run, checkpoint, say: loaded)
    assert code == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def request(op: str, **fields: Any) -> str:
    return json.dumps({"op": op, **fields}) + "\n"


def test_protocol_streams_tokens_and_reports_errors_without_ending() -> None:
    run = make_run()
    loaded = FakeLoaded()
    replies = converse([
        request("generate", id="1", messages=[{"role": "user", "content": "hello there"}], adapter=False),
        "this is not json\n",
        request("generate", id="2", messages=[{"role": "assistant", "content": "x"}]),
        request("generate", id="3", messages=[{"role": "user", "content": "a"}], settings={"temperature": 7}),
        request("generate", id="4", messages=[{"role": "user", "content": "b"}], settings={"bogus": 1}),
        request("dance", id="5"),
        request("generate", id="6", messages=[{"role": "user", "content": "again"}],
                settings={"temperature": 0.5, "max_new_tokens": 9}),
        request("quit"),
    ], loaded, str(run.path))
    assert replies[0]["type"] == "ready" and replies[0]["model"] == "fake" and replies[0]["protocol"] == 1
    tokens = [r["text"] for r in replies if r["type"] == "token" and r["id"] == "1"]
    assert tokens == ["hello", " there"]
    done = {r["id"]: r for r in replies if r["type"] == "done"}
    assert done["1"]["text"] == "hello there" and done["1"]["stats"]["finish"] == "stop"
    errors = {r["id"]: r["message"] for r in replies if r["type"] == "error"}
    assert any(i is None and "bad request line" in m for i, m in errors.items())
    assert "last message must be the user's" in errors["2"]
    assert "temperature 7 is out of range" in errors["3"]
    assert "unknown settings ['bogus']" in errors["4"]
    assert "unknown op 'dance'" in errors["5"]
    assert done["6"]["text"] == "again"
    assert [c[0] for c in loaded.calls] == [False, True]
    assert loaded.calls[1][1] == SamplingSettings(temperature=0.5, max_new_tokens=9)


def test_a_cancel_stops_the_answer_in_flight() -> None:
    run = make_run()
    r_fd, w_fd = os.pipe()
    stdin = os.fdopen(r_fd, "r")
    writer = os.fdopen(w_fd, "w")
    out = io.StringIO()
    loaded = FakeLoaded(step_s=0.05)
    server = threading.Thread(target=chat_server.serve, args=(str(run.path), None, chat_server.Channel(out), stdin),
                              kwargs={"load": lambda run, checkpoint, say: loaded})
    server.start()
    writer.write(request("generate", id="1", messages=[{"role": "user", "content": " ".join(["w"] * 100)}]))
    writer.flush()
    deadline = time.monotonic() + 5
    while '"token"' not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.write(request("cancel", id="1") + request("quit"))
    writer.flush()
    server.join(10)
    writer.close()
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    done = next(r for r in replies if r["type"] == "done")
    assert done["stats"]["finish"] == "cancelled" and done["stats"]["tokens"] < 100


def test_a_model_that_cannot_load_is_a_fatal_error_reply(tmp_path: Path) -> None:
    out = io.StringIO()
    code = chat_server.serve(str(tmp_path / "no-such-run"), None, chat_server.Channel(out), io.StringIO(""))
    reply = json.loads(out.getvalue().splitlines()[-1])
    assert code == 1 and reply["type"] == "error" and reply["fatal"] and "no run id starts with" in reply["message"]


def test_the_eval_summary_is_read_back_for_the_dashboard() -> None:
    run = make_run()
    assert evaluate.latest_summary(run) is None
    folder = evaluate.report_dir(run, None)
    folder.mkdir(parents=True)
    (folder / evaluate.RESULTS_NAME).write_text(json.dumps({"task": "label", "examples": 3}))
    assert evaluate.latest_summary(run) == {"task": "label", "examples": 3}


def test_chat_refuses_a_spec_that_runs_model_code_without_consent(capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run()
    spec = run.load_spec()
    spec.model.trust_remote_code = True  # someone edited the spec by hand: no consent was given
    spec_mod.save(spec, run.spec_path)
    for command in (["chat", run.run_id], ["eval", run.run_id]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "sets model.trust_remote_code" in err and "--trust-remote-code" in err
