"""Shape of a detected object: nearest neighbour among moment-normalised soft masks.

A component's soft mask (its smoothed brightness over its own level, clipped to 1, zero off
the component) is sampled on a GRID x GRID lattice centred on its brightness centroid and
scaled by its radius of gyration, so the features do not depend on where the object sits, how
big it is or how bright it is. The bank holds every shape of the world rendered alone at the
pixel sides the world uses and around them, at sub-pixel offsets and under Gaussian blurs up
to 1.2 px, each segmented by the checker's own pipeline (`checker.segment`). A component far
from every example is no shape at all, like a detector's low confidence.
"""
import functools

import numpy as np
from scipy import ndimage

from flowgrpo_jax.families.toy.world import SHAPES, SceneObject, render_scene

GRID = 16
EXTENT = 2.2  # the lattice spans +-EXTENT radii of gyration: every shape fits inside
SIZE_FRACTIONS = (0.18, 0.42)  # object sides the bank covers, fractions of the image side
BLURS_PX = (0.0, 0.4, 0.8, 1.2)  # Gaussian sigmas of the bank's examples, in pixels
OFFSETS = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5), (0.25, 0.75))  # sub-pixel positions
# Squared feature distance beyond which a component is no shape. At 48 px, renders under the
# robustness corruptions reach 0.7; bars, ellipses and merged pairs of objects lie above 10.
MAX_DISTANCE = 4.0
_U = np.linspace(-EXTENT, EXTENT, GRID)


def features(soft: np.ndarray, components: np.ndarray, image_of: np.ndarray,
             index: np.ndarray) -> np.ndarray:
    """(K, GRID*GRID) features of components `index` (labels in `components`, (N, H, W)), the
    k-th lying in image `image_of[k]`; `soft` (N, H, W) is each pixel's soft mask value."""
    n, h, w = components.shape
    labels = components.ravel()
    where = np.flatnonzero(labels)
    weight = soft.ravel()[where]
    ys, xs = np.divmod(where % (h * w), w)
    slot = np.zeros(labels.max() + 1, np.int64)
    slot[index] = np.arange(len(index))
    k, keep = slot[labels[where]], np.isin(labels[where], index)
    k, weight, ys, xs = k[keep], weight[keep], ys[keep], xs[keep]
    mass = np.bincount(k, weight, len(index))
    cy, cx = (np.bincount(k, weight * v, len(index)) / mass for v in (ys, xs))
    radius = np.sqrt(np.bincount(k, weight * ((ys - cy[k]) ** 2 + (xs - cx[k]) ** 2), len(index))
                     / mass)
    y = cy[:, None, None] + radius[:, None, None] * _U[None, :, None]
    x = cx[:, None, None] + radius[:, None, None] * _U[None, None, :]
    y, x = np.broadcast_arrays(y, x)
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = y - y0, x - x0
    out = np.zeros(y.shape)
    plane = image_of[:, None, None]
    for dy, dx, share in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                          (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yy, xx = y0 + dy, x0 + dx
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        yy, xx = np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)
        own = components[plane, yy, xx] == np.asarray(index)[:, None, None]
        out += share * np.where(inside & own, soft[plane, yy, xx], 0.0)
    return out.reshape(len(index), -1).astype(np.float32)


@functools.cache
def bank(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(features (M, GRID*GRID), shape index (M,)) for images of `image_size` pixels."""
    from flowgrpo_jax.families.toy import checker  # the checker imports this module
    lo, hi = (int(round(f * image_size)) for f in SIZE_FRACTIONS)
    images, labels = [], []
    for index, shape in enumerate(SHAPES):
        for side in range(lo, hi + 1):
            for ox, oy in OFFSETS:
                centre = image_size / 2 + np.array([ox, oy])
                obj = SceneObject(shape, "white", *(centre / image_size), side / image_size)
                image = render_scene([obj], image_size).astype(np.float32)
                for blur in BLURS_PX:
                    images.append(ndimage.gaussian_filter(image, (blur, blur, 0)) if blur else image)
                    labels.append(index)
    images = np.clip(np.rint(np.stack(images)), 0, 255).astype(np.uint8)
    soft, components, image_of, index = checker.segment(images)
    largest = {}  # one component per example image: its largest
    areas = np.bincount(components.ravel())
    for i, k in zip(image_of, index):
        if i not in largest or areas[k] > areas[largest[i]]:
            largest[i] = k
    order = sorted(largest)
    rows = features(soft, components, np.array(order), np.array([largest[i] for i in order]))
    return rows, np.array(labels)[order]


def classify(feature_rows: np.ndarray, image_size: int) -> list[str | None]:
    """Per feature row, the shape of the nearest bank example, or None when even that is
    farther than MAX_DISTANCE (a blob that is no shape of the world)."""
    if not len(feature_rows):
        return []
    examples, labels = bank(image_size)
    distance = (np.square(feature_rows).sum(1, keepdims=True) - 2 * feature_rows @ examples.T
                + np.square(examples).sum(1))
    nearest = distance.argmin(axis=1)
    best = distance[np.arange(len(feature_rows)), nearest]
    return [SHAPES[labels[i]] if d <= MAX_DISTANCE else None for i, d in zip(nearest, best)]
