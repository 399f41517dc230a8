"""Images from the latents of a diffusers AutoencoderKL (SD3's and FLUX's), as the diffusers
pipelines return them with output_type="np", for every family that decodes with one."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def decoded_images(vae, latents) -> jax.Array:
    """Pure: diffusion latents (B, h, w, C) -> float32 NHWC images in [0, 1] (undo the VAE's
    scaling and shift, decode, images/2 + 0.5 clamped)."""
    images = vae.decode_latents(latents)  # the VAE casts to its compute dtype
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def decoded_uint8(vae, latents) -> jax.Array:
    """Pure: `decoded_images` as uint8, rounded like diffusers' numpy_to_pil (`to_uint8`)."""
    return jnp.round(decoded_images(vae, latents) * 255).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode(graphdef, state, latents):
    return decoded_images(nnx.merge(graphdef, state), latents)


def decode(vae, latents) -> jax.Array:
    """Jitted `decoded_images` of `vae`."""
    graphdef, state = nnx.split(vae)
    return _decode(graphdef, state, jnp.asarray(latents))


def to_uint8(images) -> np.ndarray:
    """[0, 1] float images -> uint8, rounded like diffusers' numpy_to_pil."""
    return np.round(np.asarray(images, np.float32) * 255).astype(np.uint8)
