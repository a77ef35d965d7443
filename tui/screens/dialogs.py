"""Small modal dialogs: a message (errors), a yes/no question, and the preset name prompt."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static

from engine.chat_client import SamplingSettings
from engine.errors import TunewizError


class MessageDialog(ModalScreen[None]):
    """A titled message with an optional hint; Enter or Esc closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter", "close", "Close")]

    def __init__(self, title: str, message: str, hint: str | None = None) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text, self.message, self.hint = title, message, hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(self.title_text, style="bold"), classes="dialog-title")
            with VerticalScroll(classes="dialog-body"):
                yield Static(Text(self.message))
                if self.hint:
                    yield Static(Text.assemble(("What to do: ", "bold"), self.hint), classes="dialog-hint")
            yield Button("OK (Enter)", id="ok", compact=True)

    @on(Button.Pressed)
    def action_close(self) -> None:
        self.dismiss(None)


class ConfirmDialog(ModalScreen[bool]):
    """A yes/no question: y or Enter on Yes, n or Esc for No."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, title: str, message: str, yes: str = "Yes", no: str = "No") -> None:
        super().__init__(classes="dialog-screen")
        self.title_text, self.message, self.yes, self.no = title, message, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(self.title_text, style="bold"), classes="dialog-title")
            yield Static(Text(self.message), classes="dialog-body")
            with Horizontal(classes="dialog-buttons"):
                yield Button(f"{self.yes} (y)", id="yes", compact=True)
                yield Button(f"{self.no} (n)", id="no", compact=True)

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class NameDialog(ModalScreen["str | None"]):
    """Ask for a name (the preset to save); Enter accepts, Esc cancels. The caller validates."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, explanation: str, value: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.title_text, self.explanation, self.value = title, explanation, value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(self.title_text, style="bold"), classes="dialog-title")
            yield Static(Text(self.explanation), classes="dialog-body")
            yield Input(self.value, id="name", compact=True)
            yield Static("Enter saves · Esc cancels", classes="dim")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class SamplingDialog(ModalScreen["SamplingSettings | None"]):
    """Edit how the chat picks tokens; Enter in any field applies, Esc cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]
    FIELDS = (("temperature", "Temperature (0 = greedy: the same answer every time)"),
              ("top_p", "Top-p (with a temperature above 0)"), ("max_new_tokens", "Max new tokens"))

    def __init__(self, settings: SamplingSettings) -> None:
        super().__init__(classes="dialog-screen")
        self.settings = settings

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text("Sampling settings", style="bold"), classes="dialog-title")
            for name, label in self.FIELDS:
                yield Static(label)
                yield Input(f"{getattr(self.settings, name):g}", id=f"s-{name}", compact=True)
            yield Static("", id="s-error", classes="dialog-hint")
            yield Static("Enter applies · Esc cancels", classes="dim")

    @on(Input.Submitted)
    def _submitted(self) -> None:
        try:
            values = {name: self.query_one(f"#s-{name}", Input).value.strip() for name, _ in self.FIELDS}
            settings = SamplingSettings(temperature=float(values["temperature"]), top_p=float(values["top_p"]),
                                        max_new_tokens=int(values["max_new_tokens"]), seed=self.settings.seed)
            settings.check()
        except (ValueError, TunewizError) as exc:
            self.query_one("#s-error", Static).update(Text(str(exc), style="red"))
            return
        self.dismiss(settings)

    def action_cancel(self) -> None:
        self.dismiss(None)
