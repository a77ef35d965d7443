"""The engine process: `python -m engine.worker RUN_DIR [--resume]`.

It holds the run's lock for its whole life, turns SIGTERM and stop requests into a graceful stop,
runs the trainer, and always ends the event stream with `finished` (or dies visibly: a killed
engine leaves its lock free, which readers report as `dead`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from engine import __version__
from engine.context import EngineContext, TrainOutcome
from engine.errors import TunewizError, hint_for
from engine.events import EventWriter
from engine.launcher import LOCK_FD_ENV
from engine.rundir import RunDir, acquire_lock, latest_checkpoint

TRAINER_ENV = "TUNEWIZ_TRAINER"
DEFAULT_TRAINER = "engine.trainer:train"
TRACEBACK_LINES = 25

Trainer = Callable[[EngineContext], TrainOutcome]


def _load_trainer() -> Trainer:
    """The training function; tests of the launcher and TUI swap in a stand-in through TRAINER_ENV."""
    module_name, _, attr = os.environ.get(TRAINER_ENV, DEFAULT_TRAINER).partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _hold_lock(run: RunDir) -> int:
    inherited = os.environ.pop(LOCK_FD_ENV, None)
    if inherited is not None:
        fd = int(inherited)
        os.set_inheritable(fd, False)
        return fd
    try:
        return acquire_lock(run.lock_path)
    except BlockingIOError:
        sys.exit(f"tunewiz: run {run.run_id} already has a live engine")


def _route_warnings(ctx: EngineContext) -> None:
    """Python warnings become `log` events (each once); library deprecation notices are dropped."""
    seen: set[str] = set()

    def show(message: Warning | str, category: type[Warning], *_args: object, **_kwargs: object) -> None:
        text = f"{category.__name__}: {message}"
        if text not in seen:
            seen.add(text)
            ctx.log(text, level="warning")

    warnings.showwarning = show
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)


def run_engine(run: RunDir, resume: bool = False) -> int:
    """Run the trainer on `run` and record how it ended; returns the process exit code."""
    lock_fd = _hold_lock(run)
    events = EventWriter(run.events_path)
    spec = run.load_spec()
    ctx = EngineContext(run, spec, events, resume=resume)

    def on_signal(signum: int, _frame: object) -> None:
        ctx.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _route_warnings(ctx)
    run.update_status(state="running", pid=os.getpid(), pgid=os.getpgid(0), started=round(time.time(), 3),
                      finished=None, error=None)
    checkpoint = latest_checkpoint(run.output_dir(spec)) if resume else None
    ctx.emit("started", pid=os.getpid(), host=socket.gethostname(), run_id=run.run_id, version=__version__,
             python=sys.version.split()[0], argv=sys.argv, resumed_from_step=checkpoint[1] if checkpoint else None)
    try:
        outcome = _load_trainer()(ctx)
    except BaseException as exc:  # noqa: BLE001 - every failure must end the stream visibly
        _record_failure(ctx, exc)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ctx.emit("finished", status=outcome.status, step=outcome.step, metrics=outcome.metrics,
             output_dir=str(run.output_dir(spec)))
    run.update_status(state=outcome.status, step=outcome.step, finished=round(time.time(), 3),
                      metrics=outcome.metrics)
    os.close(lock_fd)
    return 0


def _record_failure(ctx: EngineContext, exc: BaseException) -> None:
    tail = "".join(traceback.format_exception(exc)).splitlines()[-TRACEBACK_LINES:]
    message = str(exc) or type(exc).__name__
    hint = hint_for(exc)
    if not isinstance(exc, TunewizError):
        traceback.print_exception(exc)  # the full traceback goes to engine.log
    ctx.emit("error", error_type=type(exc).__name__, message=message, hint=hint, traceback="\n".join(tail))
    ctx.emit("finished", status="failed", step=ctx.last_step)
    ctx.run.update_status(state="failed", finished=round(time.time(), 3),
                          error={"type": type(exc).__name__, "message": message, "hint": hint})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.worker", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = parser.parse_args(argv)
    return run_engine(RunDir(args.run_dir.resolve()), resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
