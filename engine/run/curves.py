"""A run's curves and summary read back from its run directory: for `tunewiz compare`, `tunewiz plot` and the
app's compare screen (no torch, no textual here).

Steps repeated after a resume or an out-of-memory recovery are keyed by step, the later event winning (as
docs/run-protocol.md asks), so each step counts once.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.config.spec import SpecError
from tunewiz.engine.errors import TunewizError
from tunewiz.engine.fileio import atomic_write_text
from tunewiz.engine.run import rundir
from tunewiz.engine.run.events import EventReader, decode_line
from tunewiz.engine.run.worktime import finite

STEP_FIELDS = ("loss", "learning_rate", "grad_norm", "tokens_per_s", "tokens_seen")
CSV_COLUMNS = ("step", "tokens_seen", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s")
IGNORED_SETTINGS = ("name", "description")
"""Spec keys left out of "settings that differ": every run has its own."""


@dataclass
class RunCurves:
    """What one run's events say: its steps and evaluations, settings, speed, memory and alerts."""

    run_id: str
    name: str | None
    state: str
    steps: dict[int, dict[str, Any]] = field(default_factory=dict)
    evals: dict[int, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    memory_kind: str = "GPU"  # "GPU" (torch's peak reserved) or "RAM" (the engine's peak RSS, a CPU run)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    total_steps: int | None = None

    def series(self, key: str, by: str = "step") -> tuple[list[float], list[float]]:
        """(x, y) of a step field; x is the step, or the tokens seen with by="tokens"."""
        xs, ys = [], []
        for step, values in sorted(self.steps.items()):
            x = step if by == "step" else values.get("tokens_seen")
            y = values.get(key)
            if x is not None and y is not None:
                xs.append(float(x))
                ys.append(float(y))
        return xs, ys

    def eval_series(self, by: str = "step") -> tuple[list[float], list[float]]:
        """(x, eval loss); by tokens, each evaluation sits at the tokens seen by its step."""
        xs, ys = [], []
        for step, loss in sorted(self.evals.items()):
            x = step if by == "step" else self.steps.get(step, {}).get("tokens_seen")
            if x is not None:
                xs.append(float(x))
                ys.append(loss)
        return xs, ys

    @property
    def last_step(self) -> int | None:
        return max(self.steps) if self.steps else None

    @property
    def final_loss(self) -> float | None:
        return self.steps[max(self.steps)].get("loss") if self.steps else None

    @property
    def best_eval(self) -> tuple[int, float] | None:
        return min(self.evals.items(), key=lambda item: item[1]) if self.evals else None

    @property
    def median_tokens_per_s(self) -> float | None:
        values = [v["tokens_per_s"] for v in self.steps.values() if v.get("tokens_per_s")]
        return statistics.median(values) if values else None


def load(run: rundir.RunDir) -> RunCurves:
    """A run's curves from its events.jsonl and spec.toml."""
    curves = RunCurves(run.run_id, run.status().get("name"), run.state())
    try:
        curves.settings = flatten(spec_mod.to_dict(run.load_spec()))
        curves.name = curves.name or curves.settings.get("name")
    except (SpecError, TunewizError, OSError):
        pass  # a damaged spec: the curves are still worth seeing
    gpu_peak = rss_peak = 0
    for event in EventReader(run.events_path).read_all():
        d = event.data
        if event.type == "step":
            step = d["step"]
            if curves.steps and step <= max(curves.steps):  # a resume repeats steps: the later ones win
                curves.steps = {s: v for s, v in curves.steps.items() if s < step}
                curves.evals = {s: v for s, v in curves.evals.items() if s < step}
            curves.steps[step] = {key: finite(d.get(key)) for key in STEP_FIELDS}
            curves.steps[step]["tokens_seen"] = d.get("tokens_seen")  # an integer (the schema checked it)
            curves.total_steps = d["total_steps"]
        elif event.type == "eval" and finite(d["eval_loss"]) is not None:
            curves.evals[d["step"]] = float(d["eval_loss"])
        elif event.type == "alert":
            curves.alerts.append(dict(d))
        elif event.type == "gpu":
            for device in d.get("devices") or ():
                if isinstance(device, dict):
                    gpu_peak = max(gpu_peak, int(finite(device.get("torch_peak_reserved_bytes")) or 0))
            rss_peak = max(rss_peak, int(finite((d.get("process") or {}).get("rss_bytes")) or 0))
        elif event.type == "finished":
            gpu_peak = max(gpu_peak, int(finite((d.get("metrics") or {}).get("peak_reserved_bytes")) or 0))
    curves.peak_memory_bytes = gpu_peak or rss_peak or None
    curves.memory_kind = "GPU" if gpu_peak else "RAM"
    return curves


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"training": {"learning_rate": 1e-4}} as {"training.learning_rate": 1e-4}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "columns":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_settings(runs: list[RunCurves]) -> dict[str, list[Any]]:
    """The spec keys whose values are not the same in every run, with each run's value (None when absent)."""
    keys = sorted({key for run in runs for key in run.settings} - set(IGNORED_SETTINGS))
    table = {key: [run.settings.get(key) for run in runs] for key in keys}
    return {key: values for key, values in table.items() if any(v != values[0] for v in values[1:])}


def write_csv(curves: RunCurves, path: Path) -> None:
    """One row per step (the eval loss on the steps that were evaluated), columns CSV_COLUMNS; written whole
    or not at all."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for step in sorted(set(curves.steps) | set(curves.evals)):
        row = {"step": step, "eval_loss": curves.evals.get(step), **curves.steps.get(step, {})}
        writer.writerow(["" if row.get(c) is None else row[c] for c in CSV_COLUMNS])
    atomic_write_text(path, buffer.getvalue())


def alert_codes(events_path: Path) -> list[str]:
    """The codes of a run's `alert` events, oldest first (for `tunewiz runs`: only alert lines are decoded)."""
    try:
        data = events_path.read_bytes()
    except FileNotFoundError:
        return []
    codes = []
    for line in data.splitlines():
        if b'"type": "alert"' in line:
            event = decode_line(line)
            if event is not None:
                codes.append(str(event.get("code")))
    return codes
