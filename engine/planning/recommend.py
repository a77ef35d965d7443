"""From the hardware probe and the catalog, the ranked choices of model, method and settings that fit.

Policy (the guide's advice): rank by what the user will get. The most capable model that fits with margin
comes first (the catalog's quality tier, then size: Llama-3.1-8B-Instruct is the start on 12-24 GiB cards),
and for each model LoRA on 16-bit weights when it fits with margin (better quality, faster), else QLoRA on a
4-bit copy. Smaller models follow as faster alternatives. Gradient checkpointing off and a bigger micro-batch
when memory allows (faster); on a CPU-only machine, the bundled demo model. Memory is in GiB everywhere
(tunewiz.engine.render.memory). Torch-free: the wizard imports it directly.

Several GPUs: a run uses every GPU of the same model as the one with the most free memory (and nearly as
much free memory). A model that fits one of them trains on all of them with data parallel (DDP); one that
only fits when its weights are sharded across them trains with FSDP. The ranking is the same as on one GPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from tunewiz.engine.config import catalog
from tunewiz.engine.config.spec import LoraSpec, Method, RunSpec, Strategy, TrainingSpec
from tunewiz.engine.errors import ModelError
from tunewiz.engine.planning.estimator import CUDA_CONTEXT_BYTES, GIB, MemoryEstimate, ModelArch, Settings, estimate
from tunewiz.engine.planning.hardware import GpuInfo, HardwareReport
from tunewiz.engine.render import memory as gb
from tunewiz.engine.render import method_name
from tunewiz.engine.training import models

DEMO_MODEL = "smollm2-135m-demo"
DEMO_PRESET = "demo"
MARGIN = 0.85  # "fits" leaves 15% of free memory spare; "tight" is above that but below 100%
EFFECTIVE_BATCH = 16
# DDP tokens/s on 2 GPUs over twice that of 1 GPU: 8B LoRA 84%, QLoRA 80% (2 H200s, bench/results/multi_gpu.jsonl).
SCALING = {"lora": 0.84, "qlora": 0.80}
# Fastest first: no checkpointing beats a bigger micro-batch; micro-batch 1 with checkpointing is last.
# "partial" recomputes only some layers (the fewest that fit): full checkpointing adds about a third to a LoRA
# step's FLOPs (half again before the recompute skipped the down projection; bench/results/speed.jsonl: 8B
# LoRA at micro-batch 2 ran 16,089 tok/s without it and 11,986 with it on an H200), a quarter of the layers
# a twelfth.
CONFIGS = ((False, 8), (False, 4), (False, 2), ("partial", 2), (True, 8), (True, 4), (False, 1), (True, 2),
           (True, 1))


FIT_WORDS = {"fits": "fits", "tight": "tight", "too_big": "does not fit"}
"""A choice's fit in words (the `fit` field keeps its short value for JSON)."""
REFERENCE_CARD_BYTES = 24 * GIB
"""The card the CPU-only advice describes ("with a 24 GiB GPU you could...")."""


def batch_words(choice: Choice) -> str:
    """What 'batch 2x8' means, in words."""
    mb, acc = choice.micro_batch_size, choice.gradient_accumulation
    return (f"Batch {mb}x{acc}: {mb} sequence{'s' if mb > 1 else ''} of up to {choice.max_seq_length} tokens per "
            f"step, gradients added up over {acc} step{'s' if acc > 1 else ''} ({mb * acc} per update).")


