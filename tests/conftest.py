"""Shared fixtures: every test gets its own TUNEWIZ_HOME, so nothing touches the user's files."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Before any test module is imported: huggingface_hub reads these once, when it is first imported (a test
# module that imports it at collection time would otherwise leave it online, retrying for a minute).
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"
# Under xdist each worker, and the engines its tests start, gets its share of the cores: torch's default of one
# thread per core in every worker oversubscribes them, and two CPU trainings side by side then ran 5x slower.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, str(max(1, (os.cpu_count() or 1) // _workers)))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under xdist (`make test` runs two workers), each file runs on one worker, so its module fixtures are
    built once; the files that share the trained demo run on one worker, so it is trained once."""
    for item in items:
        group = "trained-demo" if "trained_demo" in getattr(item, "fixturenames", ()) else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def tunewiz_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("TUNEWIZ_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return home


@pytest.fixture
def plain_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hints say `tunewiz ...` whatever the environment (snapshots must not depend on where the venv is)."""
    from tunewiz.engine import hints

    monkeypatch.setattr(hints, "tunewiz_command", lambda: "tunewiz")


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this checkout importable, plus `extra`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


PYTHON = sys.executable


# The demo model is converted from its GGUF once (about 30 s) into a git-ignored folder of the
# checkout, and every test home links to it, so tests never convert it again.
SHARED_MODELS = ROOT / ".cache" / "test-models"


@pytest.fixture(scope="session")
def shared_demo_model() -> Path:
    import fcntl

    from tunewiz.engine.config import catalog
    from tunewiz.engine.config.spec import RunSpec
    from tunewiz.engine.training import models

    SHARED_MODELS.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("TUNEWIZ_HOME")
    os.environ["TUNEWIZ_HOME"] = str(SHARED_MODELS.parent / "home")
    try:
        (SHARED_MODELS.parent / "home" / "data").mkdir(parents=True, exist_ok=True)
        link = SHARED_MODELS.parent / "home" / "data" / "models"
        if not link.exists():
            link.symlink_to(SHARED_MODELS)
        with open(SHARED_MODELS.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            spec = RunSpec(name="t")
            spec.model.name = next(n for n, e in catalog.models().items() if e.bundled_gguf)
            source = models.converted_folder(models.resolve(spec))
    finally:
        if previous is None:
            os.environ.pop("TUNEWIZ_HOME", None)
        else:
            os.environ["TUNEWIZ_HOME"] = previous
    return Path(source.name_or_path)


@pytest.fixture
def demo_model(shared_demo_model: Path, tunewiz_home: Path) -> Path:
    """The converted demo model, linked into this test's TUNEWIZ_HOME."""
    models_dir = tunewiz_home / "data" / "models"
    models_dir.parent.mkdir(parents=True, exist_ok=True)
    if not models_dir.exists():
        models_dir.symlink_to(SHARED_MODELS)
    return shared_demo_model


@pytest.fixture
def demo_tokenizer(demo_model: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


DEMO_TRAIN_STEPS = 36


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory: pytest.TempPathFactory, shared_demo_model: Path) -> tuple[Any, Path]:
    """One real demo run through the CLI, shared by every test that needs a trained adapter: 36 steps with
    eval every 12, samples every 18 and partial gradient checkpointing (what the recommender uses)."""
    import subprocess

    from tunewiz.engine.run import rundir

    home = tmp_path_factory.mktemp("trained-home")
    (home / "data").mkdir()
    (home / "data" / "models").symlink_to(shared_demo_model.parent)
    result = subprocess.run([PYTHON, "-m", "tunewiz.engine", "train", "demo",
                             "--set", f"training.max_steps={DEMO_TRAIN_STEPS}",
                             "--set", "training.eval_every=12", "--set", "training.sample_every=18",
                             "--set", "training.gradient_checkpointing=true", "--set", "training.checkpoint_layers=10"],
                            capture_output=True, text=True, cwd=ROOT, env=subprocess_env(TUNEWIZ_HOME=str(home)),
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = rundir.list_runs(home / "state" / "runs")[0]
    os.environ["TUNEWIZ_HOME"] = str(home)  # the autouse fixture resets it for each test
    return run, home


# ---------------------------------------------------------------------------------------------
# Fixtures that several test modules share


@pytest.fixture(scope="module")
def tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    """Tokenizer files for random-init models (bench/random_model.py): carried to the GPU machine in
    .devcarry/tokenizer, else the demo model's."""
    carried = ROOT / ".devcarry" / "tokenizer"
    if carried.exists():
        return carried
    return request.getfixturevalue("shared_demo_model")


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a module's random-init models are made."""
    return tmp_path_factory.mktemp("random-models")


@pytest.fixture
def placed_runs() -> Any:
    """make(root, *states): copies of the recorded runs of tests/data/runs/ under `root` (a running one holds its
    lock, as a live engine does), released after the test."""
    from tests.test_tui_dashboard import Placed, place

    made: list[Placed] = []

    def make(root: Path, *states: str) -> Placed:
        result = place(root, *states)
        made.append(result)
        return result

    yield make
    for result in made:
        result.release()


@pytest.fixture
def fixed_zone(monkeypatch: pytest.MonkeyPatch) -> Any:
    """UTC for clocks drawn in snapshots."""
    import time

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.delenv("TZ")
    time.tzset()


@pytest.fixture
def fixed_place() -> Any:
    """The snapshots' one folder (tests/test_tui_dashboard.py FIXED) for every process on the machine: a lock keeps
    two test runs from clobbering it."""
    import fcntl

    from tests.test_tui_dashboard import FIXED

    FIXED.parent.mkdir(parents=True, exist_ok=True)
    with open(FIXED.parent / (FIXED.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield FIXED


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine seen as a CPU-only one, whatever it has (tests of what a CPU user meets must pass under
    `make test` on a GPU host too): NVML finds no driver and torch sees no CUDA device."""
    from tunewiz.engine.planning import nvml

    monkeypatch.setattr(nvml, "ensure", lambda: None)
    try:
        import torch
    except ImportError:
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
