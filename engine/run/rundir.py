"""The run directory: the only channel between the engine process and its viewers.

Layout (docs/run-protocol.md is the reference for other clients):
  spec.toml     the resolved spec; relaunching a run reads it
  events.jsonl  append-only typed events (engine/run/events.py)
  status.json   small summary, atomically replaced (state, pid, step, loss, ...)
  .tunewiz-run  the marker that tunewiz created this directory (only such directories count as runs)
  engine.lock   flock-ed by the engine for its whole life: free lock = no engine
  engine.pid    the live engine's pid, process group, host and start time: found even if the lock is gone
  stop          created to ask the engine to stop gracefully (checkpoint, then `cancelled`)
  engine.log    the engine's stdout and stderr
  output/       checkpoints and the final adapter (unless the spec names another output_dir)
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunewiz.engine import locations
from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.errors import TunewizError
from tunewiz.engine.fileio import atomic_write_json, read_json, slug
from tunewiz.engine.run.events import EventReader

LIVE_STATES = ("starting", "running", "stopping")
EVAL_REPORT_NAME = "report.md"
"""The before/after evaluation's report, in RUN/eval/ or a folder under it (engine/use/evaluate.py)."""
FINAL_STATES = ("completed", "failed", "cancelled")
MARKER_NAME = ".tunewiz-run"
CHECKPOINT_MARKER = "tunewiz-complete.json"
RESERVE_NAME = ".disk-reserve"
RESERVE_BYTES = 256 * 1024  # room to record a failure once the disk is full (engine/run/worker.py)
PRIVATE_DIR = 0o700

