"""The run dashboard, the Runs screen and `tunewiz attach`, on event files recorded from real CPU demo runs.

Fixtures (tests/data/runs/, see its README): completed, cancelled (a real stop), dead (a real SIGKILL), failed
(a real failure whose error event was edited to a CUDA out-of-memory message), and running (a real run's events
cut mid-way; the test process holds the engine lock, so the run reads as live). Clocks are fixed, so elapsed
time and ETA do not move in snapshots.

Update the snapshots after an intended change with
`pytest tests/test_tui_dashboard.py -k snapshot --snapshot-update` and look at the report first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.tui_fakes import FakeServices, no_gpu_report
from tunewiz.engine.run import rundir
from tunewiz.engine.run.events import EventReader
from tunewiz.engine.run.worktime import LossScan
from tunewiz.tui.app import TunewizApp
from tunewiz.tui.dialogs import ConfirmDialog, ExportDialog, MessageDialog
from tunewiz.tui.runmodel import RunModel, Series
from tunewiz.tui.screens.dashboard import DashboardScreen
from tunewiz.tui.screens.runs import RunsScreen
from tunewiz.tui.screens.settings import SettingsScreen
from tunewiz.tui.screens.welcome import WelcomeScreen
from tunewiz.tui.services import Services
from tunewiz.tui.widgets.chart import LineChart

pytestmark = [pytest.mark.usefixtures("plain_hints"), pytest.mark.timeout(180)]

FIXTURES = ROOT / "tests" / "data" / "runs"
FIXED = Path("/tmp/tunewiz-dashboard-tests")
"""Paths show on screen, so snapshot runs live in a fixed place rather than pytest's tmp_path."""
SIZES = {"60x20": (60, 20), "80x24": (80, 24), "120x40": (120, 40)}
RUN_IDS = {path.name.split("-")[3]: path.name for path in FIXTURES.iterdir() if path.is_dir()}
"""State -> run id of the fixture, e.g. "completed" -> "20261127-220318-demo-completed-f9c4"."""


def text_of(widget: Any) -> str:
    console = Console(width=200, file=io.StringIO(), color_system=None)
    console.print(widget.content)
    return console.file.getvalue()


def last_event_time(run: rundir.RunDir) -> float:
    return EventReader(run.events_path).read_all()[-1].time


