"""GenEval-style checker of toy-world images: detect the objects, score a prompt's metadata.

Detection (`segment`, `detect_batch`): the brightest channel is lightly smoothed; a pixel is
foreground when that brightness exceeds FOREGROUND_MIN and LOCAL_FRACTION of the peak
brightness within about an object's side, so dim objects segment as well as bright ones and
no per-pixel colour decides anything. Foreground pixels form 8-connected components;
components under MIN_AREA_FRACTION of the image are ignored. A component whose pixels hold
two palette colours (two touching objects) is split by 2-means on the pixels' chroma. An
object's colour is that of its brightness-weighted mean colour: white when unsaturated, else
the palette colour of nearest hue, or None when that colour is ambiguous (saturation between
white and colour, or a hue within AMBIGUOUS_HUE of halfway between two palette hues). Its
shape comes from `shape_classifier` (None: no shape of the world). Objects of a class are
ranked by area, our stand-in for a detector's confidence.

Scoring follows GenEval's evaluate() for `strict` (include clauses need at least `count`
objects of the class, colour and position checked on the top-ranked `count` of them; an
exclude clause fails at `count` or more) and the Flow-GRPO GenEval reward server's partial
score for `partial`: the mean of one term per count (1 - |wanted - found| / wanted, floored
at 0), per colour (the same on the colour count, 0 unless the class count is exact) and per
position (1 if exact and every pair holds, else 0; the reference also appends 1 after a failed
pair, a bug this checker does not copy).
"""
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from flowgrpo_jax.families.toy import shape_classifier
from flowgrpo_jax.families.toy.prompts import validate_metadata
from flowgrpo_jax.families.toy.world import COLORS, PALETTE, relations

SMOOTHING = 0.7  # Gaussian sigma of the brightness, pixels: averages out pixel noise
FOREGROUND_MIN = 40.0  # smoothed brightness; background noise stays below it
LOCAL_FRACTION = 0.45  # of the local peak brightness: the edge of an object at any brightness
PEAK_WINDOW_FRACTION = 0.27  # side of the local-peak window, fraction of the image side
MIN_AREA_FRACTION = 0.012  # of the image area; the smallest rendered object is about 0.02
# Colour of a mean colour: palette saturations are 0.83 and a 50% blend toward white keeps
# 0.41; palette hues lie 70 to 76 degrees apart, so a hue shifted by 30 is still named.
WHITE_MAX_SATURATION = 0.2
MIN_SATURATION = 0.3
AMBIGUOUS_HUE = 4.0  # degrees from halfway between the two nearest palette hues
SPLIT_MIN_VARIANCE = 0.02  # chroma variance above which a component is tried for a split
# Chroma distance the two colours of a split need: palette colours lie 0.66 or more apart
# (0.33 at a 50% blend toward white); 2-means halves of one noisy object lie closer.
SPLIT_MIN_DISTANCE = 0.3
_KMEANS_STEPS = 6
_CHROMATIC = tuple(c for c in COLORS if c != "white")
# 8-connected in space, never across images.
_STRUCTURE = np.zeros((3, 3, 3), bool)
_STRUCTURE[1] = True


