"""The run dashboard: one run, live or finished, fed only by its run directory.

A thread worker follows `events.jsonl` by byte offset (tunewiz.engine.run.events.EventReader), folds every batch into a
`RunModel` it owns, and posts an immutable `RunView` at most twice a second; `@on(RunSnapshot)` redraws.
Charts redraw only when their data changed; the header ticks once a second for elapsed time and ETA.
Stop, resume and export run in workers through the app's services. Leaving the screen, detaching or
quitting never stops the run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, RichLog, Static, TabbedContent, TabPane
from textual.worker import Worker, get_current_worker

from tunewiz.engine import hints
from tunewiz.engine.run.events import EventReader
from tunewiz.engine.run.rundir import LIVE_STATES
from tunewiz.tui.messages import RunActionDone, RunSnapshot
from tunewiz.tui.navigation import Place
from tunewiz.tui.panels import (
    CHARTS,
    HELP,
    accuracy_series,
    alert_text,
    chart_series,
    clock_text,
    evaluation_text,
    log_line,
    loss_series,
    percent,
    progress_text,
    resources_text,
    reward_series,
    reward_subtitle,
    samples_renderable,
    title_text,
)
from tunewiz.tui.runmodel import RunModel, RunView
from tunewiz.tui.screens.base import TunewizScreen
from tunewiz.tui.widgets.alerts import coach_text
from tunewiz.tui.widgets.chart import LineChart

POLL_S = 1.0
"""How often a live run's files are looked at, and so at most one redraw a second."""
CHART_S = 2.0
"""Charts redraw at most this often: they are most of the cost of a redraw, and a second more is not missed."""
ENDED_POLL_S = 1.0
"""How often an ended run is looked at (it may be resumed from elsewhere)."""
READ_CHUNK = 8 << 20
ENGINE_LOG_TAIL = 4096
TALL = 32
"""Rows from which a failure shows its traceback tail and the small charts stay beside a long alert."""

STOP_OUTCOMES = {
    "graceful": "The run stopped after its step and saved a checkpoint.",
    "terminated": "The engine did not stop in time and was sent SIGTERM; it saved a checkpoint.",
    "killed": "The engine had to be killed: it resumes from its last periodic checkpoint.",
    "not running": "The run had already ended.",
}
EXPORT_KINDS = {"adapter": "the adapter", "merged": "a merged model", "gguf-q8_0": "GGUF q8_0 + Modelfile",
                "gguf-q4_k_m": "GGUF q4_k_m + Modelfile", "gguf-f16": "GGUF f16 + Modelfile"}
REWARD_SERIES = (("chosen_reward", "chosen", "green"), ("rejected_reward", "rejected", "red"),
                 ("margin", "margin", "bold yellow"))
TABS = {"training": "tab-training", "resources": "tab-resources", "samples": "tab-samples", "log": "tab-log"}

