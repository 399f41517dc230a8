"""A model family made for tests/test_families.py, outside the package: an 8 px velocity net of
two linear maps and a text encoder of one embedding table. It shows what a new family is: a
module with a `Family` named FAMILY, and one `families.register` line."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowgrpo_jax.generator import Family, Generator

SIZE, CHANNELS, WIDTH, LENGTH = 8, 3, 16, 8


class TextEncoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(128, WIDTH, rngs=rngs)

    def __call__(self, ids):
        return self.embed(ids).mean(axis=1)


class Velocity(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.text = nnx.Linear(WIDTH, CHANNELS, rngs=rngs)
        self.proj = nnx.Linear(CHANNELS + 1, CHANNELS, rngs=rngs)

    def __call__(self, x, t, text):
        time = jnp.broadcast_to((t / 1000.0)[:, None, None, None], (*x.shape[:3], 1))
        return self.proj(jnp.concatenate([x, time], -1)) + self.text(text)[:, None, None, :]


def tokenize(prompts):
    ids = np.zeros((len(prompts), LENGTH), np.int32)
    for row, prompt in enumerate(prompts):
        codes = [ord(c) % 128 for c in prompt[:LENGTH]]
        ids[row, :len(codes)] = codes
    return ids


def apply(model, x, t, text):
    return model(x, t, text)


def encode(encoder, ids):
    return encoder(ids)


def to_images(_, latents):
    return jnp.round((jnp.clip(latents, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def linear_schedule(num_steps):
    """Its own sampling schedule, unshifted: a family may bring one (Generator.schedule)."""
    return np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)


def build(model_config, *, remat="none", place=None, abstract=False) -> Generator:
    del remat, place
    make = lambda: (Velocity(nnx.Rngs(0)), TextEncoder(nnx.Rngs(1)))
    velocity, encoder = nnx.eval_shape(make) if abstract else make()
    return Generator(model=velocity, apply=apply, encoder=encoder, tokenize=tokenize,
                     encode_tokens=encode, decoder=None, decode_latents=to_images,
                     token_shapes=jax.ShapeDtypeStruct((LENGTH,), jnp.int32),
                     latent_shape=(SIZE, SIZE, CHANNELS), schedule=linear_schedule)


FAMILY = Family(build=build, trainable=nnx.Param, lora_targets=(r"proj",))
