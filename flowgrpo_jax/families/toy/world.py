"""The toy compositional world: coloured shapes on a black background, and their geometry.

A scene is a tuple of `SceneObject`s whose centre and size are fractions of the image side,
so one scene renders at any resolution. Shapes fill a square box (`size` wide), which is what
lets the checker recognise them from a box-normalised mask. The background is black so that
anti-aliased or blurred edges keep the hue of their object (a blend with black only darkens).
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "frame", "arrow", "hourglass",
          "heart")
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}

# Five saturated colours at hues 356, 66, 136, 212 and 284 degrees (70 to 76 apart, so a hue
# shifted by 30 degrees is still nearest its own colour), plus white.
PALETTE = {
    "red": (235, 40, 53),
    "yellow": (216, 235, 40),
    "green": (40, 235, 92),
    "blue": (40, 131, 235),
    "purple": (183, 40, 235),
    "white": (235, 235, 235),
}
COLORS = tuple(PALETTE)
BACKGROUND = (0, 0, 0)

# GenEval's relations, in image coordinates (y grows downwards).
RELATIONS = ("left of", "right of", "above", "below")
# GenEval's POSITION_THRESHOLD: offsets shrink by this fraction of the two box sizes.
POSITION_THRESHOLD = 0.1
# 48, not 32: at 32 px circles, diamonds and crosses blur into each other (checker strict
# accuracy 0.92 on sharp renders at 32 px, 1.0 at 48 px).
DEFAULT_IMAGE_SIZE = 48
CROSS_ARM = 1 / 3  # arm width of the cross and stem width of the arrow, fractions of the box
HOLE = 1 / 2  # side of the hole in a ring or a frame, as a fraction of the box
WAIST = 1 / 6  # width of the hourglass at its middle, as a fraction of the box
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    cx: float  # centre and side of the object's square box, fractions of the image side
    cy: float
    size: float

    def box(self, image_size: float = 1.0) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the object's box, scaled to `image_size`."""
        half = self.size / 2
        return tuple(v * image_size for v in (self.cx - half, self.cy - half, self.cx + half, self.cy + half))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(xm, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=fill)
    elif shape == "cross":
        arm = (x1 - x0) * CROSS_ARM / 2
        draw.rectangle((xm - arm, y0, xm + arm, y1), fill=fill)
        draw.rectangle((x0, ym - arm, x1, ym + arm), fill=fill)
    elif shape in ("ring", "frame"):
        inset = (x1 - x0) * (1 - HOLE) / 2
        outline = draw.ellipse if shape == "ring" else draw.rectangle
        outline(box, fill=fill)
        outline((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=BACKGROUND)
    elif shape == "arrow":  # pointing up: a triangular head over a stem
        stem = (x1 - x0) * CROSS_ARM / 2
        draw.polygon([(xm, y0), (x1, ym), (x0, ym)], fill=fill)
        draw.rectangle((xm - stem, ym, xm + stem, y1), fill=fill)
    elif shape == "hourglass":
        waist = (x1 - x0) * WAIST / 2
        draw.polygon([(x0, y0), (x1, y0), (xm + waist, ym), (x1, y1), (x0, y1), (xm - waist, ym)],
                     fill=fill)
    elif shape == "heart":  # two discs over a downward triangle
        r = (x1 - x0) / 4
        draw.ellipse((x0, y0, xm, y0 + 2 * r), fill=fill)
        draw.ellipse((xm, y0, x1, y0 + 2 * r), fill=fill)
        draw.polygon([(x0 + 0.15 * r, y0 + 1.4 * r), (x1 - 0.15 * r, y0 + 1.4 * r), (xm, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(scene, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased (size, size, 3) uint8 image of `scene` (drawn large, box-filtered down)."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        if obj.color not in PALETTE:
            raise ValueError(f"unknown colour {obj.color!r}; expected one of {COLORS}")
        _draw_shape(draw, obj.shape, obj.box(big), PALETTE[obj.color])
    return np.array(image.resize((size, size), Image.BOX))


def relations(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box A to box B as GenEval computes them (boxes are x0, y0, x1, y1).

    The centre offset is shrunk by `threshold` times the summed box sizes, per axis; a
    relation holds when its axis carries more than half of the (unshrunk) offset's length.
    """
    a, b = np.asarray(box_a, np.float64), np.asarray(box_b, np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    shrunk = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found
