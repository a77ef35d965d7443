"""Before/after evaluation: the base model and the tuned one answer the same held-out examples.

Scores per example and in total: exact match, normalised match (case, punctuation, articles and
spacing ignored: the fair score for short labels such as "positive"), token-level F1 (the fair
score for open answers), and the loss of the reference answer under each model (eval loss). The
report goes to the run directory as Markdown and JSON (`eval/` for the final adapter,
`eval/checkpoint-N/` for a checkpoint); the dashboard shows its summary.
"""

from __future__ import annotations

import math
import re
import string
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunewiz.engine.fileio import atomic_write_json, atomic_write_text
from tunewiz.engine.run.rundir import EVAL_REPORT_NAME, RunDir
from tunewiz.engine.use.heldout import HeldoutExample, heldout_examples
from tunewiz.engine.use.plot import report_link

RESULTS_NAME = "results.json"
REPORT_NAME = EVAL_REPORT_NAME
LABEL_MAX_WORDS = 3  # references this short, from a small set, make a short-label task
LABEL_MAX_DISTINCT = 20
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(answer: str, reference: str) -> float:
    """Overlap of the normalised words of the answer and the reference (harmonic mean of precision and recall)."""
    got, want = normalise(answer).split(), normalise(reference).split()
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def task_kind(references: list[str]) -> str:
    """`label` when every reference is a short word or two from a small set, else `open`."""
    short = all(len(r.split()) <= LABEL_MAX_WORDS for r in references)
    return "label" if short and len({normalise(r) for r in references}) <= LABEL_MAX_DISTINCT else "open"


@dataclass
class Scores:
    """One model's totals."""

    exact: float
    normalised: float
    f1: float
    loss: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"exact": self.exact, "normalised": self.normalised, "f1": self.f1, "loss": self.loss}


@dataclass
class Row:
    """One example, answered by both models."""

    prompt: str
    reference: str
    base: str
    tuned: str

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "reference": self.reference, "base": self.base, "tuned": self.tuned,
                "base_exact": self.base.strip() == self.reference.strip(),
                "tuned_exact": self.tuned.strip() == self.reference.strip(),
                "base_match": normalise(self.base) == normalise(self.reference),
                "tuned_match": normalise(self.tuned) == normalise(self.reference),
                "base_f1": round(token_f1(self.base, self.reference), 4),
                "tuned_f1": round(token_f1(self.tuned, self.reference), 4)}


def score(answers: list[str], references: list[str], loss: float | None) -> Scores:
    n = len(references)
    return Scores(exact=sum(a.strip() == r.strip() for a, r in zip(answers, references)) / n,
                  normalised=sum(normalise(a) == normalise(r) for a, r in zip(answers, references)) / n,
                  f1=sum(token_f1(a, r) for a, r in zip(answers, references)) / n, loss=loss)


@dataclass
class Report:
    """The whole evaluation, as written to the run directory."""

    run_id: str
    checkpoint: int | None
    origin: str
    kind: str
    rows: list[Row]
    base: Scores
    tuned: Scores
    max_new_tokens: int
    device: str
    seconds: float
    path: Path = field(default=Path())

    @property
    def headline(self) -> str:
        """The score that suits the task: normalised match for labels, token F1 for open answers."""
        return "normalised" if self.kind == "label" else "f1"

    def counts(self) -> tuple[int, int, int]:
        """Examples where the tuned model scored better, worse, the same (by the headline score)."""
        better = worse = 0
        for row in self.rows:
            data = row.as_dict()
            b, t = ((float(data["base_match"]), float(data["tuned_match"])) if self.kind == "label"
                    else (data["base_f1"], data["tuned_f1"]))
            better += t > b
            worse += t < b
        return better, worse, len(self.rows) - better - worse

    def to_dict(self) -> dict[str, Any]:
        better, worse, same = self.counts()
        return {"run_id": self.run_id, "checkpoint": self.checkpoint, "origin": self.origin, "task": self.kind,
                "headline": self.headline, "examples": len(self.rows), "base": self.base.as_dict(),
                "tuned": self.tuned.as_dict(), "better": better, "worse": worse, "same": same,
                "max_new_tokens": self.max_new_tokens, "device": self.device, "seconds": round(self.seconds, 1),
                "summary": self.summary_lines(),
                "rows": [row.as_dict() for row in self.rows]}

    def summary_lines(self) -> list[str]:
        better, worse, same = self.counts()
        which = f"checkpoint {self.checkpoint}" if self.checkpoint else "final adapter"
        lines = [f"before/after on {len(self.rows)} examples from {self.origin} ({which}; greedy, up to "
                 f"{self.max_new_tokens} new tokens)",
                 f"{'':<17}{'base':>8}{'tuned':>8}"]
        for key, label in (("exact", "exact match"), ("normalised", "normalised match"), ("f1", "token F1")):
            mark = "  <- the score for this task" if key == self.headline else ""
            lines.append(f"{label:<17}{getattr(self.base, key):>8.2f}{getattr(self.tuned, key):>8.2f}{mark}")
        if self.base.loss is not None and self.tuned.loss is not None:
            lines.append(f"{'eval loss':<17}{self.base.loss:>8.3f}{self.tuned.loss:>8.3f}")
        lines.append(f"the tuned model is better on {better}, worse on {worse}, the same on {same}")
        return lines

    def summary_text(self) -> str:
        return "\n".join(self.summary_lines())

    def markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")[:160]

        out = [f"# Evaluation of run {self.run_id}", "", "```", *self.summary_lines(), "```", "",
               "| # | prompt | reference | base | tuned |", "|---|---|---|---|---|"]
        for index, row in enumerate(self.rows, 1):
            data = row.as_dict()
            marks = (("✓" if data["base_match"] else "✗"), ("✓" if data["tuned_match"] else "✗"))
            out.append(f"| {index} | {cell(row.prompt)} | {cell(row.reference)} | {marks[0]} {cell(row.base)} | "
                       f"{marks[1]} {cell(row.tuned)} |")
        return "\n".join(out) + "\n"


