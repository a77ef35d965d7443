"""The dashboard's panels, drawn from a RunView (tunewiz.tui.runmodel): the title, the progress lines, the alert,
the evaluation line, resources, samples, log lines, and the charts (`CHARTS`). No widgets here: each
function returns rich text that the screen puts in place, so a panel is tested as plain text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from tunewiz.engine.render import GIB, duration, method_name
from tunewiz.engine.render import memory as gb
from tunewiz.tui.runmodel import LogLine, RunView
from tunewiz.tui.styles import STATE_MARKS, STATE_STYLES
from tunewiz.tui.widgets.chart import ChartSeries, gauge, sparkline

TRACEBACK_LINES_SHOWN = 4
LEVEL_STYLES = {"alert": "bold yellow", "warning": "yellow", "error": "bold red", "phase": "cyan", "eval": "magenta",
                "checkpoint": "green", "finished": "bold", "sample": "", "info": ""}


@dataclass(frozen=True)
class Chart:
    """A small chart under the loss: one CHARTED step field (tunewiz.tui.runmodel) drawn over the steps."""

    id: str
    title: str
    field: str
    label: str
    color: str
    subtitle: Callable[[RunView], str] | None = None


def _samples_per_s(view: RunView) -> str:
    return f"now {view.samples_per_s:,.2f} samples/s" if view.samples_per_s is not None else ""


CHARTS = (
    Chart("chart-lr", "Learning rate", "learning_rate", "lr", "cyan"),
    Chart("chart-grad", "Grad norm", "grad_norm", "grad", "green"),
    Chart("chart-tok", "Tokens/s", "tokens_per_s", "tok/s", "bright_blue", _samples_per_s),
)
"""The small charts beside each other under the loss chart, in order."""


def loss_series(view: RunView) -> list[ChartSeries]:
    """The loss chart: training loss, its smoothed line and the eval losses."""
    xs, ys = view.series["loss"]
    lines = [ChartSeries("train", xs, ys, "blue"), ChartSeries("smoothed", xs, view.loss_smooth, "bold yellow")]
    if view.eval_xs:
        lines.append(ChartSeries("eval", view.eval_xs, view.eval_ys, "bold magenta", markers=True))
    return lines


def chart_series(chart: Chart, view: RunView) -> list[ChartSeries]:
    xs, ys = view.series[chart.field]
    return [ChartSeries(chart.label, xs, ys, chart.color)]


REWARD_SERIES = (("chosen_reward", "chosen", "green"), ("rejected_reward", "rejected", "red"),
                 ("margin", "margin", "bold yellow"))
"""A preference run's reward chart: its `preference` event fields (tunewiz.tui.runmodel.PREFERENCE_METRICS)."""


def reward_series(view: RunView) -> list[ChartSeries]:
    pref = view.preference
    return [ChartSeries(label, *pref[key], color) for key, label, color in REWARD_SERIES if key in pref]


def reward_subtitle(view: RunView) -> str:
    margin = view.preference.get("margin")
    return f"margin now {margin[1][-1]:.3f}" if margin and margin[1] else ""


def accuracy_series(view: RunView) -> list[ChartSeries]:
    accuracy = view.preference.get("accuracy")
    return [ChartSeries("accuracy", *accuracy, "green")] if accuracy else []


def percent(value: float) -> str:
    return f"{value:.0%}"


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
        text.append(f"  {view.model or '?'} · {method_name(view.method) if view.method else '?'}")
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
        return Text.assemble(("Training completed", "bold green"), ". Next: ", ("c", "bold"),
                             " chat with your model · ",
                             ("b", "bold"), " compare it with the base model · ", ("v", "bold"),
                             " evaluate before/after · ", ("e", "bold"), " export (adapter, merged, GGUF for Ollama)")
    return None


def evaluation_text(summary: dict[str, Any] | None) -> Text | None:
    """One line on the stored before/after evaluation (engine/use/evaluate.py's results.json)."""
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
        cells: list[RenderableType] = [Text(head + (" …" if rest.strip() else "")),
                                       Text(str(sample.get("reference", "")), style="dim"),
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
