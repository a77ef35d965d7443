"""The coach's alerts (engine/run/alerts.py, docs/alerts.md): recorded CPU demo runs raise none; synthetic streams
for each trouble raise exactly the alert they should and no other; the engine writes them as `alert` events."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.runtools import events as read_events
from tests.runtools import make_run
from tunewiz.engine.run import alerts, coach
from tunewiz.engine.run.alerts import Coach
from tunewiz.engine.run.context import EngineContext
from tunewiz.engine.run.events import EventWriter, validate

RECORDED = [*sorted((ROOT / "tests" / "data" / "runs").glob("*/events.jsonl")),
            ROOT / "tests" / "data" / "alerts" / "demo-cpu-72-steps.jsonl"]
GIB = 1024 ** 3


def _recorded(path: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(e["type"], e) for e in map(json.loads, path.read_text().splitlines())]


def _codes(stream: list[tuple[str, dict[str, Any]]], **kwargs: Any) -> list[str]:
    return [a.code for a in Coach(**kwargs).observe_all(stream)]


def _step(step: int, loss: float, grad: float = 1.0, tokens: float = 1000.0) -> tuple[str, dict[str, Any]]:
    return "step", {"step": step, "loss": loss, "grad_norm": grad, "tokens_per_s": tokens}


def _learning(steps: range, start: float = 2.0) -> list[tuple[str, dict[str, Any]]]:
    """A healthy run: the loss falls with a little noise, the gradient norm wobbles around 1."""
    return [_step(i, start * 0.97 ** i + 0.03 * math.sin(i), 1.0 + 0.2 * math.sin(i)) for i in steps]


def _gpu(used: float = 0.5) -> tuple[str, dict[str, Any]]:
    return "gpu", {"devices": [{"index": 0, "mem_used_bytes": int(used * 80 * GIB), "mem_total_bytes": 80 * GIB}]}


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.parent.name if p.name == "events.jsonl" else p.name)
def test_recorded_cpu_demo_runs_raise_no_alert(path: Path) -> None:
    stream = _recorded(path)
    assert sum(kind == "step" for kind, _ in stream) >= 6
    assert _codes(stream) == []


def test_a_healthy_gpu_run_raises_none() -> None:
    assert _codes([_gpu(), *_learning(range(1, 80))]) == []


def test_nan_loss_is_critical_and_names_the_last_checkpoint() -> None:
    stream = [*_learning(range(1, 11)), ("checkpoint", {"step": 10, "path": "/x/checkpoint-10"}),
              *_learning(range(11, 14)), _step(14, float("nan"))]
    [alert] = Coach().observe_all(stream)
    assert (alert.code, alert.severity, alert.step) == ("loss_not_finite", "critical", 14)
    assert "checkpoint-10" in alert.message and alert.details["last_checkpoint_step"] == 10
    assert _codes([*_learning(range(1, 5)), _step(5, float("inf"))]) == ["loss_not_finite"]


def test_a_rising_loss_is_divergence() -> None:
    falling = _learning(range(1, 25))
    rising = [_step(i, 1.0 * 1.08 ** (i - 24), 1.0) for i in range(25, 45)]
    [alert] = Coach().observe_all([*falling, *rising])
    assert alert.code == "diverging" and "rising" in alert.message and alert.step > 30


def test_a_gradient_norm_explosion_is_divergence() -> None:
    stream = [*_learning(range(1, 30)), _step(30, 1.2, grad=60.0), *_learning(range(31, 35))]
    [alert] = Coach().observe_all(stream)
    assert (alert.code, alert.step) == ("diverging", 30) and "gradient norm" in alert.message


def test_a_flat_loss_points_at_the_learning_rate_and_data_check() -> None:
    stream = [_step(i, 2.0 + 0.01 * math.sin(i)) for i in range(1, 40)]
    [alert] = Coach().observe_all(stream)
    assert alert.code == "loss_flat" and alert.step == alerts.FLAT_MIN_STEPS
    assert "learning_rate" in alert.hint and "tunewiz data check" in alert.hint


def test_eval_rising_while_train_falls_is_overfitting_with_its_start_and_best_checkpoint() -> None:
    stream: list[tuple[str, dict[str, Any]]] = []
    evals = {10: 1.0, 20: 0.8, 30: 0.7, 40: 0.76, 50: 0.83, 60: 0.9}
    for i in range(1, 61):
        stream.append(_step(i, 2.0 * 0.97 ** i))
        if i in evals:
            stream.append(("eval", {"step": i, "eval_loss": evals[i]}))
        if i % 15 == 0:
            stream.append(("checkpoint", {"step": i, "path": f"/x/checkpoint-{i}"}))
    [alert] = Coach().observe_all(stream)
    assert (alert.code, alert.step) == ("overfitting", 50)
    assert alert.details["began_at_step"] == 40 and alert.details["best_eval_step"] == 30
    assert alert.details["best_checkpoint"] == "/x/checkpoint-30"
    assert "step 40" in alert.message and "checkpoint-30" in alert.message


def test_eval_rising_with_train_loss_rising_too_is_not_overfitting() -> None:
    stream = [*_learning(range(1, 11)), ("eval", {"step": 10, "eval_loss": 0.7}),
              *[_step(i, 2.5) for i in range(11, 21)], ("eval", {"step": 20, "eval_loss": 0.8}),
              *[_step(i, 3.0) for i in range(21, 31)], ("eval", {"step": 30, "eval_loss": 0.9})]
    assert "overfitting" not in _codes(stream)


def test_throughput_falling_on_a_gpu_names_the_cause() -> None:
    stream = [_gpu(), *_learning(range(1, 20)),
              *[_step(i, 2.0 * 0.97 ** i, tokens=350.0) for i in range(20, 26)]]
    found = Coach(explain_slowdown=lambda: "Likely cause: GPU 0 is shared with python (pid 7).").observe_all(stream)
    [alert] = found
    assert alert.code == "throughput_drop" and "65% slower" in alert.message
    assert "python (pid 7)" in alert.message and alert.details["baseline_tokens_per_s"] == 1000.0


def test_throughput_is_not_judged_on_a_cpu_run() -> None:
    stream = [*_learning(range(1, 20)), *[_step(i, 2.0 * 0.97 ** i, tokens=50.0) for i in range(20, 30)]]
    assert _codes(stream) == []


def test_gpu_memory_close_to_the_limit() -> None:
    stream = [_gpu(0.6), *_learning(range(1, 5)), _gpu(0.97), _gpu(0.98)]
    [alert] = Coach().observe_all(stream)
    assert (alert.code, alert.step) == ("memory_high", 4) and "97% full" in alert.message


def test_explain_slowdown_never_raises_without_a_gpu() -> None:
    assert coach.explain_slowdown() is None  # this machine has no NVIDIA GPU


def test_the_engine_writes_alerts_as_valid_events(tmp_path: Path) -> None:
    run = make_run()
    ctx = EngineContext(run, run.load_spec(), EventWriter(run.events_path))
    watch = coach.attach(ctx)
    for i in range(1, 6):
        ctx.emit("step", step=i, total_steps=10, epoch=0.1 * i, loss=2.0 - 0.1 * i, learning_rate=1e-4,
                 elapsed_s=float(i))
    watch("step", {"step": 6, "loss": float("nan")})
    written = read_events(run)  # each checked against the schema
    [alert] = [e for e in written if e["type"] == "alert"]
    assert alert["code"] == "loss_not_finite" and alert["step"] == 6 and not validate(alert)
    assert validate({**alert, "severity": "meh"}) == ["alert.severity: 'meh' is not one of ('warning', 'critical')"]


def test_a_nan_loss_stops_training_without_saving_and_is_alerted() -> None:
    from types import SimpleNamespace

    from transformers import TrainerControl

    from tunewiz.engine.training.trainer import _make_callback

    run = make_run()
    ctx = EngineContext(run, run.load_spec(), EventWriter(run.events_path))
    import torch

    model = torch.nn.Module()  # no layers: nothing for the engine's checkpointing to take over
    callback = _make_callback(ctx, model, None, SimpleNamespace(samples=[]), 10, 5, coach.attach(ctx), None,
                              lagged=False)
    state = SimpleNamespace(global_step=4, num_input_tokens_seen=400, epoch=0.4)
    args = SimpleNamespace(train_batch_size=1, gradient_accumulation_steps=1)
    control = TrainerControl(should_save=True, should_evaluate=True)
    callback.on_train_begin(args, state, control)
    callback.on_log(args, state, control, logs={"loss": 1.5, "learning_rate": 1e-4})
    state.global_step = 5
    callback.on_log(args, state, control, logs={"loss": float("nan"), "learning_rate": 1e-4})
    assert control.should_training_stop and not control.should_save and not control.should_evaluate
    assert callback.broken_at == 5 and callback.last_train_loss == 1.5
    written = read_events(run)
    assert [e["step"] for e in written if e["type"] == "step"] == [4]  # no step event can hold a NaN
    assert [(e["code"], e["step"]) for e in written if e["type"] == "alert"] == [("loss_not_finite", 5)]


def test_a_slowdown_names_the_process_sharing_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunewiz.engine.planning import hardware
    from tunewiz.engine.planning.devices import GpuInfo, GpuProcess
    from tunewiz.engine.run import coach

    gpu = GpuInfo(index=0, name="NVIDIA H200", temperature_c=88,
                  other_processes=[GpuProcess(pid=4242, name="python3", used_bytes=30 * 2**30)])
    monkeypatch.setattr(hardware, "probe", lambda **_kw: hardware.HardwareReport(gpus=[gpu]))
    said = coach.explain_slowdown()
    assert said is not None and "python3 (pid 4242, 30 GiB)" in said and "88 °C" in said
