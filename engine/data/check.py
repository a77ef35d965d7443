"""Checking a dataset before training: every row's problems with its line, the token lengths under a
model's chat template, what the maximum sequence length cuts, how many tokens are trained on, and one
example rendered with its trained tokens marked.

It streams through the same reader and encoder as training and keeps only counters, a fixed-size
sample of lengths and an 8-byte hash per example (for duplicates), so a file of any size fits in memory.
"""

from __future__ import annotations

import hashlib
import random
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunewiz.engine.data import sources
from tunewiz.engine.data.chat import IGNORE_INDEX, ChatEncoder, Encoded
from tunewiz.engine.data.formats import Example, RowProblem
from tunewiz.engine.data.pairs import encode_pair
from tunewiz.engine.data.prepare import ExampleReader, percentiles, trim
from tunewiz.engine.errors import DataError

LISTED_PROBLEMS = 1000  # problems kept with their line; the counts always cover every row
LENGTH_SAMPLE = 200_000  # lengths kept for percentiles (exact below this many examples)
WARNINGS = frozenset({"duplicate"})  # problems that do not stop a row from being trained on

Progress = Callable[[int, int], None]  # (bytes read, total bytes; 0 when unknown)


@dataclass
class Problem:
    """One row's problem."""

    line: int
    where: str
    kind: str
    message: str


@dataclass
class Segment:
    """A run of rendered text, trained on or not."""

    text: str
    trained: bool


@dataclass
class CheckReport:
    """What `check` found; `to_dict()` is the JSON form."""

    source: str
    model: str
    max_seq_length: int
    format: str = "auto"
    rows: int = 0
    examples: int = 0  # rows that would be trained on
    problem_counts: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)  # the first LISTED_PROBLEMS, in file order
    token_lengths: dict[str, float] = field(default_factory=dict)
    truncated: int = 0  # examples longer than max_seq_length
    supervised_tokens: int = 0  # trained tokens after truncation
    supervised_tokens_cut: int = 0  # trained tokens lost to truncation
    tokens: int = 0  # all tokens after truncation
    answer_lengths: dict[str, dict[str, float]] = field(default_factory=dict)  # preference data: chosen/rejected
    example: list[Segment] = field(default_factory=list)
    example_where: str = ""
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def skipped(self) -> int:
        """Rows that training would skip."""
        return sum(n for kind, n in self.problem_counts.items() if kind not in WARNINGS)

    @property
    def ok(self) -> bool:
        return not self.problem_counts

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped": self.skipped, "ok": self.ok}


class _Lengths:
    """Token lengths: exact count, mean and extremes, and a reservoir sample for the percentiles."""

    def __init__(self, size: int = LENGTH_SAMPLE) -> None:
        self.size, self.count, self.total = size, 0, 0
        self.low: int | None = None
        self.high = 0
        self.sample = array("I")
        self.rng = random.Random(0)

    def add(self, value: int) -> None:
        self.count += 1
        self.total += value
        self.high = max(self.high, value)
        self.low = value if self.low is None else min(self.low, value)
        if len(self.sample) < self.size:
            self.sample.append(value)
        else:
            slot = self.rng.randrange(self.count)
            if slot < self.size:
                self.sample[slot] = value

    def summary(self) -> dict[str, float]:
        if not self.count:
            return {}
        result: dict[str, float] = dict(percentiles(list(self.sample)))
        result.update(min=self.low or 0, max=self.high, mean=round(self.total / self.count, 1))
        return result


def _digest(example: Example) -> int:
    """An 8-byte hash of the normalised example (what training would see)."""
    text = example.text if example.text is not None else "\x1e".join(f"{r}\x1f{c}" for r, c in example.messages)
    if example.rejected is not None:
        text += f"\x1d{example.rejected}"
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def segments(tokenizer: Any, encoded: Encoded) -> list[Segment]:
    """The encoded example as runs of text, each marked trained or not."""
    runs: list[Segment] = []
    start = 0
    for index in range(1, len(encoded.labels) + 1):
        if index == len(encoded.labels) or ((encoded.labels[index] == IGNORE_INDEX)
                                            != (encoded.labels[start] == IGNORE_INDEX)):
            text = tokenizer.decode(encoded.input_ids[start:index])
            runs.append(Segment(text, encoded.labels[start] != IGNORE_INDEX))
            start = index
    return runs


