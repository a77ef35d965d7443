"""The model and dataset catalogs shipped in presets/ (models.toml, datasets.toml)."""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.presets import presets_root
from engine.spec import Problem, SpecError, key_lines


@dataclass(frozen=True)
class ModelEntry:
    """A catalog model: where it comes from and what it is."""

    name: str
    description: str
    hub_id: str
    license: str
    gated: bool = False
    params: int = 0
    layers: int = 0
    hidden: int = 0
    intermediate: int = 0
    heads: int = 0
    kv_heads: int = 0
    vocab: int = 0
    tied_embeddings: bool = False
    context: int = 0
    head_dim: int | None = None
    bundled_gguf: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetEntry:
    """A catalog dataset: the real data behind it and our offline sample of it."""

    name: str
    description: str
    task: str
    hub_id: str
    license: str
    size: str
    format: str
    sample: str
    subset: str | None = None
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)
    heldout: str | None = None
    max_seq_length: int = 2048
    epochs: float = 1.0
    system_prompt: str | None = None  # added to every conversation that has none
    label_names: dict[str, dict[str, str]] = field(default_factory=dict)  # field -> raw label -> text
    notes: str = ""  # caveats a user should know (licence conditions, provenance)

    @property
    def url(self) -> str | None:
        return f"https://huggingface.co/datasets/{self.hub_id}" if self.hub_id else None

    @property
    def sample_path(self) -> Path:
        return presets_root() / self.sample

    @property
    def heldout_path(self) -> Path | None:
        return presets_root() / self.heldout if self.heldout else None

    @property
    def bundled(self) -> bool:
        """True when the sample is the whole dataset (no hub download)."""
        return not self.hub_id


def _load(filename: str, cls: type) -> dict[str, Any]:
    path = presets_root() / filename
    text = path.read_text(encoding="utf-8")
    raw = tomllib.loads(text)
    lines = key_lines(text)
    allowed = {f.name for f in fields(cls)} - {"name"}
    entries, problems = {}, []
    for name, table in raw.items():
        unknown = set(table) - allowed
        if unknown:
            problems.append(Problem(f"{name}.{sorted(unknown)[0]}", "unknown key", lines.get(name)))
            continue
        try:
            entries[name] = cls(name=name, **table)
        except TypeError as exc:
            problems.append(Problem(name, str(exc), lines.get(name)))
    if problems:
        raise SpecError(problems, str(path))
    return entries


@functools.cache
def models() -> dict[str, ModelEntry]:
    return _load("models.toml", ModelEntry)


@functools.cache
def datasets() -> dict[str, DatasetEntry]:
    return _load("datasets.toml", DatasetEntry)
