"""Relaunch a saved preset: built-in recipes and the ones you saved; Enter goes to the review step."""

from __future__ import annotations

from typing import ClassVar

from rich.console import Group
from rich.padding import Padding
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from engine import presets
from engine.spec import SpecError
from tui.screens.base import WizardScreen


class PresetsScreen(WizardScreen):
    STEP = "Saved presets"
    EXPLANATION = "Saved recipes: pick one and press Enter to review it and launch it again."
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("ctrl+n", "next", "Open", show=False, priority=True),
    ]

    def compose_body(self) -> ComposeResult:
        options = [Option(Group(Text.assemble((p.name, "bold"), f"  ({p.origin})"),
                                Padding(Text(p.description, style="dim"), (0, 0, 0, 3))), id=p.name)
                   for p in presets.list_presets()]
        yield OptionList(*options, id="presets")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#presets", OptionList).focus()

    @on(OptionList.OptionSelected, "#presets")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self._open(str(event.option.id))

    def action_next(self) -> None:
        self.query_one("#presets", OptionList).action_select()

    def _open(self, name: str) -> None:
        from tui.screens.review import ReviewScreen

        try:
            spec, _path = presets.resolve(name)
        except SpecError as exc:
            self.tw.show_error(f"The preset {name!r} cannot be used", exc)
            return
        self.tw.reset_wizard()
        self.state.spec = spec
        self.state.relaunch_of = name
        self.app.push_screen(ReviewScreen())
