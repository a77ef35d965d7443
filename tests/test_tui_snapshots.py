"""Every screen of the wizard as an SVG snapshot, at 60x20 (the smallest terminal we support), 80x24 and 120x40.

Update after an intended change with `pytest tests/test_tui_snapshots.py --snapshot-update` and look at the
report (snapshot_report.html) before committing the new __snapshots__.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input

from tests.test_tui_wizard import on_screen, wait_until
from tests.tui_fakes import FakeServices, gpu24_report, gpu80_report, gpu80x2_report, no_gpu_report
from tunewiz.tui.app import TunewizApp
from tunewiz.tui.dialogs import ConfirmDialog, MessageDialog
from tunewiz.tui.screens.dashboard import DashboardScreen
from tunewiz.tui.screens.dataset import DatasetScreen
from tunewiz.tui.screens.hardware import HardwareScreen
from tunewiz.tui.screens.model import ModelScreen
from tunewiz.tui.screens.presets import PresetsScreen
from tunewiz.tui.screens.review import ReviewScreen
from tunewiz.tui.screens.runs import RunsScreen
from tunewiz.tui.screens.settings import SettingsScreen
from tunewiz.tui.screens.welcome import WelcomeScreen

pytestmark = [pytest.mark.usefixtures("plain_hints"), pytest.mark.timeout(180)]

# Paths appear on screen, so they must not depend on pytest's tmp_path.
FIXED = Path("/tmp/tunewiz-snapshots")
RUN_ID = "20260101-120000-demo-ab12"
SIZES = {"60x20": (60, 20), "80x24": (80, 24), "120x40": (120, 40)}

Steps = Callable[[Any], Awaitable[None]]


@pytest.fixture(autouse=True)
def _fixed_places(monkeypatch: pytest.MonkeyPatch) -> Any:
    """FIXED is one folder for every process on the machine (snapshots show its paths): a lock keeps two test
    runs from clearing it under each other."""
    import fcntl

    FIXED.parent.mkdir(parents=True, exist_ok=True)
    with open(FIXED.parent / (FIXED.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(FIXED, ignore_errors=True)
        (FIXED / "runs").mkdir(parents=True)
        (FIXED / "support.jsonl").write_text("".join(json.dumps({"question": f"How do I reset password {i}?",
                                                                 "answer": f"Open settings, step {i}."}) + "\n"
                                                     for i in range(8)))
        monkeypatch.setenv("TZ", "UTC")
        time.tzset()
        yield
        monkeypatch.delenv("TZ")
        time.tzset()


async def _settle(pilot: Any) -> None:
    """Wait for workers, then freeze what moves: toasts go, cursors stop blinking."""
    await pilot.app.workers.wait_for_complete()
    await pilot.pause(0.1)
    pilot.app.clear_notifications()
    for widget in pilot.app.screen.query(Input):
        widget.cursor_blink = False
    await pilot.pause(0.1)


def _checked(pilot: Any) -> bool:
    """True once the data check for what the dataset step shows has its report."""
    result = pilot.app.state.check_for(pilot.app.screen.candidate_spec())
    return result is not None and result.report is not None


async def _probed(pilot: Any) -> None:
    await on_screen(pilot, WelcomeScreen)
    await wait_until(pilot, lambda: pilot.app.state.report is not None, "the probe")


async def welcome(pilot: Any) -> None:
    await _probed(pilot)


async def hardware(pilot: Any) -> None:
    await _probed(pilot)
    await pilot.press("n")
    await on_screen(pilot, HardwareScreen)


async def model(pilot: Any) -> None:
    await hardware(pilot)
    await pilot.press("enter")
    await on_screen(pilot, ModelScreen)


async def dataset(pilot: Any) -> None:
    await model(pilot)
    await pilot.press("enter")
    await on_screen(pilot, DatasetScreen)
    await wait_until(pilot, lambda: _checked(pilot), "the data check")


async def dataset_custom(pilot: Any) -> None:
    await dataset(pilot)
    await pilot.press("end", "enter", *str(FIXED / "support.jsonl"), "enter")
    await wait_until(pilot, lambda: pilot.app.screen.query_one("#col-output", Input).value == "answer", "the guess")
    await pilot.pause(1.2)  # the check of the mapped columns starts after a pause
    await wait_until(pilot, lambda: _checked(pilot), "the data check")


async def settings(pilot: Any) -> None:
    await dataset(pilot)
    await pilot.press("ctrl+n")
    await on_screen(pilot, SettingsScreen)


async def settings_invalid(pilot: Any) -> None:
    await settings(pilot)
    await pilot.press("tab", "tab", "tab", "ctrl+u", *"fast")


async def settings_advanced(pilot: Any) -> None:
    await settings(pilot)
    await pilot.press("ctrl+t")


async def review(pilot: Any) -> None:
    await settings(pilot)
    await pilot.press("ctrl+n")
    await on_screen(pilot, ReviewScreen)
    await wait_until(pilot, lambda: pilot.app.state.review_estimate is not None, "the estimate")


async def launched(pilot: Any) -> None:
    await review(pilot)
    await pilot.press("l")
    await on_screen(pilot, DashboardScreen)
    await wait_until(pilot, lambda: pilot.app.screen.view is not None and pilot.app.screen.view.step == 2, "the events")


async def past_runs(pilot: Any) -> None:
    await launched(pilot)
    await pilot.press("escape", "r")
    await on_screen(pilot, RunsScreen)
    await wait_until(pilot, lambda: len(pilot.app.screen.rows) == 1, "the list")


async def saved_presets(pilot: Any) -> None:
    await _probed(pilot)
    await pilot.press("p")
    await on_screen(pilot, PresetsScreen)


async def error_dialog(pilot: Any) -> None:
    await model(pilot)
    await pilot.press("o", *"nobody/nothing", "enter")
    await on_screen(pilot, MessageDialog)


async def too_big_dialog(pilot: Any) -> None:
    await model(pilot)
    await pilot.press("down", "down", "down", "enter")
    await on_screen(pilot, ConfirmDialog)


CASES: dict[str, tuple[Callable[[], Any], Steps]] = {
    "welcome": (no_gpu_report, welcome),
    "hardware_no_gpu": (no_gpu_report, hardware),
    "hardware_24gb": (gpu24_report, hardware),
    "model_no_gpu": (no_gpu_report, model),
    "model_24gb": (gpu24_report, model),
    "model_80gb": (gpu80_report, model),
    "model_2x80gb": (gpu80x2_report, model),
    "model_24gb_no_bitsandbytes": (lambda: gpu24_report(bitsandbytes=False), model),
    "model_error_dialog": (gpu24_report, error_dialog),
    "model_too_big_dialog": (gpu24_report, too_big_dialog),
    "dataset": (no_gpu_report, dataset),
    "dataset_custom": (no_gpu_report, dataset_custom),
    "settings": (gpu24_report, settings),
    "settings_invalid": (gpu24_report, settings_invalid),
    "settings_advanced": (gpu24_report, settings_advanced),
    "review_no_gpu": (no_gpu_report, review),
    "review_24gb": (gpu24_report, review),
    "review_2x80gb": (gpu80x2_report, review),
    "launched": (no_gpu_report, launched),
    "past_runs": (no_gpu_report, past_runs),
    "saved_presets": (no_gpu_report, saved_presets),
}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("case", list(CASES))
def test_screen(snap_compare: Any, case: str, size: str) -> None:
    make_report, steps = CASES[case]
    fakes = FakeServices(make_report(), FIXED / "runs", fixed_run_id=RUN_ID)
    app = TunewizApp(fakes.services())

    async def run_before(pilot: Any) -> None:
        await steps(pilot)
        await _settle(pilot)

    assert snap_compare(app, terminal_size=SIZES[size], run_before=run_before)
