"""The sampler step against an independent float64 NumPy transcription of docs/design.md section 2,
and a statistical check that the samplers reproduce Gaussian data through the closed-form
velocity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowgrpo_jax.sampling.rollout import rollout
from flowgrpo_jax.sampling.schedule import flow_match_schedule
from flowgrpo_jax.sampling.sde import sde_step

SIGMA_MAX = 0.9601293  # sigmas[1] of the 10-step schedule


def numpy_step(v, x, sigma, sigma_next, kind, a, sigma_max, eps=None, prev=None):
    """docs/design.md's formulas in float64; returns (next, log_prob (B,), mean, std, noise_std)."""
    v, x = v.astype(np.float64), x.astype(np.float64)
    s = np.asarray(sigma, np.float64).reshape(-1, 1, 1, 1)
    s_next = np.asarray(sigma_next, np.float64).reshape(-1, 1, 1, 1)
    dt = s_next - s
    per_sample = lambda a_: np.broadcast_to(a_, s.shape).reshape(-1)
    if kind == "ode":
        mean = x + v * dt
        nxt = mean if prev is None else prev.astype(np.float64)
        return nxt, np.zeros(len(x)), mean, np.zeros(len(x)), np.zeros(len(x))
    if kind == "sde":
        sigma_hat = np.where(s == 1, sigma_max, s)
        std = a * np.sqrt(s / (1 - sigma_hat))
        mean = x + (v + std**2 / (2 * s) * (x + (1 - s) * v)) * dt
        noise_std = std * np.sqrt(-dt)
    else:
        std = s_next * np.sin(a * np.pi / 2)
        mean = (1 - s_next) * (x - s * v) + np.sqrt(s_next**2 - std**2) * (x + (1 - s) * v)
        noise_std = std
    nxt = mean + noise_std * eps if prev is None else prev.astype(np.float64)
    if kind == "sde":
        log_prob = -((nxt - mean) ** 2) / (2 * noise_std**2) - np.log(noise_std) - 0.5 * np.log(2 * np.pi)
    else:
        log_prob = -((nxt - mean) ** 2)
    return nxt, log_prob.mean(axis=(1, 2, 3)), mean, per_sample(std), per_sample(noise_std)


def random_inputs(seed, batch=4, shape=(6, 5, 3)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *shape)).astype(np.float32)
    v = rng.normal(size=(batch, *shape)).astype(np.float32)
    sigma = rng.uniform(0.05, 0.95, size=batch).astype(np.float32)
    sigma[0] = 1.0  # exercises the sigma_max substitution
    sigma_next = (sigma * rng.uniform(0.3, 0.95, size=batch)).astype(np.float32)
    prev = rng.normal(size=(batch, *shape)).astype(np.float32)
    return x, v, sigma, sigma_next, prev


def assert_step_matches(out, ref, rtol=2e-5, atol=2e-5):
    names = ("next_sample", "log_prob", "mean", "std", "noise_std")
    for name, got, want in zip(names, out, ref):
        assert got.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("kind,noise_level", [("ode", 0.0), ("sde", 0.7), ("sde", 1.0), ("cps", 0.8)])
def test_sampling_matches_numpy(kind, noise_level):
    x, v, sigma, sigma_next, _ = random_inputs(0)
    key = jax.random.key(3)
    eps = np.asarray(jax.random.normal(key, x.shape, jnp.float32))  # the step's documented noise draw
    out = sde_step(jnp.asarray(v), jnp.asarray(x), sigma, sigma_next, kind=kind,
                   noise_level=noise_level, sigma_max=SIGMA_MAX, key=key)
    assert_step_matches(out, numpy_step(v, x, sigma, sigma_next, kind, noise_level, SIGMA_MAX, eps=eps))


@pytest.mark.parametrize("kind,noise_level", [("ode", 0.0), ("sde", 0.5), ("sde", 0.7), ("cps", 0.8)])
def test_scoring_matches_numpy(kind, noise_level):
    x, v, sigma, sigma_next, prev = random_inputs(1)
    out = sde_step(jnp.asarray(v), jnp.asarray(x), sigma, sigma_next, kind=kind,
                   noise_level=noise_level, sigma_max=SIGMA_MAX, prev_sample=jnp.asarray(prev))
    assert_step_matches(out, numpy_step(v, x, sigma, sigma_next, kind, noise_level, SIGMA_MAX, prev=prev))


