"""Reward functions (jpeg, ocr) and the registry; OCR scored by a real reward server process."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from flowgrpo_jax.rewards import registry
from flowgrpo_jax.rewards.client import RewardClient
from flowgrpo_jax.rewards.ocr import edit_distance, quoted_target, text_match


def rendered(text, size=(320, 128)):
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((12, 36), text, fill="black", font=ImageFont.load_default(size=48))
    return np.asarray(image)


def test_ocr_reward_reads_the_quoted_word():
    noise = np.random.default_rng(0).integers(0, 256, (128, 320, 3), dtype=np.uint8)
    images = np.stack([rendered("Hello World"), rendered("Banana"), noise, rendered("Hello Wor")])
    prompt = 'a shop sign that says "Hello World" in black letters'
    with RewardClient("ocr") as client:
        scores = client.score(images, [prompt] * 4).components["ocr"]
    right, wrong, random, partial = scores
    assert right == pytest.approx(1.0)
    assert wrong < 0.3 and random < 0.3
    assert partial == pytest.approx(1 - 2 / 10)  # "helloworld" vs "hellowor": 2 edits of 10


def test_text_match_formula():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert text_match("Hello World", "the sign reads HELLOWORLD!") == 1.0  # contained
    assert text_match("abcd", "abxd") == pytest.approx(0.75)
    assert text_match("abcd", "a completely different long text") == 0.0  # capped at len
    assert text_match("abcd", "") == 0.0


def test_quoted_target():
    assert quoted_target('a cake with "Happy 30th" on it, "x"') == "Happy 30th"
    with pytest.raises(ValueError, match="quoted"):
        quoted_target("a cake with no quotes")
    with pytest.raises(ValueError, match="quoted"):
        quoted_target('an empty "" quote')


def jpeg_kb(image, quality):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


def test_jpeg_rewards():
    rng = np.random.default_rng(0)
    images = np.stack([np.full((64, 64, 3), 128, np.uint8), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)])
    reward = registry.WeightedReward({"jpeg_incompressibility": 1.0, "jpeg_compressibility": 2.0})
    total, components = reward(images, ["a", "b"], [{}, {}])
    sizes = components["jpeg_incompressibility"]
    np.testing.assert_allclose(sizes, [jpeg_kb(im, 95) for im in images])
    assert sizes[1] > 5 * sizes[0]  # noise does not compress
    np.testing.assert_allclose(components["jpeg_compressibility"], -sizes / 500)
    np.testing.assert_allclose(total, sizes - 2 * sizes / 500)


def test_registry_errors_and_weights():
    assert registry.parse_weights("ocr:1.0, pickscore:0.5,jpeg_compressibility") == {
        "ocr": 1.0, "pickscore": 0.5, "jpeg_compressibility": 1.0}
    with pytest.raises(ValueError, match="bad weight"):
        registry.parse_weights("ocr:lots")
    with pytest.raises(KeyError, match="unknown reward 'nope'; registered rewards: aesthetic, .*clipscore, .*ocr"):
        registry.build("nope")
    with pytest.raises(ValueError, match="options given for rewards not in use"):
        registry.WeightedReward({"jpeg_compressibility": 1.0}, {"ocr": {"x": "1"}})


def test_registering_a_reward_is_one_decorator():
    @registry.register("test_brightness")
    def brightness():
        return lambda images, prompts, metadata: {"score": images.mean(axis=(1, 2, 3)), "max": images.max(axis=(1, 2, 3))}

    images = np.stack([np.full((2, 2, 3), 10, np.uint8), np.full((2, 2, 3), 20, np.uint8)])
    total, components = registry.WeightedReward({"test_brightness": 0.5})(images, ["a", "b"], [{}, {}])
    assert total.tolist() == [5.0, 10.0]
    assert components["test_brightness/max"].tolist() == [10.0, 20.0]
    with pytest.raises(ValueError, match="already registered"):
        registry.register("test_brightness")(lambda: None)


def test_reward_with_wrong_output_shape_is_named():
    @registry.register("test_bad_shape")
    def bad_shape():
        return lambda images, prompts, metadata: {"score": np.zeros((len(images), 2))}

    with pytest.raises(ValueError, match="'test_bad_shape' gave 'score' of shape \\(3, 2\\) for 3 images"):
        registry.WeightedReward({"test_bad_shape": 1.0})(np.zeros((3, 2, 2, 3), np.uint8), ["a"] * 3, [{}] * 3)
