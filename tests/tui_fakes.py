"""Fakes for the wizard's services: simulated hardware (no GPU, 24 GiB, 80 GiB), a recommender that follows the
tunewiz.engine.planning.recommend contract, a canned data checker and a launcher that records the spec it was given."""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.errors import ModelError
from tunewiz.engine.planning.devices import GpuInfo, GpuProcess
from tunewiz.engine.planning.estimator import MemoryEstimate
from tunewiz.engine.planning.hardware import HardwareReport
from tunewiz.engine.planning.recommend import Choice, Recommendation
from tunewiz.engine.run import rundir
from tunewiz.tui.services import Services
from tunewiz.tui.wizard import CheckRequest

GB = 10**9
GIB = 1024**3


def _common(**extra: Any) -> dict[str, Any]:
    base = dict(cpu_count=16, ram_total_bytes=64 * GIB, ram_available_bytes=48 * GIB, disk_path="/home/user",
                disk_free_bytes=500 * GIB, libraries_checked=True, torch_version="2.6.0")
    return {**base, **extra}


def no_gpu_report() -> HardwareReport:
    return HardwareReport(**_common(cpu_count=2, ram_total_bytes=8 * GIB, ram_available_bytes=5 * GIB),
                          nvml_error="NVML not found: no NVIDIA driver is installed",
                          warnings=["No NVIDIA GPU available: tunewiz will train on the CPU, which is only practical "
                                    "for the tiny demo model."])


def gpu24_report(bitsandbytes: bool = True) -> HardwareReport:
    """An RTX 4090 with 2 GiB held by another program (a desktop session)."""
    gpu = GpuInfo(index=0, name="NVIDIA GeForce RTX 4090", cuda_index=0, memory_total_bytes=24 * GIB,
                  memory_used_bytes=2 * GIB, memory_free_bytes=22 * GIB, compute_capability=(8, 9),
                  bf16_supported=True, other_processes=[GpuProcess(1234, "Xorg", 2 * GIB)])
    warnings = ["Other processes hold 2.0 GiB on GPU 0 (NVIDIA GeForce RTX 4090): Xorg (pid 1234, 2.0 GiB). That "
                "memory is not available for training."]
    if not bitsandbytes:
        warnings.append("bitsandbytes is not installed, so QLoRA (4-bit) is unavailable; plain LoRA still works. "
                        "Install it with `pip install bitsandbytes`.")
    return HardwareReport(**_common(torch_cuda="12.4", bitsandbytes="0.45.0" if bitsandbytes else None), gpus=[gpu],
                          driver_version="550.54", cuda_driver_version="12.4", total_gpu_count=1, warnings=warnings)


def gpu80_report(count: int = 1) -> HardwareReport:
    """One H100 80GB, or `count` of them."""
    gpus = [GpuInfo(index=i, name="NVIDIA H100 80GB HBM3", cuda_index=i, memory_total_bytes=80 * GIB,
                    memory_used_bytes=1 * GIB, memory_free_bytes=79 * GIB, compute_capability=(9, 0),
                    bf16_supported=True) for i in range(count)]
    return HardwareReport(**_common(torch_cuda="12.4", bitsandbytes="0.45.0"), gpus=gpus, driver_version="550.54",
                          cuda_driver_version="12.4", total_gpu_count=count)


def gpu80x2_report() -> HardwareReport:
    return gpu80_report(2)


def estimate(weights: int, adapters_optimizer: int = 300 * 10**6, activations: int = 1 * GB,
             logits: int = 500 * 10**6, overhead: int = 700 * 10**6) -> MemoryEstimate:
    """A memory estimate whose weights are `weights`, the rest typical of a small run."""
    return MemoryEstimate(weights, adapters_optimizer, activations, logits, overhead)


def demo_choice(available: int | None) -> Choice:
    return Choice("smollm2-135m-demo", "lora", 4, 1, 2048, False, estimate(270 * 10**6), available, "fits",
                      "The bundled demo model: small enough to train on a CPU in minutes.")


