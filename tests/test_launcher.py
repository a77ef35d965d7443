"""The engine process for real: detached launch, the lock, graceful stop, signals, failure and resume.

Every test starts `python -m tunewiz.engine.run.worker` through `tunewiz.engine.run.launcher` with the stand-in trainer
(tests/fake_trainer.py, or a stubborn one written below), and checks what the run directory says.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.runtools import events, fake_env, kill_leftovers, make_run, start, steps_seen, types, wait_finished, wait_for
from tunewiz.engine.run import launcher, rundir
from tunewiz.engine.run.rundir import RunDir

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_engine_outlives_its_test(tunewiz_home: Path):
    yield
    kill_leftovers()


def _running(run: RunDir, min_steps: int = 1) -> None:
    """Wait until the engine has recorded its process group and made `min_steps` steps."""
    wait_for(lambda: isinstance(run.status().get("pgid"), int) and steps_seen(run) >= min_steps,
             what=f"{min_steps} steps", run=run)


def _assert_seqs(evs: list[dict]) -> None:
    seqs = [e["seq"] for e in evs]
    assert seqs == list(range(1, len(evs) + 1)), seqs


LAUNCH_AND_EXIT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from tunewiz.engine.run import launcher
    from tunewiz.engine.run.rundir import RunDir
    print(launcher.launch(RunDir(Path(sys.argv[1])), env=json.loads(sys.argv[2])))
""")


