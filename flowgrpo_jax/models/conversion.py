"""Converts a diffusers component folder, or a whole pipeline folder, into converted folders.

Every key is checked against the model before anything is written; then tensors are read,
transformed and written one at a time, so memory holds about one tensor, not the model.
"""
import json
import math
import os
import shutil

from flowgrpo_jax.convert import hub
from flowgrpo_jax.convert.core import ConversionError, lazy_convert, target_shapes
from flowgrpo_jax.convert.safetensors_io import SafetensorsFolder
from flowgrpo_jax.models.components import component_for_class, source_class_name
from flowgrpo_jax.convert.store import save_component

# Pipeline entries that are data, not weights: copied as they are.
COPIED_PREFIXES = ("tokenizer", "scheduler")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def convert_component(src: str, dst: str, dtype=None, log=print) -> str:
    """Converts one component folder (config.json + safetensors); returns its kind."""
    config = _read_json(os.path.join(src, "config.json"))
    class_name = source_class_name(config)
    component = component_for_class(class_name)
    if component is None:
        raise ConversionError(f"{src}: no converter for class {class_name!r}")
    tensors = SafetensorsFolder(src)
    abstract = component.abstract_model(config)
    params = lazy_convert(tensors, component.conversion_rules(), target_shapes(abstract), dtype)
    save_component(dst, component.kind, config, params)
    count = sum(math.prod(t.shape) for t in params.values())
    dtypes = sorted({str(t.dtype) for t in params.values()})
    log(f"{src} -> {dst}: {component.kind} ({class_name}), {count:,} parameters, {dtypes}")
    return component.kind


def convert_pipeline(src: str, dst: str, dtype=None, log=print) -> list[str]:
    """Converts every loadable component of a diffusers pipeline folder into dst/<name>/."""
    index = _read_json(os.path.join(src, "model_index.json"))
    entries = {name: spec for name, spec in index.items()
               if not name.startswith("_") and isinstance(spec, list) and spec[1] is not None}
    # Check every component's class before converting any, so a bad folder writes nothing.
    to_convert, to_copy, skipped = [], [], []
    for name, (_, class_name) in sorted(entries.items()):
        if not os.path.isdir(os.path.join(src, name)):
            raise ConversionError(f"{src}: model_index.json lists {name!r} but the folder is missing")
        if component_for_class(class_name) is not None:
            to_convert.append(name)
        elif name.startswith(COPIED_PREFIXES):
            to_copy.append(name)
        else:
            skipped.append(f"{name} ({class_name})")
    if not to_convert:
        raise ConversionError(f"{src}: no convertible component in model_index.json")
    os.makedirs(dst, exist_ok=True)
    for name in to_convert:
        convert_component(os.path.join(src, name), os.path.join(dst, name), dtype, log)
    for name in to_copy:
        shutil.copytree(os.path.join(src, name), os.path.join(dst, name), dirs_exist_ok=True)
    # The converted pipeline keeps only what it holds: skipped entries are dropped from the index.
    kept = {k: v for k, v in index.items() if k.startswith("_") or k in to_convert + to_copy}
    with open(os.path.join(dst, "model_index.json"), "w") as f:
        json.dump(kept, f, indent=2)
    if skipped:
        log(f"not converted (no Flax port): {', '.join(skipped)}")
    return to_convert


def convert_folder(src: str, dst: str, dtype=None, log=print) -> list[str]:
    """Converts a pipeline or component folder; `src` may be a Hugging Face Hub model id
    ("owner/name[@revision]") downloaded into the local cache (convert/hub.py)."""
    src = hub.local_path(src)
    if os.path.exists(os.path.join(src, "model_index.json")):
        return convert_pipeline(src, dst, dtype, log)
    if os.path.exists(os.path.join(src, "config.json")):
        return [convert_component(src, dst, dtype, log)]
    raise ConversionError(f"{src}: neither a pipeline folder (model_index.json) nor a component "
                          f"folder (config.json)")
