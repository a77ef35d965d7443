"""From the hardware probe and the catalog, the ranked choices of model, method and settings that fit.

Policy: LoRA on 16-bit weights when it fits with margin (better quality, faster); QLoRA when only
4-bit weights fit; gradient checkpointing off and a bigger micro-batch when memory allows (faster);
on a CPU-only machine, the bundled demo model. Torch-free: the wizard imports it directly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from engine import catalog
from engine.errors import ModelError
from engine.estimator import CUDA_CONTEXT_BYTES, GIB, MemoryEstimate, ModelArch, Settings, estimate
from engine.hardware import GpuInfo, HardwareReport
from engine.spec import RunSpec

DEMO_MODEL = "smollm2-135m-demo"
MARGIN = 0.85  # "fits" leaves 15% of free memory spare; "tight" is above that but below 100%
EFFECTIVE_BATCH = 16
# Fastest first: no checkpointing beats a bigger micro-batch; micro-batch 1 with checkpointing is last.
CONFIGS = ((False, 8), (False, 4), (False, 2), (True, 8), (True, 4), (False, 1), (True, 2), (True, 1))


def gb(n: float) -> str:
    return f"{n / 1e9:.0f} GB" if n >= 10e9 else f"{n / 1e9:.1f} GB"


@dataclass(frozen=True)
class Choice:
    """One way to train one model on this machine, with its memory estimate and why."""

    model: str
    method: str
    micro_batch_size: int
    gradient_accumulation: int
    max_seq_length: int
    gradient_checkpointing: bool
    estimate: MemoryEstimate
    available_bytes: int | None
    fit: str  # "fits" | "tight" | "too_big"
    reason: str

    @property
    def needed_bytes(self) -> int:
        """The estimate plus the CUDA context: what must be free on the GPU."""
        return self.estimate.total + CUDA_CONTEXT_BYTES

    def apply(self, spec: RunSpec) -> RunSpec:
        """A copy of `spec` with this choice's model, method and batch settings."""
        return dataclasses.replace(
            spec, method=self.method, model=dataclasses.replace(spec.model, name=self.model),
            training=dataclasses.replace(spec.training, micro_batch_size=self.micro_batch_size,
                                         gradient_accumulation=self.gradient_accumulation,
                                         max_seq_length=self.max_seq_length,
                                         gradient_checkpointing=self.gradient_checkpointing))


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


def _best_config(arch: ModelArch, method: str, seq_len: int, available: int | None) -> tuple[Settings, MemoryEstimate]:
    """The fastest settings that fit with margin, else the leanest ones."""
    leanest = None
    for checkpointing, micro_batch in CONFIGS:
        settings = Settings(method=method, micro_batch_size=micro_batch, seq_len=seq_len,
                            gradient_checkpointing=checkpointing)
        result = estimate(arch, settings)
        if _fit(result.total + CUDA_CONTEXT_BYTES, available) == "fits":
            return settings, result
        leanest = (settings, result)
    assert leanest is not None
    return leanest


