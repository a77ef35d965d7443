"""Runs side by side: loss and eval-loss curves overlaid (by step or by tokens seen), then throughput, peak
memory, alerts and the settings that differ, in the tables `tunewiz compare` prints (engine/cli/coach.py)."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.console import Group
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Static

from tunewiz.engine.cli.coach import MARKERS, runs_table, settings_table
from tunewiz.engine.run import curves as curves_mod
from tunewiz.engine.run import rundir
from tunewiz.engine.run.curves import RunCurves
from tunewiz.tui.widgets.chart import ChartSeries, LineChart

COLOURS = ("bright_blue", "bright_magenta", "green", "yellow", "cyan", "red", "white", "blue", "magenta")


class CompareScreen(Screen[None]):
    """Two or more runs, read once from their run directories (r reads them again)."""

    DEFAULT_CSS = """
    CompareScreen #compare-legend { height: auto; padding: 0 1; }
    CompareScreen #compare-charts { height: 1fr; min-height: 6; }
    CompareScreen #compare-tables { height: auto; max-height: 12; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("t", "align", "Step/tokens"),
        Binding("g", "log_scale", "Log scale"),
        Binding("r", "reload", "Reload"),
    ]

    def __init__(self, runs: list[rundir.RunDir]) -> None:
        super().__init__()
        self.runs = runs[:len(MARKERS)]
        self.curves: list[RunCurves] = []
        self.by = "step"

    def compose(self) -> ComposeResult:
        yield Static(Text("reading the runs…", style="dim"), id="compare-legend")
        with Horizontal(id="compare-charts"):
            yield LineChart("Loss", id="compare-loss", empty="no steps yet")
            yield LineChart("Eval loss", id="compare-eval", empty="no evaluations")
        yield Static("", id="compare-tables")
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, group="compare", exit_on_error=False)
    def load(self) -> None:
        loaded = [curves_mod.load(run) for run in self.runs]
        self.app.call_from_thread(self.show, loaded)

    def show(self, loaded: list[RunCurves]) -> None:
        self.curves = loaded
        legend = Text()
        for i, run in enumerate(loaded):
            if i:
                legend.append("\n")
            legend.append(f"━ {MARKERS[i]} ", style=f"bold {COLOURS[i]}")
            legend.append(run.run_id, style="bold")
            legend.append(f"  {run.state}", style="dim")
        self.query_one("#compare-legend", Static).update(legend)
        differ = curves_mod.differing_settings(loaded)
        self.query_one("#compare-tables", Static).update(Group(runs_table(loaded), settings_table(loaded, differ)))
        self.draw()

    def draw(self) -> None:
        version: Any = (self.by, tuple(id(c) for c in self.curves))
        loss = [ChartSeries(MARKERS[i], *run.series("loss", self.by), COLOURS[i]) for i, run in enumerate(self.curves)]
        evals = [ChartSeries(MARKERS[i], *run.eval_series(self.by), COLOURS[i], markers=True)
                 for i, run in enumerate(self.curves)]
        for chart_id, series in (("#compare-loss", loss), ("#compare-eval", evals)):
            chart = self.query_one(chart_id, LineChart)
            chart.x_label = "tokens" if self.by == "tokens" else "step"
            chart.update_series(series, version)

    def action_align(self) -> None:
        self.by = "tokens" if self.by == "step" else "step"
        self.draw()

    def action_log_scale(self) -> None:
        for chart in self.query(LineChart):
            chart.toggle_log()

    def action_reload(self) -> None:
        self.load()

    def action_back(self) -> None:
        self.app.pop_screen()