@pytest.mark.parametrize("kind,noise_level", [("sde", 0.7), ("cps", 0.8)])
def test_scoring_own_sample_returns_sampler_log_prob(kind, noise_level):
    x, v, sigma, sigma_next, _ = random_inputs(2)
    common = dict(kind=kind, noise_level=noise_level, sigma_max=SIGMA_MAX)
    sampled = sde_step(jnp.asarray(v), jnp.asarray(x), sigma, sigma_next, key=jax.random.key(5), **common)
    scored = sde_step(jnp.asarray(v), jnp.asarray(x), sigma, sigma_next, prev_sample=sampled.next_sample, **common)
    np.testing.assert_allclose(scored.log_prob, sampled.log_prob, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(scored.mean, sampled.mean)


@pytest.mark.parametrize("kind", ["ode", "sde", "cps"])
def test_scalar_and_per_sample_sigmas_agree(kind):
    x, v, _, _, prev = random_inputs(3)
    common = dict(kind=kind, noise_level=0.7, sigma_max=SIGMA_MAX, prev_sample=jnp.asarray(prev))
    scalar = sde_step(jnp.asarray(v), jnp.asarray(x), 0.6, 0.45, **common)
    per_sample = sde_step(jnp.asarray(v), jnp.asarray(x), jnp.full(4, 0.6), jnp.full(4, 0.45), **common)
    for got, want in zip(per_sample, scalar):
        np.testing.assert_array_equal(got, want)


def test_per_sample_sigmas_equal_one_sample_at_a_time():
    x, v, sigma, sigma_next, prev = random_inputs(4)
    common = dict(kind="sde", noise_level=0.7, sigma_max=SIGMA_MAX)
    batched = sde_step(jnp.asarray(v), jnp.asarray(x), sigma, sigma_next, prev_sample=jnp.asarray(prev), **common)
    for i in range(len(x)):
        single = sde_step(jnp.asarray(v[i:i + 1]), jnp.asarray(x[i:i + 1]), sigma[i], sigma_next[i],
                          prev_sample=jnp.asarray(prev[i:i + 1]), **common)
        np.testing.assert_allclose(single.log_prob, batched.log_prob[i:i + 1], rtol=1e-6)


def test_sigma_one_uses_sigma_max():
    x, v, _, _, prev = random_inputs(5)
    out = sde_step(jnp.asarray(v), jnp.asarray(x), 1.0, 0.9, kind="sde", noise_level=0.7,
                   sigma_max=SIGMA_MAX, prev_sample=jnp.asarray(prev))
    np.testing.assert_allclose(out.std, 0.7 * np.sqrt(1 / (1 - SIGMA_MAX)), rtol=1e-6)
    assert np.all(np.isfinite(out.log_prob))


def test_low_precision_inputs_compute_in_float32():
    x, v, sigma, sigma_next, prev = random_inputs(6)
    as_bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
    common = dict(kind="sde", noise_level=0.7, sigma_max=SIGMA_MAX)
    low = sde_step(as_bf16(v), as_bf16(x), sigma, sigma_next, prev_sample=as_bf16(prev), **common)
    upcast = lambda a: as_bf16(a).astype(jnp.float32)
    full = sde_step(upcast(v), upcast(x), sigma, sigma_next, prev_sample=upcast(prev), **common)
    for got, want in zip(low, full):
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(got, want)


def test_scored_sample_is_a_constant():
    x, v, sigma, sigma_next, prev = random_inputs(7)

    def total_log_prob(velocity, prev_sample):
        return sde_step(velocity, jnp.asarray(x), sigma, sigma_next, kind="sde", noise_level=0.7,
                        sigma_max=SIGMA_MAX, prev_sample=prev_sample).log_prob.sum()

    grad_v, grad_prev = jax.grad(total_log_prob, argnums=(0, 1))(jnp.asarray(v), jnp.asarray(prev))
    assert np.abs(np.asarray(grad_v)).max() > 0
    np.testing.assert_array_equal(grad_prev, 0)


@pytest.mark.parametrize("bad,match", [
    (dict(kind="euler", key=jax.random.key(0)), "unknown step kind"),
    (dict(kind="sde"), "needs a key"),
    (dict(kind="sde", key=jax.random.key(0), prev_sample=jnp.zeros((4, 6, 5, 3))), "not both"),
    (dict(kind="sde", key=jax.random.key(0), sigma=jnp.ones(3)), "sigma must be"),
])
def test_rejects_bad_input(bad, match):
    x, v, _, _, _ = random_inputs(8)
    args = dict(sigma=0.5, sigma_next=0.4, noise_level=0.7, sigma_max=SIGMA_MAX) | bad
    with pytest.raises(ValueError, match=match):
        sde_step(jnp.asarray(v), jnp.asarray(x), **args)


# --- Statistical check with Gaussian data -------------------------------------------------
#
# Data x0 ~ N(mu, s^2) per channel and x_sigma = (1 - sigma) x0 + sigma eps give
# Var(x_sigma) = (1 - sigma)^2 s^2 + sigma^2, Cov(x0, x_sigma) = (1 - sigma) s^2 and
# Cov(eps, x_sigma) = sigma, so the exact velocity E[eps - x0 | x_sigma = x] is
#   (sigma - (1 - sigma) s^2) / Var(x_sigma) * (x - (1 - sigma) mu) - mu.

DATA_MEAN = np.array([0.5, -1.0, 0.0], np.float32)
DATA_STD = np.array([0.3, 1.5, 1.0], np.float32)
NUM_SAMPLES = 20000
NUM_STEPS = 200


def gaussian_velocity(params, x, t, text):
    mean, std = params
    sigma = (t / 1000.0).reshape(-1, 1, 1, 1)
    var_x = (1 - sigma) ** 2 * std**2 + sigma**2
    return (sigma - (1 - sigma) * std**2) / var_x * (x - (1 - sigma) * mean) - mean


@pytest.fixture(scope="module")
def schedule():
    return flow_match_schedule(NUM_STEPS)[0]


@pytest.fixture(scope="module")
def ode_bias(schedule):
    """Exact discretisation error of the ODE sampler: with a linear velocity every Euler step is
    affine, so the final sample is A*x1 + b per channel; rolling out x1 = 0 and x1 = 1 gives b and
    A, hence the sampler's exact mean b and variance A^2 for x1 ~ N(0, 1)."""
    params = (DATA_MEAN, DATA_STD)
    run = lambda value: np.asarray(rollout(gaussian_velocity, params, jnp.full((1, 1, 1, 3), value), {}, schedule,
                                           key=jax.random.key(0), kind="ode", noise_level=0.0).final_latents,
                                   np.float64).reshape(3)
    offset = run(0.0)
    slope = run(1.0) - offset
    return np.abs(offset - DATA_MEAN), np.abs(slope**2 - DATA_STD.astype(np.float64) ** 2)


def moment_errors(final, ode_bias):
    """Sample mean and variance minus the data's, and the allowed error: 5 standard errors
    (s/sqrt(n) for the mean, s^2*sqrt(2/(n-1)) for the variance) plus the ODE's exact
    discretisation error. Every sampler here is a first-order discretisation of a process with
    the data's marginals; at 200 steps the ODE's error (0.3-4% of the variance, the largest of the
    kinds per the exact moment recursion) is used as the allowance for all of them."""
    samples = np.asarray(final, np.float64).reshape(-1, 3)
    n = samples.shape[0]
    std = DATA_STD.astype(np.float64)
    mean_error = np.abs(samples.mean(0) - DATA_MEAN)
    var_error = np.abs(samples.var(0, ddof=1) - std**2)
    mean_allowed = 5 * std / np.sqrt(n) + ode_bias[0]
    var_allowed = 5 * std**2 * np.sqrt(2 / (n - 1)) + ode_bias[1]
    return mean_error, mean_allowed, var_error, var_allowed


def initial_noise():
    return jax.random.normal(jax.random.key(11), (NUM_SAMPLES, 1, 1, 3), jnp.float32)


@pytest.mark.parametrize("kind,noise_level", [("ode", 0.0), ("sde", 0.5), ("sde", 0.7), ("sde", 1.0)])
def test_samplers_reproduce_gaussian_data(kind, noise_level, schedule, ode_bias):
    out = rollout(gaussian_velocity, (DATA_MEAN, DATA_STD), initial_noise(), {}, schedule,
                  key=jax.random.key(12), kind=kind, noise_level=noise_level)
    mean_error, mean_allowed, var_error, var_allowed = moment_errors(out.final_latents, ode_bias)
    assert np.all(mean_error < mean_allowed), (mean_error, mean_allowed)
    assert np.all(var_error < var_allowed), (var_error, var_allowed)


def flipped_drift_sde_final(schedule, noise_level):
    """The SDE with the drift correction's sign flipped: mean = x + [v - std_t^2/(2 sigma)(x +
    (1 - sigma) v)] dt = 2*(Euler mean) - (SDE mean)."""
    params, sigma_max = (DATA_MEAN, DATA_STD), schedule[1]

    def step(x, inputs):
        sigma, sigma_next, key = inputs
        v = gaussian_velocity(params, x, jnp.full((x.shape[0],), 1000 * sigma), None)
        common = dict(noise_level=noise_level, sigma_max=sigma_max)
        sde = sde_step(v, x, sigma, sigma_next, kind="sde", key=key, **common)
        ode = sde_step(v, x, sigma, sigma_next, kind="ode", **common)
        eps = (sde.next_sample - sde.mean) / sde.noise_std.reshape(-1, 1, 1, 1)
        return 2 * ode.mean - sde.mean + sde.noise_std.reshape(-1, 1, 1, 1) * eps, None

    keys = jax.random.split(jax.random.key(12), NUM_STEPS)
    final, _ = jax.jit(lambda x: jax.lax.scan(step, x, (schedule[:-1], schedule[1:], keys)))(initial_noise())
    return final


def test_flipped_drift_correction_is_rejected(schedule, ode_bias):
    mean_error, mean_allowed, var_error, var_allowed = moment_errors(
        flipped_drift_sde_final(schedule, 0.7), ode_bias)
    assert np.all(var_error > 10 * var_allowed), (var_error, var_allowed)


def cps_exact_moments(schedule, noise_level):
    """Mean and variance of the CPS chain's output, propagated exactly in float64: with the linear
    velocity v = alpha*x + beta each step is x' = A x + B + std*eps."""
    mean, var = np.zeros(3), np.ones(3)
    mu, s2 = DATA_MEAN.astype(np.float64), DATA_STD.astype(np.float64) ** 2
    for sigma, sigma_next in zip(schedule[:-1].astype(np.float64), schedule[1:].astype(np.float64)):
        alpha = (sigma - (1 - sigma) * s2) / ((1 - sigma) ** 2 * s2 + sigma**2)
        beta = -alpha * (1 - sigma) * mu - mu
        std = sigma_next * np.sin(noise_level * np.pi / 2)
        keep = np.sqrt(sigma_next**2 - std**2)
        a = (1 - sigma_next) * (1 - sigma * alpha) + keep * (1 + (1 - sigma) * alpha)
        b = -(1 - sigma_next) * sigma * beta + keep * (1 - sigma) * beta
        mean, var = a * mean + b, a**2 * var + std**2
    return mean, var


def test_cps_keeps_the_mean_and_shrinks_the_variance_as_its_formula_implies(schedule, ode_bias):
    """CPS's noise std sigma_next*sin(a*pi/2) does not shrink with the step, and its mean uses the
    posterior mean of x0, dropping the posterior variance each step: the chain keeps the data mean
    but its variance converges to less than s^2 (about 0.64 s^2 for a = 0.8), as the reference
    formula implies. Checked against the chain's exact moments, within 5 standard errors."""
    out = rollout(gaussian_velocity, (DATA_MEAN, DATA_STD), initial_noise(), {}, schedule,
                  key=jax.random.key(12), kind="cps", noise_level=0.8)
    mean_error, mean_allowed, _, _ = moment_errors(out.final_latents, ode_bias)
    assert np.all(mean_error < mean_allowed), (mean_error, mean_allowed)
    exact_mean, exact_var = cps_exact_moments(schedule, 0.8)
    np.testing.assert_allclose(exact_mean, DATA_MEAN, atol=1e-6)
    assert np.all(exact_var < 0.7 * DATA_STD**2)
    samples = np.asarray(out.final_latents, np.float64).reshape(-1, 3)
    n = samples.shape[0]
    var_se = exact_var * np.sqrt(2 / (n - 1))
    assert np.all(np.abs(samples.var(0, ddof=1) - exact_var) < 5 * var_se)
