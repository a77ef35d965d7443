"""Every run, newest first, with its state (from lock and status, so a killed engine shows as dead), model,
name, start, duration and last/best loss. Open or attach, relaunch in the wizard, resume, delete.

The list refreshes itself every 2 seconds in a worker; the losses are read incrementally from each run's
events (tunewiz.engine.run.worktime.LossScan), so a refresh costs only the bytes written since the last one.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Static

from tunewiz.engine.config.spec import SpecError
from tunewiz.engine.render import duration, method_name
from tunewiz.engine.run import rundir
from tunewiz.engine.run.rundir import LIVE_STATES
from tunewiz.engine.run.worktime import LossScan
from tunewiz.tui.messages import RunActionDone, RunsListed
from tunewiz.tui.navigation import Place
from tunewiz.tui.screens.base import WizardScreen
from tunewiz.tui.styles import STATE_MARKS, STATE_STYLES

REFRESH_S = 2.0
COLUMNS = (("name", "Name · model"), ("state", "State"), ("step", "Step"), ("duration", "Time"), ("loss", "Loss"),
           ("best", "Best"), ("started", "Started"))
"""Two lines a row, so that the list fits 80 columns."""


def run_row(run: rundir.RunDir, now: float, scan: LossScan | None = None) -> dict[str, Any]:
    """What the list shows about one run (read from its status, its lock and its events)."""
    status = run.status()
    state = run.state()
    created = status.get("created")
    started = status.get("started") or created
    end: float | None = now if state in LIVE_STATES else (status.get("finished") or status.get("updated"))
    worked = None
    if scan is not None:
        scan.update()
        worked = scan.worked(now if state in ("running", "stopping") else None)
    last = scan.last if scan is not None and scan.last is not None else status.get("loss")
    return {"run_id": run.run_id, "path": run.path, "state": state, "name": status.get("name"),
            "model": status.get("model"), "method": status.get("method"), "created": created,
            "step": status.get("step"), "total_steps": status.get("total_steps"),
            "duration_s": worked if worked is not None else (end - started) if isinstance(started, (int, float))
            and isinstance(end, (int, float)) else None, "loss": last, "best": scan.best if scan is not None else None,
            "error": (status.get("error") or {}).get("message")}


def _cell(value: Any, limit: int) -> str:
    text = str(value) if value not in (None, "") else "-"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def row_cells(row: dict[str, Any]) -> list[Text]:
    loss = row.get("loss")
    best = row.get("best")
    step = f"{row.get('step') or 0}/{row.get('total_steps') or '?'}" if row.get("total_steps") else "-"
    created = time.strftime("%m-%d\n%H:%M", time.localtime(row["created"])) if row.get("created") else "-"
    state = row["state"]
    method = method_name(row["method"]) if row.get("method") else "?"
    name = Text.assemble((_cell(row.get("name"), 26), "bold"), "\n",
                         (_cell(f"{row.get('model') or '?'} · {method}", 26), "dim"))
    return [name, Text(f"{STATE_MARKS.get(state, '?')} {state}", style=STATE_STYLES.get(state, "")),
            Text(step, justify="right"), Text(duration(row.get("duration_s")), justify="right"),
            Text(_loss(loss), justify="right"), Text(_loss(best), justify="right"), Text(created)]


def _loss(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.1e}".replace("e-0", "e-")


def detail_text(row: dict[str, Any] | None) -> Text:
    if row is None:
        return Text("")
    state = row["state"]
    keys = ["enter open"]
    if state in LIVE_STATES:
        keys.append("a attach")
    if state in ("cancelled", "failed", "dead"):
        keys.append("r resume")
    keys.append("l relaunch (edit first)")
    if state in ("completed", "cancelled"):
        keys.append("c chat")
    if state not in LIVE_STATES:
        keys.append("x delete")
    text = Text.assemble((row["run_id"], "bold"), (f"  {row['path']}", "dim"), "\n", (" · ".join(keys), "dim"))
    if row.get("error") and state == "failed":
        text.append("\n")
        text.append(_cell(row["error"], 200), style="red")
    return text


class RunsScreen(WizardScreen):
    STEP = "Past runs"
    EXPLANATION = "Your runs, newest first. Runs keep going whether or not you watch them."
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("enter", "open", "Open", show=False),
        Binding("ctrl+n", "open", "Open", show=False, priority=True),
        Binding("a", "attach", "Attach"),
        Binding("l", "relaunch", "Relaunch"),
        Binding("r", "resume", "Resume"),
        Binding("c", "chat", "Chat"),
        Binding("x,delete", "delete", "Delete"),
        Binding("space", "mark", "Mark to compare", show=False),
        Binding("m", "compare", "Compare marked", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self._scans: dict[Path, LossScan] = {}
        """Per run, its losses and working time, read incrementally; only listing workers touch it."""
        self._scan_lock = threading.Lock()
        """Workers are exclusive, but a thread worker that was replaced runs on to its end: one at a time here."""
        self.marked: list[Path] = []
        """Runs marked (space) for the compare screen (m), in the order they were marked."""

    def compose_body(self) -> ComposeResult:
        table: DataTable[Text] = DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Static("", id="run-detail")
        yield Static("", id="runs-empty", classes="note")

    DEFAULT_CSS = """
    RunsScreen #runs { height: 1fr; }
    RunsScreen #run-detail { height: auto; max-height: 4; }
    RunsScreen #runs-empty { height: auto; }
    """

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#runs", DataTable).focus()
        self.action_reload()
        self.set_interval(REFRESH_S, self.action_reload)

    def on_screen_resume(self) -> None:
        self.action_reload()

    def action_reload(self) -> None:
        self.list_runs()

    @work(thread=True, exclusive=True, group="runs", exit_on_error=False)
    def list_runs(self) -> None:
        root = self.tw.services.runs_dir()
        now = self.tw.services.clock()
        rows = []
        with self._scan_lock:
            for run in rundir.list_runs(root) if root.exists() else []:
                scan = self._scans.setdefault(run.path, LossScan(run.events_path))
                rows.append(run_row(run, now, scan))
            listed = {row["path"] for row in rows}
            for path in [path for path in self._scans if path not in listed]:  # deleted runs
                del self._scans[path]
        self.post_message(RunsListed(rows))

    @on(RunsListed)
    def _listed(self, message: RunsListed) -> None:
        table = self.query_one("#runs", DataTable)
        new_cells = [(str(row["path"]), [c.plain for c in row_cells(row)]) for row in message.rows]
        old_cells = [(str(row["path"]), [c.plain for c in row_cells(row)]) for row in self.rows]
        if new_cells != old_cells or table.row_count != len(message.rows):
            selected = self.selected_row()
            self.rows = message.rows
            table.clear()
            for row in message.rows:
                table.add_row(*self._cells(row), key=str(row["path"]), height=2)
            if selected is not None:
                for index, row in enumerate(message.rows):
                    if row["path"] == selected["path"]:
                        table.move_cursor(row=index)
                        break
        self.rows = message.rows
        self.query_one("#runs-empty", Static).update(
            "" if message.rows else "No runs yet. Go back (esc) and start a new fine-tune.")
        self._show_detail()

    @on(DataTable.RowHighlighted, "#runs")
    def _highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    @on(DataTable.RowSelected, "#runs")
    def _selected(self, _event: DataTable.RowSelected) -> None:
        self.action_open()

    def _show_detail(self) -> None:
        text = detail_text(self.selected_row())
        if self.marked:
            text.append(f"\n{len(self.marked)} marked to compare: ", style="bold")
            text.append("m compares them · space marks or unmarks another")
        self.query_one("#run-detail", Static).update(text)

    def _cells(self, row: dict[str, Any]) -> list[Text]:
        """row_cells, with a mark on the runs marked to compare."""
        cells = row_cells(row)
        if row["path"] in self.marked:
            cells[0] = Text.assemble(("● ", "bold magenta"), cells[0])
        return cells

    def selected_row(self) -> dict[str, Any] | None:
        table = self.query_one("#runs", DataTable)
        if not self.rows or table.row_count == 0:
            return None
        index = table.cursor_row
        return self.rows[index] if 0 <= index < len(self.rows) else None

    def _run(self, row: dict[str, Any]) -> rundir.RunDir:
        return rundir.RunDir(Path(row["path"]))

    # ------------------------------------------------------------------ actions

    def action_open(self) -> None:
        row = self.selected_row()
        if row is not None:
            self.tw.go(Place.DASHBOARD, self._run(row))

    def action_next(self) -> None:
        self.action_open()

    def action_attach(self) -> None:
        row = self.selected_row()
        if row is None:
            return
        if row["state"] not in LIVE_STATES:
            self.notify(f"That run is {row['state']}, not running: Enter shows its history.")
            return
        self.action_open()

    def action_relaunch(self) -> None:
        row = self.selected_row()
        if row is None:
            return
        try:
            spec = self._run(row).load_spec()
        except (SpecError, OSError) as exc:
            self.tw.show_error("That run's spec cannot be read", exc)
            return
        self.tw.reset_wizard()
        self.state.spec = spec
        self.state.relaunch_of = row["run_id"]
        self.tw.state_signal.publish(None)
        self.tw.go(Place.SETTINGS)
        self.notify("The run's settings, ready to edit: ctrl+n goes on to the review and launch.")

    def action_resume(self) -> None:
        row = self.selected_row()
        if row is None:
            return
        state = row["state"]
        if state == "completed":
            self.notify("That run completed; press l to relaunch it (a new run with the same settings).")
            return
        if state in LIVE_STATES:
            self.notify(f"That run is {state}; there is nothing to resume. Enter follows it.")
            return
        self.resume_run(self._run(row))

    @work(thread=True, exclusive=True, group="resume", exit_on_error=False)
    def resume_run(self, run: rundir.RunDir) -> None:
        try:
            pid = self.tw.services.resume(run)
        except BlockingIOError:
            self.post_message(RunActionDone("resume", run.run_id, error="another engine is already running on it"))
            return
        self.post_message(RunActionDone("resume", run.run_id, f"engine pid {pid}"))

    def action_chat(self) -> None:
        from tunewiz.engine.errors import TunewizError
        from tunewiz.engine.use.inference import adapter_path
        row = self.selected_row()
        if row is None:
            return
        run = self._run(row)
        try:
            adapter_path(run)
        except TunewizError as exc:
            self.notify(f"{exc}: nothing to chat with yet.", severity="warning")
            return
        self.tw.go(Place.CHAT, run)

    def action_mark(self) -> None:
        row = self.selected_row()
        if row is None:
            return
        path = row["path"]
        if path in self.marked:
            self.marked.remove(path)
        else:
            self.marked.append(path)
        self.query_one("#runs", DataTable).update_cell(str(path), "name", self._cells(row)[0])
        self._show_detail()

    def action_compare(self) -> None:
        live = {row["path"] for row in self.rows}
        self.marked = [path for path in self.marked if path in live]  # deleted meanwhile
        if len(self.marked) < 2:
            self.notify("Mark two or more runs with space first, then m compares them.", severity="warning")
            return
        self.tw.go(Place.COMPARE, [rundir.RunDir(Path(path)) for path in self.marked])

    def action_delete(self) -> None:
        from tunewiz.tui.dialogs import ConfirmDialog

        row = self.selected_row()
        if row is None:
            return
        if row["state"] in LIVE_STATES:
            self.notify("That run is still going: stop it first (open it, then s).", severity="warning")
            return
        run = self._run(row)
        size = _folder_size(run.path)

        def answered(yes: bool | None) -> None:
            if yes:
                self.delete_run(run)

        self.app.push_screen(ConfirmDialog(
            "Delete this run?", f"{row['run_id']} ({row['state']}): its folder {run.path} with its events, "
            f"checkpoints and adapter ({size / 1e6:,.0f} MB) is removed. This cannot be undone.",
            yes="Delete", no="Keep it"), answered)

    @work(thread=True, exclusive=True, group="delete", exit_on_error=False)
    def delete_run(self, run: rundir.RunDir) -> None:
        if run.engine_alive():
            self.post_message(RunActionDone("delete", run.run_id, error="an engine started on it meanwhile"))
            return
        shutil.rmtree(run.path)
        self.post_message(RunActionDone("delete", run.run_id, "deleted"))

    @on(RunActionDone)
    def _action_done(self, message: RunActionDone) -> None:
        if message.error:
            self.tw.show_error(f"Could not {message.action} {message.run_id}", message.error, message.hint)
            return
        self.notify(f"{message.run_id}: {message.result}")
        self.action_reload()
        if message.action == "resume":
            row = next((r for r in self.rows if r["run_id"] == message.run_id), None)
            if row is not None:
                self.tw.go(Place.DASHBOARD, self._run(row))


def _folder_size(path: Path) -> int:
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file():
                total += item.stat().st_size
        except OSError:
            pass
    return total