class DashboardScreen(TunewizScreen):
    """Watch one run: header, charts, resources, samples and log; stop, resume, export, detach."""

    DEFAULT_CSS = """
    DashboardScreen { layout: vertical; }
    DashboardScreen #run-title { height: 1; padding: 0 1; }
    DashboardScreen #run-progress { height: 2; padding: 0 1; }
    DashboardScreen #run-title, DashboardScreen #run-progress { text-wrap: nowrap; text-overflow: ellipsis; }
    DashboardScreen #run-alert { height: auto; max-height: 12; padding: 0 1; display: none; }
    DashboardScreen.short.alerting #charts-small, DashboardScreen.short.alerting #charts-pref { display: none; }
    DashboardScreen #run-alert.shown { display: block; }
    DashboardScreen #dash-tabs { height: 1fr; }
    DashboardScreen #dash-tabs > ContentSwitcher { height: 1fr; }
    DashboardScreen TabPane { padding: 0; height: 1fr; }
    DashboardScreen #charts { height: 1fr; }
    DashboardScreen #chart-loss { height: 3fr; }
    DashboardScreen #charts-small { height: 2fr; }
    DashboardScreen #charts-pref { height: 2fr; display: none; }
    DashboardScreen #charts-pref.shown { display: block; }
    DashboardScreen #resources, DashboardScreen #samples { padding: 0 1; }
    DashboardScreen #run-log { height: 1fr; padding: 0 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "leave", "Back"),
        # tooltips: what Help adds to each key; short enough for one line of the dialog at 60 columns
        Binding("s", "stop", "Stop", tooltip="checkpoint, then end (asks first)"),
        Binding("r", "resume", "Resume", tooltip="go on from the newest checkpoint"),
        Binding("c", "chat", "Chat", tooltip="talk to the tuned model"),
        Binding("b", "compare", "Compare", tooltip="base and tuned answers side by side"),
        Binding("v", "evaluate", "Evaluate", tooltip="before/after on held-out examples"),
        Binding("e", "export", "Export", tooltip="adapter, merged model or GGUF"),
        Binding("d", "detach", "Detach", tooltip="leave it training"),
        Binding("question_mark", "help", "Help"),
        Binding("g", "log_scale", "Log scale", show=False),
        Binding("1", "tab('training')", "Training", show=False),
        Binding("2", "tab('resources')", "Resources", show=False),
        Binding("3", "tab('samples')", "Samples", show=False),
        Binding("4", "tab('log')", "Log", show=False),
    ]

    def __init__(self, run: Any, prefetch: Any = None) -> None:
        super().__init__()
        self.run = run
        self._prefetch = prefetch
        """A tunewiz.tui.runreader.Prefetch already reading this run's history (from `tunewiz attach`)."""
        self.view: RunView | None = None
        self.engine_log: str | None = None
        self._log_shown = 0
        self._error_logged: str | None = None
        self._resuming = False
        self._following = True
        self._charts_drawn = 0.0
        self._charts_timer: Any = None
        self._header_drawn = 0.0
        self._resources_drawn: object = None
        self._ended_stamp: object = None
        self._reader: EventReader | None = None
        self._model: RunModel | None = None
        self._evaluating = False
        self._exporting = False
        self._task_progress: str | None = None
        """What a running evaluation or export says it is doing."""
        self.eval_summary: dict[str, Any] | None = None
        """The stored before/after evaluation (read once the run has ended)."""
        self.snapshots = 0
        """Snapshots handled (the bench counts redraws with it)."""

    @property
    def run_state(self) -> str:
        return self.view.state if self.view is not None else "starting"

    def _now(self) -> float:
        services = getattr(self.app, "services", None)
        return services.clock() if services is not None and hasattr(services, "clock") else time.time()

    def compose(self) -> ComposeResult:
        yield Static(title_text(None, self.run.run_id), id="run-title")
        yield Static(progress_text(None, 0, 80), id="run-progress")
        yield Static("", id="run-alert")
        with TabbedContent(id="dash-tabs", initial="tab-training"):
            with TabPane("1 Training", id="tab-training"):
                with Vertical(id="charts"):
                    yield LineChart("Loss", id="chart-loss", empty="no training steps yet")
                    with Horizontal(id="charts-pref"):  # shown once a preference run reports its rewards
                        yield LineChart("Rewards", id="chart-rewards", empty="-")
                        yield LineChart("Preference accuracy", percent, id="chart-accuracy", empty="-")
                    with Horizontal(id="charts-small"):
                        for chart in CHARTS:
                            yield LineChart(chart.title, id=chart.id, empty="-")
            with TabPane("2 Resources", id="tab-resources"):
                with VerticalScroll():
                    yield Static(resources_text(None, 80), id="resources")
            with TabPane("3 Samples", id="tab-samples"):
                with VerticalScroll():
                    yield Static(samples_renderable(None), id="samples")
            with TabPane("4 Log", id="tab-log"):
                yield RichLog(id="run-log", wrap=True, markup=False, highlight=False, min_width=20, max_lines=2000)
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        watched = getattr(self.app, "watched", None)
        if isinstance(watched, list) and self.run not in watched:
            watched.append(self.run)
        self.follow()
        self.set_interval(1.0, self._tick)
        self.set_interval(ENDED_POLL_S, self._watch_ended)

    def _watch_ended(self) -> None:
        """While no worker follows (the run had ended), notice a resume started elsewhere: the files change."""
        if self._following:
            return
        stamp = _stamp(self.run)
        if stamp != self._ended_stamp:
            self._following = True
            self.follow()

    # ------------------------------------------------------------------ following the run directory

    @work(thread=True, exclusive=True, group="tail", exit_on_error=False)
    def follow(self) -> None:
        """Read new events, fold them into the model, post one view per tick (never touches widgets)."""
        worker = get_current_worker()
        run = self.run
        # Kept on the screen between workers (one at a time), so a restarted worker goes on from its offset.
        if self._reader is None and self._prefetch is not None:
            self._reader, self._model = self._prefetch.take()
            self._prefetch = None
        if self._reader is None:
            self._reader, self._model = EventReader(run.events_path), RunModel(run.run_id, run.status())
        reader, model = self._reader, self._model
        assert reader is not None and model is not None  # set just above
        last_state: str | None = None
        last_version = -1
        while not worker.is_cancelled:
            stamp = _stamp(run)
            state = run.state()  # before reading: once it says "ended", this read gets every last event
            while not worker.is_cancelled:
                body, reset = reader.poll_bytes(READ_CHUNK)
                if reset:
                    model.reset()
                    model.version += 1
                if not body:
                    break
                model.apply_bytes(body)
            engine_log = _tail(run.log_path, ENGINE_LOG_TAIL) if state in ("failed", "dead") else None
            if model.version != last_version or state != last_state:
                if model.name is None:
                    model.name, model.model, model.method = _names(run)
                self.post_message(RunSnapshot(model.view(state), engine_log))
                last_version, last_state = model.version, state
            if state not in LIVE_STATES:
                # The engine is gone and this read got its last events; a timer watches for a resume.
                self._ended_stamp = stamp  # read by the UI thread only after the message below
                self.eval_summary = _evaluation(run)
                self.post_message(RunActionDone("ended", run.run_id))
                return
            deadline = time.monotonic() + POLL_S
            while time.monotonic() < deadline and not worker.is_cancelled:
                time.sleep(0.05)

    @on(RunSnapshot)
    def _snapshot(self, message: RunSnapshot) -> None:
        view = message.view
        previous = self.view
        self.view = view
        self.engine_log = message.engine_log
        self.snapshots += 1
        if previous is None or previous.state != view.state:
            self.refresh_bindings()
            self._resuming = False
        self._draw_header()
        if previous is None or previous.version != view.version or previous.state != view.state:
            self._draw_alert()
            self._charts_later(view, first=previous is None or previous.state != view.state)
            self._draw_log(view, reset=previous is not None and view.log_total < previous.log_total)
            self.query_one("#samples", Static).update(samples_renderable(view))
        resources = (view.gpus, view.process, view.process_history, self.size.width)
        if resources != self._resources_drawn:
            self._resources_drawn = resources
            self.query_one("#resources", Static).update(resources_text(view, self.size.width))

    def _charts_later(self, view: RunView, first: bool) -> None:
        """Draw the charts now if they were not drawn in the last CHART_S seconds, else once that is over."""
        now = time.monotonic()
        wait = self._charts_drawn + CHART_S - now
        if first or wait <= 0:
            self._draw_charts(view)
        elif self._charts_timer is None:
            self._charts_timer = self.set_timer(wait, self._draw_pending_charts)

    def _draw_pending_charts(self) -> None:
        self._charts_timer = None
        if self.view is not None:
            self._draw_charts(self.view)

    def _tick(self) -> None:
        if self.view is not None and self.view.live and time.monotonic() - self._header_drawn > 0.9:
            self._draw_header()

    def _draw_header(self) -> None:
        self._header_drawn = time.monotonic()
        # Fixed heights: no layout pass is needed for a new header.
        self.query_one("#run-title", Static).update(title_text(self.view, self.run.run_id), layout=False)
        width = max(20, self.size.width - 2)
        self.query_one("#run-progress", Static).update(progress_text(self.view, self._now(), width), layout=False)

    def _draw_alert(self) -> None:
        alert = self.query_one("#run-alert", Static)
        text = alert_text(self.view, tall=self.size.height >= TALL)
        coach = coach_text(self.view, tall=self.size.height >= TALL)
        if coach is not None:
            text = coach if text is None else Text("\n").join([text, coach])
        if text is not None and self.run_state == "completed":
            extra = (Text(self._task_progress, style="yellow") if self._task_progress
                     else evaluation_text(self.eval_summary))
            if extra is not None:
                text.append("\n")
                text.append_text(extra)
        alert.set_class(text is not None, "shown")
        self.set_class(text is not None and len(text.plain) > 100, "alerting")
        alert.update(text or "")

    def on_resize(self) -> None:
        self.set_class(self.size.height < TALL, "short")
        if self.view is not None:
            self._draw_alert()
            self._draw_header()

    def _draw_charts(self, view: RunView) -> None:
        self._charts_drawn = time.monotonic()
        self.query_one("#chart-loss", LineChart).update_series(loss_series(view), view.version)
        for chart in CHARTS:
            self.query_one(f"#{chart.id}", LineChart).update_series(
                chart_series(chart, view), view.version, subtitle=chart.subtitle(view) if chart.subtitle else "")
        self._draw_preference(view)

    def _draw_preference(self, view: RunView) -> None:
        """The rewards and their margin, and the implicit-reward accuracy, of a preference run."""
        self.query_one("#charts-pref").set_class(bool(view.preference), "shown")
        if view.preference:
            self.query_one("#chart-rewards", LineChart).update_series(reward_series(view), view.version,
                                                                      subtitle=reward_subtitle(view))
            self.query_one("#chart-accuracy", LineChart).update_series(accuracy_series(view), view.version)

    def _draw_log(self, view: RunView, reset: bool) -> None:
        log = self.query_one("#run-log", RichLog)
        if reset:
            log.clear()
            self._log_shown = 0
            self._error_logged = None
        new = min(len(view.logs), view.log_total - self._log_shown)
        for line in view.logs[len(view.logs) - new:] if new > 0 else ():
            log.write(log_line(line))
        self._log_shown = view.log_total
        error = view.error
        if error and error.get("traceback") and self._error_logged != error.get("traceback"):
            self._error_logged = error["traceback"]
            log.write(Text("traceback (last lines; the whole one is in engine.log):", style="bold red"))
            log.write(Text(str(error["traceback"]), style="dim"))
        if view.state in ("failed", "dead") and self.engine_log and self._error_logged != f"log:{view.state}":
            if not error or view.state == "dead":
                self._error_logged = f"log:{view.state}"
                log.write(Text(f"last lines of {self.run.log_path}:", style="bold"))
                log.write(Text(self.engine_log.rstrip(), style="dim"))

    # ------------------------------------------------------------------ keys

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        state = self.run_state
        if action == "stop":
            return state in ("starting", "running")
        if action == "resume":
            return state in ("cancelled", "failed", "dead") and not self._resuming
        if action == "export":
            return state == "completed" and not self._exporting
        if action in ("chat", "compare"):
            return state in ("completed", "cancelled", "failed", "dead") and self._has_adapter()
        if action == "evaluate":
            return state == "completed" and not self._evaluating
        return True

    def _has_adapter(self) -> bool:
        from tunewiz.engine.errors import TunewizError
        from tunewiz.engine.use.inference import adapter_path

        try:
            adapter_path(self.run)
        except (TunewizError, OSError, ValueError):
            return False
        return True

    def action_chat(self, compare: bool = False) -> None:
        self.tw.go(Place.CHAT, self.run, compare=compare)

    def action_compare(self) -> None:
        self.action_chat(compare=True)

    def action_evaluate(self) -> None:
        self._evaluating = True
        self.refresh_bindings()
        self.notify("Evaluating: the base model and the tuned one answer the held-out examples…", timeout=8)
        self.evaluate_run()

    @work(thread=True, exclusive=True, group="evaluate", exit_on_error=False)
    def evaluate_run(self) -> None:
        from tunewiz.tui.services import ServiceError

        def progress(message: str) -> None:
            self.post_message(RunActionDone("progress-eval", self.run.run_id, message))

        try:
            summary = self.tw.services.evaluate(self.run, progress)
        except ServiceError as exc:
            self.post_message(RunActionDone("evaluate", self.run.run_id, error=str(exc), hint=exc.hint))
            return
        self.eval_summary = summary
        self.post_message(RunActionDone("evaluate", self.run.run_id, "\n".join(summary.get("summary", []))))

    def action_log_scale(self) -> None:
        self.query_one("#chart-loss", LineChart).toggle_log()

    def action_tab(self, name: str) -> None:
        self.query_one("#dash-tabs", TabbedContent).active = TABS[name]

    def action_leave(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
        else:  # attached directly (`tunewiz attach`): nothing behind, so the welcome screen takes our place
            self.tw.go_instead(Place.WELCOME)

    def action_detach(self) -> None:
        """Leave the run to train on: back to Past runs when opened from there, else out of the app."""
        if self.tw.place_behind() == Place.RUNS:
            self.app.pop_screen()
            self.notify(f"Detached: {self.run.run_id} goes on training.")
        else:
            self.app.exit(0)

    def action_help(self) -> None:
        from tunewiz.tui.dialogs import MessageDialog
        from tunewiz.tui.keys import keys_help

        back = f"Come back to this run after detaching: {hints.command(f'attach {self.run.run_id}')}"
        self.app.push_screen(MessageDialog("Keys and charts", f"{keys_help(self)}\n\n{back}\n\n{HELP}"))

    def action_stop(self) -> None:
        from tunewiz.tui.dialogs import ConfirmDialog

        def answered(yes: bool | None) -> None:
            if yes:
                self.notify("Stop requested: the run finishes its step, saves a checkpoint and ends.")
                self.stop_run()

        self.app.push_screen(ConfirmDialog(
            "Stop the run?", "It finishes the current step, saves a checkpoint and ends as cancelled. You can "
            f"resume it later (r here, or {hints.command(f'resume {self.run.run_id}')}).", yes="Stop it",
            no="Keep training"),
            answered)

    @work(thread=True, exclusive=True, group="stop", exit_on_error=False)
    def stop_run(self) -> None:
        def progress(message: str) -> None:
            self.post_message(RunActionDone("progress", self.run.run_id, message))

        outcome = self.tw.services.stop(self.run, progress)
        self.post_message(RunActionDone("stop", self.run.run_id, outcome))

    def action_resume(self) -> None:
        self._resuming = True
        self.refresh_bindings()
        self.notify("Resuming: a new engine starts from the newest checkpoint.")
        self.resume_run()

    @work(thread=True, exclusive=True, group="resume", exit_on_error=False)
    def resume_run(self) -> None:
        try:
            pid = self.tw.services.resume(self.run)
        except BlockingIOError:
            self.post_message(RunActionDone("resume", self.run.run_id, error="another engine is already running "
                                            "on this run"))
            return
        self.post_message(RunActionDone("resume", self.run.run_id, f"engine pid {pid}"))
        self.app.call_from_thread(self._follow_again)

    def _follow_again(self) -> None:
        if not self._following:
            self._following = True
            self.follow()

    def action_export(self) -> None:
        from tunewiz.tui.dialogs import ExportDialog

        def chosen(kind: str | None) -> None:
            if kind:
                self._exporting = True
                self.refresh_bindings()
                self.notify(f"Exporting ({EXPORT_KINDS[kind]})…", timeout=8)
                self.export_run(kind)

        self.app.push_screen(ExportDialog(self.run.path / "exports"), chosen)

    @work(thread=True, exclusive=True, group="export", exit_on_error=False)
    def export_run(self, kind: str) -> None:
        from tunewiz.tui.services import ServiceError

        def progress(message: str) -> None:
            self.post_message(RunActionDone("progress-export", self.run.run_id, message))

        try:
            result = self.tw.services.export(self.run, kind, progress)
        except ServiceError as exc:
            self.post_message(RunActionDone("export", self.run.run_id, error=str(exc), hint=exc.hint))
            return
        self.post_message(RunActionDone("export", self.run.run_id, result))

    @on(RunActionDone)
    def _action_done(self, message: RunActionDone) -> None:
        log = self.query_one("#run-log", RichLog)
        if message.action == "ended":
            self._following = False
            self.refresh_bindings()  # an adapter or checkpoint may have appeared
            self._draw_alert()
            return
        if message.action == "progress":
            self.notify(str(message.result))
            return
        if message.action in ("progress-eval", "progress-export"):
            self._task_progress = ("Evaluating: " if message.action == "progress-eval" else "Exporting: ") + str(
                message.result)
            self._draw_alert()
            return
        if message.action in ("evaluate", "export"):
            self._evaluating = self._evaluating and message.action != "evaluate"
            self._exporting = self._exporting and message.action != "export"
            self._task_progress = None
            self.refresh_bindings()
            self._draw_alert()
        if message.error:
            show_error = self.tw.show_error
            show_error(f"Could not {message.action} the run", message.error, message.hint)
            if message.action == "resume":
                self._resuming = False
                self.refresh_bindings()
            return
        if message.action in ("evaluate", "export"):
            from tunewiz.tui.dialogs import MessageDialog

            if message.action == "evaluate":
                self.app.push_screen(MessageDialog("Before and after", str(message.result),
                                                   f"every answer is in {self.run.path / 'eval' / 'report.md'}"))
            else:
                self.app.push_screen(MessageDialog("Exported", str(message.result)))
            log.write(Text.assemble((clock_text(self._now()) + " ", "dim"), (f"{message.action}: done", "bold")))
            return
        texts = {"stop": STOP_OUTCOMES.get(str(message.result), f"stop: {message.result}"),
                 "resume": f"resumed ({message.result})", "export": f"export: {message.result}"}
        text = texts.get(message.action, str(message.result))
        log.write(Text.assemble((clock_text(self._now()) + " ", "dim"), (text, "bold")))
        self.notify(text, timeout=8)

    @on(Worker.StateChanged)
    def _worker_changed(self, event: Worker.StateChanged) -> None:
        self.tw.report_worker_error(event)


def _evaluation(run: Any) -> dict[str, Any] | None:
    from tunewiz.engine.use.evaluate import latest_summary

    try:
        return latest_summary(run)
    except OSError:
        return None


def _names(run: Any) -> tuple[str | None, str | None, str | None]:
    """The run's name, model and method: from status.json, else from spec.toml."""
    status = run.status()
    if status.get("name"):
        return status.get("name"), status.get("model"), status.get("method")
    try:
        spec = run.load_spec()
    except Exception:  # noqa: BLE001 - a title is not worth failing for
        return None, None, None
    return spec.name, spec.model.name, spec.method


def _stamp(run: Any) -> tuple[float, int, float]:
    """What changes when an engine starts again: the status file and the events file."""
    stamps: list[float] = []
    for path in (run.status_path, run.events_path):
        try:
            stat = path.stat()
            stamps += [stat.st_mtime_ns, stat.st_size]
        except OSError:
            stamps += [0, 0]
    return tuple(stamps)  # type: ignore[return-value]


def _tail(path: Path, size: int) -> str | None:
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            end = handle.tell()
            handle.seek(max(0, end - size))
            data = handle.read()
    except OSError:
        return None
    text = data.decode("utf-8", errors="replace")
    if end > size:
        text = text.partition("\n")[2]
    return text
