"""What the app asks of the outside world, passed to the App so tests can hand in fakes.

The defaults call the engine: the hardware probe and the recommender in-process (both torch-free),
the data check as a subprocess (`python -m tunewiz.engine data check ... --json`, which loads a tokenizer),
and the launcher, which starts the engine detached in its own session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunewiz.engine.config.spec import RunSpec
from tunewiz.tui.wizard import CheckRequest

DATA_CHECK_TIMEOUT_S = 600.0


class ServiceError(Exception):
    """A service failed in a way the user can act on; `hint` says how."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


# ---------------------------------------------------------------------------------------------
# Hardware


def default_probe() -> Any:
    from tunewiz.engine.planning import hardware

    return hardware.probe()


# ---------------------------------------------------------------------------------------------
# Recommender (tunewiz.engine.planning.recommend: torch-free, so the app imports it directly)


def default_recommend(report: Any, seq_len: int, gpus: int | None = None) -> Any:
    from tunewiz.engine.planning import recommend

    return recommend.recommend(report, seq_len=seq_len, gpus=gpus)


def default_choice_for(model: str, report: Any, seq_len: int, gpus: int | None = None) -> Any:
    from tunewiz.engine.planning import recommend

    return recommend.choice_for(model, report, seq_len=seq_len, gpus=gpus)


def default_spec_choice(spec: RunSpec, report: Any, longest: int | None = None) -> Any:
    from tunewiz.engine.planning import recommend

    return recommend.spec_choice(spec, report, longest)


# ---------------------------------------------------------------------------------------------
# Data check (a subprocess: it needs the tokenizer, which the app must not import)


def _engine_env() -> dict[str, str]:
    """The child's environment: the app's own, without download progress bars in its stderr."""
    env = dict(os.environ)
    env.setdefault("TQDM_DISABLE", "1")
    return env


def _error_from_stderr(stderr: str, returncode: int, what: str = "the data check") -> ServiceError:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    message = next((line.removeprefix("tunewiz: ") for line in lines if line.startswith("tunewiz: ")), None)
    hint = next((line.removeprefix("hint: ") for line in lines if line.startswith("hint: ")), None)
    if message is None:
        message = lines[-1] if lines else f"{what} stopped (exit status {returncode})"
    return ServiceError(message, hint)


