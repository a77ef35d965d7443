"""Messages that workers post; `@on` handlers on the App and screens turn them into state and widgets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message

from tunewiz.tui.wizard import CheckResult


@dataclass
class HardwareProbed(Message):
    """The probe and the recommender answered."""

    report: Any
    recommendation: Any
    recommend_error: str | None = None
    recommendation_one: Any = None
    """The advice for one GPU, where `recommendation` trains on several."""


@dataclass
class ModelEstimated(Message):
    """A typed-in model was estimated (`choice`), or could not be (`error`, `hint`)."""

    name: str
    choice: Any = None
    error: str | None = None
    hint: str | None = None
    choice_one: Any = None
    """The estimate for one GPU, where `choice` trains on several."""


@dataclass
class ReviewEstimated(Message):
    """The memory estimate for the spec on the review step."""

    choice: Any


@dataclass
class DataChecked(Message):
    """A data check finished (its report or its error)."""

    result: CheckResult


@dataclass
class RunLaunched(Message):
    """The engine started on a new run directory."""

    run: Any  # tunewiz.engine.run.rundir.RunDir


@dataclass
class RunsListed(Message):
    """The past runs, newest first, each with its status summary."""

    rows: list[dict[str, Any]]


@dataclass
class DataFilePeeked(Message):
    """The first row of a local data file was read (tunewiz.tui.datafile.Peek)."""

    source: str
    peek: Any


@dataclass
class RunSnapshot(Message):
    """A fresh picture of the followed run (tunewiz.tui.runmodel.RunView); a newer one replaces an unhandled one."""

    view: Any
    engine_log: str | None = None
    """The last lines of engine.log, read once the engine has ended badly (failed or dead)."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, RunSnapshot)


@dataclass
class RunActionDone(Message):
    """A stop, resume or export that ran in a worker has finished (`error` when it failed)."""

    action: str
    run_id: str
    result: str | None = None
    error: str | None = None
    hint: str | None = None


@dataclass
class ChatReply(Message):
    """A line from the chat process (engine/use/chat_server.py): loading, ready, token, done or error;
    `ended` when the process is gone."""

    type: str
    data: dict[str, Any]
