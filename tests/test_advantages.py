import numpy as np
import pytest

from flowgrpo_jax.objectives.advantages import PerPromptStatTracker, group_advantages


def test_global_std_advantages_by_hand():
    prompts = ["a", "b", "a", "b", "a", "b"]
    rewards = np.array([1.0, 10.0, 2.0, 10.0, 3.0, 13.0])
    out = group_advantages(prompts, rewards, global_std=True)
    std = np.std(rewards)  # population std of all six rewards
    mean_a, mean_b = 2.0, 11.0
    expected = np.array(
        [(1 - mean_a), (10 - mean_b), (2 - mean_a), (10 - mean_b), (3 - mean_a), (13 - mean_b)]
    ) / (std + 1e-4)
    np.testing.assert_allclose(out.advantages, expected, rtol=1e-6)
    assert out.zero_std_ratio == 0.0 and out.num_groups == 2 and out.keep.all()


def test_per_group_std_advantages_by_hand():
    prompts = [0, 0, 1, 1]
    rewards = [0.0, 2.0, 5.0, 9.0]
    out = group_advantages(prompts, rewards, global_std=False)
    expected = np.array([-1 / (1 + 1e-4), 1 / (1 + 1e-4), -2 / (2 + 1e-4), 2 / (2 + 1e-4)])
    np.testing.assert_allclose(out.advantages, expected, rtol=1e-6)
    np.testing.assert_allclose(out.group_std_mean, 1.5)


def test_clipping_and_zero_std_groups():
    # One outlier in group "x": its advantage (0.75 / 0.433 ~ 1.73) is clipped to 1.5.
    prompts = ["x"] * 4 + ["y"] * 3
    rewards = [0.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1]
    out = group_advantages(prompts, rewards, global_std=False, clip_max=1.5)
    assert out.advantages[3] == pytest.approx(1.5)
    assert np.all(out.advantages[:3] >= -1.5)
    # Group "y" has identical rewards (whose float mean is not exactly 0.1): exactly zero.
    np.testing.assert_array_equal(out.advantages[4:], 0.0)
    np.testing.assert_array_equal(out.keep, [True] * 4 + [False] * 3)
    assert out.zero_std_ratio == pytest.approx(0.5)


def test_tracker_state_round_trip():
    tracker = PerPromptStatTracker(global_std=True)
    tracker.update(["p", "q", "p", "q"], [1.0, 2.0, 3.0, 4.0])
    tracker.update(["r", "r"], [1.0, 1.0])
    assert tracker.num_seen_prompts == 3
    restored = PerPromptStatTracker(global_std=True)
    restored.load_state_dict(tracker.state_dict())
    assert restored.seen_prompts == {"p", "q", "r"}
    assert tracker.state_dict() == {"seen_prompts": ["p", "q", "r"]}


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="equal length"):
        group_advantages(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(["a", "b"], [1.0, np.nan])
