"""FLUX.1 text-to-image in JAX: prompt encoding, latent packing, the flow-match rollout, decoding.

The numbers follow diffusers' FluxPipeline: `encode_prompt` gives the same T5 context
(B, max_sequence_length, 4096) and CLIP pooled vector (B, 768); the transformer sees the
latents packed into 2x2 patches (`pack_latents`) with FluxPipeline's position ids; guidance is
the distilled guidance scale, an input of the model (no classifier-free guidance batch); the
schedule is shifted by the packed token count; `decode` returns what `output_type="np"` gives.

Latents are NHWC (B, H/8, W/8, 16) everywhere outside the transformer: `apply_transformer`
packs on the way in and unpacks the velocity on the way out, so the shared rollout, the SDE
samplers and the trainer treat FLUX like any other family. Host work (tokenisation, PNG) stays
outside the jitted functions.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowgrpo_jax.families import vae_images
from flowgrpo_jax.families.flux.loading import FluxPipeline, SchedulerConfig
from flowgrpo_jax.families.vae_images import to_uint8
from flowgrpo_jax.generator import nnx_velocity
from flowgrpo_jax.sampling.rollout import SAMPLERS, TIMESTEP_SCALE, rollout
from flowgrpo_jax.sampling.schedule import dynamic_shift_schedule, resolution_mu

PATCH = 2  # FluxPipeline packs 2x2 latent pixels into one token
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline refuses longer T5 prompts
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline's default size in latent pixels (1024 px)


class PromptTokens(NamedTuple):
    """Token ids (B, length) int32: CLIP-L's (77) and T5's (max_sequence_length)."""

    clip: np.ndarray
    t5: np.ndarray


class TextEmbeddings(NamedTuple):
    """The transformer's text conditioning: T5's states (B, T, 4096) and CLIP's pooled (B, 768)."""

    prompt_embeds: jax.Array
    pooled: jax.Array


def _as_list(prompts, what: str) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must be a string or a non-empty list of strings, got {prompts!r}")
    return prompts


def tokenize(pipeline: FluxPipeline, prompts, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> PromptTokens:
    """Host step, as FluxPipeline: CLIP padded / truncated to its tokenizer's model_max_length
    (77), T5 to `max_sequence_length` (at most 512; Flow-GRPO's FLUX runs use 128)."""
    prompts = _as_list(prompts, "prompts")
    if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"max_sequence_length must be in 1..{MAX_SEQUENCE_LENGTH}, "
                         f"got {max_sequence_length}")
    clip_length = pipeline.tokenizer.model_max_length
    positions = pipeline.text_encoder.config.max_position_embeddings
    if clip_length > positions:
        raise ValueError(f"tokenizer model_max_length {clip_length} exceeds text_encoder's "
                         f"{positions} positions; set model_max_length in tokenizer_config.json")

    def ids(tokenizer, length):
        out = tokenizer(prompts, padding="max_length", max_length=length, truncation=True)
        return np.asarray(out.input_ids, np.int32)

    return PromptTokens(ids(pipeline.tokenizer, clip_length),
                        ids(pipeline.tokenizer_2, max_sequence_length))


def text_embeddings(encoders, tokens: PromptTokens) -> TextEmbeddings:
    """Pure: the (CLIP-L, T5) encoders' text conditioning of token ids."""
    clip, t5 = encoders
    return TextEmbeddings(t5(tokens.t5), clip(tokens.clip).pooler_output)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode(graphdef, state, tokens: PromptTokens) -> TextEmbeddings:
    return text_embeddings(nnx.merge(graphdef, state), tokens)


def encode_tokens(pipeline: FluxPipeline, tokens: PromptTokens) -> TextEmbeddings:
    """Jitted, pure: token ids -> text conditioning."""
    graphdef, state = nnx.split((pipeline.text_encoder, pipeline.text_encoder_2))
    return _encode(graphdef, state, tokens)


