"""What the RL code needs from a text-to-image flow model, whatever the model is.

A model family (`flowgrpo_jax/families/`) declares itself as a `Family`: how to build its
`Generator`, which variables full fine-tuning trains, where LoRA goes by default, its negative
prompt, and the rewards and scoring it brings. The trainer, the evaluator and the planner see
a model only through these two objects.

A `Generator` holds a velocity network (an NNX module, where LoRA goes) and how to apply it;
frozen text encoders with a host tokenizer and a pure `encode_tokens`; a frozen decoder with a
pure `decode_latents`. The pure functions take the modules as arguments, so the trainer can jit
them over a device mesh with the weights sharded, and the planner can compile them for a TPU
with only the modules' shapes (a generator built with `abstract=True`).
"""
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from flowgrpo_jax.sampling.schedule import flow_match_schedule


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
    shift: float = 3.0  # the flow-match schedule's fixed shift (sampling/schedule.py)
    # sigmas(num_steps) -> float32 (num_steps + 1,) from 1 to 0, for a family whose schedule is
    # not the fixed shift (FLUX: shifted by the image's token count); None: the fixed shift.
    schedule: Callable[[int], np.ndarray] | None = None

    def sigmas(self, num_steps: int) -> np.ndarray:
        """The sampling schedule of `num_steps` steps: sigma_0 = 1, ..., sigma_N = 0."""
        if self.schedule is not None:
            return self.schedule(num_steps)
        return flow_match_schedule(num_steps, shift=self.shift)[0]

    def encode(self, prompts):
        """Text conditioning of `prompts`, jitted on the default device."""
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


@dataclasses.dataclass(frozen=True)
class TorchCounterpart:
    """The PyTorch (diffusers) network a family's velocity network was converted from: what
    exporting trained weights (flowgrpo_jax/export.py) and importing LoRA adapters
    (`lora.init_from`, lora_io.py) need to name its weights as PyTorch does."""

    # The conversion key table (convert.core.Rule list): PyTorch state-dict keys -> the
    # network's parameter paths. Run backwards it names every weight and LoRA module.
    rules: Sequence
    # The network's component name in a diffusers pipeline ("transformer"): the key prefix of
    # diffusers LoRA files and the subfolder of a pipeline.
    component: str
    # folder(model_config) -> the converted folder of the network (config.json, the source's
    # own, and params.safetensors): the base weights of a merged export.
    folder: Callable[[Any], str]
    # The stem of the weight file(s) of a diffusers component folder.
    weights_name: str = "diffusion_pytorch_model"


# What `place(role, abstract_param_state)` is asked for: the roles of a generator's modules.
ROLES = ("model", "encoder", "decoder")


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family's declaration: the one object the core takes from it."""

    # build(model_config, *, remat="none", place=None, abstract=False) -> Generator.
    # remat: the velocity network's per-block policy (flowgrpo_jax/remat.py). place: None (the
    # first local device) or place(role, abstract_param_state) -> pytree of Shardings, role one
    # of ROLES, so each weight is read straight into its sharding. abstract: modules of shapes
    # only (nnx.eval_shape), no weights read and no tokenizer, for compiling without running.
    build: Callable[..., Generator]
    trainable: Any  # nnx filter of the model's variables that full fine-tuning trains
    lora_targets: tuple  # regexes on dotted nnx.Linear paths: where LoRA goes by default
    negative_prompt: str = ""  # the unconditional prompt of classifier-free guidance
    reward_plugins: tuple = ()  # modules whose import registers the family's own rewards
    # score(images, prompts, metadata) -> {name: (N,) array}: how the evaluator scores this
    # family's images unless told to use a reward; None: the config's rewards.
    score: Callable | None = None
    # The PyTorch network the velocity network came from, for weight export and LoRA import;
    # None: the family has no PyTorch counterpart.
    torch: TorchCounterpart | None = None


@functools.cache
def nnx_velocity(graphdef, apply: Callable) -> Callable:
    """velocity_fn(params, x, t, text) = apply(model, x, t, text), the model merged from
    `graphdef` and `params`, a tuple of NNX states ((state,), or (trainable, frozen)).

    One function object per (graphdef, apply): the rollout takes velocity_fn as a static jit
    argument, so repeated calls reuse one compilation."""

    def velocity(params, x, t, text):
        return apply(nnx.merge(graphdef, *params), x, t, text)

    return velocity