def default_check_data(request: CheckRequest, is_cancelled: Callable[[], bool]) -> dict[str, Any]:
    """Run the data checker and return its JSON report; raise ServiceError with its message."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tunewiz.engine", *request.argv()], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=_engine_env(), start_new_session=True,
    )
    waited = 0.0
    while True:
        try:
            stdout, stderr = process.communicate(timeout=0.25)
            break
        except subprocess.TimeoutExpired:
            waited += 0.25
            if is_cancelled() or waited > DATA_CHECK_TIMEOUT_S:
                process.kill()
                process.communicate()
                if waited > DATA_CHECK_TIMEOUT_S:
                    raise ServiceError("the data check took too long and was stopped") from None
                return {}
    if process.returncode in (0, 1):
        try:
            return json.loads(stdout)
        except ValueError:
            pass
    raise _error_from_stderr(stderr, process.returncode)


# ---------------------------------------------------------------------------------------------
# Launch


def default_launch(spec: RunSpec, runs_root: Path | None, trust_remote_code: bool = False) -> Any:
    """Create the run directory and start the engine detached; return the tunewiz.engine.run.rundir.RunDir.
    `trust_remote_code` is the user's answer to the app's question (a spec alone cannot imply it)."""
    from tunewiz.engine.run import launcher, rundir

    run = rundir.create(spec, runs_root, trust_remote_code=trust_remote_code)
    launcher.launch(run)
    return run


def default_stop(run: Any, on_progress: Callable[[str], None]) -> str:
    """Stop a run gracefully (request, then SIGTERM, then SIGKILL); returns how it ended."""
    from tunewiz.engine.run import launcher

    return launcher.stop(run, on_progress=on_progress)


def default_resume(run: Any) -> int:
    """Start a new engine on a stopped, failed or dead run; it continues from the newest checkpoint."""
    from tunewiz.engine.run import launcher

    return launcher.launch(run, resume=True)


EXPORT_TIMEOUT_S = 1800.0


def _stream(command: list[str], on_progress: Callable[[str], None], timeout: float) -> tuple[int, str, str]:
    """Run an engine command, passing each line it prints to `on_progress`; (exit status, stdout, stderr)."""
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
                                   text=True, env=_engine_env(), start_new_session=True)
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.strip():
                on_progress(line.strip())
        code = process.wait(timeout)
        errors.seek(0)
        return code, "".join(lines), errors.read()


def default_export(run: Any, kind: str, on_progress: Callable[[str], None]) -> str:
    """Run `python -m tunewiz.engine export RUN [--merged | --gguf TYPE]` (kind: adapter, merged or gguf-TYPE) and
    return what it said at the end: where the export went and how its check came out."""
    command = [sys.executable, "-m", "tunewiz.engine", "export", str(run.path)]
    if kind == "merged":
        command.append("--merged")
    elif kind.startswith("gguf-"):
        command += ["--gguf", kind.removeprefix("gguf-")]
    code, stdout, stderr = _stream(command, on_progress, EXPORT_TIMEOUT_S)
    if code != 0:
        raise _error_from_stderr(stderr, code, "the export")
    lines = [line for line in stdout.splitlines() if line.strip()]
    return "\n".join(lines[-6:]) if lines else "exported"


def default_chat(run: Any, checkpoint: int | None) -> Any:
    """A chat client for the run (not started): the model loads in its own process."""
    from tunewiz.engine.use.chat_client import ChatClient

    return ChatClient(run.path, checkpoint, env=_engine_env())


EVAL_TIMEOUT_S = 3600.0


def default_evaluate(run: Any, on_progress: Callable[[str], None]) -> dict[str, Any]:
    """Run `python -m tunewiz.engine eval RUN --json`, passing its progress lines on; return its results."""
    process = subprocess.Popen([sys.executable, "-m", "tunewiz.engine", "eval", str(run.path), "--json"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_engine_env(), start_new_session=True)
    assert process.stderr is not None and process.stdout is not None
    errors = []
    for line in process.stderr:  # progress while it runs; the error lines if it fails
        errors.append(line)
        if line.strip() and not line.startswith(("tunewiz: ", "hint: ")):
            on_progress(line.strip())
    stdout = process.stdout.read()
    code = process.wait(EVAL_TIMEOUT_S)
    if code == 0:
        try:
            return json.loads(stdout)
        except ValueError:
            pass
    raise _error_from_stderr("".join(errors), code, "the evaluation")


@dataclass
class Services:
    """Everything the app needs from outside; every field has a working default."""

    probe: Callable[[], Any] = default_probe
    """() -> tunewiz.engine.planning.hardware.HardwareReport"""
    recommend: Callable[..., Any] = default_recommend
    """(report, seq_len[, gpus=1]) -> tunewiz.engine.planning.recommend.Recommendation; `gpus=1` only where the
    first answer trains on several GPUs (the advice for one)"""
    choice_for: Callable[..., Any] = default_choice_for
    """(model name or path, report, seq_len[, gpus=N]) -> tunewiz.engine.planning.recommend.Choice; raises for
    unknown models. `gpus` only on machines with several GPUs."""
    spec_choice: Callable[..., Any] = default_spec_choice
    """(spec, report[, longest]) -> tunewiz.engine.planning.recommend.Choice: the estimate of exactly the spec
    about to launch."""
    check_data: Callable[[CheckRequest, Callable[[], bool]], dict[str, Any]] = default_check_data
    """(request, is_cancelled) -> the checker's JSON report ({} when cancelled)"""
    launch: Callable[..., Any] = default_launch
    """(validated spec, runs root, trust_remote_code=False) -> tunewiz.engine.run.rundir.RunDir of the started run"""
    runs_root: Path | None = None
    """Where run directories go (None: tunewiz.engine.locations.runs_dir())."""
    stop: Callable[[Any, Callable[[str], None]], str] = default_stop
    """(run, on_progress) -> how it stopped: graceful, terminated, killed or not running"""
    resume: Callable[[Any], int] = default_resume
    """(run) -> pid of the new engine"""
    export: Callable[[Any, str, Callable[[str], None]], str] = default_export
    """(run, kind: adapter | merged | gguf-TYPE, on_progress) -> the export's last lines (where, and its check)"""
    evaluate: Callable[[Any, Callable[[str], None]], dict[str, Any]] = default_evaluate
    """(run, on_progress) -> the before/after results (engine/use/evaluate.py's results.json)"""
    chat: Callable[[Any, int | None], Any] = default_chat
    """(run, checkpoint or None) -> an tunewiz.engine.use.chat_client.ChatClient, not yet started"""
    clock: Callable[[], float] = time.time
    """Now, in Unix seconds: live runs' elapsed time and ETA (tests fix it so snapshots do not move)."""

    def runs_dir(self) -> Path:
        if self.runs_root is not None:
            return self.runs_root
        from tunewiz.engine import locations

        return locations.runs_dir()
