"""The flow-match schedule against diffusers' scheduler and the numbers docs/design.md section 1
lists."""
import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from flowgrpo_jax.sampling.schedule import flow_match_schedule


@pytest.mark.parametrize("num_steps", [1, 10, 28, 40])
def test_matches_diffusers_bit_for_bit(num_steps):
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    reference.set_timesteps(num_steps)
    sigmas, timesteps = flow_match_schedule(num_steps, shift=3.0, num_train_timesteps=1000)
    assert sigmas.dtype == timesteps.dtype == np.float32
    assert sigmas.shape == (num_steps + 1,) and timesteps.shape == (num_steps,)
    np.testing.assert_array_equal(sigmas, reference.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, reference.timesteps.numpy())


def test_ten_steps_match_design_numbers():
    design = [1, 0.96013, 0.91335, 0.85769, 0.79037, 0.70728, 0.60215, 0.46488, 0.27805, 0.00893, 0]
    sigmas, timesteps = flow_match_schedule(10)
    np.testing.assert_allclose(sigmas, design, atol=5e-6)
    np.testing.assert_allclose(timesteps, 1000 * sigmas[:-1], rtol=1e-7)


@pytest.mark.parametrize("num_steps", [10, 40])
def test_spacing_ends_at_shifted_sigma_min(num_steps):
    sigma_min = 3 * 0.001 / (1 + 2 * 0.001)  # 0.0029940, docs/design.md's shift(1/1000)
    sigmas, _ = flow_match_schedule(num_steps)
    assert sigmas[-2] == pytest.approx(3 * sigma_min / (1 + 2 * sigma_min), rel=1e-6)
    assert sigmas[0] == 1 and sigmas[-1] == 0
    assert np.all(np.diff(sigmas) < 0)


@pytest.mark.parametrize("bad", [{"num_steps": 0}, {"num_steps": 10, "shift": 0.0}])
def test_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        flow_match_schedule(**bad)
