"""The engine process: `python -m tunewiz.engine.run.worker RUN_DIR [--resume]`.

It holds the run's lock for its whole life, turns SIGTERM and stop requests into a graceful stop,
runs the trainer, and always ends the event stream with `finished` (or dies visibly: a killed
engine leaves its lock free, which readers report as `dead`).

On several GPUs this process is the supervisor: it keeps the lock, starts one rank per GPU through
`accelerate launch` (`--rank-worker`), passes stop requests on, and once the ranks are gone makes
sure the stream ends: rank 0 writes the run's events as a single engine would, and when any rank
failed the supervisor ends the run as failed with that rank's error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunewiz.engine import __version__
from tunewiz.engine.config.spec import RunSpec, SpecError
from tunewiz.engine.errors import TunewizError, hint_for
from tunewiz.engine.fileio import atomic_write_json, disk_trouble, free_bytes
from tunewiz.engine.run import ranks
from tunewiz.engine.run.context import EngineContext, TrainOutcome
from tunewiz.engine.run.events import EventWriter
from tunewiz.engine.run.launcher import LOCK_FD_ENV, check_resumable
from tunewiz.engine.run.rundir import (
    FINAL_STATES,
    RESERVE_BYTES,
    RunDir,
    acquire_lock,
    latest_checkpoint,
    scan_checkpoints,
)
from tunewiz.engine.training import distributed

TRAINER_ENV = "TUNEWIZ_TRAINER"
DEFAULT_TRAINER = "tunewiz.engine.training.trainer:train"
TRACEBACK_LINES = 25
SUPERVISED_ENV = "TUNEWIZ_SUPERVISED"  # set for ranks whose supervisor holds the lock
RANK_ERROR_GLOB = "rank-*.error.json"
# PyTorch's allocator grows its segments instead of caching fixed blocks: the reserved peak stays nearer the
# allocated one (an 8B LoRA run on one H200 reserved 0.38 GiB more than it allocated without it, 0.23 GiB
# with it; bench/results/speed.jsonl). Set before CUDA starts; the user's own setting, under either name
# PyTorch reads, wins.
ALLOCATOR_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
ALLOCATOR_SETTING = "expandable_segments:True"

Trainer = Callable[[EngineContext], TrainOutcome]


def _load_trainer() -> Trainer:
    """The training function; tests of the launcher and TUI swap in a stand-in through TRAINER_ENV."""
    module_name, _, attr = os.environ.get(TRAINER_ENV, DEFAULT_TRAINER).partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _hold_lock(run: RunDir) -> int:
    """Hold the run's lock (inherited from the launcher, or taken here) and record this engine in
    engine.pid, so it is found even if someone deletes the lock file."""
    inherited = os.environ.pop(LOCK_FD_ENV, None)
    if inherited is not None:
        fd = int(inherited)
        os.set_inheritable(fd, False)
    else:
        try:
            fd = acquire_lock(run.lock_path)
        except BlockingIOError:
            sys.exit(f"tunewiz: run {run.run_id} already has a live engine")
    run.record_engine()
    return fd


def _keep_reserve(run: RunDir) -> None:
    """Set aside a little disk space, freed to record the failure should the disk fill up."""
    try:
        with run.reserve_path.open("wb") as handle:
            handle.write(b"\0" * RESERVE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:
        run.reserve_path.unlink(missing_ok=True)  # already full: the failure is recorded as best it can be


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
    """Run the trainer on `run` (or supervise its ranks) and record how it ended; returns the exit code."""
    lock_fd = _hold_lock(run)
    if resume:
        try:
            check_resumable(run)
        except TunewizError as exc:
            sys.exit(f"tunewiz: {exc}")
    _keep_reserve(run)
    try:
        spec = run.trusted_spec()
    except (SpecError, TunewizError) as exc:  # a damaged spec.toml: recorded, with what to do
        _fail_before_start(run, exc)
        return 1
    ctx = EngineContext(run, spec, EventWriter(run.events_path), resume=resume)
    _handle_signals(ctx)
    _route_warnings(ctx)
    run.update_status(state="running", pid=os.getpid(), pgid=os.getpgid(0), host=socket.gethostname(),
                      started=round(time.time(), 3), finished=None, error=None)
    try:
        plan = _launch_plan(ctx)
    except BaseException as exc:  # noqa: BLE001 - a bad GPU selection ends the run visibly
        _emit_started(ctx)
        _record_failure(ctx, exc)
        return 1
    if plan is not None:
        code = _supervise(ctx, plan)
        run.reserve_path.unlink(missing_ok=True)
        os.close(lock_fd)
        return code
    _emit_started(ctx)
    code = _train_and_record(ctx)
    os.close(lock_fd)
    return code


def run_rank(run: RunDir, resume: bool = False) -> int:
    """One rank of a multi-GPU run. Rank 0 writes the run directory; the others only train."""
    _die_with_launcher()
    spec = run.load_spec()
    main = ranks.is_main()
    ctx = EngineContext(run, spec, EventWriter(run.events_path), resume=resume, writes=main)
    _handle_signals(ctx)
    if main:
        _route_warnings(ctx)
        lock_fd = None
        if not os.environ.get(SUPERVISED_ENV):  # several hosts: no supervisor, rank 0 holds the lock
            lock_fd = _hold_lock(run)
            run.update_status(state="running", pid=os.getpid(), pgid=os.getpgid(0), host=socket.gethostname(),
                              started=round(time.time(), 3), finished=None, error=None)
        _emit_started(ctx)
        code = _train_and_record(ctx)
        if lock_fd is not None:
            os.close(lock_fd)
        return code
    try:
        _load_trainer()(ctx)
    except BaseException as exc:  # noqa: BLE001 - the supervisor reports it as the run's failure
        traceback.print_exception(exc)
        _write_rank_error(run, exc)
        return 1
    return 0


def _die_with_launcher(interval_s: float = 1.0) -> None:
    """End this rank if the process that launched it (accelerate's agent) is gone.

    torchrun starts the ranks in sessions of their own, so a SIGKILL to the engine's process group
    (`tunewiz stop` when nothing else worked) kills the supervisor and the agent but not the ranks;
    without this they would train on as orphans, holding the GPUs.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="tunewiz-launcher-watch", daemon=True).start()


