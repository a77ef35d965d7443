"""Small modal dialogs: a message (errors), a yes/no question, and the preset name prompt."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, OptionList, Static
from textual.widgets.option_list import Option

from tunewiz.engine.errors import TunewizError
from tunewiz.engine.use.chat_client import SamplingSettings


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


class ExportDialog(ModalScreen["str | None"]):
    """Choose what to export: the adapter, a merged model or a GGUF file (with an Ollama Modelfile)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "choose('adapter')", "Adapter"),
        Binding("m", "choose('merged')", "Merged"),
        Binding("g", "choose('gguf-q8_0')", "GGUF q8_0"),
        Binding("k", "choose('gguf-q4_k_m')", "GGUF q4_k_m"),
        Binding("escape,n", "choose(None)", "Cancel"),
    ]

    def __init__(self, exports: Path) -> None:
        super().__init__(classes="dialog-screen")
        self.exports = exports

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text("Export the trained model", style="bold"), classes="dialog-title")
            yield Static(Text.assemble(
                ("a  Adapter only", "bold"), ": a few MB, loaded on top of the base model with peft\n",
                ("m  Merged model", "bold"), ": the base model with the adapter merged in; plain transformers "
                "loads it (the model's full size on disk)\n",
                ("g  GGUF q8_0", "bold"), ": one file for llama.cpp, Ollama and LM Studio, with a Modelfile\n",
                ("k  GGUF q4_k_m", "bold"), ": the small size most people download (needs llama-cpp-python)\n",
                (f"Into {self.exports}/…; every export is re-loaded and checked against the adapter.", "dim")),
                classes="dialog-body")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Adapter (a)", id="adapter", compact=True)
                yield Button("Merged (m)", id="merged", compact=True)
                yield Button("GGUF (g)", id="gguf-q8_0", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def action_choose(self, what: str | None) -> None:
        self.dismiss(what)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None if event.button.id == "cancel" else event.button.id)


class ChoiceDialog(ModalScreen["str | None"]):
    """Pick one of a few options (value, label); Enter picks, Esc cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, options: list[tuple[str, str]]) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text, self.options = title, options

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(self.title_text, style="bold"), classes="dialog-title")
            yield OptionList(*[Option(label, id=value) for value, label in self.options], id="choices")
            yield Static("Enter picks · Esc cancels", classes="dim")

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)
