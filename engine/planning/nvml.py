"""NVML access in the style of nvitop's libnvml: one lazy, thread-safe initialisation per process and
getters that never raise (a failing call, NotSupported, NoPermission, a lost GPU or a function missing
from an old driver gives None for that one value). pynvml is imported on first use only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

CPU_FALLBACK = "tunewiz will train on the CPU, which is only practical for the tiny demo model."
"""How every "no GPU" message ends."""

# NVML error codes (nvml.h); looked up here so that we need not import pynvml to classify them.
_NVML_ERROR_NO_PERMISSION = 4
_NVML_ERROR_DRIVER_NOT_LOADED = 9
_NVML_ERROR_LIBRARY_NOT_FOUND = 12
_NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
TEMPERATURE_GPU = 0
VALUE_NOT_AVAILABLE = 2**64 - 1
"""NVML_VALUE_NOT_AVAILABLE for unsigned long long fields (e.g. a process's usedGpuMemory)."""


def text(value: Any) -> str | None:
    """NVML strings are bytes in old pynvml releases and str in new ones."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def as_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


class NvmlState:
    """Outcome of the one NVML initialisation attempt of this process."""

    def __init__(self) -> None:
        self.tried = False
        self.module: ModuleType | None = None  # pynvml, once nvmlInit succeeded
        self.error: str | None = None  # actionable message when it failed


_LOCK = threading.Lock()
_STATE = NvmlState()


def reset_state() -> None:
    """Forget the NVML initialisation outcome, so that the next call tries again (for tests).

    NVML reference-counts nvmlInit, so initialising again later is harmless; we never call
    nvmlShutdown.
    """
    global _STATE
    with _LOCK:
        _STATE = NvmlState()


def error_message(exc: BaseException) -> str:
    """Turn a failed import/nvmlInit into a plain message that says what to do."""
    if isinstance(exc, ImportError):
        return (
            "The nvidia-ml-py package is missing, so GPUs cannot be detected. "
            f"{CPU_FALLBACK} Install it with `pip install nvidia-ml-py`."
        )
    code = getattr(exc, "value", None)
    if code == _NVML_ERROR_LIBRARY_NOT_FOUND:
        return (
            f"No NVIDIA driver found (NVML library missing). {CPU_FALLBACK} "
            "If this machine has an NVIDIA GPU, install its driver and check with `nvidia-smi` "
            "(in a container, start it with `--gpus all`)."
        )
    if code == _NVML_ERROR_DRIVER_NOT_LOADED:
        return (
            f"The NVIDIA driver is installed but not loaded. {CPU_FALLBACK} "
            "Check with `nvidia-smi`; after installing or upgrading the driver, reboot."
        )
    if code == _NVML_ERROR_NO_PERMISSION:
        return (
            f"No permission to talk to the NVIDIA driver. {CPU_FALLBACK} "
            "Check that your user can open /dev/nvidia* (e.g. is in the `video` group) and that "
            "`nvidia-smi` works for it."
        )
    if code == _NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return (
            "The NVIDIA driver and its library have different versions (usually after a driver "
            f"upgrade). {CPU_FALLBACK} Reboot, then check with `nvidia-smi`."
        )
    detail = str(exc) or type(exc).__name__
    return (
        f"Could not talk to the NVIDIA driver (NVML: {detail}). {CPU_FALLBACK} "
        "Check that `nvidia-smi` works."
    )


def ensure() -> ModuleType | None:
    """pynvml, initialised (once per process); None when NVML is unusable (see _STATE.error)."""
    state = _STATE
    if state.tried:
        return state.module
    with _LOCK:
        state = _STATE
        if state.tried:
            return state.module
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_*, OSError from ctypes...
            log.debug("NVML unavailable: %r", exc)
            state.error = error_message(exc)
        else:
            state.module = pynvml
        state.tried = True
        return state.module


def call(nv: ModuleType, name: str, *args: Any) -> Any:
    """``nv.<name>(*args)``, or None when it fails in any way (NotSupported, missing...)."""
    try:
        return getattr(nv, name)(*args)
    except Exception as exc:
        log.debug("NVML %s%r failed: %r", name, args, exc)
        return None


def first_ok(nv: ModuleType, names: Sequence[str], *args: Any) -> Any:
    """The first of several equivalent NVML getters that answers."""
    for name in names:
        value = call(nv, name, *args)
        if value is not None:
            return value
    return None


def device_count(nv: ModuleType) -> int | None:
    return as_int(call(nv, "nvmlDeviceGetCount"))


def cuda_driver_version(nv: ModuleType) -> str | None:
    """The driver's CUDA version as "13.0" (NVML gives 13000)."""
    version = as_int(first_ok(nv, ("nvmlSystemGetCudaDriverVersion", "nvmlSystemGetCudaDriverVersion_v2")))
    if not version or version < 0:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"



def milliwatts_to_watts(value: Any) -> float | None:
    mw = as_int(value)
    return None if mw is None or mw < 0 else mw / 1000.0


def last_error() -> str | None:
    """The actionable message of a failed initialisation, or None."""
    return _STATE.error