def _handle_signals(ctx: EngineContext) -> None:
    def on_signal(signum: int, _frame: object) -> None:
        ctx.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _fail_before_start(run: RunDir, exc: SpecError | TunewizError) -> None:
    """Record a run that cannot start (its spec cannot be read or is not allowed)."""
    if isinstance(exc, SpecError):
        exc = TunewizError(f"the run's spec cannot be used: {exc.render()}",
                           hint="spec.toml is written when a run is created and should not be edited; restore it, "
                                "or start a new run from a good spec with `tunewiz train SPEC`")
    ctx = EngineContext(run, RunSpec(name="run"), EventWriter(run.events_path), resume=False)
    ctx.emit("started", pid=os.getpid(), host=socket.gethostname(), run_id=run.run_id, version=__version__,
             python=sys.version.split()[0], argv=sys.argv)
    _record_failure(ctx, exc)


def _emit_started(ctx: EngineContext) -> None:
    checkpoint = latest_checkpoint(ctx.run.output_dir(ctx.spec)) if ctx.resume else None
    ctx.emit("started", pid=os.getpid(), host=socket.gethostname(), run_id=ctx.run.run_id, version=__version__,
             python=sys.version.split()[0], argv=sys.argv, resumed_from_step=checkpoint[1] if checkpoint else None)


