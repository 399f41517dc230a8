"""Trained weights out to PyTorch: a training workdir's LoRA as a PEFT adapter or a diffusers
LoRA file, or its network with the training folded in as a diffusers component folder.

    python -m flowgrpo_jax.export --workdir runs/geneval --out geneval-lora        # PEFT
    python -m flowgrpo_jax.export --workdir runs/geneval --out geneval-lora --format diffusers
    python -m flowgrpo_jax.export --workdir runs/geneval --out geneval-transformer --format merged
        [--checkpoint N] [--no-ema] [--model PATH] [--dtype bfloat16] [--max_shard_size 10GB]

`peft` (default): `adapter_config.json` + `adapter_model.safetensors`, loaded in PyTorch by
`PeftModel.from_pretrained(pipe.transformer, DIR)` (as the PyTorch Flow-GRPO loads its
adapters); target modules, rank, alpha and dtype as trained. `diffusers`:
`DIR/pytorch_lora_weights.safetensors`, loaded by `StableDiffusion3Pipeline.load_lora_weights(DIR)`
(alpha / r folded into B). `merged`: the base network with the LoRA folded in (W + alpha/r * B A),
or a full fine-tune's weights, as a diffusers component folder (`config.json` +
`diffusion_pytorch_model.safetensors`, sharded with an index past --max_shard_size), loaded by
`SD3Transformer2DModel.from_pretrained(DIR)` and converted back by tools/convert_weights.py.

The EMA params (what evaluation uses) of the latest checkpoint by default; `--no-ema` the raw
trained ones, `--checkpoint N` another saved step. The base weights come from the run's
`config.model.path` (or `--model`, if it has moved). Full fine-tuning runs export `merged`
only. Families without a PyTorch counterpart (the toy family) have nothing to export to.
Nothing here imports torch.
"""
import argparse
import json
import math
import os
import shutil
import sys

import jax
import ml_collections
import ml_dtypes
import numpy as np
from flax import nnx

from flowgrpo_jax import checkpoint as ckpt
from flowgrpo_jax import families, lora_io
from flowgrpo_jax.convert.core import LazyTensor, format_path, parse_path, source_keys
from flowgrpo_jax.convert.safetensors_io import (read_header, read_tensor, stored_dtype,
                                                 write_sharded)
from flowgrpo_jax.convert.store import PARAMS_FILE
from flowgrpo_jax.programs import abstract_state, build_trainable_model

FORMATS = ("peft", "diffusers", "merged")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DEFAULT_SHARD = "10GB"  # diffusers' save_pretrained default


class ExportError(ValueError):
    """The workdir cannot be exported as asked; the message says why in one line."""


def parse_size(text: str) -> int:
    """"10GB", "500MB", "20KB" or a number of bytes (decimal units, as save_pretrained's)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def run_config(workdir: str, fmt: str = "merged"):
    """(config, family) of a training workdir, after checking it can export as `fmt`."""
    config = ml_collections.ConfigDict(ckpt.recorded_config(workdir))
    family = families.load(config.model.family)
    if family.torch is None:
        raise ExportError(f"model family {config.model.family!r} has no PyTorch counterpart "
                          f"(its networks were written here, not converted from diffusers): "
                          f"there is no PyTorch model to export its weights to")
    if fmt != "merged" and not config.lora.enabled:
        raise ExportError(f"--format {fmt}: the run fine-tuned every weight (lora.enabled="
                          f"False), it has no LoRA to write; export it with --format merged")
    return config, family


class Trained:
    """A workdir's trained params at one checkpoint, on the (abstract) model the run trained."""

    def __init__(self, workdir: str, *, step: int | None = None, ema: bool = True,
                 model_path: str | None = None):
        config, self.family = run_config(workdir)
        self.config = config
        if model_path:
            config.model.path = model_path
        self.lora = bool(config.lora.enabled)
        try:
            self.base_folder = self.family.torch.folder(config.model)
        except FileNotFoundError:
            self.base_folder = str(config.model.path)
        if not os.path.isfile(os.path.join(self.base_folder, PARAMS_FILE)):
            raise ExportError(f"the run's base model {config.model.path!r} is not a converted "
                              f"folder here (no {os.path.join(self.base_folder, PARAMS_FILE)}); "
                              f"pass --model with where it is now")
        # The model as shapes only: no weights are read to restore the trained params.
        generator = self.family.build(config.model, abstract=True)
        model = build_trainable_model(config, self.family, generator, load_adapter=False)
        self.model = generator.model
        abstract = abstract_state(config, model.trainable, jax.devices("cpu")[0])
        self.ema = bool(ema and config.train.ema)
        self.step, self.params = ckpt.restore_trained_params(workdir, abstract, step=step,
                                                             ema=self.ema)

    def flat_params(self) -> dict:
        """{Flax path: numpy array} of the trained params."""
        return {tuple(path): np.asarray(leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf)
                for path, leaf in nnx.to_flat_state(self.params)}

    def provenance(self) -> dict:
        return {"flowgrpo_jax": json.dumps({"step": self.step, "ema": self.ema,
                                            "model": self.config.model.get("path", "")})}


