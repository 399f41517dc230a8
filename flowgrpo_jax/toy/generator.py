"""The toy model as a `Generator`: the small MMDiT is the model RL trains, the toy text encoder
is the frozen encoder (like SD's encoders), and latents are the image in [-1, 1] (no decoder).

`model_config.path` names a toy model folder (`toy.model.save`); empty or absent means the
shipped base checkpoint, `flowgrpo_jax/toy/checkpoint/`.
"""
import jax
import jax.numpy as jnp

from flowgrpo_jax.generator import Generator
from flowgrpo_jax.pipeline import TextEmbeddings
from flowgrpo_jax.toy import model as toy_model
from flowgrpo_jax.toy.model import SHIPPED, velocity_from_x0
from flowgrpo_jax.toy.text import Tokenizer


def apply(transformer, x, t, text: TextEmbeddings):
    return velocity_from_x0(transformer, x, t, text.prompt_embeds, text.pooled)


def to_uint8(latents) -> jax.Array:
    """Pure: latents in [-1, 1] (clipped) -> uint8 images."""
    latents = jnp.clip(jnp.asarray(latents, jnp.float32), -1.0, 1.0)
    return jnp.round((latents + 1.0) * 127.5).astype(jnp.uint8)


def toy_generator(model_config, *, remat: str = "none", place=None, abstract: bool = False) -> Generator:
    """The toy model in `model_config.path`; `place` is not needed: the model is small enough
    to be read whole and placed by the trainer."""
    del place
    path = model_config.get("path") or SHIPPED
    model = toy_model.abstract(path, remat) if abstract else toy_model.load(path, remat)
    tokenizer = Tokenizer(max_length=model.config.max_length)

    def tokenize(prompts):
        return tokenizer.encode(list(prompts))

    def encode_tokens(text_encoder, tokens) -> TextEmbeddings:
        return TextEmbeddings(*text_encoder(*tokens))

    length = model.config.max_length
    size = model.config.image_size
    return Generator(
        model=model.transformer, apply=apply, encoder=model.text_encoder, tokenize=tokenize,
        encode_tokens=encode_tokens, decoder=None, decode_latents=lambda _, latents: to_uint8(latents),
        token_shapes=(jax.ShapeDtypeStruct((length,), jnp.int32), jax.ShapeDtypeStruct((length,), jnp.bool_)),
        latent_shape=(size, size, 3), shift=model.config.shift)
