"""The on-disk form of a converted component, and loading it into an NNX module.

A converted component folder holds the source `config.json` (unchanged), `flowgrpo_jax.json`
(which component it is and the stored dtype) and `params/`, an orbax checkpoint of the
parameters as a nested dict (list indices as string keys).
"""
import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx

from flowgrpo_jax.convert.core import Path, format_path

META_FILE = "flowgrpo_jax.json"
FORMAT_VERSION = 1


class ComponentLoadError(ValueError):
    """A converted component folder that is missing, of the wrong kind, or damaged."""


def _nest(flat: dict[Path, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = value
    return tree


def _flatten(tree: dict, prefix=()) -> dict[tuple[str, ...], object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def save_component(folder: str, kind: str, config: dict, params: dict[Path, object]) -> None:
    """Writes a converted component; `params` is {Flax path: array}."""
    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(os.path.join(folder, "params")):
        shutil.rmtree(os.path.join(folder, "params"))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(folder, "params"), _nest(params))
    checkpointer.wait_until_finished()
    dtypes = sorted({str(v.dtype) for v in params.values()})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, META_FILE), "w") as f:
        json.dump({"format": FORMAT_VERSION, "kind": kind, "dtypes": dtypes}, f, indent=2)


def read_component_info(folder: str, kind: str) -> dict:
    """Returns the stored config, after checking the folder is a converted `kind` component."""
    meta_path = os.path.join(folder, META_FILE)
    if not os.path.exists(meta_path):
        raise ComponentLoadError(
            f"{folder}: not a converted flowgrpo-jax component (no {META_FILE}); convert the "
            f"diffusers folder with tools/convert_weights.py first")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("kind") != kind:
        raise ComponentLoadError(f"{folder}: holds a {meta.get('kind')!r} component, not {kind!r}")
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def load_params(folder: str, abstract_module: nnx.Module, dtype=None, shardings=None) -> nnx.Module:
    """Fills an abstract module (from nnx.eval_shape) with the stored parameters.

    Arrays are cast to `dtype` (default: the module's parameter dtype) and placed with
    `shardings` (a pytree like nnx.state(module, nnx.Param) of Shardings; default the first
    device), so a large model is never gathered on one device.
    """
    graphdef, abstract_params, rest = nnx.split(abstract_module, nnx.Param, ...)
    flat_abstract = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(abstract_params)}
    params_dir = os.path.join(os.path.abspath(folder), "params")
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = _flatten(checkpointer.metadata(params_dir).item_metadata.tree)
    except Exception as e:  # orbax raises several types for unreadable folders
        raise ComponentLoadError(
            f"{params_dir}: unreadable checkpoint, missing or damaged metadata ({e})") from e
    _check_tree(params_dir, stored, flat_abstract)

    flat_shardings = ({tuple(str(k) for k in p): s for p, s in nnx.to_flat_state(shardings)}
                      if shardings is not None else {})
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = _nest({path: jax.ShapeDtypeStruct(
        var.shape, dtype or var.dtype, sharding=flat_shardings.get(path, default))
        for path, var in flat_abstract.items()})
    try:
        restored = _flatten(checkpointer.restore(params_dir, target))
    except Exception as e:
        raise ComponentLoadError(f"{params_dir}: damaged checkpoint, could not read ({e})") from e
    for path, var in nnx.to_flat_state(abstract_params):
        var.set_value(restored[tuple(str(k) for k in path)])
    return nnx.merge(graphdef, abstract_params, rest)


def _check_tree(where: str, stored: dict, expected: dict) -> None:
    missing = [format_path(p) for p in expected if p not in stored]
    unexpected = [format_path(p) for p in stored if p not in expected]
    misshaped = [f"{format_path(p)}: stored {list(stored[p].shape)}, model expects "
                 f"{list(expected[p].shape)}" for p in expected
                 if p in stored and tuple(stored[p].shape) != tuple(expected[p].shape)]
    problems = [f"  {title}: {items[:20]}" for title, items in (
        ("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if items]
    if problems:
        raise ComponentLoadError(f"{where} does not match the model:\n" + "\n".join(problems))
