"""Prompt grammar of the toy world, in GenEval's metadata format, and the compositional split.

Every prompt is a dict `{"tag", "include", ["exclude"], "prompt"}` as in GenEval's
`evaluation_metadata.jsonl`: include clauses `{"class", "count", ["color"], ["position"]}`,
`position` = [relation, index of the include clause it refers to]; counting prompts exclude
count + 1. The six templates are GenEval's over the toy shapes and colours, counting with an
optional colour ("a photo of three red rings").

The split (`split`, seeded) holds out compositions, not just prompts: 40 of the 60 (shape,
colour) bindings, 15 of the 30 (count, shape) pairs and 26 of the 45 pairs of shapes (20 for
two objects, 6 for positions) never occur in a training prompt of any category; a test prompt
of a category is built from its held-out compositions (`composition`). Single objects have no
composition to hold out (a shape never trained cannot be drawn), so they are tested on
training prompts only. The shipped files: train.jsonl (TRAIN_LINES_PER_TAG lines per
category), test.jsonl (held out, TEST_LINES_PER_TAG per held-out category) and seen.jsonl
(training prompts, TEST_LINES_PER_TAG per category); a file cycles through a category's
distinct prompts when it has fewer than its lines, and a line is one sample (like GenEval's
several images per prompt), so sample each line with its own seed. Regenerate them with
`python -m flowgrpo_jax.families.toy.prompts`.
"""
import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from flowgrpo_jax.families.toy.world import COLORS, PLURALS, RELATIONS, SHAPES

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_COUNT = 4
COUNTING_RANGE = (2, 3, 4)  # GenEval's counting prompts ask for 2..4 objects
DATA_DIR = Path(__file__).parent / "data"
DEFAULT_SEED = 0
HELD_OUT_TAGS = TAGS[1:]
TRAINED_COLORS_PER_SHAPE = 2  # of 6: 40 of the 60 (shape, colour) bindings are held out
HELD_OUT_COUNT_PAIRS = 15  # of the 30 (count, shape) pairs
HELD_OUT_PAIRS = {"two_object": 20, "position": 6}  # of the 45 unordered pairs of shapes
TEST_LINES_PER_TAG = 50
TRAIN_LINES_PER_TAG = 400


def _single_object(shape):
    return {"tag": "single_object", "include": [{"class": shape, "count": 1}],
            "prompt": f"a photo of a {shape}"}


def _two_object(a, b):
    return {"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of a {a} and a {b}"}


def _counting(shape, n, color=None):
    clause = {"class": shape, "count": n} | ({"color": color} if color else {})
    words = f"{color} {PLURALS[shape]}" if color else PLURALS[shape]
    return {"tag": "counting", "include": [clause], "exclude": [{"class": shape, "count": n + 1}],
            "prompt": f"a photo of {NUMBERS[n]} {words}"}


def _colors(shape, color):
    return {"tag": "colors", "include": [{"class": shape, "count": 1, "color": color}],
            "prompt": f"a photo of a {color} {shape}"}


def _position(a, relation, b):
    """"a photo of a A <relation> a B": clause 0 is B, clause 1 is A placed relative to it."""
    return {"tag": "position",
            "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
            "prompt": f"a photo of a {a} {relation} a {b}"}


def _color_attr(a, color_a, b, color_b):
    return {"tag": "color_attr",
            "include": [{"class": a, "count": 1, "color": color_a},
                        {"class": b, "count": 1, "color": color_b}],
            "prompt": f"a photo of a {color_a} {a} and a {color_b} {b}"}


def all_prompts(tag: str) -> list[dict]:
    """Every distinct prompt of `tag`, in a fixed order."""
    pairs = list(itertools.permutations(SHAPES, 2))
    if tag == "single_object":
        return [_single_object(s) for s in SHAPES]
    if tag == "two_object":
        return [_two_object(a, b) for a, b in pairs]
    if tag == "counting":
        return [_counting(s, n, c) for s in SHAPES for n in COUNTING_RANGE for c in (None,) + COLORS]
    if tag == "colors":
        return [_colors(s, c) for s in SHAPES for c in COLORS]
    if tag == "position":
        return [_position(a, r, b) for a, b in pairs for r in RELATIONS]
    if tag == "color_attr":
        return [_color_attr(a, ca, b, cb) for a, b in pairs for ca, cb in itertools.permutations(COLORS, 2)]
    raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")


