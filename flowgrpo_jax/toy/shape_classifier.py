"""Shape of a detected object: nearest neighbour in a bank of synthesised examples.

The bank holds every shape rendered at the pixel sizes the world uses, at sub-pixel offsets
and under Gaussian blurs of increasing width, each put through the checker's own pipeline
(threshold, crop to the box, resample to a small grid). Blurred examples matter: a generated
cross loses its arm tips and a generated square its corners, and the bank has seen both.
"""
import functools

import numpy as np
from PIL import Image, ImageFilter

from flowgrpo_jax.toy.world import SHAPES, SceneObject, render_scene

GRID = 8
SIZE_FRACTIONS = (0.2, 0.42)  # object sides the bank covers, fractions of the image side
BLURS = (0.0, 0.01, 0.02)  # Gaussian sigmas, fractions of the image side
OFFSETS = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5))  # sub-pixel object positions
ASPECT_WEIGHT = 0.5  # weight of log(width / height) next to the grid's 64 cells


def features(mask: np.ndarray) -> np.ndarray:
    """Feature vector of a boolean mask cropped to its box: resampled grid and aspect ratio."""
    h, w = mask.shape
    grid = Image.fromarray(mask.astype(np.float32), mode="F").resize((GRID, GRID), Image.BOX)
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
    """(features (M, GRID*GRID + 1), shape index (M,)) for images of `image_size` pixels."""
    lo, hi = (int(round(f * image_size)) for f in SIZE_FRACTIONS)
    rows, labels = [], []
    for index, shape in enumerate(SHAPES):
        for side in range(lo, hi + 1):
            for offset in OFFSETS:
                for blur in BLURS:
                    rows.append(_example(shape, side, offset, blur * image_size, threshold))
                    labels.append(index)
    return np.stack(rows).astype(np.float32), np.array(labels)


def classify(masks, image_size: int, threshold: float) -> list[str]:
    """Per boolean mask (each cropped to its box), the shape of the nearest bank example."""
    if not masks:
        return []
    examples, labels = bank(image_size, threshold)
    queries = np.stack([features(m) for m in masks]).astype(np.float32)
    distance = np.square(examples).sum(1) - 2 * queries @ examples.T  # + |query|^2, same per row
    return [SHAPES[i] for i in labels[distance.argmin(axis=1)]]
