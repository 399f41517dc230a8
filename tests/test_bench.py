"""tools/bench.py: the noise it hands PyTorch is the noise our rollout draws, and bad options are
refused. Its run on the tiny config (the JSON's fields, the JAX and PyTorch sides computing the
same thing at fp32) is checked in tests/test_gpu_check.py, whose bench section runs it."""
import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "tools", "bench.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_rollout_noise_is_what_rollout_draws():
    """The noise handed to torch is the noise our rollout uses: one SDE step of a zero velocity
    model, sampled by `rollout` and rebuilt from rollout_noise, gives the same next latent."""
    import jax
    import jax.numpy as jnp

    from flowgrpo_jax.sampling.rollout import rollout
    from flowgrpo_jax.sampling.sde import sde_step

    shape, sigmas = (2, 4, 4, 3), jnp.array([1.0, 0.9, 0.5])
    latents, key = jnp.ones(shape), jax.random.key(3)
    zero_velocity = lambda params, x, t, text: jnp.zeros_like(x)
    out = rollout(zero_velocity, None, latents, {}, sigmas, key=key, kind="sde", noise_level=0.7)
    noise = bench.rollout_noise(key, 2, shape)
    step = sde_step(jnp.zeros(shape), latents, 1.0, 0.9, kind="sde", noise_level=0.7, sigma_max=0.9,
                    key=None, prev_sample=latents)  # the step's mean and noise std, without sampling
    expected = step.mean + step.noise_std[:, None, None, None] * noise[0]
    np.testing.assert_allclose(out.next_latents[:, 0], expected, rtol=1e-6, atol=1e-6)


def test_bad_options_are_refused():
    with pytest.raises(SystemExit):
        bench.main(["--config", "tiny", "--attention", "cudnn"])  # no GPU here
    with pytest.raises(SystemExit):
        bench.main(["--config", "tiny", "--repeats", "0"])