@dataclasses.dataclass
class Placed:
    """Fixture runs copied into a runs folder; the running one's lock is held by this process."""

    root: Path
    runs: dict[str, rundir.RunDir]
    lock_fd: int | None = None

    def release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def place(root: Path, *states: str) -> Placed:
    """Copy the named fixtures (all by default) into `root`; hold the lock of the running one."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    runs = {}
    for state in states or tuple(RUN_IDS):
        runs[state] = rundir.RunDir(Path(shutil.copytree(FIXTURES / RUN_IDS[state], root / RUN_IDS[state])))
    placed = Placed(root, runs)
    if "running" in runs:
        placed.lock_fd = rundir.acquire_lock(runs["running"].lock_path)
    return placed


@dataclasses.dataclass
class ActionFakes:
    """Stop, resume and export services that record their calls instead of touching engines."""

    stopped: list[str] = dataclasses.field(default_factory=list)
    resumed: list[str] = dataclasses.field(default_factory=list)
    exported: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def stop(self, run: rundir.RunDir, on_progress: Callable[[str], None]) -> str:
        self.stopped.append(run.run_id)
        on_progress("stop requested")
        return "graceful"

    def resume(self, run: rundir.RunDir) -> int:
        self.resumed.append(run.run_id)
        return 4242

    def export(self, run: rundir.RunDir, kind: str, on_progress: Callable[[str], None]) -> str:
        self.exported.append((run.run_id, kind))
        on_progress("merging the adapter into the base weights")
        return f"GGUF q8_0: 40/40 answers identical to the adapter\n{run.path}/exports/{kind}"


def make_services(root: Path, clock: float, actions: ActionFakes | None = None) -> tuple[Services, FakeServices]:
    fakes = FakeServices(no_gpu_report(), root)
    services = fakes.services()
    actions = actions or ActionFakes()
    services.stop, services.resume, services.export = actions.stop, actions.resume, actions.export
    services.clock = lambda: clock
    return services, fakes


def clock_for(placed: Placed) -> float:
    """42 s after the running fixture's last event (or the completed one's)."""
    run = placed.runs.get("running") or next(iter(placed.runs.values()))
    return last_event_time(run) + 42.0


async def wait_until(pilot: Any, predicate: Callable[[], Any], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; screen is {type(pilot.app.screen).__name__}")
        await pilot.pause(0.05)


async def shown(pilot: Any, state: str | None = None) -> DashboardScreen:
    """Wait for the dashboard to show a view (in `state`, when given)."""
    def ready() -> bool:
        screen = pilot.app.screen
        return (isinstance(screen, DashboardScreen) and screen.view is not None
                and (state is None or screen.view.state == state))

    await wait_until(pilot, ready, f"the dashboard ({state or 'any state'})")
    return pilot.app.screen


# ---------------------------------------------------------------------------------------------
# The model, without the UI


def fixture_events(state: str) -> list[Any]:
    return EventReader(FIXTURES / RUN_IDS[state] / "events.jsonl").read_all()


@pytest.mark.parametrize("state", sorted(RUN_IDS))
def test_the_byte_fast_path_gives_the_same_view_as_decoding_each_event(state: str) -> None:
    slow = RunModel(state)
    slow.apply(fixture_events(state))
    fast = RunModel(state)
    reader = EventReader(FIXTURES / RUN_IDS[state] / "events.jsonl")
    while True:
        body, _reset = reader.poll_bytes(4096)  # small chunks: lines are split across reads
        if not body and reader.offset >= reader.path.stat().st_size:
            break
        fast.apply_bytes(body)
    a, b = fast.view(state), slow.view(state)
    for item in dataclasses.fields(a):
        if item.name != "version":
            assert getattr(a, item.name) == getattr(b, item.name), item.name


def _write_resumed_run(path: Path) -> None:
    """Three engine lives in one file, in the engine's own line layout; the later lives repeat steps.

    Each event is a quarter second after the one before (a fake clock), so every life has a length."""
    import itertools
    from unittest import mock

    from tunewiz.engine.run.events import EventWriter

    clock = itertools.count(1_000_000.0, 0.25)
    with mock.patch("tunewiz.engine.run.events.time.time", side_effect=lambda: next(clock)):
        _write_lives(EventWriter(path))


def _write_lives(writer: Any) -> None:
    for life, steps in enumerate((range(1, 7), range(5, 9), range(7, 11))):
        writer.emit("started", pid=life, host="h", run_id="r", version="0", resumed_from_step=steps[0] - 1 or None)
        for step in steps:
            writer.emit("step", step=step, total_steps=10, epoch=step / 10, loss=3.0 - life - step / 100,
                        learning_rate=1e-4, grad_norm=None if step == 8 else 0.5, tokens_per_s=100.0 + step,
                        samples_per_s=1.0, tokens_seen=step * 10, elapsed_s=float(step), eta_s=1.0)
            if step % 3 == 0:
                writer.emit("gpu", devices=[], process={"rss_bytes": 1, "cpu_pct": 50.0, "cpu_count": 2})
    writer.emit("finished", status="completed", step=10)
    writer.close()


@pytest.mark.parametrize("chunk", [64, 300, 1 << 20])
def test_the_fast_path_handles_resumed_lives_in_any_chunking(tmp_path: Path, chunk: int) -> None:
    path = tmp_path / "events.jsonl"
    _write_resumed_run(path)
    slow = RunModel("r")
    slow.apply(EventReader(path).read_all())
    fast = RunModel("r")
    reader = EventReader(path)
    while reader.offset < path.stat().st_size:
        body, _reset = reader.poll_bytes(chunk)
        fast.apply_bytes(body)
    a, b = fast.view("completed"), slow.view("completed")
    assert a.series["loss"][0] == tuple(float(n) for n in range(1, 11))
    assert a.series["loss"][1][-1] == pytest.approx(3.0 - 2 - 0.1) and a.resumes == 2
    scan = LossScan(path)  # what the Runs screen shows: the same losses and working time
    while scan.offset < path.stat().st_size:
        scan.update(chunk)
    assert (scan.last, scan.best) == (a.loss, a.best_loss)
    assert scan.worked() == pytest.approx(a.elapsed(0))
    assert a.elapsed(0) == pytest.approx((8 + 5 + 6) * 0.25)  # lives of 9, 6 and 7 events, the gaps left out
    for item in dataclasses.fields(a):
        if item.name != "version":
            assert getattr(a, item.name) == getattr(b, item.name), item.name


def test_fixtures_hold_what_their_state_needs() -> None:
    steps = {state: [e for e in fixture_events(state) if e.type == "step"] for state in RUN_IDS}
    assert all(steps.values()), {state: len(found) for state, found in steps.items()}
    completed = [e for e in fixture_events("completed") if e.type == "finished"]
    assert completed[-1].get("status") == "completed"
    assert [e.get("status") for e in fixture_events("cancelled") if e.type == "finished"] == ["cancelled"]
    assert not [e for e in fixture_events("dead") if e.type == "finished"]
    error = [e for e in fixture_events("failed") if e.type == "error"][-1]
    assert "out of memory" in error.get("message") and "micro_batch_size" in error.get("hint")
    assert any(e.type == "checkpoint" for e in fixture_events("cancelled"))
    assert not [e for e in fixture_events("running") if e.type == "finished"]


def test_series_stay_bounded_and_cover_the_whole_run() -> None:
    series = Series(64)
    for step in range(1, 10_001):
        series.add(step, float(step))
    xs, ys = series.points()
    assert len(xs) < 64 and xs[0] < 200 and xs[-1] > 9800
    assert all(abs(x - y) < 1e-9 for x, y in zip(xs, ys))  # averages of (step, step) stay on the diagonal
    bulk = Series(64)
    bulk.extend(list(range(1, 10_001)), [float(s) for s in range(1, 10_001)])
    assert len(bulk.points()[0]) < 64 and bulk.points()[0][-1] > 9800


def test_a_resumed_run_repeats_steps_and_the_later_ones_win() -> None:
    model = RunModel("r")

    def step(n: int, loss: float, start: float) -> dict[str, Any]:
        return {"type": "step", "time": start + n, "step": n, "total_steps": 10, "epoch": n / 10, "loss": loss,
                "learning_rate": 1e-4, "elapsed_s": n}

    model.apply_raw([{"type": "started", "time": 100.0, "pid": 1}, *(step(n, 2.0, 100) for n in range(1, 7))])
    model.apply_raw([{"type": "started", "time": 500.0, "pid": 2, "resumed_from_step": 4},
                     *(step(n, 1.0, 496) for n in range(5, 11))])
    view = model.view("completed")
    assert view.series["loss"][0] == tuple(float(n) for n in range(1, 11))
    assert view.series["loss"][1] == (2.0,) * 4 + (1.0,) * 6
    assert view.resumes == 1
    assert view.elapsed(10_000) == pytest.approx(6.0 + 6.0)  # two engine lives, the gap between them not counted


def test_a_file_that_was_replaced_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    lines = (FIXTURES / RUN_IDS["completed"] / "events.jsonl").read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:40]))
    reader = EventReader(path)
    model = RunModel("x")
    body, reset = reader.poll_bytes()
    model.apply_bytes(body)
    path.write_bytes(b"".join(lines[:10]))  # shorter: truncated or replaced
    body, reset = reader.poll_bytes()
    assert reset
    model.reset()
    model.apply_bytes(body)
    assert model.events == 10


# ---------------------------------------------------------------------------------------------
# The dashboard, one fixture at a time


@pytest.mark.asyncio
@pytest.mark.parametrize("state", ["completed", "cancelled", "dead", "failed", "running"])
async def test_attach_shows_the_whole_history(state: str, tmp_path: Path, placed_runs: Any) -> None:
    placed = placed_runs(tmp_path / "runs", state)
    run = placed.runs[state]
    services, _ = make_services(placed.root, clock_for(placed))
    app = TunewizApp(services, attach=run)
    steps = [e for e in EventReader(run.events_path).read_all() if e.type == "step"]
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await shown(pilot, state)
        view = screen.view
        assert view.step == steps[-1].get("step") and len(view.series["loss"][0]) == len({e.get("step") for e in steps})
        title = text_of(screen.query_one("#run-title"))
        assert state.upper() in title and run.run_id in title
        progress = text_of(screen.query_one("#run-progress"))
        assert f"step {view.step}/{view.total_steps}" in progress
        # the header is redrawn without a layout pass: a height that followed its text would keep the one line of
        # "reading the run's events…" whenever no other layout came after the view (a flaky snapshot once)
        height = screen.query_one("#run-progress").styles.height
        assert height is not None and (height.value, height.unit.name) == (2, "CELLS")
        assert screen.query_one("#run-progress").size.height == 2
        alert = text_of(screen.query_one("#run-alert"))
        if state == "failed":
            assert "CUDA out of memory" in alert and "micro_batch_size" in alert and "r starts it again" in alert
        elif state == "dead":
            assert "gone without finishing" in alert
        elif state == "cancelled":
            assert "Stopped on request" in alert
        elif state == "running":
            assert "ETA" in progress and not screen.query_one("#run-alert").has_class("shown")
        await pilot.press("4")
        await pilot.pause(0.2)
        log = screen.query_one("#run-log")
        assert len(log.lines) >= 5


@pytest.mark.asyncio
async def test_a_live_run_is_followed_as_events_arrive(tmp_path: Path, placed_runs: Any) -> None:
    """Replay the completed run's file into a live one in pieces (a line split across writes, too)."""
    placed = placed_runs(tmp_path / "runs", "running")
    run = placed.runs["running"]
    full = (FIXTURES / RUN_IDS["completed"] / "events.jsonl").read_bytes()
    have = run.events_path.read_bytes()
    assert full.startswith(have)
    rest = full[len(have):]
    services, _ = make_services(placed.root, clock_for(placed))
    app = TunewizApp(services, attach=run)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await shown(pilot, "running")
        first_step = screen.view.step
        cut = rest.index(b'"type": "step"') + 20  # in the middle of the next step line
        with run.events_path.open("ab") as handle:
            handle.write(rest[:cut])
        await pilot.pause(1.2)
        assert screen.view.step == first_step  # the half line is held back
        with run.events_path.open("ab") as handle:
            handle.write(rest[cut:])
        await wait_until(pilot, lambda: screen.view.step == 24, "the last step")
        assert screen.view.state == "running"
        run.update_status(state="completed")
        placed.release()
        await wait_until(pilot, lambda: screen.view.state == "completed", "the completed state")
        assert "COMPLETED" in text_of(screen.query_one("#run-title"))
        assert len(screen.view.series["loss"][0]) == 24