def report_dir(run: RunDir, checkpoint: int | None) -> Path:
    return run.path / "eval" / (f"checkpoint-{checkpoint}" if checkpoint else "")


def latest_summary(run: RunDir) -> dict[str, Any] | None:
    """The stored results of the final adapter's evaluation, if any (torch-free: for the dashboard)."""
    from tunewiz.engine.fileio import read_json

    return read_json(report_dir(run, None) / RESULTS_NAME)


def answer_budget(model: Any, references: list[str]) -> int:
    """New tokens to allow: the longest reference and half again (at least 4 more), at most 1024."""
    longest = max(len(model.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return min(1024, longest + max(4, longest // 2))


def reference_loss(model: Any, examples: list[HeldoutExample], adapter: bool) -> float | None:
    """Mean loss per answer token of the references, as training measures it (prompt masked)."""
    import torch

    from tunewiz.engine.data.formats import Example

    total, tokens = 0.0, 0
    with torch.no_grad(), model._adapter(adapter):
        for example in examples:
            conversation = [*model.conversation(example.messages), {"role": "assistant", "content": example.reference}]
            encoded = model.encoder.encode(Example(tuple((m["role"], m["content"]) for m in conversation)))
            count = encoded.supervised
            if count == 0:
                continue
            ids = torch.tensor([encoded.input_ids], device=model.device)
            labels = torch.tensor([encoded.labels], device=model.device)
            loss = model.model(input_ids=ids, labels=labels).loss
            total += float(loss) * count
            tokens += count
    return total / tokens if tokens and math.isfinite(total) else None


def evaluate_run(run: RunDir, checkpoint: int | None = None, data_file: Path | None = None, limit: int | None = None,
                 max_new_tokens: int | None = None, on_progress: Callable[[str], None] | None = None,
                 model: Any = None) -> Report:
    """Answer the held-out examples with both models, score them and write the report."""
    from tunewiz.engine.use.inference import RunModel

    say = on_progress or (lambda _msg: None)
    heldout = heldout_examples(run, limit, data_file)
    started = time.monotonic()
    loaded = model or RunModel(run, checkpoint, on_progress=say)
    examples = heldout.examples
    references = [e.reference for e in examples]
    budget = max_new_tokens or answer_budget(loaded, references)
    answers: dict[bool, list[str]] = {}
    for adapter in (False, True):
        side = "tuned" if adapter else "base"
        answers[adapter] = []
        for index, example in enumerate(examples, 1):
            if index == 1 or index % 10 == 0 or index == len(examples):
                say(f"{side} model: answering {index}/{len(examples)}")
            answers[adapter].append(loaded.answers([example.messages], budget, adapter=adapter)[0])
    say("measuring the loss of the reference answers")
    losses = {adapter: reference_loss(loaded, examples, adapter) for adapter in (False, True)}
    rows = [Row(e.last_user, e.reference, base, tuned)
            for e, base, tuned in zip(examples, answers[False], answers[True])]
    report = Report(run.run_id, loaded.checkpoint, heldout.origin, task_kind(references), rows,
                    score(answers[False], references, losses[False]), score(answers[True], references, losses[True]),
                    budget, loaded.device, time.monotonic() - started)
    folder = report_dir(run, loaded.checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / RESULTS_NAME, report.to_dict())
    atomic_write_text(folder / REPORT_NAME, report.markdown() + report_link(run, folder))  # `tunewiz plot`'s chart
    report.path = folder / REPORT_NAME
    return report
