"""Memory bars: an estimate against what the GPU (or RAM) has free, readable without colour."""

from __future__ import annotations

from typing import Any

from rich.text import Text


FIT_LABELS = {"fits": "fits", "tight": "tight", "too_big": "does not fit"}
FIT_STYLES = {"fits": "bold green", "tight": "bold yellow", "too_big": "bold red"}
FIT_MARKS = {"fits": "OK", "tight": "!!", "too_big": "XX"}


def gb(n: int | float | None) -> str:
    """Sizes the way GPUs are sold: '24.0 GB' (binary units, as nvidia-smi and card makers count)."""
    if n is None:
        return "?"
    if n < 2**30:
        return f"{n / 2**20:.0f} MB"
    return f"{n / 2**30:.1f} GB"


def fit_text(fit: str) -> Text:
    """'fits' / 'tight' / 'does not fit', coloured, with a mark that reads without colour."""
    return Text(f"[{FIT_MARKS.get(fit, '??')}] {FIT_LABELS.get(fit, fit)}", style=FIT_STYLES.get(fit, ""))


def memory_bar(needed: int | None, available: int | None, fit: str, width: int = 24) -> Text:
    """`[#########.......] 9.1 GiB of 24.0 GiB free`, filled by the share of free memory needed."""
    bar = Text("[")
    if needed is not None and available:
        share = needed / available
        filled = min(width, round(share * width))
        bar.append("#" * filled, style=FIT_STYLES.get(fit, ""))
        bar.append("." * (width - filled), style="dim")
        bar.append("]")
        if share > 1:
            bar.append(">", style=FIT_STYLES.get(fit, ""))
        bar.append(f" {gb(needed)} of {gb(available)} free")
    else:
        bar.append("." * width, style="dim")
        bar.append("]")
        bar.append(f" needs about {gb(needed)}" if needed else " no estimate")
        if available is None:
            bar.append(" (no GPU: trains on the CPU)", style="dim")
    return bar


def estimate_total(choice: Any) -> int | None:
    estimate = getattr(choice, "estimate", None)
    total = getattr(estimate, "total", None)
    return total if isinstance(total, int) and total > 0 else None


def estimate_breakdown(choice: Any) -> str:
    """'weights 4.7, adapters 0.3, activations 0.9, logits 0.5, other 0.7 (GB)' for the review step."""
    estimate = getattr(choice, "estimate", None)
    if estimate is None:
        return ""
    parts = [("weights", "weights"), ("adapters_optimizer", "adapters"), ("activations", "activations"),
             ("logits", "logits"), ("overhead", "other")]
    shown = [f"{label} {getattr(estimate, name, 0) / 2**30:.1f}" for name, label in parts
             if isinstance(getattr(estimate, name, 0), int) and getattr(estimate, name, 0) > 0]
    return ", ".join(shown) + " (GB)" if shown else ""
