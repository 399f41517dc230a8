"""What the RL code needs from a text-to-image flow model, whatever the model is.

The trainer, the evaluator, the planner and the benchmarks see a model only through a
`Generator`: a velocity network (an NNX module, where LoRA goes) and how to apply it; frozen
text encoders with a host tokenizer and a pure `encode_tokens`; a frozen decoder with a pure
`decode_latents`. The pure functions take the modules as arguments, so the trainer can jit them
over a device mesh with the weights sharded, and the planner can compile them for a TPU with
only the modules' shapes (an abstract generator, `abstract=True`). Each model family builds one
from its own checkpoint (`FAMILIES`), so RL code knows nothing of SD3 internals.
"""
import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx


@dataclasses.dataclass
class Generator:
    model: nnx.Module
    # apply(model, x, t, text) -> velocity; x NHWC latents, t (B,) on the 0..1000 scale.
    apply: Callable
    # The frozen text encoder(s): an NNX module or a tuple of them (None entries allowed).
    encoder: Any
    # tokenize(list of prompts) -> pytree of int arrays (B, ...), on the host; None when abstract.
    tokenize: Callable | None
    # encode_tokens(encoder, tokens) -> text: pytree of arrays with leading batch dim. Pure.
    encode_tokens: Callable
    # The frozen latents-to-images network, or None when the latents are the images.
    decoder: Any
    # decode_latents(decoder, latents (B, H, W, C)) -> uint8 images (B, h, w, 3). Pure.
    decode_latents: Callable
    # One prompt's tokens as jax.ShapeDtypeStructs (no batch dim), the structure of tokenize's.
    token_shapes: Any
    latent_shape: tuple  # (H, W, C) of the latents at the configured resolution
    shift: float = 3.0  # the flow-match schedule's shift

    def encode(self, prompts):
        """Text conditioning of `prompts` (the negative prompt is `encode([""])`), jitted on the
        default device."""
        return self._encode_on_device(self.tokenize(list(prompts)))

    def decode(self, latents):
        """uint8 images of final latents, jitted on the default device."""
        return jax.device_get(self._decode_on_device(latents))

    @functools.cached_property
    def _encode_on_device(self):
        graphdef, state = nnx.split(self.encoder)
        encode = jax.jit(lambda state, tokens: self.encode_tokens(nnx.merge(graphdef, state), tokens))
        return functools.partial(encode, state)

    @functools.cached_property
    def _decode_on_device(self):
        graphdef, state = nnx.split(self.decoder)
        decode = jax.jit(lambda state, latents: self.decode_latents(nnx.merge(graphdef, state), latents))
        return functools.partial(decode, state)


# family name -> "module:function"; function(model_config, *, remat, place, abstract) -> Generator.
FAMILIES = {
    "sd3": "flowgrpo_jax.pipeline:sd3_generator",
    "toy": "flowgrpo_jax.toy.generator:toy_generator",
}
# What `place(role, abstract_param_state)` is asked for: the roles of a generator's modules.
ROLES = ("model", "encoder", "decoder")


def load_generator(model_config, *, remat: str = "none", place: Callable | None = None,
                   abstract: bool = False) -> Generator:
    """The family's Generator from `model_config` (its `family` key names the family).

    remat: the velocity network's per-block remat policy (flowgrpo_jax/remat.py). place: None (the
    first local device) or `place(role, abstract_param_state) -> pytree of Shardings`, role one
    of ROLES, so each weight is read straight into its sharding. abstract: modules of shapes
    only (nnx.eval_shape), no weights read and no tokenizer, for compiling without running.
    """
    family = model_config.family
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    module, function = FAMILIES[family].split(":")
    build = getattr(importlib.import_module(module), function)
    return build(model_config, remat=remat, place=place, abstract=abstract)
