"""The on-disk form of a converted component, and loading it into an NNX module.

A converted component folder holds the source `config.json` (unchanged), `params.safetensors`
(every parameter in the Flax layout, keyed by its dotted Flax path) and `flowgrpo_jax.json`
(which component it is, the stored dtypes and the format version). Parameters are written and
read one tensor at a time, and each is read straight into its sharding, so neither converting
nor loading holds more than about one tensor beyond the result.
"""
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from flowgrpo_jax.convert.core import Path, format_path
from flowgrpo_jax.convert.safetensors_io import (CheckpointError, read_header, read_tensor,
                                                 write_safetensors)

META_FILE = "flowgrpo_jax.json"
PARAMS_FILE = "params.safetensors"
FORMAT_VERSION = 2


class ComponentLoadError(ValueError):
    """A converted component folder that is missing, of the wrong kind, or damaged."""


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    partial = path + ".partial"
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _write_json(value) -> Callable[[str], None]:
    def write(path):
        with open(path, "w") as f:
            json.dump(value, f, indent=2)
    return write


def save_component(folder: str, kind: str, config: dict,
                   params: Mapping[Path, object] | Iterable[tuple[Path, object]]) -> None:
    """Writes a converted component; `params` is {Flax path: array} or (path, array) pairs.

    An array may be lazy (anything with `shape` and `dtype` that np.asarray materialises, as
    convert.core.LazyTensor): the params file's header is written from the shapes first, then
    each array is materialised, written and dropped. Files are written under temporary names
    and renamed, the metadata file last, so an interrupted write leaves no folder that loads.
    """
    params = {format_path(path): array for path, array in dict(params).items()}
    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    meta_path = os.path.join(folder, META_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    _write_atomically(os.path.join(folder, "config.json"), _write_json(config))
    _write_atomically(os.path.join(folder, PARAMS_FILE),
                      lambda path: write_safetensors(path, params))
    # A format-1 folder converted again in place: its orbax params/ folder is no longer read.
    shutil.rmtree(os.path.join(folder, "params"), ignore_errors=True)
    dtypes = sorted({str(np.dtype(array.dtype)) for array in params.values()})
    _write_atomically(meta_path, _write_json(
        {"format": FORMAT_VERSION, "kind": kind, "dtypes": dtypes}))


def read_component_info(folder: str, kind: str) -> dict:
    """Returns the stored config, after checking the folder is a converted `kind` component."""
    meta_path = os.path.join(folder, META_FILE)
    if not os.path.exists(meta_path):
        raise ComponentLoadError(
            f"{folder}: not a converted flowgrpo-jax component (no {META_FILE}); convert the "
            f"diffusers folder with tools/convert_weights.py first")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_VERSION:
        raise ComponentLoadError(
            f"{folder}: converted in flowgrpo-jax format {meta.get('format')}, this version reads "
            f"format {FORMAT_VERSION} ({PARAMS_FILE}); convert it again with "
            f"tools/convert_weights.py")
    if meta.get("kind") != kind:
        raise ComponentLoadError(f"{folder}: holds a {meta.get('kind')!r} component, not {kind!r}")
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def load_params(folder: str, abstract_module: nnx.Module, dtype=None, shardings=None) -> nnx.Module:
    """Fills an abstract module (from nnx.eval_shape) with the stored parameters.

    Each parameter is built with jax.make_array_from_callback: every device reads only its own
    shard from the file, cast to `dtype` (default: the module's parameter dtype), so a model
    larger than one device loads directly sharded and host memory holds one shard at a time
    beyond what the devices keep. `shardings` is None (the first local device), a pytree like
    nnx.state(module, nnx.Param) of jax.sharding.Sharding, or a callable taking that abstract
    state and returning such a pytree.
    """
    graphdef, abstract_params, rest = nnx.split(abstract_module, nnx.Param, ...)
    flat_abstract = {format_path(p): var for p, var in nnx.to_flat_state(abstract_params)}
    params_file = os.path.join(os.path.abspath(folder), PARAMS_FILE)
    if not os.path.exists(params_file):
        raise ComponentLoadError(f"{folder}: no {PARAMS_FILE}; convert the diffusers folder "
                                 f"with tools/convert_weights.py")
    try:
        stored, data_start = read_header(params_file)
    except CheckpointError as e:
        raise ComponentLoadError(f"damaged converted component: {e}") from None
    _check_tree(params_file, {name: info["shape"] for name, info in stored.items()},
                {name: var.shape for name, var in flat_abstract.items()})
    placement = _shardings_by_name(shardings, abstract_params, flat_abstract)

    for name, var in flat_abstract.items():
        target_dtype = np.dtype(dtype or var.dtype)
        read_shard = functools.partial(read_tensor, params_file, stored[name], data_start,
                                       dtype=target_dtype)
        var.set_value(jax.make_array_from_callback(tuple(var.shape), placement[name], read_shard,
                                                   dtype=target_dtype))
    return nnx.merge(graphdef, abstract_params, rest)


def _shardings_by_name(shardings, abstract_params, flat_abstract) -> dict:
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return {name: device for name in flat_abstract}
    if callable(shardings):
        shardings = shardings(abstract_params)
    flat = {format_path(p): s.get_value() if isinstance(s, nnx.Variable) else s
            for p, s in nnx.to_flat_state(shardings)}
    missing = [name for name in flat_abstract if name not in flat]
    if missing:
        raise ValueError(f"shardings give no sharding for {len(missing)} parameters: "
                         f"{missing[:20]}")
    return flat


def _check_tree(where: str, stored: dict, expected: dict) -> None:
    missing = [name for name in expected if name not in stored]
    unexpected = [name for name in stored if name not in expected]
    misshaped = [f"{name}: stored {list(stored[name])}, model expects {list(expected[name])}"
                 for name in expected
                 if name in stored and tuple(stored[name]) != tuple(expected[name])]
    problems = [f"  {title}: {items[:20]}" for title, items in (
        ("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if items]
    if problems:
        raise ComponentLoadError(f"{where} does not match the model:\n" + "\n".join(problems))
