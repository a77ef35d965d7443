"""`tunewiz compare RUN RUN...` (runs side by side, printed with rich) and `tunewiz plot RUN` (the chart as an
image, the metrics as CSV). Neither imports torch; `plot` imports matplotlib only to draw."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from tunewiz.engine.errors import TunewizError
from tunewiz.engine.render import memory
from tunewiz.engine.run import curves as curves_mod
from tunewiz.engine.run import rundir
from tunewiz.engine.run.curves import RunCurves

MARKERS = "123456789"
CHART_WIDTH = 64
CHART_HEIGHT = 12


def add_commands(sub: Any) -> None:
    """Register `compare` and `plot` on the top-level subparsers."""
    p = sub.add_parser("compare", help="runs side by side: loss curves overlaid, throughput, peak memory and the "
                                       "settings that differ")
    p.add_argument("runs", nargs="+", metavar="RUN", help="two or more run ids (or unique prefixes, or 'last')")
    p.add_argument("--by", choices=["step", "tokens"], default="step",
                   help="align the curves by optimiser step (default) or by tokens seen")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plot", help="draw a run's loss, eval loss and learning rate as an image, or write them as CSV")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--out", metavar="FILE", type=Path,
                   help="the image to write: .png, .svg or .pdf (default: RUN/plots/curves.png, which the eval "
                        "report links); needs the `plot` extra (matplotlib)")
    p.add_argument("--csv", metavar="FILE", type=Path, help="write the metrics per step as CSV (no image unless "
                                                            "--out is given too)")
    p.set_defaults(func=cmd_plot)


def load_runs(names: list[str]) -> list[RunCurves]:
    """Each named run's curves; the same run twice is refused."""
    runs = [rundir.find(name) for name in names]
    ids = [run.run_id for run in runs]
    if len(set(ids)) < len(ids):
        raise TunewizError(f"the same run is named twice: {', '.join(ids)}", hint="name different runs")
    return [curves_mod.load(run) for run in runs]


def cmd_compare(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        raise TunewizError("compare needs at least two runs",
                           hint="e.g. tunewiz compare RUN_A RUN_B (see `tunewiz runs`)")
    if len(args.runs) > len(MARKERS):
        raise TunewizError(f"compare shows at most {len(MARKERS)} runs at once", hint="name fewer runs")
    runs = load_runs(args.runs)
    differ = curves_mod.differing_settings(runs)
    if args.json:
        print(json.dumps({"runs": [summary(run) for run in runs], "settings_that_differ": differ,
                          "by": args.by}, indent=1, default=str))
        return 0
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=False)
    for i, run in enumerate(runs):
        console.print(f"[bold]{MARKERS[i]}[/] {run.run_id}" + (f"  ({run.name})" if run.name else ""))
    console.print(runs_table(runs))
    console.print(settings_table(runs, differ))
    by = "tokens seen" if args.by == "tokens" else "step"
    for title, getter in (("training loss", lambda r: r.series("loss", args.by)),
                          ("eval loss", lambda r: r.eval_series(args.by))):
        series = [(MARKERS[i], *getter(run)) for i, run in enumerate(runs)]
        console.print(f"\n[bold]{title} by {by}[/] (each run drawn with its number; * where runs meet)")
        console.print("\n".join(text_chart(series, by)), markup=False)
    return 0


def summary(run: RunCurves) -> dict[str, Any]:
    best = run.best_eval
    return {"run_id": run.run_id, "name": run.name, "state": run.state, "steps": run.last_step,
            "total_steps": run.total_steps, "final_loss": run.final_loss,
            "best_eval_loss": best[1] if best else None, "best_eval_step": best[0] if best else None,
            "median_tokens_per_s": run.median_tokens_per_s, "peak_memory_bytes": run.peak_memory_bytes,
            "memory_kind": run.memory_kind, "alerts": [a.get("code") for a in run.alerts]}


def runs_table(runs: list[RunCurves]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title="runs", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (("#", "right"), ("state", "left"), ("steps", "right"), ("loss", "right"),
                          ("best eval", "right"), ("tok/s", "right"), ("peak memory", "right"),
                          ("alerts", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "alerts",  # type: ignore[arg-type]
                         min_width=6 if name == "alerts" else None)
    for i, run in enumerate(runs):
        best = run.best_eval
        table.add_row(MARKERS[i], run.state, f"{run.last_step or 0}/{run.total_steps or '?'}",
                      _num(run.final_loss, ".4f"), f"{best[1]:.4f} ({best[0]})" if best else "-",
                      _num(run.median_tokens_per_s, ",.0f"),
                      f"{memory(run.peak_memory_bytes)} {run.memory_kind}" if run.peak_memory_bytes else "-",
                      ", ".join(a.get("code", "?") for a in run.alerts) or "-")
    return table


def settings_table(runs: list[RunCurves], differ: dict[str, list[Any]]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title="settings that differ", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("setting")
    for i in range(len(runs)):
        table.add_column(MARKERS[i])
    if not differ:
        table.add_row("(all the same)", *["" for _ in runs])
    for key, values in differ.items():
        table.add_row(key, *["-" if v is None else str(v) for v in values])
    return table


def _num(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "-"


def text_chart(series: list[tuple[str, list[float], list[float]]], x_label: str, width: int = CHART_WIDTH,
               height: int = CHART_HEIGHT) -> list[str]:
    """Lines of a plain-text chart: each series drawn with its marker character ('*' where two meet)."""
    points = [(marker, x, y) for marker, xs, ys in series for x, y in zip(xs, ys) if math.isfinite(y)]
    if not points:
        return ["(no data yet)"]
    x0, x1 = min(p[1] for p in points), max(p[1] for p in points)
    y0, y1 = min(p[2] for p in points), max(p[2] for p in points)
    xspan, yspan = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    grid = [[" "] * width for _ in range(height)]
    for marker, x, y in points:
        col = round((x - x0) / xspan * (width - 1))
        row = round((y1 - y) / yspan * (height - 1))
        grid[row][col] = marker if grid[row][col] in (" ", marker) else "*"
    labels = {0: f"{y1:.4g}", height // 2: f"{(y0 + y1) / 2:.4g}", height - 1: f"{y0:.4g}"}
    pad = max(len(label) for label in labels.values())
    lines = [f"{labels.get(r, ''):>{pad}} |{''.join(row)}" for r, row in enumerate(grid)]
    left, right = f"{x_label} {x0:,.0f}", f"{x1:,.0f}"
    lines.append(" " * (pad + 2) + left + right.rjust(width - len(left)))
    return lines


def cmd_plot(args: argparse.Namespace) -> int:
    run = rundir.find(args.run)
    curves = curves_mod.load(run)
    if args.csv:
        curves_mod.write_csv(curves, args.csv)
        print(f"wrote {len(curves.steps)} steps to {args.csv}")
    if args.out or not args.csv:
        from tunewiz.engine.use import plot

        out = plot.write_chart(curves, args.out or plot.default_path(run))
        print(f"wrote the chart to {out} ({len(curves.steps)} steps, {len(curves.evals)} evaluations)")
        for report in plot.link_reports(run):
            print(f"linked it from {report}")
    return 0
