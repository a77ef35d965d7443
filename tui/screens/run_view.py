"""A run's live events, shown plainly (the full dashboard is a separate screen, built later).

It only reads the run directory: a thread worker follows events.jsonl by offset and posts batches;
the handler appends them to a log. Leaving the screen or the app never stops the run.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import Footer, RichLog, Static
from textual.worker import Worker, get_current_worker

from engine.events import EventReader
from engine.render import duration, format_event
from engine.rundir import FINAL_STATES, LIVE_STATES
from tui.messages import RunEvents
from tui.widgets.steps import StepBar

POLL_S = 0.5
MAX_BYTES_PER_POLL = 1 << 20
STATE_STYLES = {"running": "bold green", "starting": "bold yellow", "stopping": "bold yellow",
                "completed": "bold green", "failed": "bold red", "cancelled": "bold yellow", "dead": "bold red"}


def event_lines(event: Any) -> list[str]:
    """One event as short lines that fit an 80-column log (steps get a compact form)."""
    if event.type == "step":
        d = event.data
        clock = time.strftime("%H:%M:%S", time.localtime(event.time))
        parts = [f"{clock} step {d.get('step')}/{d.get('total_steps')}"]
        if isinstance(d.get("loss"), (int, float)):
            parts.append(f"loss {d['loss']:.4f}")
        if isinstance(d.get("learning_rate"), (int, float)):
            parts.append(f"lr {d['learning_rate']:.1e}")
        if isinstance(d.get("tokens_per_s"), (int, float)):
            parts.append(f"{d['tokens_per_s']:,.0f} tok/s")
        parts.append(f"elapsed {duration(d.get('elapsed_s'))}")
        return ["  ".join(parts)]
    return format_event(event).splitlines()


def progress_text(state: str, last_step: dict[str, Any] | None, width: int = 20) -> Text:
    text = Text.assemble(("State: ", "bold"), (state, STATE_STYLES.get(state, "bold")))
    if last_step:
        step, total = last_step.get("step", 0), last_step.get("total_steps") or 0
        filled = round(width * step / total) if total else 0
        text.append(f"   [{'#' * filled}{'.' * (width - filled)}] step {step}/{total}")
        loss = last_step.get("loss")
        if isinstance(loss, (int, float)):
            text.append(f"  loss {loss:.4f}")
        if last_step.get("eta_s") is not None and state in LIVE_STATES:
            text.append(f"  about {duration(last_step['eta_s'])} left")
    return text


class RunViewScreen(Screen[None]):
    """Follow one run: state, progress, and every event as a line of text."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "leave", "Back to start"),
        Binding("s", "stop", "Stop the run"),
    ]

    def __init__(self, run: Any, step: str = "Launch") -> None:
        super().__init__()
        self.run = run
        self.step = step
        self.run_state = "starting"
        self.last_step: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield StepBar(self.step)
        yield Static(Text.assemble(("Run ", "dim"), (self.run.run_id, "bold"), ("  in ", "dim"), str(self.run.path)),
                     classes="explain")
        yield Static(progress_text(self.run_state, None), id="run-progress")
        yield Static(Text(f"Training runs in the background: leaving this screen or quitting does not stop it. "
                          f"Later: tunewiz tail {self.run.run_id} -f", style="dim"), classes="note")
        yield RichLog(id="run-log", wrap=True, markup=False, highlight=False, min_width=20)
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.follow()

    @work(thread=True, exclusive=True, group="tail", exit_on_error=False)
    def follow(self) -> None:
        worker = get_current_worker()
        reader = EventReader(self.run.events_path)
        last_state = None
        while not worker.is_cancelled:
            state = self.run.state()  # before reading: once it says "ended", this read gets the rest
            result = reader.poll(MAX_BYTES_PER_POLL)
            if result.events or result.reset or state != last_state:
                self.post_message(RunEvents(self.run.run_id, result.events, state, result.reset))
                last_state = state
            if state in (*FINAL_STATES, "dead") and not result.events:
                return
            if not result.events:
                deadline = time.monotonic() + POLL_S
                while time.monotonic() < deadline and not worker.is_cancelled:
                    time.sleep(0.05)

    @on(RunEvents)
    def _events(self, message: RunEvents) -> None:
        log = self.query_one("#run-log", RichLog)
        if message.reset:
            log.clear()
            self.last_step = None
        lines = []
        for event in message.events:
            if event.type == "step":
                self.last_step = event.data
            lines.extend(event_lines(event))
        for line in lines:
            log.write(Text(line))
        self.run_state = message.state
        text = progress_text(message.state, self.last_step)
        if message.state == "dead":
            text.append(f"\nThe engine stopped without finishing. Resume it: tunewiz resume {self.run.run_id}",
                        style="red")
        self.query_one("#run-progress", Static).update(text)

    @on(Worker.StateChanged)
    def _worker_changed(self, event: Worker.StateChanged) -> None:
        self.app.report_worker_error(event)  # type: ignore[attr-defined]

    def action_leave(self) -> None:
        self.app.pop_screen()

    def action_stop(self) -> None:
        from tui.screens.dialogs import ConfirmDialog

        if self.run_state not in LIVE_STATES:
            self.notify(f"The run is {self.run_state}; there is nothing to stop.")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run.request_stop("tui")
                self.notify("Stop requested: the run finishes its step, saves a checkpoint and ends.")

        self.app.push_screen(ConfirmDialog(
            "Stop the run?", "It finishes the current step, saves a checkpoint and ends as cancelled. You can "
            f"resume it later with: tunewiz resume {self.run.run_id}", yes="Stop it", no="Keep training"), answered)
