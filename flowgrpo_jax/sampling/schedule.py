"""Flow-matching sigma schedule with shift, the numbers of diffusers' FlowMatchEulerDiscreteScheduler.

Time runs from sigma = 1 (pure noise) to sigma = 0 (data). The same function serves training
(10 steps) and evaluation (40 steps): the step count is configuration, not a code path.
"""
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