# The types readers may rely on for the keys of status.json; a key of another type is dropped on read.
STATUS_TYPES: dict[str, tuple[type, ...]] = {
    "state": (str,), "run_id": (str,), "name": (str,), "model": (str,), "method": (str,), "host": (str,),
    "phase": (str,), "last_event": (str,), "pid": (int,), "pgid": (int,), "step": (int,), "total_steps": (int,),
    "last_seq": (int,), "created": (int, float), "updated": (int, float), "started": (int, float),
    "finished": (int, float), "loss": (int, float), "epoch": (int, float), "eta_s": (int, float),
    "eval_loss": (int, float), "metrics": (dict,), "error": (dict,),
}


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

    @property
    def marker_path(self) -> Path:
        return self.path / MARKER_NAME

    @property
    def pid_path(self) -> Path:
        return self.path / "engine.pid"

    @property
    def reserve_path(self) -> Path:
        return self.path / RESERVE_NAME

    def marker(self) -> dict[str, Any]:
        """What tunewiz recorded when it created the run (e.g. the user's consent to remote code)."""
        return read_json(self.marker_path) or {}

    def output_dir(self, spec: spec_mod.RunSpec | None = None) -> Path:
        spec = spec or self.load_spec()
        return Path(spec.output_dir).expanduser() if spec.output_dir else self.path / "output"

    def load_spec(self) -> spec_mod.RunSpec:
        return spec_mod.load(self.spec_path)

    def trusted_spec(self) -> spec_mod.RunSpec:
        """The spec, for loading the model: refused when it runs the model's own code (`trust_remote_code`)
        without the consent recorded when the run was created. Training, chat and export all load through it."""
        spec = self.load_spec()
        if spec.model.trust_remote_code and not self.marker().get("trust_remote_code"):
            raise TunewizError(f"{self.spec_path} sets model.trust_remote_code, which runs Python code from the "
                               "model's folder; a spec alone cannot switch that on",
                               hint="if you trust that code, start the run from the spec with `tunewiz train "
                                    f"{self.spec_path} --trust-remote-code`")
        return spec

    def status(self) -> dict[str, Any]:
        """status.json with every key of the wrong type dropped (a damaged cache must not break readers)."""
        status = read_json(self.status_path) or {}
        return {key: value for key, value in status.items()
                if key not in STATUS_TYPES or value is None
                or (isinstance(value, STATUS_TYPES[key]) and not isinstance(value, bool))}

    def update_status(self, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into status.json (only the engine and the launcher call this)."""
        status = self.status()
        status.update(changes, updated=round(time.time(), 3))
        atomic_write_json(self.status_path, status)
        return status

    def engine_alive(self) -> bool:
        """True while an engine runs on this run: its lock is held, or (the lock file deleted or
        replaced) the process recorded in engine.pid still lives (immune to PID reuse)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return self.recorded_engine() is not None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return self.recorded_engine() is not None

    def recorded_engine(self) -> dict[str, Any] | None:
        """engine.pid's record while that very process still runs on this host, else None."""
        record = read_json(self.pid_path)
        if record is None or record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
            return None
        return record if process_identity(record["pid"]) == record.get("identity") else None

    def record_engine(self) -> None:
        """Write engine.pid for this process (the engine calls this once it holds the lock)."""
        pid = os.getpid()
        atomic_write_json(self.pid_path, {"pid": pid, "pgid": os.getpgid(0), "host": socket.gethostname(),
                                          "identity": process_identity(pid)})

    def outcome(self) -> str | None:
        """How the last engine life ended according to events.jsonl (the record; status.json is a
        cache): its `finished` status, or None when the last life has none."""
        status = None
        for event in EventReader(self.events_path).read_all():
            if event.type == "started":
                status = None
            elif event.type == "finished":
                status = event.get("status")
        return status

    def state(self) -> str:
        """starting/running/stopping while the engine lives; completed/failed/cancelled; or dead."""
        recorded = self.status().get("state", "starting")
        if recorded in FINAL_STATES:
            return recorded
        if self.engine_alive():
            return "stopping" if self.stop_path.exists() and recorded == "running" else recorded
        return self.outcome() or "dead"

    def request_stop(self, reason: str = "user") -> None:
        """Ask the engine to finish its step, save a checkpoint and end as `cancelled`."""
        self.stop_path.write_text(json.dumps({"reason": reason, "time": time.time()}) + "\n")

    def stop_requested(self) -> bool:
        return self.stop_path.exists()


def process_identity(pid: int) -> str | None:
    """Something that tells this process from a later one with the same pid (its start time), or
    None when no such process exists."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()  # after the command name
        return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has ended; field 22 is starttime
    except FileNotFoundError:
        return None
    except OSError:
        pass
    try:  # no /proc (macOS): only whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "alive"


def acquire_lock(lock_path: Path) -> int:
    """Take the engine lock (`RUN/engine.lock`) and return its descriptor. Raises BlockingIOError if
    another process holds it, or if engine.pid names a live engine (whose lock file was deleted)."""
    run = RunDir(lock_path.parent)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other = run.recorded_engine()
        if other is not None and other["pid"] != os.getpid():
            raise BlockingIOError(f"engine pid {other['pid']} still runs on {run.run_id}")
    except BlockingIOError:
        os.close(fd)
        raise
    return fd


def create(spec: spec_mod.RunSpec, runs_root: Path | None = None, trust_remote_code: bool = False) -> RunDir:
    """Make a new run directory (private to the user) holding the marker, the resolved spec and a
    `starting` status; nothing is left behind when that fails (e.g. on a full disk).

    `trust_remote_code` records that the user chose to run the model's own code (a flag, never the
    spec alone: the engine refuses a spec that asks for it without this consent)."""
    root = runs_root or locations.runs_dir()
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(spec.name, limit=40)}-{secrets.token_hex(2)}"
    path = root / run_id
    root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    path.mkdir(mode=PRIVATE_DIR)
    run = RunDir(path)
    try:
        atomic_write_json(run.marker_path, {"run_id": run_id, "created": round(time.time(), 3),
                                            "trust_remote_code": trust_remote_code})
        spec_mod.save(spec, run.spec_path,
                      header=f"tunewiz run {run_id}\nRelaunch: tunewiz train {run.spec_path}")
        run.update_status(state="starting", run_id=run_id, name=spec.name, model=spec.model.name,
                          method=spec.method, created=round(time.time(), 3))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return run


def is_run_dir(path: Path) -> bool:
    """Whether tunewiz created `path` as a run directory (it holds the marker and a spec)."""
    return path.is_dir() and (path / MARKER_NAME).is_file() and (path / "spec.toml").is_file()


def adopt_legacy_run(path: Path) -> bool:
    """Mark a run that an older tunewiz made before run folders carried the marker, and say whether it was one.

    Only folders in the runs folder qualify, holding a spec and a status.json that names the folder: what
    tunewiz always wrote. Their checkpoints are sealed by the rule of that time (a readable
    trainer_state.json, written last by the trainer), so they resume as before. No consent to run a
    model's code is carried over: such a spec must be started again with --trust-remote-code."""
    status = read_json(path / "status.json")
    if not (path.is_dir() and status and status.get("run_id") == path.name and (path / "spec.toml").is_file()):
        return False
    run = RunDir(path)
    try:
        output = run.output_dir()
    except Exception:  # noqa: BLE001 - a damaged spec: the run is still listed, and says what is wrong
        output = path / "output"
    for checkpoint in _checkpoint_dirs(output).values():
        if not (checkpoint / CHECKPOINT_MARKER).exists() and read_json(checkpoint / "trainer_state.json"):
            seal_checkpoint(checkpoint)
    atomic_write_json(run.marker_path, {"run_id": path.name, "adopted": round(time.time(), 3),
                                        "trust_remote_code": False})
    return True


