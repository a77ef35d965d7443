"""The run spec: one typed, documented schema for everything a run needs, with TOML load/save.

A spec file is plain TOML. Every key is described by the `doc` of its field below; `docs/run-spec.md`
is generated from these descriptions (`python -m tunewiz.engine.config.spec_doc`). Validation reports every
problem at once, each with the file, line, dotted key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunewiz.engine.data.formats import DataFormat

SPEC_VERSION = 1

Method = Literal["lora", "qlora"]
DType = Literal["auto", "bf16", "fp16", "fp32"]
Attention = Literal["auto", "sdpa", "eager", "flash_attention_2"]
Objective = Literal["sft", "dpo", "orpo"]
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"]
FusedKernels = Literal["all", "loss", "off"]
AdapterDType = Literal["fp32", "bf16"]
Strategy = Literal["auto", "ddp", "fsdp"]
Tracker = Literal["tensorboard", "wandb", "mlflow"]


def _f(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
       lo_open: bool = False) -> Any:
    """A field with its documentation and an optional allowed range."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "lo_open": lo_open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSpec:
    """Which model to fine-tune."""

    name: str = _f("smollm2-135m-demo", "A model catalog name (`tunewiz models`), a Hugging Face hub id "
                   "(`org/name`), a local model directory, or a path to a `.gguf` file.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) to pin; default: the hub's main.")
    gguf_file: str | None = _f(None, "GGUF file inside `name` (a hub repo or directory) to load from.")
    trust_remote_code: bool = _f(False, "Run model code shipped in the hub repo. Only for repos you trust.")
    dtype: DType = _f("auto", "Weight/compute dtype. `auto`: bf16 where the GPU supports it, else fp16 on "
                      "GPU, fp32 on CPU.")
    attention: Attention = _f("auto", "Attention kernel. `auto`: flash attention when installed, else SDPA.")


@dataclass
class LoraSpec:
    """The LoRA adapter."""

    r: int = _f(16, "Adapter rank: higher learns more and costs more memory.", lo=1, hi=1024)
    alpha: float = _f(32.0, "Scaling numerator (the update is scaled by alpha/r, or alpha/sqrt(r) with rsLoRA).",
                      lo=0, lo_open=True)
    dropout: float = _f(0.0, "Dropout on the adapter input during training. 0 as in peft, Unsloth and torchtune's "
                             "LoRA recipes: on an 8B model 0.05 costs 13% of the speed (docs/speed.md). Raise it "
                             "(0.05 to 0.1) when the eval loss rises while the training loss falls.", lo=0, hi=0.9)
    target_modules: list[str] = _f(["all-linear"], "Module names to adapt. `all-linear` adapts every linear "
                                   "projection of the decoder (attention and MLP), named per model family.")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling (alpha/sqrt(r)).")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA): sometimes better, slower.")


@dataclass
class QuantizationSpec:
    """4-bit weights for QLoRA (ignored by plain LoRA)."""

    quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type; NF4 is the QLoRA default.")
    double_quant: bool = _f(True, "Quantise the quantisation constants too (saves ~0.4 bit/parameter).")
    compute_dtype: Literal["bf16", "fp16"] = _f("bf16", "Dtype the 4-bit weights are dequantised to for matmuls.")


@dataclass
class DatasetSpec:
    """The training data."""

    preset: str | None = _f(None, "A dataset preset name (`tunewiz datasets`). Set this or `source`.")
    source: str | None = _f(None, "A hub dataset id, or a local .jsonl/.json/.csv/.parquet file.")
    subset: str | None = _f(None, "Hub dataset configuration name, when the dataset has several.")
    split: str = _f("train", "Which split to train on.")
    format: DataFormat = _f("auto", "Row format; `auto` detects it from the columns.")
    columns: dict[str, str] = _f({}, "Column mapping from the format's field names to this data's column "
                                 "names, e.g. `{ instruction = \"question\", output = \"answer\" }`.")
    chat_template: str | None = _f(None, "Chat template: default is the tokenizer's own; or a named template "
                                   "(`chatml`, `llama3`, `alpaca`) or a path to a Jinja file.")
    system_prompt: str | None = _f(None, "A system message added to every conversation that has none.")
    max_rows: int | None = _f(None, "Use at most this many rows (after shuffling with the seed).", lo=1)
    eval_fraction: float = _f(0.05, "Share of rows held out to measure eval loss (0 to disable).", lo=0, hi=0.5)