def _choice(name: str, arch: ModelArch, seq_len: int, available: int | None, label: str) -> Choice:
    lora_settings, lora = _best_config(arch, "lora", seq_len, available)
    lora_fit = _fit(lora.total + CUDA_CONTEXT_BYTES, available)
    if lora_fit == "fits":
        settings, result, fit = lora_settings, lora, lora_fit
    else:
        settings, result = _best_config(arch, "qlora", seq_len, available)
        fit = _fit(result.total + CUDA_CONTEXT_BYTES, available)
    needed = result.total + CUDA_CONTEXT_BYTES
    method = "QLoRA" if settings.method == "qlora" else "LoRA"
    have = f"of your {gb(available)} free" if available else ""
    if fit == "too_big":
        reason = f"{label} needs about {gb(needed)} even with QLoRA; you have {gb(available or 0)} free"
    else:
        reason = f"{label} with {method} needs about {gb(needed)} {have}".rstrip()
        if settings.method == "qlora":
            reason += f"; with LoRA it would need about {gb(lora.total + CUDA_CONTEXT_BYTES)}"
        reason += (f" (micro-batch {settings.micro_batch_size} x {seq_len} tokens, checkpointing "
                   f"{'on' if settings.gradient_checkpointing else 'off: faster'})")
        if fit == "tight":
            reason += "; tight: close other GPU programs or shorten the sequences"
    entry = catalog.models().get(name)
    if entry is not None and entry.gated:
        reason += ". Gated: accept its licence on the Hugging Face hub and log in first"
    return Choice(model=name, method=settings.method, micro_batch_size=settings.micro_batch_size,
                  gradient_accumulation=max(1, EFFECTIVE_BATCH // settings.micro_batch_size),
                  max_seq_length=seq_len, gradient_checkpointing=settings.gradient_checkpointing,
                  estimate=result, available_bytes=available, fit=fit, reason=reason)


def _available(report: HardwareReport, vram_bytes: int | None) -> tuple[int | None, GpuInfo | None]:
    if vram_bytes is not None:
        return vram_bytes, None
    gpus = [g for g in report.gpus if g.memory_free_bytes is not None]
    if not gpus:
        return None, None
    best = max(gpus, key=lambda g: g.memory_free_bytes or 0)
    return best.memory_free_bytes, best


def _rank(choice: Choice, params: int) -> tuple[int, bool, int]:
    """Best first: LoRA that fits, QLoRA that fits, tight, too big; ungated before gated (gated
    models need a hub login first); bigger before smaller (too-big ones: nearest to fitting first)."""
    bucket = {"fits": 0 if choice.method == "lora" else 1, "tight": 2, "too_big": 3}[choice.fit]
    entry = catalog.models().get(choice.model)
    return bucket, bool(entry and entry.gated), -params if choice.fit != "too_big" else params


def _cpu_recommendation(report: HardwareReport, seq_len: int) -> Recommendation:
    entry = catalog.models()[DEMO_MODEL]
    arch = ModelArch.from_entry(entry)
    settings = Settings(method="lora", micro_batch_size=4, seq_len=min(seq_len, 256), gradient_checkpointing=False)
    choice = Choice(model=DEMO_MODEL, method="lora", micro_batch_size=4, gradient_accumulation=1,
                    max_seq_length=settings.seq_len, gradient_checkpointing=False,
                    estimate=estimate(arch, settings), available_bytes=report.ram_available_bytes, fit="fits",
                    reason="No NVIDIA GPU here, so tunewiz trains the small bundled demo model on the CPU "
                           "(a few minutes). With a 24 GB GPU you could fine-tune a 7-8B model with QLoRA.")
    summary = ("No GPU found: the demo model trains on the CPU. " + (report.nvml_error or "")).strip()
    return Recommendation([choice], summary, None)


def recommend(report: HardwareReport, seq_len: int = 2048, vram_bytes: int | None = None) -> Recommendation:
    """Ranked choices for this machine (or for a card of `vram_bytes`, to see advice for another GPU)."""
    available, gpu = _available(report, vram_bytes)
    if available is None:
        return _cpu_recommendation(report, seq_len)
    choices = []
    for name, entry in catalog.models().items():
        if entry.bundled_gguf:
            continue  # the CPU demo; its hub twin is in the catalog for GPUs
        choices.append((_choice(name, ModelArch.from_entry(entry), seq_len, available, entry.description.split(":")[0]),
                        entry.params))
    choices.sort(key=lambda pair: _rank(*pair))
    ranked = [c for c, _ in choices]
    where = f"{gpu.name} with {gb(available)} free" if gpu else f"a {gb(available)} GPU"
    fitting = [c for c in ranked if c.fit == "fits"]
    summary = f"On {where}: " + (ranked[0].reason if fitting else "no catalog model fits with margin; "
                                  "try a shorter max sequence length or free GPU memory.")
    others = [g for g in report.gpus if g is not gpu and vram_bytes is None]
    if others:
        summary += f" ({len(report.gpus)} GPUs found; a run uses one.)"
    held = sum(g.other_processes_bytes for g in report.gpus)
    if held and vram_bytes is None:
        summary += f" Other programs hold {gb(held)} of GPU memory."
    return Recommendation(ranked, summary, available)


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


def estimate_spec(spec: RunSpec) -> MemoryEstimate:
    """The memory estimate of exactly this spec's model and settings (for a review screen)."""
    return estimate(arch_for(spec.model.name), Settings.from_spec(spec))


def choice_for(model: str, report: HardwareReport, seq_len: int = 2048, vram_bytes: int | None = None) -> Choice:
    """The best way to train one given model here (catalog name, hub id or local folder)."""
    available, _ = _available(report, vram_bytes)
    label = catalog.models()[model].description.split(":")[0] if model in catalog.models() else model
    return _choice(model, arch_for(model), seq_len, available, label)
