"""The run dashboard: one run, live or finished, fed only by its run directory.

A thread worker follows `events.jsonl` by byte offset (engine.events.EventReader), folds every batch into a
`RunModel` it owns, and posts an immutable `RunView` at most twice a second; `@on(RunSnapshot)` redraws.
Charts redraw only when their data changed; the header ticks once a second for elapsed time and ETA.
Stop, resume and export run in workers through the app's services. Leaving the screen, detaching or
quitting never stops the run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, RichLog, Static, TabbedContent, TabPane
from textual.worker import Worker, get_current_worker

from engine import hints
from engine.render import GIB, duration, memory as gb
from tui.messages import RunActionDone, RunSnapshot
from tui.runmodel import ACTIVE_STATES, BulkEventReader, LogLine, RunModel, RunView
from tui.widgets.chart import ChartSeries, LineChart, gauge, sparkline

POLL_S = 1.0
"""How often a live run's files are looked at, and so at most one redraw a second."""
CHART_S = 2.0
"""Charts redraw at most this often: they are most of the cost of a redraw, and a second more is not missed."""
ENDED_POLL_S = 1.0
"""How often an ended run is looked at (it may be resumed from elsewhere)."""
READ_CHUNK = 8 << 20
ENGINE_LOG_TAIL = 4096
TRACEBACK_LINES_SHOWN = 4
TALL = 32
"""Rows from which a failure shows its traceback tail and the small charts stay beside a long alert."""

STATE_STYLES = {"running": "bold green", "starting": "bold yellow", "stopping": "bold yellow",
                "completed": "bold green", "failed": "bold red", "cancelled": "bold yellow", "dead": "bold red"}
STATE_MARKS = {"running": "●", "starting": "◌", "stopping": "◍", "completed": "✓", "failed": "✗", "cancelled": "■",
               "dead": "✗"}
LEVEL_STYLES = {"warning": "yellow", "error": "bold red", "phase": "cyan", "eval": "magenta", "checkpoint": "green",
                "finished": "bold", "sample": "", "info": ""}
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

HELP = """\
Reading the charts
- Loss: how wrong the model still is on the training examples; lower is better. "smoothed" is a moving
  average that is easier to read than the noisy per-step value.
- Eval: the loss on held-out examples the model never trains on. If it rises while the training loss
  keeps falling, the model is memorising its examples rather than learning: stop, or train less.
- Learning rate: the size of each update, as the schedule sets it (warm-up, then constant or decaying).
- Grad norm: how big each update wanted to be; sudden spikes often come before the loss jumps.
- Tokens/s: training speed. On a GPU, Resources shows memory, use, power and temperature.
- Rewards (preference runs, dpo/orpo): how much more the model now favours the chosen answers (green) and
  the rejected ones (red) than at the start; the margin between them should rise. Accuracy: the share of
  pairs where the chosen answer is favoured; it should approach 100%."""


def clock_text(when: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when)) if when else "--:--:--"


def _n(value: float | None, fmt: str, none: str = "-") -> str:
    return format(value, fmt) if value is not None else none


def title_text(view: RunView | None, run_id: str) -> Text:
    state = view.state if view else "starting"
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(f" {STATE_MARKS.get(state, '?')} {state.upper()} ", style=f"{STATE_STYLES.get(state, 'bold')} reverse")
    text.append("  ")
    if view is not None:
        text.append(view.name or "run", style="bold")
        method = {"lora": "LoRA", "qlora": "QLoRA"}.get(view.method or "", view.method or "?")
        text.append(f"  {view.model or '?'} · {method}")
    text.append(f"  {run_id}", style="dim")
    return text


