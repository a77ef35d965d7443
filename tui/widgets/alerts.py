"""The coach's alerts (engine/run/alerts.py, written as `alert` events) in the dashboard's banner."""

from __future__ import annotations

from rich.text import Text

from tunewiz.tui.runmodel import RunView

SHORT_LIMIT = 150
"""On a short terminal the message and the hint are each cut to this many characters (4 Log has them whole)."""


def coach_text(view: RunView | None, tall: bool = True) -> Text | None:
    """While the run is live, its latest alert in plain words and what to try; once it has ended, one line
    naming the alerts it raised. None when there are none."""
    if view is None or not view.alerts:
        return None
    latest = view.alerts[-1]
    style = "bold red" if latest.get("severity") == "critical" else "bold yellow"
    if not view.live:
        codes = ", ".join(str(a.get("code")) for a in view.alerts)
        return Text.assemble((f"Coach: {len(view.alerts)} alert{'s' if len(view.alerts) > 1 else ''}", style),
                             f" during this run ({codes}); 4 Log says what each meant.")
    message, hint = str(latest.get("message") or ""), str(latest.get("hint") or "")
    if not tall:
        message, hint = _cut(message), _cut(hint)
    text = Text.assemble(("⚠ Coach: ", style), message, "\n", ("Try: ", "bold"), hint)
    if len(view.alerts) > 1:
        text.append(f" ({len(view.alerts)} alerts so far: 4 Log)", style="dim")
    return text


def _cut(text: str) -> str:
    return text if len(text) <= SHORT_LIMIT else text[:SHORT_LIMIT - 1] + "…"