def _train_and_record(ctx: EngineContext) -> int:
    try:
        outcome = _load_trainer()(ctx)
    except BaseException as exc:  # noqa: BLE001 - every failure must end the stream visibly
        _record_failure(ctx, exc)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if any(ctx.run.path.glob(RANK_ERROR_GLOB)):
        return 1  # another rank failed and this one was stopped: the supervisor ends the run with that error
    ctx.run.reserve_path.unlink(missing_ok=True)
    try:
        ctx.emit("finished", status=outcome.status, step=outcome.step, metrics=outcome.metrics,
                 output_dir=str(ctx.run.output_dir(ctx.spec)))
        ctx.run.update_status(state=outcome.status, step=outcome.step, finished=round(time.time(), 3),
                              metrics=outcome.metrics)
    except OSError as exc:  # e.g. the disk filled up just now: the outputs are saved, resume records the end
        _record_failure(ctx, exc, outcome.step)
        return 1
    return 0


def _launch_plan(ctx: EngineContext) -> distributed.LaunchPlan | None:
    """The multi-GPU plan for this run, or None for one process (one GPU or the CPU).

    A single chosen GPU other than the first is selected here, before torch starts.
    """
    wanted = ctx.spec.training.gpus
    if wanted == 1:
        return None
    gpu_ids = distributed.resolve_gpus(wanted, distributed.visible_gpu_count())
    physical = _physical_ids(gpu_ids)
    if len(gpu_ids) <= 1:
        if physical:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(physical)
        return None
    strategy = distributed.plan_strategy(ctx.spec.training.strategy, _fits_one_gpu(ctx))
    ctx.log(f"training on {len(gpu_ids)} GPUs ({', '.join(physical)}) with {strategy.upper()}")
    return distributed.LaunchPlan(gpu_ids=[int(i) for i in physical], strategy=strategy, method=ctx.spec.method,
                                  main_process_port=_free_port())