@dataclass
class TrainingSpec:
    """The optimisation loop."""

    objective: Objective = _f("sft", "What the model learns from. `sft`: supervised examples, the model learns to "
                              "write the answers given. `dpo`: preference pairs (a prompt with a chosen and a rejected "
                              "answer), the model learns to prefer the chosen kind of answer over the rejected one, "
                              "measured against where it started (the base model with the adapter switched off, no "
                              "second copy in memory): best for tone and style. `orpo`: preference pairs without a "
                              "reference: supervised learning on the chosen answers plus a penalty on the rejected "
                              "ones. `dpo` and `orpo` need `preference` data (prompt, chosen, rejected).")
    beta: float = _f(0.1, "Preference strength for `dpo` and `orpo`. dpo: how far the model may move from the "
                     "reference (lower lets it move further); orpo: the weight of the penalty on rejected answers.",
                     lo=0, lo_open=True)
    epochs: float = _f(1.0, "Passes over the data (ignored when `max_steps` is set).", lo=0, lo_open=True)
    max_steps: int | None = _f(None, "Stop after this many optimiser steps.", lo=1)
    learning_rate: float = _f(2e-4, "Peak learning rate.", lo=0, hi=1.0, lo_open=True)
    lr_scheduler: Scheduler = _f("cosine", "Learning-rate schedule after warm-up.")
    warmup_ratio: float = _f(0.03, "Share of steps spent warming up the learning rate.", lo=0, hi=0.5)
    micro_batch_size: int = _f(2, "Sequences per forward pass (per GPU).", lo=1, hi=4096)
    gradient_accumulation: int = _f(4, "Micro-batches per optimiser step. The effective batch, micro_batch_size × "
                                    "gradient_accumulation, stays the same on any number of GPUs: on N GPUs each "
                                    "runs 1/N of the micro-batches.", lo=1, hi=4096)
    max_seq_length: int = _f(2048, "Longest sequence in tokens; longer examples are truncated.", lo=16,
                             hi=1_048_576)
    packing: bool = _f(False, "Lay each micro-batch's examples end to end in one row, no padding: on data of "
                                   "mixed lengths 1.56x the tokens/s with 30% less memory (1B, one H200). Each "
                                   "example still sees only itself (variable-length flash attention on a GPU).")
    gradient_checkpointing: bool = _f(True, "Recompute activations in the backward pass: much less memory, "
                                      "about 30% slower.")
    checkpoint_layers: int | None = _f(None, "With gradient_checkpointing on, how many decoder layers recompute "
                                       "their activations in the backward pass (the first N); the others keep "
                                       "them, which is faster and takes more memory. Default: every layer. The "
                                       "recommender picks the fewest that fit.", lo=1)
    optimizer: Optimizer = _f("adamw_torch_fused", "Optimiser. `adamw_torch_fused` updates all adapter weights in one "
                              "kernel; 8-bit variants need bitsandbytes and a GPU.")
    weight_decay: float = _f(0.0, "Decoupled weight decay on adapter weights.", lo=0, hi=1.0)
    max_grad_norm: float = _f(1.0, "Clip gradients to this norm (0 disables clipping).", lo=0)
    seed: int = _f(42, "Random seed for data order, adapter init and sampling.", lo=0)
    log_every: int = _f(1, "Write a `step` event every N optimiser steps.", lo=1)
    eval_every: int | None = _f(None, "Measure eval loss every N steps (default: about 5 times per run).", lo=1)
    save_every: int | None = _f(None, "Save a checkpoint every N steps (default: about 4 times per run).", lo=1)
    sample_every: int | None = _f(None, "Generate answers to the sample prompts every N steps "
                                  "(default: about 4 times per run).", lo=1)
    sample_prompts: int = _f(3, "How many fixed prompts from the eval data to answer as training goes.",
                             lo=0, hi=16)
    sample_max_new_tokens: int = _f(64, "Longest sample answer in tokens.", lo=1, hi=4096)
    save_total_limit: int = _f(2, "Keep at most this many checkpoints.", lo=1)
    oom_recovery: int = _f(3, "When a step runs out of GPU memory, retry up to this many times with half the "
                           "micro-batch and twice the accumulation (the same effective batch) and gradient "
                           "checkpointing on every layer, from the last checkpoint (0 turns this off; one GPU only).",
                           lo=0, hi=8)
    gpus: int | list[int] = _f(1, "GPUs to train on: a count (the first N visible GPUs; 0 means all) or a list of "
                               "GPU indices like [0, 2]. More than one GPU starts the engine through "
                               "`accelerate launch`.", lo=0)
    report_to: list[Tracker] = _f([], "Also log the run's metrics to these trackers, when installed: "
                                  "`tensorboard` (into RUN/tensorboard), `wandb`, `mlflow` (each reads its own "
                                  "environment variables for project and server). The dashboard needs none.")
    strategy: Strategy = _f("auto", "How several GPUs share the work: `ddp` keeps a whole model on each GPU (fastest "
                            "when it fits one card), `fsdp` shards the weights across them, `auto` picks DDP "
                            "when the model fits one GPU.")


