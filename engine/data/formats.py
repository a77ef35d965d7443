"""Row formats: detect which one a dataset uses and turn each row into a conversation or plain text.

Formats and the fields they need (rename your columns onto these with `dataset.columns`):
  messages           messages: [{role, content}, ...] (optional: system)
  sharegpt           conversations: [{from, value}, ...] (optional: system)
  alpaca             instruction, output (optional: input, system)
  prompt_completion  prompt, completion (strings, or lists of messages)
  preference         prompt, chosen, rejected (preference pairs: strings, or lists of messages; when chosen
                     and rejected are whole conversations, the prompt is the turns they share)
  text               text (trained on every token, no chat template)

A field holding labels (e.g. integers) is turned into text with `label_names`: {field: {raw value: text}}.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

RowFormat = Literal["messages", "sharegpt", "alpaca", "preference", "prompt_completion", "text"]
"""The row formats, by name: the one list the spec (`dataset.format`), the checker and the app accept."""
DataFormat = Literal["auto", RowFormat]
"""What `dataset.format` may say: a row format, or `auto` to detect it from the columns."""
FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "preference": ("chosen", "rejected"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
"""Each format's required fields, in the order detection tries them (tests hold its keys to RowFormat)."""
OPTIONAL_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("input", "system"), "messages": ("system",), "sharegpt": ("system",),
    "preference": ("prompt", "system")}
"""Fields a format also reads when a row has them."""
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "system": "system"}


class RowProblem(ValueError):
    """Why one row cannot be used; `kind` groups problems in reports."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Example:
    """A normalised row: a conversation (list of role/content) or a plain text. A preference pair is the
    conversation ending with the chosen answer, and the rejected answer in its place."""

    messages: tuple[tuple[str, str], ...] = ()
    text: str | None = None
    rejected: str | None = None

    @property
    def is_chat(self) -> bool:
        return self.text is None

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


def _mapped(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """The row with its columns renamed onto the format's field names."""
    renamed = dict(row)
    for field_name, column in columns.items():
        if column in row:
            renamed[field_name] = row[column]
    return renamed


def format_hint(found: list[str]) -> str:
    wanted = "; ".join(f"{name} ({', '.join(fields)})" for name, fields in FORMATS.items())
    return (f"columns found: {', '.join(found) or 'none'}. Known formats and the columns they need: {wanted}. "
            "Map your columns with dataset.columns, e.g. { instruction = \"question\", output = \"answer\" }")


def detect(row: Mapping[str, Any], columns: Mapping[str, str]) -> str | None:
    """The format whose required fields this row has (after mapping), or None."""
    mapped = _mapped(row, columns)
    for name, fields in FORMATS.items():
        if all(f in mapped for f in fields):
            return name
    return None


def _text(value: Any, field_name: str, required: bool = True) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RowProblem("empty_field", f"field {field_name!r} is empty")
        return ""
    if not isinstance(value, str):
        raise RowProblem("non_string", f"field {field_name!r} is a {type(value).__name__}, not text")
    return value


