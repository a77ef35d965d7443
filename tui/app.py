"""The tunewiz wizard: a Textual app that guides a beginner from "what GPU do I have?" to a launched run.

Workers never touch widgets: they call the injected services and post messages (tui/messages.py);
`@on` handlers here change the shared WizardState and publish `state_signal`, and screens redraw.
Worker errors end up in one place, `report_worker_error`, which shows them as dialogs.

The app never imports the training stack. Runs are started detached (their own session), so they
keep going when the app quits, loses its terminal or gets SIGHUP.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any, ClassVar

from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.signal import Signal
from textual.widgets import Static
from textual.worker import Worker, WorkerState, get_current_worker

from tunewiz.engine import hints
from tunewiz.engine.config.spec import RunSpec, SpecError
from tunewiz.engine.errors import TunewizError
from tunewiz.engine.run.rundir import LIVE_STATES
from tunewiz.tui import wizard
from tunewiz.tui.messages import DataChecked, HardwareProbed, ModelEstimated, ReviewEstimated, RunLaunched
from tunewiz.tui.navigation import Place, next_place, place_of, screen_for
from tunewiz.tui.services import ServiceError, Services
from tunewiz.tui.wizard import CheckRequest, CheckResult, WizardState

TTY_CHECK_S = 2.0

WORKER_TITLES = {
    "probe": "The hardware check failed",
    "data-check": "The data check failed",
    "estimate": "Could not estimate that model",
    "review-estimate": "Could not estimate memory",
    "launch": "Could not start the run",
    "runs": "Could not list the runs",
    "tail": "Could not read the run's events",
    "stop": "Could not stop the run",
    "resume": "Could not resume the run",
    "export": "Could not export the run",
    "delete": "Could not delete the run",
}


MIN_SIZE = (60, 20)
"""The smallest terminal (columns, lines) every screen is drawn for."""


class TooSmallScreen(Screen[None]):
    """Shown instead of the app while the terminal is smaller than MIN_SIZE; it goes when the terminal grows."""

    def compose(self) -> ComposeResult:
        yield Static(id="too-small")

    def render_message(self) -> str:
        width, height = self.app.size
        return (f"The terminal is {width}×{height}; tunewiz needs at least {MIN_SIZE[0]}×{MIN_SIZE[1]}. "
                "Make the window bigger (q quits).")

    def on_mount(self) -> None:
        self.query_one("#too-small", Static).update(self.render_message())

    def on_resize(self) -> None:
        self.query_one("#too-small", Static).update(self.render_message())


class TunewizApp(App[int]):
    """The wizard. `services` holds everything outside the app (fakes in tests)."""

    CSS_PATH = "tunewiz.tcss"
    TITLE = "tunewiz"
    ENABLE_COMMAND_PALETTE = False
    # classes on every screen for tunewiz.tcss: narrower and shorter than 80x24 get tighter layouts
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (80, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (24, "-tall")]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", tooltip="runs keep training", priority=True),
        Binding("q", "quit", "Quit", tooltip="runs keep training", show=False),  # a text field
        # takes the letter: not a priority binding
        Binding("question_mark", "help", "Keys", show=False),
    ]

    def __init__(self, services: Services | None = None, *, watch_terminal: bool = False,
                 attach: Any = None) -> None:
        super().__init__()
        self.services = services or Services()
        self.base = wizard.base_spec()
        """The spec every new fine-tune starts from: the demo preset."""
        self.state = WizardState(spec=self.base)
        self.state_signal: Signal[None] = Signal(self, "state")
        """Published after every change to `state`."""
        self.launched: list[Any] = []
        """Run directories started from this app (they outlive it)."""
        self.watched: list[Any] = []
        """Run directories whose dashboard was opened (`run_app` says how to come back to live ones)."""
        self.attach = attach
        """The run to open at once (`tunewiz attach RUN`): its dashboard; Esc leads to the welcome screen."""
        self._prefetch = None
        if attach is not None:  # read its history while the app starts
            from tunewiz.tui.runmodel import RunModel
            from tunewiz.tui.runreader import Prefetch

            self._prefetch = Prefetch(attach.events_path, RunModel(attach.run_id, attach.status()))
        self.hung_up = False
        """True when the app ended because its terminal went away."""
        self._watch_terminal = watch_terminal
        self._checking: CheckRequest | None = None

    # ---------------------------------------------------------------- start and stop

    def on_mount(self) -> None:
        if self.attach is not None:
            # Only the dashboard: Esc swaps in the welcome screen, and the wizard probes the hardware when used.
            self.go(Place.DASHBOARD, self.attach, self._prefetch)
            self._prefetch = None
        else:
            self.go(Place.WELCOME)
            self.probe_hardware()
        if self._watch_terminal:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGHUP, signal.SIGTERM):
                loop.add_signal_handler(sig, self._terminal_lost)
            self.set_interval(TTY_CHECK_S, self._check_terminal)

    def _check_terminal(self) -> None:
        """Dolphie's guard: a terminal that vanished without SIGHUP leaves stdin no longer a tty."""
        try:
            alive = sys.__stdin__ is not None and os.isatty(sys.__stdin__.fileno())
        except (OSError, ValueError, AttributeError):
            alive = False
        if not alive:
            self._terminal_lost()

    def _terminal_lost(self) -> None:
        self.hung_up = True
        self.exit(0)

    def ensure_probed(self) -> None:
        """Probe the hardware unless that is done or under way (an attached app skips it at start)."""
        if self.state.report is None and not any(w.group == "probe" and w.is_running for w in self.workers):
            self.probe_hardware()

    def reset_wizard(self) -> None:
        """Start a new fine-tune from the demo preset (keeps the hardware report)."""
        self.ensure_probed()
        self.state.spec = self.base
        self.state.choice = None
        self.state.use_all_gpus = True
        self.state.dataset = wizard.DatasetSelection(preset=wizard.DEMO_PRESET)
        self.state.review_estimate = None
        self.state.relaunch_of = None
        self.state_signal.publish(None)

    def on_resize(self, event: events.Resize) -> None:
        """Below the smallest size the screens are drawn for, say so instead of drawing them broken."""
        small = event.size.width < MIN_SIZE[0] or event.size.height < MIN_SIZE[1]
        showing = isinstance(self.screen, TooSmallScreen)
        if small and not showing:
            self.push_screen(TooSmallScreen())
        elif showing and not small:
            self.pop_screen()

    def action_help(self) -> None:
        """The keys of the screen in front (the dashboard adds how to read its charts)."""
        from tunewiz.tui.dialogs import MessageDialog
        from tunewiz.tui.keys import keys_help

        self.push_screen(MessageDialog("Keys", keys_help(self.screen)))

    # ---------------------------------------------------------------- navigation (tui/navigation.py)

    def go(self, place: Place, *args: Any, **kwargs: Any) -> None:
        """Open the screen of `place` on top of this one."""
        self.push_screen(screen_for(place, *args, **kwargs))

    def go_next(self, screen: Screen[Any]) -> None:
        """Open the wizard step after `screen`'s."""
        place = place_of(screen)
        if place is None:
            raise ValueError(f"{type(screen).__name__} is not a step of the wizard")
        self.go(next_place(place))

    def go_instead(self, place: Place, *args: Any, **kwargs: Any) -> None:
        """Put the screen of `place` where the one in front is."""
        self.switch_screen(screen_for(place, *args, **kwargs))

    def place_behind(self) -> Place | None:
        """The place of the screen under the one in front, if any."""
        return place_of(self.screen_stack[-2]) if len(self.screen_stack) > 2 else None

    # ---------------------------------------------------------------- errors

    def report_worker_error(self, event: Worker.StateChanged) -> None:
        """The one place where a failed worker becomes a dialog."""
        if event.state != WorkerState.ERROR:
            return
        error = event.worker.error
        title = WORKER_TITLES.get(event.worker.group, "Something went wrong")
        self.show_error(title, error if error is not None else "the task failed without saying why")

    def show_error(self, title: str, error: BaseException | str, hint: str | None = None) -> None:
        from tunewiz.tui.dialogs import MessageDialog

        if isinstance(error, SpecError):
            message = error.render()
        elif isinstance(error, BaseException):
            message = str(error) or type(error).__name__
            if not isinstance(error, (TunewizError, ServiceError, OSError)):
                message = f"{type(error).__name__}: {message}"
            hint = hint or getattr(error, "hint", None)
        else:
            message = error
        self.push_screen(MessageDialog(title, message, hint))

    @on(Worker.StateChanged)
    def _app_worker_changed(self, event: Worker.StateChanged) -> None:
        self.report_worker_error(event)

    # ---------------------------------------------------------------- hardware and recommendation

    @work(thread=True, exclusive=True, group="probe", exit_on_error=False)
    def probe_hardware(self) -> None:
        report = self.services.probe()
        one = None
        try:
            recommendation = self.services.recommend(report, wizard.RECOMMEND_SEQ_LEN)
            if any(getattr(c, "gpus", 1) > 1 for c in recommendation.choices):  # several GPUs: the switch to one
                one = self.services.recommend(report, wizard.RECOMMEND_SEQ_LEN, gpus=1)
            error = None
        except Exception as exc:  # noqa: BLE001 - shown on the model step instead of a crash
            recommendation, error = None, f"{type(exc).__name__}: {exc}"
        self.post_message(HardwareProbed(report, recommendation, error, one))

    @on(HardwareProbed)
    def _probed(self, message: HardwareProbed) -> None:
        self.state.report = message.report
        self.state.recommendation = message.recommendation
        self.state.recommendation_one = message.recommendation_one
        self.state.recommend_error = message.recommend_error
        self.state_signal.publish(None)

    def toggle_gpus(self) -> None:
        """The model step's switch between every GPU the recommendation uses and one."""
        self.state.use_all_gpus = not self.state.use_all_gpus
        self.state_signal.publish(None)

    @work(thread=True, exclusive=True, group="estimate", exit_on_error=False)
    def estimate_model(self, name: str) -> None:
        several = self.state.recommendation_one is not None
        try:
            choice = self.services.choice_for(name, self.state.report, wizard.RECOMMEND_SEQ_LEN)
            one = self.services.choice_for(name, self.state.report, wizard.RECOMMEND_SEQ_LEN, gpus=1) if several \
                else None
        except (TunewizError, ServiceError) as exc:
            self.post_message(ModelEstimated(name, error=str(exc), hint=getattr(exc, "hint", None)))
            return
        self.post_message(ModelEstimated(name, choice=choice, choice_one=one))

    @on(ModelEstimated)
    def _model_estimated(self, message: ModelEstimated) -> None:
        if message.error:
            self.show_error(f"Could not estimate {message.name}", message.error, message.hint)
            return
        for extra, choice in ((self.state.extra_choices, message.choice),
                              (self.state.extra_choices_one, message.choice_one)):
            if choice is not None:
                extra[:] = [c for c in extra if c.model != choice.model]
                extra.insert(0, choice)
        self.state_signal.publish(None)

    @work(thread=True, exclusive=True, group="review-estimate", exit_on_error=False)
    def estimate_review(self, spec: RunSpec, longest: int | None = None) -> None:
        """The estimate of exactly `spec` (every setting), at the data's measured longest example when known."""
        try:
            choice = self.services.spec_choice(spec, self.state.report, longest)
        except (TunewizError, ServiceError):
            choice = None
        self.post_message(ReviewEstimated(choice))

    @on(ReviewEstimated)
    def _review_estimated(self, message: ReviewEstimated) -> None:
        self.state.review_estimate = message.choice
        self.state_signal.publish(None)

    # ---------------------------------------------------------------- data check

    def request_data_check(self, request: CheckRequest) -> None:
        """Start the check unless it ran already (or is running) for exactly this request."""
        done = self.state.checks.get(request)
        if not request.target or (done is not None and (done.report or done.error)):
            return
        if request == self._checking and any(w.group == "data-check" and w.is_running for w in self.workers):
            return
        self._checking = request
        self.state.checks[request] = CheckResult(request)  # pending: no report, no error
        self.state_signal.publish(None)
        self.check_data(request)

    @work(thread=True, exclusive=True, group="data-check", exit_on_error=False)
    def check_data(self, request: CheckRequest) -> None:
        worker = get_current_worker()
        try:
            report = self.services.check_data(request, lambda: worker.is_cancelled)
        except (TunewizError, ServiceError) as exc:
            self.post_message(DataChecked(CheckResult(request, error=str(exc), hint=getattr(exc, "hint", None))))
            return
        if worker.is_cancelled or not report:
            self.post_message(DataChecked(CheckResult(request, error="cancelled")))
            return
        self.post_message(DataChecked(CheckResult(request, report=report)))

    @on(DataChecked)
    def _data_checked(self, message: DataChecked) -> None:
        if message.result.error == "cancelled":
            self.state.checks.pop(message.result.request, None)  # run it again when asked
        else:
            self.state.checks[message.result.request] = message.result
        self.state_signal.publish(None)

    # ---------------------------------------------------------------- launch

    @work(thread=True, exclusive=True, group="launch", exit_on_error=False)
    def launch_run(self, spec: RunSpec, trust_remote_code: bool = False) -> None:
        spec = wizard.validated(spec)
        run = self.services.launch(spec, self.services.runs_root, trust_remote_code=trust_remote_code)
        self.post_message(RunLaunched(run))

    @on(RunLaunched)
    def _launched(self, message: RunLaunched) -> None:
        self.launched.append(message.run)
        while len(self.screen_stack) > 2 and place_of(self.screen) != Place.WELCOME:
            self.pop_screen()
        self.go(Place.DASHBOARD, message.run)


def keeps_going(run_id: str) -> str:
    """What the terminal shows about a run that outlives the app: commands that work as printed."""
    return (f"run {run_id} keeps going.\n  watch it again:  {hints.command(f'attach {run_id}')}\n"
            f"  plain text:      {hints.command(f'tail {run_id} -f')}\n"
            f"  stop it:         {hints.command(f'stop {run_id}')}")


def run_app(services: Services | None = None, attach: Any = None) -> int:
    """Run the wizard (or, with `attach`, a run's dashboard) in this terminal; return the exit status."""
    app = TunewizApp(services, watch_terminal=True, attach=attach)
    try:
        app.run()
    except OSError:  # the terminal went away while the app was drawing or restoring it
        return 0
    if app.hung_up:
        return 0
    for run in dict.fromkeys([*app.launched, *app.watched]):
        try:
            if run.state() in LIVE_STATES:
                print(keeps_going(run.run_id))
        except OSError:
            break
    return app.return_code or 0
