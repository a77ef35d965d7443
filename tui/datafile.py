"""A quick look at a local data file's first row: its columns and the format they suggest (no tokenizer)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from tunewiz.engine.data.formats import FORMATS, OPTIONAL_FIELDS, detect

MAX_JSON_BYTES = 64 << 20  # a .json file is one document; larger ones are left to the checker


@dataclass(frozen=True)
class Peek:
    """What the first row says."""

    columns: tuple[str, ...] = ()
    detected: str | None = None
    error: str | None = None


GUESSES = {
    "instruction": ("instruction", "question", "prompt", "query", "input", "q", "text_input", "user"),
    "output": ("output", "answer", "response", "completion", "target", "a", "reply", "assistant"),
}
"""Column names that mean a field, best first."""
CUES = {
    "instruction": ("question", "prompt", "query", "instruction", "message", "request", "customer", "user", "input"),
    "output": ("answer", "response", "reply", "completion", "output", "agent", "assistant", "target", "solution"),
}
"""Words inside column names that hint at a field (`customer_message` -> instruction, `agent_reply` -> output)."""


def guess_mapping(columns: tuple[str, ...]) -> dict[str, str] | None:
    """For columns no format knows: an alpaca mapping when a question-like and an answer-like column exist (by
    name, else by a word in the name)."""
    lower = {c.lower(): c for c in columns}
    found: dict[str, str] = {}
    for field_name in GUESSES:
        exact = [lower[name] for name in GUESSES[field_name] if name in lower]
        cued = [column for cue in CUES[field_name] for low, column in lower.items() if cue in low]
        chosen = next((c for c in (*exact, *cued) if c not in found.values()), None)
        if chosen is not None:
            found[field_name] = chosen
    return found if len(found) == 2 else None


def format_fields_text() -> str:
    """What each format reads, for a user mapping their own columns."""
    parts = []
    for fmt, required in FORMATS.items():
        optional = OPTIONAL_FIELDS.get(fmt, ())
        parts.append(f"{fmt}: {', '.join(required)}" + (f" (optional: {', '.join(optional)})" if optional else ""))
    return "Each format reads these fields: " + "; ".join(parts) + "."


def fields_of(fmt: str) -> tuple[str, ...]:
    """The fields a format reads: required ones first, then optional ones."""
    return FORMATS.get(fmt, ()) + OPTIONAL_FIELDS.get(fmt, ())


def peek(source: str, columns: dict[str, str] | None = None) -> Peek:
    """Columns of a local .jsonl/.json/.csv file's first row and the detected format; hub ids are not read."""
    path = Path(source).expanduser()
    if not path.is_file():
        return Peek(error=None if "/" in source and not path.suffix else f"no file at {path}")
    suffix = path.suffix.lower()
    try:
        row: object = None
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        row = json.loads(line)
                        break
        elif suffix == ".json":
            if path.stat().st_size > MAX_JSON_BYTES:
                return Peek()
            data = json.loads(path.read_text(encoding="utf-8"))
            row = data[0] if isinstance(data, list) and data else data
        elif suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as handle:
                row = dict.fromkeys(next(csv.reader(handle), []), "")
        else:
            return Peek()
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return Peek(error=f"cannot read the first row: {exc}")
    if not isinstance(row, dict):
        return Peek(error="the first row is not an object with named columns")
    return Peek(tuple(str(k) for k in row), detect(row, columns or {}))
