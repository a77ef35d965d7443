"""Memory bars: an estimate against what the GPU (or RAM) has free, readable without colour."""

from __future__ import annotations

from typing import Any

from rich.text import Text

from tunewiz.engine.planning.recommend import FIT_WORDS as FIT_LABELS
from tunewiz.engine.render import GIB
from tunewiz.engine.render import memory as gb

FIT_STYLES = {"fits": "bold green", "tight": "bold yellow", "too_big": "bold red"}
FIT_MARKS = {"fits": "OK", "tight": "!!", "too_big": "XX"}


def fit_text(fit: str) -> Text:
    """'fits' / 'tight' / 'does not fit', coloured, with a mark that reads without colour."""
    return Text(f"[{FIT_MARKS.get(fit, '??')}] {FIT_LABELS.get(fit, fit)}", style=FIT_STYLES.get(fit, ""))


def memory_bar(needed: int | None, available: int | None, fit: str, width: int = 24, where: str = "free") -> Text:
    """`[#########.......] 9.1 GiB of 24 GiB free`, filled by the share of free memory needed.

    `where` names what `available` is: "free" (GPU memory) or "RAM free" (training on the CPU).
    """
    bar = Text("[")
    if needed is not None and available:
        share = needed / available
        filled = min(width, round(share * width))
        bar.append("#" * filled, style=FIT_STYLES.get(fit, ""))
        bar.append("." * (width - filled), style="dim")
        bar.append("]")
        if share > 1:
            bar.append(">", style=FIT_STYLES.get(fit, ""))
        bar.append(f" {gb(needed)} of {gb(available)} {where}")
    else:
        bar.append("." * width, style="dim")
        bar.append("]")
        bar.append(f" needs about {gb(needed)}" if needed else " no estimate")
        if available is None:
            bar.append(" (no GPU: trains on the CPU)", style="dim")
    return bar


def _on_gpu(report: Any) -> bool:
    return report is None or bool(report.has_gpu)


def estimate_total(choice: Any, report: Any = None) -> int | None:
    """What must be free for the choice: on a GPU the recommender's `needed_bytes` (the estimate plus the
    CUDA context); on a CPU the estimate alone, since no CUDA context is made."""
    needed = getattr(choice, "needed_bytes", None)
    if _on_gpu(report) and isinstance(needed, int) and needed > 0:
        return needed
    estimate = getattr(choice, "estimate", None)
    total = getattr(estimate, "total", None)
    return total if isinstance(total, int) and total > 0 else None


def verdict(choice: Any, report: Any) -> tuple[int | None, str, str]:
    """(memory available, fits/tight/too_big, what that memory is) for a choice on this machine.

    With a GPU that is the recommender's own verdict (on several GPUs, about each of them). Without one, training
    runs on the CPU and needs RAM, which the recommender's per-model verdict does not weigh, so it is judged here
    against free RAM.
    """
    if _on_gpu(report):
        return choice.available_bytes, choice.fit, "free per GPU" if getattr(choice, "gpus", 1) > 1 else "free"
    available, needed = report.ram_available_bytes, estimate_total(choice, report)
    if not available or not needed:
        return available, choice.fit, "RAM free"
    fit = "fits" if needed <= 0.85 * available else "tight" if needed <= available else "too_big"
    return available, fit, "RAM free"


def estimate_breakdown(choice: Any, report: Any = None) -> str:
    """'weights 4.7, adapters 0.3, activations 0.9, logits 0.5, other 0.7 (GiB)' for the review step (with the
    CUDA context on a GPU)."""
    estimate = getattr(choice, "estimate", None)
    if estimate is None:
        return ""
    parts = [("weights", "weights"), ("adapters_optimizer", "adapters"), ("activations", "activations"),
             ("logits", "logits"), ("overhead", "other")]
    shown = [f"{label} {getattr(estimate, name, 0) / GIB:.1f}" for name, label in parts
             if isinstance(getattr(estimate, name, 0), int) and getattr(estimate, name, 0) > 0]
    context = (getattr(choice, "needed_bytes", 0) or 0) - (getattr(estimate, "total", 0) or 0)
    if shown and context > 0 and _on_gpu(report):
        shown.append(f"CUDA context {context / GIB:.1f}")
    return ", ".join(shown) + " (GiB)" if shown else ""
