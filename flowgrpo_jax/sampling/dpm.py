"""Deterministic DPM-Solver++(2M) step for flow-matching models (DiffusionNFT's "dpm2" sampler).

Conventions are docs/design.md's (sections 1-4): sigma = 1 is noise, 0 is data,
x = (1 - sigma)*x0 + sigma*eps, the model gives v = eps - x0, so x0_hat = x - sigma*v. In
DPM-Solver's notation alpha = 1 - sigma and lambda = log(alpha) - log(sigma). All in float32.

One step from s = sigma to t = sigma_next, with x0_hat this step's and prev_x0 the last step's:

    c      = alpha_t - t*alpha_s/s       (= -alpha_t*(exp(-h) - 1), h = lambda_t - lambda_s)
    w      = h / (lambda_s - lambda_prev)   (1/r0; 0 on first-order steps)
    x_next = (t/s)*x + c*(x0_hat + w/2*(x0_hat - prev_x0))

With w = 0 this is DDIM with eta = 0, which is also DPM-Solver++'s first-order update; w != 0
adds the multistep second-order (midpoint) correction. Like DiffusionNFT's sampler with order 2,
step 0 and the last step are first order (the last, to t = 0, returns x0_hat exactly); every
other step is second order. When sigma_prev = 1 (step 1 of a schedule starting at pure noise)
lambda_prev = -inf, so w = 0 and that step is first order in effect, as in the reference.

Written with closed-form coefficients and a weight w, so it runs under jit / lax.scan with a
traced step index: the logs only enter w, and they see placeholder sigmas wherever the true
ones would give +-inf, so values and gradients stay finite.
"""
import jax.numpy as jnp


def _lam(sig):
    return jnp.log1p(-sig) - jnp.log(sig)


def dpm2_step(x, velocity, prev_x0, sigma_prev, sigma, sigma_next, *, step_index, num_steps):
    """One DPM-Solver++(2M) step from sigma to sigma_next; returns (x_next, x0_hat), float32.

    x, velocity, prev_x0: (B, ...) latents, the model's velocity at (x, sigma), the previous
    step's x0_hat (ignored at step 0). sigma_prev (ignored at step 0), sigma, sigma_next:
    scalars. step_index: Python or traced int in [0, num_steps); num_steps: the step count.
    """
    f32 = jnp.float32
    x, velocity, prev_x0 = (jnp.asarray(a, f32) for a in (x, velocity, prev_x0))
    s_prev, s, t = (jnp.asarray(a, f32) for a in (sigma_prev, sigma, sigma_next))
    x0_hat = x - s * velocity
    first_order = jnp.logical_or(jnp.equal(step_index, 0), jnp.equal(step_index, num_steps - 1))
    no_history = jnp.logical_or(first_order, s_prev >= 1)  # lambda_prev = -inf: w = 0
    # Placeholder sigmas where the true ones are not used keep every log finite.
    lam_s = _lam(jnp.where(first_order, 0.5, s))
    h = _lam(jnp.where(first_order, 0.25, t)) - lam_s
    h_prev = jnp.where(no_history, 1.0, lam_s - _lam(jnp.where(no_history, 0.75, s_prev)))
    w = jnp.where(no_history, 0.0, h / h_prev)
    c = (1 - t) - t * (1 - s) / s
    d1 = jnp.where(no_history, 0.0, w * (x0_hat - prev_x0))  # prev_x0 may be garbage at step 0
    x_next = (t / s) * x + c * (x0_hat + 0.5 * d1)
    return x_next, x0_hat
