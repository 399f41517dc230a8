import collections
import json

import pytest

from flowgrpo_jax.families.toy import prompts, world

TRAIN = prompts.load_metadata(prompts.DATA_DIR / "train.jsonl")
TEST = prompts.load_metadata(prompts.DATA_DIR / "test.jsonl")
SEEN = prompts.load_metadata(prompts.DATA_DIR / "seen.jsonl")
# The composition each held-out category is tested on (prompts.composition's keys).
HELD_OUT_KIND = {"two_object": "pairs", "counting": "counts", "colors": "bindings",
                 "position": "pairs", "color_attr": "bindings"}


def test_shipped_files_are_what_the_seeded_generator_writes(tmp_path):
    prompts.main(["--out", str(tmp_path), "--seed", str(prompts.DEFAULT_SEED)])
    for name in ("train.jsonl", "test.jsonl", "seen.jsonl"):
        assert (tmp_path / name).read_bytes() == (prompts.DATA_DIR / name).read_bytes(), name


def test_lines_are_geneval_metadata():
    for m in TRAIN + TEST + SEEN:
        assert list(m)[:2] == ["tag", "include"] and list(m)[-1] == "prompt"
        assert m["prompt"].startswith("a photo of ")
    counting = [m for m in TEST + TRAIN if m["tag"] == "counting"]
    assert any("color" in m["include"][0] for m in counting) and any("color" not in m["include"][0] for m in counting)
    for m in counting:
        (clause,) = m["include"]
        assert m["exclude"] == [{"class": clause["class"], "count": clause["count"] + 1}]
        color = f"{clause['color']} " if "color" in clause else ""
        assert m["prompt"] == (f"a photo of {prompts.NUMBERS[clause['count']]} {color}"
                               f"{world.PLURALS[clause['class']]}")
    for m in (m for m in TEST if m["tag"] == "position"):
        target, subject = m["include"]
        relation, index = subject["position"]
        assert index == 0
        assert m["prompt"] == f"a photo of a {subject['class']} {relation} a {target['class']}"


def test_files_are_balanced_and_seen_is_trained():
    assert collections.Counter(m["tag"] for m in TEST) == {t: prompts.TEST_LINES_PER_TAG for t in prompts.HELD_OUT_TAGS}
    assert collections.Counter(m["tag"] for m in TRAIN) == {t: prompts.TRAIN_LINES_PER_TAG for t in prompts.TAGS}
    assert collections.Counter(m["tag"] for m in SEEN) == {t: prompts.TEST_LINES_PER_TAG for t in prompts.TAGS}
    assert {m["prompt"] for m in SEEN} <= {m["prompt"] for m in TRAIN}
    assert not {m["prompt"] for m in TEST} & {m["prompt"] for m in TRAIN}


def test_every_held_out_category_has_40_prompts_whose_composition_was_never_trained():
    trained = collections.defaultdict(set)
    for m in TRAIN:
        for kind, parts in prompts.composition(m).items():
            trained[kind] |= parts
    distinct = collections.defaultdict(set)
    for m in TEST:
        tested = prompts.composition(m)[HELD_OUT_KIND[m["tag"]]]
        assert tested and not tested & trained[HELD_OUT_KIND[m["tag"]]], m["prompt"]
        distinct[m["tag"]].add(m["prompt"])
    _, test = prompts.split()
    for tag in prompts.HELD_OUT_TAGS:
        assert len(test[tag]) >= 40, tag
        assert len(distinct[tag]) == min(len(test[tag]), prompts.TEST_LINES_PER_TAG), tag


def test_held_out_bindings_and_counts_leave_every_shape_trainable():
    trained = collections.defaultdict(set)
    for m in TRAIN:
        for kind, parts in prompts.composition(m).items():
            trained[kind] |= parts
    colours_per_shape = collections.Counter(s for s, _ in trained["bindings"])
    shapes_per_colour = collections.Counter(c for _, c in trained["bindings"])
    assert set(colours_per_shape.values()) == {prompts.TRAINED_COLORS_PER_SHAPE}
    assert set(shapes_per_colour) == set(world.COLORS) and set(shapes_per_colour.values()) <= {3, 4}
    counts_per_shape = collections.Counter(s for _, s in trained["counts"])
    assert set(counts_per_shape) == set(world.SHAPES) and set(counts_per_shape.values()) <= {1, 2}
    assert {s for pair in trained["pairs"] for s in pair} == set(world.SHAPES)


def test_train_covers_the_whole_vocabulary():
    train_words = {w for m in TRAIN for w in m["prompt"].split()}
    assert train_words == set(prompts.vocabulary())


def test_grammar_has_every_combination_once():
    sizes = {tag: len({m["prompt"] for m in prompts.all_prompts(tag)}) for tag in prompts.TAGS}
    s, c = len(world.SHAPES), len(world.COLORS)
    assert sizes == {"single_object": s, "two_object": s * (s - 1), "counting": 3 * s * (c + 1),
                     "colors": s * c, "position": 4 * s * (s - 1),
                     "color_attr": s * (s - 1) * c * (c - 1)}


@pytest.mark.parametrize("change, message", [
    ({"tag": "vibes"}, "tag 'vibes'"),
    ({"include": []}, "non-empty list"),
    ({"include": [{"class": "dog", "count": 1}]}, "class 'dog'"),
    ({"include": [{"class": "circle", "count": 0}]}, "count 0"),
    ({"include": [{"class": "circle", "count": 1, "color": "pink"}]}, "color 'pink'"),
    ({"include": [{"class": "circle", "count": 1, "size": 3}]}, "unknown keys"),
    ({"include": [{"class": "circle", "count": 1, "position": ["left of", 0]}]}, "earlier include"),
    ({"exclude": [{"class": "circle", "count": 2, "color": "red"}]}, "only give class and count"),
    ({"exclude": 5}, "'exclude' must be a list, got 5"),
    ({"prompt": None}, "'prompt' must be a string"),
])
def test_bad_metadata_is_named(change, message):
    good = prompts.all_prompts("single_object")[0]
    with pytest.raises(ValueError, match=message):
        prompts.validate_metadata({**good, **change})


def test_load_metadata_names_the_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    good = prompts.all_prompts("colors")[0]
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "tag": "nope"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: metadata tag 'nope'"):
        prompts.load_metadata(path)


def test_test_asks_for_every_count_colour_relation_and_shape():
    def values(tag, key):
        return {c[key] if key != "position" else c[key][0]
                for m in TEST if m["tag"] == tag for c in m["include"] if key in c}
    assert values("counting", "count") == set(prompts.COUNTING_RANGE)
    assert values("colors", "color") == set(world.COLORS)
    assert values("color_attr", "color") == set(world.COLORS)
    assert values("position", "position") == set(world.RELATIONS)
    assert values("two_object", "class") == set(world.SHAPES)
    assert values("colors", "class") == set(world.SHAPES)
