"""Past runs, newest first; Enter follows one."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from engine import rundir
from tui.messages import RunsListed
from tui.screens.base import WizardScreen
from tui.screens.run_view import STATE_STYLES


def run_prompt(row: dict[str, Any]) -> Text:
    step = f"step {row.get('step') or 0}/{row.get('total_steps') or '?'}"
    loss = row.get("loss")
    loss_text = f"  loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
    return Text.assemble((row["run_id"], "bold"), "  ", (row["state"], STATE_STYLES.get(row["state"], "")), "\n   ",
                         (f"{row.get('model') or '?'} ({row.get('method') or '?'})  {step}{loss_text}", "dim"))


class RunsScreen(WizardScreen):
    STEP = "Past runs"
    EXPLANATION = "Your runs, newest first. Enter shows one; runs keep going whether or not you watch them."
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("ctrl+n", "next", "Open", show=False, priority=True),
        Binding("r", "reload", "Reload"),
    ]

    def compose_body(self) -> ComposeResult:
        yield OptionList(id="runs")
        yield Static("", id="runs-empty", classes="note")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#runs", OptionList).focus()
        self.action_reload()

    def action_reload(self) -> None:
        self.list_runs()

    @work(thread=True, exclusive=True, group="runs", exit_on_error=False)
    def list_runs(self) -> None:
        root = self.tw.services.runs_dir()
        rows = []
        for run in rundir.list_runs(root) if root.exists() else []:
            status = run.status()
            rows.append({"run_id": run.run_id, "state": run.state(), "model": status.get("model"),
                         "method": status.get("method"), "step": status.get("step"),
                         "total_steps": status.get("total_steps"), "loss": status.get("loss"), "path": run.path})
        self.post_message(RunsListed(rows))

    @on(RunsListed)
    def _listed(self, message: RunsListed) -> None:
        options = self.query_one("#runs", OptionList)
        options.clear_options()
        options.add_options(Option(run_prompt(row), id=str(row["path"])) for row in message.rows)
        self.query_one("#runs-empty", Static).update(
            "" if message.rows else "No runs yet. Go back (esc) and start a new fine-tune.")
        if message.rows:
            options.highlighted = 0

    @on(OptionList.OptionSelected, "#runs")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        from pathlib import Path

        from tui.screens.run_view import RunViewScreen

        self.app.push_screen(RunViewScreen(rundir.RunDir(Path(str(event.option.id))), step="Run"))

    def action_next(self) -> None:
        self.query_one("#runs", OptionList).action_select()
