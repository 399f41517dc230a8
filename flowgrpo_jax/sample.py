"""Samples images from a converted SD3 / SD3.5 pipeline folder and writes a PNG.

    python -m flowgrpo_jax.sample --model sd35m-flax --prompt "a red cube" --out cube.png \
        --steps 40 --guidance 4.5 --height 512 --width 512

Several images (--num_images) go into one PNG as a grid. Convert a diffusers download first
with tools/convert_weights.py.
"""
import argparse
import os
import sys
import time

from PIL import Image

from flowgrpo_jax import compile_cache
from flowgrpo_jax.families.sd3 import DTYPES
from flowgrpo_jax.families.sd3.loading import load_pipeline
from flowgrpo_jax.families.sd3.pipeline import sample
from flowgrpo_jax.logging_utils import image_grid
from flowgrpo_jax.sampling.rollout import SAMPLERS


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="converted pipeline folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--negative_prompt", default="")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--guidance", type=float, default=4.5, help="CFG scale; <= 1 turns CFG off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", choices=SAMPLERS, default="ode", help="the sampler")
    parser.add_argument("--noise_level", type=float, default=0.7, help="for sde / cps")
    parser.add_argument("--height", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num_images", type=int, default=1)
    parser.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="parameter and compute dtype")
    parser.add_argument("--compilation_cache", default="",
                        help="folder of JAX's persistent compilation cache (default: "
                             "JAX_COMPILATION_CACHE_DIR, else ~/.cache/flowgrpo_jax/jax_compilation)")
    parser.add_argument("--no_compilation_cache", action="store_true",
                        help="compile everything anew, caching nothing")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.steps < 1:
        parser.error("--num_images and --steps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    compile_cache.setup(not args.no_compilation_cache, args.compilation_cache)
    try:
        pipeline = load_pipeline(args.model, dtype=DTYPES[args.dtype])
    except (OSError, ValueError) as e:  # missing files; damaged or wrong components
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        images = sample(pipeline, [args.prompt] * args.num_images, steps=args.steps,
                        guidance=args.guidance, seed=args.seed, kind=args.kind,
                        noise_level=args.noise_level, height=args.height, width=args.width,
                        negative_prompt=args.negative_prompt,
                        max_sequence_length=args.max_sequence_length)
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
