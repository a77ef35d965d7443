"""The run directory: the only channel between the engine process and its viewers.

Layout (docs/run-protocol.md is the reference for other clients):
  spec.toml     the resolved spec; relaunching a run reads it
  events.jsonl  append-only typed events (engine/events.py)
  status.json   small summary, atomically replaced (state, pid, step, loss, ...)
  engine.lock   flock-ed by the engine for its whole life: free lock = no engine
  stop          created to ask the engine to stop gracefully (checkpoint, then `cancelled`)
  engine.log    the engine's stdout and stderr
  output/       checkpoints and the final adapter (unless the spec names another output_dir)
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import locations, spec as spec_mod
from engine.fileio import atomic_write_json, read_json

LIVE_STATES = ("starting", "running", "stopping")
FINAL_STATES = ("completed", "failed", "cancelled")


class RunNotFound(LookupError):
    """No run matches what the user typed."""


@dataclass(frozen=True)
class RunDir:
    """Paths and state of one run."""

    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def spec_path(self) -> Path:
        return self.path / "spec.toml"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def lock_path(self) -> Path:
        return self.path / "engine.lock"

    @property
    def stop_path(self) -> Path:
        return self.path / "stop"

    @property
    def log_path(self) -> Path:
        return self.path / "engine.log"

    def output_dir(self, spec: spec_mod.RunSpec | None = None) -> Path:
        spec = spec or self.load_spec()
        return Path(spec.output_dir).expanduser() if spec.output_dir else self.path / "output"

    def load_spec(self) -> spec_mod.RunSpec:
        return spec_mod.load(self.spec_path)

    def status(self) -> dict[str, Any]:
        return read_json(self.status_path) or {}

    def update_status(self, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into status.json (only the engine and the launcher call this)."""
        status = self.status()
        status.update(changes, updated=round(time.time(), 3))
        atomic_write_json(self.status_path, status)
        return status

    def engine_alive(self) -> bool:
        """True while some process holds the engine lock (immune to PID reuse)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def state(self) -> str:
        """starting/running/stopping while the engine lives; completed/failed/cancelled; or dead."""
        recorded = self.status().get("state", "starting")
        if recorded in FINAL_STATES:
            return recorded
        if self.engine_alive():
            return "stopping" if self.stop_path.exists() and recorded == "running" else recorded
        return "dead"

    def request_stop(self, reason: str = "user") -> None:
        """Ask the engine to finish its step, save a checkpoint and end as `cancelled`."""
        self.stop_path.write_text(json.dumps({"reason": reason, "time": time.time()}) + "\n")

    def stop_requested(self) -> bool:
        return self.stop_path.exists()


def acquire_lock(lock_path: Path) -> int:
    """Take the engine lock and return its descriptor; raises BlockingIOError if another holds it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    return fd


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:40] or "run"


def create(spec: spec_mod.RunSpec, runs_root: Path | None = None) -> RunDir:
    """Make a new run directory holding the resolved spec and a `starting` status."""
    root = runs_root or locations.runs_dir()
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(spec.name)}-{secrets.token_hex(2)}"
    path = root / run_id
    path.mkdir(parents=True)
    run = RunDir(path)
    spec_mod.save(spec, run.spec_path, header=f"tunewiz run {run_id}\nRelaunch: tunewiz train {run.spec_path}")
    run.update_status(state="starting", run_id=run_id, name=spec.name, model=spec.model.name,
                      method=spec.method, created=round(time.time(), 3))
    return run


def list_runs(runs_root: Path | None = None) -> list[RunDir]:
    """All runs, newest first."""
    root = runs_root or locations.runs_dir()
    runs = [RunDir(p) for p in root.iterdir() if p.is_dir() and (p / "spec.toml").exists()]
    return sorted(runs, key=lambda r: r.run_id, reverse=True)


def find(prefix: str, runs_root: Path | None = None) -> RunDir:
    """The run whose id starts with `prefix` (or a run directory path); ambiguity is an error."""
    as_path = Path(prefix).expanduser()
    if as_path.is_dir() and (as_path / "spec.toml").exists():
        return RunDir(as_path.resolve())
    runs = list_runs(runs_root)
    if prefix in ("last", "latest") and runs:
        return runs[0]
    exact = [r for r in runs if r.run_id == prefix]
    matches = exact or [r for r in runs if r.run_id.startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = ", ".join(r.run_id for r in runs[:5]) or "none yet"
        raise RunNotFound(f"no run id starts with {prefix!r} (newest: {known}); see `tunewiz runs`")
    names = ", ".join(r.run_id for r in matches[:6])
    raise RunNotFound(f"{prefix!r} matches {len(matches)} runs ({names}); type more of the id")


def checkpoint_steps(output_dir: Path) -> dict[int, Path]:
    """The complete checkpoints under `output_dir/checkpoints`, by step."""
    found = {}
    for path in (output_dir / "checkpoints").glob("checkpoint-*"):
        step_text = path.name.rpartition("-")[2]
        if step_text.isdigit() and (path / "trainer_state.json").exists():
            found[int(step_text)] = path
    return found


def latest_checkpoint(output_dir: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint under `output_dir/checkpoints` and its step, if any."""
    steps = checkpoint_steps(output_dir)
    if not steps:
        return None
    newest = max(steps)
    return steps[newest], newest
