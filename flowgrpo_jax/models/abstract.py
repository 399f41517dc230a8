"""Models as shapes only (`nnx.eval_shape`), without the cost of drawing keys from `nnx.Rngs`.

Under `nnx.eval_shape` every key drawn from an `nnx.Rngs` updates its counter, a traced
array, and flax's check of that array's `sharding` makes jax build an error message by walking
the whole trace so far, so the cost grows faster than the model (15.8 s for SD3.5-M's MMDiT
on an AMD EPYC). Keys folded from a counter kept in Python skip that (1.2 s), and the
module's graph, shapes, dtypes and shardings are the same.
"""
from typing import Callable, TypeVar

import jax
from flax import nnx

M = TypeVar("M")


class ParamKeys:
    """Stands in for `nnx.Rngs` while a module is built as shapes only: `params()` gives one
    key folded with a count kept in Python. It serves models that draw only `params` keys at
    construction and keep no `rngs` (every model here)."""

    def __init__(self):
        self._key = jax.random.key(0)
        self._count = 0

    def params(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._key, self._count)


def abstract_module(make: Callable[[ParamKeys], M]) -> M:
    """The module `make(rngs)` builds, as shapes only."""
    return nnx.eval_shape(lambda: make(ParamKeys()))
