"""SD3 / SD3.5 text-to-image in JAX: prompt encoding, the flow-match rollout, VAE decoding.

The numbers follow diffusers' StableDiffusion3Pipeline: `encode_prompt` builds the same
(B, 77 + T5 length, 4096) context and (B, 2048) pooled vectors, sampling runs the shared
`sampling.rollout` (CFG with the unconditional branch first, as diffusers' chunk order), and
`decode` returns what `output_type="np"` gives. Host work (tokenisation, PNG) stays outside the
jitted functions; models enter them as `nnx.split` state with the graphdef static, so repeated
calls with the same shapes reuse the compiled code.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowgrpo_jax.families import vae_images
from flowgrpo_jax.families.sd3.loading import SD3Pipeline
from flowgrpo_jax.families.vae_images import to_uint8
from flowgrpo_jax.generator import nnx_velocity
from flowgrpo_jax.sampling.rollout import SAMPLERS, rollout
from flowgrpo_jax.sampling.schedule import flow_match_schedule


class PromptTokens(NamedTuple):
    """Token ids (B, length) int32 for each encoder; t5 is None when the pipeline has no T5."""

    clip_l: np.ndarray
    clip_g: np.ndarray
    t5: np.ndarray | None


class TextEmbeddings(NamedTuple):
    """The transformer's text conditioning: context (B, L, joint dim) and pooled (B, P)."""

    prompt_embeds: jax.Array
    pooled: jax.Array


def _as_list(prompts, what: str) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must be a string or a non-empty list of strings, got {prompts!r}")
    return prompts


def tokenize(pipeline: SD3Pipeline, prompts, max_sequence_length: int = 256) -> PromptTokens:
    """Host step: pads / truncates like diffusers (both CLIPs to tokenizer 1's model_max_length,
    77 for SD3; T5 to `max_sequence_length`, 256 in diffusers, 128 in Flow-GRPO)."""
    prompts = _as_list(prompts, "prompts")
    clip_length = pipeline.tokenizer.model_max_length
    for name in ("text_encoder", "text_encoder_2"):
        positions = getattr(pipeline, name).config.max_position_embeddings
        if clip_length > positions:
            raise ValueError(f"tokenizer model_max_length {clip_length} exceeds {name}'s "
                             f"{positions} positions; set model_max_length in tokenizer_config.json")

    def ids(tokenizer, length):
        out = tokenizer(prompts, padding="max_length", max_length=length, truncation=True)
        return np.asarray(out.input_ids, np.int32)

    t5 = (ids(pipeline.tokenizer_3, max_sequence_length) if pipeline.tokenizer_3 is not None
          else None)
    return PromptTokens(ids(pipeline.tokenizer, clip_length), ids(pipeline.tokenizer_2, clip_length), t5)


def text_embeddings(encoders, tokens: PromptTokens, *, t5_length: int, joint_dim: int) -> TextEmbeddings:
    """Pure: the (CLIP-L, CLIP-G, T5 or None) encoders' text conditioning of token ids."""
    clip_l, clip_g, t5 = encoders
    out_l, out_g = clip_l(tokens.clip_l), clip_g(tokens.clip_g)
    # clip_skip None in diffusers: the penultimate layer's states, before the final norm.
    clip_states = jnp.concatenate([out_l.hidden_states[-2], out_g.hidden_states[-2]], axis=-1)
    if t5 is None:  # diffusers' stand-in for an absent T5: zeros of the transformer's width
        t5_states = jnp.zeros((clip_states.shape[0], t5_length, joint_dim), clip_states.dtype)
    else:
        t5_states = t5(tokens.t5).astype(clip_states.dtype)
    width = t5_states.shape[-1]
    if clip_states.shape[-1] > width:
        raise ValueError(f"CLIP widths sum to {clip_states.shape[-1]}, more than the T5 width {width}")
    clip_states = jnp.pad(clip_states, ((0, 0), (0, 0), (0, width - clip_states.shape[-1])))
    pooled = jnp.concatenate([out_l.text_embeds, out_g.text_embeds], axis=-1)
    return TextEmbeddings(jnp.concatenate([clip_states, t5_states], axis=1), pooled)


@functools.partial(jax.jit, static_argnames=("graphdef", "t5_length", "joint_dim"))
def _encode(graphdef, state, tokens: PromptTokens, *, t5_length: int, joint_dim: int) -> TextEmbeddings:
    return text_embeddings(nnx.merge(graphdef, state), tokens, t5_length=t5_length, joint_dim=joint_dim)


def encode_tokens(pipeline: SD3Pipeline, tokens: PromptTokens, max_sequence_length: int = 256) -> TextEmbeddings:
    """Jitted, pure: token ids -> text conditioning (what diffusers' encode_prompt computes)."""
    graphdef, state = nnx.split((pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3))
    return _encode(graphdef, state, tokens, t5_length=max_sequence_length,
                   joint_dim=pipeline.transformer.config.joint_attention_dim)


