"""Small PNG figures drawn with PIL (no plotting library): line charts and labelled image tables."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
_WIDTH, _HEIGHT, _MARGIN, _LEGEND_ROW = 720, 420, 60, 16


def _integer_ticks(lo: float, hi: float, count: int = 8) -> np.ndarray:
    step = max(1, int(np.ceil((hi - lo) / count)))
    return np.arange(np.ceil(lo), hi + 1e-9, step)


def line_chart(lines: dict, *, points: dict | None = None, title: str = "", xlabel: str = "",
               ylabel: str = "") -> Image.Image:
    """`lines` {label: (xs, ys)} drawn as polylines, `points` {label: (xs, ys)} as dots (each
    label its own colour, in order); a legend below the axes."""
    points = points or {}
    series = [(label, xs, ys, False) for label, (xs, ys) in lines.items()]
    series += [(label, xs, ys, True) for label, (xs, ys) in points.items()]
    if not series or not any(len(xs) for _, xs, _, _ in series):
        raise ValueError("nothing to plot: every series is empty")
    all_x = np.concatenate([np.asarray(xs, float) for _, xs, _, _ in series])
    all_y = np.concatenate([np.asarray(ys, float) for _, _, ys, _ in series])
    x_lo, x_hi = all_x.min(), max(all_x.max(), all_x.min() + 1)
    y_lo, y_hi = all_y.min(), all_y.max()
    pad = max(0.05 * (y_hi - y_lo), 0.01)  # a flat series still gets an axis of some height
    y_lo, y_hi = y_lo - pad, y_hi + pad
    legend_height = _LEGEND_ROW * len(series) + 8
    image = Image.new("RGB", (_WIDTH, _HEIGHT + legend_height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = _MARGIN, _WIDTH - 20, 30, _HEIGHT - 40

    def to_px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline="black")
    for y in np.linspace(y_lo, y_hi, 6):
        _, py = to_px(x_lo, y)
        draw.line((left - 4, py, right, py), fill=(225, 225, 225))
        draw.text((4, py - 6), f"{y:.3f}", fill="black", font=font)
    for x in _integer_ticks(x_lo, x_hi):
        px, _ = to_px(x, y_lo)
        draw.line((px, bottom, px, bottom + 4), fill="black")
        draw.text((px - 8, bottom + 6), f"{x:.0f}", fill="black", font=font)
    draw.text((left + 140, 8), title, fill="black", font=font)
    draw.text(((left + right) // 2 - 3 * len(xlabel), bottom + 22), xlabel, fill="black", font=font)
    draw.text((4, top - 16), ylabel, fill="black", font=font)
    for i, (label, xs, ys, as_points) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        pixels = [to_px(float(x), float(y)) for x, y in zip(xs, ys)]
        if as_points:
            for px, py in pixels:
                draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=color)
        elif len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        elif pixels:
            draw.ellipse((pixels[0][0] - 2, pixels[0][1] - 2, pixels[0][0] + 2, pixels[0][1] + 2), fill=color)
        y = _HEIGHT + 4 + i * _LEGEND_ROW
        draw.rectangle((left, y + 3, left + 18, y + 11), fill=color)
        draw.text((left + 26, y), label, fill="black", font=font)
    return image


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
