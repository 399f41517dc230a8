"""The jitted rollout: its log-probs re-scored in training mode, CFG, the SDE window, the debug
loop, with a tiny random nonlinear Flax velocity model."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowgrpo_jax.sampling.rollout import Window, guided_velocity, rollout, score_step
from flowgrpo_jax.sampling.schedule import flow_match_schedule

BATCH, SIZE, CHANNELS, TOKENS, TEXT_DIM = 4, 8, 4, 5, 16
GUIDANCE = 4.5


class TinyVelocity(nnx.Module):
    """A small conv net conditioned on time, pooled text and mean-pooled text tokens."""

    def __init__(self, *, rngs: nnx.Rngs):
        hidden = 32
        self.conv_in = nnx.Conv(CHANNELS, hidden, (3, 3), rngs=rngs)
        self.time_proj = nnx.Linear(1, hidden, rngs=rngs)
        self.text_proj = nnx.Linear(2 * TEXT_DIM, hidden, rngs=rngs)
        self.conv_out = nnx.Conv(hidden, CHANNELS, (3, 3), rngs=rngs)

    def __call__(self, x, t, text):
        cond = jnp.concatenate([text["pooled"], text["tokens"].mean(axis=1)], axis=-1)
        shift = self.time_proj(t[:, None] / 1000.0) + self.text_proj(cond)
        h = jax.nn.gelu(self.conv_in(x) + shift[:, None, None, :])
        return self.conv_out(h)


def apply_model(graphdef, params, x, t, text):
    return nnx.merge(graphdef, params)(x, t, text)


@pytest.fixture(scope="module")
def model():
    graphdef, params = nnx.split(TinyVelocity(rngs=nnx.Rngs(0)))
    return partial(apply_model, graphdef), params


@pytest.fixture(scope="module")
def inputs():
    keys = jax.random.split(jax.random.key(1), 3)
    text = {"pooled": jax.random.normal(keys[0], (BATCH, TEXT_DIM)),
            "tokens": jax.random.normal(keys[1], (BATCH, TOKENS, TEXT_DIM))}
    uncond = {"pooled": jnp.zeros((1, TEXT_DIM)), "tokens": jnp.zeros((1, TOKENS, TEXT_DIM))}
    latents = jax.random.normal(keys[2], (BATCH, SIZE, SIZE, CHANNELS))
    return latents, text, uncond


SIGMAS = flow_match_schedule(10)[0]


def run(model, inputs, **kwargs):
    velocity_fn, params = model
    latents, text, uncond = inputs
    options = dict(key=jax.random.key(7), kind="sde", noise_level=0.7, guidance_scale=GUIDANCE,
                   uncond_text=uncond) | kwargs
    return rollout(velocity_fn, params, latents, text, SIGMAS, **options)


def rescore(model, inputs, out, kind="sde", noise_level=0.7):
    """score_step on every stored step of `out`, as the train step scores them; fields (B, T)."""
    velocity_fn, params = model
    _, text, uncond = inputs
    score = jax.jit(lambda x, x_next, sigma, sigma_next: score_step(
        velocity_fn, params, x, x_next, sigma, sigma_next, text, kind=kind, noise_level=noise_level,
        sigma_max=SIGMAS[1], guidance_scale=GUIDANCE, uncond_text=uncond))
    steps = [score(out.latents[:, j], out.next_latents[:, j], out.sigmas[:, j], out.next_sigmas[:, j])
             for j in range(out.log_probs.shape[1])]
    return jax.tree.map(lambda *a: jnp.stack(a, axis=1), *steps)


def test_shapes_and_chaining(model, inputs):
    out = run(model, inputs)
    steps = len(SIGMAS) - 1
    assert out.latents.shape == out.next_latents.shape == (BATCH, steps, SIZE, SIZE, CHANNELS)
    assert out.log_probs.shape == out.sigmas.shape == out.next_sigmas.shape == (BATCH, steps)
    np.testing.assert_array_equal(out.latents[:, 0], inputs[0])
    np.testing.assert_array_equal(out.latents[:, 1:], out.next_latents[:, :-1])
    np.testing.assert_array_equal(out.final_latents, out.next_latents[:, -1])
    np.testing.assert_array_equal(out.sigmas[0], SIGMAS[:-1])
    np.testing.assert_array_equal(out.next_sigmas[0], SIGMAS[1:])


@pytest.mark.parametrize("kind,noise_level", [("sde", 0.7), ("cps", 0.8)])
def test_rescored_log_probs_give_ratio_one(model, inputs, kind, noise_level):
    out = run(model, inputs, kind=kind, noise_level=noise_level)
    scored = rescore(model, inputs, out, kind, noise_level)
    ratio = np.exp(np.asarray(scored.log_prob) - np.asarray(out.log_probs))
    np.testing.assert_allclose(ratio, 1.0, atol=1e-6)
    np.testing.assert_array_equal(scored.next_sample, out.next_latents)
    assert scored.std.shape == (BATCH, len(SIGMAS) - 1)


def test_cfg_is_one_batched_forward_of_both_branches(model, inputs):
    velocity_fn, params = model
    latents, text, uncond = inputs
    sigma = jnp.full((BATCH,), 0.6)
    guided = guided_velocity(velocity_fn, params, latents, sigma, text, guidance_scale=GUIDANCE, uncond_text=uncond)
    uncond_full = jax.tree.map(lambda a: jnp.broadcast_to(a, (BATCH,) + a.shape[1:]), uncond)
    v_cond = velocity_fn(params, latents, 1000 * sigma, text)
    v_uncond = velocity_fn(params, latents, 1000 * sigma, uncond_full)
    np.testing.assert_allclose(guided, v_uncond + GUIDANCE * (v_cond - v_uncond), rtol=1e-5, atol=1e-5)
    unguided = guided_velocity(velocity_fn, params, latents, sigma, text, guidance_scale=GUIDANCE)
    np.testing.assert_allclose(unguided, v_cond, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [None, Window(size=3, lo=1, hi=6)])
def test_debug_loop_gives_the_same_numbers(model, inputs, window):
    scanned = run(model, inputs, window=window)
    looped = run(model, inputs, window=window, debug_loop=True)
    for got, want in zip(looped, scanned):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_window_runs_sde_inside_and_ode_outside(model, inputs):
    window = Window(size=3, lo=1, hi=8)
    starts = set()
    ode = run(model, inputs, kind="ode", noise_level=0.0)
    for seed in range(6):
        out = run(model, inputs, window=window, key=jax.random.key(seed))
        start = int(np.flatnonzero(SIGMAS == out.sigmas[0, 0])[0])
        starts.add(start)
        assert window.lo <= start <= window.hi - window.size
        assert out.latents.shape[1] == out.log_probs.shape[1] == window.size
        np.testing.assert_array_equal(out.sigmas[0], SIGMAS[start:start + window.size])
        # Before the window the steps are the ODE's, so the window starts where the ODE is.
        np.testing.assert_allclose(out.latents[:, 0], ode.latents[:, start], rtol=1e-5, atol=1e-5)
        # Inside it they are stochastic: the first window step leaves the ODE path.
        assert np.abs(np.asarray(out.next_latents[:, 0] - ode.next_latents[:, start])).max() > 1e-2
        scored = rescore(model, inputs, out)
        np.testing.assert_allclose(np.exp(scored.log_prob - out.log_probs), 1.0, atol=1e-6)
    assert len(starts) > 1


@pytest.mark.parametrize("window", [Window(3, 0, 12), Window(0, 0, 4), Window(4, 3, 6)])
def test_rejects_bad_window(model, inputs, window):
    with pytest.raises(ValueError, match="window"):
        run(model, inputs, window=window)


def test_the_dpm2_sampler_steps_as_dpm_py_and_records_what_is_asked(model, inputs):
    """DPM-Solver++(2M) in the scan (prev x0 carried, the step index traced) gives the Python
    loop of sampling.dpm.dpm2_step; records=() keeps the final latents and sigmas only, and
    "means" keeps each step's mean (the next latent, for a deterministic sampler)."""
    from flowgrpo_jax.sampling.dpm import dpm2_step
    velocity_fn, params = model
    latents, text, uncond = inputs
    out = run(model, inputs, kind="dpm2", records=("next_latents", "means"))
    x, prev_x0 = latents, latents
    for i in range(len(SIGMAS) - 1):
        v = guided_velocity(velocity_fn, params, x, jnp.full((BATCH,), SIGMAS[i]), text,
                            guidance_scale=GUIDANCE, uncond_text=uncond)
        x, prev_x0 = dpm2_step(x, v, prev_x0, SIGMAS[max(i - 1, 0)], SIGMAS[i], SIGMAS[i + 1],
                               step_index=i, num_steps=len(SIGMAS) - 1)
        np.testing.assert_allclose(out.next_latents[:, i], x, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out.means, out.next_latents)
    assert out.latents is None and out.log_probs is None
    bare = run(model, inputs, kind="dpm2", records=())
    assert bare.next_latents is None and bare.means is None
    np.testing.assert_array_equal(bare.final_latents, out.final_latents)


@pytest.mark.parametrize("window", [None, Window(3, 0, 5), Window(3, 7, 10)])
def test_the_trajectory_holds_each_kept_latent_once(model, inputs, window):
    out = run(model, inputs, window=window)
    np.testing.assert_array_equal(out.trajectory[:, :-1], out.latents)
    np.testing.assert_array_equal(out.trajectory[:, 1:], out.next_latents)
