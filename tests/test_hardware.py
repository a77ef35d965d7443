"""Tests for tunewiz.engine.planning.hardware: the real probe (no GPU here) and a faked NVML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest

from tunewiz.engine.planning import devices, host, nvml
from tunewiz.engine.planning.devices import GpuInfo, GpuProcess, sample_gpu_metrics
from tunewiz.engine.planning.hardware import HardwareReport, probe
from tunewiz.engine.render import memory

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
GB = 1000**3
H100_UUID = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
T4_UUID = "GPU-1a2b3c4d-0000-1111-2222-333344445555"


@pytest.fixture(autouse=True)
def _fresh_nvml_state(monkeypatch):
    """Each test starts with NVML not yet initialised and a clean CUDA environment."""
    nvml.reset_state()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    yield
    nvml.reset_state()


# --------------------------------------------------------------------------------------------
# A fake NVML, installed by monkeypatching the pynvml functions the module calls
# --------------------------------------------------------------------------------------------


@dataclass
class FakeGpu:
    name: str
    uuid: str
    total: int
    used: int
    cc: tuple[int, int]
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes)
    util: int = 37
    power_mw: int = 250_000
    limit_mw: int = 700_000
    temp: int = 55


class FakeNvml:
    """Stands in for libnvidia-ml; `not_supported` names getters that raise NotSupported."""

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        init_error: Exception | None = None,
        not_supported: tuple[str, ...] = (),
        init_delay: float = 0.0,
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.not_supported = set(not_supported)
        self.init_delay = init_delay
        self.init_calls = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
        for name in dir(self):
            if name.startswith("nvml"):
                monkeypatch.setattr(pynvml, name, getattr(self, name))
        return self

    def _check(self, name: str) -> None:
        if name in self.not_supported:
            raise pynvml.NVMLError_NotSupported()

    def nvmlInit(self) -> None:
        self.init_calls += 1
        time.sleep(self.init_delay)
        if self.init_error is not None:
            raise self.init_error

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.65.06"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError_InvalidArgument()
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        return gpu.name

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        return gpu.uuid

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(total=gpu.total, used=gpu.used, free=gpu.total - gpu.used)

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.processes]

    def nvmlDeviceGetGraphicsRunningProcesses(self, gpu: FakeGpu) -> list[SimpleNamespace]:
        return []

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        return f"/usr/bin/proc{pid}"

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> SimpleNamespace:
        self._check("utilization")
        return SimpleNamespace(gpu=gpu.util, memory=10)

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        self._check("power")
        return gpu.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, gpu: FakeGpu) -> int:
        self._check("power")
        return gpu.limit_mw

    def nvmlDeviceGetPowerManagementLimit(self, gpu: FakeGpu) -> int:
        self._check("power")
        return gpu.limit_mw

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return gpu.temp

    def nvmlDeviceGetCudaComputeCapability(self, gpu: FakeGpu) -> tuple[int, int]:
        return gpu.cc


def two_gpus() -> list[FakeGpu]:
    """An idle-ish 80 GB H100 where another process holds 5 GiB, and a 24 GB cc 7.5 card."""
    return [
        FakeGpu("NVIDIA H100 80GB HBM3", H100_UUID, 80 * GB, 5 * GIB + 600 * 1024**2, (9, 0),
                processes=[(4242, 5 * GIB)]),
        FakeGpu("Quadro RTX 6000", T4_UUID, 24 * GB, 300 * 1024**2, (7, 5)),
    ]


@pytest.fixture
def fake_nvml(monkeypatch) -> FakeNvml:
    return FakeNvml(two_gpus()).install(monkeypatch)


# --------------------------------------------------------------------------------------------
# The real probe on this machine
# --------------------------------------------------------------------------------------------


def test_real_probe_never_raises_and_is_serialisable(tmp_path):
    report = probe(tmp_path / "not-yet-created" / "run")
    assert isinstance(report, HardwareReport)
    json.dumps(report.to_dict())
    assert report.cpu_count and report.cpu_count >= 1
    assert report.ram_total_bytes and report.ram_available_bytes is not None
    assert report.disk_path is not None and Path(report.disk_path).exists()
    assert report.disk_free_bytes is not None
    assert sample_gpu_metrics() == [] or report.has_gpu


def test_real_probe_without_driver_reports_no_gpu():
    """This machine has no NVIDIA driver: no GPUs, an actionable message and a warning."""
    report = probe(check_libraries=False)
    if report.nvml_error is None:
        pytest.skip("NVML works on this machine; covered by test_real_probe_on_gpu_machine")
    assert report.gpus == [] and not report.has_gpu
    assert report.best_gpu_free_bytes is None
    assert "nvidia-smi" in report.nvml_error
    assert "CPU" in report.nvml_error
    assert any(w.startswith("No NVIDIA GPU") for w in report.warnings)
    assert not report.libraries_checked and report.torch_version is None
    assert sample_gpu_metrics() == []


@pytest.mark.gpu
def test_real_probe_on_gpu_machine():
    report = probe()
    if report.nvml_error is not None:
        pytest.skip(f"no NVIDIA driver: {report.nvml_error}")
    assert report.driver_version and report.cuda_driver_version
    assert report.total_gpu_count >= len(report.gpus)
    for cuda_index, gpu in enumerate(report.gpus):
        assert gpu.cuda_index == cuda_index
        assert gpu.name and gpu.uuid and gpu.uuid.startswith(("GPU-", "MIG-"))
        assert gpu.memory_total_bytes and gpu.memory_total_bytes > GIB
        assert gpu.memory_free_bytes is not None and gpu.memory_used_bytes is not None
        assert gpu.compute_capability is not None
        assert gpu.bf16_supported == (gpu.compute_capability >= (8, 0))
    samples = sample_gpu_metrics()
    assert [s["index"] for s in samples] == [g.index for g in report.gpus]
    print(json.dumps(report.to_dict(), indent=1), json.dumps(samples, indent=1))


# --------------------------------------------------------------------------------------------
# Faked NVML
# --------------------------------------------------------------------------------------------


def test_two_gpus_with_other_process_and_no_bf16(fake_nvml):
    report = probe(check_libraries=False)
    assert report.nvml_error is None
    assert report.driver_version == "580.65.06"
    assert report.cuda_driver_version == "13.0"
    assert report.total_gpu_count == 2
    h100, quadro = report.gpus
    assert (h100.index, h100.cuda_index, quadro.index, quadro.cuda_index) == (0, 0, 1, 1)
    assert h100.name == "NVIDIA H100 80GB HBM3" and h100.uuid == H100_UUID
    assert h100.memory_total_bytes == 80 * GB
    assert h100.memory_free_bytes == 80 * GB - (5 * GIB + 600 * 1024**2)
    assert h100.other_processes == [GpuProcess(pid=4242, name="proc4242", used_bytes=5 * GIB)]
    assert h100.other_processes_bytes == 5 * GIB
    assert h100.utilization_pct == 37 and h100.temperature_c == 55
    assert h100.power_w == 250.0 and h100.power_limit_w == 700.0
    assert h100.compute_capability == (9, 0) and h100.bf16_supported is True
    assert quadro.compute_capability == (7, 5) and quadro.bf16_supported is False
    assert quadro.other_processes == []
    assert report.has_gpu
    assert report.best_gpu_free_bytes == h100.memory_free_bytes

    text = "\n".join(report.warnings)
    assert not any(w.startswith("No NVIDIA GPU") for w in report.warnings)
    other = [w for w in report.warnings if w.startswith("Other processes")]
    assert len(other) == 1
    assert "5.0 GiB on GPU 0 (NVIDIA H100 80GB HBM3)" in other[0] and "proc4242 (pid 4242" in other[0]
    bf16 = [w for w in report.warnings if "bf16" in w]
    assert len(bf16) == 1 and "GPU 1 (Quadro RTX 6000)" in bf16[0] and "7.5" in bf16[0]
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in text  # mixed models

    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["gpus"][0]["compute_capability"] == [9, 0]
    assert data["gpus"][0]["other_processes"][0]["used_bytes"] == 5 * GIB
    assert data["has_gpu"] is True


def test_own_and_ignored_processes_are_not_other(monkeypatch):
    gpus = two_gpus()
    gpus[0].processes = [(os.getpid(), 3 * GIB), (777, 2 * GIB), (888, None), (999, 0)]
    gpus[1].processes = [(777, 1 * GIB)]
    FakeNvml(gpus).install(monkeypatch)
    report = probe(check_libraries=False, ignore_pids=[777])
    h100, quadro = report.gpus
    # 999 holds nothing; 888's size is unknown but it is listed
    assert h100.other_processes == [GpuProcess(pid=888, name="proc888", used_bytes=None)]
    assert quadro.other_processes == []
    assert any("proc888 (pid 888, size unknown)" in w for w in report.warnings)


def test_memory_in_use_without_listed_processes_is_reported(monkeypatch):
    gpus = two_gpus()
    gpus[0].processes = []
    gpus[0].used = 30 * GIB  # e.g. another container's job, invisible to NVML here
    FakeNvml(gpus).install(monkeypatch)
    report = probe(check_libraries=False)
    assert any("30 GiB is already in use on GPU 0" in w for w in report.warnings)


def test_process_list_failure_is_not_fatal(fake_nvml, monkeypatch):
    def denied(handle):
        raise pynvml.NVMLError_NoPermission()

    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", denied)
    report = probe(check_libraries=False)
    assert [g.other_processes for g in report.gpus] == [[], []]


def test_not_supported_getters_give_none(monkeypatch):
    FakeNvml(two_gpus(), not_supported=("utilization", "power")).install(monkeypatch)
    report = probe(check_libraries=False)
    for gpu in report.gpus:
        assert gpu.utilization_pct is None
        assert gpu.power_w is None and gpu.power_limit_w is None
        assert gpu.temperature_c == 55 and gpu.memory_total_bytes is not None  # the rest is there
    for sample in sample_gpu_metrics():
        assert sample["util_pct"] is None and sample["power_w"] is None
        assert sample["temp_c"] == 55


def test_every_getter_failing_still_gives_a_gpu(fake_nvml, monkeypatch):
    def broken(*args):
        raise pynvml.NVMLError_Unknown()

    for name in dir(fake_nvml):
        if name.startswith("nvmlDevice") and name not in ("nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex"):
            monkeypatch.setattr(pynvml, name, broken)
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", broken)
    report = probe(check_libraries=False)
    assert len(report.gpus) == 2
    gpu = report.gpus[0]
    assert gpu.name == "Unknown NVIDIA GPU" and gpu.uuid is None
    assert gpu.memory_total_bytes is None and gpu.compute_capability is None
    assert gpu.bf16_supported is False
    assert report.driver_version is None and report.best_gpu_free_bytes is None
    json.dumps(report.to_dict())


def test_gpu_whose_handle_fails_is_left_out_with_a_warning(fake_nvml, monkeypatch):
    real = fake_nvml.nvmlDeviceGetHandleByIndex

    def handle(index):
        if index == 0:
            raise pynvml.NVMLError_GpuIsLost()
        return real(index)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", handle)
    report = probe(check_libraries=False)
    assert [g.index for g in report.gpus] == [1]
    assert any("GPU 0 could not be queried" in w for w in report.warnings)


def test_sample_gpu_metrics(fake_nvml):
    samples = sample_gpu_metrics()
    assert [s["index"] for s in samples] == [0, 1]
    first = samples[0]
    assert set(first) == {"index", "name", "mem_used_bytes", "mem_total_bytes", "util_pct", "power_w", "temp_c"}
    assert first["name"] == "NVIDIA H100 80GB HBM3"
    assert first["mem_total_bytes"] == 80 * GB and first["util_pct"] == 37
    assert first["power_w"] == 250.0 and first["temp_c"] == 55
    assert [s["index"] for s in sample_gpu_metrics([1])] == [1]
    assert sample_gpu_metrics([5]) == []  # no such GPU: skipped, no exception
    json.dumps(samples)


def test_nvml_is_initialised_once_even_across_threads(monkeypatch):
    fake = FakeNvml(two_gpus(), init_delay=0.05).install(monkeypatch)
    results: list[HardwareReport] = []
    threads = [threading.Thread(target=lambda: results.append(probe(check_libraries=False))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sample_gpu_metrics()
    assert fake.init_calls == 1
    assert len(results) == 8 and all(len(r.gpus) == 2 for r in results)
    nvml.reset_state()
    probe(check_libraries=False)
    assert fake.init_calls == 2


# CUDA_VISIBLE_DEVICES ------------------------------------------------------------------------


def test_cuda_visible_devices_selects_second_gpu(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    report = probe(check_libraries=False)
    assert [(g.index, g.cuda_index, g.name) for g in report.gpus] == [(1, 0, "Quadro RTX 6000")]
    assert report.total_gpu_count == 2 and report.cuda_visible_devices == "1"
    assert report.gpus[0].label == "GPU 1 (cuda:0, Quadro RTX 6000)"
    assert not any(w.startswith("Other processes") for w in report.warnings)  # that was GPU 0
    assert [s["index"] for s in sample_gpu_metrics()] == [1]


def test_cuda_visible_devices_empty_hides_all(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    report = probe(check_libraries=False)
    assert report.gpus == [] and not report.has_gpu
    assert report.nvml_error is None and report.total_gpu_count == 2
    no_gpu = [w for w in report.warnings if w.startswith("No NVIDIA GPU")]
    assert len(no_gpu) == 1 and "CUDA_VISIBLE_DEVICES=''" in no_gpu[0] and "2 GPU(s)" in no_gpu[0]
    assert sample_gpu_metrics() == []


def test_cuda_visible_devices_uuid_prefix_and_order(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b, gpu-8932F937")
    report = probe(check_libraries=False)
    assert [(g.index, g.cuda_index) for g in report.gpus] == [(1, 0), (0, 1)]


def test_cuda_visible_devices_stops_at_bad_entry_with_warning(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,bogus,0")
    report = probe(check_libraries=False)
    assert [g.index for g in report.gpus] == [1]
    assert any("stops reading at 'bogus'" in w for w in report.warnings)


@pytest.mark.parametrize(
    ("value", "expected", "problem"),
    [
        (None, [0, 1, 2], False),
        ("", [], False),
        ("  ", [], False),
        ("0,1,2", [0, 1, 2], False),
        ("2,0", [2, 0], False),
        (" 1 , 2 ", [1, 2], False),
        ("1abc", [1], False),  # CUDA reads the leading digits
        ("0,7,1", [0], True),  # out of range: stop there
        ("-1", [], True),
        ("0,,1", [0], True),
        ("0,0", [], True),  # duplicates: CUDA refuses every GPU
        ("GPU-bbb", [1], False),
        ("GPU-aaa1", [0], False),
        ("GPU-aaa", [], True),  # ambiguous prefix
        ("GPU-ccc", [], True),  # no such UUID
        ("GPU-bbb,0", [1], True),  # no mixing of UUIDs and indices
        ("1,GPU-aaa1", [1], True),
        ("MIG-aaa1/1/0", [], True),  # MIG: out of scope
        ("GPU-", [], True),
    ],
)
def test_parse_cuda_visible_devices(value, expected, problem):
    uuids = ["GPU-aaa111", "GPU-bbb222", "GPU-aaa333"]
    visible, message = devices.parse_cuda_visible_devices(value, 3, uuids)
    assert visible == expected
    assert (message is not None) == problem


# NVML init failures ----------------------------------------------------------------------------


def test_driver_not_loaded_gives_actionable_message(monkeypatch):
    fake = FakeNvml(two_gpus(), init_error=pynvml.NVMLError_DriverNotLoaded()).install(monkeypatch)
    report = probe(check_libraries=False)
    assert report.gpus == [] and report.total_gpu_count == 0
    assert report.nvml_error is not None
    assert "driver is installed but not loaded" in report.nvml_error
    assert "nvidia-smi" in report.nvml_error and "reboot" in report.nvml_error
    assert any(w.startswith("No NVIDIA GPU") for w in report.warnings)
    assert sample_gpu_metrics() == []
    probe(check_libraries=False)
    assert fake.init_calls == 1  # the failure is remembered, not retried every call


def test_library_not_found_message(monkeypatch):
    FakeNvml([], init_error=pynvml.NVMLError_LibraryNotFound()).install(monkeypatch)
    report = probe(check_libraries=False)
    assert report.nvml_error.startswith("No NVIDIA driver found (NVML library missing).")
    assert "install its driver and check with `nvidia-smi`" in report.nvml_error


def test_unexpected_init_exception_is_caught(monkeypatch):
    FakeNvml([], init_error=OSError("libnvidia-ml.so.1: cannot open")).install(monkeypatch)
    report = probe(check_libraries=False)
    assert report.gpus == [] and "libnvidia-ml.so.1" in report.nvml_error


def test_missing_pynvml_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    report = probe(check_libraries=False)
    assert "pip install nvidia-ml-py" in report.nvml_error
    assert sample_gpu_metrics() == []


def test_device_count_failure(fake_nvml, monkeypatch):
    def count():
        raise pynvml.NVMLError_Unknown()

    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", count)
    report = probe(check_libraries=False)
    assert report.gpus == [] and "would not list its GPUs" in report.nvml_error


def test_probe_never_raises_even_on_internal_bug(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(nvml, "ensure", boom)
    report = probe()
    assert isinstance(report, HardwareReport)
    assert report.warnings and "bug" in report.warnings[0]
    assert sample_gpu_metrics() == []


# --------------------------------------------------------------------------------------------
# Libraries: found and read without importing
# --------------------------------------------------------------------------------------------


def make_fake_torch(root: Path, cuda_line: str, version: str = "2.7.1+cu126") -> Path:
    """A `torch` package that explodes when imported, with a version.py to be read as text."""
    package = root / "torch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('torch must not be imported by the probe')\n")
    (package / "version.py").write_text(
        "from typing import Optional\n\n"
        "__all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip']\n"
        f"__version__ = '{version}'\n"
        "debug = False\n"
        f"{cuda_line}\n"
        "git_version = 'abc'\n"
        "hip: Optional[str] = None\n"
    )
    return root


def make_fake_library(root: Path, module: str, dist: str, version: str) -> None:
    """An installed package that explodes when imported, with its version in dist-info metadata."""
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text("raise RuntimeError('no import please')\n")
    info = root / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")


def make_fake_bitsandbytes(root: Path, version: str = "0.45.5") -> None:
    make_fake_library(root, "bitsandbytes", "bitsandbytes", version)


@pytest.fixture
def hide_real_libraries(monkeypatch):
    """Make sure a torch/bitsandbytes already imported by another test does not short-cut the check."""
    for name in ("torch", "bitsandbytes", "liger_kernel"):
        monkeypatch.delitem(sys.modules, name, raising=False)


@pytest.mark.parametrize(
    ("cuda_line", "expected"),
    [
        ("cuda: Optional[str] = '12.6'", "12.6"),
        ("cuda = '11.8'", "11.8"),
        ('cuda = "12.1"', "12.1"),
        ("cuda: Optional[str] = None", None),
        ("cuda = None", None),
    ],
)
def test_torch_cuda_read_from_version_py(tmp_path, monkeypatch, hide_real_libraries, cuda_line, expected):
    monkeypatch.syspath_prepend(str(make_fake_torch(tmp_path, cuda_line)))
    report = probe(check_libraries=True)
    assert report.libraries_checked
    assert report.torch_version == "2.7.1+cu126"
    assert report.torch_cuda == expected
    assert "torch" not in sys.modules


def test_libraries_warnings_with_gpu(tmp_path, monkeypatch, hide_real_libraries, fake_nvml):
    empty = tmp_path / "empty"
    empty.mkdir()
    # Only our fake directory and the stdlib: torch and bitsandbytes are "not installed".
    outside = [p for p in sys.path if not p.endswith(("site-packages", "dist-packages"))]
    monkeypatch.setattr(sys, "path", [str(empty), *outside])
    report = probe()
    assert report.torch_version is None and report.torch_cuda is None and report.bitsandbytes is None
    assert any(w.startswith("PyTorch is not installed") for w in report.warnings)
    assert any(w.startswith("bitsandbytes is not installed") and "QLoRA" in w for w in report.warnings)
    assert any(w.startswith("liger-kernel is not installed") and "pip install liger-kernel" in w
               for w in report.warnings)

    cpu_build = tmp_path / "cpu"
    make_fake_torch(cpu_build, "cuda: Optional[str] = None", version="2.7.1+cpu")
    make_fake_bitsandbytes(cpu_build)
    make_fake_library(cpu_build, "liger_kernel", "liger-kernel", "0.8.5")
    monkeypatch.setattr(sys, "path", [str(cpu_build)] + sys.path)
    report = probe()
    assert report.torch_version == "2.7.1+cpu" and report.bitsandbytes == "0.45.5"
    assert report.liger_kernel == "0.8.5"
    assert any("2.7.1+cpu is a build without CUDA" in w for w in report.warnings)
    assert not any(w.startswith(("bitsandbytes", "liger-kernel")) for w in report.warnings)

    new_cuda = tmp_path / "cu14"
    make_fake_torch(new_cuda, "cuda: Optional[str] = '14.0'", version="3.0.0+cu140")
    monkeypatch.setattr(sys, "path", [str(new_cuda)] + sys.path)
    report = probe()
    assert any("built for CUDA 14.0" in w and "up to 13.0" in w for w in report.warnings)
    assert "torch" not in sys.modules and "bitsandbytes" not in sys.modules


def test_no_library_warnings_without_gpu_or_check(tmp_path, monkeypatch, hide_real_libraries):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not p.endswith(("site-packages", "dist-packages"))])
    FakeNvml([], init_error=pynvml.NVMLError_LibraryNotFound()).install(monkeypatch)
    report = probe()
    # both moot on the CPU
    assert not any(w.startswith(("bitsandbytes", "liger-kernel")) for w in report.warnings)
    assert any(w.startswith("PyTorch is not installed") for w in report.warnings)
    report = probe(check_libraries=False)
    assert not any("PyTorch" in w for w in report.warnings)


def test_import_and_probe_in_fresh_process_load_no_heavy_modules(tmp_path):
    """Importing tunewiz.engine.planning.hardware and probing (libraries included) must not import torch & co."""
    fake = make_fake_torch(tmp_path, "cuda: Optional[str] = '12.6'")
    code = textwrap.dedent(
        """
        import json, sys, time
        t0 = time.perf_counter()
        import tunewiz.engine.planning.hardware as hw
        imported = time.perf_counter() - t0
        heavy = ("torch", "textual", "transformers", "bitsandbytes")
        after_import = [m for m in heavy if m in sys.modules]
        t0 = time.perf_counter()
        report = hw.probe()
        probed = time.perf_counter() - t0
        print(json.dumps({
            "after_import": after_import,
            "after_probe": [m for m in heavy if m in sys.modules],
            "torch_cuda": report.torch_cuda,
            "import_s": imported,
            "probe_s": probed,
        }))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(REPO)])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["after_import"] == []
    assert result["after_probe"] == []
    assert result["torch_cuda"] == "12.6"  # read from our fake torch/version.py, never imported
    assert result["import_s"] + result["probe_s"] < 5  # generous; typically well under 0.2 s


