"""The model and dataset catalogs shipped in presets/ (models.toml, datasets.toml)."""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tunewiz.engine.config.presets import presets_root
from tunewiz.engine.config.spec import Problem, SpecError, key_lines


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
    tier: int = 3  # the recommender's quality tier: among models that fit, lower tiers come first
    mirror_of: str = ""  # the gated hub repository whose weights `hub_id` copies, ungated
    same_weights_as: str = ""  # for a gated original: the catalog name of its ungated mirror

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.hub_id}"

    @property
    def license_name(self) -> str:
        return LICENSE_NAMES.get(self.license, self.license)

    def source_note(self) -> str:
        """Where the weights come from and under which licence, for a mirror: '' for other models."""
        if not self.mirror_of:
            return ""
        return (f"Downloads {self.hub_id}, a public ungated copy of {self.mirror_of} (the same weights), so no "
                f"access request is needed. Licence: {self.license_name}; the Llama licence still applies.")

    def access_problem(self, token: str | None) -> str | None:
        """What to do before downloading a gated model without a hub token; None when nothing stands in the way."""
        if not self.gated or token:
            return None
        mirror = next((e.name for e in models().values() if e.mirror_of == self.hub_id), None)
        return (f"{self.hub_id} is gated: the hub only lets people who accepted its licence download it. "
                f"Before training: (1) open {self.url}, log in and accept the licence; (2) create a read token at "
                "https://huggingface.co/settings/tokens and run `hf auth login` (or set HF_TOKEN)."
                + (f" Or use model.name = \"{mirror}\", an ungated copy of the same weights." if mirror else ""))


LICENSE_NAMES = {"llama3.1": "Llama 3.1 Community License", "llama3.2": "Llama 3.2 Community License",
                 "llama3.3": "Llama 3.3 Community License", "apache-2.0": "Apache 2.0", "mit": "MIT",
                 "gemma": "Gemma Terms of Use", "qwen-research": "Qwen Research License"}


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
    longest_tokens: int | None = None  # the longest example, measured with the demo model's tokenizer

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
        same = table.get("same_weights_as")
        if same in raw:  # a gated original: the architecture facts are its mirror's
            table = {**{k: v for k, v in raw[same].items() if k in _ARCH_KEYS}, **table}
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


_ARCH_KEYS = ("params", "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "tied_embeddings",
              "context", "head_dim", "tier")


@functools.cache
def models() -> dict[str, ModelEntry]:
    return _load("models.toml", ModelEntry)


@functools.cache
def datasets() -> dict[str, DatasetEntry]:
    return _load("datasets.toml", DatasetEntry)


def ranked_models() -> dict[str, ModelEntry]:
    """The models the recommender ranks: not the CPU demo (its hub twin is ranked), and not a gated original
    whose ungated mirror is in the catalog (the same weights; still usable by name)."""
    return {n: e for n, e in models().items() if not e.bundled_gguf and not e.same_weights_as}


def by_hub_id(hub_id: str) -> ModelEntry | None:
    return next((e for e in models().values() if e.hub_id == hub_id), None)
