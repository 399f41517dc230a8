"""A Flax module holding a PyTorch model's weights through a conversion table, built as shapes
first: random init would compile a program per weight shape, only for the values to be
replaced."""
import jax.numpy as jnp
from flax import nnx

from flowgrpo_jax.convert.core import convert, target_shapes
from flowgrpo_jax.models.abstract import abstract_module


def converted_module(make, tensors, rules, dtype=None):
    """The module `make(rngs)` builds, its parameters the `tensors` (name -> array) mapped by
    `rules`, cast to `dtype` when given."""
    abstract = abstract_module(make)
    flat = convert(tensors, rules, target_shapes(abstract))
    graphdef, params = nnx.split(abstract, nnx.Param)
    for path, var in nnx.to_flat_state(params):
        var.set_value(jnp.asarray(flat[tuple(path)], dtype))
    return nnx.merge(graphdef, params)