def encode_prompt(pipeline: SD3Pipeline, prompts, *, negative_prompt="", max_sequence_length: int = 256,
                  do_classifier_free_guidance: bool = True):
    """Returns (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) like diffusers'
    `StableDiffusion3Pipeline.encode_prompt` (clip_skip None, one image per prompt).

    `negative_prompt` is one string for every prompt (the empty string by default) or a list as
    long as `prompts`; the negatives are None without classifier-free guidance.
    """
    prompts = _as_list(prompts, "prompts")
    batch = len(prompts)
    if not do_classifier_free_guidance:
        text = encode_tokens(pipeline, tokenize(pipeline, prompts, max_sequence_length), max_sequence_length)
        return text.prompt_embeds, None, text.pooled, None
    negatives = _as_list(negative_prompt, "negative_prompt")
    negatives = negatives * batch if isinstance(negative_prompt, str) else negatives
    if len(negatives) != batch:
        raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts")
    # Prompts and negatives in one batch: one compiled encode, one device call.
    text = encode_tokens(pipeline, tokenize(pipeline, prompts + negatives, max_sequence_length),
                         max_sequence_length)
    return (text.prompt_embeds[:batch], text.prompt_embeds[batch:], text.pooled[:batch],
            text.pooled[batch:])


def apply_transformer(transformer, x, t, text: TextEmbeddings):
    """The MMDiT's velocity at NHWC latents x and model times t (B,) = 1000*sigma."""
    return transformer(x, t, text.prompt_embeds, text.pooled)


def latent_shape(pipeline: SD3Pipeline, height, width, latents):
    factor = pipeline.vae_scale_factor
    config = pipeline.transformer.config
    if latents is not None:
        if latents.ndim != 4 or latents.shape[-1] != config.in_channels:
            raise ValueError(f"latents must be NHWC (B, H/{factor}, W/{factor}, {config.in_channels}), "
                             f"got shape {latents.shape}")
        size = (latents.shape[1] * factor, latents.shape[2] * factor)
        if (height or size[0], width or size[1]) != size:
            raise ValueError(f"latents of shape {latents.shape} are {size[0]}x{size[1]} px, "
                             f"not the requested {height}x{width}")
        return latents.shape[1:]
    # diffusers' default size: the transformer's sample_size in latent pixels.
    height = height or config.sample_size * factor
    width = width or config.sample_size * factor
    multiple = factor * config.patch_size
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
    return height // factor, width // factor, config.in_channels


def sample_latents(pipeline: SD3Pipeline, prompts, *, steps: int, guidance: float, key,
                   kind: str = "ode", noise_level: float = 0.7, height=None, width=None,
                   latents=None, negative_prompt="", max_sequence_length: int = 256) -> jax.Array:
    """Final latents (B, H/8, W/8, 16) float32 from initial noise `latents` (drawn from `key`
    when None) along the pipeline's flow-match schedule, each step of `kind` (SAMPLERS). CFG when
    guidance > 1 (as diffusers)."""
    if kind not in SAMPLERS:
        raise ValueError(f"sampler {kind!r} not one of {SAMPLERS}")
    prompts = _as_list(prompts, "prompts")
    shape = latent_shape(pipeline, height, width, latents)
    if latents is not None and latents.shape[0] != len(prompts):
        raise ValueError(f"{latents.shape[0]} initial latents for {len(prompts)} prompts")
    use_cfg = guidance > 1
    embeds, negative_embeds, pooled, negative_pooled = encode_prompt(
        pipeline, prompts, negative_prompt=negative_prompt, max_sequence_length=max_sequence_length,
        do_classifier_free_guidance=use_cfg)
    latent_key, noise_key = jax.random.split(key)
    if latents is None:
        latents = jax.random.normal(latent_key, (len(prompts), *shape), jnp.float32)
    sigmas, _ = flow_match_schedule(steps, shift=pipeline.scheduler.shift,
                                    num_train_timesteps=pipeline.scheduler.num_train_timesteps)
    graphdef, state = nnx.split(pipeline.transformer)
    uncond = TextEmbeddings(negative_embeds, negative_pooled) if use_cfg else None
    out = rollout(nnx_velocity(graphdef, apply_transformer), (state,), jnp.asarray(latents),
                  TextEmbeddings(embeds, pooled), sigmas, key=noise_key, kind=kind, noise_level=noise_level,
                  guidance_scale=guidance, uncond_text=uncond, records=())
    return out.final_latents


def decode(pipeline: SD3Pipeline, latents) -> jax.Array:
    """Jitted float32 NHWC images in [0, 1] of the pipeline's VAE (families/vae_images.py)."""
    return vae_images.decode(pipeline.vae, latents)


def sample(pipeline: SD3Pipeline, prompts, *, steps: int = 40, guidance: float = 4.5, seed=None,
           key=None, kind: str = "ode", noise_level: float = 0.7, height=None, width=None,
           latents=None, negative_prompt="", max_sequence_length: int = 256) -> np.ndarray:
    """uint8 NHWC images (B, height, width, 3), one per prompt.

    Give exactly one of `seed` (int) or `key` (a jax PRNG key); it draws the initial latents
    (unless `latents` is given) and the sde / cps noise. `kind` "ode" is the deterministic
    Euler step, "sde" / "cps" Flow-GRPO's stochastic ones at `noise_level`. height and width
    default to the transformer's sample_size in pixels (1024 for SD3.5-Medium), like diffusers.
    """
    if (seed is None) == (key is None):
        raise ValueError("give exactly one of seed or key")
    key = jax.random.key(seed) if key is None else key
    final = sample_latents(pipeline, prompts, steps=steps, guidance=guidance, key=key, kind=kind,
                           noise_level=noise_level, height=height, width=width, latents=latents,
                           negative_prompt=negative_prompt, max_sequence_length=max_sequence_length)
    return to_uint8(decode(pipeline, final))