@dataclass(frozen=True)
class Choice:
    """One way to train one model on this machine, with its memory estimate and why."""

    model: str
    method: Method
    micro_batch_size: int
    gradient_accumulation: int
    max_seq_length: int
    gradient_checkpointing: bool
    estimate: MemoryEstimate
    available_bytes: int | None
    fit: str  # "fits" | "tight" | "too_big"
    reason: str
    checkpoint_layers: int | None = None  # with checkpointing: how many layers recompute (None: all)
    gpus: int = 1  # GPUs the run uses; the estimate is per GPU
    strategy: Strategy = "ddp"  # how several GPUs share the work: "ddp" (a whole model on each) or "fsdp" (sharded)
    gpu_ids: tuple[int, ...] = ()  # which visible GPUs (CUDA order); () on a CPU or for a hypothetical card
    on_gpu: bool = True  # False: the run trains on the CPU, in RAM, with no CUDA context
    offload_checkpoints: bool = False  # checkpointed layers' inputs wait in CPU memory (one GPU only)

    @property
    def needed_bytes(self) -> int:
        """What must be free: on a GPU the estimate plus the CUDA context (on each GPU, for several); on the CPU
        the estimate alone."""
        return self.estimate.total + (CUDA_CONTEXT_BYTES if self.on_gpu else 0)

    @property
    def training_gpus(self) -> int | list[int]:
        """`training.gpus` for this choice: a count when it is the first GPUs, else their indices."""
        if not self.gpu_ids or self.gpu_ids == tuple(range(len(self.gpu_ids))):
            return self.gpus
        return list(self.gpu_ids)

    def apply(self, spec: RunSpec) -> RunSpec:
        """A copy of `spec` with this choice's model, method, batch settings and GPUs."""
        strategy = self.strategy if self.gpus > 1 else _DEFAULT_STRATEGY
        return dataclasses.replace(
            spec, method=self.method, model=dataclasses.replace(spec.model, name=self.model),
            speed=dataclasses.replace(spec.speed, offload_checkpoints=self.offload_checkpoints),
            training=dataclasses.replace(spec.training, micro_batch_size=self.micro_batch_size,
                                         gradient_accumulation=self.gradient_accumulation,
                                         max_seq_length=self.max_seq_length,
                                         gradient_checkpointing=self.gradient_checkpointing,
                                         checkpoint_layers=self.checkpoint_layers,
                                         gpus=self.training_gpus, strategy=strategy))


    def train_overrides(self, dataset: str) -> list[str]:
        """`--set KEY=VALUE` overrides that turn the demo preset into this choice trained on catalog `dataset`
        (with the settings the recommendation assumed): the command `recommend` suggests."""
        entry = catalog.datasets()[dataset]
        sets = {"model.name": self.model, "method": self.method, "dataset.preset": dataset,
                "training.epochs": entry.epochs, "training.max_seq_length": self.max_seq_length,
                "training.micro_batch_size": self.micro_batch_size,
                "training.gradient_accumulation": self.gradient_accumulation,
                "training.gradient_checkpointing": str(self.gradient_checkpointing).lower(),
                "lora.dropout": LoraSpec().dropout}  # the estimate's (the demo's 0.05 keeps more in a recompute)
        if self.checkpoint_layers is not None:
            sets["training.checkpoint_layers"] = self.checkpoint_layers
        if self.offload_checkpoints:
            sets["speed.offload_checkpoints"] = "true"
        if entry.format == "preference":  # pairs teach through a preference objective
            sets["training.objective"] = "dpo"
        if self.gpus > 1:
            sets["training.gpus"] = json.dumps(self.training_gpus).replace(" ", "")
            sets["training.strategy"] = self.strategy
        from tunewiz.engine.config import presets
        from tunewiz.engine.config import spec as spec_mod

        demo = presets.resolve(DEMO_PRESET)[0]
        overrides = [f"{key}={value}" for key, value in sets.items()]
        return [o for o in overrides if spec_mod.apply_overrides(demo, [o], source=DEMO_PRESET) != demo]


_DEFAULT_STRATEGY: Strategy = TrainingSpec().strategy


@dataclass(frozen=True)
class Recommendation:
    """Ranked choices (best first) and a one-paragraph summary for a beginner."""

    choices: list[Choice]
    summary: str
    available_bytes: int | None


def _fit(needed: int, available: int | None) -> str:
    if available is None:
        return "fits"
    if needed <= available * MARGIN:
        return "fits"
    return "tight" if needed <= available else "too_big"