@pytest.mark.asyncio
async def test_a_live_run_whose_engine_dies_shows_dead(tmp_path: Path, placed_runs: Any) -> None:
    placed = placed_runs(tmp_path / "runs", "running")
    services, _ = make_services(placed.root, clock_for(placed))
    app = TunewizApp(services, attach=placed.runs["running"])
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await shown(pilot, "running")
        placed.release()  # the lock goes free without a final status: killed
        await wait_until(pilot, lambda: screen.view.state == "dead", "the dead state")
        assert "gone without finishing" in text_of(screen.query_one("#run-alert"))


@pytest.mark.asyncio
async def test_charts_are_not_redrawn_while_nothing_changes(tmp_path: Path, placed_runs: Any) -> None:
    placed = placed_runs(tmp_path / "runs", "running")
    services, _ = make_services(placed.root, clock_for(placed))
    app = TunewizApp(services, attach=placed.runs["running"])
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await shown(pilot, "running")
        await pilot.pause(0.5)
        charts = list(screen.query(LineChart))
        before = [chart.renders for chart in charts]
        snapshots = screen.snapshots
        await pilot.pause(2.5)  # five polls and two header ticks
        assert [chart.renders for chart in charts] == before
        assert screen.snapshots == snapshots


# ---------------------------------------------------------------------------------------------
# Keys


