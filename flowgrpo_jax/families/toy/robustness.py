"""Robustness set of the toy checker: right and wrong images under image corruptions.

Cases (prompts over every shape and colour, scenes from `scenes.sample_scene`):
  correct            a scene of the prompt itself, any tag: should be accepted;
  wrong_count        counting with one object more or fewer, or a two-object scene missing one;
  wrong_colour       a colors prompt drawn in another palette colour, or a color_attr prompt
                     with its colours swapped;
  swapped_position   a position prompt drawn with the opposite relation;
  stray              a counting scene plus one more object of the class in a palette colour;
  stray_off_palette  the same with the extra object in a hue halfway between two palette hues
                     (orange, lime, mint, violet, pink), which still reads as the shape.
Every wrong case should be rejected (strict score 0). Corruptions: clean, hue_shift (15 to 30
degrees, random sign), pastel (blend 0.25 to 0.5 toward the grey of the pixel's brightness:
toward white on the object, black stays black), noise (std 10 to 16), blur (sigma 0.5 to 1.2
px), dim (x 0.5 to 0.8, then noise std 8).

    python -m flowgrpo_jax.families.toy.robustness --per_case 1000 [--json out.json]
"""
import argparse
import colorsys
import json

import numpy as np
from scipy import ndimage

from flowgrpo_jax.families.toy import checker, prompts, scenes, world

CASES = ("correct", "wrong_count", "wrong_colour", "swapped_position", "stray", "stray_off_palette")
CORRUPTIONS = ("clean", "hue_shift", "pastel", "noise", "blur", "dim")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_PALETTE_HUES = sorted(colorsys.rgb_to_hsv(*(np.array(world.PALETTE[c]) / 255))[0] * 360
                       for c in world.COLORS if c != "white")
# Halfway between neighbouring palette hues (circularly).
OFF_PALETTE_HUES = tuple(((a + (b - a) % 360 / 2) % 360)
                         for a, b in zip(_PALETTE_HUES, _PALETTE_HUES[1:] + _PALETTE_HUES[:1]))
OFF_PALETTE_SPREAD = 3.0  # degrees either side of halfway


def _pick(items, rng):
    return items[rng.integers(len(items))]


def _free_cell(scene, rng) -> tuple[float, float]:
    taken = {(o.cx, o.cy) for o in scene}
    free = [c for c in map(scenes.cell_centre, range(scenes.CELLS_PER_SIDE ** 2)) if c not in taken]
    return _pick(free, rng)


