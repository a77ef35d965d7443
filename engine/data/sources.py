"""Reading rows from a dataset source: local jsonl/json/csv/parquet files or the Hugging Face hub.

Rows come out one at a time with their location (file and line, or split and index), so every
problem can be reported precisely, and a large file is never loaded whole.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunewiz.engine.config import catalog
from tunewiz.engine.config.spec import DatasetSpec
from tunewiz.engine.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_LINE_BYTES = 8 * 1024 * 1024  # one example per line; a longer line is refused before it fills memory
BOM = b"\xef\xbb\xbf"  # what Excel and Notepad put at the start of a UTF-8 file
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from."""

    data: Any
    line: int  # 1-based line in a jsonl/csv file, 1-based index otherwise
    where: str  # "file.jsonl:12" or "org/data[train]#12"
    offset: int = 0  # bytes of the file read once this row is read (estimated for .json/.parquet; 0 for the hub)


@dataclass(frozen=True)
class DataSource:
    """A resolved dataset location."""

    kind: str  # "file" or "hub"
    location: str  # a path or a hub id
    subset: str | None = None
    split: str = "train"
    format: str = "auto"
    columns: tuple[tuple[str, str], ...] = ()
    heldout: str | None = None  # a file of held-out rows (dataset presets may ship one)
    system_prompt: str | None = None  # the preset's system message (the spec's own one wins)
    label_names: dict[str, dict[str, str]] = field(default_factory=dict, hash=False)  # field -> raw value -> text

    @property
    def label(self) -> str:
        return Path(self.location).name if self.kind == "file" else f"{self.location}[{self.split}]"


def resolve(ds: DatasetSpec, offline_sample: bool = False) -> DataSource:
    """Turn the spec's dataset section into a concrete source; presets use their hub data unless
    `offline_sample` (or the preset is bundled), in which case our shipped sample is read."""
    if ds.preset:
        entries = catalog.datasets()
        if ds.preset not in entries:
            import difflib

            close = difflib.get_close_matches(ds.preset, list(entries), n=1)
            raise DataError(f"dataset.preset {ds.preset!r} is not a dataset preset"
                            + (f"; did you mean {close[0]!r}?" if close else ""),
                            hint=f"presets: {', '.join(entries)} (see `tunewiz datasets`)")
        entry = entries[ds.preset]
        columns = tuple(sorted({**entry.columns, **ds.columns}.items()))
        fmt = ds.format if ds.format != "auto" else entry.format
        heldout = str(entry.heldout_path) if entry.heldout_path else None
        if entry.bundled or offline_sample:
            return DataSource("file", str(entry.sample_path), format=fmt, columns=columns, heldout=heldout,
                              system_prompt=entry.system_prompt, label_names=entry.label_names)
        split = ds.split if ds.split != "train" else entry.split
        return DataSource("hub", entry.hub_id, entry.subset, split, fmt, columns, heldout,
                          system_prompt=entry.system_prompt, label_names=entry.label_names)
    assert ds.source is not None
    source = ds.source.strip()
    path = Path(source).expanduser()
    columns = tuple(sorted(ds.columns.items()))
    if path.exists() or path.suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        if not path.exists():
            raise DataError(f"dataset file {path} does not exist", hint="check dataset.source (a path or a hub id)")
        if path.is_dir():
            raise DataError(f"dataset.source {path} is a folder", hint="name the data file itself (.jsonl, .json, "
                                                                       ".csv or .parquet)")
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise DataError(f"dataset file {path} has an unsupported type {path.suffix!r}",
                            hint="use .jsonl, .json, .csv or .parquet")
        return DataSource("file", str(path.resolve()), format=ds.format, columns=columns)
    if not HUB_ID.match(source):
        raise DataError(f"dataset.source {source!r} is neither an existing file nor a hub id (org/name)")
    return DataSource("hub", source, ds.subset, ds.split, ds.format, columns)


def iter_rows(source: DataSource) -> Iterator[Row]:
    """Yield the source's rows; raise DataError for unreadable files (bad rows are yielded as they are)."""
    if source.kind == "hub":
        yield from _iter_hub(source)
        return
    yield from iter_file(Path(source.location))


def iter_file(path: Path) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise DataError(f"dataset file {path} is empty", hint="it needs one example per line (jsonl) or per row")
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    elif suffix == ".csv":
        yield from _iter_csv(path)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise DataError(f"unsupported dataset file type {suffix!r}: {path}", hint="use .jsonl, .json, .csv or .parquet")


class BadLine:
    """A line that could not be decoded; carried through so checkers can report it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _bounded_lines(handle: Any, path: Path) -> Iterator[bytes]:
    """The file's lines, the first without a UTF-8 BOM; a line over MAX_LINE_BYTES is a DataError
    naming it (read in bounded pieces, so memory stays small whatever the file holds)."""
    number = 0
    while True:
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise DataError(f"{path.name}:{number}: the line is longer than {MAX_LINE_BYTES // (1024 * 1024)} MB",
                            hint="each line must hold one example; split very long texts into several examples, "
                                 "or check that the file really has one example per line")
        yield raw[len(BOM):] if number == 1 and raw.startswith(BOM) else raw


def _iter_jsonl(path: Path) -> Iterator[Row]:
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(_bounded_lines(handle, path), start=1):
            offset += len(raw)
            if not raw.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Row(BadLine(f"not UTF-8 text (byte {exc.start})"), number, where, offset)
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Row(BadLine(f"invalid JSON: {exc.msg} at column {exc.colno}"), number, where, offset)
                continue
            yield Row(data, number, where, offset)


def _iter_json(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} at column {exc.colno}",
                        hint="a .json file must hold one JSON array of objects; for one object per line use .jsonl"
                        ) from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) == 1:
            data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not an array of examples",
                        hint="write the examples as a JSON array, or one object per line in a .jsonl file")
    size = path.stat().st_size
    for index, item in enumerate(data, start=1):
        yield Row(item, index, f"{path.name}[{index}]", size * index // len(data))


def _iter_csv(path: Path) -> Iterator[Row]:
    offset = 0

    def lines(handle: Any) -> Iterator[str]:
        nonlocal offset
        for raw in _bounded_lines(handle, path):
            offset += len(raw)
            yield raw.decode("utf-8")

    try:
        with path.open("rb") as handle:
            reader = csv.DictReader(lines(handle))
            if not reader.fieldnames:
                raise DataError(f"{path} has no header row", hint="the first line must name the columns")
            for record in reader:
                line = reader.line_num
                yield Row(dict(record), line, f"{path.name}:{line}", offset)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start})",
                        hint="re-save the file as UTF-8") from None
    except csv.Error as exc:
        raise DataError(f"{path}: {exc}") from None


def _iter_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise DataError(f"{path} is not a readable parquet file: {exc}") from None
    index, size, total = 0, path.stat().st_size, max(parquet.metadata.num_rows, 1)
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            index += 1
            yield Row(record, index, f"{path.name}[{index}]", size * index // total)


def _iter_hub(source: DataSource) -> Iterator[Row]:
    import datasets

    try:
        data = datasets.load_dataset(source.location, source.subset, split=source.split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - the hub raises many error types
        raise DataError(f"cannot load hub dataset {source.location!r} (split {source.split!r}): {exc}",
                        hint="check the id, subset and split, and that this machine can reach the Hugging Face "
                             "hub; or download the data and set dataset.source to the file") from exc
    for index, record in enumerate(data, start=1):
        yield Row(record, index, f"{source.location}[{source.split}]#{index}")