def _best_config(arch: ModelArch, method: Method, seq_len: int, available: int | None, gpus: int = 1,
                 fsdp: bool = False, objective: str = "sft") -> tuple[Settings, MemoryEstimate]:
    """The fastest settings that fit with margin, else the leanest ones.

    On several GPUs a micro-batch is left out when the GPUs together would pass more sequences than the
    effective batch (the run could not keep it: tunewiz.engine.training.distributed.keep_effective_batch).
    With checkpointing on one GPU, a setting that does not fit is tried again with the checkpointed layers'
    inputs in CPU memory (`speed.offload_checkpoints`: at the same speed within the noise, docs/speed.md).
    """
    leanest = None
    for checkpointing, micro_batch in CONFIGS:
        if micro_batch * gpus > max(EFFECTIVE_BATCH, gpus):
            continue
        offloads = (False, True) if checkpointing and gpus == 1 else (False,)
        for layers, offload in itertools.product(
                _partial_checkpointing(arch.layers) if checkpointing == "partial" else (None,), offloads):
            settings = Settings(method=method, micro_batch_size=micro_batch, seq_len=seq_len,
                                gradient_checkpointing=bool(checkpointing), gpus=gpus, fsdp=fsdp,
                                checkpoint_layers=layers, objective=objective, offload_checkpoints=offload)
            result = estimate(arch, settings)
            if _fit(result.total + CUDA_CONTEXT_BYTES, available) == "fits":
                return settings, result
        leanest = (settings, result)
    assert leanest is not None
    return leanest


def _checkpointing_words(arch: ModelArch, settings: Settings) -> str:
    if not settings.gradient_checkpointing:
        return "off: faster"
    where = ", their inputs kept in CPU memory" if settings.offload_checkpoints else ""
    if settings.checkpoint_layers is None:
        return f"on{where}"
    return f"on for {settings.checkpoint_layers} of {arch.layers} layers: the fewest that fit{where}"