@dataclass(frozen=True)
class Detection:
    shape: str | None  # None: no shape of the world
    color: str | None  # None: not clearly any palette colour
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
    area: int

    def as_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "box": list(self.box), "area": self.area}


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def _hue_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV hue in degrees [0, 360) and saturation of (M, 3) colours."""
    x = np.asarray(rgb, np.float64)
    high, low = x.max(-1), x.min(-1)
    spread = np.maximum(high - low, 1e-6)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    hue = np.where(high == r, (g - b) / spread,
                   np.where(high == g, 2 + (b - r) / spread, 4 + (r - g) / spread))
    return (60 * hue) % 360, (high - low) / np.maximum(high, 1e-6)


_HUES, _ = _hue_saturation(np.array([PALETTE[c] for c in _CHROMATIC]))


def colour_names(rgb: np.ndarray) -> list[str | None]:
    """Palette colour of each (M, 3) mean colour, None where it is ambiguous."""
    hue, saturation = _hue_saturation(rgb)
    distance = np.abs((hue[:, None] - _HUES + 180) % 360 - 180)  # circular, degrees
    gap, nearest = np.sort(distance, axis=1), distance.argmin(axis=1)
    names = []
    for s, (d1, d2), i in zip(saturation, gap[:, :2], nearest):
        if s < WHITE_MAX_SATURATION:
            names.append("white")
        elif s < MIN_SATURATION or (d2 - d1) / 2 < AMBIGUOUS_HUE:
            names.append(None)
        else:
            names.append(_CHROMATIC[i])
    return names


def _chroma(pixels: np.ndarray) -> np.ndarray:
    """(M, 3) colour less its grey part, over its brightness: the same along a blend to black."""
    return (pixels - pixels.mean(-1, keepdims=True)) / np.maximum(pixels.max(-1, keepdims=True), 1.0)


def _split(images, smooth, components, label, min_area) -> list[int]:
    """Splits component `label` in place when 2-means finds two distinct, differently named
    colours in it; returns the labels of the pieces (new ones from components.max() + 1), or [label]."""
    where = np.flatnonzero(components.ravel() == label)
    pixels = images.reshape(-1, 3)[where].astype(np.float64)
    chroma, weight = _chroma(pixels), smooth.ravel()[where] ** 2
    centres = chroma[[np.argmax(np.square(chroma - chroma.mean(0)).sum(1))]]
    centres = np.concatenate([centres, chroma[[np.argmax(np.square(chroma - centres[0]).sum(1))]]])
    for _ in range(_KMEANS_STEPS):
        side = np.square(chroma[:, None] - centres[None]).sum(-1).argmin(1)
        if side.min() == side.max():
            return [label]
        centres = np.stack([np.average(chroma[side == j], 0, weight[side == j]) for j in (0, 1)])
    if np.linalg.norm(centres[0] - centres[1]) < SPLIT_MIN_DISTANCE:
        return [label]
    means = np.stack([np.average(pixels[side == j], 0, smooth.ravel()[where][side == j]) for j in (0, 1)])
    names = colour_names(means)
    if names[0] == names[1] or None in names:
        return [label]
    flat = components.reshape(-1)
    flat[where] = 0
    pieces = []
    n, h, w = components.shape
    for j in (0, 1):
        mask = np.zeros(n * h * w, bool)
        mask[where[side == j]] = True
        parts, count = ndimage.label(mask.reshape(components.shape), structure=_STRUCTURE)
        sizes = np.bincount(parts.ravel())
        for p in range(1, count + 1):
            if sizes[p] >= min_area:
                new = components.max() + 1
                flat[parts.ravel() == p] = new
                pieces.append(new)
    return pieces


def segment(images: np.ndarray):
    """Objects of a uint8 (N, H, W, 3) batch as (soft (N, H, W) mask values, components
    (N, H, W) labels, image of each object (K,), label of each object (K,))."""
    n, h, w, _ = images.shape
    smooth = ndimage.gaussian_filter(images.max(-1).astype(np.float32), (0, SMOOTHING, SMOOTHING))
    window = max(3, int(round(PEAK_WINDOW_FRACTION * max(h, w))) | 1)
    peak = ndimage.maximum_filter(smooth, (1, window, window))
    foreground = (smooth > FOREGROUND_MIN) & (smooth > LOCAL_FRACTION * peak)
    components, count = ndimage.label(foreground, structure=_STRUCTURE)
    min_area = MIN_AREA_FRACTION * h * w
    labels = components.ravel()
    on = np.flatnonzero(labels)
    areas = np.bincount(labels[on], minlength=count + 1)
    # Chroma variance per component, brightness-weighted: high only where colours mix.
    chroma, weight = _chroma(images.reshape(-1, 3)[on].astype(np.float32)), smooth.ravel()[on] ** 2
    total = np.maximum(np.bincount(labels[on], weight, count + 1), 1e-9)
    mean = np.stack([np.bincount(labels[on], weight * c, count + 1) for c in chroma.T], 1) / total[:, None]
    variance = np.bincount(labels[on], weight * np.square(chroma).sum(1), count + 1) / total
    variance -= np.square(mean).sum(1)
    index = []
    for label in np.flatnonzero(areas >= min_area):
        if variance[label] > SPLIT_MIN_VARIANCE:
            index.extend(_split(images, smooth, components, label, min_area))
        else:
            index.append(label)
    index = np.array(index, np.int64)
    # An object's level: the mean over its pixels of the local peak, about its brightest.
    labels = components.ravel()
    on = np.flatnonzero(labels)
    size = components.max() + 1
    level = np.zeros(size)
    level[index] = (np.bincount(labels[on], peak.ravel()[on], size)
                    / np.maximum(np.bincount(labels[on], minlength=size), 1))[index]
    soft = np.minimum(smooth / np.maximum(level[components], 1e-6), 1.0) * (level[components] > 0)
    planes = ndimage.find_objects(components)
    image_of = np.array([planes[label - 1][0].start for label in index], np.int64)
    return soft.astype(np.float32), components, image_of, index


def detect_batch(images: np.ndarray) -> list[list[Detection]]:
    """Objects found in each image of a uint8 (N, H, W, 3) batch, largest first."""
    images = _check_images(images)
    n, h, w, _ = images.shape
    soft, components, image_of, index = segment(images)
    if not len(index):
        return [[] for _ in range(n)]
    shapes = shape_classifier.classify(
        shape_classifier.features(soft, components, image_of, index), h)
    # Brightness-weighted mean colour of each object.
    labels = components.ravel()
    on = np.flatnonzero(labels)
    pixels = images.reshape(-1, 3)[on].astype(np.float64)
    brightness, size = pixels.max(-1), components.max() + 1
    mean = np.stack([np.bincount(labels[on], brightness * c, size)[index] for c in pixels.T], 1)
    mean /= np.bincount(labels[on], brightness, size)[index, None]
    colours = colour_names(mean)
    areas = np.bincount(labels[on], minlength=size)
    planes = ndimage.find_objects(components)
    found = [[] for _ in range(n)]
    for i, label, shape, colour in zip(image_of, index, shapes, colours):
        _, ys, xs = planes[label - 1]
        found[i].append(Detection(shape=shape, color=colour, box=(xs.start, ys.start, xs.stop, ys.stop),
                                  area=int(areas[label])))
    return [sorted(d, key=lambda det: -det.area) for d in found]


def _by_class(detections) -> dict[str, list[Detection]]:
    by_class = {}
    for d in detections:
        by_class.setdefault(d.shape, []).append(d)
    return by_class


def _strict(by_class, metadata) -> tuple[bool, list[str]]:
    """GenEval's evaluate(): include clauses AND-ed, exclude clauses OR-ed."""
    reasons, matched_groups = [], []
    for clause in metadata["include"]:
        name, wanted = clause["class"], clause["count"]
        top = by_class.get(name, [])[:wanted]
        matched = len(top) >= wanted
        if not matched:
            reasons.append(f"expected {name}>={wanted}, found {len(top)}")
        else:
            if "color" in clause:
                right = sum(d.color == clause["color"] for d in top)
                if right < wanted:
                    matched = False
                    reasons.append(f"expected {clause['color']} {name}>={wanted}, found {right}"
                                   f" ({', '.join(str(d.color) for d in top)})")
            if "position" in clause and matched:
                relation, target = clause["position"]
                if matched_groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for d in top:
                        seen = (relations(d.box, t.box) for t in matched_groups[target])
                        wrong = [r for r in seen if relation not in r]
                        if wrong:
                            matched = False
                            reasons.append(f"expected {name} {relation} target, found"
                                           f" {' and '.join(sorted(wrong[0])) or 'no relation'}")
                            break
        matched_groups.append(top if matched else None)
    for clause in metadata.get("exclude", []):
        found = len(by_class.get(clause["class"], []))
        if found >= clause["count"]:
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {found}")
    return not reasons, reasons


