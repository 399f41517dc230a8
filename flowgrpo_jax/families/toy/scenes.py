"""Random scenes that satisfy a prompt's metadata: pretraining images and ground truth.

Objects sit in the cells of a 3x3 layout, one object per cell, each centred in its cell with
the same size. At 48 px and the toy model's patch of 16 px a cell is one image token, the
footprint of an SD3 token (8x VAE, patch 2), so a small model learns the layout per token
rather than at the pixel level. A scene holds exactly the objects the include clauses ask for
(so counting excludes hold), colours as given or drawn at random, and every position clause
met along one axis only, so that it is the only relation the checker sees. A position
prompt's pair sits at the two ends of the middle row (left/right) or the middle column
(above/below): one layout per relation, which the model can tell apart from the text alone at
the noise levels where the layout is decided (docs/demo.md).
"""
import numpy as np

from flowgrpo_jax.families.toy.prompts import validate_metadata
from flowgrpo_jax.families.toy.world import (COLORS, DEFAULT_IMAGE_SIZE, SceneObject, relations,
                                             render_scene)

CELLS_PER_SIDE = 3
OBJECT_SIZE = 0.25  # object side, fraction of the image side (3/4 of a cell)
_TRIES_PER_SCENE = 100


def cell_centre(cell: int) -> tuple[float, float]:
    """(cx, cy) of cell `cell` (row-major), fractions of the image side."""
    row, column = divmod(cell, CELLS_PER_SIDE)
    return (column + 0.5) / CELLS_PER_SIDE, (row + 0.5) / CELLS_PER_SIDE


def _on_middle_line(obj: SceneObject, target: SceneObject, relation: str) -> bool:
    """`relation` holds with the two objects at the ends of the middle row (left/right) or
    the middle column (above/below)."""
    cells = CELLS_PER_SIDE
    middle = cell_centre(cells * cells // 2)[0]
    horizontal = relation in ("left of", "right of")
    along, across = ("cx", "cy") if horizontal else ("cy", "cx")
    return (relations(obj.box(), target.box()) == {relation}
            and getattr(obj, across) == getattr(target, across) == middle
            and round(abs(getattr(obj, along) - getattr(target, along)) * cells) == cells - 1)


def _place(metadata: dict, rng: np.random.Generator) -> tuple[SceneObject, ...] | None:
    free = list(rng.permutation(CELLS_PER_SIDE * CELLS_PER_SIDE))
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


def ground_truth_images(metadata, rng: np.random.Generator, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """uint8 (N, size, size, 3): one freshly sampled scene per metadata entry, rendered."""
    return np.stack([render_scene(sample_scene(m, rng), size) for m in metadata])
