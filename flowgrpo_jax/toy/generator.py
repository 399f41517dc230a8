"""The toy model as a `Generator`: the small MMDiT is the model RL trains, the toy text encoder
is frozen inside `encode` (like SD's encoders), and latents are the image in [-1, 1].

`model_config.path` names a toy model folder (`toy.model.save`); empty or absent means the
shipped base checkpoint, `flowgrpo_jax/toy/checkpoint/`.
"""
import jax
import numpy as np
from flax import nnx

from flowgrpo_jax.generator import Generator
from flowgrpo_jax.pipeline import TextEmbeddings
from flowgrpo_jax.toy.model import SHIPPED, load, velocity_from_x0
from flowgrpo_jax.toy.text import Tokenizer


def apply(transformer, x, t, text: TextEmbeddings):
    return velocity_from_x0(transformer, x, t, text.prompt_embeds, text.pooled)


def to_uint8(latents) -> np.ndarray:
    """Latents in [-1, 1] (clipped) -> uint8 images."""
    latents = np.clip(np.asarray(latents, np.float32), -1.0, 1.0)
    return np.round((latents + 1.0) * 127.5).astype(np.uint8)


def toy_generator(model_config) -> Generator:
    path = model_config.get("path") or SHIPPED
    model = load(path)
    tokenizer = Tokenizer(max_length=model.config.max_length)
    graphdef, state = nnx.split(model.text_encoder)
    encode_ids = jax.jit(lambda ids, mask: nnx.merge(graphdef, state)(ids, mask))

    def encode(prompts) -> TextEmbeddings:
        ids, mask = tokenizer.encode(list(prompts))
        return TextEmbeddings(*encode_ids(ids, mask))

    size = model.config.image_size
    return Generator(model=model.transformer, apply=apply, encode=encode, decode=to_uint8,
                     latent_shape=(size, size, 3), shift=model.config.shift)
