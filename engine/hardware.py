"""Hardware probe: GPUs (through NVML), CPU, RAM, disk and the training libraries.

Written in the style of nvitop's libnvml wrapper: every getter is wrapped so that a failing
NVML call (NotSupported, NoPermission, GPU lost, a function missing from an old driver...) turns
into ``None`` for that one field and never into an exception. ``probe()`` and
``sample_gpu_metrics()`` never raise.

This module is imported by the TUI at start-up, so it must stay cheap: it never imports torch,
transformers or textual, and imports ``pynvml`` / ``psutil`` only when first needed. The library
check finds torch with ``importlib.util.find_spec`` and reads ``torch/version.py`` as text.

GPU numbering: ``GpuInfo.index`` is NVML's index (the one ``nvidia-smi`` shows) and
``GpuInfo.cuda_index`` is the index that CUDA (and so torch, ``cuda:N``) uses after
``CUDA_VISIBLE_DEVICES``. Integer entries in ``CUDA_VISIBLE_DEVICES`` are read as NVML indices;
they mean the same GPUs to CUDA when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, or when all GPUs are the
same model (a warning says so otherwise).

Known limitation: inside a container NVML reports host process ids, so our own process may be
listed among ``other_processes`` and other containers' processes may be missing altogether.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence

__all__ = [
    "GpuInfo",
    "GpuProcess",
    "HardwareReport",
    "LOW_DISK_BYTES",
    "format_bytes",
    "probe",
    "sample_gpu_metrics",
]

log = logging.getLogger(__name__)

GIB = 1024**3
LOW_DISK_BYTES = 20 * GIB
"""Below this much free space on the output disk, the report warns."""

# A GPU with no process listed but more than this in use probably hosts processes that NVML
# cannot show us (another container, or no permission).
_UNLISTED_USE_BYTES = 2 * GIB

_CPU_TAIL = "tunewiz will train on the CPU, which is only practical for the tiny demo model."
_TORCH_INSTALL_URL = "https://pytorch.org/get-started/locally/"

# NVML error codes (nvml.h); looked up here so that we need not import pynvml to classify them.
_NVML_ERROR_NO_PERMISSION = 4
_NVML_ERROR_DRIVER_NOT_LOADED = 9
_NVML_ERROR_LIBRARY_NOT_FOUND = 12
_NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
_NVML_TEMPERATURE_GPU = 0
# NVML_VALUE_NOT_AVAILABLE for unsigned long long fields (e.g. a process's usedGpuMemory).
_NVML_VALUE_NOT_AVAILABLE = 2**64 - 1


# --------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def format_bytes(n: int | float | None) -> str:
    """Human-readable binary size: ``format_bytes(13207024435) == '12.3 GiB'``."""
    if n is None:
        return "unknown"
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1024:
        return f"{sign}{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{sign}{value:.1f} {unit}"


def _text(value: Any) -> str | None:
    """NVML strings are bytes in old pynvml releases and str in new ones."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _as_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# NVML: lazy, thread-safe initialisation and never-raising queries
# --------------------------------------------------------------------------------------------


class _NvmlState:
    """Outcome of the one NVML initialisation attempt of this process."""

    def __init__(self) -> None:
        self.tried = False
        self.module: ModuleType | None = None  # pynvml, once nvmlInit succeeded
        self.error: str | None = None  # actionable message when it failed


_NVML_LOCK = threading.Lock()
_NVML = _NvmlState()


def _reset_nvml_state() -> None:
    """Forget the NVML initialisation outcome, so that the next call tries again (for tests).

    NVML reference-counts nvmlInit, so initialising again later is harmless; we never call
    nvmlShutdown.
    """
    global _NVML
    with _NVML_LOCK:
        _NVML = _NvmlState()