def _turns(items: Any, field_name: str, role_key: str, content_key: str, role_map: Mapping[str, str] | None
           ) -> list[tuple[str, str]]:
    if not isinstance(items, list):
        raise RowProblem("non_string", f"field {field_name!r} is a {type(items).__name__}, not a list of turns")
    if not items:
        raise RowProblem("empty_field", f"field {field_name!r} is an empty conversation")
    turns = []
    for position, turn in enumerate(items, start=1):
        if not isinstance(turn, Mapping):
            raise RowProblem("non_string", f"turn {position} of {field_name!r} is not an object")
        if role_key not in turn or content_key not in turn:
            raise RowProblem("missing_field", f"turn {position} of {field_name!r} lacks "
                                              f"{role_key!r} or {content_key!r} (has {', '.join(map(str, turn))})")
        raw_role = turn[role_key]
        role = (role_map or {r: r for r in ROLES}).get(str(raw_role).lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RowProblem("unknown_role", f"turn {position} has unknown role {raw_role!r} "
                                             f"(allowed: {', '.join(role_map or ROLES)})")
        content = turn[content_key]
        if not isinstance(content, str):
            raise RowProblem("non_string", f"turn {position} content is a {type(content).__name__}, not text")
        if not content.strip():
            raise RowProblem("empty_field", f"turn {position} ({role}) is empty")
        turns.append((role, content))
    return turns


def _answer_side(value: Any, name: str, role_key: str, content_key: str) -> list[tuple[str, str]]:
    """One side of a preference pair as turns: a string is the assistant's answer."""
    last = value[-1] if isinstance(value, list) and value else None
    content = last.get(content_key) if isinstance(last, Mapping) else value
    if value is None or (isinstance(content, str) and not content.strip()):
        raise RowProblem("empty_answer", f"the {name} answer is empty")
    if isinstance(value, list):
        return _turns(value, name, role_key, content_key, None)
    return [("assistant", _text(value, name))]


def _preference(mapped: dict[str, Any], role_key: str, content_key: str) -> tuple[list[tuple[str, str]], str]:
    """(the conversation ending with the chosen answer, the rejected answer)."""
    chosen = _answer_side(mapped["chosen"], "chosen", role_key, content_key)
    rejected = _answer_side(mapped["rejected"], "rejected", role_key, content_key)
    if all(role == "assistant" for role, _ in chosen + rejected):  # answers only: the prompt is its own field
        prompt = mapped.get("prompt")
        if prompt is None:
            raise RowProblem("missing_field", "no prompt: chosen and rejected are answers only, so the row needs "
                                              "a prompt field (map it with dataset.columns, e.g. "
                                              "{ prompt = \"question\" })")
        prompt_turns = (_turns(prompt, "prompt", role_key, content_key, None) if isinstance(prompt, list)
                        else [("user", _text(prompt, "prompt"))])
        chosen, rejected = prompt_turns + chosen, prompt_turns + rejected
    if chosen[:-1] != rejected[:-1]:
        turn = next((i for i, (a, b) in enumerate(zip(chosen, rejected), start=1) if a != b),
                    min(len(chosen), len(rejected)))
        raise RowProblem("prompts_differ", f"chosen and rejected must share everything but their last answer; "
                                           f"they differ at turn {turn}")
    if rejected[-1][0] != "assistant":
        raise RowProblem("not_ending_with_assistant", "the rejected side does not end with an assistant answer")
    if chosen[-1][1].strip() == rejected[-1][1].strip():
        raise RowProblem("same_answers", "chosen and rejected answers are the same, so there is no preference "
                                         "to learn")
    return chosen, rejected[-1][1]


def _check_conversation(turns: list[tuple[str, str]]) -> None:
    if not any(role == "assistant" for role, _ in turns):
        raise RowProblem("no_assistant", "the conversation has no assistant turn, so nothing would be learned")
    if turns[-1][0] != "assistant":
        raise RowProblem("not_ending_with_assistant", f"the conversation ends with a {turns[-1][0]} turn, "
                                                      "not an assistant turn")
    if any(role == "system" for role, _ in turns[1:]):
        raise RowProblem("misplaced_system", "a system message may only come first")


def _apply_label_names(mapped: dict[str, Any], label_names: Mapping[str, Mapping[str, str]]) -> None:
    """Replace label values (e.g. 0, 1, 2) by their names; values that already are names stay."""
    for field_name, names in label_names.items():
        if field_name not in mapped or mapped[field_name] in names.values():
            continue
        raw = mapped[field_name]
        key = str(raw).lower() if isinstance(raw, bool) else str(raw)
        if key not in names:
            raise RowProblem("unknown_label", f"field {field_name!r} has the value {raw!r}, which is not a known label "
                                              f"({', '.join(f'{k}={v}' for k, v in names.items())})")
        mapped[field_name] = names[key]


def normalise(row: Any, fmt: str, columns: Mapping[str, str], system_prompt: str | None = None,
              label_names: Mapping[str, Mapping[str, str]] | None = None) -> Example:
    """Turn one raw row into an Example, or raise RowProblem saying what is wrong with it."""
    if not isinstance(row, Mapping):
        raise RowProblem("not_object", f"the row is a JSON {type(row).__name__}, not an object")
    mapped = _mapped(row, columns)
    _apply_label_names(mapped, label_names or {})
    missing = [f for f in FORMATS[fmt] if f not in mapped]
    if missing:
        raise RowProblem("missing_field", f"missing field(s) {', '.join(missing)} for format {fmt}; "
                                          f"columns here: {', '.join(map(str, row)) or 'none'}")
    role_key, content_key = columns.get("role", "role"), columns.get("content", "content")
    rejected = None
    if fmt == "text":
        return Example(text=_text(mapped["text"], "text"))
    if fmt == "messages":
        turns = _turns(mapped["messages"], "messages", role_key, content_key, None)
    elif fmt == "sharegpt":
        turns = _turns(mapped["conversations"], "conversations", columns.get("from", "from"),
                       columns.get("value", "value"), SHAREGPT_ROLES)
    elif fmt == "preference":
        turns, rejected = _preference(mapped, role_key, content_key)
    elif fmt == "alpaca":
        instruction = _text(mapped["instruction"], "instruction")
        extra = _text(mapped.get("input"), "input", required=False)
        turns = [("user", f"{instruction}\n\n{extra}" if extra else instruction),
                 ("assistant", _text(mapped["output"], "output"))]
    else:  # prompt_completion
        prompt, completion = mapped["prompt"], mapped["completion"]
        prompt_turns = (_turns(prompt, "prompt", role_key, content_key, None) if isinstance(prompt, list)
                        else [("user", _text(prompt, "prompt"))])
        completion_turns = (_turns(completion, "completion", role_key, content_key, None)
                            if isinstance(completion, list) else [("assistant", _text(completion, "completion"))])
        turns = prompt_turns + completion_turns
    if fmt != "prompt_completion":  # a `system` column of the row (alpaca, messages, sharegpt)
        system = _text(mapped.get("system"), "system", required=False)
        if system and turns[0][0] != "system":
            turns.insert(0, ("system", system))
    _check_conversation(turns)
    if system_prompt and turns[0][0] != "system":
        turns.insert(0, ("system", system_prompt))
    return Example(messages=tuple(turns), rejected=rejected)
