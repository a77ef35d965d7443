"""The wizard's model: what the user chose so far and how each step changes the run spec.

No Textual here, so every rule is unit-testable. The spec starts as the demo preset; the model step
applies the recommender's choice, the dataset step the data, the settings step single keys. Each step
returns a new spec (specs are never changed in place), validated with tunewiz.engine.config.spec.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tunewiz.engine.config import presets
from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.config.spec import Problem, RunSpec, SpecError
from tunewiz.engine.data.formats import DataFormat
from tunewiz.engine.fileio import slug
from tunewiz.engine.training.distributed import keep_effective_batch, resolve_gpus

if TYPE_CHECKING:
    from tunewiz.engine.planning.recommend import Choice

DEMO_PRESET = "demo"
RECOMMEND_SEQ_LEN = 2048
"""Sequence length the model step estimates memory for; datasets ask for this much or less."""
CHECK_ROW_LIMIT = 5000
"""The data check reads at most this many rows, so that it answers in seconds."""
CUSTOM = "custom"
"""Option id of "your own file or hub dataset" on the dataset step."""

BASIC_KEYS = ("name", "training.epochs", "training.max_steps", "training.learning_rate",
              "training.max_seq_length", "training.objective")
"""The settings a beginner sees first; the advanced view shows every key of the spec."""

PREFERENCE_LEARNING_RATE = 5e-5
"""The learning rate offered with preference pairs: DPO moves an adapter much further per step than supervised
training does (trl's LoRA DPO examples use 5e-6 to 5e-5)."""

STEPS = ("Welcome", "Hardware", "Model", "Data", "Settings", "Review", "Launch")


@dataclass(frozen=True)
class DatasetSelection:
    """The data the user picked: a catalog preset, or a file / hub id with its format and column mapping."""

    preset: str | None = None
    source: str | None = None
    format: DataFormat = "auto"
    columns: tuple[tuple[str, str], ...] = ()

    @property
    def target(self) -> str:
        return self.preset or self.source or ""

    @property
    def label(self) -> str:
        return self.preset or (self.source or "").rstrip("/").rpartition("/")[2] or "data"


@dataclass(frozen=True)
class CheckRequest:
    """One run of `tunewiz data check`; equal requests share a result."""

    target: str
    model: str
    max_seq_len: int
    format: str = "auto"
    columns: tuple[tuple[str, str], ...] = ()
    limit: int | None = CHECK_ROW_LIMIT

    def argv(self) -> list[str]:
        """Arguments after `python -m tunewiz.engine`."""
        args = ["data", "check", self.target, "--model", self.model, "--max-seq-len", str(self.max_seq_len),
                "--json"]
        if self.format != "auto":
            args += ["--format", self.format]
        if self.columns:
            args += ["--columns", ",".join(f"{f}={c}" for f, c in self.columns)]
        if self.limit:
            args += ["--limit", str(self.limit)]
        return args


@dataclass
class CheckResult:
    """What came back: the checker's JSON report, or the error it stopped with."""

    request: CheckRequest
    report: dict[str, Any] | None = None
    error: str | None = None
    hint: str | None = None


@dataclass
class WizardState:
    """Everything the screens share. Only message handlers on the App and screens change it."""

    spec: RunSpec
    report: Any = None  # tunewiz.engine.planning.hardware.HardwareReport once probed
    recommendation: Any = None  # tunewiz.engine.planning.recommend.Recommendation (on all the GPUs a run can use)
    recommendation_one: Any = None  # the same for one GPU, where the recommendation uses several
    recommend_error: str | None = None
    use_all_gpus: bool = True  # the model step's switch: every GPU the recommendation uses, or one
    extra_choices: list[Any] = field(default_factory=list)  # models the user typed, estimated on the fly
    extra_choices_one: list[Any] = field(default_factory=list)  # the same, for one GPU (machines with several)
    choice: Any = None  # the Choice picked on the model step
    dataset: DatasetSelection = field(default_factory=lambda: DatasetSelection(preset=DEMO_PRESET))
    checks: dict[CheckRequest, CheckResult] = field(default_factory=dict)
    review_estimate: Any = None  # a Choice for the final spec (model, method, length)
    relaunch_of: str | None = None  # preset name when the user came from "relaunch a preset"

    def check_request(self, spec: RunSpec | None = None) -> CheckRequest:
        """The data check that matches `spec` (default: the current one)."""
        spec = spec or self.spec
        ds = spec.dataset
        return CheckRequest(target=ds.preset or ds.source or "", model=spec.model.name,
                            max_seq_len=spec.training.max_seq_length, format=ds.format,
                            columns=tuple(sorted(ds.columns.items())))

    def check_for(self, spec: RunSpec | None = None) -> CheckResult | None:
        return self.checks.get(self.check_request(spec))

    @property
    def gpus_offered(self) -> int:
        """How many GPUs the recommendation trains on: more than 1 on a machine with several alike."""
        ranked = self.recommendation.choices if self.recommendation is not None else []
        return max((getattr(c, "gpus", 1) for c in ranked), default=1)

    @property
    def one_gpu(self) -> bool:
        """True when the user switched a machine with several GPUs to one."""
        return not self.use_all_gpus and self.recommendation_one is not None

    @property
    def choices(self) -> list[Any]:
        """Typed-in models first, then the recommender's ranking (for one GPU when switched to one)."""
        recommendation = self.recommendation_one if self.one_gpu else self.recommendation
        extra = self.extra_choices_one if self.one_gpu else self.extra_choices
        ranked = list(recommendation.choices) if recommendation is not None else []
        return [*extra, *ranked]


def base_spec(preset: str = DEMO_PRESET) -> RunSpec:
    """The spec every new fine-tune starts from (the demo preset)."""
    return presets.resolve(preset)[0]


def auto_name(spec: RunSpec, base: RunSpec) -> RunSpec:
    """Name the run after its data and model, unless it is the base preset's own model and data."""
    spec = copy.deepcopy(spec)
    if (spec.model.name, spec.dataset.preset, spec.dataset.source) == (
            base.model.name, base.dataset.preset, base.dataset.source):
        spec.name, spec.description = base.name, base.description
        return spec
    data = spec.dataset.preset or (spec.dataset.source or "data").rstrip("/").rpartition("/")[2]
    data = re.sub(r"\.(jsonl|json|csv|parquet)$", "", data)
    model = spec.model.name.rstrip("/").rpartition("/")[2]
    spec.name = slug(f"{data}-{model}", limit=64)
    spec.description = f"{spec.model.name} ({spec.method}) on {data}; made with the tunewiz wizard"
    return spec


def apply_choice(spec: RunSpec, choice: Choice, base: RunSpec) -> RunSpec:
    """The model step: the recommender's model, method, batch shape and memory settings."""
    new = choice.apply(copy.deepcopy(spec))
    return validated(auto_name(new, base))


def apply_dataset(spec: RunSpec, selection: DatasetSelection, base: RunSpec,
                  choice: Choice | None = None) -> RunSpec:
    """The dataset step: the data, and the preset's length and epochs where memory allows."""
    from tunewiz.engine.config import catalog

    new = copy.deepcopy(spec)
    ds = new.dataset
    ds.preset, ds.source = selection.preset, selection.source
    ds.format = selection.format
    ds.columns = dict(selection.columns)
    entry = catalog.datasets().get(selection.preset or "")
    if entry is not None:
        limit = choice.max_seq_length if choice is not None else RECOMMEND_SEQ_LEN
        new.training.max_seq_length = min(entry.max_seq_length, max(limit, 16))
        new.training.epochs = entry.epochs
    elif choice is not None:
        new.training.max_seq_length = choice.max_seq_length
    match_objective(new, (entry.format if entry is not None else selection.format) == "preference", base)
    return validated(auto_name(new, base))


def match_objective(spec: RunSpec, pairs: bool, base: RunSpec) -> None:
    """Offer the objective that fits the data: dpo (at a preference learning rate) for preference pairs,
    supervised training for anything else. A preference objective the user chose for pairs is kept."""
    t = spec.training
    if pairs and t.objective == "sft":
        t.objective, t.learning_rate = "dpo", PREFERENCE_LEARNING_RATE
    elif not pairs and t.objective != "sft":
        t.objective, t.learning_rate = "sft", base.training.learning_rate


STRATEGY_WORDS = {
    "ddp": "DDP: each GPU holds the whole model",
    "fsdp": "FSDP: the weights are sharded across the GPUs",
    "auto": "auto: DDP when the model fits one GPU, else FSDP",
}


def gpu_plan(spec: RunSpec, report: Any, offered: int = 1) -> tuple[int, str, str] | None:
    """What the review step says about the GPUs: how many, which ones and how they share the work, and the
    effective batch line the engine will log (tunewiz.engine.training.distributed.keep_effective_batch).

    None where there is nothing to choose (one GPU, or the CPU, and the spec asks for no more). `offered` is how
    many GPUs the recommendation uses. Raises TunewizError when the spec asks for GPUs that are not there.
    """
    if report is None:
        return None
    visible = len(report.gpus)
    ids = resolve_gpus(spec.training.gpus, visible)
    if len(ids) <= 1 and visible <= 1:
        return None
    count = max(len(ids), 1)
    names = [report.gpus[i].name for i in ids]
    if count > 1:
        cards = f"{count} × {names[0]}" if len(set(names)) == 1 else ", ".join(names)
        text = f"{cards} (GPUs {', '.join(map(str, ids))}) · {STRATEGY_WORDS[spec.training.strategy]}"
    else:
        text = f"1 of the {visible} found ({names[0]}, GPU {ids[0]})"
        if offered > 1:
            text += f"; g on the Model step trains on {offered}"
    return count, text, keep_effective_batch(spec, count)[1]


def validated(spec: RunSpec) -> RunSpec:
    """A fresh copy that went through tunewiz.engine.config.spec's validation (raises SpecError)."""
    return spec_mod.from_dict(spec_mod.to_dict(spec), source="wizard")


# ---------------------------------------------------------------------------------------------
# Single keys, for the settings step


@dataclass(frozen=True)
class FieldInfo:
    """One key of the spec as the settings form shows it."""

    key: str
    kind: Literal["text", "bool", "choice"]
    choices: tuple[str, ...]
    type_name: str
    optional: bool
    doc: str

    @property
    def label(self) -> str:
        return self.key.rpartition(".")[2].replace("_", " ")


def _describe_fields() -> list[FieldInfo]:
    out: list[FieldInfo] = []
    docs = {key: (type_name, default, doc) for key, type_name, default, doc in spec_mod.field_docs()}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            key = f"{prefix}{f.name}"
            optional = False
            if typing.get_origin(tp) in (typing.Union, types.UnionType):
                args = [a for a in typing.get_args(tp) if a is not type(None)]
                optional = len(args) < len(typing.get_args(tp))
                tp = args[0]
            type_name, _default, doc = docs[key]
            if typing.get_origin(tp) is Literal:
                out.append(FieldInfo(key, "choice", tuple(str(a) for a in typing.get_args(tp)), type_name,
                                     optional, doc))
            elif tp is bool:
                out.append(FieldInfo(key, "bool", (), type_name, optional, doc))
            else:
                out.append(FieldInfo(key, "text", (), type_name, optional, doc))

    walk(RunSpec, "")
    return out


FIELDS: dict[str, FieldInfo] = {info.key: info for info in _describe_fields()}


def get_value(spec: RunSpec, key: str) -> Any:
    target: Any = spec
    for part in key.split("."):
        target = getattr(target, part)
    return target


def value_text(spec: RunSpec, key: str) -> str:
    """How a key's value is typed in the form: TOML for lists and tables, plain text otherwise."""
    value = get_value(spec, key)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return spec_mod._toml_value(value)
    return str(value)


def set_value(spec: RunSpec, key: str, text: str) -> RunSpec:
    """A copy of `spec` with one key set from what the user typed; raises SpecError saying why not.

    Text is read as TOML where it parses (numbers, true/false, lists), else as a string; an empty box
    unsets an optional key.
    """
    info = FIELDS.get(key)
    if info is None:
        raise SpecError([Problem(key, "unknown key")])
    raw = spec_mod.to_dict(spec)
    section, _, leaf = key.rpartition(".")
    target = raw[section] if section else raw
    text = text.strip()
    if not text:
        if not info.optional:
            raise SpecError([Problem(key, f"empty: type {info.type_name}")])
        target.pop(leaf, None)
    else:
        value: Any = text
        if not (info.kind == "text" and info.type_name == "a string"):
            value = spec_mod.parse_override(f"{key}={text}")[1]
        target[leaf] = value
    return spec_mod.from_dict(raw, source="settings")


def problem_text(exc: SpecError, key: str | None = None) -> str:
    """The messages of a SpecError, those about `key` first, without the "spec:" prefix."""
    problems = sorted(exc.problems, key=lambda p: p.key != key)
    return "; ".join(p.message for p in problems)

