"""Models built as shapes only with `abstract_module` match `nnx.eval_shape` with `nnx.Rngs`."""
import jax
import pytest
from flax import nnx

from flowgrpo_jax.families.toy.model import SHIPPED, ToyModel, read_config
from flowgrpo_jax.models.abstract import abstract_module
from flowgrpo_jax.models.mmdit import MMDiT, MMDiTConfig
from flowgrpo_jax.models.vae import AutoencoderKL, VAEConfig
from test_mmdit import CASES
from test_vae import tiny_config


def _described(module):
    """The graph and every variable's shape, dtype and sharding metadata."""
    leaves = jax.tree.map(lambda x: (x.shape, x.dtype, getattr(x, "sharding", None)),
                          nnx.state(module))
    return nnx.graphdef(module), leaves


BUILDERS = {
    "mmdit": lambda rngs: MMDiT(MMDiTConfig.from_diffusers(CASES["sd35"][0]), rngs=rngs),
    "vae": lambda rngs: AutoencoderKL(VAEConfig.from_diffusers(tiny_config()), rngs=rngs),
    "toy": lambda rngs: ToyModel(read_config(SHIPPED), rngs=rngs),
}


@pytest.mark.parametrize("name", BUILDERS)
def test_same_graph_shapes_dtypes_and_shardings_as_nnx_eval_shape(name):
    make = BUILDERS[name]
    ours = abstract_module(make)
    assert _described(ours) == _described(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(ours)))