def test_engine_outlives_the_process_that_launched_it() -> None:
    run = make_run()
    helper = subprocess.run([PYTHON, "-c", LAUNCH_AND_EXIT, str(run.path), json.dumps(fake_env(steps=40, step_s=0.04))],
                            env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert helper.returncode == 0, helper.stderr
    pid = int(helper.stdout.strip())
    # The launcher is gone; the engine holds the lock in a session of its own.
    assert run.engine_alive()
    assert run.state() in ("starting", "running")
    wait_for(lambda: run.status().get("pid") == pid, what="the engine to record its pid", run=run)
    assert os.getsid(pid) == pid and run.status()["pgid"] == pid
    before = steps_seen(run)
    wait_for(lambda: steps_seen(run) > before, what="more events", run=run)
    assert run.engine_alive() and run.state() == "running"

    finished = wait_finished(run)
    assert finished["status"] == "completed" and finished["step"] == 40
    assert finished["output_dir"] == str(run.path / "output")
    evs = events(run)
    _assert_seqs(evs)
    assert evs[0]["type"] == "started" and evs[0]["pid"] == pid and evs[0]["run_id"] == run.run_id
    assert [e["step"] for e in evs if e["type"] == "step"] == list(range(1, 41))
    assert run.state() == "completed"
    status = run.status()
    assert status["state"] == "completed" and status["step"] == 40 and status["last_event"] == "finished"


@pytest.mark.parametrize("user_setting", [None, "max_split_size_mb:64"])
def test_the_engine_grows_cuda_memory_in_segments_unless_the_user_chose(user_setting: str | None, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    record = tmp_path / "allocator.json"
    env = fake_env(steps=1, FAKE_RECORD_ENV=str(record))
    if user_setting:
        env["PYTORCH_ALLOC_CONF"] = user_setting
    run = make_run()
    launcher.launch(run, env=env)
    assert wait_finished(run)["status"] == "completed"
    seen = json.loads(record.read_text())
    if user_setting:
        assert seen == {"PYTORCH_CUDA_ALLOC_CONF": None, "PYTORCH_ALLOC_CONF": user_setting}
    else:
        assert seen == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTORCH_ALLOC_CONF": None}


def test_stop_request_is_graceful() -> None:
    run = make_run()
    start(run, steps=500, step_s=0.02)
    _running(run, 3)
    progress: list[str] = []
    assert launcher.stop(run, grace_s=10, on_progress=progress.append) == "graceful"
    assert progress and "checkpoint" in progress[0]
    evs = events(run)
    _assert_seqs(evs)
    *_, checkpoint, finished = evs
    assert checkpoint["type"] == "checkpoint" and finished["type"] == "finished"
    assert finished["status"] == "cancelled"
    last_step = [e["step"] for e in evs if e["type"] == "step"][-1]
    assert checkpoint["step"] == finished["step"] == last_step >= 3
    assert run.state() == "cancelled" and run.status()["state"] == "cancelled"
    assert launcher.stop(run) == "not running"


def test_sigkill_leaves_a_dead_run() -> None:
    run = make_run()
    start(run, steps=500, step_s=0.02)
    _running(run, 2)
    os.killpg(run.status()["pgid"], signal.SIGKILL)
    wait_for(lambda: not run.engine_alive(), what="the lock to be released", run=run)
    assert run.status()["state"] == "running"  # nobody got to write anything else ...
    assert run.state() == "dead"  # ... but the free lock says the engine is gone
    evs = events(run)
    _assert_seqs(evs)
    assert "finished" not in types(evs)
    assert launcher.stop(run) == "not running"


def test_sigterm_to_the_process_group_is_a_graceful_stop() -> None:
    run = make_run()
    start(run, steps=500, step_s=0.02)
    _running(run, 2)
    assert not run.stop_path.exists()
    os.killpg(run.status()["pgid"], signal.SIGTERM)
    finished = wait_finished(run)
    assert finished["status"] == "cancelled"
    assert types(events(run))[-2:] == ["checkpoint", "finished"]
    assert run.state() == "cancelled"


def test_trainer_failure_is_recorded_with_a_hint() -> None:
    run = make_run()
    start(run, steps=10, step_s=0.01, fail=True)
    finished = wait_finished(run)
    # Step 1 was done; the engine takes the step from status.json, whose step updates are throttled.
    assert finished["status"] == "failed" and finished["step"] in (0, 1)
    evs = events(run)
    _assert_seqs(evs)
    error = next(e for e in evs if e["type"] == "error")
    assert types(evs)[-2:] == ["error", "finished"]
    assert error["error_type"] == "RuntimeError" and "CUDA out of memory" in error["message"]
    assert "out of memory" in error["hint"] and "micro_batch_size" in error["hint"]
    assert "fake_trainer.py" in error["traceback"]
    assert run.state() == "failed"
    assert run.status()["error"]["hint"] == error["hint"]
    assert "Traceback" in run.log_path.read_text()  # the full traceback goes to engine.log


def test_resume_after_cancel_continues_steps_and_seq() -> None:
    run = make_run()
    start(run, steps=30, step_s=0.02)
    _running(run, 4)
    assert launcher.stop(run, grace_s=10) == "graceful"
    first_life = events(run)
    stopped_at = first_life[-1]["step"]
    assert 4 <= stopped_at < 30 and run.stop_path.exists()

    start(run, resume=True, steps=30, step_s=0.01)
    # From the moment launch() returns the run is live again, never the old `cancelled`.
    assert run.state() in rundir.LIVE_STATES
    finished = wait_finished(run)
    assert finished["status"] == "completed" and finished["step"] == 30
    evs = events(run)
    assert evs[:len(first_life)] == first_life
    _assert_seqs(evs)  # 1, 2, 3, ... across both engine lives
    second_life = evs[len(first_life):]
    assert second_life[0]["type"] == "started"
    assert [e["step"] for e in second_life if e["type"] == "step"] == list(range(stopped_at + 1, 31))
    assert [e["step"] for e in evs if e["type"] == "step"] == list(range(1, 31))
    assert types(evs).count("started") == 2 and types(evs).count("finished") == 2
    assert not run.stop_path.exists()
    assert run.state() == "completed"


def test_resume_waits_for_an_engine_that_has_recorded_its_end_to_exit() -> None:
    import threading

    run = make_run()
    start(run, steps=30, step_s=0.02)
    _running(run, 4)
    assert launcher.stop(run, grace_s=10) == "graceful"
    lingering = rundir.acquire_lock(run.lock_path)  # as an engine still exiting after writing `cancelled`
    assert run.state() == "cancelled" and run.engine_alive()
    threading.Timer(1.0, os.close, (lingering,)).start()
    start(run, resume=True, steps=30, step_s=0.01)  # waits for the lock instead of "already running"
    assert wait_finished(run)["status"] == "completed"


def test_a_second_engine_is_refused_while_the_lock_is_held() -> None:
    run = make_run()
    start(run, steps=500, step_s=0.02)
    _running(run)
    with pytest.raises(BlockingIOError):
        launcher.launch(run, env=fake_env())
    direct = subprocess.run([PYTHON, "-m", "tunewiz.engine.run.worker", str(run.path)], env=fake_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=20)
    assert direct.returncode != 0 and "already has a live engine" in direct.stderr
    assert run.engine_alive() and run.state() == "running"
    assert types(events(run)).count("started") == 1
    assert launcher.stop(run, grace_s=10) == "graceful"
    assert types(events(run)).count("started") == 1


# A stand-in that ignores the stop file (it only notices SIGTERM), and one that ignores everything.
STUBBORN = textwrap.dedent("""
    import time
    from tunewiz.engine.run.context import TrainOutcome

    def _steps(ctx, until):
        step = 0
        while not until() and step < 3000:
            step += 1
            time.sleep(0.01)
            ctx.emit("step", step=step, total_steps=3000, epoch=0.0, loss=1.0, learning_rate=1e-4,
                     elapsed_s=0.01 * step)
        return step

    def deaf_to_stop_file(ctx):
        step = _steps(ctx, ctx.stop_event.is_set)
        ctx.emit("checkpoint", step=step, path="nowhere")
        return TrainOutcome("cancelled", step)

    def deaf_to_everything(ctx):
        return TrainOutcome("completed", _steps(ctx, lambda: False))
""")


def _start_stubborn(run: RunDir, tmp_path: Path, trainer: str) -> None:
    (tmp_path / "stubborn_trainer.py").write_text(STUBBORN)
    env = fake_env(TUNEWIZ_TRAINER=f"stubborn_trainer:{trainer}")
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    launcher.launch(run, env=env)
    _running(run, 2)


def test_stop_escalates_to_sigterm(tmp_path: Path) -> None:
    run = make_run()
    _start_stubborn(run, tmp_path, "deaf_to_stop_file")
    run.request_stop()
    assert run.state() == "stopping"
    progress: list[str] = []
    assert launcher.stop(run, grace_s=0.3, term_grace_s=10, on_progress=progress.append) == "terminated"
    assert any("SIGTERM" in line for line in progress)
    assert wait_finished(run)["status"] == "cancelled"
    assert run.state() == "cancelled"


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    run = make_run()
    _start_stubborn(run, tmp_path, "deaf_to_everything")
    assert launcher.stop(run, grace_s=0.2, term_grace_s=0.3) == "killed"
    assert not run.engine_alive() and run.state() == "dead"
    assert "finished" not in types(events(run))


def test_stop_never_signals_an_engine_on_another_host(tmp_path: Path) -> None:
    run = make_run()
    _start_stubborn(run, tmp_path, "deaf_to_everything")
    run.update_status(host="some-other-node")  # as a run on shared storage started elsewhere records it
    outcome = launcher.stop(run, grace_s=0.2, term_grace_s=0.3)
    assert outcome == "still running on some-other-node; run `tunewiz stop` there to signal it"
    assert run.engine_alive()  # its process group number was not used here
