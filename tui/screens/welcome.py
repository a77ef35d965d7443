"""Step 1: start a new fine-tune, relaunch a saved preset, or open past runs."""

from __future__ import annotations

from typing import ClassVar

from rich.console import Group
from rich.padding import Padding
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from tunewiz.tui.navigation import Place
from tunewiz.tui.screens.base import WizardScreen

INTRO = (
    "tunewiz teaches a language model new behaviour from your examples (\"fine-tuning\"). It checks your "
    "hardware, suggests a model that fits, checks your data, and starts training in the background. "
    "Nothing starts until you press Launch on the Review step."
)


def _option(key: str, title: str, detail: str) -> Group:
    """The key and title, then the detail indented under the title (also where it wraps)."""
    return Group(Text.assemble((f"{key}  ", "bold"), (title, "bold")), Padding(Text(detail, style="dim"), (0, 0, 0, 3)))


class WelcomeScreen(WizardScreen):
    STEP = "Welcome"
    EXPLANATION = "Welcome! Arrow keys and Enter, or a letter; ? lists the keys, q quits."
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "new", "New fine-tune"),
        Binding("p", "presets", "Saved presets"),
        Binding("r", "runs", "Past runs"),
        Binding("escape", "back", "Back", show=False),
        Binding("ctrl+n", "next", "Next", show=False, priority=True),
    ]

    def compose_body(self) -> ComposeResult:
        yield Static(INTRO, classes="intro")
        yield OptionList(
            Option(_option("n", "Start a new fine-tune",
                           "step by step: hardware, model, data, settings, review, launch"), id="new"),
            Option(_option("p", "Relaunch a saved preset", "a built-in recipe or one you saved earlier"),
                   id="presets"),
            Option(_option("r", "Open past runs", "see how earlier runs went, follow one that is running"),
                   id="runs"),
            id="welcome-menu",
        )

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        getattr(self, f"action_{event.option.id}")()

    def action_back(self) -> None:
        """The first screen has nothing behind it."""

    def action_next(self) -> None:
        self.action_new()

    def action_new(self) -> None:
        self.tw.reset_wizard()
        self.tw.go_next(self)

    def action_presets(self) -> None:
        self.tw.go(Place.PRESETS)

    def action_runs(self) -> None:
        self.tw.go(Place.RUNS)
