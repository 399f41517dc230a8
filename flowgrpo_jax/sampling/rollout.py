"""The whole sampling rollout as one jitted `lax.scan`, and the re-scoring of its steps.

The velocity model enters as `velocity_fn(params, x, t, text) -> v` with x NHWC (B, H, W, C),
t = 1000*sigma of shape (B,) and `text` any pytree of arrays with leading batch dim, so any
model can be plugged in. `velocity_fn` is a static jit argument: pass the same function object
each call (not a fresh lambda) or every call recompiles.

Classifier-free guidance runs the unconditional and conditional branches in one forward of
batch 2B (unconditional first) and combines them in float32: v = v_u + g*(v_c - v_u).
Rollout and scoring share `guided_velocity` and `sde_step`, so a rollout's log-probs recomputed
with the same params differ only by the velocity network's rounding in the two programs: to
float32 rounding in float32, beyond the clip range in bfloat16 (the trainer's exact ratios,
update.py and objectives/grpo.py, never compare the two).
"""
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flowgrpo_jax.sampling.dpm import dpm2_step
from flowgrpo_jax.sampling.sde import KINDS, StepOutput, sde_step

TIMESTEP_SCALE = 1000.0  # the model's time input is 1000*sigma (num_train_timesteps)
# A rollout's samplers: the step kinds of sde.py, and DPM-Solver++(2M) (deterministic, dpm.py).
SAMPLERS = KINDS + ("dpm2",)


class Window(NamedTuple):
    """SDE window ("Flow-GRPO-Fast"): `size` consecutive steps starting uniformly at random in
    [lo, hi - size] use the stochastic kind; the other steps use the ODE."""

    size: int
    lo: int
    hi: int


class Rollout(NamedTuple):
    """Per-step records, batch-major: (B, T, ...) with T the number of returned steps (all steps,
    or the window's size). Step j goes latents[:, j] -> next_latents[:, j] from sigmas[:, j] to
    next_sigmas[:, j]; log_probs[:, j] is its log-prob and means[:, j] its Gaussian mean.
    trajectory (B, T + 1, ...) holds the same latents once: step j goes trajectory[:, j] ->
    trajectory[:, j + 1]. final_latents (B, ...) is the sample at sigma = 0. All float32; a
    per-step record that was not asked for (`records`) is None."""

    latents: jax.Array
    next_latents: jax.Array
    log_probs: jax.Array
    sigmas: jax.Array
    next_sigmas: jax.Array
    final_latents: jax.Array
    means: jax.Array = None
    trajectory: jax.Array = None


# The per-step records of a rollout (Rollout fields); sigmas come with every rollout.
STEP_RECORDS = ("latents", "next_latents", "log_probs", "means", "trajectory")


def _with_uncond_first(uncond_text, text):
    def join(uncond, cond):
        if uncond.shape[0] == 1 and cond.shape[0] != 1:
            uncond = jnp.broadcast_to(uncond, (cond.shape[0],) + uncond.shape[1:])
        if uncond.shape != cond.shape:
            raise ValueError(f"uncond_text leaf shape {uncond.shape} does not match text leaf shape {cond.shape}")
        return jnp.concatenate([uncond, cond.astype(uncond.dtype)], axis=0)

    return jax.tree.map(join, uncond_text, text)


