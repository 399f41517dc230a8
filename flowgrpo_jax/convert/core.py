"""Declarative weight conversion: a table of key patterns checked against the model's shapes.

A `Rule` maps source keys (a regex, matched in full) to a dotted Flax path template (`\\1`
groups allowed; integer parts index lists) with a transform. `plan` checks a whole checkpoint
against the model's `nnx.eval_shape` tree before any data is read, so a wrong checkpoint fails
with the complete list of missing, unexpected and mis-shaped keys and nothing is written.
`lazy_convert` then hands out the converted tensors unread, so a converter can read, transform
and write them one at a time.
"""
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flax import nnx

Path = tuple  # of str and int keys, as in nnx flat states


def identity(x):
    return x


def linear(x):
    """torch Linear weight (out, in) -> Flax kernel (in, out)."""
    return x.T


def conv2d(x):
    """torch Conv2d weight (out, in, kh, kw) -> Flax kernel (kh, kw, in, out)."""
    return x.transpose(2, 3, 1, 0)


@dataclass(frozen=True)
class Rule:
    src: str
    dst: str | None  # None: a known source key that the model does not use
    # A view or reshape of the source tensor: it keeps the dtype and touches no data.
    transform: Callable[[np.ndarray], np.ndarray] = identity
    # A fallback fills its target only when no other key does (a tied copy saved alone).
    fallback: bool = False


class ConversionError(ValueError):
    """The checkpoint does not fit the model; the message lists every offending key."""


def parse_path(dotted: str) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def format_path(path: Path) -> str:
    return ".".join(str(p) for p in path)


def target_shapes(module_or_state) -> dict[Path, tuple[int, ...]]:
    """Flat {path: shape} of a module's (typically abstract, from nnx.eval_shape) parameters."""
    state = (module_or_state if isinstance(module_or_state, nnx.State)
             else nnx.state(module_or_state, nnx.Param))
    return {tuple(path): tuple(var.shape) for path, var in nnx.to_flat_state(state)}


@dataclass(frozen=True)
class LazyTensor:
    """A converted tensor whose shape and dtype are known before its data is read;
    np.asarray(tensor) reads and transforms it."""
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.produce(), dtype=dtype)


def _shapes_of(tensors: Mapping) -> dict[str, tuple[int, ...]]:
    if hasattr(tensors, "shapes"):
        return tensors.shapes()
    return {k: tuple(np.shape(v)) for k, v in tensors.items()}


def _dtypes_of(tensors: Mapping) -> dict[str, np.dtype]:
    if hasattr(tensors, "dtypes"):
        return tensors.dtypes()
    return {k: np.asarray(v).dtype for k, v in tensors.items()}


def _transformed_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
    # A zero-stride stand-in: transforms made of views/reshapes touch no memory.
    return tuple(rule.transform(np.broadcast_to(np.zeros((), np.float32), shape)).shape)


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more


def plan(src_shapes: Mapping[str, tuple], rules: Sequence[Rule],
         target: Mapping[Path, tuple]) -> dict[str, tuple[Path, Rule]]:
    """Maps every source key to (Flax path, rule), or raises ConversionError naming the problems."""
    compiled = [(re.compile(r.src), r) for r in rules]
    mapping, unexpected, misshaped, produced_by = {}, [], [], {}
    hits = []
    for key in sorted(src_shapes):
        hit = next(((m, r) for c, r in compiled if (m := c.fullmatch(key))), None)
        if hit is None:
            unexpected.append(f"{key} {list(src_shapes[key])} (no rule matches)")
        elif hit[1].dst is not None:
            hits.append((key, *hit))
    for key, match, rule in sorted(hits, key=lambda h: h[2].fallback):
        path = parse_path(match.expand(rule.dst))
        if rule.fallback and path in produced_by:
            continue
        if path not in target:
            unexpected.append(f"{key} -> {format_path(path)} (the model has no such parameter)")
            continue
        if path in produced_by:
            unexpected.append(f"{key} -> {format_path(path)} (already filled by {produced_by[path]})")
            continue
        produced_by[path] = key
        shape = _transformed_shape(rule, tuple(src_shapes[key]))
        if shape != tuple(target[path]):
            misshaped.append(f"{key} {list(src_shapes[key])} -> {format_path(path)}: "
                             f"converted shape {list(shape)}, model expects {list(target[path])}")
        mapping[key] = (path, rule)
    missing = [f"{format_path(p)} {list(s)}" for p, s in sorted(target.items(), key=str)
               if p not in produced_by]
    problems = [_listing(t, items) for t, items in (
        ("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
        ("wrong shape", misshaped)) if items]
    if problems:
        raise ConversionError("checkpoint does not match the model:\n" + "\n".join(problems))
    return mapping


def _convert_one(tensors: Mapping, key: str, rule: Rule, dtype) -> np.ndarray:
    array = np.asarray(rule.transform(np.asarray(tensors[key])))
    return np.asarray(array, dtype=dtype or array.dtype, order="C")


def lazy_convert(tensors: Mapping, rules: Sequence[Rule], target: Mapping[Path, tuple],
                 dtype=None) -> dict[Path, LazyTensor]:
    """Checks the whole checkpoint (`plan`), then returns {Flax path: LazyTensor}, each read
    from `tensors` and transformed only when materialised. Keeps each tensor's dtype unless
    `dtype` is given."""
    mapping = plan(_shapes_of(tensors), rules, target)
    dtypes = _dtypes_of(tensors)
    return {path: LazyTensor(tuple(target[path]), np.dtype(dtype or dtypes[key]),
                             functools.partial(_convert_one, tensors, key, rule, dtype))
            for key, (path, rule) in mapping.items()}


def convert(tensors: Mapping, rules: Sequence[Rule], target: Mapping[Path, tuple],
            dtype=None) -> dict[Path, np.ndarray]:
    """Checks, then converts every tensor into memory: for models small enough to hold twice
    (tests, in-memory conversion of a PyTorch model); folders are converted by streaming."""
    return {path: np.asarray(tensor)
            for path, tensor in lazy_convert(tensors, rules, target, dtype).items()}
