"""Shape of a detected object: nearest neighbour in a bank of synthesised examples.

The bank holds every shape rendered at the pixel sizes the world uses, at sub-pixel offsets
and under Gaussian blurs of increasing width, each put through the checker's own pipeline
(threshold, crop to the box, resample to a small grid). Blurred examples matter: a generated
cross loses its arm tips and a generated square its corners, and the bank has seen both.
A component far from every example is no shape at all, like a detector's low confidence.
"""
import functools

import numpy as np
from PIL import Image, ImageFilter

from flowgrpo_jax.families.toy.world import SHAPES, SceneObject, render_scene

MASK_SIZE = 8  # the side of the grid a component's mask is resampled to
SIZE_FRACTIONS = (0.2, 0.42)  # object sides the bank covers, fractions of the image side
BLURS = (0.0, 0.01, 0.02)  # Gaussian sigmas, fractions of the image side
OFFSETS = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5))  # sub-pixel object positions
# Squared feature distance beyond which a component is no shape. Measured at 48 px: renders
# reach 2.3 sharp and 3.5 (99th percentile) under a blur of 2% of the side; merged pairs of
# circles, lines, random polygons and 1:2 ellipses mostly lie above 6.
MAX_DISTANCE = 6.0
ASPECT_WEIGHT = 4.0  # weight of log(width / height): every shape of the world has a square box


def features(mask: np.ndarray) -> np.ndarray:
    """Feature vector of a boolean mask cropped to its box: resampled grid and aspect ratio."""
    h, w = mask.shape
    grid = Image.fromarray(mask.astype(np.float32), mode="F").resize((MASK_SIZE, MASK_SIZE), Image.BOX)
    return np.append(np.asarray(grid).ravel(), ASPECT_WEIGHT * np.log(w / h))


def _example(shape: str, side_px: int, offset, blur_px: float, threshold: float) -> np.ndarray:
    canvas = side_px + 8
    obj = SceneObject(shape, "white", (canvas / 2 + offset[0]) / canvas,
                      (canvas / 2 + offset[1]) / canvas, side_px / canvas)
    image = Image.fromarray(render_scene([obj], canvas))
    if blur_px:
        image = image.filter(ImageFilter.GaussianBlur(blur_px))
    mask = np.asarray(image).max(axis=-1) >= threshold
    ys, xs = np.nonzero(mask)
    return features(mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1])


@functools.cache
def bank(image_size: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(features (M, MASK_SIZE*MASK_SIZE + 1), shape index (M,)) for images of `image_size` pixels."""
    lo, hi = (int(round(f * image_size)) for f in SIZE_FRACTIONS)
    rows, labels = [], []
    for index, shape in enumerate(SHAPES):
        for side in range(lo, hi + 1):
            for offset in OFFSETS:
                for blur in BLURS:
                    rows.append(_example(shape, side, offset, blur * image_size, threshold))
                    labels.append(index)
    return np.stack(rows).astype(np.float32), np.array(labels)


def classify(masks, image_size: int, threshold: float) -> list[str | None]:
    """Per boolean mask (each cropped to its box), the shape of the nearest bank example, or
    None when even that is farther than MAX_DISTANCE (a blob that is no shape of the world)."""
    if not masks:
        return []
    examples, labels = bank(image_size, threshold)
    queries = np.stack([features(m) for m in masks]).astype(np.float32)
    distance = (np.square(queries).sum(1, keepdims=True) - 2 * queries @ examples.T
                + np.square(examples).sum(1))
    nearest = distance.argmin(axis=1)
    return [SHAPES[labels[i]] if d <= MAX_DISTANCE else None
            for i, d in zip(nearest, distance[np.arange(len(masks)), nearest])]
