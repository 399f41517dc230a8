import re

import numpy as np
import pytest

from flowgrpo_jax import families
from flowgrpo_jax.families.toy import prompts, scenes, world
from flowgrpo_jax.rewards import registry
from flowgrpo_jax.rewards.client import RewardClient

# The toy family's reward, as the trainer loads it into its reward server.
PLUGINS = families.load("toy").reward_plugins
for plugin in PLUGINS:
    registry.load_plugin(plugin)


def _batch(n_right=3):
    """Three correct renders of test prompts, then each of the same prompts drawn wrong."""
    rng = np.random.default_rng(0)
    metadata = [m for m in prompts.load_metadata(prompts.DATA_DIR / "test.jsonl")
                if m["tag"] == "colors"][:n_right]
    right = [world.render_scene(scenes.sample_scene(m, rng)) for m in metadata]
    wrong = [world.render_scene(scenes.sample_scene(
        dict(m, include=[dict(m["include"][0], color="white" if m["include"][0]["color"] != "white"
                              else "red")]), rng)) for m in metadata]
    metadata = metadata + metadata
    return np.stack(right + wrong), [m["prompt"] for m in metadata], metadata


def test_registered_reward_scores_partial_and_logs_strict():
    images, texts, metadata = _batch()
    out = registry.build("toy_geneval")(images, texts, metadata)
    np.testing.assert_array_equal(out["strict"], [1, 1, 1, 0, 0, 0])
    np.testing.assert_allclose(out["partial"], [1, 1, 1, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(out["score"], out["partial"])
    strict_score = registry.build("toy_geneval", score="strict")(images, texts, metadata)["score"]
    np.testing.assert_array_equal(strict_score, out["strict"])
    mean_score = registry.build("toy_geneval", score="strict+partial")(images, texts, metadata)["score"]
    np.testing.assert_allclose(mean_score, [1, 1, 1, 0.25, 0.25, 0.25])
    np.testing.assert_array_equal(out["exact"], out["strict"])  # no stray objects in these renders


def test_reward_refuses_prompts_that_do_not_match_the_metadata():
    images, texts, metadata = _batch()
    with pytest.raises(ValueError, match=r"mismatched rows \[0\]"):
        registry.build("toy_geneval")(images, ["a photo of a cat"] + texts[1:], metadata)
    for bad in ("accuracy", "strict+", "strict+mean"):
        with pytest.raises(ValueError, match=f"score='{re.escape(bad)}'"):
            registry.build("toy_geneval", score=bad)


def test_reward_through_a_real_server_process():
    images, texts, metadata = _batch()
    with RewardClient("toy_geneval:1.0", plugins=PLUGINS, startup_timeout=120) as client:
        result = client.score(images, texts, metadata)
    np.testing.assert_allclose(result.total, [1, 1, 1, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(result.components["toy_geneval/strict"], [1, 1, 1, 0, 0, 0])
