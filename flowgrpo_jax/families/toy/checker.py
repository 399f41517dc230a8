"""GenEval-style checker of toy-world images: detect the objects, score a prompt's metadata.

Detection: each pixel bright enough to be foreground gets the palette colour of nearest hue
(white when unsaturated), or "unknown" when no palette hue is near or the pixel is greyish;
connected components of one label are objects; components smaller than MIN_AREA_FRACTION of
the image are ignored; the shape is that of the nearest example in a bank of synthesised
renders (see shape_classifier), or none when the component resembles none of them. Objects of
a class are ranked by area, our stand-in for a detector's confidence.

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

FOREGROUND_THRESHOLD = 100  # max channel; a palette colour at about 40% coverage
# Colours by HSV hue (a blend with black keeps hue and saturation): palette hues lie 47 to 79
# degrees apart, palette saturations are >= 0.74; white is the one unsaturated colour.
HUE_TOLERANCE = 20.0
MIN_SATURATION = 0.4
WHITE_MAX_SATURATION = 0.2
MIN_AREA_FRACTION = 0.012  # of the image area; the smallest rendered object is about 0.04
_UNKNOWN = len(COLORS)  # label of foreground pixels of no palette colour
_CHROMATIC = tuple(c for c in COLORS if c != "white")
# 8-connected in space, never across images or colour planes.
_STRUCTURE = np.zeros((3, 3, 3), bool)
_STRUCTURE[1] = True


@dataclass(frozen=True)
class Detection:
    shape: str | None  # None: no shape of the world
    color: str | None  # None: not near any palette colour
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
    area: int

    def as_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "box": list(self.box), "area": self.area}


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def _hue_saturation(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV hue in degrees [0, 360) and saturation of uint8 (M, 3) pixels."""
    x = pixels.astype(np.float32)
    high, low = x.max(-1), x.min(-1)
    spread = np.maximum(high - low, 1e-6)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    hue = np.where(high == r, (g - b) / spread,
                   np.where(high == g, 2 + (b - r) / spread, 4 + (r - g) / spread))
    return (60 * hue) % 360, (high - low) / np.maximum(high, 1e-6)


_HUES, _ = _hue_saturation(np.array([PALETTE[c] for c in _CHROMATIC], np.uint8))


def _colour_labels(images: np.ndarray) -> np.ndarray:
    """(N, H, W) index into COLORS per pixel; -1 background, _UNKNOWN foreground of no colour."""
    pixels = images.reshape(-1, 3)
    labels = np.full(len(pixels), -1, np.int64)
    foreground = np.flatnonzero(pixels.max(axis=-1) >= FOREGROUND_THRESHOLD)
    hue, saturation = _hue_saturation(pixels[foreground])
    gap = np.abs((hue[:, None] - _HUES + 180) % 360 - 180)  # circular distance to each hue
    nearest = gap.argmin(-1)
    colour = np.array([COLORS.index(c) for c in _CHROMATIC])[nearest]
    colour[(saturation < MIN_SATURATION) | (gap.min(-1) > HUE_TOLERANCE)] = _UNKNOWN
    colour[saturation <= WHITE_MAX_SATURATION] = COLORS.index("white")
    labels[foreground] = colour
    return labels.reshape(images.shape[:-1])


def detect_batch(images: np.ndarray) -> list[list[Detection]]:
    """Objects found in each image of a uint8 (N, H, W, 3) batch, largest first."""
    images = _check_images(images)
    n, h, w, _ = images.shape
    labels = _colour_labels(images)
    onehot = labels[:, None] == np.arange(_UNKNOWN + 1)[None, :, None, None]
    image_of, colour_of = np.nonzero(onehot.any(axis=(2, 3)))  # label only planes in use
    if not len(image_of):
        return [[] for _ in range(n)]
    components, _ = ndimage.label(onehot[image_of, colour_of], structure=_STRUCTURE)
    areas = np.bincount(components.ravel())
    min_area = MIN_AREA_FRACTION * h * w
    kept, masks = [], []
    for index, where in enumerate(ndimage.find_objects(components), start=1):
        if where is None or areas[index] < min_area:
            continue
        plane, ys, xs = where
        kept.append((index, plane.start, ys, xs))
        masks.append(components[plane.start, ys, xs] == index)
    shapes = shape_classifier.classify(masks, h, FOREGROUND_THRESHOLD)
    found = [[] for _ in range(n)]
    for (index, plane, ys, xs), shape in zip(kept, shapes):
        colour = colour_of[plane]
        found[image_of[plane]].append(Detection(
            shape=shape, color=COLORS[colour] if colour < _UNKNOWN else None,
            box=(xs.start, ys.start, xs.stop, ys.stop), area=int(areas[index])))
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
