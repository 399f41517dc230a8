"""Flow-matching sigma schedules, the numbers of diffusers' FlowMatchEulerDiscreteScheduler.

Time runs from sigma = 1 (pure noise) to sigma = 0 (data). The same function serves training
(10 steps) and evaluation (40 steps): the step count is configuration, not a code path. SD3
shifts by a fixed factor (`flow_match_schedule`); FLUX shifts by the image's token count
(`dynamic_shift_schedule`, docs/design.md section 1).
"""
import math

import numpy as np


def shift_sigmas(sigmas, shift: float):
    """Resolution shift s*u / (1 + (s - 1)*u): spends more steps near the noise end for s > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_match_schedule(num_steps: int, *, shift: float = 3.0, num_train_timesteps: int = 1000):
    """Returns (sigmas, timesteps) as float32 numpy arrays.

    sigmas has num_steps + 1 entries: 1, ..., shift(sigma_min), 0, where sigma_min =
    shift(1/num_train_timesteps) is the end of the linear spacing, shifted once more like
    diffusers does (0.0089286 for shift 3);
    timesteps (num_steps entries) = num_train_timesteps * sigmas[:-1], the model's time input.
    Step i goes from sigmas[i] to sigmas[i + 1].
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    # diffusers derives sigma_min in float32 from the last training timestep, then spaces the
    # inference timesteps in float64 and casts the shifted sigmas to float32: do the same so the
    # numbers agree bit for bit.
    first_train_sigma = np.float32(1) / np.float32(num_train_timesteps)
    sigma_min = float(shift_sigmas(first_train_sigma, np.float32(shift)))
    train_steps = np.linspace(num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = shift_sigmas(train_steps / num_train_timesteps, shift).astype(np.float32)
    timesteps = sigmas * np.float32(num_train_timesteps)
    return np.append(sigmas, np.float32(0)), timesteps


def resolution_mu(image_tokens: int, *, base_tokens: int = 256, max_tokens: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The log-shift mu for an image of `image_tokens` latent tokens: linear in the token count,
    base_shift at base_tokens and max_shift at max_tokens (the scheduler config's
    base_image_seq_len, max_image_seq_len, base_shift, max_shift)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    intercept = base_shift - slope * base_tokens
    return image_tokens * slope + intercept


def dynamic_shift_schedule(num_steps: int, *, mu: float, num_train_timesteps: int = 1000):
    """Returns (sigmas, timesteps) as float32 numpy arrays, shaped as `flow_match_schedule`'s.

    sigmas = linspace(1, 1/num_steps) shifted exponentially, e^mu / (e^mu + 1/u - 1) (the
    fixed shift with s = e^mu), then 0; timesteps = num_train_timesteps * sigmas[:-1].
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    # diffusers spaces in float64, shifts in float32 with a Python-float e^mu: the same here.
    spaced = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    scale = math.exp(mu)
    sigmas = (scale / (scale + (1 / spaced - 1))).astype(np.float32)
    timesteps = sigmas * np.float32(num_train_timesteps)
    return np.append(sigmas, np.float32(0)), timesteps
