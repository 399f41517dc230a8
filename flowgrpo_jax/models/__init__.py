"""Flax NNX ports of the SD3 / SD3.5 components, and loading them from converted folders."""
import jax.numpy as jnp

from flowgrpo_jax.models.components import load_component


def load_transformer(path: str, dtype=jnp.float32, compute_dtype=None, shardings=None):
    """The MMDiT from a converted component folder or a converted pipeline folder.

    `dtype` is the parameter dtype (stored weights are cast to it), `compute_dtype` the
    activation dtype (default: `dtype`). Call it as `model(x, timestep,
    encoder_hidden_states, pooled_projections)` with NHWC latents and timesteps on the
    diffusers 0..1000 scale; it returns the velocity in NHWC.
    """
    return load_component(path, "transformer", "transformer", dtype, compute_dtype, shardings)
