"""Helpers for tests that start real engine processes: with the stand-in trainer (tests/fake_trainer.py), or
training for real through the CLI (`train_through_cli`, the GPU tests)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

from tests.conftest import PYTHON, ROOT, subprocess_env
from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.run import launcher, rundir
from tunewiz.engine.run.events import validate

FAKE_TRAINER = "tests.fake_trainer:train"
SPEC_TEXT = 'name = "t"\n[dataset]\npreset = "demo"\n'


def fake_env(steps: int = 20, step_s: float = 0.05, fail: bool = False, **extra: str) -> dict[str, str]:
    """A child environment running the stand-in trainer at the given pace."""
    env = subprocess_env(**{"TUNEWIZ_TRAINER": FAKE_TRAINER, "FAKE_STEPS": str(steps),
                            "FAKE_STEP_S": str(step_s), **extra})
    env.pop("FAKE_FAIL", None)
    if fail:
        env["FAKE_FAIL"] = "1"
    return env


def make_run(name: str = "t") -> rundir.RunDir:
    return rundir.create(spec_mod.loads(SPEC_TEXT.replace('"t"', f'"{name}"')))


def start(run: rundir.RunDir, resume: bool = False, **fake: Any) -> int:
    return launcher.launch(run, resume=resume, env=fake_env(**fake))


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02, run: rundir.RunDir | None = None) -> Any:
    """Poll until `predicate()` is truthy and return its value; fail with context after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = ""
            if run is not None:
                log = run.log_path.read_text(errors="replace") if run.log_path.exists() else "(no log)"
                detail = f"\nstatus: {run.status()}\nengine.log:\n{log[-3000:]}"
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


def events(run: rundir.RunDir) -> list[dict[str, Any]]:
    """Every complete line of events.jsonl, each checked against the schema."""
    if not run.events_path.exists():
        return []
    text = run.events_path.read_text(encoding="utf-8")
    out = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # a line still being written
        obj = json.loads(line)
        problems = validate(obj)
        assert not problems, f"invalid event {obj}: {problems}"
        out.append(obj)
    return out


def types(evs: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in evs]


def steps_seen(run: rundir.RunDir) -> int:
    return sum(e["type"] == "step" for e in events(run))


def wait_finished(run: rundir.RunDir, timeout: float = 15.0) -> dict[str, Any]:
    """Wait until the engine has written `finished` and let go of the lock; return that event."""
    wait_for(lambda: not run.engine_alive(), timeout, "the engine to exit", run=run)
    finished = [e for e in events(run) if e["type"] == "finished"]
    assert finished, f"no finished event: {types(events(run))}"
    return finished[-1]


def kill_leftovers() -> None:
    """SIGKILL the engine of every run still alive (test teardown: no engine outlives its test)."""
    import os
    import signal

    for run in rundir.list_runs():
        if run.engine_alive():
            pgid = run.status().get("pgid")
            if isinstance(pgid, int):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def train_through_cli(preset: str, name: str, settings: list[str], timeout: float = 900
                      ) -> tuple[rundir.RunDir, list[dict[str, Any]]]:
    """`tunewiz train PRESET --name NAME --set ...` for real; asserts that it succeeded (showing its output and
    the engine's log otherwise) and that every event it wrote is valid. Returns the run and its events."""
    command = [PYTHON, "-m", "tunewiz.engine", "train", preset, "--name", name]
    for setting in settings:
        command += ["--set", setting]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=timeout)
    runs = rundir.list_runs()  # none when the command failed before it made one (a bad setting)
    log = runs[0].log_path.read_text(errors="replace")[-4000:] if runs and runs[0].log_path.exists() else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + log
    run = runs[0]
    stream = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    assert all(validate(e) == [] for e in stream)
    return run, stream