def _nvml_error_message(exc: BaseException) -> str:
    """Turn a failed import/nvmlInit into a plain message that says what to do."""
    if isinstance(exc, ImportError):
        return (
            "The nvidia-ml-py package is missing, so GPUs cannot be detected. "
            f"{_CPU_TAIL} Install it with `pip install nvidia-ml-py`."
        )
    code = getattr(exc, "value", None)
    if code == _NVML_ERROR_LIBRARY_NOT_FOUND:
        return (
            f"No NVIDIA driver found (NVML library missing). {_CPU_TAIL} "
            "If this machine has an NVIDIA GPU, install its driver and check with `nvidia-smi` "
            "(in a container, start it with `--gpus all`)."
        )
    if code == _NVML_ERROR_DRIVER_NOT_LOADED:
        return (
            f"The NVIDIA driver is installed but not loaded. {_CPU_TAIL} "
            "Check with `nvidia-smi`; after installing or upgrading the driver, reboot."
        )
    if code == _NVML_ERROR_NO_PERMISSION:
        return (
            f"No permission to talk to the NVIDIA driver. {_CPU_TAIL} "
            "Check that your user can open /dev/nvidia* (e.g. is in the `video` group) and that "
            "`nvidia-smi` works for it."
        )
    if code == _NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return (
            "The NVIDIA driver and its library have different versions (usually after a driver "
            f"upgrade). {_CPU_TAIL} Reboot, then check with `nvidia-smi`."
        )
    detail = str(exc) or type(exc).__name__
    return (
        f"Could not talk to the NVIDIA driver (NVML: {detail}). {_CPU_TAIL} "
        "Check that `nvidia-smi` works."
    )


def _ensure_nvml() -> ModuleType | None:
    """pynvml, initialised (once per process); None when NVML is unusable (see _NVML.error)."""
    state = _NVML
    if state.tried:
        return state.module
    with _NVML_LOCK:
        state = _NVML
        if state.tried:
            return state.module
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_*, OSError from ctypes...
            log.debug("NVML unavailable: %r", exc)
            state.error = _nvml_error_message(exc)
        else:
            state.module = pynvml
        state.tried = True
        return state.module


def _nvml_call(nv: ModuleType, name: str, *args: Any) -> Any:
    """``nv.<name>(*args)``, or None when it fails in any way (NotSupported, missing...)."""
    try:
        return getattr(nv, name)(*args)
    except Exception as exc:
        log.debug("NVML %s%r failed: %r", name, args, exc)
        return None


def _first_ok(nv: ModuleType, names: Sequence[str], *args: Any) -> Any:
    """The first of several equivalent NVML getters that answers."""
    for name in names:
        value = _nvml_call(nv, name, *args)
        if value is not None:
            return value
    return None


def _nvml_device_count(nv: ModuleType) -> int | None:
    return _as_int(_nvml_call(nv, "nvmlDeviceGetCount"))


def _cuda_driver_version(nv: ModuleType) -> str | None:
    """The driver's CUDA version as "13.0" (NVML gives 13000)."""
    version = _as_int(_first_ok(nv, ("nvmlSystemGetCudaDriverVersion", "nvmlSystemGetCudaDriverVersion_v2")))
    if not version or version < 0:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"


# --------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES
# --------------------------------------------------------------------------------------------


