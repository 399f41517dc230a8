import numpy as np
import pytest

from flowgrpo_jax.families.toy import prompts, scenes, world


def test_render_draws_palette_colours_on_black():
    scene = [world.SceneObject("square", "red", 0.25, 0.25, 0.3),
             world.SceneObject("circle", "blue", 0.75, 0.7, 0.3)]
    image = world.render_scene(scene, 48)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert tuple(image[12, 12]) == world.PALETTE["red"]
    assert tuple(image[34, 36]) == world.PALETTE["blue"]
    assert tuple(image[2, 46]) == world.BACKGROUND
    assert world.render_scene(scene, 32).shape == (32, 32, 3)


def test_render_rejects_unknown_shape_and_colour():
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        world.render_scene([world.SceneObject("star", "red", 0.5, 0.5, 0.3)])
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        world.render_scene([world.SceneObject("circle", "pink", 0.5, 0.5, 0.3)])


def test_relations_follow_geneval():
    left, right = (0, 10, 10, 20), (30, 12, 40, 22)
    assert world.relations(left, right) == {"left of"}
    assert world.relations(right, left) == {"right of"}
    top, bottom = (10, 0, 20, 10), (12, 30, 22, 40)
    assert world.relations(top, bottom) == {"above"}
    assert world.relations(bottom, top) == {"below"}
    assert world.relations((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}
    # Offsets smaller than 0.1 * (summed sizes) count as no relation.
    assert world.relations((0, 0, 10, 10), (3, 0, 13, 10)) == set()


@pytest.mark.parametrize("tag", prompts.TAGS)
def test_sampled_scenes_meet_their_metadata(tag):
    rng = np.random.default_rng(0)
    for metadata in prompts.all_prompts(tag)[:40]:
        scene = scenes.sample_scene(metadata, rng)
        groups, start = [], 0
        for clause in metadata["include"]:
            group = scene[start:start + clause["count"]]
            start += clause["count"]
            assert [o.shape for o in group] == [clause["class"]] * clause["count"]
            if "color" in clause:
                assert all(o.color == clause["color"] for o in group)
            if "position" in clause:
                relation, target = clause["position"]
                for o in group:
                    for t in groups[target]:
                        assert world.relations(o.box(), t.box()) == {relation}
                        # at the ends of the middle row (left/right) or column (above/below)
                        grid, middle, last = scenes.CELLS_PER_SIDE, scenes.CELLS_PER_SIDE // 2, scenes.CELLS_PER_SIDE - 1
                        cells = sorted((round(v.cy * grid - 0.5), round(v.cx * grid - 0.5)) for v in (o, t))
                        horizontal = relation in ("left of", "right of")
                        assert cells == ([(middle, 0), (middle, last)] if horizontal
                                         else [(0, middle), (last, middle)])
            groups.append(group)
        assert start == len(scene)
        centres = [(o.cx, o.cy) for o in scene]
        assert len(set(centres)) == len(scene)  # one object per cell
        assert set(centres) <= {scenes.cell_centre(c) for c in range(scenes.CELLS_PER_SIDE ** 2)}
        assert all(o.size == scenes.OBJECT_SIZE for o in scene)


def test_sampler_rejects_contradictory_metadata():
    metadata = {"tag": "counting", "include": [{"class": "circle", "count": 3}],
                "exclude": [{"class": "circle", "count": 3}], "prompt": "p"}
    with pytest.raises(ValueError, match="excludes 3 or more"):
        scenes.sample_scene(metadata, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not a toy shape"):
        scenes.sample_scene({"tag": "single_object", "include": [{"class": "dog", "count": 1}],
                             "prompt": "a photo of a dog"}, np.random.default_rng(0))


def test_ground_truth_images_are_seeded():
    metadata = prompts.all_prompts("color_attr")[:4]
    a = scenes.ground_truth_images(metadata, np.random.default_rng(3), size=32)
    b = scenes.ground_truth_images(metadata, np.random.default_rng(3), size=32)
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, scenes.ground_truth_images(metadata, np.random.default_rng(4), size=32))
