"""Hostile and unlucky inputs, one table: each gets a clear error (or is accepted), and none leaves a
half-made run behind. Engines here run the stand-in trainer (tests/fake_trainer.py)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT
from tests.runtools import events, fake_env, kill_leftovers, make_run, start, steps_seen, wait_finished, wait_for
from tunewiz.engine import locations
from tunewiz.engine.cli import main as cli
from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.data import sources
from tunewiz.engine.errors import DataError
from tunewiz.engine.run import launcher, preflight, rundir
from tunewiz.engine.run.events import EventWriter

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_engine_outlives_its_test(tunewiz_home: Path):
    yield
    kill_leftovers()


@pytest.fixture
def no_preflight(monkeypatch: pytest.MonkeyPatch) -> None:
    import collections

    monkeypatch.setattr(preflight, "check", lambda spec, **_kw: collections.defaultdict(int))


@pytest.mark.parametrize("name", ["my run", "../escape", "", "x" * 65, "naïve"])
def test_a_bad_run_name_is_refused_before_anything_is_made(name: str, no_preflight: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "demo", "--detach", "--name", name]) == 2
    assert "name:" in capsys.readouterr().err
    assert rundir.list_runs() == [] and list(locations.runs_dir().iterdir()) == []


def test_a_folder_with_a_spec_is_not_a_run_unless_tunewiz_made_it(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "spec.toml").write_text('[dataset]\npreset = "demo"\n')
    for command in ("resume", "stop", "tail"):
        assert cli.main([command, str(folder)]) == 2
        assert "not a run directory tunewiz created" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["spec.toml"]  # nothing written there


def test_trust_remote_code_needs_the_flag_not_just_the_spec(tmp_path: Path, no_preflight: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text('[model]\ntrust_remote_code = true\n[dataset]\npreset = "demo"\n')
    assert cli.main(["train", str(spec_file), "--detach"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err and rundir.list_runs() == []
    # A run made without the consent (a spec edited in, or another client): the engine refuses it.
    run = rundir.create(spec_mod.load(spec_file))
    launcher.launch(run, env=fake_env(steps=2, step_s=0.01))
    ended = wait_finished(run)
    error = [e for e in events(run) if e["type"] == "error"][-1]
    assert ended["status"] == "failed" and "--trust-remote-code" in error["hint"]
    # With the flag, the run records the consent and trains.
    consented = rundir.create(spec_mod.load(spec_file), trust_remote_code=True)
    launcher.launch(consented, env=fake_env(steps=2, step_s=0.01))
    assert wait_finished(consented)["status"] == "completed"


def test_train_on_a_full_disk_says_so_and_makes_nothing(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(preflight, "free_bytes", lambda _path: 5_000_000)
    assert cli.main(["train", "demo", "--detach"]) == 2
    err = capsys.readouterr().err
    assert "not enough free space" in err and "5 MB free" in err and "hint:" in err
    assert list(locations.runs_dir().iterdir()) == []


def test_a_launch_that_fails_on_a_full_disk_leaves_no_empty_run(monkeypatch: pytest.MonkeyPatch, no_preflight: None,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def full(*_a: object, **_k: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(locations.runs_dir() / "x" / "engine.log"))

    monkeypatch.setattr(launcher, "launch", full)
    assert cli.main(["train", "demo", "--detach"]) == 2
    assert "is full" in capsys.readouterr().err
    assert list(locations.runs_dir().iterdir()) == []


def test_a_damaged_spec_fails_the_run_visibly_with_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run()
    run.spec_path.write_text("[training\nmax_steps = ")
    assert cli.main(["resume", run.run_id]) == 1
    out = capsys.readouterr().out
    assert "spec cannot be used" in out and "should not be edited" in out and "killed?" not in out
    assert run.state() == "failed"


def test_an_engine_that_dies_before_it_starts_shows_why(capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run()
    run.log_path.write_text("Traceback (most recent call last):\n  ...\nModuleNotFoundError: No module named 'torch'\n")
    assert cli.main(["tail", run.run_id]) == 0
    out = capsys.readouterr().out
    assert "exited before it started: ModuleNotFoundError: No module named 'torch'" in out and "killed?" not in out


def test_the_second_ctrl_c_detaches_and_the_run_goes_on(tmp_path: Path) -> None:
    run = make_run()
    start(run, steps=400, step_s=0.05)
    wait_for(lambda: steps_seen(run) >= 1 and isinstance(run.status().get("pgid"), int), run=run)
    assert launcher.stop(run, grace_s=10) == "graceful"
    out_path = tmp_path / "out.txt"
    with out_path.open("w") as out_file:
        process = subprocess.Popen([PYTHON, "-m", "tunewiz.engine", "resume", run.run_id],
                                   env=fake_env(steps=400, step_s=0.8), cwd=ROOT, stdout=out_file,
                                   stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "step " in out_path.read_text(), what="the command to print a step", run=run)
        process.send_signal(signal.SIGINT)
        wait_for(run.stop_requested, what="the stop request")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0 and "detached" in err
    assert not run.stop_requested()
    seen = steps_seen(run)
    wait_for(lambda: steps_seen(run) > seen + 2, what="more steps after detaching", run=run)
    assert run.state() == "running"


def test_csv_and_jsonl_written_with_a_bom_are_read(tmp_path: Path) -> None:
    bom = "\ufeff"
    csv_file = tmp_path / "excel.csv"
    csv_file.write_text(f"{bom}instruction,output\nsay hi,hi\n", encoding="utf-8")
    jsonl_file = tmp_path / "notepad.jsonl"
    jsonl_file.write_text(f'{bom}{{"instruction": "say hi", "output": "hi"}}\n', encoding="utf-8")
    json_file = tmp_path / "notepad.json"
    json_file.write_text(f'{bom}[{{"instruction": "say hi", "output": "hi"}}]', encoding="utf-8")
    for path in (csv_file, jsonl_file, json_file):
        [row] = list(sources.iter_file(path))
        assert row.data == {"instruction": "say hi", "output": "hi"}, path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_an_overlong_line_is_refused_with_its_number_without_reading_it_whole(
        suffix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 4096)
    path = tmp_path / f"big{suffix}"
    head = "instruction,output\n" if suffix == ".csv" else ""
    first = "a,b\n" if suffix == ".csv" else '{"instruction": "a", "output": "b"}\n'
    path.write_text(head + first + "x" * 100_000 + "\n")
    with pytest.raises(DataError, match=rf"big\{suffix}:{3 if head else 2}: the line is longer than"):
        list(sources.iter_file(path))


def test_files_and_folders_are_private_to_the_user(tunewiz_home: Path) -> None:
    previous = os.umask(0o022)
    try:
        run = make_run()
        EventWriter(run.events_path).emit("log", level="info", message="a prompt from the user's data")
        start(run, steps=2, step_s=0.01)
        wait_finished(run)
    finally:
        os.umask(previous)
    mode = lambda p: oct(p.stat().st_mode & 0o777)  # noqa: E731
    assert {mode(p) for p in (tunewiz_home, locations.runs_dir(), locations.cache_dir(), run.path)} == {"0o700"}
    files = [run.events_path, run.status_path, run.spec_path, run.marker_path, run.log_path, run.lock_path,
             run.pid_path]
    assert {p.name: mode(p) for p in files} == {p.name: "0o600" for p in files}