def export_lora(trained: Trained, out: str, fmt: str, dtype=None) -> str:
    """Writes the run's LoRA as a PEFT adapter folder or a diffusers LoRA file; a summary line."""
    torch = trained.family.torch
    names = lora_io.torch_module_names(trained.model, torch)
    factors = lora_io.torch_factors(trained.params, names, dtype)
    rank, alpha = int(trained.config.lora.rank), float(trained.config.lora.alpha)
    if fmt == "peft":
        lora_io.write_peft(out, factors, rank=rank, alpha=alpha, metadata=trained.provenance())
    else:
        lora_io.write_diffusers(out, factors, rank=rank, alpha=alpha, component=torch.component,
                                metadata=trained.provenance())
    kind = next(iter(factors.values()))[0].dtype
    return (f"{fmt} LoRA: {len(factors)} modules of the {torch.component}, rank {rank}, "
            f"alpha {alpha:g}, {kind}")


def _torch_shape(inverse, shape) -> tuple:
    return tuple(inverse(np.broadcast_to(np.zeros((), np.float32), shape)).shape)


def merged_tensors(trained: Trained, dtype=None) -> dict:
    """{PyTorch state-dict key: LazyTensor} of the base network with the training folded in:
    the base weights from the converted folder, each LoRA'd kernel as kernel + alpha/r * a @ b,
    a full fine-tune's trained params in place of the base ones. Each is read and computed when
    written, one at a time."""
    params_file = os.path.join(trained.base_folder, PARAMS_FILE)
    header, data_start = read_header(params_file)
    keys = source_keys(trained.family.torch.rules, [parse_path(name) for name in header])
    flat = trained.flat_params()
    deltas, replaced = {}, {}
    if trained.lora:
        for path, layer in lora_io.lora_layers(trained.model).items():
            module = parse_path(path)
            deltas[module + ("kernel",)] = (flat[module + ("lora_a",)], flat[module + ("lora_b",)],
                                            layer.lora_scale)
    else:
        replaced = flat
    unknown = [format_path(p) for p in list(deltas) + list(replaced) if format_path(p) not in header]
    if unknown:
        raise ExportError(f"{params_file} lacks trained parameters {unknown[:5]}: --model is not "
                          f"the run's base model")

    def produce(name, path, inverse, out_dtype):
        if path in replaced:
            value = np.asarray(replaced[path], np.float32)
        else:
            value = read_tensor(params_file, header[name], data_start, dtype=np.float32)
            if path in deltas:
                a, b, scale = deltas[path]
                value = value + scale * (a.astype(np.float32) @ b.astype(np.float32))
        return np.ascontiguousarray(inverse(value)).astype(out_dtype)

    tensors = {}
    for name, info in header.items():
        path = parse_path(name)
        key, inverse = keys[path]
        stored = replaced[path].dtype if path in replaced else stored_dtype(info)
        out_dtype = np.dtype(dtype or stored)
        tensors[key] = LazyTensor(_torch_shape(inverse, info["shape"]), out_dtype,
                                  lambda n=name, p=path, i=inverse, d=out_dtype: produce(n, p, i, d))
    return dict(sorted(tensors.items()))


def export_merged(trained: Trained, out: str, dtype=None, max_shard_bytes: int = 10**10) -> str:
    tensors = merged_tensors(trained, dtype)
    torch = trained.family.torch
    files = write_sharded(out, torch.weights_name, tensors, max_shard_bytes,
                          {"format": "pt", **trained.provenance()})
    shutil.copyfile(os.path.join(trained.base_folder, "config.json"), os.path.join(out, "config.json"))
    count = sum(math.prod(t.shape) for t in tensors.values())
    what = "LoRA folded in" if trained.lora else "fully fine-tuned"
    dtypes = sorted({str(t.dtype) for t in tensors.values()})
    return (f"merged {torch.component} ({what}): {count:,} parameters, {dtypes}, "
            f"{len([f for f in files if f.endswith('.safetensors')])} file(s)")


def export(workdir: str, out: str, fmt: str = "peft", *, step: int | None = None,
           ema: bool = True, model_path: str | None = None, dtype=None,
           max_shard_bytes: int = 10**10, overwrite: bool = False) -> str:
    """Writes the workdir's trained weights to `out` in `fmt` (FORMATS); returns a summary."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: one of {FORMATS}")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; give a new --out or --overwrite")
    run_config(workdir, fmt)  # the cheap checks, before anything is restored
    trained = Trained(workdir, step=step, ema=ema, model_path=model_path)
    summary = (export_merged(trained, out, dtype, max_shard_bytes) if fmt == "merged"
               else export_lora(trained, out, fmt, dtype))
    params = "EMA" if trained.ema else "trained"
    note = " (the run kept no EMA: train.ema=False)" if ema and not trained.ema else ""
    return f"wrote {out}: {summary}; {params} params of checkpoint {trained.step} of {workdir}{note}"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--format", choices=FORMATS, default="peft")
    parser.add_argument("--checkpoint", type=int, help="saved step (default: the latest)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="the EMA params (default), or --no-ema the raw trained ones")
    parser.add_argument("--model", help="the run's base model folder, if it has moved")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast (default: as trained / "
                                                                "as the base stores them)")
    parser.add_argument("--max_shard_size", default=DEFAULT_SHARD,
                        help="merged: largest safetensors file before sharding (e.g. 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(export(args.workdir, args.out, args.format, step=args.checkpoint, ema=args.ema,
                     model_path=args.model, dtype=DTYPES.get(args.dtype),
                     max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite))
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
