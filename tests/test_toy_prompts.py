import collections
import json

import pytest

from flowgrpo_jax.families.toy import prompts, world

TRAIN = prompts.load_metadata(prompts.DATA_DIR / "train.jsonl")
TEST = prompts.load_metadata(prompts.DATA_DIR / "test.jsonl")


def test_shipped_files_are_what_the_seeded_generator_writes(tmp_path):
    prompts.main(["--out", str(tmp_path), "--seed", str(prompts.DEFAULT_SEED)])
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (prompts.DATA_DIR / name).read_bytes(), name


def test_lines_are_geneval_metadata():
    for m in TRAIN + TEST:
        assert list(m)[:2] == ["tag", "include"] and list(m)[-1] == "prompt"
        assert m["prompt"].startswith("a photo of ")
    counting = [m for m in TEST if m["tag"] == "counting"]
    for m in counting:
        (clause,) = m["include"]
        assert m["exclude"] == [{"class": clause["class"], "count": clause["count"] + 1}]
        assert m["prompt"] == f"a photo of {prompts.NUMBERS[clause['count']]} {world.PLURALS[clause['class']]}"
    for m in (m for m in TEST if m["tag"] == "position"):
        target, subject = m["include"]
        relation, index = subject["position"]
        assert index == 0
        assert m["prompt"] == f"a photo of a {subject['class']} {relation} a {target['class']}"


def test_test_is_balanced_and_disjoint_from_train():
    assert collections.Counter(m["tag"] for m in TEST) == {t: prompts.TEST_LINES_PER_TAG for t in prompts.TAGS}
    assert collections.Counter(m["tag"] for m in TRAIN) == {t: prompts.TRAIN_LINES_PER_TAG for t in prompts.TAGS}
    assert not {m["prompt"] for m in TEST} & {m["prompt"] for m in TRAIN}
    distinct_test = {m["prompt"] for m in TEST}
    assert len(distinct_test) >= 90


def test_train_covers_the_whole_vocabulary_and_most_combinations():
    train_words = {w for m in TRAIN for w in m["prompt"].split()}
    assert train_words == set(prompts.vocabulary())
    for tag in prompts.TAGS:
        distinct = {m["prompt"] for m in TRAIN if m["tag"] == tag}
        assert len(distinct) >= min(prompts.TRAIN_LINES_PER_TAG, 0.6 * len(prompts.all_prompts(tag)))


def test_grammar_has_every_combination_once():
    sizes = {tag: len({m["prompt"] for m in prompts.all_prompts(tag)}) for tag in prompts.TAGS}
    s, c = len(world.SHAPES), len(world.COLORS)
    assert sizes == {"single_object": s, "two_object": s * (s - 1), "counting": 3 * s,
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


def test_test_asks_for_every_count_colour_and_relation():
    def values(tag, key):
        return {c[key] if key != "position" else c[key][0]
                for m in TEST if m["tag"] == tag for c in m["include"] if key in c}
    assert values("counting", "count") == set(prompts.COUNTING_RANGE)
    assert values("colors", "color") == set(world.COLORS)
    assert values("color_attr", "color") == set(world.COLORS)
    assert values("position", "position") == set(world.RELATIONS)
    assert values("two_object", "class") == set(world.SHAPES)