# --------------------------------------------------------------------------------------------
# RAM, disk, helpers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [(None, "?"), (0, "0 MiB"), (270 * 2**20, "270 MiB"), (5 * GIB, "5.0 GiB"), (13207024435, "12 GiB"),
     (24 * GIB, "24 GiB")],
)
def test_memory_is_written_in_one_binary_unit(n, text):
    """The hardware advice writes sizes as everything else does (render.memory): GiB, never GB."""
    assert memory(n) == text


def test_low_disk_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(host, "disk", lambda output_dir: (str(tmp_path), 12 * GIB))
    report = probe(tmp_path, check_libraries=False)
    assert any(w.startswith("Only 12 GiB free") and str(tmp_path) in w for w in report.warnings)
    monkeypatch.setattr(host, "disk", lambda output_dir: (str(tmp_path), 200 * GIB))
    assert not any(w.startswith("Only") for w in probe(tmp_path, check_libraries=False).warnings)


def test_disk_measures_nearest_existing_parent(tmp_path):
    path, free = host.disk(tmp_path / "a" / "b" / "c")
    assert path == str(tmp_path) and free is not None and free > 0


def test_cgroup_v2_limit(tmp_path):
    (tmp_path / "memory.max").write_text("8589934592\n")
    (tmp_path / "memory.current").write_text(str(3 * GIB))
    (tmp_path / "memory.stat").write_text(f"anon 123\ninactive_file {1 * GIB}\nactive_file 5\n")
    assert host.cgroup_memory(tmp_path) == (8 * GIB, 2 * GIB)
    (tmp_path / "memory.max").write_text("max\n")
    assert host.cgroup_memory(tmp_path) == (None, None)


def test_cgroup_v1_limit(tmp_path):
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(16 * GIB))
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text(str(4 * GIB))
    (tmp_path / "memory" / "memory.stat").write_text(f"inactive_file 1\ntotal_inactive_file {GIB}\n")
    assert host.cgroup_memory(tmp_path) == (16 * GIB, 3 * GIB)
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")
    assert host.cgroup_memory(tmp_path) == (None, None)
    assert host.cgroup_memory(tmp_path / "missing") == (None, None)


def test_container_memory_limit_lowers_ram(monkeypatch):
    monkeypatch.setattr(host, "cgroup_memory", lambda: (4 * GIB, 1 * GIB))
    total, available = host.memory()
    assert total == 4 * GIB and available is not None and available <= 3 * GIB


def test_dataclasses_are_frozen_and_constructible():
    gpu = GpuInfo(index=0, name="x")
    with pytest.raises(AttributeError):
        gpu.name = "y"  # type: ignore[misc]
    report = HardwareReport(gpus=[gpu])
    assert report.has_gpu and report.best_gpu_free_bytes is None
    assert gpu.label == "GPU 0 (x)"
