"""The held-out conversations of a run: what evaluation and export verification ask the model.

"Held out" means rows the trainer never saw: the dataset's own held-out file when its preset ships
one (the demo does), else the run's eval split, drawn with the same seed as the trainer's. Any other
file in a supported format can stand in (`tunewiz eval RUN --data FILE`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tunewiz.engine.data import sources
from tunewiz.engine.data.formats import Example
from tunewiz.engine.data.prepare import read_examples, split_examples
from tunewiz.engine.errors import DataError
from tunewiz.engine.run.rundir import RunDir


@dataclass(frozen=True)
class HeldoutExample:
    """A conversation up to its last answer, and that answer (the reference)."""

    messages: list[dict[str, str]]
    reference: str

    @property
    def last_user(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


@dataclass(frozen=True)
class Heldout:
    """The examples and where they came from, in words for reports."""

    examples: list[HeldoutExample]
    origin: str


def _answerable(examples: list[Example]) -> list[HeldoutExample]:
    """Conversations that end with an assistant answer, split into prompt and reference."""
    return [HeldoutExample([{"role": r, "content": c} for r, c in example.messages[:-1]], example.messages[-1][1])
            for example in examples
            if example.is_chat and len(example.messages) > 1 and example.messages[-1][0] == "assistant"]


def system_prompt(run: RunDir) -> str | None:
    """The system message the run trained with: the spec's own, else its dataset preset's."""
    spec = run.load_spec()
    if spec.dataset.system_prompt:
        return spec.dataset.system_prompt
    try:
        return sources.resolve(spec.dataset).system_prompt
    except DataError:
        return None


def heldout_examples(run: RunDir, limit: int | None = None, data_file: Path | None = None) -> Heldout:
    """The run's held-out examples (at most `limit`), or those of `data_file`."""
    spec = run.load_spec()
    if data_file is not None:
        dataset = dataclasses.replace(spec.dataset, preset=None, source=str(data_file), subset=None, split="train",
                                      format="auto")
        source = sources.resolve(dataset)
        rows, *_ = read_examples(dataclasses.replace(source, system_prompt=system_prompt(run)),
                                 spec.dataset.system_prompt)
        found, origin = _answerable(rows), str(data_file)
    else:
        source = sources.resolve(spec.dataset)
        if source.heldout:
            heldout_source = dataclasses.replace(source, kind="file", location=source.heldout, heldout=None)
            rows, *_ = read_examples(heldout_source, spec.dataset.system_prompt)
            found, origin = _answerable(rows), f"the dataset's held-out file ({Path(source.heldout).name})"
        else:
            rows, *_ = read_examples(source, spec.dataset.system_prompt)
            _train, evaluation = split_examples(spec, rows)
            found, origin = _answerable(evaluation), "the run's eval split"
    if not found:
        raise DataError(f"{origin} has no conversations that end with an answer to compare against",
                        hint="pass a file of conversations or instruction/output rows: --data FILE"
                        if data_file is None else "each row needs a prompt and its expected answer")
    return Heldout(found[:limit] if limit else found, origin)