def progress_text(view: RunView | None, now: float, width: int) -> Text:
    """Two lines: the progress bar with step/total and epoch; then time, loss and speed."""
    text = Text(no_wrap=True, overflow="ellipsis")
    if view is None:
        text.append("reading the run's events…", style="dim")
        return text
    if view.step is None:
        phase = view.phase_message or ("waiting for the engine to start" if view.live else "no events recorded")
        if not view.live:
            phase = f"no training step was recorded (last: {phase})"
        text.append(phase[: max(10, width)], style="dim")
        text.append("\n")
        text.append(f"elapsed {duration(view.elapsed(now))}", style="dim")
        return text
    step, total = view.step, view.total_steps or 0
    tail = f" step {step}/{total}"
    if total:
        tail += f" ({100 * step / total:.0f}%)"
    if view.epoch is not None:
        tail += f" · epoch {view.epoch:.2f}"
    bar_width = max(10, min(40, width - len(tail) - 2))
    fraction = step / total if total else 0.0
    filled = round(bar_width * min(1.0, fraction))
    style = STATE_STYLES.get(view.state, "bold").replace("bold ", "")
    text.append("█" * filled, style=style)
    text.append("░" * (bar_width - filled), style="dim")
    text.append(tail, style="bold")
    text.append("\n")
    # (priority, text): the lowest priorities go first when the line does not fit
    parts = [(0, f"elapsed {duration(view.elapsed(now))}")]
    eta = view.eta(now)
    if eta is not None:
        parts.append((0, f"ETA {duration(eta)}"))
    if view.loss is not None:
        parts.append((1, f"loss {view.loss:.4f}"))
        if view.best_loss is not None:
            parts.append((4, f"best loss {view.best_loss:.4f}"))
    if view.eval_loss is not None:
        parts.append((2, f"eval {view.eval_loss:.4f}"))
    if view.tokens_per_s is not None:
        parts.append((3, f"{view.tokens_per_s:,.0f} tok/s"))
    while len(parts) > 1 and len(" · ".join(p for _, p in parts)) > width:
        parts.remove(max(parts, key=lambda item: item[0]))
    text.append(" · ".join(p for _, p in parts))
    return text


def alert_text(view: RunView | None, tall: bool = True) -> Text | None:
    """What a beginner must know first when the run is not simply going: failed, dead, stopped, stopping.

    On a short terminal (`tall` false) the failure is told without the traceback, which the Log tab holds.
    """
    if view is None:
        return None
    state = view.state
    if state == "failed":
        error = view.error or {}
        message = str(error.get("message") or "no error was recorded (see 4 Log: engine.log)")
        if not tall and len(message) > 150:
            message = message[:149] + "…"
        text = Text.assemble(("The run failed: ", "bold red"),
                             (f"{error.get('error_type', 'error')}: {message}", "red"))
        if error.get("hint"):
            text.append("\nWhat to do: ", style="bold")
            text.append(str(error["hint"]))
        lines = [line for line in str(error.get("traceback") or "").splitlines() if line.strip()]
        if lines and tall:
            text.append("\n")
            text.append("\n".join(f"  {line}" for line in lines[-TRACEBACK_LINES_SHOWN:]), style="dim")
        text.append("\n")
        text.append("r", style="bold")
        text.append(f" {_resume_from(view)} · the traceback is in 4 Log and engine.log", style="dim")
        return text
    if state == "dead":
        return Text.assemble(("The engine is gone without finishing: ", "bold red"),
                             "killed (by you, the out-of-memory killer or a restart) or crashed. ", ("r", "bold"),
                             f" {_resume_from(view)}; 4 Log shows engine.log's last lines.")
    if state == "cancelled":
        where = f" at step {view.checkpoint_step}" if view.checkpoint_step is not None else ""
        text = Text.assemble(("Stopped on request", "bold yellow"), f"; a checkpoint was saved{where}. ",
                             ("r", "bold"), " resumes it.")
        if view.checkpoint_step is not None:
            text.append_text(Text.assemble(" ", ("c", "bold"), " chats with that checkpoint."))
        return text
    if state == "stopping":
        return Text("Stopping: the engine finishes its step and saves a checkpoint…", style="bold yellow")
    if state == "completed":
        return Text.assemble(("Training completed", "bold green"), ". Next: ", ("c", "bold"), " chat with your model · ",
                             ("b", "bold"), " compare it with the base model · ", ("v", "bold"),
                             " evaluate before/after · ", ("e", "bold"), " export (adapter, merged, GGUF for Ollama)")
    return None


def evaluation_text(summary: dict[str, Any] | None) -> Text | None:
    """One line on the stored before/after evaluation (engine/evaluate.py's results.json)."""
    if not summary or not isinstance(summary.get("base"), dict) or not isinstance(summary.get("tuned"), dict):
        return None
    key = summary.get("headline", "normalised")
    name = {"normalised": "match", "f1": "token F1", "exact": "exact match"}.get(key, key)
    try:
        before, after = float(summary["base"][key]), float(summary["tuned"][key])
    except (KeyError, TypeError, ValueError):
        return None
    return Text.assemble(("Evaluation: ", "bold"), f"{name} {before:.2f} → ", (f"{after:.2f}", "bold green"),
                         f" on {summary.get('examples', '?')} held-out examples (base → tuned; v again, "
                         f"report in eval/report.md)")


