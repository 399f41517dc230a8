"""The FLUX.1 family: a converted diffusers FluxPipeline as the trainer's `Generator`.

Its pieces, all in this folder: `loading.py` reads a converted pipeline folder (the FLUX
transformer, the VAE, CLIP-L and T5 from `models/`, the tokenizers, the scheduler's dynamic
shift settings), `pipeline.py` encodes prompts, packs latents, samples and decodes as diffusers'
FluxPipeline does, and `flux1dev/` holds FLUX.1-dev's component configs, for its shapes without
weights (the transformer is models/flux.py, its key table models/flux_table.py).

FLUX.1-dev is guidance-distilled: its guidance scale (`model.guidance`, 3.5) is an input of the
transformer, bound into the generator's `apply`, and each step is one forward (no
classifier-free guidance batch: run the trainer with guidance_scale 1). The sampling schedule
is shifted by the image's packed token count at the configured resolution (the generator's
`schedule`). LoRA goes where the reference Flow-GRPO FLUX run puts it (flux.LORA_TARGETS); full
fine-tuning trains every transformer weight. The transformer's PyTorch counterpart is
diffusers' FluxTransformer2DModel (`TORCH`), for weight export and LoRA import.
"""
import functools
import numbers
import os

import jax
import jax.numpy as jnp

from flowgrpo_jax.config import ConfigError
from flowgrpo_jax.families.flux.loading import abstract_pipeline, load_pipeline
from flowgrpo_jax.families.flux.pipeline import (MAX_SEQUENCE_LENGTH, PATCH, PromptTokens,
                                                 guided_apply, latent_shape, schedule,
                                                 text_embeddings, tokenize)
from flowgrpo_jax.families.vae_images import decoded_uint8
from flowgrpo_jax.generator import Family, Generator, TorchCounterpart
from flowgrpo_jax.models import attention, flux, flux_table
from flowgrpo_jax.models.components import resolve_component_dir

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
# The role (generator.ROLES) each pipeline model plays, for the trainer's placement.
_ROLES = {"transformer": "model", "vae": "decoder"}
_VAE_FACTOR = 8  # FLUX.1's VAE downsamples 8x; images are multiples of 8 * PATCH pixels


def _check(model_config) -> None:
    get = model_config.get
    dtype, impl = get("dtype", "bfloat16"), get("attention", "auto")
    if dtype not in DTYPES:
        raise ConfigError(f"config.model.dtype={dtype!r}: must be one of {sorted(DTYPES)}")
    if impl not in attention.IMPLEMENTATIONS:
        raise ConfigError(f"config.model.attention={impl!r}: must be one of "
                          f"{attention.IMPLEMENTATIONS}")
    if not isinstance(get("scan_layers", True), bool):
        raise ConfigError(f"config.model.scan_layers={get('scan_layers')!r}: must be True or False")
    resolution, multiple = get("resolution", 512), _VAE_FACTOR * PATCH
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 \
            or resolution % multiple:
        raise ConfigError(f"config.model.resolution={resolution!r}: must be a positive multiple "
                          f"of {multiple} (pixels)")
    length = get("max_sequence_length", MAX_SEQUENCE_LENGTH)
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_SEQUENCE_LENGTH:
        raise ConfigError(f"config.model.max_sequence_length={length!r}: must be an integer in "
                          f"1..{MAX_SEQUENCE_LENGTH} (T5 tokens)")
    guidance = get("guidance", 3.5)
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or guidance < 0:
        raise ConfigError(f"config.model.guidance={guidance!r}: must be a number >= 0 (FLUX.1-dev's "
                          f"distilled guidance scale, 3.5)")


def build(model_config, *, remat: str = "none", place=None, abstract: bool = False) -> Generator:
    """The pipeline in `model_config.path` as a Generator (see generator.Family.build).

    model_config: `path` (a converted FluxPipeline folder or a cached Hub id), optional `dtype`
    ("bfloat16", or "float32"), `resolution` (512 px, square), `max_sequence_length` (T5
    tokens, 512), `guidance` (the distilled guidance scale the transformer takes, 3.5; ignored
    by a transformer without guidance embedding), `attention` (models/attention.py, "auto") and
    `scan_layers` (the transformer's blocks and the text encoders' layers as scans over stacked
    params, models/layer_stack.py; True). Abstract without a folder at `path`: FLUX.1-dev's
    shapes.
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
    length = model_config.get("max_sequence_length", MAX_SEQUENCE_LENGTH)
    resolution = model_config.get("resolution", 512)
    clip_length = (pipeline.tokenizer.model_max_length if pipeline.tokenizer is not None
                   else pipeline.text_encoder.config.max_position_embeddings)
    ids = lambda n: jax.ShapeDtypeStruct((n,), jnp.int32)
    return Generator(
        model=pipeline.transformer, apply=guided_apply(model_config.get("guidance", 3.5)),
        encoder=(pipeline.text_encoder, pipeline.text_encoder_2),
        tokenize=None if abstract else functools.partial(tokenize, pipeline, max_sequence_length=length),
        encode_tokens=text_embeddings, decoder=pipeline.vae, decode_latents=decoded_uint8,
        token_shapes=PromptTokens(ids(clip_length), ids(length)),
        latent_shape=latent_shape(pipeline, resolution, resolution),
        shift=pipeline.scheduler.shift, schedule=schedule(pipeline, resolution, resolution))


# The transformer is diffusers' FluxTransformer2DModel: its key table names its weights both ways.
TORCH = TorchCounterpart(rules=flux_table.RULES, component="transformer",
                         folder=lambda model_config: resolve_component_dir(model_config.path,
                                                                           "transformer"))
# No classifier-free guidance: the negative prompt is only what an unconditional branch would
# encode if a config asked for one.
FAMILY = Family(build=build, trainable=flux.TRAINABLE, lora_targets=flux.LORA_TARGETS,
                torch=TORCH, negative_prompt="")
