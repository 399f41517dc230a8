"""Sampling scenes that satisfy a prompt's metadata: training images and ground truth.

Objects sit in the cells of a GRID x GRID layout, one object per cell, each centred in its
cell with the same size. At 48 px and the toy model's patch of 16 px a cell is one image token,
the footprint of an SD3 token (8x VAE, patch 2); a free layout made the toy model learn
positions and sizes at the pixel level, which a model this small could not do in minutes on a
CPU (its samples were patch-sized mosaics, docs/demo.md). A scene holds exactly the objects the
include clauses ask for (so counting excludes hold), colours as given or drawn at random, and
every position clause met along one axis only, so that it is the only relation the checker
sees. A position prompt's pair sits at the two ends of the middle row (left/right) or the middle
column (above/below): with any two cells of a line allowed, the toy model never learnt to read
the relation words, in pretraining or in RL (its mean prediction from pure noise was the same
for "left of" and "above", docs/demo.md).
"""
import numpy as np

from flowgrpo_jax.toy.prompts import validate_metadata
from flowgrpo_jax.toy.world import COLORS, DEFAULT_IMAGE_SIZE, SceneObject, relations, render_scene

GRID = 3  # cells per side
OBJECT_SIZE = 0.25  # object side, fraction of the image side (3/4 of a cell)
_TRIES_PER_SCENE = 100


def cell_centre(cell: int) -> tuple[float, float]:
    """(cx, cy) of cell `cell` (row-major), fractions of the image side."""
    row, column = divmod(cell, GRID)
    return (column + 0.5) / GRID, (row + 0.5) / GRID


def _on_middle_line(obj: SceneObject, target: SceneObject, relation: str) -> bool:
    """`relation` holds with the two objects at the ends of the middle row (left/right) or
    the middle column (above/below)."""
    middle = cell_centre(GRID * GRID // 2)[0]
    horizontal = relation in ("left of", "right of")
    along, across = ("cx", "cy") if horizontal else ("cy", "cx")
    return (relations(obj.box(), target.box()) == {relation}
            and getattr(obj, across) == getattr(target, across) == middle
            and round(abs(getattr(obj, along) - getattr(target, along)) * GRID) == GRID - 1)


def _place(metadata: dict, rng: np.random.Generator) -> tuple[SceneObject, ...] | None:
    free = list(rng.permutation(GRID * GRID))
    placed: list[SceneObject] = []
    groups: list[list[SceneObject]] = []
    for clause in metadata["include"]:
        group = []
        for _ in range(clause["count"]):
            color = clause.get("color") or COLORS[rng.integers(len(COLORS))]
            for cell in free:
                obj = SceneObject(clause["class"], color, *cell_centre(cell), OBJECT_SIZE)
                if "position" in clause:
                    relation, target = clause["position"]
                    if not all(_on_middle_line(obj, t, relation) for t in groups[target]):
                        continue
                break
            else:
                return None
            free.remove(cell)
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