@pytest.mark.asyncio
async def test_stop_asks_first_then_stops_in_a_worker(tmp_path: Path, placed_runs: Any) -> None:
    placed = placed_runs(tmp_path / "runs", "running", "completed")
    actions = ActionFakes()
    services, _ = make_services(placed.root, clock_for(placed), actions)
    app = TunewizApp(services, attach=placed.runs["running"])
    async with app.run_test(size=(100, 30)) as pilot:
        await shown(pilot, "running")
        await pilot.press("s")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the question")
        await pilot.press("n")
        await shown(pilot)
        assert actions.stopped == []
        await pilot.press("s")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the question")
        await pilot.press("y")
        await wait_until(pilot, lambda: actions.stopped, "the stop")
        assert actions.stopped == [placed.runs["running"].run_id]
    app = TunewizApp(services, attach=placed.runs["completed"])
    async with app.run_test(size=(100, 30)) as pilot:
        await shown(pilot, "completed")
        await pilot.press("s", "r")  # nothing to stop or resume: the keys are not offered
        await pilot.pause(0.3)
        assert isinstance(app.screen, DashboardScreen) and actions.stopped == [placed.runs["running"].run_id]
        assert actions.resumed == []
        footer_keys = {key for key, active in app.screen.active_bindings.items()
                       if active.binding.show and active.enabled}
        assert "s" not in footer_keys and "r" not in footer_keys and "e" in footer_keys


@pytest.mark.asyncio
@pytest.mark.parametrize("state", ["cancelled", "dead", "failed"])
async def test_resume_starts_a_new_engine_on_the_same_run(state: str, tmp_path: Path, placed_runs: Any) -> None:
    placed = placed_runs(tmp_path / "runs", state)
    actions = ActionFakes()
    services, _ = make_services(placed.root, clock_for(placed), actions)
    app = TunewizApp(services, attach=placed.runs[state])
    async with app.run_test(size=(100, 30)) as pilot:
        await shown(pilot, state)
        await pilot.press("r")
        await wait_until(pilot, lambda: actions.resumed, "the resume")
        await pilot.press("r")  # pressed twice: one resume only
        await pilot.pause(0.3)
    assert actions.resumed == [placed.runs[state].run_id]