def list_runs(runs_root: Path | None = None) -> list[RunDir]:
    """All runs, newest first (runs of an older tunewiz are adopted on the way)."""
    root = runs_root or locations.runs_dir()
    runs = [RunDir(p) for p in root.iterdir() if is_run_dir(p) or adopt_legacy_run(p)]
    return sorted(runs, key=lambda r: r.run_id, reverse=True)


def find(prefix: str, runs_root: Path | None = None) -> RunDir:
    """The run whose id starts with `prefix` (or a run directory path); ambiguity is an error."""
    as_path = Path(prefix).expanduser()
    if is_run_dir(as_path):
        return RunDir(as_path.resolve())
    if as_path.is_dir() and (as_path / "spec.toml").exists():
        raise RunNotFound(f"{as_path} holds a spec.toml but is not a run directory tunewiz created (no "
                          f"{MARKER_NAME} marker), so nothing is written there; start a run from that spec "
                          f"with: tunewiz train {as_path / 'spec.toml'}")
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


@dataclass(frozen=True)
class CheckpointScan:
    """The checkpoints of a run: the newest complete one, and the newer ones skipped with why."""

    best: tuple[Path, int] | None
    skipped: list[tuple[Path, str]]


def seal_checkpoint(path: Path) -> None:
    """Mark a fully written checkpoint complete: fsync its files, then record their sizes.

    Only a checkpoint with this marker counts (the marker is written last, atomically), so a crash
    or a full disk part-way through a save leaves a checkpoint that resume skips, never one it trusts.
    """
    atomic_write_json(path / CHECKPOINT_MARKER, {"files": fsync_tree(path)})
    fsync_dir(path.parent)


def fsync_tree(path: Path) -> dict[str, int]:
    """fsync every file under `path` (the marker excepted); return their sizes by relative path."""
    sizes = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != CHECKPOINT_MARKER):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            sizes[str(file.relative_to(path))] = os.fstat(fd).st_size
        finally:
            os.close(fd)
    return sizes


def unseal_checkpoint(path: Path) -> None:
    """Withdraw the marker before a checkpoint folder is written again."""
    (path / CHECKPOINT_MARKER).unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted, or None when it is complete."""
    marker = read_json(path / CHECKPOINT_MARKER)
    files = marker.get("files") if marker else None
    if not isinstance(files, dict) or not files:
        return "it was never completed (a crash, a kill or a full disk during the save)"
    for name, size in files.items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, {size} were written (damaged after the save)"
    return None


def _checkpoint_dirs(output_dir: Path) -> dict[int, Path]:
    """Every `checkpoint-N` folder under `output_dir/checkpoints`, complete or not, by step."""
    found = {}
    for path in (output_dir / "checkpoints").glob("checkpoint-*"):
        step_text = path.name.rpartition("-")[2]
        if step_text.isdigit() and path.is_dir():
            found[int(step_text)] = path
    return found


def scan_checkpoints(output_dir: Path) -> CheckpointScan:
    """The newest complete checkpoint under `output_dir/checkpoints`, and the newer broken ones."""
    skipped: list[tuple[Path, str]] = []
    for step, path in sorted(_checkpoint_dirs(output_dir).items(), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return CheckpointScan((path, step), skipped)
        skipped.append((path, problem))
    return CheckpointScan(None, skipped)


def checkpoint_steps(output_dir: Path) -> dict[int, Path]:
    """The complete checkpoints under `output_dir/checkpoints`, by step."""
    return {step: path for step, path in _checkpoint_dirs(output_dir).items() if checkpoint_problem(path) is None}


def latest_checkpoint(output_dir: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint under `output_dir/checkpoints` and its step, if any."""
    return scan_checkpoints(output_dir).best
