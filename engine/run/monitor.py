"""A background thread that writes `gpu` events: per-GPU memory, utilisation, power and temperature
(NVML), torch's own peak memory, and this process's RAM and CPU use (the whole story on a CPU run)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from tunewiz.engine.planning.devices import sample_gpu_metrics

INTERVAL_S = 5.0


def _torch_memory() -> dict[int, dict[str, int]]:
    """Per CUDA device: what torch holds now and at its peak (empty without CUDA)."""
    import torch

    # Only the device this process computes on: asking torch about another GPU would open a CUDA
    # context there (hundreds of MB) just to read zeros; NVML reports every device anyway.
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    stats = {}
    for index in (torch.cuda.current_device(),):
        stats[index] = {"torch_allocated_bytes": torch.cuda.memory_allocated(index),
                        "torch_reserved_bytes": torch.cuda.memory_reserved(index),
                        "torch_peak_allocated_bytes": torch.cuda.max_memory_allocated(index),
                        "torch_peak_reserved_bytes": torch.cuda.max_memory_reserved(index)}
    return stats


def snapshot(process: Any) -> dict[str, Any]:
    """One `gpu` event's fields."""
    devices = sample_gpu_metrics()
    torch_stats = _torch_memory()
    for cuda_index, device in enumerate(devices):
        device.update(torch_stats.get(cuda_index, {}))
    with process.oneshot():
        memory = process.memory_info()
        cpu = process.cpu_percent(None)
    return {"devices": devices, "process": {"rss_bytes": memory.rss, "cpu_pct": round(cpu, 1),
                                            "cpu_count": os.cpu_count() or 1}}


class ResourceMonitor:
    """Emits a `gpu` event now and every `interval` seconds until stopped."""

    def __init__(self, emit: Callable[..., Any], interval: float = INTERVAL_S, enabled: bool = True) -> None:
        import psutil

        self._enabled = enabled  # off on the ranks after the first: rank 0 reports every GPU
        self._emit = emit
        self._interval = interval
        self._stop = threading.Event()
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first reading only sets the baseline
        self._thread = threading.Thread(target=self._loop, name="tunewiz-monitor", daemon=True)

    def start(self) -> ResourceMonitor:
        if self._enabled:
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        if not self._enabled:
            return
        try:
            self._emit("gpu", **snapshot(self._process))
        except Exception:  # noqa: BLE001 - monitoring must never break training
            pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self.sample()
