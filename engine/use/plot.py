"""A run's loss, eval-loss and learning-rate chart as an image (matplotlib: the optional extra `plot`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tunewiz.engine.errors import TunewizError
from tunewiz.engine.run import rundir
from tunewiz.engine.run.curves import RunCurves

FORMATS = (".png", ".svg", ".pdf")
DEFAULT_NAME = Path("plots") / "curves.png"
"""Where `tunewiz plot RUN` puts the chart inside the run directory; the eval report links it from there."""


def default_path(run: rundir.RunDir) -> Path:
    return run.path / DEFAULT_NAME


def _pyplot() -> object:
    try:
        import matplotlib
    except ImportError:
        raise TunewizError("drawing the chart needs matplotlib, which is not installed",
                           hint="install the optional extra: pip install 'tunewiz[plot]' (or pip install matplotlib); "
                                "--csv writes the numbers without it") from None
    matplotlib.use("Agg")  # files only: never a window, works without a display
    import matplotlib.pyplot as plt

    return plt


def write_chart(curves: RunCurves, out: Path) -> Path:
    """Draw loss and eval loss (top) and the learning rate (bottom) by step into `out` (.png, .svg or .pdf),
    written whole or not at all."""
    if out.suffix.lower() not in FORMATS:
        raise TunewizError(f"cannot write a chart as {out.name!r}", hint=f"name a {', '.join(FORMATS)} file")
    if not curves.steps:
        raise TunewizError(f"run {curves.run_id} has no training steps to draw yet",
                           hint="wait for its first step event (`tunewiz tail RUN`)")
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(  # type: ignore[attr-defined]
        2, 1, sharex=True, figsize=(8, 6), height_ratios=(3, 1))
    top.plot(*curves.series("loss"), label="training loss", linewidth=1.2)
    eval_xs, eval_ys = curves.eval_series()
    if eval_xs:
        top.plot(eval_xs, eval_ys, "o-", label="eval loss", linewidth=1.2)
    top.set_ylabel("loss")
    top.set_title(f"{curves.name or curves.run_id} ({curves.run_id})", fontsize=10)
    top.legend()
    top.grid(alpha=0.3)
    bottom.plot(*curves.series("learning_rate"), color="tab:gray", linewidth=1.2)
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix)
    os.close(fd)
    try:
        figure.savefig(tmp, format=out.suffix.lower().lstrip("."), dpi=120)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(figure)  # type: ignore[attr-defined]
    return out


def report_link(run: rundir.RunDir, report_folder: Path) -> str:
    """The markdown that shows the run's chart in an eval report written in `report_folder` ("" without one)."""
    chart = default_path(run)
    if not chart.exists():
        return ""
    return f"\n![loss, eval loss and learning rate]({os.path.relpath(chart, report_folder)})\n"


def link_reports(run: rundir.RunDir) -> list[Path]:
    """Add the chart to the run's eval reports written before it existed; returns the reports changed."""
    from tunewiz.engine.fileio import atomic_write_text

    changed = []
    for report in sorted((run.path / "eval").rglob(rundir.EVAL_REPORT_NAME)):
        text = report.read_text(encoding="utf-8")
        link = report_link(run, report.parent)
        if link and link.strip() not in text:
            atomic_write_text(report, text + link)
            changed.append(report)
    return changed