@dataclass
class SpeedSpec:
    """Speed levers. Each is on by default where it measurably wins (bench/results/speed_*.jsonl) and can be
    turned off on its own."""

    fused_kernels: FusedKernels = _f("all", "Fused Triton kernels from liger-kernel on CUDA GPUs, for the model "
                                     "families it supports: `all` (fused linear cross-entropy, which never "
                                     "materialises the vocabulary-sized logits, plus RMSNorm, RoPE and SwiGLU), "
                                     "`loss` (the fused cross-entropy alone) or `off`. Ignored on a CPU.")
    adapter_dtype: AdapterDType = _f("fp32", "Dtype of the LoRA weights. `fp32` (their matmuls still run in the "
                                     "compute dtype); `bf16` on a bf16 GPU is about 15% faster on an 8B model, but its "
                                     "rounded updates made a 50-step loss curve drift 7% from fp32 adapters' "
                                     "(docs/speed.md). Ignored on a CPU and with fp16.")
    lean_lora: bool = _f(True, "LoRA layers skip peft's upcast of each input to the adapters' fp32 (autocast casts "
                               "it back down anyway) and add the scaled adapter output inside the adapter's matmul: "
                               "12% faster on an 8B model. The same function, but in bf16 it rounds once where peft "
                               "rounds three times and draws other dropout masks (a 50-step loss curve 4% from "
                               "peft's; docs/speed.md). `false` uses peft's forward.")
    fused_lora: bool = _f(True, "Llama-like MLPs (gate/up, SwiGLU, down) and attention projections (Q/K/V "
                                "together, O) run as one autograd node each with a hand-written backward that keeps "
                                "fewer activations, with our Triton kernels for SwiGLU, RMSNorm, the rotary embedding "
                                "and NF4 dequantisation on CUDA; it replaces `speed.lean_lora` on the blocks it "
                                "covers, the rest keeps it. Not under FSDP. Measured with checkpointing on an 8B model "
                                "(docs/speed.md): 1.10x the speed without it for LoRA, 1.00x and 1.44x for QLoRA on "
                                "two hosts, before later work on the host's share of a step.")
    fused_dropout: bool = _f(False, "With `speed.fused_lora` on a CUDA GPU, the LoRA dropout masks come from a "
                                     "counter-based generator inside our Triton kernels: never written nor drawn "
                                     "again in full (torch's masks cost several passes over each layer's input a "
                                     "step). The masks differ from torch's draws, not in distribution. Off by "
                                     "default: slower than torch's masks on an H200 (8B LoRA, docs/speed.md); its "
                                     "first version, with the matmuls in Triton, at 0.93x and 0.96x; this one, a "
                                     "one-pass dropped-out copy for cuBLAS's matmuls, at 0.97x.")
    offload_checkpoints: bool = _f(False, "With gradient checkpointing on one CUDA GPU, each checkpointed layer's "
                                          "input waits in pinned CPU memory (copied on a side stream, overlapped "
                                          "with compute) instead of on the GPU: 2 bytes x hidden size per token and "
                                          "layer less (0.98 GiB measured on an 8B model at 2 x 2048 tokens, speed "
                                          "within the noise). Off by default; the recommender turns it on where it "
                                          "lets a bigger micro-batch fit (docs/speed.md).")
    lagged_logs: bool = _f(True, "On one CUDA GPU, each step's loss, gradient norm and token count are copied to "
                                 "the host without waiting and logged at the next step, so the host does not wait "
                                 "for the GPU at each step's end (the dashboards show each step one step later). "
                                 "Measured on an 8B model without checkpointing: 1.04x Unsloth's speed with it, "
                                 "0.98x before it (docs/speed.md). `false` reads each step as it ends.")
    compile: bool = _f(False, "torch.compile the model: a few minutes of compiling before the first step; pays "
                              "off only on long runs.")


