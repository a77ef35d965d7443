"""The live view shown after a launch is now the run dashboard (tui/screens/dashboard.py); this name stays
for code that imported it."""

from tui.screens.dashboard import STATE_STYLES, DashboardScreen as RunViewScreen

__all__ = ["RunViewScreen", "STATE_STYLES"]