@pytest.mark.asyncio
async def test_export_offers_adapter_merged_or_gguf_and_runs_in_a_worker(tmp_path: Path, placed_runs: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    placed = placed_runs(tmp_path / "runs", "completed")
    monkeypatch.chdir(tmp_path)
    actions = ActionFakes()
    services, _ = make_services(placed.root, clock_for(placed), actions)
    run = placed.runs["completed"]
    app = TunewizApp(services, attach=run)
    async with app.run_test(size=(100, 30)) as pilot:
        await shown(pilot, "completed")
        await pilot.press("e")
        await wait_until(pilot, lambda: isinstance(app.screen, ExportDialog), "the export choice")
        await pilot.press("escape")
        await shown(pilot)
        await pilot.press("e")
        await wait_until(pilot, lambda: isinstance(app.screen, ExportDialog), "the export choice")
        await pilot.press("g")
        await wait_until(pilot, lambda: isinstance(app.screen, MessageDialog), "the export's result")
        assert "40/40 answers identical" in app.screen.message
    assert actions.exported == [(run.run_id, "gguf-q8_0")]


def test_the_default_export_runs_the_export_command(tmp_path: Path) -> None:
    """The real service: `python -m tunewiz.engine export` in a child; its error comes back as a ServiceError."""
    from tunewiz.tui.services import ServiceError, default_export

    run = place(tmp_path / "runs", "cancelled").runs["cancelled"]
    progress: list[str] = []
    with pytest.raises(ServiceError) as caught:
        default_export(run, "merged", progress.append)
    assert "has no trained adapter" in str(caught.value) and "resume" in (caught.value.hint or "")


@pytest.mark.asyncio
async def test_help_detach_and_back(tmp_path: Path, placed_runs: Any) -> None:
    placed = placed_runs(tmp_path / "runs", "running")
    services, _ = make_services(placed.root, clock_for(placed))
    run = placed.runs["running"]
    app = TunewizApp(services, attach=run)
    async with app.run_test(size=(100, 30)) as pilot:
        await shown(pilot, "running")
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, MessageDialog), "the help")
        assert f"tunewiz attach {run.run_id}" in app.screen.message and "Eval" in app.screen.message
        await pilot.press("escape")
        await shown(pilot)
        await pilot.press("escape")  # attached directly: back goes to the welcome screen
        await wait_until(pilot, lambda: isinstance(app.screen, WelcomeScreen), "the welcome screen")
        await wait_until(pilot, lambda: app.state.report is None, "no probe yet")
        await pilot.press("r")
        await wait_until(pilot, lambda: isinstance(app.screen, RunsScreen), "the runs")
        await wait_until(pilot, lambda: app.screen.rows, "the list")
        await pilot.press("enter")
        await shown(pilot, "running")
        await pilot.press("d")  # opened from Past runs: detaching returns there
        await wait_until(pilot, lambda: isinstance(app.screen, RunsScreen), "the runs again")
        assert app.return_code is None and run.engine_alive()  # detaching leaves the run alone
    assert app.watched == [run]


# ---------------------------------------------------------------------------------------------
# The Runs screen


async def open_runs(pilot: Any) -> RunsScreen:
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, WelcomeScreen), "the welcome screen")
    await pilot.press("r")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, RunsScreen), "the runs screen")
    await wait_until(pilot, lambda: len(pilot.app.screen.rows) == len(RUN_IDS), "every run listed")
    return pilot.app.screen


@pytest.mark.asyncio
async def test_runs_are_listed_newest_first_with_state_and_losses(tmp_path: Path, placed_runs: Any) -> None:
    placed = placed_runs(tmp_path / "runs")
    services, _ = make_services(placed.root, clock_for(placed))
    app = TunewizApp(services)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_runs(pilot)
        ids = [row["run_id"] for row in screen.rows]
        assert ids == sorted(ids, reverse=True)
        states = {row["run_id"]: row["state"] for row in screen.rows}
        assert states == {run_id: state for state, run_id in RUN_IDS.items()}
        for row in screen.rows:
            losses = [e.get("loss") for e in fixture_events(row["state"]) if e.type == "step"]
            assert row["loss"] == pytest.approx(losses[-1]) and row["best"] == pytest.approx(min(losses))
            assert row["model"] == "smollm2-135m-demo"
            model = RunModel(row["run_id"])
            model.apply(fixture_events(row["state"]))
            assert row["duration_s"] == pytest.approx(model.view(row["state"]).elapsed(clock_for(placed)))


