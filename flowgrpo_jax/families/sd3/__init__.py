"""The SD3 / SD3.5 family: a converted diffusers pipeline as the trainer's `Generator`.

Its pieces, all in this folder: `loading.py` reads a converted pipeline folder (the MMDiT, the
VAE, CLIP-L, CLIP-G and T5 from `models/`, the tokenizers, the schedule), `pipeline.py`
encodes prompts, samples and decodes as diffusers' StableDiffusion3Pipeline does, `configs.py`
holds the model configs the `configs/sd35m_*.py` files use, and `sd35m/` SD3.5 Medium's
component configs and parameter counts, for shapes without weights. LoRA goes on the joint
attention projections, full fine-tuning trains every MMDiT weight but the position table.
The MMDiT's PyTorch counterpart is diffusers' SD3Transformer2DModel (`TORCH`): trained weights
export to PEFT / diffusers LoRA files and a merged diffusers folder, and adapters import.
"""
import functools
import os

import jax
import jax.numpy as jnp

from flowgrpo_jax.config import ConfigError
from flowgrpo_jax.families.sd3.loading import abstract_pipeline, load_pipeline
from flowgrpo_jax.families.sd3.pipeline import (PromptTokens, apply_transformer,
                                                latent_shape, text_embeddings, tokenize)
from flowgrpo_jax.families.vae_images import decoded_uint8
from flowgrpo_jax.generator import Family, Generator, TorchCounterpart
from flowgrpo_jax.models import attention, mmdit, mmdit_table
from flowgrpo_jax.models.components import resolve_component_dir

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
# The role (generator.ROLES) each pipeline model plays, for the trainer's placement.
_ROLES = {"transformer": "model", "vae": "decoder"}


def _check(model_config) -> None:
    dtype, impl = model_config.get("dtype", "bfloat16"), model_config.get("attention", "auto")
    if dtype not in DTYPES:
        raise ConfigError(f"config.model.dtype={dtype!r}: must be one of {sorted(DTYPES)}")
    if impl not in attention.IMPLEMENTATIONS:
        raise ConfigError(f"config.model.attention={impl!r}: must be one of "
                          f"{attention.IMPLEMENTATIONS}")
    if not isinstance(model_config.get("scan_layers", True), bool):
        raise ConfigError(f"config.model.scan_layers={model_config.scan_layers!r}: must be "
                          f"True or False")


def build(model_config, *, remat: str = "none", place=None, abstract: bool = False) -> Generator:
    """The pipeline in `model_config.path` as a Generator (see generator.Family.build).

    model_config: `path` (a converted pipeline folder), optional `dtype` ("bfloat16", or
    "float32"), `resolution` (512 px, square), `max_sequence_length` (T5 tokens, 128),
    `attention` (models/attention.py, "auto") and `scan_layers` (the transformer's blocks and
    the text encoders' layers as scans over stacked params, models/layer_stack.py; True).
    Abstract without a folder at `path`: SD3.5 Medium's shapes.
    """
    _check(model_config)
    dtype = DTYPES[model_config.get("dtype", "bfloat16")]
    options = {"remat": remat, "attention_impl": model_config.get("attention", "auto"),
               "scan_layers": model_config.get("scan_layers", True)}
    if abstract:
        folder = model_config.path if os.path.isdir(model_config.path) else None
        pipeline = abstract_pipeline(folder, dtype=dtype, options=options)
    else:
        shardings = None if place is None else (
            lambda name, state: place(_ROLES.get(name, "encoder"), state))
        pipeline = load_pipeline(model_config.path, dtype=dtype, shardings=shardings, options=options)
    length = model_config.get("max_sequence_length", 128)
    resolution = model_config.get("resolution", 512)
    clip_length = (pipeline.tokenizer.model_max_length if pipeline.tokenizer is not None
                   else pipeline.text_encoder.config.max_position_embeddings)
    ids = lambda n: jax.ShapeDtypeStruct((n,), jnp.int32)
    token_shapes = PromptTokens(ids(clip_length), ids(clip_length),
                                ids(length) if pipeline.text_encoder_3 is not None else None)
    return Generator(
        model=pipeline.transformer, apply=apply_transformer,
        encoder=(pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3),
        tokenize=None if abstract else functools.partial(tokenize, pipeline, max_sequence_length=length),
        encode_tokens=functools.partial(text_embeddings, t5_length=length,
                                        joint_dim=pipeline.transformer.config.joint_attention_dim),
        decoder=pipeline.vae, decode_latents=decoded_uint8, token_shapes=token_shapes,
        latent_shape=tuple(latent_shape(pipeline, resolution, resolution, None)),
        shift=pipeline.scheduler.shift)


# The MMDiT is diffusers' SD3Transformer2DModel: its key table names its weights both ways.
TORCH = TorchCounterpart(rules=mmdit_table.RULES, component="transformer",
                         folder=lambda model_config: resolve_component_dir(model_config.path,
                                                                           "transformer"))
FAMILY = Family(build=build, trainable=mmdit.TRAINABLE, lora_targets=mmdit.JOINT_ATTENTION,
                torch=TORCH)
