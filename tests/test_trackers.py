"""training.report_to: metrics also go to TensorBoard, Weights & Biases or MLflow when asked and installed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.errors import TunewizError
from tunewiz.engine.run import preflight
from tunewiz.engine.training.trainer import _training_arguments

DATA = '[dataset]\npreset = "demo"\n'


def test_report_to_takes_known_trackers_only() -> None:
    assert spec_mod.loads(DATA).training.report_to == []
    assert spec_mod.loads(DATA + '[training]\nreport_to = ["tensorboard", "mlflow"]\n').training.report_to == [
        "tensorboard", "mlflow"]
    with pytest.raises(spec_mod.SpecError, match=r"training.report_to: \['tensorbord'\].*did you mean 'tensorboard'"):
        spec_mod.loads(DATA + '[training]\nreport_to = ["tensorbord"]\n')


def test_a_tracker_that_is_not_installed_stops_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_mod.loads(DATA + '[training]\nreport_to = ["wandb"]\n')
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(TunewizError, match="report_to names wandb, which is not installed") as caught:
        preflight.check_trackers(spec)
    assert "pip install wandb" in (caught.value.hint or "")


def test_trainer_arguments_pass_the_trackers_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    plain = _training_arguments(spec_mod.loads(DATA), tmp_path, 10, False, torch.float32, False)
    assert plain.report_to in ([], "none", ["none"])
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ
    spec = spec_mod.loads(DATA + '[training]\nreport_to = ["tensorboard"]\n')
    args = _training_arguments(spec, tmp_path, 10, False, torch.float32, False)
    assert args.report_to == ["tensorboard"]
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tensorboard")