def fake_recommend(report: HardwareReport, seq_len: int = 2048, vram_bytes: int | None = None,
                   gpus: int | None = None) -> Recommendation:
    free = report.best_gpu_free_bytes
    count = len(report.gpus) if gpus is None else min(gpus, len(report.gpus))
    if count > 1 and free is not None and free >= 40 * GIB:
        choices = [
            Choice("qwen2.5-32b", "lora", 2, 8, seq_len, True, estimate(36 * GB), free, "fits",
                       "Qwen2.5-32B with LoRA sharded over 2 GPUs (FSDP) needs about 40 GiB of each GPU's 85 GiB "
                       "free.", gpus=count, strategy="fsdp"),
            Choice("llama-3.1-8b", "lora", 8, 2, seq_len, False, estimate(16 * GB), free, "fits",
                       "Llama-3.1-8B with LoRA on 2 GPUs (DDP) needs about 30 GiB of each GPU's 85 GiB free; DDP "
                       "runs about 1.6-1.7x as fast as one GPU.", gpus=count),
            Choice("llama-3.1-70b", "qlora", 1, 16, seq_len, True, estimate(38 * GB), free, "fits",
                       "Llama-3.1-70B with QLoRA on 2 GPUs (DDP) needs about 45 GiB of each GPU's 85 GiB.",
                       gpus=count),
            dataclasses.replace(demo_choice(free), gpus=count),
        ]
        return Recommendation(choices, f"Your {count} 80 GiB GPUs fit 32B models with LoRA sharded (FSDP) "
                                           "and 8B models on each (DDP).", free)
    if free is None:
        return Recommendation([demo_choice(None)], "No GPU: only the tiny demo model is practical here.", None)
    if free < 40 * GIB:
        choices = [
            Choice("llama-3.1-8b", "qlora", 2, 8, seq_len, True, estimate(5 * GB), free, "fits",
                       "Llama-3.1-8B with QLoRA needs about 9 GiB of your 22 GiB free."),
            Choice("qwen2.5-3b", "lora", 4, 4, seq_len, True, estimate(6 * GB), free, "fits",
                       "Qwen2.5-3B with LoRA needs about 10 GiB."),
            Choice("llama-3.1-8b", "lora", 1, 16, seq_len, True, estimate(16 * GB), free, "tight",
                       "Llama-3.1-8B with LoRA needs about 21 GiB of your 22 GiB: tight."),
            Choice("llama-3.1-70b", "qlora", 1, 16, seq_len, True, estimate(38 * GB), free, "too_big",
                       "Llama-3.1-70B with QLoRA needs about 45 GiB: too big for this GPU."),
            demo_choice(free),
        ]
        return Recommendation(choices, "Your 24 GiB GPU fits 8B models with QLoRA or 3B models with LoRA.", free)
    choices = [
        Choice("llama-3.1-8b", "lora", 8, 2, seq_len, False, estimate(16 * GB), free, "fits",
                   "Llama-3.1-8B with LoRA needs about 30 GiB of your 79 GiB free."),
        Choice("llama-3.1-70b", "qlora", 1, 16, seq_len, True, estimate(38 * GB), free, "fits",
                   "Llama-3.1-70B with QLoRA needs about 45 GiB of your 79 GiB."),
        demo_choice(free),
    ]
    return Recommendation(choices, "Your 80 GiB GPU fits 8B models with LoRA and 70B with QLoRA.", free)


def fake_choice_for(model: str, report: HardwareReport, seq_len: int = 2048, gpus: int | None = None) -> Choice:
    free = report.best_gpu_free_bytes
    for choice in fake_recommend(report, seq_len, gpus=gpus).choices:
        if choice.model == model:
            return choice
    if model == "Qwen/Qwen2.5-0.5B-Instruct":
        count = len(report.gpus) if gpus is None else min(gpus, len(report.gpus))
        return Choice(model, "lora", 8, 2, seq_len, False, estimate(1 * GB), free, "fits",
                          "Qwen2.5-0.5B-Instruct with LoRA needs about 3.5 GiB.", gpus=max(count, 1))
    raise ModelError(f"{model} is neither a catalog model, a local folder nor a hub id we can read",
                     hint="check the spelling, e.g. Qwen/Qwen2.5-0.5B-Instruct")


