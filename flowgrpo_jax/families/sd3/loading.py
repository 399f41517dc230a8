"""An SD3 / SD3.5 pipeline read from a converted folder: its nets, tokenizers and schedule."""
import functools
import os
from typing import NamedTuple

import jax.numpy as jnp
from flax import nnx

from flowgrpo_jax.convert import hub
from flowgrpo_jax.families.pipeline_folder import load_tokenizer, read_index, read_json
from flowgrpo_jax.models.components import component_by_kind, load_component, read_component_info

# The component configs of stabilityai/stable-diffusion-3.5-medium, for shapes without weights.
SD35M_CONFIGS = os.path.join(os.path.dirname(__file__), "sd35m")
# model_index.json entry -> component kind, in the order SD3Pipeline holds them.
_MODELS = {"transformer": "transformer", "vae": "vae", "text_encoder": "clip_text",
           "text_encoder_2": "clip_text", "text_encoder_3": "t5_encoder"}


def load_transformer(path: str, dtype=jnp.float32, compute_dtype=None, shardings=None):
    """The MMDiT from a converted component folder or a converted pipeline folder.

    `dtype` is the parameter dtype (stored weights are cast to it), `compute_dtype` the
    activation dtype (default: `dtype`). `shardings` places every parameter as it is read, each
    device reading only its shard: None (first local device), a pytree like
    nnx.state(model, nnx.Param) of jax.sharding.Sharding, or a callable from the abstract param
    state to one (e.g. `lambda state: parallel.state_shardings(state, mesh)`).

    Call it as `model(x, timestep, encoder_hidden_states, pooled_projections)` with NHWC
    latents and timesteps on the diffusers 0..1000 scale; it returns the velocity in NHWC.
    """
    return load_component(path, "transformer", "transformer", dtype, compute_dtype, shardings)


class SchedulerConfig(NamedTuple):
    """The flow-match schedule's settings, from the pipeline's scheduler/scheduler_config.json."""

    shift: float
    num_train_timesteps: int


class SD3Pipeline(NamedTuple):
    """Everything needed to sample from a converted SD3 / SD3.5 pipeline folder.

    Names follow diffusers' StableDiffusion3Pipeline. text_encoder_3 and tokenizer_3 (T5) are
    None when the folder has none; prompts are then encoded with zeros in place of T5's states.
    """

    transformer: nnx.Module
    vae: nnx.Module
    text_encoder: nnx.Module  # CLIP-L/14 with projection
    text_encoder_2: nnx.Module  # CLIP-G/14 with projection
    text_encoder_3: nnx.Module | None  # T5-XXL encoder
    tokenizer: object  # transformers tokenizers
    tokenizer_2: object
    tokenizer_3: object | None
    scheduler: SchedulerConfig

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


_REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
             "scheduler")


def _load_scheduler(path: str) -> SchedulerConfig:
    config = read_json(path)
    if config.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"{path}: scheduler {config.get('_class_name')!r} not supported; "
                         f"only FlowMatchEulerDiscreteScheduler")
    if config.get("use_dynamic_shifting"):
        raise ValueError(f"{path}: use_dynamic_shifting (resolution-dependent shift) not supported")
    return SchedulerConfig(float(config.get("shift", 1.0)),
                           int(config.get("num_train_timesteps", 1000)))


def _read_index(path: str) -> dict:
    """model_index.json's entries of a converted pipeline folder, after checking them."""
    index = read_index(path, _REQUIRED, "SD3 sampling")
    if ("text_encoder_3" in index) != ("tokenizer_3" in index):
        raise ValueError(f"{path}: text_encoder_3 and tokenizer_3 must be present together")
    return index


def load_pipeline(path: str, dtype=jnp.float32, compute_dtype=None, shardings=None,
                  options=None) -> SD3Pipeline:
    """Loads a pipeline folder converted with tools/convert_weights.py.

    Every model's parameters are cast to `dtype`, activations run in `compute_dtype` (default
    `dtype`). `shardings`, if given, is a callable `(component name, abstract param state) ->
    pytree of jax.sharding.Sharding` (names as in model_index.json: "transformer", "vae",
    "text_encoder", "text_encoder_2", "text_encoder_3"); each parameter is read straight into
    its sharding. Default: everything on the first local device. `options` are run-time
    settings ({"remat": ..., "attention_impl": ...}) each model takes what it knows of. Raises
    FileNotFoundError / ValueError (ComponentLoadError) naming what is missing. `path` may be a
    Hugging Face Hub id in the local cache (convert/hub.py).
    """
    path = hub.local_path(path)
    index = _read_index(path)

    def model(name):
        if name not in index:
            return None
        placement = None if shardings is None else functools.partial(shardings, name)
        return load_component(path, _MODELS[name], name, dtype, compute_dtype, placement, options)

    def tokenizer(name):
        return load_tokenizer(os.path.join(path, name), index[name][1]) if name in index else None

    return SD3Pipeline(
        *(model(name) for name in _MODELS),
        tokenizer=tokenizer("tokenizer"), tokenizer_2=tokenizer("tokenizer_2"),
        tokenizer_3=tokenizer("tokenizer_3"),
        scheduler=_load_scheduler(os.path.join(path, "scheduler", "scheduler_config.json")))


def abstract_pipeline(path: str | None = None, dtype=jnp.float32, compute_dtype=None,
                      options=None) -> SD3Pipeline:
    """The pipeline's models as shapes only (nnx.eval_shape), no weights read and no tokenizers:
    from a converted pipeline folder's configs, or with `path` None SD3.5 Medium's."""
    if path is None:
        configs = {name: read_json(os.path.join(SD35M_CONFIGS, f"{name}.json")) for name in _MODELS}
        scheduler = os.path.join(SD35M_CONFIGS, "scheduler.json")
    else:
        path = hub.local_path(path)
        index = _read_index(path)
        configs = {name: read_component_info(os.path.join(path, name), _MODELS[name])
                   for name in _MODELS if name in index}
        scheduler = os.path.join(path, "scheduler", "scheduler_config.json")
    models = [component_by_kind(_MODELS[name]).abstract_model(
        configs[name], dtype, compute_dtype, options) if name in configs else None for name in _MODELS]
    return SD3Pipeline(*models, tokenizer=None, tokenizer_2=None, tokenizer_3=None,
                       scheduler=_load_scheduler(scheduler))
