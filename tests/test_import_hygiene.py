"""What each module drags in, checked in a fresh interpreter per module (harlequin style).

The engine (and the headless CLI) must never import textual; the TUI must never import the training
stack (it only reads run directories); and the light engine modules that the CLI and TUI use must not
import torch, which costs seconds, until a command really needs it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env

TRAINING_STACK = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes")
TORCH_FREE = ("tunewiz.engine.cli.main", "tunewiz.engine.run.rundir", "tunewiz.engine.run.events",
              "tunewiz.engine.run.launcher", "tunewiz.engine.config.presets", "tunewiz.engine.config.spec",
              "tunewiz.engine.planning.hardware", "tunewiz.engine.planning.estimator",
              "tunewiz.engine.planning.recommend", "tunewiz.engine.use.chat_client")


def _modules(package: str) -> list[str]:
    """Every module of the folder `package`, named as installed (`tunewiz.…`), found on disk without
    importing anything, minus `__main__`s."""
    root = ROOT / package
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":  # importing it runs the program
            continue
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(["tunewiz", *parts]))
    return names


PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted({name.partition(".")[0] for name in sys.modules})))
"""


def _loaded_after_import(module: str) -> set[str]:
    """Top-level packages in sys.modules after importing `module` in a fresh interpreter."""
    result = subprocess.run([PYTHON, "-c", PROBE, module], env=subprocess_env(), cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"importing {module} failed:\n{result.stderr[-3000:]}"
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_module_discovery_sees_the_packages() -> None:
    engine_modules = _modules("engine")
    assert {"tunewiz.engine", "tunewiz.engine.cli.main", "tunewiz.engine.run.worker",
            "tunewiz.engine.data"} <= set(engine_modules)
    assert "tunewiz.engine.__main__" not in engine_modules
    assert "tunewiz.tui" in _modules("tui")
    assert "textual" in _loaded_after_import("textual.app")  # the probe does see imports


@pytest.mark.parametrize("module", _modules("engine"))
def test_engine_modules_never_import_textual(module: str) -> None:
    loaded = _loaded_after_import(module)
    assert "textual" not in loaded, f"{module} imports textual"


@pytest.mark.parametrize("module", _modules("tui"))
def test_tui_modules_never_import_the_training_stack(module: str) -> None:
    loaded = _loaded_after_import(module)
    assert not loaded & set(TRAINING_STACK), f"{module} imports {sorted(loaded & set(TRAINING_STACK))}"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_light_engine_modules_do_not_import_torch(module: str) -> None:
    loaded = _loaded_after_import(module)
    assert not loaded & set(TRAINING_STACK), f"{module} imports {sorted(loaded & set(TRAINING_STACK))}"


HEADLESS = """
import json, sys
from tunewiz.engine.cli.main import main
for argv in (["runs"], ["runs", "--json"], ["presets"], ["locate"], ["tail", "nosuchrun"], ["stop", "nosuchrun"]):
    main(argv)
print(json.dumps(sorted({name.partition(".")[0] for name in sys.modules})))
"""


def test_headless_commands_that_only_read_do_not_import_torch(tunewiz_home: Path) -> None:
    result = subprocess.run([PYTHON, "-c", HEADLESS], env=subprocess_env(), cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert not loaded & set(TRAINING_STACK), sorted(loaded & set(TRAINING_STACK))
    assert "textual" not in loaded


# trl takes seconds to import: only a preference run's trainer (engine/training/preference.py, inside its
# functions) loads it.
TRL_FREE = ("tunewiz.engine.training.trainer", "tunewiz.engine.training.preference", "tunewiz.engine.data.pairs",
            "tunewiz.engine.data.check", "tunewiz.engine.run.worker", "tunewiz.engine.planning.estimator",
            "tunewiz.engine.planning.recommend")


@pytest.mark.parametrize("module", TRL_FREE)
def test_trl_loads_only_when_a_preference_trainer_is_built(module: str) -> None:
    assert "trl" not in _loaded_after_import(module)