def _resume_from(view: RunView) -> str:
    if view.checkpoint_step:
        return f"resumes from the checkpoint at step {view.checkpoint_step}"
    return "starts it again (no checkpoint was saved)"


def resources_text(view: RunView | None, width: int) -> RenderableType:
    if view is None or (not view.gpus and not view.process):
        return Text("No resource readings yet: the engine writes one every 5 seconds while it trains.", style="dim")
    bar_w = max(10, min(30, (width - 40) // 2))
    spark_w = max(6, width - 2 - 9 - bar_w - 28)  # padding, label, bar, value column
    text = Text()
    for gpu in view.gpus:
        text.append(f"GPU {gpu.index}  {gpu.name}\n", style="bold")
        mem, total = gpu.latest.get("mem"), gpu.mem_total
        peak = gpu.peak_mem / total if total else None
        rows = [
            ("memory", gauge(mem / total if mem is not None and total else None, bar_w, peak),
             f"{_n(mem and mem / GIB, '.1f', '?')}/{_n(total and total / GIB, '.0f', '?')} GiB, peak "
             f"{gpu.peak_mem / GIB:.1f}", gpu.history.get("mem", ()), 0.0, total),
            ("use", gauge((gpu.latest.get("util") or 0) / 100 if gpu.latest.get("util") is not None else None, bar_w),
             f"{_n(gpu.latest.get('util'), '.0f', '?')} %", gpu.history.get("util", ()), 0.0, 100.0),
            ("power", Text(" " * bar_w), f"{_n(gpu.latest.get('power'), '.0f', '?')} W", gpu.history.get("power", ()),
             None, None),
            ("temp", Text(" " * bar_w), f"{_n(gpu.latest.get('temp'), '.0f', '?')} °C", gpu.history.get("temp", ()),
             None, None),
        ]
        for label, bar, value, history, lo, hi in rows:
            text.append(f"  {label:<7}")
            text.append_text(bar)
            text.append(f" {value:<27}"[:28])
            text.append(sparkline(history, spark_w, lo, hi), style="cyan")
            text.append("\n")
        if gpu.peak_torch:
            text.append(f"  torch reserved at its peak: {gb(gpu.peak_torch)}\n", style="dim")
    process = view.process
    if process:
        if not view.gpus:
            text.append("Training on the CPU: the engine process\n", style="bold")
        else:
            text.append("Engine process\n", style="bold")
        cores = int(process.get("cpu_count") or 1)
        cpu = process.get("cpu")
        text.append(f"  {'CPU':<7}")
        text.append_text(gauge(cpu / (100 * cores) if cpu is not None else None, bar_w))
        text.append(f" {_n(cpu, '.0f', '?')} % of {cores} core{'s' if cores > 1 else ''}"[:28].ljust(28))
        text.append(sparkline(view.process_history.get("cpu", ()), spark_w, 0.0, 100.0 * cores), style="cyan")
        text.append("\n")
        text.append(f"  {'RAM':<7}")
        rss = process.get("rss")
        text.append_text(gauge(rss / view.peak_rss if rss and view.peak_rss else None, bar_w))
        text.append(f" {gb(rss)} (peak {gb(view.peak_rss)})"[:28].ljust(28))
        text.append(sparkline(view.process_history.get("rss", ()), spark_w, 0.0, None), style="cyan")
        text.append("\n")
        if not view.gpus:
            text.append("  The RAM bar is against the run's own peak. History: the last 10 minutes.", style="dim")
    return text


def samples_renderable(view: RunView | None) -> RenderableType:
    if view is None or view.samples_first is None:
        return Text("No sample answers yet: the engine asks the model a few fixed questions from the eval data "
                    "before training and again as it learns.", style="dim")
    first_step, first = view.samples_first
    latest_step, latest = view.samples_latest or view.samples_first
    same = latest_step == first_step
    preference = bool(view.preference)  # the reference is the preferred answer, a style to move towards
    table = Table(expand=True, show_lines=True, pad_edge=False, header_style="bold")
    table.add_column("Prompt", ratio=3)
    if preference:
        table.add_column("Preferred", ratio=2)
    else:
        table.add_column("Expected", width=10)
    table.add_column(f"Before (step {first_step})" if first_step == 0 else f"Step {first_step}", ratio=2)
    if not same:
        table.add_column(f"Now (step {latest_step})", ratio=2)
    by_prompt = {str(s.get("prompt")): s for s in latest}
    for sample in first:
        prompt = str(sample.get("prompt", ""))
        now = by_prompt.get(prompt, {})
        head, _, rest = prompt.strip().partition("\n")
        cells: list[RenderableType] = [Text(head + (" …" if rest.strip() else "")), Text(str(sample.get("reference", "")), style="dim"),
                                       _answer(sample, not preference)]
        if not same:
            cells.append(_answer(now, not preference) if now else Text("-", style="dim"))
        table.add_row(*cells)
    if preference:
        summary = Text(f"Answers average {_mean_words(latest):.0f} words at step {latest_step}"
                       + ("" if same else f" ({_mean_words(first):.0f} before training)"), style="bold")
    else:
        matched = sum(bool(s.get("match")) for s in latest)
        summary = Text(f"{matched} of {len(latest)} answers match the expected one at step {latest_step}"
                       + ("" if same else f" (before training: {sum(bool(s.get('match')) for s in first)})"),
                       style="bold")
    note = Text("Fixed questions from the held-out data (first line shown), asked again as training goes.",
                style="dim")
    return Group(summary, note, table)


def _percent(value: float) -> str:
    return f"{value:.0%}"


def _mean_words(samples: tuple[dict[str, Any], ...]) -> float:
    """Mean length of the answers in words: how a preference run's style shows (e.g. shorter answers)."""
    return sum(len(str(s.get("answer", "")).split()) for s in samples) / max(1, len(samples))


def _answer(sample: dict[str, Any], marks: bool = True) -> Text:
    """The answer, marked ✓/✗ against the expected one (not for preference runs: no answer is expected)."""
    answer = str(sample.get("answer", "")).strip() or "(empty)"
    if not marks:
        return Text(answer)
    mark = "✓ " if sample.get("match") else "✗ "
    return Text.assemble((mark, "green" if sample.get("match") else "red"), answer)


def log_line(line: LogLine) -> Text:
    return Text.assemble((clock_text(line.time) + " ", "dim"), (line.text, LEVEL_STYLES.get(line.level, "")))


class DashboardScreen(Screen[None]):
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
        """A tui.runmodel.Prefetch already reading this run's history (from `tunewiz attach`)."""
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
        self._reader: BulkEventReader | None = None
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
                        yield LineChart("Preference accuracy", _percent, id="chart-accuracy", empty="-")
                    with Horizontal(id="charts-small"):
                        yield LineChart("Learning rate", id="chart-lr", empty="-")
                        yield LineChart("Grad norm", id="chart-grad", empty="-")
                        yield LineChart("Tokens/s", id="chart-tok", empty="-")
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
            self._reader, self._model = BulkEventReader(run.events_path), RunModel(run.run_id, run.status())
        reader, model = self._reader, self._model
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
            if state not in ACTIVE_STATES:
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
        loss_series = [ChartSeries("train", view.loss_xs, view.loss_ys, "blue"),
                       ChartSeries("smoothed", view.loss_xs, view.loss_smooth, "bold yellow")]
        if view.eval_xs:
            loss_series.append(ChartSeries("eval", view.eval_xs, view.eval_ys, "bold magenta", markers=True))
        self.query_one("#chart-loss", LineChart).update_series(loss_series, view.version)
        self.query_one("#chart-lr", LineChart).update_series(
            [ChartSeries("lr", view.lr_xs, view.lr_ys, "cyan")], view.version)
        self.query_one("#chart-grad", LineChart).update_series(
            [ChartSeries("grad", view.grad_xs, view.grad_ys, "green")], view.version)
        self._draw_preference(view)
        samples = f"now {view.samples_per_s:,.2f} samples/s" if view.samples_per_s is not None else ""
        self.query_one("#chart-tok", LineChart).update_series(
            [ChartSeries("tok/s", view.tok_xs, view.tok_ys, "bright_blue")], view.version, subtitle=samples)

    def _draw_preference(self, view: RunView) -> None:
        """The rewards and their margin, and the implicit-reward accuracy, of a preference run."""
        pref = view.preference
        self.query_one("#charts-pref").set_class(bool(pref), "shown")
        if not pref:
            return
        rewards = [ChartSeries(label, *pref[key], color) for key, label, color in REWARD_SERIES if key in pref]
        margin = pref["margin"][1][-1] if "margin" in pref else None
        self.query_one("#chart-rewards", LineChart).update_series(
            rewards, view.version, subtitle=f"margin now {margin:.3f}" if margin is not None else "")
        if "accuracy" in pref:
            self.query_one("#chart-accuracy", LineChart).update_series(
                [ChartSeries("accuracy", *pref["accuracy"], "green")], view.version)

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
        from engine.inference import adapter_path
        from engine.errors import TunewizError

        try:
            adapter_path(self.run)
        except (TunewizError, OSError, ValueError):
            return False
        return True

    def action_chat(self, compare: bool = False) -> None:
        from tui.screens.chat import ChatScreen

        self.app.push_screen(ChatScreen(self.run, compare=compare))

    def action_compare(self) -> None:
        self.action_chat(compare=True)

    def action_evaluate(self) -> None:
        self._evaluating = True
        self.refresh_bindings()
        self.notify("Evaluating: the base model and the tuned one answer the held-out examples…", timeout=8)
        self.evaluate_run()

    @work(thread=True, exclusive=True, group="evaluate", exit_on_error=False)
    def evaluate_run(self) -> None:
        from tui.services import ServiceError

        def progress(message: str) -> None:
            self.post_message(RunActionDone("progress-eval", self.run.run_id, message))

        try:
            summary = self.app.services.evaluate(self.run, progress)  # type: ignore[attr-defined]
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
            from tui.screens.welcome import WelcomeScreen

            self.app.switch_screen(WelcomeScreen())

    def action_detach(self) -> None:
        """Leave the run to train on: back to Past runs when opened from there, else out of the app."""
        from tui.screens.runs import RunsScreen

        if len(self.app.screen_stack) > 2 and isinstance(self.app.screen_stack[-2], RunsScreen):
            self.app.pop_screen()
            self.notify(f"Detached: {self.run.run_id} goes on training.")
        else:
            self.app.exit(0)

    def action_help(self) -> None:
        from tui.keys import keys_help
        from tui.screens.dialogs import MessageDialog

        back = f"Come back to this run after detaching: {hints.command(f'attach {self.run.run_id}')}"
        self.app.push_screen(MessageDialog("Keys and charts", f"{keys_help(self)}\n\n{back}\n\n{HELP}"))

    def action_stop(self) -> None:
        from tui.screens.dialogs import ConfirmDialog

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

        outcome = self.app.services.stop(self.run, progress)  # type: ignore[attr-defined]
        self.post_message(RunActionDone("stop", self.run.run_id, outcome))

    def action_resume(self) -> None:
        self._resuming = True
        self.refresh_bindings()
        self.notify("Resuming: a new engine starts from the newest checkpoint.")
        self.resume_run()

    @work(thread=True, exclusive=True, group="resume", exit_on_error=False)
    def resume_run(self) -> None:
        try:
            pid = self.app.services.resume(self.run)  # type: ignore[attr-defined]
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
        from tui.screens.dialogs import ExportDialog

        def chosen(kind: str | None) -> None:
            if kind:
                self._exporting = True
                self.refresh_bindings()
                self.notify(f"Exporting ({EXPORT_KINDS[kind]})…", timeout=8)
                self.export_run(kind)

        self.app.push_screen(ExportDialog(self.run.path / "exports"), chosen)

    @work(thread=True, exclusive=True, group="export", exit_on_error=False)
    def export_run(self, kind: str) -> None:
        from tui.services import ServiceError

        def progress(message: str) -> None:
            self.post_message(RunActionDone("progress-export", self.run.run_id, message))

        try:
            result = self.app.services.export(self.run, kind, progress)  # type: ignore[attr-defined]
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
            show_error = self.app.show_error  # type: ignore[attr-defined]
            show_error(f"Could not {message.action} the run", message.error, message.hint)
            if message.action == "resume":
                self._resuming = False
                self.refresh_bindings()
            return
        if message.action in ("evaluate", "export"):
            from tui.screens.dialogs import MessageDialog

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
        self.app.report_worker_error(event)  # type: ignore[attr-defined]


def _evaluation(run: Any) -> dict[str, Any] | None:
    from engine.evaluate import latest_summary

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
