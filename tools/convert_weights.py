"""Converts diffusers / transformers safetensors folders into flowgrpo-jax component folders.

    python tools/convert_weights.py --src stable-diffusion-3.5-medium --dst sd35m-flax
    python tools/convert_weights.py --src sd35m/transformer --dst sd35m-flax/transformer
    python tools/convert_weights.py --src stabilityai/stable-diffusion-3.5-medium --dst sd35m-flax

--src is a component folder (config.json + safetensors, sharded or not) or a pipeline folder
(model_index.json: each component with a Flax port is converted into --dst/<component>/,
tokenizers and the scheduler are copied). Every key is checked against the model's shapes
before anything is written; then tensors are converted and written one at a time (memory holds
about one tensor) into <component>/params.safetensors in the Flax layout. Weights keep their
stored dtype unless --dtype is given. No torch.
"""
import argparse
import sys

import ml_dtypes
import numpy as np

from flowgrpo_jax.convert.core import ConversionError
from flowgrpo_jax.convert.hub import NotCachedError
from flowgrpo_jax.models.conversion import convert_folder
from flowgrpo_jax.convert.safetensors_io import CheckpointError

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="diffusers pipeline or component folder, or a Hub id in the local cache")
    parser.add_argument("--dst", required=True, help="output folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast weights to this dtype (default: keep the stored dtype)")
    args = parser.parse_args(argv)
    try:
        convert_folder(args.src, args.dst, DTYPES.get(args.dtype))
    except (ConversionError, CheckpointError, NotCachedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
