"""The multi-GPU supervisor on a CPU: two ranks of the stand-in trainer started through a stand-in
accelerate (tests/fake_ranks.py). Rank 0 alone writes the run directory; a failing rank ends the
run as failed with its own error; a stop request stops every rank; resume starts the ranks again."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.runtools import events, fake_env, kill_leftovers, make_run, steps_seen, types, wait_finished, wait_for
from tunewiz.engine.run import launcher
from tunewiz.engine.run.rundir import RunDir

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def _no_engine_outlives_its_test(tunewiz_home: Path):
    yield
    kill_leftovers()
    import psutil

    for process in psutil.process_iter(["cmdline"]):  # ranks live in sessions of their own
        command = process.info["cmdline"] or []
        if "--rank-worker" in command and str(tunewiz_home) in " ".join(command):
            process.kill()


@pytest.fixture(autouse=True)
def _two_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    def command(run: RunDir, resume: bool = False) -> list[str]:
        return [sys.executable, "-m", "tests.fake_ranks", "supervise", "2", str(run.path),
                *(["--resume"] if resume else [])]

    monkeypatch.setattr(launcher, "engine_command", command)


def _start(run: RunDir, resume: bool = False, **fake: object) -> None:
    launcher.launch(run, resume=resume, env=fake_env(**fake))


def test_rank_zero_alone_writes_one_stream() -> None:
    run = make_run()
    _start(run, steps=6, step_s=0.02)
    finished = wait_finished(run, timeout=60)
    evs = events(run)
    assert finished["status"] == "completed"
    assert types(evs).count("started") == 1 and types(evs).count("finished") == 1
    assert [e["step"] for e in evs if e["type"] == "step"] == [1, 2, 3, 4, 5, 6]  # not twice
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    assert run.status()["state"] == "completed"


def test_a_failing_rank_fails_the_run_with_its_own_error() -> None:
    run = make_run()
    _start(run, steps=400, step_s=0.05, fail=True, FAKE_FAIL_RANK="1")
    finished = wait_finished(run, timeout=60)
    evs = events(run)
    errors = [e for e in evs if e["type"] == "error"]
    assert finished["status"] == "failed", types(evs)
    assert len(errors) == 1 and errors[0]["message"].startswith("rank 1: CUDA out of memory"), errors
    assert types(evs).count("finished") == 1  # rank 0 was stopped, but the run ends once, as failed
    assert max((e["step"] for e in evs if e["type"] == "step"), default=0) < 400  # rank 0 did not train on
    assert "batch" in (errors[0]["hint"] or "")  # rank 1's own hint travels with its error
    status = run.status()
    assert status["state"] == "failed" and status["error"]["message"].startswith("rank 1:")
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))


def test_stop_request_stops_every_rank_and_resume_continues_on_the_same_count() -> None:
    run = make_run()
    _start(run, steps=200, step_s=0.05)
    wait_for(lambda: steps_seen(run) >= 3, timeout=60, what="3 steps", run=run)
    assert launcher.stop(run, grace_s=30) == "graceful"
    finished = wait_finished(run, timeout=30)
    assert finished["status"] == "cancelled"
    stopped_at = finished["step"]
    _start(run, resume=True, steps=stopped_at + 3, step_s=0.02)
    assert wait_finished(run, timeout=60)["status"] == "completed"
    resumed = [e["step"] for e in events(run) if e["type"] == "step"][-3:]
    assert resumed == [stopped_at + 1, stopped_at + 2, stopped_at + 3]


def test_sigterm_to_the_supervisor_becomes_a_stop_request() -> None:
    run = make_run()
    _start(run, steps=200, step_s=0.05)
    wait_for(lambda: steps_seen(run) >= 2 and isinstance(run.status().get("pid"), int), timeout=60, run=run)
    import os

    os.kill(run.status()["pid"], signal.SIGTERM)
    assert wait_finished(run, timeout=30)["status"] == "cancelled"


def _rank_processes(run: RunDir) -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if "--rank-worker" in (p.info["cmdline"] or []) and str(run.path) in (p.info["cmdline"] or [])]


def test_ranks_do_not_outlive_a_killed_launcher() -> None:
    # torchrun puts ranks in sessions of their own: SIGKILL to the engine's group must still end them.
    run = make_run()
    _start(run, steps=400, step_s=0.05)
    wait_for(lambda: steps_seen(run) >= 2 and len(_rank_processes(run)) == 2, timeout=60, run=run)
    import os

    os.killpg(run.status()["pgid"], signal.SIGKILL)
    wait_for(lambda: not _rank_processes(run), timeout=20, what="the ranks to end")
    wait_for(lambda: run.state() == "dead", timeout=10, what="the lock to be free")  # teardown takes a moment
