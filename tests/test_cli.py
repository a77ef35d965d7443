"""The headless `tunewiz` commands: in-process through tunewiz.engine.cli.main.main, and as `python -m tunewiz.engine`
subprocesses where detaching from the terminal matters. Engines run the stand-in trainer."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import types as pytypes
from pathlib import Path

import pytest

import tunewiz.engine.run as run_package
from tests.conftest import PYTHON, ROOT
from tests.runtools import events, fake_env, kill_leftovers, make_run, start, steps_seen, types, wait_finished, wait_for
from tunewiz.engine import hints, locations
from tunewiz.engine.cli import main as cli
from tunewiz.engine.config import presets
from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.run import launcher, rundir
from tunewiz.engine.run.events import validate

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_engine_outlives_its_test(tunewiz_home: Path):
    yield
    kill_leftovers()


def tunewiz(*args: str, timeout: float = 30, **fake) -> subprocess.CompletedProcess[str]:
    """`python -m tunewiz.engine ARGS` in a child process whose engines run the stand-in trainer."""
    return subprocess.run([PYTHON, "-m", "tunewiz.engine", *args], env=fake_env(**fake), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture()
def finished_run() -> rundir.RunDir:
    run = make_run("done")
    start(run, steps=5, step_s=0.01)
    assert wait_finished(run)["status"] == "completed"
    return run


@pytest.fixture()
def cancelled_run() -> rundir.RunDir:
    run = make_run("halted")
    start(run, steps=500, step_s=0.02)
    wait_for(lambda: steps_seen(run) >= 3 and isinstance(run.status().get("pgid"), int), run=run)
    assert launcher.stop(run, grace_s=10) == "graceful"
    return run


@pytest.fixture()
def fake_preflight(monkeypatch: pytest.MonkeyPatch) -> list:
    """Stand in for tunewiz.engine.run.preflight (being written elsewhere): records the specs it was asked to check."""
    checked: list = []

    def check(spec: spec_mod.RunSpec, **_kw: object) -> dict:
        checked.append(spec)
        return collections.defaultdict(int)

    module = pytypes.ModuleType("tunewiz.engine.run.preflight")
    module.check = check
    monkeypatch.setitem(sys.modules, "tunewiz.engine.run.preflight", module)
    monkeypatch.setattr(run_package, "preflight", module, raising=False)
    return checked


# ---------------------------------------------------------------------------------------------
# In-process


def test_presets_lists_builtin_and_user_presets(capsys: pytest.CaptureFixture[str]) -> None:
    spec = spec_mod.loads('name = "mine"\ndescription = "my own tweak"\n[dataset]\npreset = "demo"\n')
    path = presets.save_user_preset(spec, "mine")
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    demo = next(line for line in lines if line.startswith("demo "))
    assert "built-in" in demo and "headline sentiment" in demo
    mine = next(line for line in lines if line.startswith("mine "))
    assert mine.split()[1] == "user" and mine.endswith("my own tweak")

    assert cli.main(["presets", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["demo"]["origin"] == "built-in"
    assert listed["mine"] == {"name": "mine", "description": "my own tweak", "origin": "user", "path": str(path)}


def test_locate_prints_paths_under_tunewiz_home(tunewiz_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["locate"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert set(rows) == {"config", "state", "data", "cache", "runs", "presets"}
    assert all(Path(p).is_relative_to(tunewiz_home) for p in rows.values())
    assert cli.main(["locate", "runs"]) == 0
    assert capsys.readouterr().out.strip() == str(locations.runs_dir()) == rows["runs"]
    assert Path(rows["runs"]).is_dir()


def test_runs_on_an_empty_home(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["runs"]) == 0
    assert "no runs yet" in capsys.readouterr().out
    assert cli.main(["runs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_runs_lists_runs_with_their_state(finished_run: rundir.RunDir, capsys: pytest.CaptureFixture[str]) -> None:
    never_started = make_run("idle")
    assert cli.main(["runs", "--json"]) == 0
    rows = {row["run_id"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {finished_run.run_id, never_started.run_id}
    done = rows[finished_run.run_id]
    assert done["state"] == "completed" and done["step"] == 5 and done["name"] == "done"
    assert done["model"] == "smollm2-135m-demo" and done["method"] == "lora"
    assert isinstance(done["duration_s"], float) and done["duration_s"] >= 0
    assert rows[never_started.run_id]["state"] == "dead"  # `starting`, but no engine holds the lock

    assert cli.main(["runs"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["RUN", "STATE"]
    line = next(row for row in table if row.startswith(finished_run.run_id))
    assert line.split()[1] == "completed" and "5/" in line


def test_tail_prints_the_events_of_a_finished_run(finished_run: rundir.RunDir,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["tail", finished_run.run_id[:-3]]) == 0  # a unique prefix is enough
    out = capsys.readouterr().out
    assert "engine started" in out and "[train] fake training for 5 steps" in out
    assert "step 5/5" in out
    assert out.rstrip().splitlines()[-1].endswith(f"finished: completed at step 5; adapter in "
                                                  f"{finished_run.path / 'output'}")

    assert cli.main(["tail", "last", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == events(finished_run)
    assert all(not validate(e) for e in lines)


def test_tail_of_a_dead_run_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run()
    assert cli.main(["tail", run.run_id]) == 0
    assert f"gone without finishing (killed?). Resume it: {hints.command(f'resume {run.run_id}')}" in \
        capsys.readouterr().out


def test_run_ids_ambiguous_and_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    first, second = make_run("a"), make_run("b")
    prefix = os.path.commonprefix([first.run_id, second.run_id])
    assert prefix
    assert cli.main(["tail", prefix]) == 2
    err = capsys.readouterr().err
    assert "matches 2 runs" in err and first.run_id in err and "type more of the id" in err
    assert cli.main(["tail", "nosuchrun"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tunewiz: no run id starts with 'nosuchrun'") and "tunewiz runs" in err
    for command in ("stop", "resume"):
        assert cli.main([command, "nosuchrun"]) == 2
        assert "no run id starts with" in capsys.readouterr().err


def test_stop_on_a_run_that_is_not_running(finished_run: rundir.RunDir,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["stop", finished_run.run_id]) == 0
    assert capsys.readouterr().out.strip() == f"run {finished_run.run_id} is not running (completed)"
    assert not finished_run.stop_path.exists()


def test_train_with_a_bad_set_key_creates_no_run(fake_preflight: list, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "demo", "--set", "training.max_step=5"]) == 2
    err = capsys.readouterr().err
    assert "training.max_step" in err and "did you mean 'training.max_steps'?" in err
    assert cli.main(["train", "demo", "--set", "trainig.max_steps=5"]) == 2
    assert "did you mean 'training'?" in capsys.readouterr().err
    assert cli.main(["train", "demo", "--set", "training.max_steps=0"]) == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert fake_preflight == []
    assert list(locations.runs_dir().iterdir()) == []


def test_train_an_unknown_preset_suggests_presets(fake_preflight: list, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "nosuchpreset"]) == 2
    err = capsys.readouterr().err
    assert "no preset of this name" in err and "(presets: concise, demo" in err
    assert cli.main(["train", "dmeo"]) == 2
    assert "did you mean 'demo'?" in capsys.readouterr().err
    assert cli.main(["train", "missing/spec.toml"]) == 2
    assert "file not found" in capsys.readouterr().err
    assert fake_preflight == []
    assert list(locations.runs_dir().iterdir()) == []


def test_resume_refuses_a_completed_run(finished_run: rundir.RunDir, capsys: pytest.CaptureFixture[str]) -> None:
    before = events(finished_run)
    assert cli.main(["resume", finished_run.run_id]) == 2
    err = capsys.readouterr().err
    assert f"completed; relaunch it instead: {hints.command('train')}" in err and str(finished_run.spec_path) in err
    assert events(finished_run) == before and not finished_run.engine_alive()


def test_resume_refuses_a_live_run(capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run()
    start(run, steps=500, step_s=0.02)
    wait_for(lambda: run.state() == "running" and "started" in types(events(run)), run=run)
    assert cli.main(["resume", run.run_id]) == 2
    assert "is still running; nothing to resume" in capsys.readouterr().err
    assert types(events(run)).count("started") == 1


# ---------------------------------------------------------------------------------------------
# As separate processes: detaching, following, stopping, Ctrl-C


def test_resume_detached_then_tail_follow(cancelled_run: rundir.RunDir) -> None:
    run = cancelled_run
    stopped_at = run.status()["step"]
    resumed = tunewiz("resume", run.run_id[:-2], "--detach", steps=40, step_s=0.03)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == f"resuming run {run.run_id}"
    assert run.engine_alive()  # the command is gone, the engine is not

    followed = tunewiz("tail", run.run_id, "-f")
    assert followed.returncode == 0, followed.stderr
    lines = followed.stdout.splitlines()
    assert lines[-1].endswith(f"finished: completed at step 40; adapter in {run.path / 'output'}")
    assert sum("engine started" in line for line in lines) == 2
    assert f"finished: cancelled at step {stopped_at}" in followed.stdout
    assert run.state() == "completed"
    evs = events(run)
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))


def test_stop_command_stops_a_live_run() -> None:
    run = make_run()
    start(run, steps=500, step_s=0.02)
    wait_for(lambda: steps_seen(run) >= 2 and isinstance(run.status().get("pgid"), int), run=run)
    stopped = tunewiz("stop", run.run_id, "--wait", "10")
    assert stopped.returncode == 0, stopped.stderr
    assert "stop requested" in stopped.stdout
    assert stopped.stdout.strip().endswith(f"run {run.run_id}: graceful; state cancelled")
    assert types(events(run))[-2:] == ["checkpoint", "finished"]


def test_resume_in_the_foreground_follows_the_new_engine(cancelled_run: rundir.RunDir) -> None:
    run = cancelled_run
    before = len(events(run))
    resumed = tunewiz("resume", run.run_id, steps=20, step_s=0.01)
    assert resumed.returncode == 0, resumed.stderr
    lines = resumed.stdout.splitlines()
    assert lines[0] == f"resuming run {run.run_id}"
    assert "engine started" in lines[1]  # only the new engine's events, not the old run's
    assert "finished: cancelled" not in resumed.stdout
    assert lines[-1].endswith("finished: completed at step 20; adapter in " + str(run.path / "output"))
    assert run.state() == "completed"
    assert len(lines) - 1 == len(events(run)) - before


def test_ctrl_c_in_the_foreground_stops_the_run_gracefully(cancelled_run: rundir.RunDir, tmp_path: Path) -> None:
    run = cancelled_run
    out_path = tmp_path / "stdout.txt"
    with out_path.open("w") as out_file:
        process = subprocess.Popen([PYTHON, "-m", "tunewiz.engine", "resume", run.run_id],
                                   env=fake_env(steps=500, step_s=0.02), cwd=ROOT, stdout=out_file,
                                   stderr=subprocess.PIPE, text=True)
    try:
        # Once the command prints a step it is following, with its Ctrl-C handler in place.
        wait_for(lambda: "step " in out_path.read_text(), what="the command to print a step", run=run)
        process.send_signal(signal.SIGINT)  # what the terminal sends the foreground command on Ctrl-C
        _, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "stopping after this step" in err
    out = out_path.read_text()
    assert out.splitlines()[-1].split(" ", 1)[1].startswith("finished: cancelled at step")
    assert run.state() == "cancelled"
    assert types(events(run))[-2:] == ["checkpoint", "finished"]


# `tunewiz train` with tunewiz.engine.run.preflight replaced by a no-op (the real one converts the model and
# prepares the data, which is tested on its own), so that only the CLI and the detached engine run.
TRAIN_WITHOUT_PREFLIGHT = (
    "import collections, sys, types; stub = types.ModuleType('tunewiz.engine.run.preflight'); "
    "stub.check = lambda spec, **kw: collections.defaultdict(int); "
    "sys.modules['tunewiz.engine.run.preflight'] = stub\n"
    "from tunewiz.engine.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


def test_train_detached_returns_at_once_and_the_run_goes_on() -> None:
    started = subprocess.run([PYTHON, "-c", TRAIN_WITHOUT_PREFLIGHT, "train", "demo", "--detach", "--name", "e2e",
                              "--set", "training.max_steps=7"], env=fake_env(steps=30, step_s=0.03), cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    [run] = rundir.list_runs()
    assert "-e2e-" in run.run_id
    assert run.engine_alive() and run.state() in ("starting", "running")
    pid = wait_for(lambda: run.status().get("pid"), what="the engine's pid", run=run)
    started_line, follow_line = started.stdout.splitlines()[-2:]
    assert started_line == f"run {run.run_id} started (engine pid {pid}); files in {run.path}"
    # the command works as printed from where the user is: `tunewiz`, the venv's script or `python -m tunewiz.engine`
    assert re.fullmatch(rf"follow it: (\S*tunewiz|\S+ -m tunewiz.engine) tail {run.run_id} -f    stop it: \1 stop "
                        rf"{run.run_id}", follow_line), follow_line
    spec = run.load_spec()
    assert spec.name == "e2e" and spec.training.max_steps == 7 and spec.dataset.preset == "demo"
    assert wait_finished(run)["status"] == "completed"
    assert "finished: completed at step 30" in tunewiz("tail", "last").stdout


def test_train_in_the_foreground_follows_until_the_end() -> None:
    done = subprocess.run([PYTHON, "-c", TRAIN_WITHOUT_PREFLIGHT, "train", "demo"],
                          env=fake_env(steps=5, step_s=0.01), cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    [run] = rundir.list_runs()
    lines = done.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(f"run {run.run_id} started"))
    assert "engine started" in lines[first + 1]
    assert lines[-1].endswith(f"finished: completed at step 5; adapter in {run.path / 'output'}")
    assert run.state() == "completed"


def test_train_detached_with_the_real_preflight(demo_model: Path) -> None:
    pytest.importorskip("tunewiz.engine.run.preflight")
    started = tunewiz("train", "demo", "--detach", steps=5, step_s=0.01, timeout=300)
    assert started.returncode == 0, started.stderr
    [run] = rundir.list_runs()
    assert f"run {run.run_id} started" in started.stdout and "training examples" in started.stdout
    assert wait_finished(run)["status"] == "completed"