def _stray_image(metadata, rng, off_palette: bool) -> np.ndarray:
    """A scene of counting `metadata` plus one more object of its class."""
    scene = scenes.sample_scene(metadata, rng)
    shape = metadata["include"][0]["class"]
    cx, cy = _free_cell(scene, rng)
    if not off_palette:
        extra = world.SceneObject(shape, _pick(world.COLORS, rng), cx, cy, scenes.OBJECT_SIZE)
        return world.render_scene(scene + (extra,))
    hue = _pick(OFF_PALETTE_HUES, rng) + rng.uniform(-OFF_PALETTE_SPREAD, OFF_PALETTE_SPREAD)
    rgb = np.array(colorsys.hsv_to_rgb(hue % 360 / 360, 0.83, 235 / 255)) * 255
    coverage = world.render_scene([world.SceneObject(shape, "white", cx, cy, scenes.OBJECT_SIZE)])
    image = world.render_scene(scene).astype(np.float64) + coverage[..., :1] / 235 * rgb
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def make_case(case: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """(uint8 image, metadata) of one random example of `case`."""
    if case == "correct":
        m = _pick(prompts.all_prompts(_pick(prompts.TAGS, rng)), rng)
        return world.render_scene(scenes.sample_scene(m, rng)), m
    if case == "wrong_count":
        if rng.random() < 0.5:
            m = _pick(prompts.all_prompts("two_object"), rng)
            drawn = dict(m, include=[m["include"][rng.integers(2)]])
        else:
            m = _pick(prompts.all_prompts("counting"), rng)
            clause = m["include"][0]
            # One more than MAX_COUNT is no valid clause; `stray` covers n + 1 for every n.
            delta = -1 if clause["count"] == prompts.MAX_COUNT else _pick((-1, 1), rng)
            drawn = dict(m, include=[dict(clause, count=clause["count"] + delta)], exclude=[])
        return world.render_scene(scenes.sample_scene(drawn, rng)), m
    if case == "wrong_colour":
        if rng.random() < 0.5:
            m = _pick(prompts.all_prompts("colors"), rng)
            clause = m["include"][0]
            other = _pick([c for c in world.COLORS if c != clause["color"]], rng)
            drawn = dict(m, include=[dict(clause, color=other)])
        else:
            m = _pick([p for p in prompts.all_prompts("color_attr")
                       if p["include"][0]["color"] != p["include"][1]["color"]], rng)
            a, b = m["include"]
            drawn = dict(m, include=[dict(a, color=b["color"]), dict(b, color=a["color"])])
        return world.render_scene(scenes.sample_scene(drawn, rng)), m
    if case == "swapped_position":
        m = _pick(prompts.all_prompts("position"), rng)
        target, subject = m["include"]
        relation = subject["position"][0]
        drawn = dict(m, include=[target, dict(subject, position=[_OPPOSITE[relation], 0])])
        return world.render_scene(scenes.sample_scene(drawn, rng)), m
    if case in ("stray", "stray_off_palette"):
        m = _pick(prompts.all_prompts("counting"), rng)
        return _stray_image(m, rng, off_palette=case == "stray_off_palette"), m
    raise ValueError(f"unknown case {case!r}; expected one of {CASES}")


def _hue_shift(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotates every pixel's HSV hue by `degrees`, keeping saturation and value."""
    x = image.astype(np.float64)
    high, low = x.max(-1, keepdims=True), x.min(-1, keepdims=True)
    hue, _ = checker._hue_saturation(x.reshape(-1, 3))
    hue = ((hue + degrees) % 360).reshape(x.shape[:-1] + (1,)) / 60
    # HSV to RGB: channel k's position on the hue circle gives its share of high - low.
    k = (np.array([5.0, 3.0, 1.0]) + hue) % 6
    return np.clip(np.rint(high - (high - low) * np.clip(np.minimum(k, 4 - k), 0, 1)), 0, 255).astype(np.uint8)


def corrupt(image: np.ndarray, corruption: str, rng: np.random.Generator) -> np.ndarray:
    """`image` (uint8 HxWx3) under one random draw of `corruption`."""
    x = image.astype(np.float64)
    if corruption == "clean":
        return image
    if corruption == "hue_shift":
        return _hue_shift(image, rng.uniform(15, 30) * _pick((-1, 1), rng))
    if corruption == "pastel":
        t = rng.uniform(0.25, 0.5)
        x = (1 - t) * x + t * x.max(-1, keepdims=True)
    elif corruption == "noise":
        x = x + rng.normal(0, rng.uniform(10, 16), x.shape)
    elif corruption == "blur":
        sigma = rng.uniform(0.5, 1.2)
        x = ndimage.gaussian_filter(x, (sigma, sigma, 0))
    elif corruption == "dim":
        x = x * rng.uniform(0.5, 0.8) + rng.normal(0, 8, x.shape)
    else:
        raise ValueError(f"unknown corruption {corruption!r}; expected one of {CORRUPTIONS}")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def evaluate(per_case: int, seed: int = 0, cases=CASES, corruptions=CORRUPTIONS) -> dict:
    """{case: {corruption: rate}}: accept rate for "correct", reject rate for the others."""
    rng = np.random.default_rng(seed)
    table = {}
    for case in cases:
        drawn = [make_case(case, rng) for _ in range(per_case)]
        metadata = [m for _, m in drawn]
        table[case] = {}
        for corruption in corruptions:
            images = np.stack([corrupt(im, corruption, rng) for im, _ in drawn])
            strict = checker.score_batch(images, metadata)["strict"]
            table[case][corruption] = float(strict.mean() if case == "correct" else 1 - strict.mean())
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per_case", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the table here as JSON")
    args = parser.parse_args(argv)
    table = evaluate(args.per_case, args.seed)
    print(f"{'case':<18}" + "".join(f"{c:>10}" for c in CORRUPTIONS))
    for case, row in table.items():
        print(f"{case:<18}" + "".join(f"{row[c]:>10.4f}" for c in CORRUPTIONS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"per_case": args.per_case, "seed": args.seed, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
