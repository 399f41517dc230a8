"""Figures: charts drawn with matplotlib (Agg, no display) and written as PNG with the data they
draw beside them as JSON; labelled image tables composed with PIL, pixel for pixel."""
import json
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

# matplotlib's default colour cycle (tab10), in the order series are drawn.
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")


def data_path(png_path: str) -> str:
    """Where a chart's data goes beside its PNG: reward_curve.png -> reward_curve.data.json."""
    stem, _ = os.path.splitext(png_path)
    return stem + ".data.json"


def _floats(values) -> list:
    return [float(v) for v in np.asarray(values, float).reshape(-1)]


class Chart:
    """A matplotlib figure and the data it draws. save(path) writes the PNG at `path` and the
    data as JSON at data_path(path)."""

    def __init__(self, figure: Figure, data: dict):
        self.figure, self.data = figure, data

    def save(self, path: str) -> None:
        self.figure.savefig(path, format="png")
        with open(data_path(path), "w") as f:
            json.dump(self.data, f, indent=1)


def _figure(width: float = 8.0, height: float = 5.0) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas: PNG without any display or pyplot state
    return figure


def line_chart(lines: dict, *, points: dict | None = None, bands: dict | None = None,
               title: str = "", xlabel: str = "", ylabel: str = "") -> Chart:
    """`lines` {label: (xs, ys)} drawn as lines, `points` {label: (xs, ys)} as markers (each
    label its own colour, lines first, in order), `bands` {line label: (lows, highs)} shaded
    around their line (a spread over seeds); the legend below the axes."""
    points, bands = points or {}, bands or {}
    series = [(label, xs, ys, False) for label, (xs, ys) in lines.items()]
    series += [(label, xs, ys, True) for label, (xs, ys) in points.items()]
    if not series or not any(len(xs) for _, xs, _, _ in series):
        raise ValueError("nothing to plot: every series is empty")
    figure = _figure()
    axes = figure.add_subplot()
    for i, (label, xs, ys, as_points) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        if as_points:
            axes.plot(_floats(xs), _floats(ys), "o", color=color, markersize=7, label=label)
        else:
            axes.plot(_floats(xs), _floats(ys), "-", color=color, linewidth=2,
                      marker="o" if len(xs) == 1 else None, label=label)
            if label in bands:
                axes.fill_between(_floats(xs), *map(_floats, bands[label]), color=color,
                                  alpha=0.2, linewidth=0)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(True, color="#e0e0e0")
    axes.xaxis.get_major_locator().set_params(integer=True)
    figure.legend(loc="outside lower center", ncols=1, frameon=False)
    data = {"title": title, "xlabel": xlabel, "ylabel": ylabel,
            "lines": {label: {"x": _floats(xs), "y": _floats(ys)} for label, (xs, ys) in lines.items()},
            "points": {label: {"x": _floats(xs), "y": _floats(ys)} for label, (xs, ys) in points.items()},
            "bands": {label: {"low": _floats(lo), "high": _floats(hi)}
                      for label, (lo, hi) in bands.items()}}
    return Chart(figure, data)


def bar_chart(categories: list[str], series: dict, *, title: str = "", ylabel: str = "",
              ylim: tuple | None = None, errors: dict | None = None) -> Chart:
    """Grouped bars: for each category one bar per series {label: values, one per category},
    each bar labelled with its value; `errors` {label: values} draws +- error bars (a spread
    over seeds)."""
    errors = errors or {}
    if not categories or not series:
        raise ValueError("nothing to plot: no categories or no series")
    for label, values in series.items():
        if len(values) != len(categories):
            raise ValueError(f"series {label!r} has {len(values)} values for "
                             f"{len(categories)} categories")
    figure = _figure(max(6.0, 1.1 * len(categories) * max(1, len(series)) ** 0.5 + 2), 4.5)
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(len(categories))
    for i, (label, values) in enumerate(series.items()):
        bars = axes.bar(x + (i - (len(series) - 1) / 2) * width, _floats(values), width,
                        color=COLORS[i % len(COLORS)], label=label,
                        yerr=_floats(errors[label]) if label in errors else None, capsize=3)
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks(x, categories, rotation=20, ha="right")
    axes.set(title=title, ylabel=ylabel)
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.grid(True, axis="y", color="#e0e0e0")
    axes.set_axisbelow(True)
    axes.legend(frameon=False)
    data = {"title": title, "ylabel": ylabel, "categories": list(categories),
            "series": {label: _floats(values) for label, values in series.items()},
            "errors": {label: _floats(values) for label, values in errors.items()}}
    return Chart(figure, data)


def labelled_rows(rows: list, labels: list[str], *, column_titles: list[str] = (), scale: int = 2,
                  label_width: int = 260, gap: int = 8) -> Image.Image:
    """A table image: row i is `labels[i]` then its image blocks `rows[i]` (a list of uint8
    (H, W, 3) images, or of (N, H, W, 3) strips laid side by side), magnified `scale` times
    (nearest neighbour, so pixels stay pixels); a gap separates the blocks of a row."""
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    strips = [[np.concatenate(list(np.asarray(b)), axis=1) if np.asarray(b).ndim == 4 else np.asarray(b)
               for b in row] for row in rows]
    height = max(b.shape[0] for row in strips for b in row) * scale
    widths = [b.shape[1] * scale for b in strips[0]]
    title_height = 18 if column_titles else 0
    total_width = label_width + sum(widths) + gap * len(widths)
    image = Image.new("RGB", (total_width, title_height + len(rows) * (height + 2)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x = label_width
    for title, width in zip(column_titles, widths):
        draw.text((x + 2, 3), title, fill="black", font=font)
        x += width + gap
    for r, (label, row) in enumerate(zip(labels, strips)):
        y = title_height + r * (height + 2)
        draw.text((4, y + height // 2 - 6), label, fill="black", font=font)
        x = label_width
        for block in row:
            big = Image.fromarray(block).resize((block.shape[1] * scale, block.shape[0] * scale),
                                                Image.NEAREST)
            image.paste(big, (x, y))
            x += big.width + gap
    return image
