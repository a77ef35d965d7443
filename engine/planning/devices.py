"""The GPUs CUDA will use: which ones `CUDA_VISIBLE_DEVICES` leaves visible (CUDA's own rules), what
each holds and which other processes use it, and the live numbers the dashboard samples. Every query goes
through `nvml`, so nothing here raises.

GPU numbering: `GpuInfo.index` is NVML's index (the one `nvidia-smi` shows) and `GpuInfo.cuda_index` is
the index CUDA (and so torch, `cuda:N`) uses after `CUDA_VISIBLE_DEVICES`. Integer entries there are
read as NVML indices; they mean the same GPUs to CUDA when `CUDA_DEVICE_ORDER=PCI_BUS_ID`, or when all
GPUs are the same model (the advice says so otherwise).

Known limitation: inside a container NVML reports host process ids, so our own process may be listed
among `other_processes` and other containers' processes may be missing altogether.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from tunewiz.engine.planning import nvml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuProcess:
    """A process (other than tunewiz itself) holding memory on a GPU."""

    pid: int
    name: str
    used_bytes: int | None  # None: the driver would not say (no permission, Windows WDDM)


@dataclass(frozen=True)
class GpuInfo:
    """One visible NVIDIA GPU. Fields NVML could not report are None."""

    index: int  # NVML index, as nvidia-smi numbers GPUs
    name: str
    cuda_index: int | None = None  # index seen by CUDA/torch after CUDA_VISIBLE_DEVICES
    uuid: str | None = None
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    other_processes: list[GpuProcess] = field(default_factory=list)
    utilization_pct: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    temperature_c: int | None = None
    compute_capability: tuple[int, int] | None = None
    bf16_supported: bool = False  # compute capability >= 8.0 (Ampere or newer)

    @property
    def other_processes_bytes(self) -> int:
        """Memory held by other processes, counting those of unknown size as 0."""
        return sum(p.used_bytes or 0 for p in self.other_processes)

    @property
    def label(self) -> str:
        """'GPU 1 (cuda:0, NVIDIA A10)': how warnings name this GPU."""
        cuda = f"cuda:{self.cuda_index}, " if self.cuda_index not in (None, self.index) else ""
        return f"GPU {self.index} ({cuda}{self.name})"


def parse_cuda_visible_devices(
    value: str | None, count: int, uuids: Sequence[str | None]
) -> tuple[list[int], str | None]:
    """NVML indices of the GPUs CUDA will see, in CUDA's order, and a problem message or None.

    Follows CUDA's rules as nvitop models them:
    * unset (None): all GPUs; empty (or blank) string: none;
    * comma-separated entries, each an integer (NVML index; the leading digits are used,
      "1abc" is 1) or a "GPU-" UUID prefix matching exactly one GPU (case-insensitive);
    * reading stops at the first entry that is invalid, out of range, matches no GPU or several,
      is a MIG entry (not supported here), or switches between integers and UUIDs; the entries
      before it still count;
    * the same GPU listed twice makes CUDA refuse all GPUs: none are visible.
    """
    if value is None:
        return list(range(count)), None
    if not value.strip():
        return [], None
    visible: list[int] = []
    use_integers: bool | None = None
    for raw in value.split(","):
        token = raw.strip()
        digits = re.match(r"[+-]?\d+", token)
        index: int | None = None
        problem: str | None = None
        if digits:
            is_integer = True
            number = int(digits.group(0))
            if 0 <= number < count:
                index = number
            else:
                problem = f"there is no GPU {number}"
        elif token.lower().startswith("gpu-") and len(token) > 4:
            is_integer = False
            prefix = token.lower()
            matches = [i for i, u in enumerate(uuids) if u and u.lower().startswith(prefix)]
            if len(matches) == 1:
                index = matches[0]
            else:
                problem = "no GPU has that UUID" if not matches else "several GPUs match that UUID prefix"
        elif token.lower().startswith("mig-"):
            is_integer = False
            problem = "MIG devices are not supported by tunewiz"
        else:
            is_integer = None
            problem = "it is neither a GPU index nor a GPU-UUID"
        if index is not None and use_integers is not None and use_integers != is_integer:
            index, problem = None, "CUDA does not allow mixing indices and UUIDs"
        if index is None:
            shown = ", ".join(str(i) for i in visible) or "none"
            return visible, (
                f"CUDA_VISIBLE_DEVICES={value!r}: CUDA stops reading at {token!r} ({problem}), "
                f"so the GPUs visible to training are: {shown}."
            )
        if index in visible:
            return [], (
                f"CUDA_VISIBLE_DEVICES={value!r} lists GPU {index} twice, so CUDA will refuse "
                "to use any GPU. List each GPU once."
            )
        use_integers = is_integer
        visible.append(index)
    return visible, None


def visible_nvml_indices(nv: ModuleType, count: int) -> tuple[list[int], str | None]:
    """Apply CUDA_VISIBLE_DEVICES, reading GPU UUIDs only when the variable uses them."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    uuids: list[str | None] = [None] * count
    if value is not None and "gpu-" in value.lower():
        for i in range(count):
            handle = nvml.call(nv, "nvmlDeviceGetHandleByIndex", i)
            if handle is not None:
                uuids[i] = nvml.text(nvml.call(nv, "nvmlDeviceGetUUID", handle))
    return parse_cuda_visible_devices(value, count, uuids)


def process_name(nv: ModuleType, pid: int) -> str:
    name = nvml.text(nvml.call(nv, "nvmlSystemGetProcessName", pid))
    if name:
        return os.path.basename(name.split("\x00")[0].strip()) or name
    try:
        import psutil

        return psutil.Process(pid).name()
    except Exception:
        return "unknown"