def _physical_ids(gpu_ids: list[int]) -> list[str]:
    """Visible indices as the IDs CUDA_VISIBLE_DEVICES needs, through any CUDA_VISIBLE_DEVICES already set."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return [visible[i] if i < len(visible) else str(i) for i in gpu_ids]


def _fits_one_gpu(ctx: EngineContext) -> bool | None:
    """Whether the memory estimate fits the smallest GPU (None when it cannot be told)."""
    from tunewiz.engine.planning import hardware
    from tunewiz.engine.planning.estimator import CUDA_CONTEXT_BYTES
    from tunewiz.engine.planning.recommend import estimate_spec

    try:
        needed = estimate_spec(ctx.spec).total + CUDA_CONTEXT_BYTES
    except Exception:  # noqa: BLE001 - an unknown architecture: let DDP try
        return None
    totals = [gpu.memory_total_bytes for gpu in hardware.probe(check_libraries=False).gpus if gpu.memory_total_bytes]
    return needed <= min(totals) if totals else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _supervise(ctx: EngineContext, plan: distributed.LaunchPlan) -> int:
    """Start the ranks, pass stop requests on, and end the stream as failed if a rank failed."""
    run = ctx.run
    for stale in run.path.glob(RANK_ERROR_GLOB):
        stale.unlink()
    command = distributed.accelerate_command(plan, str(run.path), ["--resume"] if ctx.resume else [])
    env = {**os.environ, SUPERVISED_ENV: "1"}
    try:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        _emit_started(ctx)
        _record_failure(ctx, exc)
        return 1
    while process.poll() is None:
        if ctx.stop_event.is_set() and not run.stop_requested():
            run.request_stop("signal")  # the ranks agree on the step to stop at through the stop file
        time.sleep(0.5)
    errors = sorted(run.path.glob(RANK_ERROR_GLOB), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
    ctx.events.close()
    ctx.events = EventWriter(run.events_path)  # rank 0 wrote in between: continue its numbering
    state = run.status().get("state")
    if errors:
        _record_rank_failure(ctx, json.loads(errors[0].read_text()))
        return 1
    if state not in FINAL_STATES:
        _record_failure(ctx, RuntimeError(f"the engine's ranks exited with code {process.returncode} "
                                          "without finishing; engine.log has their output"), _last_step(ctx))
        return 1
    return process.returncode


def _write_rank_error(run: RunDir, exc: BaseException) -> None:
    atomic_write_json(run.path / f"rank-{ranks.rank()}.error.json", {"rank": ranks.rank(), **_error_fields(exc)})


def _record_rank_failure(ctx: EngineContext, error: dict[str, Any]) -> None:
    fields = {key: error.get(key) for key in ("error_type", "message", "hint", "traceback")}
    fields["message"] = f"rank {error['rank']}: {error['message']}"
    _end_failed(ctx, fields, _last_step(ctx))


def _last_step(ctx: EngineContext) -> int:
    """The newest step rank 0 recorded (the supervisor sees no step events of its own)."""
    step = ctx.run.status().get("step")
    return step if isinstance(step, int) else 0


def _error_fields(exc: BaseException) -> dict[str, Any]:
    tail = "".join(traceback.format_exception(exc)).splitlines()[-TRACEBACK_LINES:]
    return {"error_type": type(exc).__name__, "message": str(exc) or type(exc).__name__, "hint": hint_for(exc),
            "traceback": "\n".join(tail)}


def _record_failure(ctx: EngineContext, exc: BaseException, step: int | None = None) -> None:
    fields = _error_fields(exc)
    output = ctx.run.output_dir(ctx.spec)
    trouble = disk_trouble(exc, output)
    if trouble:
        fields.update(_disk_fields(ctx, trouble, exc, output))
    ctx.run.reserve_path.unlink(missing_ok=True)  # the room set aside for this record
    if not isinstance(exc, TunewizError):
        try:
            traceback.print_exception(exc)  # the full traceback goes to engine.log
            sys.stderr.flush()
        except OSError:
            pass
    _end_failed(ctx, fields, ctx.last_step if step is None else step)


def _disk_fields(ctx: EngineContext, trouble: str, exc: BaseException, output: Path) -> dict[str, Any]:
    """The error and hint for a full disk (or a failing one), after dropping the checkpoint it cut short."""
    place = Path(getattr(exc, "filename", None) or output)
    free_mb = free_bytes(place) / 1e6
    scan = scan_checkpoints(output)
    for torn, _why in scan.skipped:  # never complete, so useless; deleting them gives the record room
        shutil.rmtree(torn, ignore_errors=True)
    where = _mount_point(place)
    back_to = (f"the last complete checkpoint (step {scan.best[1]})" if scan.best
               else "the start (no complete checkpoint)")
    resume = f"`tunewiz resume {ctx.run.run_id}` continues from {back_to}"
    if trouble == "io":
        return {"error_type": "DiskError", "message": f"the disk holding {where} reported an I/O error: {exc}",
                "hint": f"check that disk (dmesg, SMART); once it works, {resume}"}
    return {"error_type": "DiskFull", "message": f"the disk holding {where} is full: {free_mb:.0f} MB free ({exc})",
            "hint": f"free space on that disk (or set output_dir to another one), then {resume}"}


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() or (not os.path.ismount(path) and path.parent != path):
        path = path.parent
    return path


def _end_failed(ctx: EngineContext, fields: dict[str, Any], step: int) -> None:
    """Write `error`, `finished` and the status; each is tried even when an earlier one fails (a full disk)."""
    error = {"type": fields["error_type"], "message": fields["message"], "hint": fields["hint"]}
    writes: list[Callable[[], object]] = [
        lambda: ctx.emit("error", **fields), lambda: ctx.emit("finished", status="failed", step=step),
        lambda: ctx.run.update_status(state="failed", finished=round(time.time(), 3), error=error)]
    for write in writes:
        try:
            write()
        except OSError as exc:
            print(f"tunewiz: could not record the failure: {exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunewiz.engine.run.worker", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument(distributed.RANK_WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.umask(0o077)  # events, logs, checkpoints and caches hold the user's data: private to the user
    if not any(os.environ.get(name) for name in ALLOCATOR_ENV):  # the ranks started from here inherit it
        os.environ[ALLOCATOR_ENV[0]] = ALLOCATOR_SETTING
    run = RunDir(args.run_dir.resolve())
    if args.rank_worker:
        return run_rank(run, resume=args.resume)
    return run_engine(run, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