def _parse_cuda_visible_devices(
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


def _visible_nvml_indices(nv: ModuleType, count: int) -> tuple[list[int], str | None]:
    """Apply CUDA_VISIBLE_DEVICES, reading GPU UUIDs only when the variable uses them."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    uuids: list[str | None] = [None] * count
    if value is not None and "gpu-" in value.lower():
        for i in range(count):
            handle = _nvml_call(nv, "nvmlDeviceGetHandleByIndex", i)
            if handle is not None:
                uuids[i] = _text(_nvml_call(nv, "nvmlDeviceGetUUID", handle))
    return _parse_cuda_visible_devices(value, count, uuids)


# --------------------------------------------------------------------------------------------
# Per-GPU queries
# --------------------------------------------------------------------------------------------


def _process_name(nv: ModuleType, pid: int) -> str:
    name = _text(_nvml_call(nv, "nvmlSystemGetProcessName", pid))
    if name:
        return os.path.basename(name.split("\x00")[0].strip()) or name
    try:
        import psutil

        return psutil.Process(pid).name()
    except Exception:
        return "unknown"


def _other_processes(nv: ModuleType, handle: Any, ignore: set[int]) -> tuple[list[GpuProcess], bool]:
    """Compute and graphics processes holding memory on the GPU, minus those in `ignore`; and
    whether the driver listed any process at all (ignored ones included)."""
    used_by_pid: dict[int, int | None] = {}
    listed_any = False
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        for proc in _nvml_call(nv, getter, handle) or []:
            listed_any = True
            pid = _as_int(getattr(proc, "pid", None))
            if pid is None or pid in ignore:
                continue
            used = _as_int(getattr(proc, "usedGpuMemory", None))
            if used is not None and (used < 0 or used >= _NVML_VALUE_NOT_AVAILABLE):
                used = None
            if used == 0:
                continue
            previous = used_by_pid.get(pid)
            used_by_pid[pid] = used if previous is None else max(previous, used or 0)
    processes = [
        GpuProcess(pid=pid, name=_process_name(nv, pid), used_bytes=used)
        for pid, used in sorted(used_by_pid.items(), key=lambda kv: -(kv[1] or 0))
    ]
    return processes, listed_any


def _milliwatts_to_watts(value: Any) -> float | None:
    mw = _as_int(value)
    return None if mw is None or mw < 0 else mw / 1000.0


def _gpu_info(
    nv: ModuleType, index: int, cuda_index: int, ignore: set[int]
) -> tuple[GpuInfo, bool] | None:
    """Everything about one GPU, and whether the driver listed any process on it; None when
    even its handle cannot be obtained."""
    handle = _nvml_call(nv, "nvmlDeviceGetHandleByIndex", index)
    if handle is None:
        return None
    name = _text(_nvml_call(nv, "nvmlDeviceGetName", handle)) or "Unknown NVIDIA GPU"
    memory = _nvml_call(nv, "nvmlDeviceGetMemoryInfo", handle)
    utilization = _nvml_call(nv, "nvmlDeviceGetUtilizationRates", handle)
    cc_raw = _nvml_call(nv, "nvmlDeviceGetCudaComputeCapability", handle)
    compute_capability: tuple[int, int] | None = None
    try:
        if cc_raw is not None:
            compute_capability = (int(cc_raw[0]), int(cc_raw[1]))
    except (TypeError, ValueError, IndexError):
        compute_capability = None
    power_limit = _first_ok(
        nv, ("nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPowerManagementLimit"), handle
    )
    processes, listed_any = _other_processes(nv, handle, ignore)
    info = GpuInfo(
        index=index,
        cuda_index=cuda_index,
        name=name,
        uuid=_text(_nvml_call(nv, "nvmlDeviceGetUUID", handle)),
        memory_total_bytes=_as_int(getattr(memory, "total", None)),
        memory_used_bytes=_as_int(getattr(memory, "used", None)),
        memory_free_bytes=_as_int(getattr(memory, "free", None)),
        other_processes=processes,
        utilization_pct=_as_int(getattr(utilization, "gpu", None)),
        power_w=_milliwatts_to_watts(_nvml_call(nv, "nvmlDeviceGetPowerUsage", handle)),
        power_limit_w=_milliwatts_to_watts(power_limit),
        temperature_c=_as_int(
            _nvml_call(
                nv,
                "nvmlDeviceGetTemperature",
                handle,
                getattr(nv, "NVML_TEMPERATURE_GPU", _NVML_TEMPERATURE_GPU),
            )
        ),
        compute_capability=compute_capability,
        bf16_supported=compute_capability is not None and compute_capability >= (8, 0),
    )
    return info, listed_any


# --------------------------------------------------------------------------------------------
# CPU, RAM, disk
# --------------------------------------------------------------------------------------------


def _cpu_count() -> int | None:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / container cpusets
    except (AttributeError, OSError):
        return os.cpu_count()


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) gives None


def _read_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, number = line.partition(" ")
            if name == key and number.strip().isdigit():
                return int(number)
    except OSError:
        pass
    return 0


def _cgroup_memory(root: Path = Path("/sys/fs/cgroup")) -> tuple[int | None, int | None]:
    """(limit, usage without reclaimable page cache) of this container's memory cgroup.

    Reads cgroup v2 (``memory.max``) or v1 (``memory/memory.limit_in_bytes``) at the cgroup
    root as mounted in our namespace. (None, None) when there is no limit.
    """
    if (root / "memory.max").exists():  # cgroup v2
        limit = _read_int(root / "memory.max")
        usage = _read_int(root / "memory.current")
        inactive = _read_stat(root / "memory.stat", "inactive_file")
    else:  # cgroup v1
        base = root / "memory"
        limit = _read_int(base / "memory.limit_in_bytes")
        usage = _read_int(base / "memory.usage_in_bytes")
        inactive = _read_stat(base / "memory.stat", "total_inactive_file")
    if limit is None or limit >= 2**60:  # v1 says "no limit" with a huge number
        return None, None
    if usage is not None:
        usage = max(0, usage - inactive)
    return limit, usage


def _memory() -> tuple[int | None, int | None]:
    """(total, available) RAM in bytes, lowered to the container's limit where there is one."""
    total = available = None
    try:
        import psutil

        vm = psutil.virtual_memory()
        total, available = int(vm.total), int(vm.available)
    except Exception as exc:
        log.debug("psutil.virtual_memory failed: %r", exc)
    try:
        limit, usage = _cgroup_memory()
    except Exception as exc:
        log.debug("cgroup memory read failed: %r", exc)
        limit, usage = None, None
    if limit is not None and (total is None or limit < total):
        total = limit
        if usage is not None:
            room = max(0, limit - usage)
            available = room if available is None else min(available, room)
    return total, available


def _disk(output_dir: Path | None) -> tuple[str | None, int | None]:
    """(existing directory measured, free bytes) for output_dir or, when None, the cwd."""
    try:
        path = Path(output_dir).expanduser().absolute() if output_dir is not None else Path.cwd()
        while not path.exists() and path != path.parent:
            path = path.parent  # the output dir may not exist yet: measure where it will be
        return str(path), int(shutil.disk_usage(path).free)
    except Exception as exc:
        log.debug("disk_usage failed: %r", exc)
        return None, None


# --------------------------------------------------------------------------------------------
# Libraries, without importing them
# --------------------------------------------------------------------------------------------

_VERSION_RE = r"^{name}\s*(?::[^=\n]*)?=\s*(?:['\"]([^'\"]*)['\"]|None)"


def _version_py_field(text: str, name: str) -> str | None:
    """``name = '...'`` or ``name: Optional[str] = '...'`` from torch/version.py text."""
    match = re.search(_VERSION_RE.format(name=re.escape(name)), text, re.MULTILINE)
    return match.group(1) if match and match.group(1) else None


def _dist_version(dist: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(dist)
    except Exception:
        return None


def _find_spec(name: str) -> Any:
    try:
        from importlib.util import find_spec

        return find_spec(name)  # a top-level name: finds the package without importing it
    except Exception:
        return None


def _check_torch() -> tuple[str | None, str | None]:
    """(version, CUDA version of the build) of the installed torch; (None, None) if absent."""
    module = sys.modules.get("torch")
    if module is not None:  # already imported by someone else: ask it, that costs nothing
        version_mod = getattr(module, "version", None)
        return (
            _text(getattr(module, "__version__", None)),
            _text(getattr(version_mod, "cuda", None)),
        )
    spec = _find_spec("torch")
    if spec is None:
        return None, None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    version = cuda = None
    for location in locations:
        try:
            text = (Path(location) / "version.py").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        version = _version_py_field(text, "__version__")
        cuda = _version_py_field(text, "cuda")
        break
    return version or _dist_version("torch") or "unknown version", cuda


def _check_installed(module: str, dist: str) -> str | None:
    """The installed version of an optional library (found without importing it); None if absent."""
    if _find_spec(module) is None:
        return None
    return _dist_version(dist) or "unknown version"


# --------------------------------------------------------------------------------------------
# Warnings
# --------------------------------------------------------------------------------------------


def _major(version: str | None) -> int | None:
    match = re.match(r"\d+", version or "")
    return int(match.group(0)) if match else None


def _warnings(
    report: HardwareReport, visibility_problem: str | None, unlisted: set[int] = frozenset()
) -> list[str]:
    """Plain-language warnings. `unlisted`: NVML indices of GPUs whose driver listed no process."""
    out: list[str] = []
    if not report.gpus:
        text = f"No NVIDIA GPU available: {_CPU_TAIL}"
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
                f"{format_bytes(p.used_bytes) if p.used_bytes is not None else 'size unknown'})"
                for p in gpu.other_processes
            )
            out.append(
                f"Other processes hold {format_bytes(gpu.other_processes_bytes)} on {gpu.label}: "
                f"{listed}. That memory is not available for training."
            )
        elif gpu.index in unlisted and (gpu.memory_used_bytes or 0) > _UNLISTED_USE_BYTES:
            out.append(
                f"{format_bytes(gpu.memory_used_bytes)} is already in use on {gpu.label} by "
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
            f"Only {format_bytes(report.disk_free_bytes)} free on the disk holding "
            f"{report.disk_path}; downloading a model and saving checkpoints usually needs at "
            f"least {format_bytes(LOW_DISK_BYTES)}."
        )
    if report.libraries_checked:
        if report.torch_version is None:
            out.append(
                "PyTorch is not installed, so training cannot run. Install it (a CUDA build "
                f"if you have an NVIDIA GPU): {_TORCH_INSTALL_URL}"
            )
        elif report.gpus and report.torch_cuda is None:
            out.append(
                f"PyTorch {report.torch_version} is a build without CUDA, so training will not "
                f"use the GPU. Install a CUDA build of PyTorch: {_TORCH_INSTALL_URL}"
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


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


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
    ignore = {os.getpid(), *(_as_int(p) for p in ignore_pids)}
    ignore.discard(None)
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus: list[GpuInfo] = []
    driver_version = cuda_driver_version = None
    total = 0
    visibility_problem: str | None = None
    unlisted: set[int] = set()

    nv = _ensure_nvml()
    nvml_error = _NVML.error if nv is None else None
    if nv is not None:
        driver_version = _text(_nvml_call(nv, "nvmlSystemGetDriverVersion"))
        cuda_driver_version = _cuda_driver_version(nv)
        count = _nvml_device_count(nv)
        if count is None:
            nvml_error = (
                f"The NVIDIA driver answered but would not list its GPUs. {_CPU_TAIL} "
                "Check with `nvidia-smi`."
            )
            count = 0
        total = count
        visible, visibility_problem = _visible_nvml_indices(nv, count)
        for cuda_index, index in enumerate(visible):
            queried = _gpu_info(nv, index, cuda_index, ignore)
            if queried is None:
                visibility_problem = (visibility_problem + " " if visibility_problem else "") + (
                    f"GPU {index} could not be queried (check `nvidia-smi`); it is left out."
                )
                continue
            info, listed_any = queried
            gpus.append(info)
            if not listed_any:
                unlisted.add(index)

    ram_total, ram_available = _memory()
    disk_path, disk_free = _disk(output_dir)
    torch_version = torch_cuda = bnb = liger = None
    if check_libraries:
        try:
            torch_version, torch_cuda = _check_torch()
        except Exception as exc:
            log.debug("torch check failed: %r", exc)
        try:
            bnb = _check_installed("bitsandbytes", "bitsandbytes")
            liger = _check_installed("liger_kernel", "liger-kernel")
        except Exception as exc:
            log.debug("optional library check failed: %r", exc)

    report = HardwareReport(
        gpus=gpus,
        driver_version=driver_version,
        cuda_driver_version=cuda_driver_version,
        nvml_error=nvml_error,
        total_gpu_count=total,
        cuda_visible_devices=cuda_visible,
        cpu_count=_cpu_count(),
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
    return replace(report, warnings=_warnings(report, visibility_problem, unlisted))


def sample_gpu_metrics(indices: list[int] | None = None) -> list[dict]:
    """Live numbers per GPU for the training dashboard; cheap enough to call every second.

    `indices` are NVML indices (``GpuInfo.index``); None means the GPUs visible through
    CUDA_VISIBLE_DEVICES. Each dict has: index, name, mem_used_bytes, mem_total_bytes,
    util_pct, power_w, temp_c (the last five None where NVML cannot tell). Returns [] when NVML
    is unavailable. Never raises.
    """
    try:
        nv = _ensure_nvml()
        if nv is None:
            return []
        if indices is None:
            count = _nvml_device_count(nv) or 0
            indices, _ = _visible_nvml_indices(nv, count)
        samples: list[dict] = []
        for index in indices:
            handle = _nvml_call(nv, "nvmlDeviceGetHandleByIndex", index)
            if handle is None:
                continue
            memory = _nvml_call(nv, "nvmlDeviceGetMemoryInfo", handle)
            utilization = _nvml_call(nv, "nvmlDeviceGetUtilizationRates", handle)
            samples.append(
                {
                    "index": index,
                    "name": _text(_nvml_call(nv, "nvmlDeviceGetName", handle)) or "Unknown NVIDIA GPU",
                    "mem_used_bytes": _as_int(getattr(memory, "used", None)),
                    "mem_total_bytes": _as_int(getattr(memory, "total", None)),
                    "util_pct": _as_int(getattr(utilization, "gpu", None)),
                    "power_w": _milliwatts_to_watts(_nvml_call(nv, "nvmlDeviceGetPowerUsage", handle)),
                    "temp_c": _as_int(
                        _nvml_call(
                            nv,
                            "nvmlDeviceGetTemperature",
                            handle,
                            getattr(nv, "NVML_TEMPERATURE_GPU", _NVML_TEMPERATURE_GPU),
                        )
                    ),
                }
            )
        return samples
    except Exception as exc:
        log.debug("sample_gpu_metrics failed: %r", exc)
        return []
