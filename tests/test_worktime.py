"""One training time everywhere (issue 15, items 9 and 10): `tunewiz runs`, the Runs screen and the dashboard add
up the engine's lives over resumes, and a run stopped right after its first step still shows it."""

from __future__ import annotations

import json

import pytest

from tunewiz.engine.cli import main as cli
from tunewiz.engine.config import presets
from tunewiz.engine.run import rundir
from tunewiz.engine.run.context import EngineContext
from tunewiz.engine.run.events import EventWriter
from tunewiz.engine.run.worktime import LossScan, training_time
from tunewiz.tui.runmodel import RunModel


def test_training_time_adds_up_the_lives() -> None:
    assert training_time([]) is None
    assert training_time([(0.0, 10.0), (100.0, 105.0)]) == 15.0  # the 90 s between stop and resume do not count
    assert training_time([(0.0, 10.0), (100.0, 105.0)], now=110.0) == 20.0


def _resumed_run() -> rundir.RunDir:
    """A run that trained 600 s, was stopped, and trained 300 s more after a resume an hour later."""
    run = rundir.create(presets.resolve("demo")[0])
    lines = []
    for seq, (when, kind, data) in enumerate([
            (1000.0, "started", {"pid": 1, "host": "h"}),
            (1300.0, "step", {"step": 1, "total_steps": 4, "epoch": 0.2, "loss": 2.0, "learning_rate": 1e-4,
                              "grad_norm": 1.0, "tokens_per_s": 10.0}),
            (1600.0, "finished", {"status": "cancelled", "step": 1}),
            (5200.0, "started", {"pid": 2, "host": "h", "resumed_from_step": 1}),
            (5500.0, "step", {"step": 2, "total_steps": 4, "epoch": 0.4, "loss": 1.5, "learning_rate": 1e-4,
                              "grad_norm": 1.0, "tokens_per_s": 10.0}),
            (5500.0, "finished", {"status": "cancelled", "step": 2})], start=1):
        lines.append(json.dumps({"v": 1, "seq": seq, "time": when, "type": kind, **data}))
    run.events_path.write_text("\n".join(lines) + "\n")
    run.update_status(state="cancelled", started=5200.0, finished=5500.0, step=2, total_steps=4)
    return run


def test_runs_the_runs_screen_and_the_dashboard_agree(capsys: pytest.CaptureFixture[str]) -> None:
    run = _resumed_run()
    assert cli.main(["runs", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["duration_s"] == 900.0  # not 300 s (only since the resume), not 4500 s (with the gap)
    assert row["loss"] == 1.5  # from the events when status.json has none
    scan = LossScan(run.events_path)
    scan.update()
    model = RunModel(run.run_id)
    model.apply_raw([json.loads(line) for line in run.events_path.read_text().splitlines()])
    assert scan.worked() == model.view("cancelled").elapsed(9999.0) == 900.0


def test_a_run_stopped_right_after_step_one_shows_the_step_its_total_and_loss() -> None:
    spec = presets.resolve("demo")[0]
    run = rundir.create(spec)
    ctx = EngineContext(run, spec, EventWriter(run.events_path))
    ctx.emit("phase", phase="train", message="training")  # a status write: the next step is throttled
    ctx.emit("step", step=1, total_steps=40, epoch=0.02, loss=2.5, learning_rate=1e-4, grad_norm=1.0,
             tokens_per_s=100.0, elapsed_s=3.0)
    assert run.status().get("step") is None  # throttled
    ctx.emit("finished", status="cancelled", step=1)
    status = run.status()
    assert (status["step"], status["total_steps"], status["loss"]) == (1, 40, 2.5)
