"""How run states look in the app: one colour and one mark per state, shared by the dashboard and Past runs."""

from __future__ import annotations

STATE_STYLES = {"running": "bold green", "starting": "bold yellow", "stopping": "bold yellow",
                "completed": "bold green", "failed": "bold red", "cancelled": "bold yellow", "dead": "bold red"}
STATE_MARKS = {"running": "●", "starting": "◌", "stopping": "◍", "completed": "✓", "failed": "✗", "cancelled": "■",
               "dead": "✗"}
