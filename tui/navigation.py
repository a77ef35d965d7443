"""Where the app's screens are and where each leads: the one map the app follows.

Screens never import each other. They ask the app to go to a `Place` (`self.tw.go(Place.RUNS)`) or to
the next step of the wizard (`self.tw.go_next(self)`); this module alone turns places into screens and
holds the wizard's order. To add a step or reorder the wizard, change `NEXT` (and `wizard.STEPS`, the
labels the step bar shows).
"""

from __future__ import annotations

import importlib
from enum import StrEnum
from typing import Any

from textual.screen import Screen


class Place(StrEnum):
    WELCOME = "welcome"
    HARDWARE = "hardware"
    MODEL = "model"
    DATASET = "dataset"
    SETTINGS = "settings"
    REVIEW = "review"
    PRESETS = "presets"
    RUNS = "runs"
    DASHBOARD = "dashboard"
    CHAT = "chat"
    COMPARE = "compare"


SCREENS: dict[Place, str] = {
    Place.WELCOME: "tunewiz.tui.screens.welcome:WelcomeScreen",
    Place.HARDWARE: "tunewiz.tui.screens.hardware:HardwareScreen",
    Place.MODEL: "tunewiz.tui.screens.model:ModelScreen",
    Place.DATASET: "tunewiz.tui.screens.dataset:DatasetScreen",
    Place.SETTINGS: "tunewiz.tui.screens.settings:SettingsScreen",
    Place.REVIEW: "tunewiz.tui.screens.review:ReviewScreen",
    Place.PRESETS: "tunewiz.tui.screens.presets:PresetsScreen",
    Place.RUNS: "tunewiz.tui.screens.runs:RunsScreen",
    Place.DASHBOARD: "tunewiz.tui.screens.dashboard:DashboardScreen",
    Place.CHAT: "tunewiz.tui.screens.chat:ChatScreen",
    Place.COMPARE: "tunewiz.tui.screens.compare:CompareScreen",
}
"""Each place's screen class, imported when first needed (the app starts faster without them all)."""

NEXT: dict[Place, Place] = {
    Place.WELCOME: Place.HARDWARE,
    Place.HARDWARE: Place.MODEL,
    Place.MODEL: Place.DATASET,
    Place.DATASET: Place.SETTINGS,
    Place.SETTINGS: Place.REVIEW,
    Place.PRESETS: Place.REVIEW,  # a saved preset opens at the review step
}
"""The wizard's order: where Next leads from each step."""


def screen_class(place: Place) -> type[Screen[Any]]:
    module, _, name = SCREENS[place].partition(":")
    cls: type[Screen[Any]] = getattr(importlib.import_module(module), name)
    return cls


def screen_for(place: Place, *args: Any, **kwargs: Any) -> Screen[Any]:
    """A new screen for `place`, built with the arguments its class takes."""
    return screen_class(place)(*args, **kwargs)


def place_of(screen: Screen[Any]) -> Place | None:
    """The place a screen stands for, or None for dialogs and other screens off the map."""
    return next((place for place in Place if type(screen).__name__ == SCREENS[place].partition(":")[2]
                 and type(screen).__module__ == SCREENS[place].partition(":")[0]), None)


def next_place(place: Place) -> Place:
    return NEXT[place]
