"""Hints print a `tunewiz` command that works as printed from where the user is (issue 15, item 7)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunewiz.engine import hints
from tunewiz.tui.app import keeps_going


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    hints.clear()
    yield
    hints.clear()


def test_tunewiz_on_path_is_written_plainly(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Path(sys.executable).parent / "tunewiz"
    if not script.exists():
        pytest.skip("this environment has no tunewiz script")
    monkeypatch.setenv("PATH", str(script.parent))
    assert hints.command("attach X") == "tunewiz attach X"


def test_after_make_run_the_venvs_script_is_written_from_the_current_folder(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "tunewiz"
    if not script.exists():
        pytest.skip("this environment has no tunewiz script")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # `make run` does not put .venv/bin on PATH
    monkeypatch.chdir(script.parent.parent.parent)  # the checkout `make run` ran in
    assert hints.command("attach X") == f"{script.relative_to(script.parent.parent.parent)} attach X"
    monkeypatch.chdir(tmp_path)  # elsewhere: the whole path
    hints.clear()
    assert hints.command("attach X") == f"{script} attach X"
    assert keeps_going("R1") == (f"run R1 keeps going.\n  watch it again:  {script} attach R1\n"
                                 f"  plain text:      {script} tail R1 -f\n  stop it:         {script} stop R1")


def test_without_a_script_python_runs_the_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    python = tmp_path / "bin" / "python"
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert hints.command("runs") == f"{python} -m tunewiz.engine runs"
