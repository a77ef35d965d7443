"""Step 2: what the probe found, warnings in plain words, and what follows from them."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import Static

from tunewiz.tui.screens.base import WizardScreen
from tunewiz.tui.widgets.memory import gb


def _gpu_rows(report: Any) -> list[tuple[str, Text]]:
    rows = []
    for gpu in report.gpus:
        parts = [f"{gb(gpu.memory_total_bytes)} total", f"{gb(gpu.memory_free_bytes)} free"]
        if gpu.other_processes:
            parts.append(f"{gb(gpu.other_processes_bytes)} held by other programs")
        parts.append("bf16 yes" if gpu.bf16_supported else "bf16 no")
        rows.append((f"GPU {gpu.index}", Text.assemble((gpu.name, "bold"), "  ", " · ".join(parts))))
    if not report.gpus:
        rows.append(("GPU", Text("none found (see below)", style="bold yellow")))
    return rows


def report_renderable(report: Any, summary: str | None) -> Group:
    """The probe's findings as a small table, its warnings, and the recommender's summary."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for label, value in _gpu_rows(report):
        table.add_row(label, value)
    cpu = f"{report.cpu_count or '?'} cores"
    ram = f"{gb(report.ram_total_bytes)} RAM ({gb(report.ram_available_bytes)} free)"
    table.add_row("CPU", f"{cpu} · {ram}")
    if report.disk_free_bytes is not None:
        table.add_row("Disk", f"{gb(report.disk_free_bytes)} free at {report.disk_path}")
    if report.libraries_checked:
        torch = (f"torch {report.torch_version}" + (f" (CUDA {report.torch_cuda})" if report.torch_cuda else
                                                     " (no CUDA)")) if report.torch_version else "torch missing"
        bnb = f"bitsandbytes {report.bitsandbytes}" if report.bitsandbytes else "bitsandbytes missing"
        table.add_row("Software", f"{torch} · {bnb}")
    parts: list[Any] = [table, Text()]
    warnings_found = list(report.warnings)
    if report.nvml_error:  # the driver's own words say more than "no GPU"; keep one of the two
        warnings_found = [report.nvml_error] + [w for w in warnings_found if not w.startswith("No NVIDIA GPU")]
    if warnings_found:
        parts.append(Text("Worth knowing:", style="bold"))
        warnings = Table.grid(padding=(0, 1))
        warnings.add_column(no_wrap=True)
        warnings.add_column()
        for warning in warnings_found:
            warnings.add_row(Text(" !", style="bold yellow"), warning)
        parts += [warnings, Text()]
    else:
        parts.append(Text("No problems found.", style="green"))
    if summary:
        parts.append(Text.assemble(("What this means: ", "bold"), summary))
    return Group(*parts)


class HardwareScreen(WizardScreen):
    STEP = "Hardware"
    EXPLANATION = "What your machine offers. A model must fit in GPU memory, or train on the CPU."
    BINDINGS: ClassVar[list[BindingType]] = [
        *WizardScreen.BINDINGS,
        Binding("enter", "next", "Next", show=False),
        Binding("r", "rescan", "Check again"),
    ]

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="hardware-scroll"):
            yield Static("Checking your hardware...", id="hardware-report")
        yield Static("Press Enter (or ctrl+n) to pick a model.", classes="next-hint")

    def refresh_state(self) -> None:
        report = self.state.report
        if report is None:
            return
        rec = self.state.recommendation
        summary = getattr(rec, "summary", None) or self.state.recommend_error
        if summary and report.nvml_error:  # shown already under "Worth knowing"
            summary = summary.replace(report.nvml_error, "").strip()
        self.query_one("#hardware-report", Static).update(report_renderable(report, summary))

    def action_rescan(self) -> None:
        self.state.report = None
        self.query_one("#hardware-report", Static).update("Checking your hardware...")
        self.tw.probe_hardware()

    def action_next(self) -> None:
        if self.state.report is None:
            self.notify("Still checking the hardware; a moment, please.")
            return
        self.tw.go_next(self)