def _partial_checkpointing(layers: int) -> tuple[int, ...]:
    """Checkpointed layer counts to try, fewest (fastest) first: a quarter, half, three quarters of them."""
    return tuple(sorted({max(1, layers * quarter // 4) for quarter in (1, 2, 3)}))


@dataclass(frozen=True)
class _Gpus:
    """The GPUs a run would use: their visible indices, the free memory of each (the least of them), the card."""

    ids: tuple[int, ...]
    free: int | None
    card: GpuInfo | None

    @property
    def count(self) -> int:
        return max(len(self.ids), 1)


def _choice(name: str, arch: ModelArch, seq_len: int, gpus: _Gpus, label: str, objective: str = "sft") -> Choice:
    """The best way to train one model on these GPUs: as on one GPU, with DDP across several when it fits one,
    sharded with FSDP when only that fits (or when neither does: then it is the nearer miss)."""
    ddp = _method_choice(name, arch, seq_len, gpus, label, "ddp", objective)
    if gpus.count == 1 or ddp.fit == "fits":
        return ddp
    fsdp = _method_choice(name, arch, seq_len, gpus, label, "fsdp", objective)
    order = ("fits", "tight", "too_big")
    return fsdp if order.index(fsdp.fit) < order.index(ddp.fit) or ddp.fit == "too_big" else ddp


def _speedup(gpus: int) -> str:
    """The expected DDP speed-up over one GPU, from the scaling measured on 2 GPUs."""
    low, high = sorted(SCALING.values())
    return (f"about {gpus * low:.1f}–{gpus * high:.1f}× as fast as one GPU ({100 * low:.0f}–{100 * high:.0f}% "
            f"scaling measured for 8B on 2 GPUs{'; more GPUs not measured' if gpus > 2 else ''})")


def _method_choice(name: str, arch: ModelArch, seq_len: int, gpus: _Gpus, label: str, strategy: Strategy,
                   objective: str = "sft") -> Choice:
    """LoRA when it fits, else QLoRA; on several GPUs with `strategy` ("fsdp": the weights sharded across them).
    A preference `objective` (dpo, orpo) runs two sequences per example (engine/planning/estimator.py)."""
    count, available = gpus.count, gpus.free
    fsdp = strategy == "fsdp"
    lora_settings, lora = _best_config(arch, "lora", seq_len, available, count, fsdp, objective)
    lora_fit = _fit(lora.total + CUDA_CONTEXT_BYTES, available)
    if lora_fit == "fits":
        settings, result, fit = lora_settings, lora, lora_fit
    else:
        settings, result = _best_config(arch, "qlora", seq_len, available, count, fsdp, objective)
        fit = _fit(result.total + CUDA_CONTEXT_BYTES, available)
    needed = result.total + CUDA_CONTEXT_BYTES
    method = method_name(settings.method)
    how = "" if count == 1 else f" sharded over {count} GPUs (FSDP)" if fsdp else f" on {count} GPUs (DDP)"
    each = " on each GPU" if count > 1 else ""
    owner = "each GPU's" if count > 1 else "your"
    have = f"of {owner} {gb(available)} free" if available else ""
    if fit == "too_big":
        reason = (f"{label} needs about {gb(needed)}{each} even with QLoRA{how}; you have "
                  f"{gb(available or 0)} free{each}")
    else:
        reason = f"{label} with {method}{how} needs about {gb(needed)} {have}".rstrip()
        if settings.method == "qlora":
            reason += f"; with LoRA it would need about {gb(lora.total + CUDA_CONTEXT_BYTES)}"
        reason += (f" (micro-batch {settings.micro_batch_size} x {seq_len} tokens, checkpointing "
                   f"{_checkpointing_words(arch, settings)})")
        if fit == "tight":
            reason += "; tight: close other GPU programs or shorten the sequences"
        if fsdp:
            reason += ("; FSDP gathers each layer's weights as it computes, so it is slower than DDP would be "
                       "(not measured yet)")
            if settings.method == "qlora":
                reason += "; the 4-bit weights are stored as bf16 so that FSDP can shard them"
        elif count > 1:
            reason += f"; DDP runs {_speedup(count)}"
    entry = catalog.models().get(name)
    if entry is not None and entry.gated:
        reason += ". Gated: accept its licence on the Hugging Face hub and log in first"
    elif entry is not None and entry.mirror_of:
        reason += f". Ungated copy of {entry.mirror_of}; the Llama licence still applies"
    return Choice(model=name, method=settings.method, micro_batch_size=settings.micro_batch_size,
                  gradient_accumulation=max(1, EFFECTIVE_BATCH // settings.micro_batch_size),
                  max_seq_length=seq_len, gradient_checkpointing=settings.gradient_checkpointing,
                  checkpoint_layers=settings.checkpoint_layers,
                  estimate=result, available_bytes=available, fit=fit, reason=reason, gpus=count,
                  strategy=strategy, gpu_ids=gpus.ids, offload_checkpoints=settings.offload_checkpoints)


def _gpus(report: HardwareReport, vram_bytes: int | None, limit: int | None = None) -> _Gpus:
    """The GPUs a run uses: every GPU of the same model as the one with the most free memory, with at least
    MARGIN of its free memory (at most `limit` of them); a hypothetical card of `vram_bytes`; or none."""
    if vram_bytes is not None:
        return _Gpus((), vram_bytes, None)
    usable = [(i, g) for i, g in enumerate(report.gpus) if g.memory_free_bytes is not None]
    if not usable:
        return _Gpus((), None, None)
    names = [g.name for _, g in usable]
    # the most free memory; on a tie, the model of which there are most
    best_index, best = max(usable, key=lambda pair: (pair[1].memory_free_bytes or 0, names.count(pair[1].name)))
    best_free = best.memory_free_bytes or 0
    same = [(i, g) for i, g in usable if g.name == best.name and (g.memory_free_bytes or 0) >= best_free * MARGIN]
    if limit is not None and len(same) > limit:
        same = [(best_index, best)] if limit == 1 else same[:limit]
    return _Gpus(tuple(i for i, _ in same), min(g.memory_free_bytes or 0 for _, g in same), best)


def _rank(choice: Choice, entry: catalog.ModelEntry) -> tuple[int, ...]:
    """Best first: what fits with margin (one GPU's model with DDP before a sharded one, then the catalog's
    quality tier, ungated before gated since gated models need a hub login first, bigger before smaller),
    then tight ones (bigger first), then too big ones (nearest to fitting first)."""
    if choice.fit == "fits":
        return 0, choice.gpus > 1 and choice.strategy == "fsdp", entry.tier, entry.gated, -entry.params
    if choice.fit == "tight":
        return 1, entry.gated, -entry.params
    return 2, entry.gated, entry.params


def _alternative(choice: Choice, first: Choice, params: dict[str, int]) -> Choice:
    """A fitting choice below the first, with how it compares in its reason."""
    if choice.fit != "fits" or first.fit != "fits" or choice is first:
        return choice
    label = catalog.models()[first.model].description.split(":")[0]
    if params[choice.model] < params[first.model]:
        words = f"Faster alternative: smaller than {label}. "
    elif params[choice.model] > params[first.model]:
        words = f"Bigger than {label}, slower per step. "
    else:
        return choice
    return dataclasses.replace(choice, reason=words + choice.reason)


def _cpu_recommendation(report: HardwareReport, seq_len: int) -> Recommendation:
    from tunewiz.engine.config import presets

    demo = presets.resolve(DEMO_PRESET)[0]
    card = recommend(report, seq_len, vram_bytes=REFERENCE_CARD_BYTES).choices[0]
    label = catalog.models()[card.model].description.split(":")[0]
    data = catalog.datasets()[demo.dataset.preset or ""]
    choice = dataclasses.replace(
        spec_choice(demo, report, data.longest_tokens),  # as the Review step will, once the data check ran
        reason="No NVIDIA GPU here, so tunewiz trains the small bundled demo model on the CPU (a few minutes). "
               f"With a {gb(REFERENCE_CARD_BYTES)} GPU the first choice would be {label} with "
               f"{method_name(card.method)}.")
    summary = ("No GPU found: the demo model trains on the CPU. " + (report.nvml_error or "")).strip()
    return Recommendation([choice], summary, None)


def recommend(report: HardwareReport, seq_len: int = 2048, vram_bytes: int | None = None,
              gpus: int | None = None, objective: str = "sft") -> Recommendation:
    """Ranked choices for this machine (or for one card of `vram_bytes`, to see advice for another GPU).

    `gpus` caps how many of this machine's GPUs a run may use (None: all those of the best model; 1: one).
    `objective`: training.objective; preference pairs (dpo, orpo) need about twice the activation memory.
    """
    group = _gpus(report, vram_bytes, gpus)
    available = group.free
    if available is None:
        return _cpu_recommendation(report, seq_len)
    entries = catalog.ranked_models()
    choices = [_choice(name, ModelArch.from_entry(entry), seq_len, group, entry.description.split(":")[0], objective)
               for name, entry in entries.items()]
    choices.sort(key=lambda c: _rank(c, entries[c.model]))
    params = {name: entry.params for name, entry in entries.items()}
    ranked = [_alternative(c, choices[0], params) for c in choices]
    gpu = group.card
    if gpu is None:
        where = f"a GPU with {gb(available)} free"
    elif group.count > 1:
        where = f"{group.count} × {gpu.name} with {gb(available)} free each"
    else:
        where = f"{gpu.name} with {gb(available)} free"
    fitting = [c for c in ranked if c.fit == "fits"]
    summary = f"On {where}: " + (ranked[0].reason if fitting
                                 else _shorter(report, seq_len, vram_bytes, gpus, objective))
    if gpu is not None and len(report.gpus) > 1:
        summary += f" ({len(report.gpus)} GPUs found; {_uses(report, group, gpus)}.)"
    held = sum(g.other_processes_bytes for g in report.gpus)
    if held and vram_bytes is None:
        summary += f" Other programs hold {gb(held)} of GPU memory."
    return Recommendation(ranked, summary, available)


SHORTEST_SEQ_LEN = 256
"""The shortest data the advice looks for when nothing fits (the bundled demo data's length)."""


def _shorter(report: HardwareReport, seq_len: int, vram_bytes: int | None, gpus: int | None,
             objective: str = "sft") -> str:
    """When nothing fits at `seq_len`: the longest shorter length at which a model fits, and which one."""
    shorter = seq_len // 2
    while shorter >= SHORTEST_SEQ_LEN:
        first = recommend(report, shorter, vram_bytes, gpus, objective).choices[0]
        if first.fit == "fits":
            label = catalog.models()[first.model].description.split(":")[0]
            return (f"nothing fits with margin at {seq_len} tokens; with data of at most {shorter} tokens "
                    f"{label} with {method_name(first.method)} fits (pick shorter data, or `tunewiz recommend "
                    f"--seq-len {shorter}`).")
        shorter //= 2
    return f"no catalog model fits with margin, even at {SHORTEST_SEQ_LEN} tokens; free GPU memory or use a bigger GPU."


def _uses(report: HardwareReport, group: _Gpus, limit: int | None) -> str:
    """Which of several GPUs a run uses, in words."""
    if group.count == 1:
        if limit == 1:
            return "this advice is for one of them"
        return "a run uses one: the others are another model or have less memory free"
    if group.count == len(report.gpus):
        return f"a run uses {'both' if group.count == 2 else f'all {group.count}'}"
    listed = ", ".join(str(i) for i in group.ids)
    return f"a run uses the {group.count} of the same model with the most memory free (GPUs {listed})"


def arch_for(model: str) -> ModelArch:
    """Architecture of a catalog model, a local model folder, or a hub id (reads its config.json)."""
    entries = catalog.models()
    if model in entries:
        return ModelArch.from_entry(entries[model])
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} has no config.json", hint="point at a model folder")
        return _arch_from(path / "config.json")
    if path.suffix == ".gguf":
        raise ModelError("cannot estimate a .gguf file before it is converted", hint="train it once, or use a hub id")
    models.check_hub_id(model, "model")
    try:
        from huggingface_hub import hf_hub_download

        return _arch_from(Path(hf_hub_download(model, "config.json")))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated repo...
        raise ModelError(f"cannot read the config of {model!r}: {exc}",
                         hint="check the id (org/name) and the internet connection; gated models need "
                              "`huggingface-cli login`") from None


def _arch_from(path: Path) -> ModelArch:
    try:
        return ModelArch.from_config(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path}: {exc}") from None


def estimate_spec(spec: RunSpec, on_gpu: bool = True, longest: int | None = None) -> MemoryEstimate:
    """The memory estimate of exactly this spec's model and settings, as the engine runs them here: on the CPU
    without the fused kernels (they are GPU kernels). `longest`: the data's longest example in tokens, measured
    by the data check; without packing no batch is longer, so it caps the sequence length."""
    settings = Settings.from_spec(spec)
    if not on_gpu:
        settings = dataclasses.replace(settings, fused_kernels="off", gpus=1, fsdp=False, cpu=True)
    if longest and not spec.training.packing:
        settings = dataclasses.replace(settings, seq_len=max(1, min(settings.seq_len, longest)))
    return estimate(arch_for(spec.model.name), settings)


def spec_choice(spec: RunSpec, report: HardwareReport, longest: int | None = None) -> Choice:
    """The one memory number for a spec about to launch: its estimate (estimate_spec) against what this machine
    has free (each of the GPUs it trains on, with the CUDA context; or RAM on a CPU, without). Checked against
    the demo preset on a 2-core CPU: estimate 1.6 GiB, measured peak RSS 1.74 GiB with the fused LoRA blocks."""
    on_gpu = report.has_gpu
    result = estimate_spec(spec, on_gpu, longest)
    count = Settings.from_spec(spec).gpus
    group = _gpus(report, None, count) if on_gpu else _Gpus((), report.ram_available_bytes, None)
    needed = result.total + (CUDA_CONTEXT_BYTES if on_gpu else 0)
    fit = _fit(needed, group.free)
    where = ("free on each GPU" if count > 1 else "free") if on_gpu else "of RAM free"
    reason = (f"{spec.model.name} with {method_name(spec.method)} as set needs about {gb(needed)} of "
              f"{gb(group.free)} {where}" if group.free else f"{spec.model.name} needs about {gb(needed)}")
    t = spec.training
    return Choice(model=spec.model.name, method=spec.method, micro_batch_size=t.micro_batch_size,
                  gradient_accumulation=t.gradient_accumulation, max_seq_length=t.max_seq_length,
                  gradient_checkpointing=t.gradient_checkpointing, estimate=result, available_bytes=group.free,
                  fit=fit, reason=reason, checkpoint_layers=t.checkpoint_layers, gpus=count,
                  strategy=t.strategy, gpu_ids=group.ids, on_gpu=on_gpu,
                  offload_checkpoints=spec.speed.offload_checkpoints)


def choice_for(model: str, report: HardwareReport, seq_len: int = 2048, vram_bytes: int | None = None,
               gpus: int | None = None, objective: str = "sft") -> Choice:
    """The best way to train one given model here (catalog name, hub id or local folder); `gpus` as for
    `recommend`."""
    label = catalog.models()[model].description.split(":")[0] if model in catalog.models() else model
    return _choice(model, arch_for(model), seq_len, _gpus(report, vram_bytes, gpus), label, objective)
