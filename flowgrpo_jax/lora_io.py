"""LoRA adapters in PyTorch's two formats, written from and read into this project's LoRA
(lora.py) without torch:

- PEFT's adapter folder, as `PeftModel.save_pretrained` leaves it (what PyTorch Flow-GRPO runs
  publish): `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules) and
  `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` (r, in) and
  `.lora_B.weight` (out, r); loaded by `PeftModel.from_pretrained(transformer, folder)`.
- diffusers' LoRA file `pytorch_lora_weights.safetensors`, as `save_lora_weights` leaves it:
  keys `<component>.<module>.lora_A.weight` / `.lora_B.weight` (component "transformer" for
  SD3) and the LoraConfig in the header's `__metadata__["lora_adapter_metadata"]`; loaded by
  `StableDiffusion3Pipeline.load_lora_weights(folder)`.

Module names are PyTorch's (`transformer_blocks.0.attn.to_out.0`), taken from the family's
conversion key table run backwards (convert.core.source_keys): no second table. Our layer
computes `x @ kernel + (alpha / r) * (x @ lora_a) @ lora_b` with lora_a (in, r), lora_b (r, out),
PEFT `W x + (alpha / r) * B (A x)` with A (r, in), B (out, r): A = lora_a.T, B = lora_b.T.

Reading checks the adapter against the model before any value is set: every module the config
targets must be in it, none it holds may lie outside them, ranks and shapes must agree; an
`AdapterError` (a ConfigError: the trainer reports it in one line) names the modules at fault.
A scale alpha / r different from the config's is folded into B, so the delta is the adapter's.
"""
import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowgrpo_jax.config import ConfigError
from flowgrpo_jax.convert import hub
from flowgrpo_jax.convert.core import ConversionError, format_path, linear, source_keys
from flowgrpo_jax.convert.safetensors_io import (CheckpointError,
                                                 read_header, read_metadata, read_tensor,
                                                 write_safetensors)
from flowgrpo_jax.lora import LoRALinear

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
_PEFT_PREFIX = "base_model.model."
# <module>.lora_A.weight, with PEFT's in-memory adapter name (".default") allowed.
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[A-Za-z_][\w-]*)?\.weight")


class AdapterError(ConfigError):
    """A LoRA adapter that cannot be read, or does not fit the model; the message names it."""


def _shown(items, limit: int = 6) -> str:
    items = sorted(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def torch_module_names(model: nnx.Module, torch) -> dict[str, str]:
    """{dotted path of each nnx.Linear of `model`: its PyTorch module name}, from the family's
    key table (`torch`, a generator.TorchCounterpart) run backwards."""
    linears = [tuple(path) for path, module in nnx.iter_modules(model)
               if isinstance(module, nnx.Linear)]
    keys = source_keys(torch.rules, [path + ("kernel",) for path in linears])
    names = {}
    for path in linears:
        key, inverse = keys[path + ("kernel",)]
        if not key.endswith(".weight") or inverse is not linear:
            raise ConversionError(f"{format_path(path)}: its kernel maps to {key!r}, not to a "
                                  f"torch Linear's weight")
        names[format_path(path)] = key[: -len(".weight")]
    return names


def lora_layers(model: nnx.Module) -> dict[str, LoRALinear]:
    """{dotted path: layer} of the LoRA layers of `model` (after lora.apply_lora)."""
    return {format_path(tuple(path)): module for path, module in nnx.iter_modules(model)
            if isinstance(module, LoRALinear)}


# --- writing ------------------------------------------------------------------------------


def torch_factors(lora_state, names: dict[str, str], dtype=None) -> dict[str, tuple]:
    """{PyTorch module name: (A (r, in), B (out, r))} of a LoRA state (nnx.state(model,
    nnx.LoRAParam), or the trained params of a checkpoint), cast to `dtype` (default: kept)."""
    flat = {}
    for path, leaf in nnx.to_flat_state(lora_state):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        flat[tuple(path)] = np.asarray(value)
    factors = {}
    for path, value in flat.items():
        if path[-1] != "lora_a":
            continue
        module = format_path(path[:-1])
        a, b = value, flat[path[:-1] + ("lora_b",)]
        cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))
        factors[names[module]] = (cast(np.ascontiguousarray(a.T)), cast(np.ascontiguousarray(b.T)))
    return factors


