"""The trainer's host-side pieces: prompt files and per-epoch prompt choice, image grids."""
import json

import numpy as np
import pytest

from flowgrpo_jax.logging_utils import MetricWriter, image_grid
from flowgrpo_jax.prompts import PromptFileError, epoch_prompt_indices, load_prompts
from flowgrpo_jax.train import update_order


def test_geneval_and_text_prompt_files(tmp_path):
    geneval = tmp_path / "p.jsonl"
    rows = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}],
             "prompt": "a photo of a circle"}, {"tag": "colors", "prompt": "a red square"}]
    geneval.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = load_prompts(str(geneval), "geneval")
    assert prompts.prompts == ("a photo of a circle", "a red square")
    assert prompts.take([1, 0]) == (["a red square", "a photo of a circle"], [rows[1], rows[0]])

    text = tmp_path / "p.txt"
    text.write_text('a sign that says "hello"\n\n  a cat  \n')
    prompts = load_prompts(str(text), "text")
    assert prompts.prompts == ('a sign that says "hello"', "a cat") and prompts.metadata == ({}, {})


def test_bad_prompt_files_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"tag": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no string 'prompt'"):
        load_prompts(str(bad), "geneval")
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not JSON"):
        load_prompts(str(bad), "geneval")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        load_prompts(str(tmp_path / "empty.txt"), "text")
    with pytest.raises(PromptFileError, match=r"prompt file .*missing.jsonl cannot be read"):
        load_prompts(str(tmp_path / "missing.jsonl"), "geneval")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe prompt\n")
    with pytest.raises(PromptFileError, match=r"binary.txt cannot be read"):
        load_prompts(str(tmp_path / "binary.txt"), "text")
    for field, value in (("exclude", 5), ("include", {"class": "circle"}), ("exclude", [3])):
        bad.write_text(json.dumps({"prompt": "ok"}) + "\n" +
                       json.dumps({"prompt": "two circles", field: value}) + "\n")
        with pytest.raises(PromptFileError, match=rf"bad.jsonl:2: '{field}' must be a list of "
                                                  rf"objects, got "):
            load_prompts(str(bad), "geneval")


def test_epoch_prompts_depend_on_seed_and_epoch_only():
    a = epoch_prompt_indices(100, 48, seed=0, epoch=3)
    assert np.array_equal(a, epoch_prompt_indices(100, 48, seed=0, epoch=3))
    assert len(set(a.tolist())) == 48  # distinct while the set is large enough
    assert not np.array_equal(a, epoch_prompt_indices(100, 48, seed=0, epoch=4))
    assert not np.array_equal(a, epoch_prompt_indices(100, 48, seed=1, epoch=3))
    assert epoch_prompt_indices(5, 8, seed=0, epoch=0).max() < 5  # repeats when it must


def test_image_grid_places_images_row_major():
    images = np.stack([np.full((2, 3, 3), i, np.uint8) for i in range(1, 6)])
    grid = image_grid(images)  # 5 images -> 3 columns, 2 rows
    assert grid.shape == (4, 9, 3)
    assert grid[0, 0, 0] == 1 and grid[0, 3, 0] == 2 and grid[2, 3, 0] == 5
    assert grid[2, 6, 0] == 0  # the empty cell stays black


def test_metric_writer_writes_tensorboard_events_on_process_0_only(tmp_path):
    writer = MetricWriter(str(tmp_path / "tb"))
    writer.scalars(0, {"reward/total_mean": 0.5})
    writer.images(0, "train/images", np.zeros((2, 4, 4, 3), np.uint8), ["a", "b"])
    writer.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    MetricWriter(str(tmp_path / "off"), enabled=False).scalars(0, {"x": 1.0})
    assert not (tmp_path / "off").exists()


def test_update_order_shuffles_and_drops_zero_std_groups():
    keep = np.array([True] * 8 + [False] * 4 + [True] * 4)
    order = update_order(keep, seed=0, epoch=1, drop_zero_std=False)
    assert sorted(order.tolist()) == list(range(16))
    assert not np.array_equal(order, np.arange(16))
    assert np.array_equal(order, update_order(keep, seed=0, epoch=1, drop_zero_std=False))
    dropped = update_order(keep, seed=0, epoch=1, drop_zero_std=True)
    assert dropped.size == 16 and keep[dropped].all()  # the 12 kept, cycled to fill 16
    assert set(dropped.tolist()) == set(np.flatnonzero(keep).tolist())
    assert update_order(np.zeros(16, bool), seed=0, epoch=1, drop_zero_std=True) is None
