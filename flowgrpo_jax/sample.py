"""Samples images from a converted SD3 / SD3.5 or FLUX.1 pipeline folder and writes a PNG.

    python -m flowgrpo_jax.sample --model sd35m-flax --prompt "a red cube" --out cube.png \
        --steps 40 --guidance 4.5 --height 512 --width 512

The folder's model_index.json names the pipeline (StableDiffusion3Pipeline or FluxPipeline);
steps, guidance and T5 length default to that pipeline's diffusers defaults. For SD3 --guidance
is the classifier-free guidance scale, for FLUX.1-dev the distilled guidance the model takes
(no negative prompt). Several images (--num_images) go into one PNG as a grid. Convert a
diffusers download first with tools/convert_weights.py.
"""
import argparse
import importlib
import json
import os
import sys
import time
from typing import NamedTuple

import jax.numpy as jnp
from PIL import Image

from flowgrpo_jax import compile_cache
from flowgrpo_jax.convert import hub
from flowgrpo_jax.families import pipeline_folder
from flowgrpo_jax.logging_utils import image_grid
from flowgrpo_jax.sampling.rollout import SAMPLERS

DTYPES = ("bfloat16", "float32")


class PipelineKind(NamedTuple):
    """How to sample one diffusers pipeline class: its family's modules and defaults."""

    loading: str  # module with load_pipeline
    pipeline: str  # module with sample
    steps: int
    guidance: float
    max_sequence_length: int
    negative_prompt: bool  # whether sample takes one


# model_index.json `_class_name` -> how to sample it.
PIPELINES = {
    "StableDiffusion3Pipeline": PipelineKind("flowgrpo_jax.families.sd3.loading",
                                             "flowgrpo_jax.families.sd3.pipeline", 40, 4.5, 256, True),
    "FluxPipeline": PipelineKind("flowgrpo_jax.families.flux.loading",
                                 "flowgrpo_jax.families.flux.pipeline", 28, 3.5, 512, False),
}


def pipeline_kind(path: str) -> PipelineKind:
    """The PipelineKind of a converted pipeline folder (or cached Hub id), from the
    `_class_name` of its model_index.json; OSError / ValueError in one line otherwise."""
    index_path = pipeline_folder.index_file(hub.local_path(path))
    with open(index_path) as f:
        try:
            class_name = json.load(f).get("_class_name")
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{index_path}: not a JSON object") from None
    if class_name not in PIPELINES:
        raise ValueError(f"{index_path}: pipeline {class_name!r} not supported; expected one of "
                         f"{sorted(PIPELINES)}")
    return PIPELINES[class_name]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="converted pipeline folder (SD3 / SD3.5 or FLUX.1)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--negative_prompt", default="", help="SD3 only")
    parser.add_argument("--steps", type=int, default=None, help="default: 40 (SD3), 28 (FLUX)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="SD3: the CFG scale, <= 1 turns CFG off (default 4.5); FLUX.1-dev: "
                             "the distilled guidance (default 3.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", choices=SAMPLERS, default="ode", help="the sampler")
    parser.add_argument("--noise_level", type=float, default=0.7, help="for sde / cps")
    parser.add_argument("--height", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num_images", type=int, default=1)
    parser.add_argument("--max_sequence_length", type=int, default=None,
                        help="T5 tokens; default: 256 (SD3), 512 (FLUX)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="parameter and compute dtype")
    parser.add_argument("--compilation_cache", default="",
                        help="folder of JAX's persistent compilation cache (default: "
                             "JAX_COMPILATION_CACHE_DIR, else ~/.cache/flowgrpo_jax/jax_compilation)")
    parser.add_argument("--no_compilation_cache", action="store_true",
                        help="compile everything anew, caching nothing")
    args = parser.parse_args(argv)
    if args.num_images < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--num_images and --steps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    compile_cache.setup(not args.no_compilation_cache, args.compilation_cache)
    try:
        kind = pipeline_kind(args.model)
    except (OSError, ValueError) as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 1
    if args.negative_prompt and not kind.negative_prompt:
        print("error: --negative_prompt: FLUX.1 takes none (its guidance is distilled, an input "
              "of the model)", file=sys.stderr)
        return 1
    try:
        pipeline = importlib.import_module(kind.loading).load_pipeline(
            args.model, dtype=getattr(jnp, args.dtype))
    except (OSError, ValueError) as e:  # missing files; damaged, wrong or unsupported components
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 1
    options = dict(steps=args.steps or kind.steps,
                   guidance=kind.guidance if args.guidance is None else args.guidance,
                   max_sequence_length=args.max_sequence_length or kind.max_sequence_length)
    if kind.negative_prompt:
        options["negative_prompt"] = args.negative_prompt
    start = time.perf_counter()
    try:
        images = importlib.import_module(kind.pipeline).sample(
            pipeline, [args.prompt] * args.num_images, seed=args.seed, kind=args.kind,
            noise_level=args.noise_level, height=args.height, width=args.width, **options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Image.fromarray(images[0] if len(images) == 1 else image_grid(images)).save(args.out)
    print(f"wrote {args.out}: {len(images)} image(s) of {images.shape[2]}x{images.shape[1]} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
