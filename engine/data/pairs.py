"""Preference pairs for `training.objective = "dpo" | "orpo"`: encoding a pair with the chat template and the
pipeline that reads, splits and encodes a preference dataset.

A pair is encoded as two conversations, one ending with the chosen answer and one with the rejected
one, by the same encoder as supervised data (engine/data/chat.py), so the same tokens count: the
last answer with its end-of-turn token. The prompt is what the two share before their answers.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.data import sources
from tunewiz.engine.data.chat import IGNORE_INDEX, ChatEncoder, Encoded, resolve_template
from tunewiz.engine.data.formats import Example, RowProblem
from tunewiz.engine.data.prepare import (
    MAX_REPORTED_PROBLEMS,
    SamplePrompt,
    _fingerprint,
    percentiles,
    read_examples,
    sample_prompts_for,
    split_examples,
)
from tunewiz.engine.errors import DataError


@dataclass
class EncodedPair:
    """Token ids of a prompt and of its chosen and rejected answers (each answer ends with its stop token)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def as_row(self) -> dict[str, list[int]]:
        """The columns trl's preference trainers read."""
        return {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids, "rejected_ids": self.rejected_ids}

    @property
    def longest(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def _last_answer(encoded: Encoded) -> tuple[int, int]:
    """(start, end) of the last run of trained tokens: the final answer."""
    labelled = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    if not labelled:
        raise RowProblem("no_supervised_tokens", "no answer token survives the chat template")
    end = start = labelled[-1] + 1
    while start > 0 and encoded.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def encode_pair(encoder: ChatEncoder, example: Example) -> EncodedPair:
    """The pair's prompt and answer tokens; raises RowProblem when the template leaves no answer."""
    if example.rejected is None:
        raise RowProblem("not_a_pair", "the row has no rejected answer")
    rejected_example = dataclasses.replace(example, messages=example.messages[:-1] + (("assistant", example.rejected),),
                                           rejected=None)
    chosen, rejected = encoder.encode(dataclasses.replace(example, rejected=None)), encoder.encode(rejected_example)
    (chosen_start, chosen_end), (rejected_start, rejected_end) = _last_answer(chosen), _last_answer(rejected)
    shared = 0  # tokens can merge across the prompt/answer boundary: the prompt is what both really share
    limit = min(chosen_start, rejected_start)
    while shared < limit and chosen.input_ids[shared] == rejected.input_ids[shared]:
        shared += 1
    return EncodedPair(chosen.input_ids[:shared], chosen.input_ids[shared:chosen_end],
                       rejected.input_ids[shared:rejected_end])


def trim_pair(pair: EncodedPair, limit: int) -> tuple[EncodedPair, bool, str | None]:
    """The pair with each answer cut so that prompt + answer fits `limit`, whether anything was cut, and why it
    cannot be trained on (`truncated_before_answer` when the prompt alone fills the limit) or None."""
    room = limit - len(pair.prompt_ids)
    if room <= 0:
        return pair, False, "truncated_before_answer"
    if max(len(pair.chosen_ids), len(pair.rejected_ids)) <= room:
        return pair, False, None
    return EncodedPair(pair.prompt_ids, pair.chosen_ids[:room], pair.rejected_ids[:room]), True, None


@dataclass
class PreparedPairs:
    """Encoded train/eval pairs, sample prompts and the accounting of every row (the fields a run reads from
    engine/data/prepare.PreparedData, with pairs for examples)."""

    train: list[EncodedPair]
    eval: list[EncodedPair]
    samples: list[SamplePrompt]
    stats: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


def require_pairs(fmt: str, label: str, objective: str) -> None:
    """Preference objectives need preference data: say so plainly when the data is something else."""
    if fmt != "preference":
        raise DataError(f"training.objective = {objective!r} learns from preference pairs, and {label} is {fmt} data "
                        "(one answer per prompt)",
                        hint="use preference data (prompt, chosen, rejected; see `tunewiz datasets`), or set "
                             "training.objective = \"sft\" to learn from these answers")


def prepare_pairs(spec: RunSpec, tokenizer: Any, stop_ids: list[int] | None = None) -> PreparedPairs:
    """Read, split, encode and trim the spec's preference data, accounting for every row that is dropped.

    Not cached like supervised data: pairs are few and encoding them takes seconds."""
    source = sources.resolve(spec.dataset)
    template = resolve_template(spec.dataset.chat_template, tokenizer)
    encoder = ChatEncoder(tokenizer, template)
    encoder.add_stop_ids(stop_ids or [])
    examples, fmt, problems, problem_messages, rows = read_examples(source, spec.dataset.system_prompt)
    require_pairs(fmt, source.label, spec.training.objective)
    train_rows, eval_rows = split_examples(spec, examples)
    limit = spec.training.max_seq_length
    dropped: Counter[str] = Counter(problems)
    truncated = 0
    lengths: list[int] = []
    answers: dict[str, list[int]] = {"chosen": [], "rejected": []}

    def encode_all(items: list[Example]) -> list[EncodedPair]:
        nonlocal truncated
        out = []
        for example in items:
            try:
                pair = encode_pair(encoder, example)
            except DataError:
                raise
            except Exception as exc:  # noqa: BLE001 - a template may raise anything (jinja's raise_exception)
                kind = exc.kind if isinstance(exc, RowProblem) else "template_error"
                dropped[kind] += 1
                if len(problem_messages) < MAX_REPORTED_PROBLEMS:
                    problem_messages.append(f"a {len(example.messages)}-turn pair: {exc}")
                continue
            lengths.append(pair.longest)
            answers["chosen"].append(len(pair.chosen_ids))
            answers["rejected"].append(len(pair.rejected_ids))
            cut, was_cut, reason = trim_pair(pair, limit)
            truncated += was_cut
            if reason:
                dropped[reason] += 1
                continue
            out.append(cut)
        return out

    train, evaluation = encode_all(train_rows), encode_all(eval_rows)
    if not train:
        raise DataError(f"no trainable preference pairs in {source.label}: {dict(dropped)}",
                        hint=f"`tunewiz data check` lists each row's problem; with training.max_seq_length = {limit} "
                             f"the longest pair needs {max(lengths, default=0)} tokens")
    samples = sample_prompts_for(spec, source, fmt, eval_rows, train_rows)
    stats = {
        "source": source.label, "format": fmt, "objective": spec.training.objective, "rows_read": rows,
        "examples": len(train_rows) + len(eval_rows), "train_examples": len(train), "eval_examples": len(evaluation),
        "dropped": dict(dropped), "dropped_total": sum(dropped.values()), "problems": problem_messages,
        "truncated": truncated, "max_seq_length": limit, "token_lengths": percentiles(lengths),
        "answer_lengths": {side: percentiles(values) for side, values in answers.items()},
        "supervised_tokens": sum(len(p.chosen_ids) + len(p.rejected_ids) for p in train),
        "train_tokens": sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in train),
    }
    return PreparedPairs(train, evaluation, samples, stats, _fingerprint(spec, source, encoder))