def other_processes_on(nv: ModuleType, handle: Any, ignore: set[int]) -> tuple[list[GpuProcess], bool]:
    """Compute and graphics processes holding memory on the GPU, minus those in `ignore`; and
    whether the driver listed any process at all (ignored ones included)."""
    used_by_pid: dict[int, int | None] = {}
    listed_any = False
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        for proc in nvml.call(nv, getter, handle) or []:
            listed_any = True
            pid = nvml.as_int(getattr(proc, "pid", None))
            if pid is None or pid in ignore:
                continue
            used = nvml.as_int(getattr(proc, "usedGpuMemory", None))
            if used is not None and (used < 0 or used >= nvml.VALUE_NOT_AVAILABLE):
                used = None
            if used == 0:
                continue
            previous = used_by_pid.get(pid)
            used_by_pid[pid] = used if previous is None else max(previous, used or 0)
    processes = [
        GpuProcess(pid=pid, name=process_name(nv, pid), used_bytes=used)
        for pid, used in sorted(used_by_pid.items(), key=lambda kv: -(kv[1] or 0))
    ]
    return processes, listed_any


def gpu_info(
    nv: ModuleType, index: int, cuda_index: int, ignore: set[int]
) -> tuple[GpuInfo, bool] | None:
    """Everything about one GPU, and whether the driver listed any process on it; None when
    even its handle cannot be obtained."""
    handle = nvml.call(nv, "nvmlDeviceGetHandleByIndex", index)
    if handle is None:
        return None
    name = nvml.text(nvml.call(nv, "nvmlDeviceGetName", handle)) or "Unknown NVIDIA GPU"
    memory = nvml.call(nv, "nvmlDeviceGetMemoryInfo", handle)
    utilization = nvml.call(nv, "nvmlDeviceGetUtilizationRates", handle)
    cc_raw = nvml.call(nv, "nvmlDeviceGetCudaComputeCapability", handle)
    compute_capability: tuple[int, int] | None = None
    try:
        if cc_raw is not None:
            compute_capability = (int(cc_raw[0]), int(cc_raw[1]))
    except (TypeError, ValueError, IndexError):
        compute_capability = None
    power_limit = nvml.first_ok(
        nv, ("nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPowerManagementLimit"), handle
    )
    processes, listed_any = other_processes_on(nv, handle, ignore)
    info = GpuInfo(
        index=index,
        cuda_index=cuda_index,
        name=name,
        uuid=nvml.text(nvml.call(nv, "nvmlDeviceGetUUID", handle)),
        memory_total_bytes=nvml.as_int(getattr(memory, "total", None)),
        memory_used_bytes=nvml.as_int(getattr(memory, "used", None)),
        memory_free_bytes=nvml.as_int(getattr(memory, "free", None)),
        other_processes=processes,
        utilization_pct=nvml.as_int(getattr(utilization, "gpu", None)),
        power_w=nvml.milliwatts_to_watts(nvml.call(nv, "nvmlDeviceGetPowerUsage", handle)),
        power_limit_w=nvml.milliwatts_to_watts(power_limit),
        temperature_c=nvml.as_int(
            nvml.call(
                nv,
                "nvmlDeviceGetTemperature",
                handle,
                getattr(nv, "NVML_TEMPERATURE_GPU", nvml.TEMPERATURE_GPU),
            )
        ),
        compute_capability=compute_capability,
        bf16_supported=compute_capability is not None and compute_capability >= (8, 0),
    )
    return info, listed_any


def sample_gpu_metrics(indices: list[int] | None = None) -> list[dict]:
    """Live numbers per GPU for the training dashboard; cheap enough to call every second.

    `indices` are NVML indices (``GpuInfo.index``); None means the GPUs visible through
    CUDA_VISIBLE_DEVICES. Each dict has: index, name, mem_used_bytes, mem_total_bytes,
    util_pct, power_w, temp_c (the last five None where NVML cannot tell). Returns [] when NVML
    is unavailable. Never raises.
    """
    try:
        nv = nvml.ensure()
        if nv is None:
            return []
        if indices is None:
            count = nvml.device_count(nv) or 0
            indices, _ = visible_nvml_indices(nv, count)
        samples: list[dict] = []
        for index in indices:
            handle = nvml.call(nv, "nvmlDeviceGetHandleByIndex", index)
            if handle is None:
                continue
            memory = nvml.call(nv, "nvmlDeviceGetMemoryInfo", handle)
            utilization = nvml.call(nv, "nvmlDeviceGetUtilizationRates", handle)
            samples.append(
                {
                    "index": index,
                    "name": nvml.text(nvml.call(nv, "nvmlDeviceGetName", handle)) or "Unknown NVIDIA GPU",
                    "mem_used_bytes": nvml.as_int(getattr(memory, "used", None)),
                    "mem_total_bytes": nvml.as_int(getattr(memory, "total", None)),
                    "util_pct": nvml.as_int(getattr(utilization, "gpu", None)),
                    "power_w": nvml.milliwatts_to_watts(nvml.call(nv, "nvmlDeviceGetPowerUsage", handle)),
                    "temp_c": nvml.as_int(
                        nvml.call(
                            nv,
                            "nvmlDeviceGetTemperature",
                            handle,
                            getattr(nv, "NVML_TEMPERATURE_GPU", nvml.TEMPERATURE_GPU),
                        )
                    ),
                }
            )
        return samples
    except Exception as exc:
        log.debug("sample_gpu_metrics failed: %r", exc)
        return []
