"""Light charts for the dashboard: braille line charts, sparklines and gauge bars.

Drawn by hand rather than with plotext: a plotext figure costs 70-85 ms to build on the 2-core test
machine, while these charts cost about a millisecond, which keeps following a live run under 5% of a core.
The output depends only on the data and the size, so snapshots are stable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.text import Text
from textual.strip import Strip
from textual.widget import Widget

# Braille dot bits, indexed [dx][dy] within a 2x4 cell.
_DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
SPARKS = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class ChartSeries:
    """One line on a chart."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    style: str
    markers: bool = False
    """Draw a 2x2 dot square at each point (for sparse series such as eval loss)."""


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10000:
        return f"{value / 1000:.0f}k"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 1:
        return f"{value:.2f}" if magnitude < 10 else f"{value:.1f}"
    if magnitude >= 0.01:
        return f"{value:.3f}"
    return f"{value:.0e}".replace("e-0", "e-")


def axis_labels(low: float, high: float) -> list[str]:
    """Labels for the top, middle and bottom of an axis, with just enough digits to tell them apart."""
    values = [high, (low + high) / 2, low]
    magnitude = max(abs(low), abs(high))
    span = high - low
    if magnitude >= 10000:
        digits = 0 if span >= 3000 else 1
        return [f"{v / 1000:.{digits}f}k" for v in values]
    if 0 < magnitude < 0.01:
        relative = span / magnitude
        digits = 0 if relative >= 1 / 3 else min(3, max(1, -math.floor(math.log10(relative)) if span else 1))
        return [f"{v:.{digits}e}".replace("e-0", "e-").replace("e+00", "") if v else "0" for v in values]
    digits = 0 if span >= 30 else max(0, min(6, math.ceil(-math.log10(span / 2)) + 1)) if span > 0 else 2
    return [f"{v:.{digits}f}" for v in values]


def _bucket(xs: Sequence[float], ys: Sequence[float], x0: float, x1: float, columns: int) -> list[tuple[int, float]]:
    """(pixel column, mean y) for the points, one per pixel column at most."""
    span = (x1 - x0) or 1.0
    sums: dict[int, list[float]] = {}
    for x, y in zip(xs, ys):
        if y is None or not math.isfinite(y):
            continue
        col = min(columns - 1, max(0, int((x - x0) / span * (columns - 1) + 0.5)))
        entry = sums.get(col)
        if entry is None:
            sums[col] = [y, 1.0]
        else:
            entry[0] += y
            entry[1] += 1
    return [(col, s / n) for col, (s, n) in sorted(sums.items())]


