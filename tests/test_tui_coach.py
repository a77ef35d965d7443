"""The coach in the app: alerts in the dashboard's banner and log, and the compare screen opened from Past runs
(marked runs side by side). Pilot tests and SVG snapshots at 80x24, on the recorded runs of tests/data/runs/.

Update the snapshots after an intended change with `pytest tests/test_tui_coach.py --snapshot-update`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.test_tui_dashboard import (
    FIXED,
    clock_for,
    make_services,
    open_runs,
    shown,
    text_of,
    wait_until,
)
from tunewiz.engine.run import rundir
from tunewiz.engine.run.alerts import Coach
from tunewiz.tui.app import TunewizApp
from tunewiz.tui.screens.compare import CompareScreen
from tunewiz.tui.widgets.chart import LineChart

pytestmark = [pytest.mark.usefixtures("plain_hints"), pytest.mark.timeout(180)]

EVALS = {12: 0.2, 16: 0.3, 20: 0.4}


def add_alerts(run: rundir.RunDir, count: int = 2) -> list[dict[str, Any]]:
    """Append real coach alerts (an out-of-memory recovery, overfitting) to a run's events, as the engine writes
    them."""
    coach = Coach()
    alerts = []
    for i in range(1, 21):
        alerts += coach.observe("step", {"step": i, "loss": 2.0 - 0.09 * i})
        if i in EVALS:
            alerts += coach.observe("eval", {"step": i, "eval_loss": EVALS[i]})
        if i == 12:
            coach.observe("checkpoint", {"step": 12, "path": "/r/checkpoint-12"})
    memory = {"code": "out_of_memory", "severity": "warning", "step": 9,
              "message": "Step 9 ran out of GPU memory. Retrying from checkpoint-6 with micro-batch 2 x accumulation "
                         "8.",
              "hint": "Nothing to do: the run goes on.", "details": {"micro_batch_size": 2, "gradient_accumulation": 8}}
    fields = [memory, *(a.event_fields() for a in alerts)][:count]
    last = json.loads(run.events_path.read_text().splitlines()[-1])
    with run.events_path.open("a") as handle:
        for offset, data in enumerate(fields, 1):
            handle.write(json.dumps({"v": 1, "seq": last["seq"] + offset, "time": last["time"] + offset,
                                     "type": "alert", **data}) + "\n")
    return fields


@pytest.mark.asyncio
async def test_a_live_runs_latest_alert_is_in_the_banner_and_every_alert_in_the_log(tmp_path: Path,
                                                                                   placed_runs: Any) -> None:
    placed = placed_runs(tmp_path / "runs", "running")
    run = placed.runs["running"]
    [memory, overfit] = add_alerts(run)
    services, _ = make_services(placed.root, clock_for(placed))
    async with TunewizApp(services, attach=run).run_test(size=(100, 30)) as pilot:
        screen = await shown(pilot, "running")
        banner = text_of(screen.query_one("#run-alert"))
        assert "Coach:" in banner and "memorising" in banner and "Try: Stop here" in banner
        assert "2 alerts so far" in banner and "Retrying" not in banner
        await pilot.press("4")
        await pilot.pause(0.2)
        log = "\n".join(strip.text for strip in screen.query_one("#run-log").lines)
        assert "coach: Step 9 ran out of GPU memory" in log and "coach: The eval loss has been rising" in log


@pytest.mark.asyncio
async def test_an_ended_run_names_its_alerts_in_one_line(tmp_path: Path, placed_runs: Any) -> None:
    placed = placed_runs(tmp_path / "runs", "completed")
    run = placed.runs["completed"]
    add_alerts(run)
    services, _ = make_services(placed.root, clock_for(placed))
    async with TunewizApp(services, attach=run).run_test(size=(100, 30)) as pilot:
        screen = await shown(pilot, "completed")
        banner = text_of(screen.query_one("#run-alert"))
        assert "Training completed" in banner
        assert "Coach: 2 alerts during this run (out_of_memory, overfitting)" in banner


@pytest.mark.asyncio
async def test_runs_marked_in_past_runs_open_side_by_side(tmp_path: Path, placed_runs: Any) -> None:
    placed = placed_runs(tmp_path / "runs")
    services, _ = make_services(placed.root, clock_for(placed))
    async with TunewizApp(services).run_test(size=(100, 30)) as pilot:
        runs = await open_runs(pilot)
        await pilot.press("m")  # nothing marked yet: a warning, no screen
        await pilot.pause(0.1)
        assert not isinstance(pilot.app.screen, CompareScreen)
        ids = [row["run_id"] for row in runs.rows]
        completed, cancelled = ids.index(placed.runs["completed"].run_id), ids.index(placed.runs["cancelled"].run_id)
        for index in (completed, cancelled):
            runs.query_one("#runs").move_cursor(row=index)
            await pilot.press("space")
        assert "2 marked to compare" in text_of(runs.query_one("#run-detail"))
        await pilot.press("m")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, CompareScreen) and pilot.app.screen.curves,
                         "the compare screen")
        screen = pilot.app.screen
        assert [c.run_id for c in screen.curves] == [placed.runs["completed"].run_id, placed.runs["cancelled"].run_id]
        tables = text_of(screen.query_one("#compare-tables"))
        assert "settings that differ" in tables and "training.max_steps" in tables
        loss = screen.query_one("#compare-loss", LineChart)
        assert [len(s.xs) for s in loss.series] == [24, 16]
        await pilot.press("t")
        assert loss.x_label == "tokens" and loss.series[0].xs[-1] > 24  # tokens seen, not steps
        await pilot.press("escape")
        await wait_until(pilot, lambda: pilot.app.screen is runs, "back to the runs")


async def _settle(pilot: Any) -> None:
    await pilot.pause(0.3)
    pilot.app.clear_notifications()
    await pilot.pause(0.1)


def test_snapshot_alert_on_the_dashboard(snap_compare: Any, fixed_zone: Any, fixed_place: Path,
                                          placed_runs: Any) -> None:
    placed = placed_runs(FIXED / "runs", "running")
    add_alerts(placed.runs["running"])
    services, _ = make_services(placed.root, clock_for(placed))

    async def steps(pilot: Any) -> None:
        await shown(pilot, "running")
        await _settle(pilot)

    assert snap_compare(TunewizApp(services, attach=placed.runs["running"]), terminal_size=(80, 24), run_before=steps)


def test_snapshot_compare(snap_compare: Any, fixed_zone: Any, fixed_place: Path, placed_runs: Any) -> None:
    placed = placed_runs(FIXED / "runs", "completed", "cancelled")
    services, _ = make_services(placed.root, clock_for(placed))
    app = TunewizApp(services)

    async def steps(pilot: Any) -> None:
        await pilot.app.push_screen(CompareScreen([placed.runs["completed"], placed.runs["cancelled"]]))
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, CompareScreen) and pilot.app.screen.curves,
                         "the compare screen")
        await _settle(pilot)

    assert snap_compare(app, terminal_size=(80, 24), run_before=steps)
