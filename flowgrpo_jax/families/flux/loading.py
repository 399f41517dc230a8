"""A FLUX.1 pipeline read from a converted folder: its nets, tokenizers and schedule settings."""
import functools
import os
from typing import NamedTuple

import jax.numpy as jnp
from flax import nnx

from flowgrpo_jax.convert import hub
from flowgrpo_jax.families.pipeline_folder import load_tokenizer, read_index, read_json
from flowgrpo_jax.models.components import component_by_kind, load_component, read_component_info

# The component configs of black-forest-labs/FLUX.1-dev, for shapes without weights: one
# folder per model (<name>/config.json) and scheduler.json.
FLUX1_DEV_CONFIGS = os.path.join(os.path.dirname(__file__), "flux1dev")
# model_index.json entry -> component kind, in the order FluxPipeline holds them.
_MODELS = {"transformer": "flux_transformer", "vae": "vae", "text_encoder": "clip_text_model",
           "text_encoder_2": "t5_encoder"}
_REQUIRED = (*_MODELS, "tokenizer", "tokenizer_2", "scheduler")
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# Scheduler options that change the sigmas, with the values this port implements (diffusers'
# defaults, and FLUX.1's settings).
_SCHEDULER_FIXED = {"invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
                    "use_exponential_sigmas": False, "use_beta_sigmas": False,
                    "time_shift_type": "exponential", "stochastic_sampling": False}


class SchedulerConfig(NamedTuple):
    """The flow-match schedule's settings, from the pipeline's scheduler_config.json.

    FLUX shifts its sigmas by the image's packed token count (sampling/schedule.py
    resolution_mu): base_shift at base_image_seq_len tokens, max_shift at max_image_seq_len,
    linear between. `shift`, the fixed shift, is what the config says; dynamic shifting ignores it.
    """

    shift: float
    num_train_timesteps: int
    base_image_seq_len: int
    max_image_seq_len: int
    base_shift: float
    max_shift: float


class FluxPipeline(NamedTuple):
    """Everything needed to sample from a converted FLUX.1 pipeline folder; names follow
    diffusers' FluxPipeline. The tokenizers are None in an abstract pipeline."""

    transformer: nnx.Module  # models/flux.py FluxTransformer
    vae: nnx.Module
    text_encoder: nnx.Module  # CLIP-L/14 (CLIPTextModel: its pooled output)
    text_encoder_2: nnx.Module  # T5-XXL encoder
    tokenizer: object  # CLIPTokenizer
    tokenizer_2: object  # T5TokenizerFast
    scheduler: SchedulerConfig

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def read_scheduler(path: str) -> SchedulerConfig:
    """The settings of a scheduler config file, refusing (in one line) any scheduler but
    FlowMatchEulerDiscreteScheduler with resolution-dependent (dynamic) shifting."""
    config = read_json(path)
    if config.get("_class_name") != SCHEDULER_CLASS:
        raise ValueError(f"{path}: scheduler {config.get('_class_name')!r} not supported; FLUX "
                         f"sampling needs {SCHEDULER_CLASS} with use_dynamic_shifting")
    if not config.get("use_dynamic_shifting"):
        raise ValueError(f"{path}: use_dynamic_shifting is off; FLUX sampling needs the "
                         f"resolution-dependent shift (use_dynamic_shifting true)")
    for key, value in _SCHEDULER_FIXED.items():
        if config.get(key, value) != value:
            raise ValueError(f"{path}: {key}={config[key]!r} not supported; only {value!r}")

    def setting(key, default, kind):  # diffusers reads a null as its default
        value = config.get(key)
        return kind(default if value is None else value)

    return SchedulerConfig(
        shift=setting("shift", 1.0, float),
        num_train_timesteps=setting("num_train_timesteps", 1000, int),
        base_image_seq_len=setting("base_image_seq_len", 256, int),
        max_image_seq_len=setting("max_image_seq_len", 4096, int),
        base_shift=setting("base_shift", 0.5, float),
        max_shift=setting("max_shift", 1.15, float))


def _read_index(path: str) -> dict:
    """model_index.json's entries of a converted pipeline folder, after checking them."""
    return read_index(path, _REQUIRED, "FLUX sampling")


def load_transformer(path: str, dtype=jnp.float32, compute_dtype=None, shardings=None, options=None):
    """The FLUX transformer from a converted component folder or a converted pipeline folder
    (arguments as load_pipeline's; `shardings` a pytree or a callable of the param state)."""
    return load_component(path, "flux_transformer", "transformer", dtype, compute_dtype, shardings,
                          options)


def load_pipeline(path: str, dtype=jnp.float32, compute_dtype=None, shardings=None,
                  options=None) -> FluxPipeline:
    """Loads a FluxPipeline folder converted with tools/convert_weights.py.

    Every model's parameters are cast to `dtype`, activations run in `compute_dtype` (default
    `dtype`). `shardings`, if given, is a callable `(component name, abstract param state) ->
    pytree of jax.sharding.Sharding` (names as in model_index.json: "transformer", "vae",
    "text_encoder", "text_encoder_2"); each parameter is read straight into its sharding.
    Default: everything on the first local device. `options` are run-time settings
    ({"remat": ..., "attention_impl": ..., "scan_layers": ...}) each model takes what it knows
    of. Raises FileNotFoundError / ValueError naming what is missing or unsupported. `path` may
    be a Hugging Face Hub id in the local cache (convert/hub.py).
    """
    path = hub.local_path(path)
    index = _read_index(path)
    # The schedule first: a pipeline this port cannot sample is refused before any weight is read.
    scheduler = read_scheduler(os.path.join(path, "scheduler", "scheduler_config.json"))

    def model(name):
        placement = None if shardings is None else functools.partial(shardings, name)
        return load_component(path, _MODELS[name], name, dtype, compute_dtype, placement, options)

    def tokenizer(name):
        return load_tokenizer(os.path.join(path, name), index[name][1])

    return FluxPipeline(*(model(name) for name in _MODELS), tokenizer=tokenizer("tokenizer"),
                        tokenizer_2=tokenizer("tokenizer_2"), scheduler=scheduler)


def abstract_pipeline(path: str | None = None, dtype=jnp.float32, compute_dtype=None,
                      options=None) -> FluxPipeline:
    """The pipeline's models as shapes only (no weights read) and no tokenizers: from a
    converted pipeline folder's configs, or with `path` None FLUX.1-dev's (flux1dev/)."""
    if path is None:
        configs = {name: read_json(os.path.join(FLUX1_DEV_CONFIGS, name, "config.json"))
                   for name in _MODELS}
        scheduler = os.path.join(FLUX1_DEV_CONFIGS, "scheduler.json")
    else:
        path = hub.local_path(path)
        _read_index(path)
        configs = {name: read_component_info(os.path.join(path, name), _MODELS[name])
                   for name in _MODELS}
        scheduler = os.path.join(path, "scheduler", "scheduler_config.json")
    scheduler = read_scheduler(scheduler)
    models = [component_by_kind(_MODELS[name]).abstract_model(configs[name], dtype, compute_dtype,
                                                               options) for name in _MODELS]
    return FluxPipeline(*models, tokenizer=None, tokenizer_2=None, scheduler=scheduler)
