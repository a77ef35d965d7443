"""Relaunch a saved preset: built-in recipes and the ones you saved; Enter goes to the review step. Your own
presets can be renamed (m) and deleted (d); a broken preset file is listed with its error, never a crash."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.console import Group
from rich.padding import Padding
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from tunewiz.engine.config import presets
from tunewiz.engine.config.spec import SpecError
from tunewiz.tui.screens.base import WizardScreen


def preset_prompt(info: presets.PresetInfo) -> Group:
    """Name and origin in bold, then the description (or what is wrong with the file)."""
    head = Text.assemble((info.name, "bold"), f"  ({info.origin})")
    if info.shadows:
        head.append("  replaces the built-in of this name", style="bold yellow")
    style = "red" if info.error else "dim"
    return Group(head, Padding(Text(info.description, style=style), (0, 0, 0, 3)))


class PresetsScreen(WizardScreen):
    STEP = "Saved presets"
    EXPLANATION = "Saved recipes: Enter reviews one to launch it again; m renames, d deletes one of yours."
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("ctrl+n", "next", "Open", show=False, priority=True),
        Binding("m", "rename", "Rename"),
        Binding("d", "delete", "Delete"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._listed: list[presets.PresetInfo] = []

    def compose_body(self) -> ComposeResult:
        yield OptionList(id="presets")

    def on_mount(self) -> None:
        super().on_mount()
        self._reload()
        self.query_one("#presets", OptionList).focus()

    def _reload(self, highlight: str | None = None) -> None:
        self._listed = presets.list_presets()
        options = self.query_one("#presets", OptionList)
        options.clear_options()
        options.add_options(Option(preset_prompt(p), id=p.key) for p in self._listed)
        keys = [p.key for p in self._listed]
        if keys:
            options.highlighted = keys.index(highlight) if highlight in keys else 0
        self.refresh_bindings()

    def _highlighted(self) -> presets.PresetInfo | None:
        index = self.query_one("#presets", OptionList).highlighted
        return self._listed[index] if index is not None and index < len(self._listed) else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("rename", "delete"):
            info = self._highlighted()
            return info is not None and info.origin == "user"
        return True

    @on(OptionList.OptionHighlighted, "#presets")
    def _moved(self) -> None:
        self.refresh_bindings()  # rename and delete only for your own presets

    @on(OptionList.OptionSelected, "#presets")
    def _selected(self) -> None:
        info = self._highlighted()
        if info is not None:
            self._open(info)

    def action_next(self) -> None:
        self.query_one("#presets", OptionList).action_select()

    def _open(self, info: presets.PresetInfo) -> None:
        if info.error:
            self.tw.show_error(f"The preset {info.name!r} cannot be used", info.error,
                               f"fix or delete {info.path}" + (" (d deletes it)" if info.origin == "user" else ""))
            return
        try:
            spec, _path = presets.resolve(str(info.path))
        except SpecError as exc:
            self.tw.show_error(f"The preset {info.name!r} cannot be used", exc)
            return
        self.tw.reset_wizard()
        spec.name = info.name  # its runs carry the preset's name
        self.state.spec = spec
        self.state.relaunch_of = info.name
        self.tw.go_next(self)

    def action_rename(self) -> None:
        from tunewiz.tui.dialogs import NameDialog

        info = self._highlighted()
        if info is None or info.origin != "user":
            return

        def named(new: str | None) -> None:
            if not new or new == info.name:
                return
            try:
                presets.rename_user_preset(info.name, new)
            except (SpecError, OSError) as exc:
                self.tw.show_error("Could not rename the preset", exc)
                return
            self.notify(f"Renamed {info.name} to {new}.")
            self._reload(f"user:{new}")

        self.app.push_screen(NameDialog("Rename the preset", f"New name for {info.name!r} (letters, digits, '.', "
                                        "'_' or '-'):", value=info.name), named)

    def action_delete(self) -> None:
        from tunewiz.tui.dialogs import ConfirmDialog

        info = self._highlighted()
        if info is None or info.origin != "user":
            return

        def answered(yes: Any) -> None:
            if not yes:
                return
            try:
                presets.delete_user_preset(info.name)
            except (SpecError, OSError) as exc:
                self.tw.show_error("Could not delete the preset", exc)
                return
            self.notify(f"Deleted {info.name}.")
            self._reload()

        self.app.push_screen(ConfirmDialog("Delete the preset?", f"Delete your preset {info.name!r} "
                                           f"({info.path})? Runs made from it stay.", yes="Delete", no="Keep it"),
                             answered)