def demo_check_report(request: CheckRequest) -> dict[str, Any]:
    return {
        "source": f"{request.target} (offline sample)", "model": request.model,
        "max_seq_length": request.max_seq_len, "format": "messages", "rows": 320, "examples": 318,
        "problem_counts": {"empty_field": 2}, "skipped": 2, "ok": False,
        "problems": [{"line": 17, "where": "train.jsonl:17", "kind": "empty_field",
                      "message": "turn 2 (assistant) is empty"},
                     {"line": 90, "where": "train.jsonl:90", "kind": "empty_field",
                      "message": "turn 2 (assistant) is empty"}],
        "token_lengths": {"p50": 73, "p90": 78, "p99": 81, "min": 67, "max": 81, "mean": 73.2},
        "truncated": 0, "supervised_tokens": 640, "supervised_tokens_cut": 0, "tokens": 23421,
        "example": [{"text": "<|im_start|>user\nHeadline: Stellanor Airlines wins a contract\nPositive or "
                             "negative?<|im_end|>\n<|im_start|>assistant\n", "trained": False},
                    {"text": "positive<|im_end|>", "trained": True}, {"text": "\n", "trained": False}],
        "example_where": "train.jsonl:1", "bytes_read": 92614, "seconds": 0.29,
    }


@dataclass
class FakeServices:
    """Fake services with a record of what the app asked for."""

    report: HardwareReport
    runs_root: Path
    launched: list[RunSpec] = field(default_factory=list)
    trusted: list[bool] = field(default_factory=list)
    """The remote-code consent given with each launch."""
    checks: list[CheckRequest] = field(default_factory=list)
    check_gate: threading.Event | None = None  # set: checks answer; unset: they wait (to show "checking...")
    fixed_run_id: str | None = None

    def services(self) -> Services:
        return Services(probe=lambda: self.report, recommend=fake_recommend, choice_for=fake_choice_for,
                        check_data=self.check_data, launch=self.launch, runs_root=self.runs_root)

    def check_data(self, request: CheckRequest, is_cancelled: Any) -> dict[str, Any]:
        self.checks.append(request)
        if self.check_gate is not None:
            while not self.check_gate.wait(0.05):
                if is_cancelled():
                    return {}
        return demo_check_report(request)

    def launch(self, spec: RunSpec, runs_root: Path | None, trust_remote_code: bool = False) -> rundir.RunDir:
        """Record the spec (and the remote-code consent) and make a run directory with a few canned events."""
        self.launched.append(spec)
        self.trusted.append(trust_remote_code)
        if self.fixed_run_id:
            path = (runs_root or self.runs_root) / self.fixed_run_id
            path.mkdir(parents=True, exist_ok=True)
            run = rundir.RunDir(path)
            from tunewiz.engine.config import spec as spec_mod

            spec_mod.save(spec, run.spec_path)
            run.marker_path.write_text(json.dumps({"run_id": run.run_id}) + "\n")  # a run tunewiz made
        else:
            run = rundir.create(spec, runs_root)
        events = [
            {"type": "started", "pid": 4242, "host": "box", "run_id": run.run_id, "version": "0.1.0"},
            {"type": "phase", "phase": "train", "message": "training for 40 steps"},
            {"type": "step", "step": 1, "total_steps": 40, "epoch": 0.025, "loss": 2.5, "learning_rate": 3e-4,
             "elapsed_s": 1.0},
            {"type": "step", "step": 2, "total_steps": 40, "epoch": 0.05, "loss": 2.1, "learning_rate": 3e-4,
             "elapsed_s": 2.0},
        ]
        with run.events_path.open("w") as handle:
            for seq, event in enumerate(events, 1):
                handle.write(json.dumps({"v": 1, "seq": seq, "time": 1767225600.0 + seq, **event}) + "\n")
        run.update_status(state="completed")
        return run