def vocabulary() -> list[str]:
    """Every word any prompt of the grammar uses, sorted."""
    words = {w for tag in TAGS for p in all_prompts(tag) for w in p["prompt"].split()}
    return sorted(words)


def _check_clause(clause, where: str, max_count: int) -> None:
    if not isinstance(clause, dict):
        raise ValueError(f"{where} must be a dict, got {type(clause).__name__}")
    unknown = sorted(set(clause) - {"class", "count", "color", "position"})
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}")
    if clause.get("class") not in SHAPES:
        raise ValueError(f"{where} class {clause.get('class')!r} is not a toy shape {SHAPES}")
    count = clause.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= max_count:
        raise ValueError(f"{where} count {count!r} must be an integer in 1..{max_count}")
    if "color" in clause and clause["color"] not in COLORS:
        raise ValueError(f"{where} color {clause['color']!r} is not a toy colour {COLORS}")


def validate_metadata(metadata: dict) -> None:
    """Raises ValueError naming the first problem of a GenEval-style metadata dict."""
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    if metadata.get("tag") not in TAGS:
        raise ValueError(f"metadata tag {metadata.get('tag')!r} is not one of {TAGS}")
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"metadata 'include' must be a non-empty list, got {include!r}")
    for i, clause in enumerate(include):
        where = f"include[{i}]"
        _check_clause(clause, where, MAX_COUNT)
        if "position" in clause:
            position = clause["position"]
            if (not isinstance(position, (list, tuple)) or len(position) != 2
                    or position[0] not in RELATIONS or not isinstance(position[1], int)
                    or not 0 <= position[1] < i):
                raise ValueError(f"{where} position {position!r} must be [relation in {RELATIONS},"
                                 f" index of an earlier include clause]")
    exclude = metadata.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError(f"metadata 'exclude' must be a list, got {exclude!r}")
    for i, clause in enumerate(exclude):
        _check_clause(clause, f"exclude[{i}]", MAX_COUNT + 1)
        if "color" in clause or "position" in clause:
            raise ValueError(f"exclude[{i}] may only give class and count, got {sorted(clause)}")
    if not isinstance(metadata.get("prompt"), str):
        raise ValueError(f"metadata 'prompt' must be a string, got {metadata.get('prompt')!r}")


def composition(metadata: dict) -> dict:
    """What a prompt composes: {"bindings": (shape, colour) pairs, "counts": (count, shape)
    pairs, "pairs": unordered pairs of shapes drawn together}, each a frozenset."""
    include = metadata["include"]
    shapes = sorted({c["class"] for c in include}, key=SHAPES.index)
    return {"bindings": frozenset((c["class"], c["color"]) for c in include if "color" in c),
            "counts": frozenset((c["count"], c["class"]) for c in include if c["count"] > 1),
            "pairs": frozenset({tuple(shapes)} if len(shapes) == 2 else ())}