def encode_prompt(pipeline: FluxPipeline, prompts,
                  max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> TextEmbeddings:
    """(prompt_embeds, pooled) as diffusers' FluxPipeline.encode_prompt (one image per prompt;
    its text_ids are zeros, made where the transformer is applied)."""
    return encode_tokens(pipeline, tokenize(pipeline, prompts, max_sequence_length))


def pack_latents(latents: jax.Array) -> jax.Array:
    """NHWC latents (B, H, W, C) -> tokens (B, H/2 * W/2, 4C), as FluxPipeline._pack_latents:
    tokens in row-major order of the 2x2 patches, channel c*4 + 2*dy + dx."""
    b, h, w, c = latents.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"latents of {h}x{w} pixels cannot be packed into {PATCH}x{PATCH} patches")
    x = latents.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: jax.Array, height: int, width: int) -> jax.Array:
    """Inverse of `pack_latents`: tokens (B, height/2 * width/2, 4C) -> NHWC (B, height, width,
    C), height and width in latent pixels (FluxPipeline._unpack_latents, NHWC)."""
    b, length, channels = tokens.shape
    if height % PATCH or width % PATCH or length != (height // PATCH) * (width // PATCH):
        raise ValueError(f"{length} tokens are not the {PATCH}x{PATCH} patches of a "
                         f"{height}x{width} latent grid")
    x = tokens.reshape(b, height // PATCH, width // PATCH, channels // PATCH ** 2, PATCH, PATCH)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, height, width, channels // PATCH ** 2)


def latent_image_ids(h: int, w: int) -> np.ndarray:
    """FluxPipeline._prepare_latent_image_ids of an h x w grid of packed tokens: (h*w, 3)
    float32 rows (0, row, column), in the tokens' order."""
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def apply_transformer(transformer, x, t, text: TextEmbeddings, *, guidance: float):
    """The FLUX transformer's velocity (NHWC, like x) at NHWC latents x and model times t (B,) =
    1000*sigma: the Generator's `apply` once `guidance` is bound (functools.partial).

    Packs x into 2x2 patches with FluxPipeline's image ids and zero text ids; `guidance` (the
    distilled guidance scale, e.g. 3.5) goes in for every sample when the transformer embeds
    guidance (FLUX.1-dev) and is ignored otherwise (FLUX.1-schnell).
    """
    b, h, w, _ = x.shape
    guidance = (jnp.full((b,), guidance, jnp.float32) if transformer.config.guidance_embeds
                else None)
    velocity = transformer(
        pack_latents(x), jnp.asarray(t, jnp.float32) / TIMESTEP_SCALE, text.prompt_embeds,
        text.pooled, jnp.asarray(latent_image_ids(h // PATCH, w // PATCH)),
        jnp.zeros((text.prompt_embeds.shape[1], 3), jnp.float32), guidance)
    return unpack_latents(velocity, h, w)


@functools.cache
def guided_apply(guidance: float):
    """apply_transformer with `guidance` bound, one function object per value (the rollout's
    velocity function is a static jit argument: the same object reuses the compilation)."""
    return functools.partial(apply_transformer, guidance=float(guidance))


def latent_shape(pipeline: FluxPipeline, height=None, width=None, latents=None) -> tuple:
    """(H/8, W/8, C) of `height` x `width` images (default 1024 x 1024, as FluxPipeline), or of
    the given NHWC initial `latents` after checking them against height and width."""
    factor = pipeline.vae_scale_factor
    channels = pipeline.transformer.config.in_channels // PATCH ** 2
    if latents is not None:
        if latents.ndim != 4 or latents.shape[-1] != channels:
            raise ValueError(f"latents must be NHWC (B, H/{factor}, W/{factor}, {channels}), "
                             f"got shape {latents.shape}")
        size = (latents.shape[1] * factor, latents.shape[2] * factor)
        if (height or size[0], width or size[1]) != size:
            raise ValueError(f"latents of shape {latents.shape} are {size[0]}x{size[1]} px, "
                             f"not the requested {height}x{width}")
        height, width = size
    height = height or DEFAULT_SAMPLE_SIZE * factor
    width = width or DEFAULT_SAMPLE_SIZE * factor
    multiple = factor * PATCH
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
    return height // factor, width // factor, channels


def _shifted_sigmas(num_steps: int, *, mu: float) -> np.ndarray:
    return dynamic_shift_schedule(num_steps, mu=mu)[0]


def schedule_mu(scheduler: SchedulerConfig, image_tokens: int) -> float:
    """The log-shift for `image_tokens` packed tokens under the scheduler's settings."""
    return resolution_mu(image_tokens, base_tokens=scheduler.base_image_seq_len,
                         max_tokens=scheduler.max_image_seq_len,
                         base_shift=scheduler.base_shift, max_shift=scheduler.max_shift)


def schedule(pipeline: FluxPipeline, height=None, width=None):
    """sigmas(num_steps) -> float32 (num_steps + 1,) from 1 to 0: the schedule FluxPipeline
    samples `height` x `width` images along (shifted by their packed token count)."""
    h, w, _ = latent_shape(pipeline, height, width)
    tokens = (h // PATCH) * (w // PATCH)
    return functools.partial(_shifted_sigmas, mu=schedule_mu(pipeline.scheduler, tokens))


def sample_latents(pipeline: FluxPipeline, prompts, *, steps: int, guidance: float, key,
                   kind: str = "ode", noise_level: float = 0.7, height=None, width=None,
                   latents=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> jax.Array:
    """Final latents (B, H/8, W/8, 16) float32 from initial noise `latents` (NHWC; drawn from
    `key` when None) along the pipeline's schedule for this size, each step of `kind`
    (SAMPLERS; "ode" is FluxPipeline's Euler step)."""
    if kind not in SAMPLERS:
        raise ValueError(f"sampler {kind!r} not one of {SAMPLERS}")
    prompts = _as_list(prompts, "prompts")
    shape = latent_shape(pipeline, height, width, latents)
    if latents is not None and latents.shape[0] != len(prompts):
        raise ValueError(f"{latents.shape[0]} initial latents for {len(prompts)} prompts")
    text = encode_prompt(pipeline, prompts, max_sequence_length)
    latent_key, noise_key = jax.random.split(key)
    if latents is None:
        latents = jax.random.normal(latent_key, (len(prompts), *shape), jnp.float32)
    sigmas = schedule(pipeline, shape[0] * pipeline.vae_scale_factor,
                      shape[1] * pipeline.vae_scale_factor)(steps)
    graphdef, state = nnx.split(pipeline.transformer)
    out = rollout(nnx_velocity(graphdef, guided_apply(guidance)), (state,), jnp.asarray(latents),
                  text, sigmas, key=noise_key, kind=kind, noise_level=noise_level, records=())
    return out.final_latents


def decode(pipeline: FluxPipeline, latents) -> jax.Array:
    """Jitted float32 NHWC images in [0, 1] of the pipeline's VAE (families/vae_images.py)."""
    return vae_images.decode(pipeline.vae, latents)


def sample(pipeline: FluxPipeline, prompts, *, steps: int = 28, guidance: float = 3.5, seed=None,
           key=None, kind: str = "ode", noise_level: float = 0.7, height=None, width=None,
           latents=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> np.ndarray:
    """uint8 NHWC images (B, height, width, 3), one per prompt (FluxPipeline's defaults: 28
    steps, guidance 3.5, 1024 x 1024).

    Give exactly one of `seed` (int) or `key` (a jax PRNG key); it draws the initial latents
    (unless `latents` is given) and the sde / cps noise. `guidance` is FLUX.1-dev's distilled
    guidance, an input to the model: one forward per step, no negative prompt.
    """
    if (seed is None) == (key is None):
        raise ValueError("give exactly one of seed or key")
    key = jax.random.key(seed) if key is None else key
    final = sample_latents(pipeline, prompts, steps=steps, guidance=guidance, key=key, kind=kind,
                           noise_level=noise_level, height=height, width=width, latents=latents,
                           max_sequence_length=max_sequence_length)
    return to_uint8(decode(pipeline, final))
