"""Prompt grammar of the toy world, in GenEval's metadata format, and the shipped prompt files.

Every prompt is a dict `{"tag", "include", ["exclude"], "prompt"}` as in GenEval's
`evaluation_metadata.jsonl`: include clauses `{"class", "count", ["color"], ["position"]}`,
`position` = [relation, index of the include clause it refers to]; counting prompts exclude
count + 1. The six templates are GenEval's, over the toy shapes and colours.

The world is small (5 single-object prompts, 15 counting prompts, ...), so the split holds out
a seeded share of every tag's distinct prompts for test, and each file then lists the same
number of lines per tag, cycling through a tag's distinct prompts where it has fewer: a line
is one sample (like GenEval's several images per prompt), so sample each line with its own
seed. Regenerate the shipped files with `python -m flowgrpo_jax.families.toy.prompts`.
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
TEST_FRACTION = 0.3
TEST_LINES_PER_TAG = 50
TRAIN_LINES_PER_TAG = 400


def _single_object(shape):
    return {"tag": "single_object", "include": [{"class": shape, "count": 1}],
            "prompt": f"a photo of a {shape}"}


def _two_object(a, b):
    return {"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of a {a} and a {b}"}


def _counting(shape, n):
    return {"tag": "counting", "include": [{"class": shape, "count": n}],
            "exclude": [{"class": shape, "count": n + 1}],
            "prompt": f"a photo of {NUMBERS[n]} {PLURALS[shape]}"}


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
        return [_counting(s, n) for s in SHAPES for n in COUNTING_RANGE]
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


def _spread(prompts: list[dict], order, n: int) -> list[int]:
    """`n` indices: each time the first one in `order` whose prompt brings the most words not
    yet taken, so a small test share still asks for every count, colour and relation it can."""
    words = [set(p["prompt"].split()) for p in prompts]
    remaining, taken, seen = list(order), [], set()
    while len(taken) < n:
        best = max(remaining, key=lambda i: len(words[i] - seen))
        remaining.remove(best)
        taken.append(best)
        seen |= words[best]
    return taken


def split(seed: int = DEFAULT_SEED, test_fraction: float = TEST_FRACTION) -> tuple[dict, dict]:
    """(train, test): per tag, distinct prompts; a seeded `test_fraction` (at least 2) is test."""
    rng = np.random.default_rng(seed)
    train, test = {}, {}
    for tag in TAGS:
        prompts = all_prompts(tag)
        n_test = min(TEST_LINES_PER_TAG, max(2, round(test_fraction * len(prompts))))
        held_out = _spread(prompts, rng.permutation(len(prompts)), n_test)
        test[tag] = [prompts[i] for i in held_out]
        train[tag] = [p for i, p in enumerate(prompts) if i not in set(held_out)]
    return train, test


def balanced_lines(by_tag: dict, lines_per_tag: int, seed: int) -> list[dict]:
    """`lines_per_tag` lines of every tag, cycling through its prompts in a seeded order (so a
    cap below a tag's size still samples it evenly), then all lines shuffled."""
    rng = np.random.default_rng(seed)
    lines = []
    for tag in TAGS:
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
    """Writes train.jsonl and test.jsonl; the same seed gives byte-identical files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = split(seed)
    write_jsonl(out_dir / "train.jsonl", balanced_lines(train, TRAIN_LINES_PER_TAG, seed + 1))
    write_jsonl(out_dir / "test.jsonl", balanced_lines(test, TEST_LINES_PER_TAG, seed + 2))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the toy world's train/test prompt files.")
    parser.add_argument("--out", default=str(DATA_DIR), help="output folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    write_prompt_files(args.out, args.seed)


if __name__ == "__main__":
    main()
