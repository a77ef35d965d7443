"""Start the engine detached from the terminal, and stop it: request, then SIGTERM, then SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from tunewiz.engine.errors import TunewizError
from tunewiz.engine.run.rundir import FINAL_STATES, RunDir, acquire_lock

LOCK_FD_ENV = "TUNEWIZ_LOCK_FD"
ENDING_GRACE_S = 30.0
"""How long a resume waits for an engine that has recorded its end to exit."""


def engine_command(run: RunDir, resume: bool = False) -> list[str]:
    command = [sys.executable, "-m", "tunewiz.engine.run.worker", str(run.path)]
    return command + ["--resume"] if resume else command


def check_resumable(run: RunDir) -> None:
    """Refuse to resume a run that completed: its `finished` event (the record, whatever
    status.json says) means the adapter is saved, and training again would overwrite it."""
    if run.outcome() == "completed":
        raise TunewizError(f"run {run.run_id} completed; its adapter is saved, so there is nothing to resume",
                           hint=f"to train again with the same settings: tunewiz train {run.spec_path}")


def launch(run: RunDir, resume: bool = False, env: dict[str, str] | None = None) -> int:
    """Start the engine on `run` in its own session and return its pid.

    The launcher takes the engine lock first and hands the locked descriptor to the child, so the
    run never looks dead between the start of the process and its first line of Python.
    """
    if resume:
        check_resumable(run)
        if run.state() in FINAL_STATES and run.engine_alive():
            # The last engine has recorded how it ended and is still exiting (closing its log, freeing the GPU).
            _wait(lambda: not run.engine_alive(), ENDING_GRACE_S)
    lock_fd = acquire_lock(run.lock_path)
    # While we hold the lock we are the only writer. A resumed run's status still says how the last
    # engine ended (`cancelled`, `failed`) or names its dead pid/pgid; mark it live, and forget those
    # ids so nobody signals a stale process group, before the new engine records its own.
    run.update_status(state="starting", pid=None, pgid=None)
    run.stop_path.unlink(missing_ok=True)  # a stop request belongs to the engine life it stopped
    child_env = {**os.environ, **(env or {}), LOCK_FD_ENV: str(lock_fd), "PYTHONUNBUFFERED": "1"}
    try:
        with open(os.open(run.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
            process = subprocess.Popen(
                engine_command(run, resume),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, pass_fds=(lock_fd,), env=child_env,
            )
    finally:
        os.close(lock_fd)  # the child's copy keeps the lock
    # The engine records its own pid and process group in status.json (one writer, no race).
    return process.pid


def _wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def stop(run: RunDir, grace_s: float = 120.0, term_grace_s: float = 30.0,
         on_progress: Callable[[str], None] | None = None) -> str:
    """Stop a run and return how: `not running`, `graceful`, `terminated` or `killed`.

    First a stop request (the engine finishes its step, saves a checkpoint and ends `cancelled`),
    then SIGTERM to the engine's process group (handled the same way), then SIGKILL.
    """
    say = on_progress or (lambda _msg: None)
    if not run.engine_alive():
        return "not running"
    run.request_stop()
    say("stop requested: the engine finishes its step and saves a checkpoint")
    if _wait(lambda: not run.engine_alive(), grace_s):
        return "graceful"
    status = run.status()
    if not isinstance(status.get("pgid"), int):  # status.json lost or damaged: engine.pid still names the engine
        status = run.recorded_engine() or status
    pgid = status.get("pgid")
    host = status.get("host")
    if isinstance(host, str) and host != socket.gethostname():
        # A process group number means nothing on another machine (a run on shared storage).
        if not run.engine_alive():
            return "graceful"
        return f"still running on {host}; run `tunewiz stop` there to signal it"
    if not isinstance(pgid, int):
        return "graceful" if not run.engine_alive() else "no pid recorded; cannot signal"
    for sig, wait_s, outcome in ((signal.SIGTERM, term_grace_s, "terminated"), (signal.SIGKILL, 10.0, "killed")):
        if not run.engine_alive():  # checked right before signalling: the pid is still ours
            return "graceful"
        say(f"engine still running after the grace period; sending {sig.name}")
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        if _wait(lambda: not run.engine_alive(), wait_s):
            return outcome
    return "killed"