class _Checker:
    """Accumulates one report while rows stream past."""

    def __init__(self, report: CheckReport, encoder: ChatEncoder) -> None:
        self.report, self.encoder = report, encoder
        self.counts: Counter[str] = Counter()
        self.seen: set[int] = set()
        self.lengths = _Lengths()
        self.answers = {"chosen": _Lengths(), "rejected": _Lengths()}

    def problem(self, row: sources.Row, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if len(self.report.problems) < LISTED_PROBLEMS:
            self.report.problems.append(Problem(row.line, row.where, kind, message))

    def add(self, row: sources.Row, item: Example | RowProblem) -> None:
        if isinstance(item, RowProblem):
            self.problem(row, item.kind, str(item))
            return
        digest = _digest(item)
        if digest in self.seen:
            self.problem(row, "duplicate", "exact duplicate of an earlier example")
        self.seen.add(digest)
        try:
            encoded = self.encoder.encode(item)
            longest = self.add_pair(item) if item.rejected is not None else len(encoded.input_ids)
        except RowProblem as problem:
            self.problem(row, problem.kind, str(problem))
            return
        except Exception as exc:  # noqa: BLE001 - a template may raise anything (jinja's raise_exception)
            if isinstance(exc, DataError):
                raise
            self.problem(row, "template_error", f"the chat template cannot render this row: {exc}")
            return
        self.lengths.add(longest)
        cut, was_cut, reason = trim(encoded, self.report.max_seq_length)
        self.report.truncated += was_cut or longest > self.report.max_seq_length
        if reason == "no_supervised_tokens":
            self.problem(row, reason, "no token of this example is trained on (no assistant answer survives "
                                      "the chat template)")
            return
        if reason == "truncated_before_answer":
            self.problem(row, reason, f"the first {self.report.max_seq_length} tokens end before the answer "
                                      f"starts (the example has {len(encoded.input_ids)} tokens)")
            return
        self.report.examples += 1
        self.report.supervised_tokens += cut.supervised
        self.report.supervised_tokens_cut += encoded.supervised - cut.supervised
        self.report.tokens += len(cut.input_ids)
        if not self.report.example:
            self.report.example = segments(self.encoder.tokenizer, cut)
            self.report.example_where = row.where

    def add_pair(self, example: Example) -> int:
        """Count a preference pair's answer lengths; returns its length in tokens (the prompt with the longer
        answer). The trained-token counts stay those of its chosen side, which is what SFT on it would learn."""
        pair = encode_pair(self.encoder, example)
        self.answers["chosen"].add(len(pair.chosen_ids))
        self.answers["rejected"].add(len(pair.rejected_ids))
        return pair.longest


def check(source: sources.DataSource, encoder: ChatEncoder, max_seq_length: int, model: str = "",
          system_prompt: str | None = None, limit: int | None = None,
          on_progress: Progress | None = None) -> CheckReport:
    """Check every row of `source` (or the first `limit`) as training would read it.

    Raises DataError for what stops everything (an unreadable file, a format that cannot be detected).
    """
    started = time.monotonic()
    report = CheckReport(source=source.label, model=model, max_seq_length=max_seq_length)
    reader = ExampleReader(source, system_prompt)
    checker = _Checker(report, encoder)
    total = Path(source.location).stat().st_size if source.kind == "file" else 0
    step = max(total // 100, 1)
    reported = 0
    for row, item in reader:
        report.rows += 1
        checker.add(row, item)
        report.bytes_read = row.offset
        if on_progress and row.offset - reported >= step:
            reported = row.offset
            on_progress(row.offset, total)
        if limit and report.rows >= limit:
            break
    if report.rows == 0:
        raise DataError(f"{source.label} has no rows", hint="add examples, one JSON object per line")
    if on_progress:
        on_progress(report.bytes_read, total)
    report.format = reader.format
    report.problem_counts = dict(checker.counts.most_common())
    report.token_lengths = checker.lengths.summary()
    report.answer_lengths = {side: lengths.summary() for side, lengths in checker.answers.items() if lengths.count}
    report.seconds = round(time.monotonic() - started, 2)
    return report