@pytest.mark.asyncio
async def test_runs_open_resume_relaunch_and_delete(tmp_path: Path, placed_runs: Any) -> None:
    placed = placed_runs(tmp_path / "runs")
    actions = ActionFakes()
    services, fakes = make_services(placed.root, clock_for(placed), actions)
    app = TunewizApp(services)

    def select(screen: RunsScreen, state: str) -> None:
        index = next(i for i, row in enumerate(screen.rows) if row["state"] == state)
        screen.query_one("#runs").move_cursor(row=index)

    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_runs(pilot)
        select(screen, "dead")
        await pilot.press("enter")
        await shown(pilot, "dead")
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is screen, "the runs screen")
        await pilot.press("r")  # resume the dead run: a new engine, and its dashboard
        await wait_until(pilot, lambda: actions.resumed, "the resume")
        assert actions.resumed == [placed.runs["dead"].run_id]
        await shown(pilot)
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is screen, "the runs screen")

        select(screen, "running")
        await pilot.press("x")  # a live run cannot be deleted
        await pilot.pause(0.2)
        assert app.screen is screen and placed.runs["running"].path.exists()
        select(screen, "failed")
        await pilot.press("x")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the question")
        await pilot.press("n")
        assert placed.runs["failed"].path.exists()
        await pilot.press("x")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the question")
        await pilot.press("y")
        await wait_until(pilot, lambda: not placed.runs["failed"].path.exists(), "the deletion")
        await wait_until(pilot, lambda: len(screen.rows) == len(RUN_IDS) - 1, "the shorter list")

        select(screen, "completed")
        await pilot.press("l")  # relaunch: the run's spec, editable, in the wizard
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen), "the settings step")
        spec = placed.runs["completed"].load_spec()
        assert app.state.spec == spec and app.state.relaunch_of == placed.runs["completed"].run_id
        await pilot.press("tab", "tab", "ctrl+u", *"30")  # max steps
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: type(app.screen).__name__ == "ReviewScreen", "the review")
        await pilot.press("l")
        await wait_until(pilot, lambda: fakes.launched, "the launch")
    launched = fakes.launched[0]
    assert launched.training.max_steps == 30
    assert dataclasses.replace(launched, training=spec.training) == spec


# ---------------------------------------------------------------------------------------------
# `tunewiz attach` and the headless CLI

ATTACH_HEADLESS = """
import json, sys
from tunewiz.engine.cli.main import main
code = main(["attach", "nosuchrun"])
print(json.dumps({"code": code, "textual": "textual" in sys.modules}))
"""


def test_attach_is_a_command_that_loads_the_app_only_when_run(tunewiz_home: Path) -> None:
    from tunewiz.engine.cli.main import build_parser

    args = build_parser().parse_args(["attach", "last"])
    assert args.func.__name__ == "cmd_attach"
    result = subprocess.run([PYTHON, "-c", ATTACH_HEADLESS], env=subprocess_env(), cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"code": 2, "textual": False}
    assert "no run id starts with 'nosuchrun'" in result.stderr


# ---------------------------------------------------------------------------------------------
# Snapshots


async def _settle(pilot: Any) -> None:
    await pilot.pause(0.3)
    pilot.app.clear_notifications()
    await pilot.pause(0.1)


def _dashboard_case(state: str, keys: tuple[str, ...] = ()) -> Callable[[Any], Any]:
    async def steps(pilot: Any) -> None:
        await shown(pilot, state)
        for key in keys:
            await pilot.press(key)
        await _settle(pilot)

    return steps


async def _runs_case(pilot: Any) -> None:
    await open_runs(pilot)
    await _settle(pilot)


SNAPSHOTS: dict[str, tuple[str | None, Callable[[Any], Any]]] = {
    "running": ("running", _dashboard_case("running")),
    "running_resources": ("running", _dashboard_case("running", ("2",))),
    "running_stop_question": ("running", _dashboard_case("running", ("s",))),
    "completed": ("completed", _dashboard_case("completed")),
    "completed_samples": ("completed", _dashboard_case("completed", ("3",))),
    "failed_oom": ("failed", _dashboard_case("failed")),
    "failed_log": ("failed", _dashboard_case("failed", ("4",))),
    "cancelled": ("cancelled", _dashboard_case("cancelled")),
    "dead": ("dead", _dashboard_case("dead")),
    "help": ("completed", _dashboard_case("completed", ("question_mark",))),
    "runs": (None, _runs_case),
}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("case", list(SNAPSHOTS))
def test_snapshot(snap_compare: Any, case: str, size: str, fixed_zone: Any, fixed_place: Path,
                  placed_runs: Any) -> None:
    state, steps = SNAPSHOTS[case]
    placed = placed_runs(FIXED / "runs")
    services, _ = make_services(placed.root, clock_for(placed))
    app = TunewizApp(services, attach=placed.runs[state] if state else None)
    assert snap_compare(app, terminal_size=SIZES[size], run_before=steps)