def _held_out(rng: np.random.Generator) -> dict:
    """The seeded held-out compositions: every shape keeps TRAINED_COLORS_PER_SHAPE colours
    (each colour trained on 3 or 4 shapes), one or two of its counts and two or more pairs."""
    shapes, counts = len(SHAPES), len(COUNTING_RANGE)
    while True:
        order = np.concatenate([rng.permutation(len(COLORS)) for _ in range(shapes)])
        trained = order[:TRAINED_COLORS_PER_SHAPE * shapes].reshape(shapes, -1)
        if all(len(set(row)) == len(row) for row in trained):
            break
    bindings = {(s, c) for i, s in enumerate(SHAPES) for j, c in enumerate(COLORS) if j not in trained[i]}
    while True:
        held = rng.permutation(shapes * counts)[:HELD_OUT_COUNT_PAIRS]
        per_shape = np.bincount(held % shapes, minlength=shapes)
        if per_shape.min() >= 1 and per_shape.max() < counts:
            break
    count_pairs = {(COUNTING_RANGE[i // shapes], SHAPES[i % shapes]) for i in held}
    pairs = list(itertools.combinations(SHAPES, 2))
    two, held = HELD_OUT_PAIRS["two_object"], sum(HELD_OUT_PAIRS.values())
    while True:
        order = [pairs[i] for i in rng.permutation(len(pairs))]
        if min(sum(s in p for p in order[held:]) for s in SHAPES) >= 2:
            break
    return {"bindings": bindings, "counts": count_pairs,
            "pairs": {"two_object": set(order[:two]), "position": set(order[two:held])}}


def split(seed: int = DEFAULT_SEED) -> tuple[dict, dict]:
    """(train, test): per tag, distinct prompts. A prompt trains when none of its compositions
    is held out; it tests its tag when its tag's composition is held out and nothing else is
    (bindings for colours and colour attribution, (count, shape) for counting, the pair of
    shapes for two objects and positions)."""
    held = _held_out(np.random.default_rng(seed))
    all_pairs = held["pairs"]["two_object"] | held["pairs"]["position"]
    tested = {"two_object": ("pairs", held["pairs"]["two_object"]), "counting": ("counts", held["counts"]),
              "colors": ("bindings", held["bindings"]), "position": ("pairs", held["pairs"]["position"]),
              "color_attr": ("bindings", held["bindings"])}
    train, test = {}, {}
    for tag in TAGS:
        train[tag], test[tag] = [], []
        for p in all_prompts(tag):
            parts = composition(p)
            leaks = {"bindings": parts["bindings"] & held["bindings"],
                     "counts": parts["counts"] & held["counts"], "pairs": parts["pairs"] & all_pairs}
            if not any(leaks.values()):
                train[tag].append(p)
            elif tag in tested:
                kind, wanted = tested[tag]
                if parts[kind] and parts[kind] <= wanted and all(not v for k, v in leaks.items() if k != kind):
                    test[tag].append(p)
    return train, test


def balanced_lines(by_tag: dict, lines_per_tag: int, seed: int) -> list[dict]:
    """`lines_per_tag` lines of every tag, cycling through its prompts in a seeded order (so a
    cap below a tag's size still samples it evenly), then all lines shuffled."""
    rng = np.random.default_rng(seed)
    lines = []
    for tag in by_tag:
        shuffled = [by_tag[tag][i] for i in rng.permutation(len(by_tag[tag]))]
        lines += itertools.islice(itertools.cycle(shuffled), lines_per_tag)
    return [lines[i] for i in rng.permutation(len(lines))]


def write_jsonl(path, prompts) -> None:
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")


def load_metadata(path) -> list[dict]:
    """Reads a GenEval-style metadata JSON-lines file, validating every line."""
    prompts = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                metadata = json.loads(line)
                validate_metadata(metadata)
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
            prompts.append(metadata)
    return prompts


def write_prompt_files(out_dir=DATA_DIR, seed: int = DEFAULT_SEED) -> None:
    """Writes train.jsonl, test.jsonl and seen.jsonl; the same seed gives byte-identical files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = split(seed)
    write_jsonl(out_dir / "train.jsonl", balanced_lines(train, TRAIN_LINES_PER_TAG, seed + 1))
    write_jsonl(out_dir / "test.jsonl",
                balanced_lines({t: test[t] for t in HELD_OUT_TAGS}, TEST_LINES_PER_TAG, seed + 2))
    write_jsonl(out_dir / "seen.jsonl", balanced_lines(train, TEST_LINES_PER_TAG, seed + 3))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the toy world's train/test prompt files.")
    parser.add_argument("--out", default=str(DATA_DIR), help="output folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    write_prompt_files(args.out, args.seed)


if __name__ == "__main__":
    main()
