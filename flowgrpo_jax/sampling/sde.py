"""One sampler step that either samples the next latent or scores a given one.

Rollout and training call this same function, so the log-probabilities they compute use the
same float32 math on the velocity the network gives each of them (which in bfloat16 differs
between the two programs: docs/design.md, section 7).

Kinds (time runs from sigma = 1, noise, to sigma = 0, data; dt = sigma_next - sigma < 0):

- "ode": the Euler step x + v*dt. Deterministic: log_prob, std and noise_std are 0.
- "sde": Flow-GRPO's SDE with the ODE's marginals, noise level a:
    std_t = a*sqrt(sigma / (1 - sigma_hat)),  sigma_hat = sigma_max where sigma == 1, else sigma
    mean  = x + [v + std_t^2/(2 sigma) * (x + (1 - sigma) v)] dt
    next  = mean + std_t*sqrt(-dt)*eps
  log_prob is the Gaussian log-density of next, averaged (not summed) over non-batch dims.
- "cps": coefficients-preserving sampling, noise level a:
    std  = sigma_next*sin(a*pi/2),  x0_hat = x - sigma v,  x1_hat = x + (1 - sigma) v
    mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat,  next = mean + std*eps
  log_prob is the reference's -(next - mean)^2 averaged over non-batch dims: constants and the
  1/(2 std^2) factor are dropped, so it is a log-density only up to an affine map.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("ode", "sde", "cps")


class StepOutput(NamedTuple):
    """Result of one step; every field float32.

    next_sample: the sampled next latent, or the given prev_sample when scoring; shape of x.
    log_prob:    (B,) log-probability of next_sample under the step, mean over non-batch dims.
    mean:        the step's Gaussian mean, shape of x (differentiable; the KL term uses it).
    std:         (B,) the std the reference returns and divides the KL by (2*std^2):
                 std_t (without sqrt(-dt)) for "sde", the noise std for "cps", 0 for "ode".
    noise_std:   (B,) the actual std of next_sample given x: std_t*sqrt(-dt) for "sde",
                 equal to std for "cps", 0 for "ode".
    """

    next_sample: jax.Array
    log_prob: jax.Array
    mean: jax.Array
    std: jax.Array
    noise_std: jax.Array


def _per_sample(value, batch: int, name: str):
    value = jnp.asarray(value, jnp.float32)
    if value.ndim == 0:
        return jnp.full((batch,), value)
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or shaped ({batch},), got shape {value.shape}")
    return value


def _mean_over_sample(values):
    return jnp.mean(values, axis=tuple(range(1, values.ndim)))


def sde_step(velocity, x, sigma, sigma_next, *, kind: str, noise_level, sigma_max,
             key=None, prev_sample=None) -> StepOutput:
    """One step from sigma to sigma_next (scalars or (B,)) for x of shape (B, ...), NHWC.

    With `key`, samples the next latent; with `prev_sample`, scores that latent instead (it is
    treated as a constant: no gradient flows into it). "ode" needs neither. `sigma_max` is the
    schedule's sigmas[1], used by "sde" in place of sigma when sigma == 1.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown step kind {kind!r}; expected one of {KINDS}")
    if velocity.shape != x.shape:
        raise ValueError(f"velocity shape {velocity.shape} differs from x shape {x.shape}")
    if key is not None and prev_sample is not None:
        raise ValueError("pass either key (to sample) or prev_sample (to score), not both")
    if kind != "ode" and key is None and prev_sample is None:
        raise ValueError(f"kind {kind!r} needs a key to sample or a prev_sample to score")
    if prev_sample is not None and prev_sample.shape != x.shape:
        raise ValueError(f"prev_sample shape {prev_sample.shape} differs from x shape {x.shape}")

    batch = x.shape[0]
    v = velocity.astype(jnp.float32)
    x = x.astype(jnp.float32)
    sigma_b = _per_sample(sigma, batch, "sigma")
    sigma_next_b = _per_sample(sigma_next, batch, "sigma_next")
    as_latent = lambda s: s.reshape((batch,) + (1,) * (x.ndim - 1))
    s, s_next = as_latent(sigma_b), as_latent(sigma_next_b)
    dt = s_next - s
    zeros = jnp.zeros((batch,), jnp.float32)

    if kind == "ode":
        mean = x + v * dt
        next_sample = mean if prev_sample is None else jax.lax.stop_gradient(prev_sample.astype(jnp.float32))
        return StepOutput(next_sample, zeros, mean, zeros, zeros)

    noise_level = jnp.asarray(noise_level, jnp.float32)
    if kind == "sde":
        sigma_hat = jnp.where(s == 1, jnp.asarray(sigma_max, jnp.float32), s)
        std = noise_level * jnp.sqrt(s / (1 - sigma_hat))
        mean = x + (v + std**2 / (2 * s) * (x + (1 - s) * v)) * dt
        noise_std = std * jnp.sqrt(-dt)
    else:
        std = s_next * jnp.sin(noise_level * np.pi / 2)
        x0_hat = x - s * v
        x1_hat = x + (1 - s) * v
        # max(., 0) guards sqrt against float32 rounding when noise_level is 1 (std == sigma_next).
        mean = (1 - s_next) * x0_hat + jnp.sqrt(jnp.maximum(s_next**2 - std**2, 0)) * x1_hat
        noise_std = std

    if prev_sample is None:
        eps = jax.random.normal(key, x.shape, jnp.float32)
        next_sample = mean + noise_std * eps
    else:
        next_sample = jax.lax.stop_gradient(prev_sample.astype(jnp.float32))

    if kind == "sde":
        log_prob = (-((next_sample - mean) ** 2) / (2 * noise_std**2)
                    - jnp.log(noise_std) - jnp.log(jnp.sqrt(2 * jnp.float32(np.pi))))
    else:
        log_prob = -((next_sample - mean) ** 2)
    flat = lambda a: a.reshape(batch)
    return StepOutput(next_sample, _mean_over_sample(log_prob), mean, flat(std), flat(noise_std))
