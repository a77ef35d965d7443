"""The package works outside this checkout: built as a wheel, installed into a fresh environment, the app
starts and `tunewiz doctor` runs (the editable install `make` uses would hide a missing file)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT

FOLDERS = {"engine": "tunewiz.engine", "tui": "tunewiz.tui", "presets": "tunewiz.presets"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed() -> None:
    on_disk = {".".join([FOLDERS[p.parts[0]], *p.parts[1:-1]]) for folder in FOLDERS
               for p in (q.relative_to(ROOT) for q in (ROOT / folder).rglob("__init__.py"))}
    listed = set(_project()["tool"]["setuptools"]["packages"])
    assert listed == on_disk


def test_each_dependency_is_listed_once() -> None:
    import re

    names = [re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()
             for requirement in _project()["project"]["dependencies"]]
    assert len(names) == len(set(names)), sorted(name for name in names if names.count(name) > 1)


def test_the_distribution_claims_only_the_tunewiz_namespace() -> None:
    listed = _project()["tool"]["setuptools"]["packages"]
    assert all(name.startswith("tunewiz.") for name in listed)
    assert _project()["project"]["scripts"] == {"tunewiz": "tunewiz.engine.cli.main:main"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of what the distribution is made of (a stale build/ folder in the
    checkout would otherwise lend it files the package data leaves out)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run([PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                            str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (found,) = out.glob("tunewiz-*.whl")
    return found


def test_the_wheel_holds_the_stylesheet_presets_and_licence(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "tunewiz/tui/tunewiz.tcss" in names
    assert "tunewiz/tui/screens/dashboard.py" in names and "tunewiz/tui/widgets/chart.py" in names
    assert "tunewiz/presets/models.toml" in names and "tunewiz/presets/runs/demo.toml" in names
    assert any(n.startswith("tunewiz/presets/datasets/") and n.endswith(".jsonl") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("engine/", "tui/", "presets/", "tests/", "bench/")) for n in names)


@pytest.fixture(scope="module")
def fresh_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new environment with only the wheel of tunewiz; its dependencies come from this one's
    site-packages, read as plain paths (so this checkout's editable install is not active there)."""
    env = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    purelib = Path(subprocess.run([str(env / "bin" / "python"), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                              str(purelib), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    return env


def _run(env: Path, code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean["TUNEWIZ_HOME"] = str(tmp_path / "home")
    return subprocess.run([str(env / "bin" / "python"), "-I", "-c", code], cwd=tmp_path, env=clean,
                          capture_output=True, text=True, timeout=180)


def test_the_installed_package_runs_doctor(fresh_env: Path, tmp_path: Path) -> None:
    code = ("import json, sys, tunewiz.engine\n"
            "from importlib.metadata import distribution\n"
            "dist = distribution('tunewiz')\n"
            "(script,) = [e for e in dist.entry_points if e.name == 'tunewiz' and e.group == 'console_scripts']\n"
            "print(json.dumps({'file': tunewiz.engine.__file__, 'dist': str(dist.locate_file(''))}))\n"
            "sys.exit(script.load()(['doctor']))")
    result = _run(fresh_env, code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    where = json.loads(result.stdout.splitlines()[0])
    assert where["file"].startswith(str(fresh_env)) and where["dist"].startswith(str(fresh_env))
    assert "GPU" in result.stdout


def test_the_installed_app_starts_headless(fresh_env: Path, tmp_path: Path) -> None:
    code = ("import asyncio\n"
            "from tunewiz.tui.app import TunewizApp\n"
            "async def main():\n"
            "    app = TunewizApp()\n"
            "    async with app.run_test(size=(100, 30)) as pilot:\n"
            "        await pilot.pause()\n"
            "        print(type(app.screen).__name__)\n"
            "asyncio.run(main())\n")
    result = _run(fresh_env, code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "WelcomeScreen"
