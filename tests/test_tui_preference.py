"""The dashboard of a preference run (a recorded real DPO run): reward charts beside the loss, and the samples
tab comparing answers before and now by their length instead of by an expected answer."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.test_tui_dashboard import last_event_time, make_services, shown, text_of
from tunewiz.engine.run import rundir
from tunewiz.tui.app import TunewizApp
from tunewiz.tui.runmodel import RunModel
from tunewiz.tui.widgets.chart import LineChart

pytestmark = [pytest.mark.usefixtures("plain_hints"), pytest.mark.timeout(180)]

FIXTURE = ROOT / "tests" / "data" / "preference-run" / "20261202-032948-concise-1d40"


def test_preference_events_become_series_and_eval_lines() -> None:
    model = RunModel("r")
    model.apply_raw([
        {"type": "started", "time": 1.0, "pid": 1, "host": "h", "run_id": "r", "version": "0"},
        {"type": "preference", "time": 2.0, "step": 1, "split": "train", "chosen_reward": 0.0, "rejected_reward": 0.0,
         "margin": 0.0, "accuracy": 0.0},
        {"type": "preference", "time": 3.0, "step": 2, "split": "train", "chosen_reward": 0.2,
         "rejected_reward": -0.4, "margin": 0.6, "accuracy": 1.0},
        {"type": "preference", "time": 3.5, "step": 2, "split": "eval", "chosen_reward": 0.1,
         "rejected_reward": -0.3, "margin": 0.4, "accuracy": 0.75},
    ])
    view = model.view("running")
    assert view.preference["margin"] == ((1.0, 2.0), (0.0, 0.6))
    assert view.preference["rejected_reward"][1] == (0.0, -0.4)
    assert any("eval reward margin 0.400, accuracy 75% at step 2" in line.text for line in view.logs)
    assert RunModel("s").view("running").preference == {}  # a supervised run has none


@pytest.mark.asyncio
async def test_the_dashboard_charts_rewards_and_compares_answer_lengths(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run = rundir.RunDir(Path(shutil.copytree(FIXTURE, root / FIXTURE.name)))
    services, _ = make_services(root, last_event_time(run) + 42.0)
    async with TunewizApp(services, attach=run).run_test(size=(120, 40)) as pilot:
        screen = await shown(pilot, "completed")
        assert screen.query_one("#charts-pref").has_class("shown")
        rewards = screen.query_one("#chart-rewards", LineChart)
        assert [s.label for s in rewards.series] == ["chosen", "rejected", "margin"]
        margin = rewards.series[2].ys
        assert margin[-1] > margin[0] + 1 and "margin now" in str(rewards.border_subtitle)
        accuracy = screen.query_one("#chart-accuracy", LineChart)
        assert accuracy.series[0].ys[-1] == 1.0
        await pilot.press("3")
        await pilot.pause(0.2)
        samples = text_of(screen.query_one("#samples"))
        assert "Preferred" in samples and "words at step 8" in samples and "before training" in samples
        assert "✗" not in samples and "Expected" not in samples  # no expected answer to match


@pytest.mark.asyncio
async def test_a_supervised_run_shows_no_reward_charts(tmp_path: Path, placed_runs: Any) -> None:
    placed = placed_runs(tmp_path / "runs", "completed")
    services, _ = make_services(placed.root, last_event_time(placed.runs["completed"]) + 42.0)
    async with TunewizApp(services, attach=placed.runs["completed"]).run_test(size=(120, 40)) as pilot:
        screen = await shown(pilot, "completed")
        assert not screen.query_one("#charts-pref").has_class("shown")
        assert not screen.query_one("#charts-pref").display


def test_the_wizard_offers_the_objective_that_fits_the_data() -> None:
    from tunewiz.tui import wizard

    base = wizard.base_spec()
    pairs = wizard.apply_dataset(base, wizard.DatasetSelection(preset="ultrafeedback"), base)
    assert pairs.training.objective == "dpo" and pairs.training.learning_rate == wizard.PREFERENCE_LEARNING_RATE
    pairs.training.objective = "orpo"  # the user's choice for pairs is kept
    assert wizard.apply_dataset(pairs, wizard.DatasetSelection(preset="human-like"), base).training.objective == "orpo"
    back = wizard.apply_dataset(pairs, wizard.DatasetSelection(preset="alpaca"), base)
    assert back.training.objective == "sft" and back.training.learning_rate == base.training.learning_rate
    local = wizard.apply_dataset(base, wizard.DatasetSelection(source="/data/pairs.jsonl", format="preference"), base)
    assert local.training.objective == "dpo"
    assert "training.objective" in wizard.BASIC_KEYS
