"""Sampling scenes that satisfy a prompt's metadata: training images and ground truth.

A scene holds exactly the objects the include clauses ask for (so counting excludes hold),
colours as given or drawn at random, boxes apart by at least `gap`, and every position clause
met with a wider margin than the checker needs and along one axis only, so the relation
survives a blurry reproduction.
"""
import numpy as np

from flowgrpo_jax.toy.prompts import validate_metadata
from flowgrpo_jax.toy.world import COLORS, DEFAULT_IMAGE_SIZE, SceneObject, relations, render_scene

SIZE_RANGE = (0.25, 0.34)  # object side, fraction of the image side
GAP = 0.08  # least distance between two boxes, fraction of the image side
MARGIN = 0.02  # least distance from a box to the image border
SAMPLER_POSITION_THRESHOLD = 0.25  # stricter than the checker's 0.1
_TRIES_PER_OBJECT = 100
_TRIES_PER_SCENE = 100


def _apart(box, boxes, gap: float) -> bool:
    x0, y0, x1, y1 = box
    return all(x0 >= b[2] + gap or b[0] >= x1 + gap or y0 >= b[3] + gap or b[1] >= y1 + gap
               for b in boxes)


def _clearly(relation: str, box, target_box) -> bool:
    """The relation holds with the sampler's margin, and is the only one the checker sees."""
    return (relation in relations(box, target_box, SAMPLER_POSITION_THRESHOLD)
            and relations(box, target_box) == {relation})


def _place(metadata: dict, rng: np.random.Generator) -> tuple[SceneObject, ...] | None:
    placed: list[SceneObject] = []
    groups: list[list[SceneObject]] = []
    for clause in metadata["include"]:
        group = []
        for _ in range(clause["count"]):
            color = clause.get("color") or COLORS[rng.integers(len(COLORS))]
            for _ in range(_TRIES_PER_OBJECT):
                size = rng.uniform(*SIZE_RANGE)
                cx, cy = rng.uniform(MARGIN + size / 2, 1 - MARGIN - size / 2, size=2)
                obj = SceneObject(clause["class"], color, float(cx), float(cy), float(size))
                if not _apart(obj.box(), [o.box() for o in placed], GAP):
                    continue
                if "position" in clause:
                    relation, target = clause["position"]
                    if not all(_clearly(relation, obj.box(), t.box()) for t in groups[target]):
                        continue
                break
            else:
                return None
            placed.append(obj)
            group.append(obj)
        groups.append(group)
    return tuple(placed)


def sample_scene(metadata: dict, rng: np.random.Generator) -> tuple[SceneObject, ...]:
    """A random scene that meets `metadata` (GenEval format); raises if it cannot be met."""
    validate_metadata(metadata)
    counts = {}
    for clause in metadata["include"]:
        counts[clause["class"]] = counts.get(clause["class"], 0) + clause["count"]
    for clause in metadata.get("exclude", []):
        if counts.get(clause["class"], 0) >= clause["count"]:
            raise ValueError(f"metadata {metadata['prompt']!r} includes {counts[clause['class']]}"
                             f" {clause['class']} but excludes {clause['count']} or more")
    for _ in range(_TRIES_PER_SCENE):
        scene = _place(metadata, rng)
        if scene is not None:
            return scene
    raise RuntimeError(f"could not lay out a scene for {metadata['prompt']!r} in"
                       f" {_TRIES_PER_SCENE} tries")


def sample_images(metadata, rng: np.random.Generator, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """uint8 (N, size, size, 3): one freshly sampled scene per metadata entry, rendered."""
    return np.stack([render_scene(sample_scene(m, rng), size) for m in metadata])