def _partial(by_class, metadata) -> float:
    """Flow-GRPO's GenEval partial reward: mean of count, colour and position terms."""
    terms, matched_groups = [], []
    for clause in metadata["include"]:
        name, wanted = clause["class"], clause["count"]
        found = by_class.get(name, [])
        terms.append(max(0.0, 1 - abs(wanted - len(found)) / wanted))
        matched = len(found) == wanted
        if "color" in clause:
            right = sum(d.color == clause["color"] for d in found)
            terms.append(1 - abs(wanted - right) / wanted if matched else 0.0)
            matched = matched and right == wanted
        if "position" in clause:
            relation, target = clause["position"]
            holds = matched and matched_groups[target] is not None and all(
                relation in relations(d.box, t.box) for d in found for t in matched_groups[target])
            terms.append(1.0 if holds else 0.0)
            matched = holds
        matched_groups.append(found if matched else None)
    return float(np.mean(terms))


def extra_objects(detections, metadata: dict) -> int:
    """How many more objects were found than the include clauses ask for in all."""
    return max(0, len(detections) - sum(clause["count"] for clause in metadata["include"]))


def score(detections, metadata: dict) -> tuple[bool, float, dict]:
    """(strict, partial, details) of one image's detections against GenEval-style metadata."""
    validate_metadata(metadata)
    by_class = _by_class(detections)
    strict, reasons = _strict(by_class, metadata)
    details = {"reasons": reasons, "detections": [d.as_dict() for d in detections],
               "extra_objects": extra_objects(detections, metadata)}
    return strict, _partial(by_class, metadata), details


def check(image: np.ndarray, metadata: dict) -> tuple[bool, float, dict]:
    """(strict, partial, details) of one uint8 (H, W, 3) image against `metadata`."""
    return score(detect_batch(np.asarray(image)[None])[0], metadata)


def score_batch(images: np.ndarray, metadata: list[dict]) -> dict[str, np.ndarray]:
    """{"strict": (N,) float32 0/1, "partial": (N,) float32 in [0, 1], "exact": (N,) float32 0/1
    (strict, and no object beyond those asked for)} for a uint8 NHWC batch."""
    images = _check_images(images)
    if len(metadata) != len(images):
        raise ValueError(f"{len(images)} images but {len(metadata)} metadata entries")
    results = [score(d, m) for d, m in zip(detect_batch(images), metadata)]
    return {"strict": np.array([r[0] for r in results], np.float32),
            "partial": np.array([r[1] for r in results], np.float32),
            "exact": np.array([r[0] and not r[2]["extra_objects"] for r in results], np.float32)}
