"""What the RL code needs from a text-to-image flow model, whatever the model is.

The trainer, the evaluator and the benchmarks see a model only through a `Generator`: a
velocity network (an NNX module, where LoRA goes), how to apply it, how to turn prompts into
its text conditioning, and how to turn final latents into images. Each model family builds one
from its own checkpoint (`FAMILIES`), so RL code knows nothing of SD3 internals.
"""
import dataclasses
import importlib
from collections.abc import Callable

from flax import nnx


@dataclasses.dataclass
class Generator:
    model: nnx.Module
    # apply(model, x, t, text) -> velocity; x NHWC latents, t (B,) on the 0..1000 scale.
    apply: Callable
    # encode(list of prompts) -> pytree of arrays with leading batch dim; encode([""]) is the
    # negative prompt used for classifier-free guidance.
    encode: Callable
    # decode(latents (B, H, W, C)) -> uint8 images (B, h, w, 3).
    decode: Callable
    latent_shape: tuple  # (H, W, C) of the latents at the configured resolution
    shift: float = 3.0  # the flow-match schedule's shift


# family name -> "module:function"; function(model_config) -> Generator.
FAMILIES = {
    "sd3": "flowgrpo_jax.pipeline:sd3_generator",
    "toy": "flowgrpo_jax.toy.generator:toy_generator",
}


def load_generator(model_config) -> Generator:
    family = model_config.family
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    module, function = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), function)(model_config)