@dataclass
class RunSpec:
    """Everything a run needs. Saved into each run directory, it is the preset that relaunches the run."""

    name: str = _f("run", "Short name used in run ids and listings.")
    description: str = _f("", "One line shown in preset listings.")
    method: Method = _f("lora", "`lora` trains an adapter on 16-bit weights; `qlora` on 4-bit weights "
                        "(about a quarter of the weight memory; needs a CUDA GPU).")
    output_dir: str | None = _f(None, "Where checkpoints and the final adapter go (default: the run "
                                "directory's `output/`).")
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    quantization: QuantizationSpec = field(default_factory=QuantizationSpec)
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    speed: SpeedSpec = field(default_factory=SpeedSpec)


SECTIONS = ("model", "lora", "quantization", "dataset", "training", "speed")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec."""

    key: str
    message: str
    line: int | None = None


class SpecError(ValueError):
    """A spec that cannot be used; `problems` lists every reason."""

    def __init__(self, problems: list[Problem], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        where = self.source or "spec"
        lines = [f"{where}: {len(self.problems)} problem(s):"] if len(self.problems) > 1 else []
        for p in self.problems:
            loc = f"{where}:{p.line}" if p.line else where
            lines.append(f"{loc}: {p.key}: {p.message}" if p.key else f"{loc}: {p.message}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Converting raw TOML data into a typed spec


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        (item,) = typing.get_args(tp)
        if typing.get_origin(item) is Literal:
            return "a list of " + ", ".join(repr(a) for a in typing.get_args(item))
        return "a list of whole numbers" if item is int else "a list of strings"
    if origin is dict:
        return "a table of strings"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ValueError with what was expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0])
        for member in inner:
            try:
                return _convert(value, member)
            except ValueError:
                continue
        raise ValueError(f"expected {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"expected {_type_name(tp)}{extra}")
    if origin is list and typing.get_args(tp) == (int,):
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError("expected a list of whole numbers, e.g. [0, 1]")
        return list(value)
    if origin is list and typing.get_origin(typing.get_args(tp)[0]) is Literal:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list):
            raise ValueError(f"expected {_type_name(tp)}")
        return [_convert(v, typing.get_args(tp)[0]) for v in values]
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("expected a list of strings, e.g. [\"q_proj\", \"v_proj\"]")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError("expected a table of strings, e.g. { instruction = \"question\" }")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError("expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected a whole number")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        if math.isnan(value) or math.isinf(value):
            raise ValueError("expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError("expected a string (in quotes)")
        return value
    raise TypeError(f"unsupported spec type {tp!r}")


def _check_range(value: Any, meta: Mapping[str, Any]) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        return f"must be {'greater than' if meta.get('lo_open') else 'at least'} {lo:g}"
    if hi is not None and value > hi:
        return f"must be at most {hi:g}"
    return None


def _build(cls: type, raw: dict[str, Any], prefix: str, problems: list[Problem]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            hint = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            suggestion = f"did you mean '{prefix}{hint[0]}'?" if hint else f"known keys: {', '.join(known)}"
            problems.append(Problem(dotted, f"unknown key; {suggestion}"))
            continue
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(Problem(dotted, f"expected a table [{dotted}], got {value!r}"))
                continue
            kwargs[key] = _build(tp, value, f"{dotted}.", problems)
            continue
        try:
            converted = _convert(value, tp)
        except ValueError as exc:
            problems.append(Problem(dotted, f"{value!r}: {exc}"))
            continue
        range_error = _check_range(converted, known[key].metadata)
        if range_error:
            problems.append(Problem(dotted, f"{value!r}: {range_error}"))
            continue
        kwargs[key] = converted
    return cls(**kwargs)


def _cross_checks(spec: RunSpec) -> list[Problem]:
    """Rules that involve more than one key."""
    problems = []
    ds = spec.dataset
    if ds.preset and ds.source:
        problems.append(Problem("dataset", "set either dataset.preset or dataset.source, not both"))
    if not ds.preset and not ds.source:
        problems.append(Problem("dataset", "no data: set dataset.preset (see `tunewiz datasets`) or "
                                           "dataset.source (a hub id or a local file)"))
    if not spec.name.strip() or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", spec.name):
        problems.append(Problem("name", f"{spec.name!r}: use 1-64 letters, digits, '.', '_' or '-'"))
    if not spec.lora.target_modules:
        problems.append(Problem("lora.target_modules", "empty: name at least one module, or \"all-linear\""))
    gpus = spec.training.gpus
    if isinstance(gpus, list) and (not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0):
        problems.append(Problem("training.gpus", f"{gpus!r}: list distinct GPU indices (0, 1, ...), at least one"))
    if spec.training.objective != "sft" and spec.training.packing:
        problems.append(Problem("training.packing", f"objective {spec.training.objective!r} compares whole answer "
                                "pairs, which cannot be packed: set training.packing = false"))
    if not spec.model.name.strip():
        problems.append(Problem("model.name", "empty: name a catalog model, a hub id or a local path"))
    return problems


def from_dict(raw: dict[str, Any], source: str | None = None, text: str | None = None) -> RunSpec:
    """Build and validate a spec from parsed TOML; raise SpecError listing every problem."""
    problems: list[Problem] = []
    raw = dict(raw)
    version = raw.pop("spec_version", SPEC_VERSION)
    if version != SPEC_VERSION:
        problems.append(Problem("spec_version", f"{version!r}: this tunewiz reads version {SPEC_VERSION}"))
    spec = _build(RunSpec, raw, "", problems)
    if not problems:
        problems = _cross_checks(spec)
    if problems:
        lines = key_lines(text) if text else {}
        problems = [dataclasses.replace(p, line=p.line or _nearest_line(lines, p.key)) for p in problems]
        raise SpecError(problems, source)
    return spec


def loads(text: str, source: str | None = None) -> RunSpec:
    """Parse TOML text into a validated spec."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise SpecError([Problem("", f"not valid TOML: {exc}", int(match.group(1)) if match else None)],
                        source) from None
    return from_dict(raw, source, text)


