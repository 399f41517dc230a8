"""The flow-match schedule against diffusers' scheduler and the numbers docs/design.md section 1
lists."""
import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from flowgrpo_jax.sampling.schedule import (dynamic_shift_schedule, flow_match_schedule,
                                             resolution_mu)


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


# FLUX.1-dev's scheduler_config.json: the shift follows the image's token count.
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                      base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                      max_shift=1.15)


@pytest.mark.parametrize("num_steps, image_tokens", [(1, 256), (10, 1024), (28, 4096), (40, 777)])
def test_dynamic_shift_matches_diffusers_flux_bit_for_bit(num_steps, image_tokens):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = resolution_mu(image_tokens)
    assert mu == calculate_shift(image_tokens)
    reference = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    # as FluxPipeline calls it: its own linear sigmas and mu from the packed latents' length
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    sigmas, timesteps = dynamic_shift_schedule(num_steps, mu=mu)
    assert sigmas.dtype == timesteps.dtype == np.float32
    np.testing.assert_array_equal(sigmas, reference.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, reference.timesteps.numpy())


def test_dynamic_shift_is_the_fixed_shift_by_e_to_the_mu():
    # 512 px FLUX: 1024 packed tokens, mu 0.63; the shifted sigmas are shift_sigmas(u, e^mu)
    mu = resolution_mu(1024)
    np.testing.assert_allclose(mu, 0.5 + 0.65 * 768 / 3840, rtol=1e-12)
    sigmas, _ = dynamic_shift_schedule(10, mu=mu)
    spaced = np.linspace(1, 0.1, 10)
    np.testing.assert_allclose(sigmas[:-1], np.exp(mu) * spaced / (1 + (np.exp(mu) - 1) * spaced),
                               rtol=1e-6)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and np.all(np.diff(sigmas) < 0)