# ---------------------------------------------------------------------------------------------
# A real demo run started from the app, whose process is killed; the run goes on and is re-attached

APP_PROCESS = """
import asyncio, sys
from pathlib import Path
from tests.tui_fakes import FakeServices, no_gpu_report
from textual.widgets import Input
from tunewiz.tui.app import TunewizApp
from tunewiz.tui.screens.dashboard import DashboardScreen
from tunewiz.tui.screens.settings import SettingsScreen
from tunewiz.tui.services import Services

SETTINGS = {"f-training--max_steps": "4", "f-training--sample_prompts": "1", "f-training--eval_every": "4",
            "f-training--save_every": "2"}

async def until(pilot, predicate):
    while not predicate():
        await pilot.pause(0.05)

async def main(root):
    fakes = FakeServices(no_gpu_report(), root)
    app = TunewizApp(Services(probe=no_gpu_report, check_data=fakes.check_data, runs_root=root))
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.state.report is not None)
        while not isinstance(app.screen, SettingsScreen):
            await pilot.press("enter")
            await pilot.pause(0.3)
        await pilot.press("ctrl+t")
        for wid, value in SETTINGS.items():
            app.screen.query_one("#" + wid, Input).focus()
            await pilot.press("ctrl+u", *value)
        await pilot.pause(0.3)
        await pilot.press("ctrl+n")
        await until(pilot, lambda: type(app.screen).__name__ == "ReviewScreen")
        await pilot.press("l")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        print("RUN", app.screen.run.path, flush=True)
        await until(pilot, lambda: app.screen.view is not None and app.screen.view.step)
        print("STEP", app.screen.view.step, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main(Path(sys.argv[1])))
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.asyncio
async def test_a_real_run_outlives_the_app_that_started_it(tmp_path: Path, demo_model: Path) -> None:
    root = tmp_path / "runs"
    app_process = subprocess.Popen([PYTHON, "-c", APP_PROCESS, str(root)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=subprocess_env(TQDM_DISABLE="1"), cwd=ROOT,
                                   text=True, start_new_session=True)
    run = None
    try:
        line = ""
        deadline = time.monotonic() + 300
        while not line.startswith("STEP") and time.monotonic() < deadline:
            line = app_process.stdout.readline()
            if line.startswith("RUN"):
                run = rundir.RunDir(Path(line.split(maxsplit=1)[1].strip()))
            if not line and app_process.poll() is not None:
                break
        assert line.startswith("STEP") and run is not None, app_process.stderr.read()[-3000:]
        steps_then = sum(e.type == "step" for e in EventReader(run.events_path).read_all())
        os.killpg(app_process.pid, signal.SIGKILL)  # the app and everything in its session, like a crash
        app_process.wait(10)
        assert run.engine_alive() and run.state() == "running"
        deadline = time.monotonic() + 600
        while run.state() == "running" and time.monotonic() < deadline:
            await asyncio.sleep(1)
        assert run.state() == "completed", (run.status(), run.log_path.read_text()[-3000:])
        events = EventReader(run.events_path).read_all()
        steps = [e.get("step") for e in events if e.type == "step"]
        assert steps == [1, 2, 3, 4] and steps_then < 4  # training went on after the app died

        services = Services(probe=no_gpu_report, runs_root=root)
        app = TunewizApp(services, attach=run)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await shown(pilot, "completed")
            assert screen.view.step == 4 and screen.view.series["loss"][0] == (1.0, 2.0, 3.0, 4.0)
            assert screen.view.events == len(events)
            assert "step 4/4" in text_of(screen.query_one("#run-progress"))
    finally:
        if app_process.poll() is None:
            os.killpg(app_process.pid, signal.SIGKILL)
        if run is not None and run.engine_alive():
            pgid = run.status().get("pgid")
            if isinstance(pgid, int):
                os.killpg(pgid, signal.SIGKILL)


@pytest.mark.asyncio
async def test_a_run_resumed_elsewhere_is_followed_again(tmp_path: Path, placed_runs: Any) -> None:
    """The worker stops once a run has ended; when another client resumes it, the files change and it follows."""
    placed = placed_runs(tmp_path / "runs", "cancelled")
    run = placed.runs["cancelled"]
    services, _ = make_services(placed.root, clock_for(placed))
    app = TunewizApp(services, attach=run)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await shown(pilot, "cancelled")
        await wait_until(pilot, lambda: not screen._following, "the worker to stop")
        assert not [w for w in app.workers if w.group == "tail" and w.is_running]
        lock = rundir.acquire_lock(run.lock_path)  # a new engine, as `tunewiz resume` would start it
        try:
            run.update_status(state="running")
            last = EventReader(run.events_path).read_all()[-1]
            with run.events_path.open("a") as handle:
                handle.write(json.dumps({"v": 1, "seq": last.seq + 1, "time": last.time + 60, "type": "started",
                                         "pid": 1, "host": "h", "run_id": run.run_id, "version": "0",
                                         "resumed_from_step": 16}) + "\n")
                handle.write(json.dumps({"v": 1, "seq": last.seq + 2, "time": last.time + 70, "type": "step",
                                         "step": 17, "total_steps": 40, "epoch": 0.24, "loss": 0.2,
                                         "learning_rate": 3e-4, "elapsed_s": 10}) + "\n")
            await wait_until(pilot, lambda: screen.view.state == "running" and screen.view.step == 17, "the resume")
            assert screen.view.resumes == 1
        finally:
            os.close(lock)


@pytest.mark.parametrize("how", ["sighup", "terminal closed"])
def test_attach_exits_cleanly_when_the_terminal_goes_away(tmp_path: Path, placed_runs: Any, how: str) -> None:
    """`tunewiz attach` in a pseudo-terminal: a hang-up or a closed terminal ends the app, never the run."""
    import pty
    import select

    from tests.test_tui_wizard import _take_terminal

    placed = placed_runs(tmp_path / "runs", "running")
    run = placed.runs["running"]
    master, slave = pty.openpty()
    env = subprocess_env(TERM="xterm-256color", COLUMNS="80", LINES="24")
    process = subprocess.Popen([PYTHON, "-m", "tunewiz.engine", "attach", str(run.path)], stdin=slave, stdout=slave,
                               stderr=slave, env=env, cwd=ROOT, start_new_session=True, close_fds=True,
                               preexec_fn=_take_terminal)
    os.close(slave)
    try:
        seen = b""
        deadline = time.monotonic() + 30
        while b"RUNNING" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        assert b"RUNNING" in seen, seen[-2000:]
        if how == "sighup":
            os.kill(process.pid, signal.SIGHUP)
        else:
            os.close(master)
            master = -1
        assert process.wait(timeout=15) == 0
        assert run.engine_alive() and run.state() == "running"  # the "engine" (this test's lock) is untouched
    finally:
        if process.poll() is None:
            process.kill()
        if master >= 0:
            os.close(master)


def test_gpu_readings_become_gauges_with_peaks_and_history() -> None:
    """No GPU run was recorded here: a `gpu` event in the engine's format, for two GPUs."""
    from tunewiz.tui.screens.dashboard import resources_text

    def device(index: int, used: float, util: int) -> dict[str, Any]:
        return {"index": index, "name": "NVIDIA H100 80GB HBM3", "mem_used_bytes": used, "mem_total_bytes": 85e9,
                "util_pct": util, "power_w": 600.0, "temp_c": 66, "torch_allocated_bytes": None,
                "torch_reserved_bytes": None, "torch_peak_allocated_bytes": None, "torch_peak_reserved_bytes": 39e9}

    model = RunModel("g")
    model.apply_raw([{"type": "started", "time": 1.0, "pid": 1},
                     *({"type": "gpu", "time": 2.0 + t,
                        "devices": [device(0, 30e9 + t * 0.2e9, 90), device(1, 20e9, 50)],
                        "process": {"rss_bytes": 6e9, "cpu_pct": 101.0, "cpu_count": 16}} for t in range(130))])
    view = model.view("running")
    assert len(view.gpus) == 2 and len(view.gpus[0].history["mem"]) == 120  # the last 10 minutes
    text = resources_text(view, 100).plain
    assert "GPU 0  NVIDIA H100 80GB HBM3" in text and "GPU 1" in text
    assert "52.0/79 GiB, peak 52.0" in text and "18.6/79 GiB, peak 18.6" in text
    assert "90 %" in text and "600 W" in text and "66 °C" in text
    assert "torch reserved at its peak: 36 GiB" in text
    assert "Engine process" in text and "of 16 cores" in text
