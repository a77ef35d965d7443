"""Short real-engine runs of the demo preset for the fault suite: a few optimiser steps of a tiny LoRA
on eight rows, started through the real launcher with one fault injected (tests/faults/fault_trainer.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import subprocess_env
from tests.runtools import events, wait_for
from tunewiz.engine.config import presets
from tunewiz.engine.run import launcher, rundir

FAULT_TRAINER = "tests.faults.fault_trainer:train"
TINY = ["training.max_steps=2", "training.save_every=1", "dataset.max_rows=8", "dataset.eval_fraction=0.0",
        "training.sample_prompts=0", "training.micro_batch_size=1", "training.gradient_accumulation=1",
        "training.max_seq_length=128", "lora.r=2", 'lora.target_modules=["q_proj"]', "training.warmup_ratio=0.0"]
ENGINE_TIMEOUT_S = 300.0


def tiny_run(*overrides: str) -> rundir.RunDir:
    spec, _source = presets.resolve("demo", [*TINY, *overrides])
    return rundir.create(spec)


def engine_life(run: rundir.RunDir, fault: str = "", resume: bool = False, **env: str) -> list[dict[str, Any]]:
    """Start the engine (with `fault`), wait until it is gone, and return this life's events (each checked
    against the schema, and every line whole)."""
    before = len(events(run))
    launcher.launch(run, resume=resume, env=subprocess_env(TUNEWIZ_TRAINER=FAULT_TRAINER, TUNEWIZ_FAULT=fault, **env))
    wait_for(lambda: not run.engine_alive(), ENGINE_TIMEOUT_S, f"the engine ({fault or 'no fault'}) to exit",
             interval=0.2, run=run)
    assert_whole_lines(run.events_path)
    return events(run)[before:]


def assert_whole_lines(path: Path) -> None:
    """The event log holds whole lines only (never half a line that would swallow the next event)."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"torn last line: {data[-200:]!r}"


def of_type(evs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in evs if e["type"] == kind]


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up here (needs root or CAP_SYS_ADMIN): "
                    f"{mounted.stderr.strip() or mounted.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
