"""The hardware check: what this machine offers for training (GPUs, CPU, RAM, disk, the training
libraries) with plain-language advice, assembled from `nvml`, `devices`, `host`, `libraries` and
`advice`. `probe()` never raises.

The app imports this at start-up, so it stays cheap: never torch, transformers or textual; pynvml and
psutil only when first needed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tunewiz.engine.planning import advice, devices, host, libraries, nvml
from tunewiz.engine.planning.devices import GpuInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HardwareReport:
    """What this machine offers for training, plus plain-language warnings."""

    gpus: list[GpuInfo] = field(default_factory=list)  # visible GPUs, in CUDA order
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # highest CUDA version the driver supports, "13.0"
    nvml_error: str | None = None  # actionable message when GPUs could not be queried at all
    total_gpu_count: int = 0  # GPUs NVML sees, including those hidden by CUDA_VISIBLE_DEVICES
    cuda_visible_devices: str | None = None  # the raw variable, None when unset
    cpu_count: int | None = None  # CPUs this process may run on
    ram_total_bytes: int | None = None  # the container's limit when lower than the machine's
    ram_available_bytes: int | None = None
    disk_path: str | None = None  # the existing directory whose disk was measured
    disk_free_bytes: int | None = None
    libraries_checked: bool = False  # False: the library fields below were not looked at
    torch_version: str | None = None  # None: not installed
    torch_cuda: str | None = None  # CUDA version torch was built for; None: CPU-only or absent
    bitsandbytes: str | None = None  # installed version; None: not installed
    liger_kernel: str | None = None  # installed version; None: not installed
    warnings: list[str] = field(default_factory=list)

    @property
    def has_gpu(self) -> bool:
        """True when at least one NVIDIA GPU is visible to CUDA."""
        return bool(self.gpus)

    @property
    def best_gpu_free_bytes(self) -> int | None:
        """Free memory on the visible GPU with the most of it; None without GPUs or numbers."""
        free = [g.memory_free_bytes for g in self.gpus if g.memory_free_bytes is not None]
        return max(free) if free else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for ``--json`` output and engine events)."""
        data = asdict(self)
        for gpu in data["gpus"]:
            cc = gpu["compute_capability"]
            gpu["compute_capability"] = list(cc) if cc is not None else None
        data["has_gpu"] = self.has_gpu
        data["best_gpu_free_bytes"] = self.best_gpu_free_bytes
        return data


def probe(
    output_dir: Path | None = None,
    check_libraries: bool = True,
    *,
    ignore_pids: Iterable[int] = (),
) -> HardwareReport:
    """Look at GPUs, CPU, RAM, the disk holding `output_dir` (default: cwd) and, when
    `check_libraries`, at torch and bitsandbytes (without importing them). Never raises.

    `ignore_pids`: processes besides our own not to count as "other processes" on a GPU
    (e.g. the training process the TUI started).
    """
    try:
        return _probe(output_dir, check_libraries, ignore_pids)
    except Exception as exc:  # a bug here must not take the TUI down
        log.exception("hardware probe failed")
        return HardwareReport(warnings=[f"The hardware check failed unexpectedly: {exc!r}"])


def _probe(output_dir: Path | None, check_libraries: bool, ignore_pids: Iterable[int]) -> HardwareReport:
    ignore = {os.getpid(), *(pid for pid in map(nvml.as_int, ignore_pids) if pid is not None)}
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus: list[GpuInfo] = []
    driver_version = cuda_driver_version = None
    total = 0
    visibility_problem: str | None = None
    unlisted: set[int] = set()

    nv = nvml.ensure()
    nvml_error = nvml.last_error() if nv is None else None
    if nv is not None:
        driver_version = nvml.text(nvml.call(nv, "nvmlSystemGetDriverVersion"))
        cuda_driver_version = nvml.cuda_driver_version(nv)
        count = nvml.device_count(nv)
        if count is None:
            nvml_error = (
                f"The NVIDIA driver answered but would not list its GPUs. {nvml.CPU_FALLBACK} "
                "Check with `nvidia-smi`."
            )
            count = 0
        total = count
        visible, visibility_problem = devices.visible_nvml_indices(nv, count)
        for cuda_index, index in enumerate(visible):
            queried = devices.gpu_info(nv, index, cuda_index, ignore)
            if queried is None:
                visibility_problem = (visibility_problem + " " if visibility_problem else "") + (
                    f"GPU {index} could not be queried (check `nvidia-smi`); it is left out."
                )
                continue
            info, listed_any = queried
            gpus.append(info)
            if not listed_any:
                unlisted.add(index)

    ram_total, ram_available = host.memory()
    disk_path, disk_free = host.disk(output_dir)
    torch_version = torch_cuda = bnb = liger = None
    if check_libraries:
        try:
            torch_version, torch_cuda = libraries.check_torch()
        except Exception as exc:
            log.debug("torch check failed: %r", exc)
        try:
            bnb = libraries.check_installed("bitsandbytes", "bitsandbytes")
            liger = libraries.check_installed("liger_kernel", "liger-kernel")
        except Exception as exc:
            log.debug("optional library check failed: %r", exc)

    report = HardwareReport(
        gpus=gpus,
        driver_version=driver_version,
        cuda_driver_version=cuda_driver_version,
        nvml_error=nvml_error,
        total_gpu_count=total,
        cuda_visible_devices=cuda_visible,
        cpu_count=host.cpu_count(),
        ram_total_bytes=ram_total,
        ram_available_bytes=ram_available,
        disk_path=disk_path,
        disk_free_bytes=disk_free,
        libraries_checked=check_libraries,
        torch_version=torch_version,
        torch_cuda=torch_cuda,
        bitsandbytes=bnb,
        liger_kernel=liger,
    )
    return replace(report, warnings=advice.warnings_for(report, visibility_problem, unlisted))