def guided_velocity(velocity_fn, params, x, sigma, text, *, guidance_scale, uncond_text=None):
    """Float32 velocity at x (B, ...) and per-sample sigma (B,); CFG when uncond_text is given."""
    t = TIMESTEP_SCALE * sigma
    if uncond_text is None:
        return velocity_fn(params, x, t, text).astype(jnp.float32)
    both = velocity_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                       _with_uncond_first(uncond_text, text)).astype(jnp.float32)
    v_uncond, v_cond = jnp.split(both, 2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def _check_window(window, num_steps):
    if window is None:
        return None
    window = Window(*window)
    if not (window.size >= 1 and 0 <= window.lo <= window.hi - window.size and window.hi <= num_steps):
        raise ValueError(f"window {window} needs 1 <= size and 0 <= lo <= hi - size, hi <= {num_steps} steps")
    return window


def trajectory(velocity_fn, params, latents, text, sigmas, key, noise_level, guidance_scale,
               uncond_text, *, kind, window, records=STEP_RECORDS,
               debug_loop: bool = False) -> Rollout:
    """The pure rollout behind `rollout` (arguments as there, `window` checked), for callers
    that jit it themselves (the trainer places it on a mesh). Only the per-step `records`
    (of STEP_RECORDS) are kept."""
    num_steps = sigmas.shape[0] - 1
    batch = latents.shape[0]
    sigmas = sigmas.astype(jnp.float32)
    sigma_max = sigmas[1]
    window_key, noise_key = jax.random.split(key)
    step_keys = jax.random.split(noise_key, num_steps)
    if window is None:
        start, stochastic = 0, jnp.ones((num_steps,), bool)
    else:
        start = jax.random.randint(window_key, (), window.lo, window.hi - window.size + 1)
        step_ids = jnp.arange(num_steps)
        stochastic = (step_ids >= start) & (step_ids < start + window.size)

    def step(carry, inputs):
        x, prev_x0 = carry  # prev_x0: the last step's x0 estimate, for dpm2
        sigma_prev, sigma, sigma_next, step_key, use_kind, index = inputs
        sigma_b = jnp.full((batch,), sigma)
        v = guided_velocity(velocity_fn, params, x, sigma_b, text,
                            guidance_scale=guidance_scale, uncond_text=uncond_text)
        if kind == "dpm2":
            x_next, prev_x0 = dpm2_step(x, v, prev_x0, sigma_prev, sigma, sigma_next,
                                        step_index=index, num_steps=num_steps)
            zeros = jnp.zeros((batch,), jnp.float32)
            out = StepOutput(x_next, zeros, x_next, zeros, zeros)
        else:
            out = sde_step(v, x, sigma_b, sigma_next, kind=kind, noise_level=noise_level,
                           sigma_max=sigma_max, key=step_key)
        if window is not None:
            ode = sde_step(v, x, sigma_b, sigma_next, kind="ode", noise_level=noise_level, sigma_max=sigma_max)
            out = jax.tree.map(partial(jnp.where, use_kind), out, ode)
        per_step = {"latents": x, "next_latents": out.next_sample, "log_probs": out.log_prob,
                    "means": out.mean, "trajectory": x}
        return (out.next_sample, prev_x0), {name: per_step[name] for name in records}

    inputs = (jnp.concatenate([sigmas[:1], sigmas[:-2]]), sigmas[:-1], sigmas[1:], step_keys,
              stochastic, jnp.arange(num_steps))
    x = latents.astype(jnp.float32)
    if debug_loop:
        carry, outputs = (x, x), []
        for i in range(num_steps):
            carry, output = step(carry, jax.tree.map(lambda a: a[i], inputs))
            outputs.append(output)
        final, per_step = carry[0], jax.tree.map(lambda *a: jnp.stack(a), *outputs)
    else:
        (final, _), per_step = jax.lax.scan(step, (x, x), inputs)

    num_kept = num_steps if window is None else window.size
    keep = lambda a: jax.lax.dynamic_slice_in_dim(a, start, num_kept, axis=0)
    kept = {name: jnp.swapaxes(keep(a), 0, 1) for name, a in per_step.items()}
    if "trajectory" in kept:  # the kept steps' inputs, then the last kept step's output
        after = start + num_kept  # the step whose input that output is, or the end
        next_input = jax.lax.dynamic_index_in_dim(per_step["trajectory"],
                                                  jnp.minimum(after, num_steps - 1), 0, False)
        last = jnp.where(after < num_steps, next_input, final)
        kept["trajectory"] = jnp.concatenate([kept["trajectory"], last[:, None]], axis=1)
    per_sample = lambda s: jnp.broadcast_to(keep(s), (batch, num_kept))
    return Rollout(sigmas=per_sample(sigmas[:-1]), next_sigmas=per_sample(sigmas[1:]),
                   final_latents=final, **{name: kept.get(name) for name in STEP_RECORDS})


_rollout_jit = jax.jit(trajectory, static_argnames=("velocity_fn", "kind", "window", "records",
                                                   "debug_loop"))


def rollout(velocity_fn, params, latents, text, sigmas, *, key, kind: str, noise_level,
            guidance_scale=1.0, uncond_text=None, window=None, records=STEP_RECORDS,
            debug_loop: bool = False) -> Rollout:
    """Samples from initial noise `latents` (B, H, W, C) along the schedule `sigmas` (N+1,).

    `kind` (of SAMPLERS: "ode", "sde", "cps", "dpm2") is the step kind everywhere, or inside the
    window when `window = Window(size, lo, hi)` is given (the ODE outside; only the window's
    steps are returned). The window start and every step's noise come from `key`. CFG is on when
    `uncond_text` (same structure as `text`, batch B or 1) is given. `records` picks the
    per-step arrays kept (of STEP_RECORDS; () keeps only the final latents and the sigmas).
    `debug_loop=True` runs the same step eagerly in a Python loop (for prints and debuggers)
    instead of the jitted scan.
    """
    sigmas = jnp.asarray(sigmas)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D schedule with at least 2 entries, got shape {sigmas.shape}")
    window = _check_window(window, sigmas.shape[0] - 1)
    run = trajectory if debug_loop else _rollout_jit
    return run(velocity_fn, params, latents, text, sigmas, key, noise_level, guidance_scale, uncond_text,
               kind=kind, window=window, records=tuple(records), debug_loop=debug_loop)


def score_step(velocity_fn, params, latents, next_latents, sigma, sigma_next, text, *, kind: str,
               noise_level, sigma_max, guidance_scale=1.0, uncond_text=None) -> StepOutput:
    """Scores one stored transition latents -> next_latents (B, ...) with the rollout's math.

    Differentiable in params (the training loss is built on it); sigma and sigma_next are (B,)
    as stored in a Rollout, sigma_max the schedule's sigmas[1].
    """
    v = guided_velocity(velocity_fn, params, latents, sigma, text,
                        guidance_scale=guidance_scale, uncond_text=uncond_text)
    return sde_step(v, latents, sigma, sigma_next, kind=kind, noise_level=noise_level,
                    sigma_max=sigma_max, prev_sample=next_latents)
