"""Writes a full-size diffusers component folder of random weights, for memory and speed tests.

    python tools/random_checkpoint.py --component transformer \
        --config flowgrpo_jax/families/sd3/sd35m/transformer.json --dst /tmp/sd35m-random/transformer

The folder is what diffusers' save_pretrained writes (config.json and
diffusion_pytorch_model.safetensors with diffusers' key names and shapes), with values drawn
from N(0, 0.02) in --dtype. Names and shapes come from the diffusers model built on torch's
meta device, which allocates nothing; each tensor is drawn, written and dropped before the
next, so a 5 GB checkpoint needs about one tensor of memory. A test and benchmark tool: it
needs the test extra (torch, diffusers); the library and the converter never import torch.
"""
import argparse
import json
import math
import os
import sys

import ml_dtypes
import numpy as np

from flowgrpo_jax.convert.core import LazyTensor
from flowgrpo_jax.convert.safetensors_io import write_safetensors

# --component -> the diffusers class whose layout is written.
CLASSES = {"transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL"}
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
STD = 0.02
DRAW_CHUNK = 1 << 24  # values drawn at once, in float32, before the cast to --dtype


def meta_model(component: str, config: dict):
    """The diffusers model of `component` with `config`, on the meta device (no memory)."""
    import diffusers
    import torch

    with torch.device("meta"):
        return getattr(diffusers, CLASSES[component]).from_config(config)


def random_tensor(shape: tuple, dtype, seed: list[int]) -> np.ndarray:
    """N(0, STD) values of `shape` in `dtype`, drawn in chunks so that memory holds the result
    and one float32 chunk."""
    rng = np.random.default_rng(seed)
    out = np.empty(math.prod(shape), dtype)
    for start in range(0, out.size, DRAW_CHUNK):
        chunk = rng.standard_normal(min(DRAW_CHUNK, out.size - start), dtype=np.float32)
        chunk *= STD
        out[start:start + chunk.size] = chunk
    return out.reshape(shape)


def write_random_checkpoint(component: str, config: dict, dst: str, dtype=ml_dtypes.bfloat16,
                            seed: int = 0) -> int:
    """Writes the folder; returns the number of values. Each tensor has its own seed, so a
    tensor's values do not depend on which others are written."""
    model = meta_model(component, config)
    os.makedirs(dst, exist_ok=True)
    model.save_config(dst)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    tensors = {name: LazyTensor(shape, np.dtype(dtype), lambda s=shape, i=i: random_tensor(
        s, dtype, [seed, i])) for i, (name, shape) in enumerate(shapes.items())}
    write_safetensors(os.path.join(dst, WEIGHTS_FILE), tensors)
    return sum(math.prod(shape) for shape in shapes.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--component", required=True, choices=sorted(CLASSES))
    parser.add_argument("--config", required=True, help="the component's diffusers config.json")
    parser.add_argument("--dst", required=True, help="output component folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with open(args.config) as f:
        config = json.load(f)
    count = write_random_checkpoint(args.component, config, args.dst, DTYPES[args.dtype], args.seed)
    print(f"{args.dst}: random {CLASSES[args.component]}, {count:,} values in {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
