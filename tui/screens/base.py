"""The frame every wizard step shares: step bar, one-line explanation, body, key hints; Back and Next."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, cast

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Container
from textual.screen import Screen
from textual.widgets import Footer, Input, Select, Static
from textual.worker import Worker

from tunewiz.tui.widgets.steps import StepBar

if TYPE_CHECKING:
    from tunewiz.tui.app import TunewizApp
    from tunewiz.tui.wizard import WizardState


class TunewizScreen(Screen[None]):
    """A screen of this app, with the app typed as `tw` (services, navigation, the error dialog)."""

    @property
    def tw(self) -> TunewizApp:
        return cast("TunewizApp", self.app)


class WizardScreen(TunewizScreen):
    """A step of the wizard. Subclasses set STEP and EXPLANATION and write compose_body and action_next."""

    STEP: ClassVar[str] = ""
    MAIN: ClassVar[str | None] = None
    """Selector of the screen's main list: Esc in a text box returns there before it goes back."""
    EXPLANATION: ClassVar[str] = ""
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("ctrl+n", "next", "Next", priority=True),
    ]

    @property
    def state(self) -> WizardState:
        return self.tw.state

    def compose(self) -> ComposeResult:
        yield StepBar(self.STEP)
        yield Static(self.EXPLANATION, classes="explain")
        with Container(classes="body"):
            yield from self.compose_body()
        yield Footer(show_command_palette=False)

    def compose_body(self) -> ComposeResult:
        yield from ()

    def on_mount(self) -> None:
        self.tw.state_signal.subscribe(self, lambda _data: self.refresh_state())
        self.refresh_state()

    def refresh_state(self) -> None:
        """Show the shared state; called on mount and whenever it changes."""

    def action_back(self) -> None:
        if self.MAIN and isinstance(self.focused, (Input, Select)):
            self.query_one(self.MAIN).focus()
            return
        self.app.pop_screen()

    def action_next(self) -> None:
        """Go on to the next step."""

    @on(Worker.StateChanged)
    def _worker_changed(self, event: Worker.StateChanged) -> None:
        self.tw.report_worker_error(event)