def render_chart(series: Sequence[ChartSeries], width: int, height: int,
                 fmt: Callable[[float], str] = _fmt, x_label: str = "step", empty: str = "waiting for data",
                 log: bool = False) -> Text:
    """A braille line chart with a y axis (min, middle, max) and an x axis (first and last x).

    With `log`, y is drawn on a log scale (values at or below zero are left out) and labelled in y's units.
    """
    if width < 12 or height < 3:
        return Text("")
    if log:
        series = [ChartSeries(s.label, [x for x, y in zip(s.xs, s.ys) if y is not None and y > 0],
                              [math.log10(y) for y in s.ys if y is not None and y > 0], s.style, s.markers)
                  for s in series]
        fmt = _log_fmt
    drawn = [s for s in series if len(s.xs)]
    if not drawn:
        lines = [" " * width for _ in range(height)]
        mid = height // 2
        lines[mid] = empty.center(width)[:width]
        return Text("\n".join(lines), style="dim")
    xs_all = [x for s in drawn for x in s.xs]
    ys_all = [y for s in drawn for y in s.ys if y is not None and math.isfinite(y)]
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = (min(ys_all), max(ys_all)) if ys_all else (0.0, 1.0)
    if y1 - y0 < 1e-12:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    else:
        pad = (y1 - y0) * 0.05
        y0, y1 = (y0 - pad if y0 - pad >= 0 or y0 < 0 else 0.0), y1 + pad  # no negative axis for positive data
    labels = axis_labels(y0, y1) if fmt is _fmt else [fmt(y1), fmt((y0 + y1) / 2), fmt(y0)]
    label_w = max(len(label) for label in labels)
    plot_w = width - label_w - 1
    plot_h = height - 1
    if plot_w < 4 or plot_h < 2:
        return Text("")
    cols, rows = plot_w * 2, plot_h * 4
    cells: list[list[int]] = [[0] * plot_w for _ in range(plot_h)]
    owner: list[list[int]] = [[-1] * plot_w for _ in range(plot_h)]

    def dot(px: int, py: int, who: int) -> None:
        if 0 <= px < cols and 0 <= py < rows:
            row, col = py // 4, px // 2
            cells[row][col] |= _DOTS[px % 2][py % 4]
            owner[row][col] = who

    yspan = y1 - y0
    for who, s in enumerate(drawn):
        points = _bucket(s.xs, s.ys, x0, x1, cols)
        pixels = [(col, int(round((y1 - y) / yspan * (rows - 1)))) for col, y in points]
        previous = None
        for px, py in pixels:
            if s.markers:
                for dx in (0, 1):
                    for dy in (0, 1):
                        dot(px - dx, py - dy, who)
            if previous is not None and not s.markers:
                ax, ay = previous
                steps = max(abs(px - ax), abs(py - ay), 1)
                for i in range(1, steps + 1):
                    dot(ax + (px - ax) * i // steps, ay + (py - ay) * i // steps, who)
            else:
                dot(px, py, who)
            previous = (px, py)

    text = Text(no_wrap=True, overflow="crop")
    label_rows = {0: labels[0], plot_h // 2: labels[1], plot_h - 1: labels[2]}
    for r in range(plot_h):
        text.append(label_rows.get(r, "").rjust(label_w), style="dim")
        text.append("┤" if r in label_rows else "│", style="dim")
        run_style: str | None = None
        run: list[str] = []
        for c in range(plot_w):
            bits = cells[r][c]
            char = chr(0x2800 + bits) if bits else " "
            style = drawn[owner[r][c]].style if bits else ""
            if style != run_style and run:
                text.append("".join(run), style=run_style or "")
                run = []
            run_style = style
            run.append(char)
        if run:
            text.append("".join(run), style=run_style or "")
        text.append("\n")
    left, right = f"{x_label} {fmt_x(x0)}", fmt_x(x1)
    axis = " " * (label_w + 1) + left + right.rjust(max(0, plot_w - len(left)))
    text.append(axis[:width], style="dim")
    return text


def _log_fmt(exponent: float) -> str:
    return _fmt(10 ** exponent)


def fmt_x(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1 or value == 0 else f"{value:.2g}"


def legend(series: Sequence[ChartSeries]) -> str:
    """Console markup for a border title: each label in its series' colour."""
    return " ".join(f"[{s.style}]━ {s.label}[/]" for s in series)


class LineChart(Widget):
    """A titled braille chart; `update_series` redraws only when the data changed."""

    DEFAULT_CSS = """
    LineChart {
        border: round $primary 40%;
        border-title-color: $text;
        padding: 0 0;
        height: 1fr;
        width: 1fr;
    }
    """

    def __init__(self, title: str, fmt: Callable[[float], str] = _fmt, *, id: str | None = None,  # noqa: A002
                 empty: str = "waiting for data") -> None:
        super().__init__(id=id)
        self.title = title
        self.fmt = fmt
        self.empty = empty
        self.series: tuple[ChartSeries, ...] = ()
        self.version: object = None
        self._cache: tuple[tuple[object, ...], list[Strip]] | None = None
        self.x_label = "step"
        """What x counts (the compare screen draws by tokens seen too)."""
        self.log_scale = False
        """Draw y on a log scale (a loss that falls by orders of magnitude stays readable)."""
        self.renders = 0
        """How many times the chart was drawn (tests check that unchanged data is not redrawn)."""

    def on_mount(self) -> None:
        self._set_title()

    def _set_title(self) -> None:
        title = f"{self.title} (log scale)" if self.log_scale else self.title
        self.border_title = f"{title} {legend(self.series)}" if len(self.series) > 1 else title

    def toggle_log(self) -> None:
        self.log_scale = not self.log_scale
        self._set_title()
        self.refresh()

    def update_series(self, series: Sequence[ChartSeries], version: object, subtitle: str | None = None) -> None:
        if version == self.version:
            return
        self.series, self.version = tuple(series), version
        self._set_title()
        if subtitle is not None:
            self.border_subtitle = subtitle
        self.refresh()

    def render_line(self, y: int) -> Strip:
        """One row of the chart, from strips made once per size and data version (Textual's line API)."""
        size = self.content_size
        key = (size.width, size.height, self.version, self.app.theme, self.log_scale)
        if self._cache is None or self._cache[0] != key:
            self.renders += 1
            text = render_chart(self.series, size.width, size.height, self.fmt, x_label=self.x_label, empty=self.empty,
                                log=self.log_scale)
            base = self.rich_style
            console = self.app.console
            strips = []
            for line in text.split("\n", allow_blank=True):
                segments = list(line.render(console))
                strips.append(Strip(segments).apply_style(base).adjust_cell_length(size.width, base))
            self._cache = (key, strips)
        strips = self._cache[1]
        return strips[y] if 0 <= y < len(strips) else Strip.blank(size.width, self.rich_style)


def sparkline(values: Sequence[float], width: int, lo: float | None = None, hi: float | None = None) -> str:
    """The last `width` values as ▁▂▃▄▅▆▇█ (empty when there are none)."""
    values = [v for v in values if v is not None and math.isfinite(v)][-width:]
    if not values:
        return ""
    low = min(values) if lo is None else lo
    high = max(values) if hi is None else hi
    span = high - low
    if span <= 0:
        return SPARKS[len(SPARKS) // 2 if high else 0] * len(values)
    return "".join(SPARKS[min(len(SPARKS) - 1, max(0, int((v - low) / span * (len(SPARKS) - 1) + 0.5)))]
                   for v in values)


def gauge(fraction: float | None, width: int, peak: float | None = None) -> Text:
    """`█████▒░░░░` filled to `fraction`; `peak` (a fraction) is marked with ▒ past the fill."""
    text = Text()
    if fraction is None:
        text.append("·" * width, style="dim")
        return text
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    style = "green" if fraction < 0.8 else "yellow" if fraction < 0.95 else "red"
    text.append("█" * filled, style=style)
    peak_cells = 0
    if peak is not None:
        peak_cells = max(0, min(width, round(min(1.0, peak) * width)) - filled)
        text.append("▒" * peak_cells, style=style)
    text.append("░" * (width - filled - peak_cells), style="dim")
    return text
