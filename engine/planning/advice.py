"""The advice the hardware check shows: plain-language warnings about what stands between this machine
and training (no GPU, memory other processes hold, an old driver, a CPU build of torch, missing optional
libraries, little disk), each saying what to do."""

from __future__ import annotations

import os
import re
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

from tunewiz.engine.planning.nvml import CPU_FALLBACK
from tunewiz.engine.render import GIB, memory

if TYPE_CHECKING:
    from tunewiz.engine.planning.hardware import HardwareReport

LOW_DISK_BYTES = 20 * GIB
"""Below this much free space on the output disk, the report warns."""
UNLISTED_USE_BYTES = 2 * GIB
"""A GPU with no process listed but more than this in use probably hosts processes that NVML cannot show
us (another container, or no permission)."""
TORCH_INSTALL_URL = "https://pytorch.org/get-started/locally/"


def _major(version: str | None) -> int | None:
    match = re.match(r"\d+", version or "")
    return int(match.group(0)) if match else None


def warnings_for(
    report: HardwareReport, visibility_problem: str | None, unlisted: AbstractSet[int] = frozenset()
) -> list[str]:
    """Plain-language warnings. `unlisted`: NVML indices of GPUs whose driver listed no process."""
    out: list[str] = []
    if not report.gpus:
        text = f"No NVIDIA GPU available: {CPU_FALLBACK}"
        if report.nvml_error is None and report.total_gpu_count > 0 and not visibility_problem:
            text += (
                f" CUDA_VISIBLE_DEVICES={report.cuda_visible_devices!r} hides all "
                f"{report.total_gpu_count} GPU(s); unset it or list the GPUs to use, "
                "e.g. CUDA_VISIBLE_DEVICES=0."
            )
        out.append(text)
    if visibility_problem:
        out.append(visibility_problem)
    for gpu in report.gpus:
        if gpu.other_processes:
            listed = ", ".join(
                f"{p.name} (pid {p.pid}, "
                f"{memory(p.used_bytes) if p.used_bytes is not None else 'size unknown'})"
                for p in gpu.other_processes
            )
            out.append(
                f"Other processes hold {memory(gpu.other_processes_bytes)} on {gpu.label}: "
                f"{listed}. That memory is not available for training."
            )
        elif gpu.index in unlisted and (gpu.memory_used_bytes or 0) > UNLISTED_USE_BYTES:
            out.append(
                f"{memory(gpu.memory_used_bytes)} is already in use on {gpu.label} by "
                "processes the driver does not list (another container or user?). That memory "
                "is not available for training."
            )
        if gpu.compute_capability is not None and not gpu.bf16_supported:
            major, minor = gpu.compute_capability
            out.append(
                f"{gpu.label} has compute capability {major}.{minor}, so it cannot train in "
                "bf16 (that needs 8.0 or newer); training must use fp16, which is less "
                "numerically stable."
            )
    if len({g.name for g in report.gpus}) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        out.append(
            "This machine mixes GPU models and CUDA_DEVICE_ORDER is not PCI_BUS_ID, so CUDA may "
            "number the GPUs differently from nvidia-smi. Set CUDA_DEVICE_ORDER=PCI_BUS_ID."
        )
    if report.disk_free_bytes is not None and report.disk_free_bytes < LOW_DISK_BYTES:
        out.append(
            f"Only {memory(report.disk_free_bytes)} free on the disk holding "
            f"{report.disk_path}; downloading a model and saving checkpoints usually needs at "
            f"least {memory(LOW_DISK_BYTES)}."
        )
    if report.libraries_checked:
        if report.torch_version is None:
            out.append(
                "PyTorch is not installed, so training cannot run. Install it (a CUDA build "
                f"if you have an NVIDIA GPU): {TORCH_INSTALL_URL}"
            )
        elif report.gpus and report.torch_cuda is None:
            out.append(
                f"PyTorch {report.torch_version} is a build without CUDA, so training will not "
                f"use the GPU. Install a CUDA build of PyTorch: {TORCH_INSTALL_URL}"
            )
        elif report.gpus:
            torch_major = _major(report.torch_cuda)
            driver_major = _major(report.cuda_driver_version)
            if torch_major and driver_major and torch_major > driver_major:
                out.append(
                    f"PyTorch was built for CUDA {report.torch_cuda} but the NVIDIA driver "
                    f"{report.driver_version or ''} supports CUDA up to "
                    f"{report.cuda_driver_version}, so torch will not see the GPU. Update the "
                    f"driver or install a PyTorch build for CUDA {driver_major}.x."
                )
        if report.gpus and report.bitsandbytes is None:
            out.append(
                "bitsandbytes is not installed, so QLoRA (4-bit) is unavailable; plain LoRA "
                "still works. Install it with `pip install bitsandbytes`."
            )
        if report.gpus and report.liger_kernel is None:
            out.append(
                "liger-kernel is not installed, so training runs without fused kernels: about a "
                "third more memory for the same model and slower steps. Install it with "
                "`pip install liger-kernel` (make setup does this on a GPU machine)."
            )
    return out
