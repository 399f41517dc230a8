"""The toy family's `FAMILY`: its generator (the MMDiT, the toy text encoder, latents as
images) and its score (the package's docstring describes both)."""
import jax
import jax.numpy as jnp

from flowgrpo_jax.config import ConfigError
from flowgrpo_jax.families.toy import checker
from flowgrpo_jax.families.toy import model as toy_model
from flowgrpo_jax.families.toy.text import Tokenizer
from flowgrpo_jax.generator import Family, Generator
from flowgrpo_jax.models import mmdit


def apply(transformer, x, t, text):
    """The velocity at x; `text` is the encoder's (states, pooled)."""
    return toy_model.velocity_from_x0(transformer, x, t, *text)


def latents_to_images(latents) -> jax.Array:
    """Pure: latents in [-1, 1] (clipped) -> uint8 images."""
    latents = jnp.clip(jnp.asarray(latents, jnp.float32), -1.0, 1.0)
    return jnp.round((latents + 1.0) * 127.5).astype(jnp.uint8)


# What the model computes in (`model.dtype`); its parameters stay float32 either way.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build(model_config, *, remat: str = "none", place=None, abstract: bool = False) -> Generator:
    """The toy model in `model_config.path` (see generator.Family.build), computing in
    `model_config.dtype` ("float32", the default, or "bfloat16"); `place` is not needed: the
    model is small enough to be read whole and placed by the trainer."""
    del place
    path = model_config.get("path") or toy_model.SHIPPED
    name = model_config.get("dtype", "float32")
    if name not in DTYPES:
        raise ConfigError(f"config.model.dtype={name!r}: must be one of {sorted(DTYPES)}")
    load = toy_model.abstract if abstract else toy_model.load
    model = load(path, remat, DTYPES[name])
    tokenizer = Tokenizer(max_length=model.config.max_length)
    length = model.config.max_length
    size = model.config.image_size
    return Generator(
        model=model.transformer, apply=apply, encoder=model.text_encoder,
        tokenize=lambda prompts: tokenizer.encode(list(prompts)),
        encode_tokens=lambda text_encoder, tokens: text_encoder(*tokens),
        decoder=None, decode_latents=lambda _, latents: latents_to_images(latents),
        token_shapes=(jax.ShapeDtypeStruct((length,), jnp.int32),
                      jax.ShapeDtypeStruct((length,), jnp.bool_)),
        latent_shape=(size, size, 3), shift=model.config.shift)


def score(images, prompts, metadata) -> dict:
    """The checker's strict, partial and exact scores of each image against its metadata."""
    del prompts
    return checker.score_batch(images, metadata)


FAMILY = Family(build=build, trainable=mmdit.TRAINABLE, lora_targets=mmdit.JOINT_ATTENTION,
                reward_plugins=("flowgrpo_jax.families.toy.reward",), score=score)
