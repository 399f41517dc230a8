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


def conv2d_inverse(x):
    """Flax Conv kernel (kh, kw, in, out) -> torch Conv2d weight (out, in, kh, kw)."""
    return x.transpose(3, 2, 0, 1)


# The transform that takes each table transform's output back to the source layout.
INVERSES = {identity: identity, linear: linear, conv2d: conv2d_inverse}


def _split_pattern(pattern: str) -> list:
    """A rule's source regex as literal strings and top-level capture groups' sub-patterns
    [(str, is_group)]; ValueError for a pattern that is not literals and groups."""
    pieces, literal, i = [], "", 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 >= len(pattern) or pattern[i + 1].isalnum():
                raise ValueError(f"pattern {pattern!r}: escape {pattern[i:i + 2]!r} is not a literal")
            literal += pattern[i + 1]
            i += 2
        elif char == "(":
            if pattern.startswith("(?", i):
                raise ValueError(f"pattern {pattern!r}: only plain capture groups at the top level")
            depth, j = 1, i + 1
            while depth:
                if j >= len(pattern):
                    raise ValueError(f"pattern {pattern!r}: unbalanced parentheses")
                if pattern[j] == "\\":
                    j += 1
                elif pattern[j] == "(":
                    if not pattern.startswith("(?", j):
                        raise ValueError(f"pattern {pattern!r}: nested capture groups")
                    depth += 1
                elif pattern[j] == ")":
                    depth -= 1
                j += 1
            pieces += [(literal, False), (pattern[i + 1:j - 1], True)]
            literal, i = "", j
        elif char in ".^$*+?{}[]|)":
            raise ValueError(f"pattern {pattern!r}: {char!r} outside a group is not a literal")
        else:
            literal += char
            i += 1
    return pieces + [(literal, False)]


def _inverse_rule(rule: Rule):
    """(regex over the rule's Flax paths with one named group per source group, the source key
    template) of a rule, or None when the rule's patterns cannot be inverted."""
    try:
        pieces = _split_pattern(rule.src)
    except ValueError:
        return None
    groups = [p for p, is_group in pieces if is_group]
    template, n = "", 0
    for text, is_group in pieces:
        if is_group:
            n += 1
            template += f"\\g<g{n}>"
        else:
            template += text.replace("\\", "\\\\")
    regex, seen, k = "", set(), 0
    for match in re.finditer(r"\\(\d+)", rule.dst):
        number = int(match.group(1))
        if not 1 <= number <= len(groups) or number in seen:
            return None
        seen.add(number)
        regex += re.escape(rule.dst[k:match.start()]) + f"(?P<g{number}>{groups[number - 1]})"
        k = match.end()
    if seen != set(range(1, len(groups) + 1)):
        return None  # a source group the Flax path does not keep: no unique source key
    return re.compile(regex + re.escape(rule.dst[k:])), template


def source_keys(rules: Sequence[Rule], paths) -> dict[Path, tuple[str, Callable]]:
    """The table run backwards: {Flax path: (the source key `plan` maps to it, the transform
    from the Flax layout back to the source's)}, for every path in `paths`.

    Each rule's source regex (literals and capture groups) is read as a template; a candidate
    key counts only if the table itself maps it back to the same path by the same rule, so the
    inverse is exactly what conversion does. ConversionError lists the paths no rule gives."""
    compiled = [(re.compile(r.src), r) for r in rules]
    inverses = [(_inverse_rule(r), r) for r in rules if r.dst is not None and not r.fallback]
    out, missing = {}, []
    for path in paths:
        dotted = format_path(path)
        for inverse, rule in inverses:
            if inverse is None or (m := inverse[0].fullmatch(dotted)) is None:
                continue
            key = m.expand(inverse[1])
            first = next((r for c, r in compiled if c.fullmatch(key)), None)
            if first is rule and parse_path(re.fullmatch(rule.src, key).expand(rule.dst)) == tuple(path):
                if rule.transform not in INVERSES:
                    raise ConversionError(f"{dotted}: the transform of rule {rule.src!r} has no "
                                          f"known inverse")
                out[tuple(path)] = (key, INVERSES[rule.transform])
                break
        else:
            missing.append(dotted)
    if missing:
        raise ConversionError("no rule of the table gives these parameters a source key:\n"
                              + _listing("unmapped", missing))
    return out