def load(path: str | Path) -> RunSpec:
    """Read and validate a spec file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([Problem("", "file not found")], str(path)) from None
    except UnicodeDecodeError as exc:
        raise SpecError([Problem("", f"not UTF-8 text ({exc.reason} at byte {exc.start})")], str(path)) from None
    return loads(text, str(path))


# ---------------------------------------------------------------------------------------------
# Writing


def to_dict(spec: RunSpec) -> dict[str, Any]:
    """The spec as plain data, without unset (None) values, which TOML cannot hold."""

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if v is not None}
        return obj

    data = strip(dataclasses.asdict(spec))
    return {"spec_version": SPEC_VERSION, **data}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        import json

        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def dumps(spec: RunSpec, header: str | None = None) -> str:
    """The spec as canonical TOML; `loads(dumps(s)) == s` and `dumps(loads(dumps(s)))` is identical."""
    data = to_dict(spec)
    out = []
    if header:
        out += [f"# {line}".rstrip() for line in header.splitlines()] + [""]
    for key, value in data.items():
        if key not in SECTIONS:
            out.append(f"{key} = {_toml_value(value)}")
    for section in SECTIONS:
        out += ["", f"[{section}]"]
        for key, value in data[section].items():
            out.append(f"{key} = {_toml_value(value)}")
    return "\n".join(out) + "\n"


def save(spec: RunSpec, path: str | Path, header: str | None = None) -> None:
    """Write the spec atomically."""
    from tunewiz.engine.fileio import atomic_write_text

    atomic_write_text(Path(path), dumps(spec, header))


# ---------------------------------------------------------------------------------------------
# Overrides (`--set training.max_steps=20`)


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value`; the value is read as TOML when it parses, else taken as a plain string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError([Problem("", f"--set {text!r}: expected KEY=VALUE, e.g. training.max_steps=20")])
    value = value.strip()
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key, parsed


def apply_overrides(spec: RunSpec, overrides: list[str], source: str | None = None) -> RunSpec:
    """Return a new spec with `--set` overrides applied and validated."""
    raw = to_dict(spec)
    problems = []
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        target: dict[str, Any] = raw
        for part in parts[:-1]:
            section = target.get(part)
            if part not in SECTIONS or not isinstance(section, dict):
                hint = difflib.get_close_matches(part, SECTIONS, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; sections: {', '.join(SECTIONS)}"
                problems.append(Problem(key, f"--set: unknown section {part!r}{suggestion}"))
                break
            target = section
        else:
            target[parts[-1]] = value
    if problems:
        raise SpecError(problems, source)
    return from_dict(raw, source or "--set")


# ---------------------------------------------------------------------------------------------
# Line numbers for error messages


def key_lines(text: str) -> dict[str, int]:
    """Map dotted keys to the line (1-based) where they are written, for error messages."""
    lines: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.fullmatch(r"\[\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\s*(#.*)?", stripped)
        if header:
            table = header.group(1).replace('"', "").replace("'", "").replace(" ", "")
            lines.setdefault(table, number)
            continue
        assignment = re.match(r"([A-Za-z0-9_.\-\"']+)\s*=", stripped)
        if assignment:
            key = assignment.group(1).replace('"', "").replace("'", "")
            lines.setdefault(f"{table}.{key}" if table else key, number)
    return lines


def _nearest_line(lines: dict[str, int], key: str) -> int | None:
    while key:
        if key in lines:
            return lines[key]
        key = key.rpartition(".")[0]
    return None


def field_docs() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every key, in file order."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        instance = cls()
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = getattr(instance, f.name)
            shown = "unset" if default is None else _toml_value(default)
            rows.append((f"{prefix}{f.name}", _type_name(tp), shown, f.metadata["doc"]))

    walk(RunSpec, "")
    return rows
