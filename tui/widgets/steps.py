"""The step bar at the top of every wizard screen: where you are and what comes next."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tunewiz.tui.wizard import STEPS


def steps_text(current: str, width: int | None = None) -> Text:
    """Every step by name; where that is wider than `width`, only the current one named and the others by
    number (never a name cut in two)."""
    if current not in STEPS:
        return Text.assemble(("tunewiz", "bold"), (" > ", "dim"), (f" {current} ", "bold reverse"))
    index = STEPS.index(current)
    for named in (True, False):
        text = Text()
        for position, name in enumerate(STEPS):
            if position:
                text.append(" > ", style="dim")
            label = f"{position + 1} {name}" if named or position == index else f"{position + 1}"
            if position == index:
                text.append(f" {label} ", style="bold reverse")
            else:
                text.append(label, style="" if position < index else "dim")
        if width is None or text.cell_len <= width:
            return text
    return text


class StepBar(Static):
    """`1 Welcome > 2 Hardware > [3 Model] > ...` with the current step in reverse video; narrower: `1 > 2 >
    [3 Model] > 4 ...`."""

    def __init__(self, current: str) -> None:
        super().__init__(classes="step-bar")
        self.current = current

    def render(self) -> Text:
        return steps_text(self.current, self.content_size.width or None)
