"""The model components the project can convert and load, keyed by their PyTorch class names."""
import functools
import importlib
import os
from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from flowgrpo_jax.convert import hub
from flowgrpo_jax.convert.store import load_params, read_component_info
from flowgrpo_jax.models.abstract import abstract_module


@dataclass(frozen=True)
class Component:
    kind: str                 # our name, stored in the converted folder's metadata
    class_names: tuple        # diffusers `_class_name` / transformers `architectures` entries
    model: str                # "module:Class"; Class(config, rngs=, param_dtype=, dtype=)
    config: str               # "module:function" parsing the source config.json dict
    rules: str                # "module:RULES", the conversion table
    options: tuple = ()       # the run-time settings its config parser takes (remat, attention)

    def _get(self, ref: str):
        module, name = ref.split(":")
        return functools.reduce(getattr, name.split("."), importlib.import_module(module))

    def parse_config(self, config: dict, options=None):
        """The source config.json dict as the model's config; of `options` (a dict of run-time
        settings for every component) it takes those it knows."""
        taken = {k: v for k, v in (options or {}).items() if k in self.options}
        return self._get(self.config)(config, **taken)

    def conversion_rules(self):
        return self._get(self.rules)

    def abstract_model(self, config: dict, param_dtype=jnp.float32, dtype=None,
                       options=None) -> nnx.Module:
        cls, cfg = self._get(self.model), self.parse_config(config, options)
        return abstract_module(lambda rngs: cls(cfg, rngs=rngs, param_dtype=param_dtype,
                                                dtype=dtype or param_dtype))


COMPONENTS = (
    Component("transformer", ("SD3Transformer2DModel",), "flowgrpo_jax.models.mmdit:MMDiT",
              "flowgrpo_jax.models.mmdit:MMDiTConfig.from_diffusers",
              "flowgrpo_jax.models.mmdit_table:RULES", ("remat", "attention_impl", "scan_layers")),
    Component("flux_transformer", ("FluxTransformer2DModel",), "flowgrpo_jax.models.flux:FluxTransformer",
              "flowgrpo_jax.models.flux:FluxConfig.from_diffusers",
              "flowgrpo_jax.models.flux_table:RULES", ("remat", "attention_impl", "scan_layers")),
    Component("vae", ("AutoencoderKL",), "flowgrpo_jax.models.vae:AutoencoderKL",
              "flowgrpo_jax.models.vae:VAEConfig.from_diffusers",
              "flowgrpo_jax.models.vae_table:RULES"),
    Component("clip_text", ("CLIPTextModelWithProjection",),
              "flowgrpo_jax.models.clip_text:CLIPTextModelWithProjection",
              "flowgrpo_jax.models.clip_text:CLIPTextConfig.from_transformers",
              "flowgrpo_jax.models.clip_table:RULES", ("attention_impl", "scan_layers")),
    Component("clip_text_model", ("CLIPTextModel",), "flowgrpo_jax.models.clip_text:CLIPTextModel",
              "flowgrpo_jax.models.clip_text:CLIPTextConfig.from_transformers",
              "flowgrpo_jax.models.clip_table:RULES", ("attention_impl", "scan_layers")),
    Component("t5_encoder", ("T5EncoderModel",), "flowgrpo_jax.models.t5:T5EncoderModel",
              "flowgrpo_jax.models.t5:T5Config.from_transformers",
              "flowgrpo_jax.models.t5_table:RULES", ("attention_impl", "scan_layers")),
)


def source_class_name(config: dict) -> str | None:
    if "_class_name" in config:
        return config["_class_name"]
    architectures = config.get("architectures") or [None]
    return architectures[0]


def component_for_class(class_name: str) -> Component | None:
    return next((c for c in COMPONENTS if class_name in c.class_names), None)


def component_by_kind(kind: str) -> Component:
    for c in COMPONENTS:
        if c.kind == kind:
            return c
    raise ValueError(f"unknown component {kind!r}; known: {[c.kind for c in COMPONENTS]}")


def resolve_component_dir(path: str, subfolder: str) -> str:
    """A converted component folder, or a converted pipeline folder holding `subfolder`; `path`
    may be a Hugging Face Hub id in the local cache (convert/hub.py)."""
    path = hub.local_path(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    if os.path.exists(os.path.join(path, "model_index.json")):
        return os.path.join(path, subfolder)
    return path


def load_component(path: str, kind: str, subfolder: str, dtype=jnp.float32, compute_dtype=None,
                   shardings=None, options=None) -> nnx.Module:
    """A converted `kind` component from its folder or a pipeline folder's `subfolder`.

    `shardings`: None (first local device), a pytree like nnx.state(model, nnx.Param) of
    jax.sharding.Sharding, or a callable from the abstract param state to one (see load_params).
    `options`: run-time settings ({"remat": ..., "attention_impl": ..., "scan_layers": ...}); each component takes
    those its config knows.
    """
    folder = resolve_component_dir(path, subfolder)
    config = read_component_info(folder, kind)
    abstract = component_by_kind(kind).abstract_model(config, dtype, compute_dtype, options)
    return load_params(folder, abstract, dtype=dtype, shardings=shardings)
