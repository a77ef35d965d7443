"""SIGKILL at each phase of a real run, each followed by a resume: what a crash can lose.

One run of two optimiser steps (a checkpoint after each) lives through five engine lives; every kill loses
at most the steps since the last complete checkpoint, and the run ends completed with no step past the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.engine_runs import engine_life, of_type, tiny_run
from tunewiz.engine.cli import main as cli
from tunewiz.engine.run import rundir
from tunewiz.engine.run.events import EventReader

pytestmark = pytest.mark.slow


def _steps(evs: list[dict]) -> list[int]:
    return [e["step"] for e in of_type(evs, "step")]


def test_kills_at_every_phase_lose_at_most_the_steps_since_the_last_complete_checkpoint(
        demo_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tiny_run()
    checkpoints = run.output_dir() / "checkpoints"

    life = engine_life(run, "load")  # killed while the model loads: nothing to lose yet
    assert [e["type"] for e in life][0] == "started" and not of_type(life, "step") and run.state() == "dead"

    life = engine_life(run, "mid_step:2", resume=True)  # no checkpoint yet: starts over; killed inside step 2
    assert of_type(life, "started")[0]["resumed_from_step"] is None and _steps(life) == [1]
    assert rundir.latest_checkpoint(run.output_dir()) == (checkpoints / "checkpoint-1", 1)

    life = engine_life(run, "mid_checkpoint:2", resume=True)  # killed while checkpoint-2 is written
    assert of_type(life, "started")[0]["resumed_from_step"] == 1 and _steps(life) == [2]
    assert (checkpoints / "checkpoint-2").is_dir()  # there, but never completed:
    assert rundir.latest_checkpoint(run.output_dir()) == (checkpoints / "checkpoint-1", 1)

    life = engine_life(run, "final_save", resume=True)  # falls back to checkpoint-1, then killed in the final save
    assert of_type(life, "started")[0]["resumed_from_step"] == 1 and _steps(life) == [2]
    warnings = [e["message"] for e in of_type(life, "log") if e["level"] == "warning"]
    assert any(m.startswith("skipped checkpoint-2: it was never completed") for m in warnings), warnings
    assert not (run.output_dir() / "adapter").exists()  # no half adapter that looks whole
    assert rundir.latest_checkpoint(run.output_dir()) == (checkpoints / "checkpoint-2", 2)

    life = engine_life(run, resume=True)  # the final checkpoint: save the adapter, train nothing more
    assert of_type(life, "started")[0]["resumed_from_step"] == 2 and _steps(life) == []
    assert life[-1]["type"] == "finished" and life[-1]["status"] == "completed" and life[-1]["step"] == 2
    assert (run.output_dir() / "adapter" / "adapter_model.safetensors").is_file()
    assert (run.output_dir() / "run_card.json").is_file() and not (run.output_dir() / "adapter.partial").exists()

    everything = EventReader(run.events_path).read_all()
    assert [e.seq for e in everything] == list(range(1, len(everything) + 1))
    assert max(e.get("step") for e in everything if e.type == "step") == 2

    # The events are the record: with status.json lost, the run still reads completed and is never retrained.
    run.status_path.unlink()
    assert run.state() == "completed"
    assert cli.main(["resume", run.run_id, "--detach"]) == 2
    assert f"run {run.run_id} completed" in capsys.readouterr().err