def _number(value: float):
    return int(value) if float(value).is_integer() else float(value)


def _lora_config(factors: dict, rank: int, alpha: float) -> dict:
    return {"peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": _number(alpha),
            "target_modules": sorted(factors), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": "gaussian", "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def write_peft(folder: str, factors: dict, *, rank: int, alpha: float,
               metadata: dict | None = None) -> list[str]:
    """An adapter folder that `peft.PeftModel.from_pretrained(model, folder)` loads: rank,
    alpha and target modules as trained."""
    os.makedirs(folder, exist_ok=True)
    config = {**_lora_config(factors, rank, alpha), "base_model_name_or_path": None,
              "inference_mode": True, "revision": None}
    with open(os.path.join(folder, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tensors = {}
    for module, (a, b) in sorted(factors.items()):
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = b
    write_safetensors(os.path.join(folder, PEFT_WEIGHTS), tensors,
                      {"format": "pt", **(metadata or {})})
    return [os.path.join(folder, PEFT_CONFIG), os.path.join(folder, PEFT_WEIGHTS)]


def write_diffusers(folder: str, factors: dict, *, rank: int, alpha: float, component: str,
                    metadata: dict | None = None) -> str:
    """`folder`/pytorch_lora_weights.safetensors, the file a diffusers pipeline's
    `load_lora_weights(folder)` loads onto its `component`. The scale alpha / r is folded
    into B and the file says lora_alpha = r, so any loader gives the trained delta, also one
    that ignores the LoraConfig in the header (and assumes alpha = r, diffusers' default)."""
    scale = alpha / rank
    tensors = {}
    for module, (a, b) in sorted(factors.items()):
        tensors[f"{component}.{module}.lora_A.weight"] = a
        tensors[f"{component}.{module}.lora_B.weight"] = (b * scale).astype(b.dtype)
    config = {f"{component}.{k}": v for k, v in _lora_config(factors, rank, rank).items()}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, DIFFUSERS_WEIGHTS)
    write_safetensors(path, tensors, {"format": "pt", **(metadata or {}),
                                      DIFFUSERS_METADATA_KEY: json.dumps(config, sort_keys=True)})
    return path


# --- reading ------------------------------------------------------------------------------


class Adapter:
    """A LoRA adapter on disk: {PyTorch module name: (A, B) read on demand}, its rank and the
    scale (alpha / r, or alpha / sqrt(r) with rsLoRA) of each module."""

    def __init__(self, source: str, format: str, tensors: dict, scales: dict):
        self.source, self.format = source, format
        self._tensors = tensors  # module -> {"A": (file, info, start), "B": ...}
        self.scales = scales  # module -> float
        self.shapes = {m: {w: tuple(t[1]["shape"]) for w, t in ab.items()}
                       for m, ab in tensors.items()}

    @property
    def modules(self) -> list[str]:
        return sorted(self._tensors)

    @property
    def ranks(self) -> dict[str, int]:
        return {m: s["A"][0] for m, s in self.shapes.items()}

    def factor(self, module: str, which: str) -> np.ndarray:
        file, info, start = self._tensors[module][which]
        return read_tensor(file, info, start, dtype=np.float32)


def _fail(source: str, why: str):
    raise AdapterError(f"LoRA adapter {source}: {why}")


def _adapter_files(path: str) -> tuple[str, str, dict | None]:
    """(format, weights file, PEFT config or None) of an adapter folder or file."""
    local = hub.local_path(path)
    if os.path.isfile(local):
        if not local.endswith(".safetensors"):
            _fail(path, "a LoRA file must be .safetensors (PEFT / diffusers save_pretrained "
                        "with safe_serialization)")
        return "diffusers", local, None
    if not os.path.isdir(local):
        _fail(path, "no such file or folder")
    if os.path.exists(os.path.join(local, PEFT_CONFIG)):
        weights = os.path.join(local, PEFT_WEIGHTS)
        if not os.path.exists(weights):
            other = [n for n in os.listdir(local) if n.startswith("adapter_model")]
            _fail(path, f"has {PEFT_CONFIG} but no {PEFT_WEIGHTS}"
                        + (f" (found {other}: re-save it with safe_serialization=True)" if other else ""))
        try:
            with open(os.path.join(local, PEFT_CONFIG)) as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            _fail(path, f"{PEFT_CONFIG} cannot be read ({e})")
        return "peft", weights, config
    if os.path.exists(os.path.join(local, DIFFUSERS_WEIGHTS)):
        return "diffusers", os.path.join(local, DIFFUSERS_WEIGHTS), None
    files = [n for n in os.listdir(local) if n.endswith(".safetensors")]
    if len(files) == 1:
        return "diffusers", os.path.join(local, files[0]), None
    _fail(path, f"neither a PEFT adapter folder ({PEFT_CONFIG} + {PEFT_WEIGHTS}) nor a "
                f"diffusers LoRA ({DIFFUSERS_WEIGHTS}, or one .safetensors file)")


def _check_lora_config(source: str, config: dict) -> None:
    """What of a LoraConfig this LoRA cannot reproduce: refused by name."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        _fail(source, f"peft_type {config.get('peft_type')!r}: only LORA adapters can be read")
    for key, ok in (("use_dora", lambda v: not v), ("fan_in_fan_out", lambda v: not v),
                    ("bias", lambda v: v in (None, "none")),
                    ("modules_to_save", lambda v: not v), ("rank_pattern", lambda v: not v),
                    ("alpha_pattern", lambda v: not v), ("layer_replication", lambda v: not v),
                    ("lora_bias", lambda v: not v), ("target_parameters", lambda v: not v),
                    ("trainable_token_indices", lambda v: not v)):
        if key in config and not ok(config[key]):
            _fail(source, f"{key}={config[key]!r} is not supported (plain LoRA only)")


def read_adapter(path: str, component: str) -> Adapter:
    """A PEFT adapter folder or a diffusers LoRA file / folder (`path` may be a Hugging Face
    Hub id in the local cache) whose LoRA is on the pipeline's `component`."""
    fmt, weights, config = _adapter_files(path)
    try:
        header, start = read_header(weights)
        metadata = read_metadata(weights)
    except CheckpointError as e:
        _fail(path, str(e))
    if config is None and DIFFUSERS_METADATA_KEY in metadata:
        try:
            packed = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        except json.JSONDecodeError as e:
            _fail(path, f"its {DIFFUSERS_METADATA_KEY} is not JSON ({e})")
        config = {k.removeprefix(f"{component}."): v for k, v in packed.items()
                  if k.startswith(f"{component}.")}
    config = config or {}
    _check_lora_config(path, config)

    names = list(header)
    if fmt == "diffusers" and any(n.startswith(f"{component}.") for n in names):
        others = sorted({n.split(".")[0] for n in names if not n.startswith(f"{component}.")})
        if others:
            _fail(path, f"holds LoRA weights for {others} besides {component!r}; only the "
                        f"{component} is trained here")
        names = {n: n[len(component) + 1:] for n in names}
    else:
        names = {n: n.removeprefix(_PEFT_PREFIX) for n in names}
    tensors, alphas, unknown = {}, {}, []
    for key, name in names.items():
        if name.endswith(".alpha") and header[key]["shape"] in ([], [1]):
            alphas[name[: -len(".alpha")]] = key
            continue
        match = _LORA_KEY.fullmatch(name)
        if match is None:
            unknown.append(key)
            continue
        tensors.setdefault(match["module"], {})[match["which"]] = (weights, header[key], start)
    if unknown:
        _fail(path, f"{len(unknown)} key(s) are not LoRA A/B weights: {_shown(unknown)}")
    half = [m for m, ab in tensors.items() if len(ab) != 2]
    if half:
        _fail(path, f"modules with only one of lora_A / lora_B: {_shown(half)}")
    if not tensors:
        _fail(path, "holds no LoRA weights")
    for module, ab in tensors.items():
        a, b = ab["A"][1]["shape"], ab["B"][1]["shape"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            _fail(path, f"{module}: lora_A {a} and lora_B {b} are not (r, in) and (out, r)")

    scales = {}
    for module in tensors:
        r = tensors[module]["A"][1]["shape"][0]
        if config.get("r") and int(config["r"]) != r:
            _fail(path, f"its config says r={config['r']}, but {module}.lora_A has rank {r}")
        if module in alphas:  # kohya-style per-module alpha
            alpha = float(read_tensor(weights, header[alphas[module]], start).reshape(()))
        elif "lora_alpha" in config:
            alpha = float(config["lora_alpha"])
        else:  # PEFT's LoraConfig default; diffusers reads a file without one as alpha = r
            alpha = 8.0 if fmt == "peft" else float(r)
        scales[module] = alpha / (np.sqrt(r) if config.get("use_rslora") else r)
    return Adapter(path, fmt, tensors, scales)


def set_from_adapter(model: nnx.Module, torch, adapter: Adapter, *, where: str) -> None:
    """Sets the LoRA layers of `model` (after apply_lora) to `adapter`'s factors, after
    checking that they fit: AdapterError naming every module that does not (`where` names the
    config key in the message)."""
    layers = lora_layers(model)
    names = torch_module_names(model, torch)
    ours = {names[path]: path for path in layers}
    known = set(names.values())
    held = set(adapter.modules)
    problems = []
    outside = sorted(held - known)
    if outside:
        problems.append(f"{len(outside)} module(s) not in this model: {_shown(outside)}")
    untargeted = sorted((held & known) - set(ours))
    if untargeted:
        problems.append(f"{len(untargeted)} module(s) outside config.lora.targets: "
                        f"{_shown(untargeted)}")
    missing = sorted(set(ours) - held)
    if missing:
        problems.append(f"{len(missing)} targeted module(s) missing from the adapter: "
                        f"{_shown(missing)}")
    rank = next(iter(layers.values())).lora_a.shape[1]
    other_ranks = sorted({r for m, r in adapter.ranks.items() if m in ours and r != rank})
    if other_ranks:
        problems.append(f"rank {other_ranks[0] if len(other_ranks) == 1 else other_ranks}, "
                        f"config.lora.rank is {rank} (set --config.lora.rank to the adapter's)")
    else:
        misshaped = []
        for module in sorted(held & set(ours)):
            layer = layers[ours[module]]
            expected = {"A": (rank, layer.in_features), "B": (layer.out_features, rank)}
            for which in "AB":
                if adapter.shapes[module][which] != expected[which]:
                    misshaped.append(f"{module}.lora_{which} {list(adapter.shapes[module][which])}"
                                     f" (model: {list(expected[which])})")
        if misshaped:
            problems.append(f"{len(misshaped)} wrong shape(s): {_shown(misshaped, 3)}")
    if problems:
        raise AdapterError(f"{where}={adapter.source!r}: the adapter does not fit the model: "
                           + "; ".join(problems))
    for module, path in ours.items():
        layer = layers[path]
        ratio = adapter.scales[module] / layer.lora_scale
        a_dtype, b_dtype = layer.lora_a.get_value().dtype, layer.lora_b.get_value().dtype
        layer.lora_a.set_value(jnp.asarray(adapter.factor(module, "A").T, a_dtype))
        layer.lora_b.set_value(jnp.asarray(adapter.factor(module, "B").T * ratio, b_dtype))


def adapter_targets(model: nnx.Module, torch, adapter: Adapter) -> tuple[str, ...]:
    """LoRA target regexes (lora.apply_lora) putting LoRA exactly on the adapter's modules of
    `model`; AdapterError naming the modules `model` does not have."""
    by_torch = {name: path for path, name in torch_module_names(model, torch).items()}
    outside = [m for m in adapter.modules if m not in by_torch]
    if outside:
        raise AdapterError(f"LoRA adapter {adapter.source!r} does not fit the model: "
                           f"{len(outside)} module(s) not in this model: {_shown(outside)}")
    return tuple(f"^{re.escape(by_torch[m])}$" for m in adapter.modules)
