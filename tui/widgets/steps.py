"""The step bar at the top of every wizard screen: where you are and what comes next."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tui.wizard import STEPS


def steps_text(current: str) -> Text:
    if current not in STEPS:
        return Text.assemble(("tunewiz", "bold"), (" > ", "dim"), (f" {current} ", "bold reverse"))
    text = Text()
    index = STEPS.index(current) if current in STEPS else -1
    for position, name in enumerate(STEPS):
        if position:
            text.append(" > ", style="dim")
        if position == index:
            text.append(f" {position + 1} {name} ", style="bold reverse")
        elif position < index:
            text.append(f"{position + 1} {name}")
        else:
            text.append(f"{position + 1} {name}", style="dim")
    return text


class StepBar(Static):
    """`1 Welcome > 2 Hardware > [3 Model] > ...` with the current step in reverse video."""

    def __init__(self, current: str) -> None:
        super().__init__(steps_text(current), classes="step-bar")
