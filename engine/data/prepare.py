"""The data pipeline shared by training, preflight and `tunewiz data check`: read, normalise, split,
encode with the chat template, mask labels, truncate, and account for every row that is dropped."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunewiz.engine import locations
from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.data import formats, sources
from tunewiz.engine.data.chat import IGNORE_INDEX, ChatEncoder, Encoded, resolve_template
from tunewiz.engine.data.formats import Example, RowProblem
from tunewiz.engine.errors import DataError

CACHE_VERSION = 2
MAX_REPORTED_PROBLEMS = 20


@dataclass(frozen=True)
class SamplePrompt:
    """A fixed prompt answered during training, with the dataset's own answer for comparison."""

    messages: tuple[tuple[str, str], ...]
    reference: str

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    @property
    def last_user(self) -> str:
        return next((c for r, c in reversed(self.messages) if r == "user"), "")


@dataclass
class PreparedData:
    """Encoded train/eval examples, sample prompts and the accounting of what happened to each row."""

    train: list[Encoded]
    eval: list[Encoded]
    samples: list[SamplePrompt]
    stats: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


def percentiles(values: list[int], points: tuple[int, ...] = (50, 90, 99)) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)
    result = {f"p{p}": ordered[min(len(ordered) - 1, (len(ordered) * p) // 100)] for p in points}
    result.update(min=ordered[0], max=ordered[-1])
    return result


class ExampleReader:
    """Streams a source's rows as (row, Example or RowProblem), one at a time.

    The format is detected on the first row that is an object (unless the source names one) and is
    then in `format`; a row that is not JSON comes out as an `invalid_json` or `undecodable` problem.
    """

    def __init__(self, source: sources.DataSource, system_prompt: str | None = None) -> None:
        self.source = source
        self.format = source.format
        self.system_prompt = system_prompt or source.system_prompt
        self.columns = dict(source.columns)

    def __iter__(self) -> Iterator[tuple[sources.Row, Example | RowProblem]]:
        for row in sources.iter_rows(self.source):
            yield row, self._normalise(row)

    def _normalise(self, row: sources.Row) -> Example | RowProblem:
        if isinstance(row.data, sources.BadLine):
            return RowProblem("invalid_json" if "JSON" in row.data.reason else "undecodable", row.data.reason)
        if self.format == "auto" and isinstance(row.data, dict):
            detected = formats.detect(row.data, self.columns)
            if detected is None:
                raise DataError(f"{row.where}: cannot tell the data format", hint=formats.format_hint(list(row.data)))
            self.format = detected
        try:
            if self.format == "auto":
                raise RowProblem("not_object", f"the row is a JSON {type(row.data).__name__}, not an object")
            return formats.normalise(row.data, self.format, self.columns, self.system_prompt,
                                     self.source.label_names)
        except RowProblem as problem:
            return problem


def read_examples(source: sources.DataSource, system_prompt: str | None = None, strict: bool = True
                  ) -> tuple[list[Example], str, Counter[str], list[str], int]:
    """All usable rows of `source` as Examples, the format, and the problems of the rest.

    A line that is not JSON means a damaged file: with `strict` (training) it stops everything; rows
    that are valid JSON but unusable are skipped and reported.

    Returns (examples, format, problem counts by kind, first problem messages, rows read).
    """
    reader = ExampleReader(source, system_prompt)
    examples: list[Example] = []
    problems: Counter[str] = Counter()
    messages: list[str] = []
    rows = 0
    for row, item in reader:
        rows += 1
        if isinstance(item, Example):
            examples.append(item)
            continue
        if strict and item.kind in ("invalid_json", "undecodable"):
            raise DataError(f"{row.where}: {item}",
                            hint="fix that line (each line of a .jsonl file must be one complete JSON object); "
                                 "`tunewiz data check FILE` lists every problem")
        problems[item.kind] += 1
        if len(messages) < MAX_REPORTED_PROBLEMS:
            messages.append(f"{row.where}: {item}")
    if rows == 0:
        raise DataError(f"{source.label} has no rows", hint="add examples, one JSON object per line")
    if not examples:
        detail = "\n  ".join(messages[:5])
        first_kind = problems.most_common(1)[0][0] if problems else ""
        hint = formats.format_hint([]) if first_kind == "missing_field" else "fix the rows listed above"
        raise DataError(f"none of the {rows} rows of {source.label} is usable:\n  {detail}", hint=hint)
    return examples, reader.format, problems, messages, rows


def _fingerprint(spec: RunSpec, source: sources.DataSource, encoder: ChatEncoder) -> str:
    """What the prepared data depends on. The stop tokens count: each answer's trained span ends at the first
    one (the model's generation config may add some to the tokenizer's EOS)."""
    tokenizer = encoder.tokenizer
    parts = [str(CACHE_VERSION), repr(source), spec.dataset.system_prompt or "", str(spec.dataset.max_rows),
             str(spec.dataset.eval_fraction), str(spec.training.seed), str(spec.training.max_seq_length),
             str(spec.training.sample_prompts), tokenizer.name_or_path, str(len(tokenizer)),
             encoder.template or getattr(tokenizer, "chat_template", "") or "", str(tokenizer.eos_token),
             "|".join(encoder.end_tokens)]
    for path in (source.location, source.heldout):
        if source.kind == "file" and path:
            stat = Path(path).stat()
            parts.append(f"{path}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_eval = round(len(order) * fraction)
    if fraction > 0 and n_eval == 0 and len(order) >= 10:
        n_eval = 1
    return order[n_eval:], order[:n_eval]


def trim(encoded: Encoded, limit: int) -> tuple[Encoded, bool, str | None]:
    """The example cut to `limit` tokens, whether it was cut, and why it cannot be trained on (or None):
    `no_supervised_tokens` or `truncated_before_answer`."""
    if encoded.supervised == 0:
        return encoded, False, "no_supervised_tokens"
    if len(encoded.input_ids) <= limit:
        return encoded, False, None
    cut = Encoded(encoded.input_ids[:limit], encoded.labels[:limit])
    return cut, True, None if cut.supervised else "truncated_before_answer"


def _sample_prompts(examples: list[Example], count: int) -> list[SamplePrompt]:
    samples: list[SamplePrompt] = []
    for example in examples:
        if len(samples) >= count:
            break
        if example.is_chat and example.messages[-1][0] == "assistant":
            samples.append(SamplePrompt(example.messages[:-1], example.messages[-1][1]))
    return samples


def prepare(spec: RunSpec, tokenizer: Any, offline_sample: bool = False, use_cache: bool = True,
            stop_ids: list[int] | None = None) -> PreparedData:
    """Run the whole pipeline for `spec` (cached by a fingerprint of its inputs)."""
    source = sources.resolve(spec.dataset, offline_sample=offline_sample)
    template = resolve_template(spec.dataset.chat_template, tokenizer)
    encoder = ChatEncoder(tokenizer, template)
    if stop_ids:
        encoder.add_stop_ids(stop_ids)
    fingerprint = _fingerprint(spec, source, encoder)
    cache = locations.cache_dir() / "datasets" / f"{fingerprint}{CACHE_SUFFIX}"
    if use_cache:
        cached = load_cache(cache, fingerprint)
        if cached is not None:
            return cached
    data = _prepare(spec, source, encoder)
    data.fingerprint = fingerprint
    if use_cache:
        save_cache(cache, data)
    return data


# The cache holds arrays and JSON only (numpy's .npz, read with allow_pickle=False): a file anyone
# slipped into the cache folder cannot run code, and one whose contents do not match its
# fingerprint and checksum is ignored.
CACHE_SUFFIX = ".npz"


def _pack(examples: list[Encoded]) -> dict[str, Any]:
    import numpy as np

    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    ids = np.array([t for e in examples for t in e.input_ids], dtype=np.int64)
    labels = np.array([t for e in examples for t in e.labels], dtype=np.int64)
    return {"lengths": lengths, "ids": ids, "labels": labels}


def _unpack(lengths: Any, ids: Any, labels: Any) -> list[Encoded]:
    import numpy as np

    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    ids, labels = ids.tolist(), labels.tolist()
    return [Encoded(ids[a:b], labels[a:b]) for a, b in zip(bounds, bounds[1:])]


def _checksum(arrays: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode() + arrays[name].tobytes())
    return digest.hexdigest()


def save_cache(path: Path, data: PreparedData) -> None:
    """Write the prepared data to `path` (0600, atomically). A cache that cannot be written (a full
    disk) is skipped: it only saves time, so nothing fails and no partial file is left."""
    import numpy as np

    arrays = {f"{part}_{key}": value for part, items in (("train", data.train), ("eval", data.eval))
              for key, value in _pack(items).items()}
    meta = {"version": CACHE_VERSION, "fingerprint": data.fingerprint, "checksum": _checksum(arrays),
            "stats": data.stats, "samples": [[list(map(list, s.messages)), s.reference] for s in data.samples]}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ranks of a multi-GPU run may write at once
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)


def load_cache(path: Path, fingerprint: str) -> PreparedData | None:
    """The cached data in `path` when it is a valid cache of exactly `fingerprint`, else None (and an
    invalid file is removed)."""
    import numpy as np

    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(arrays.pop("meta").tobytes())
        if (meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fingerprint
                or meta.get("checksum") != _checksum(arrays)):
            raise ValueError("stale or altered cache")
        parts = {part: _unpack(arrays[f"{part}_lengths"], arrays[f"{part}_ids"], arrays[f"{part}_labels"])
                 for part in ("train", "eval")}
        samples = [SamplePrompt(tuple((role, text) for role, text in messages), reference)
                   for messages, reference in meta["samples"]]
        return PreparedData(parts["train"], parts["eval"], samples, meta["stats"], fingerprint)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        path.unlink(missing_ok=True)
        return None


def split_examples(spec: RunSpec, examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """The run's train and eval rows: `max_rows` sampled with the seed, then the seeded eval split.

    Evaluation and export verification call this too, so that "held out" means the same rows the
    trainer never saw."""
    if spec.dataset.max_rows and len(examples) > spec.dataset.max_rows:
        examples = random.Random(spec.training.seed).sample(examples, spec.dataset.max_rows)
    return _split(examples, spec.dataset.eval_fraction, spec.training.seed)


def sample_prompts_for(spec: RunSpec, source: sources.DataSource, fmt: str, eval_rows: list[Example],
                       train_rows: list[Example]) -> list[SamplePrompt]:
    """The prompts answered as training goes: from the source's held-out file when it has one, else eval rows."""
    heldout_examples: list[Example] = []
    if source.heldout:
        heldout_source = dataclasses.replace(source, kind="file", location=source.heldout, format=fmt, heldout=None)
        heldout_examples, *_ = read_examples(heldout_source, spec.dataset.system_prompt)
    return _sample_prompts(heldout_examples or eval_rows or train_rows, spec.training.sample_prompts)


def _prepare(spec: RunSpec, source: sources.DataSource, encoder: ChatEncoder) -> PreparedData:
    examples, fmt, problems, problem_messages, rows = read_examples(source, spec.dataset.system_prompt)
    train_rows, eval_rows = split_examples(spec, examples)
    limit = spec.training.max_seq_length
    dropped = Counter(problems)
    truncated = 0
    lengths: list[int] = []
    supervised_total = 0
    shortest_answer_end: int | None = None

    def encode_all(items: list[Example]) -> list[Encoded]:
        nonlocal truncated, supervised_total, shortest_answer_end
        out = []
        for example in items:
            try:
                encoded = encoder.encode(example)
            except DataError:
                raise
            except Exception as exc:  # noqa: BLE001 - a template may raise anything (jinja's raise_exception)
                dropped["template_error"] += 1
                if len(problem_messages) < MAX_REPORTED_PROBLEMS:
                    problem_messages.append(f"a {len(example.messages)}-turn example: the chat template cannot "
                                            f"render it: {exc}")
                continue
            lengths.append(len(encoded.input_ids))
            cut, was_cut, reason = trim(encoded, limit)
            truncated += was_cut
            if reason != "no_supervised_tokens":
                first_label = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
                if shortest_answer_end is None or first_label + 1 < shortest_answer_end:
                    shortest_answer_end = first_label + 1
            if reason:
                dropped[reason] += 1
                continue
            supervised_total += cut.supervised
            out.append(cut)
        return out

    train, evaluation = encode_all(train_rows), encode_all(eval_rows)
    if not train:
        if dropped["truncated_before_answer"]:
            raise DataError(f"training.max_seq_length = {limit} is shorter than every example: each one is cut "
                            f"before its answer starts (the earliest answer starts at token {shortest_answer_end})",
                            hint=f"raise training.max_seq_length (the median example has {percentiles(lengths)['p50']} "
                                 "tokens)")
        raise DataError(f"no trainable examples in {source.label}: {dict(dropped)}",
                        hint="every example needs an assistant answer to learn from")
    samples = sample_prompts_for(spec, source, fmt, eval_rows, train_rows)
    stats = {
        "source": source.label, "format": fmt, "rows_read": rows, "examples": len(train_rows) + len(eval_rows),
        "train_examples": len(train), "eval_examples": len(evaluation),
        "dropped": dict(dropped), "dropped_total": sum(dropped.values()), "problems": problem_messages,
        "truncated": truncated, "max_seq_length": limit, "token_lengths": percentiles(lengths),
        "supervised_tokens": supervised_total, "train_tokens": sum(len(e.input_ids) for e in train),
    }
    return PreparedData(train, evaluation, samples, stats)
