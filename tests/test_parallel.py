"""Mesh and sharding rules. Checks that need several devices run this file (or the train-step
test file) as a script in a subprocess with 8 fake CPU devices: XLA_FLAGS only takes effect
before JAX starts, which a shared pytest process cannot promise."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from flowgrpo_jax import parallel

TESTS = os.path.dirname(os.path.abspath(__file__))


def _run_on_8_devices(script):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(TESTS), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                            timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


MESH_2x4 = AbstractMesh((2, 4), ("data", "fsdp"))


@pytest.mark.parametrize("names, shape, expected", [
    (("embed", "mlp"), (8, 6), P("fsdp", None)),
    (("embed", "mlp"), (6, 8), P(None, None)),  # 6 rows do not split 4 ways: replicated
    (("mlp", "embed"), (8, 12), P(None, "fsdp")),
    (("embed", "embed"), (8, 8), P("fsdp", None)),  # a mesh axis shards one dim at most
    (("batch", None, None), (16, 3, 5), P(("data", "fsdp"), None, None)),
    (("batch",), (6,), P(None)),  # 6 samples do not split 8 ways
    ((), (4, 4), P(None, None)),  # no names: replicated
    (("vocab", "heads"), (8, 8), P(None, None)),  # names without a rule: replicated
])
def test_mesh_spec_default_rules(names, shape, expected):
    assert parallel.mesh_spec(P(*names), shape, MESH_2x4) == expected


def test_mesh_spec_custom_rules():
    rules = (("mlp", "fsdp"), ("heads", ("data", "fsdp")))
    assert parallel.mesh_spec(P("embed", "mlp"), (8, 8), MESH_2x4, rules) == P(None, "fsdp")
    assert parallel.mesh_spec(P("heads"), (16,), MESH_2x4, rules) == P(("data", "fsdp"))


def test_make_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"use all 1 devices exactly, got data=2"):
        parallel.make_mesh(data=2)
    with pytest.raises(ValueError, match="only one of"):
        parallel.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match=r"got data=-1 fsdp=2 \(-1 takes the devices left, so "
                                         r"fsdp must divide 1\)"):
        parallel.make_mesh(data=-1, fsdp=2)  # the size asked for, not data=0
    mesh = parallel.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}


def check_on_8_devices():
    assert len(jax.devices()) == 8
    assert dict(parallel.make_mesh().shape) == {"data": 8, "fsdp": 1}
    mesh = parallel.make_mesh(data=-1, fsdp=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert dict(parallel.make_mesh(data=4, fsdp=-1).shape) == {"data": 4, "fsdp": 2}
    try:
        parallel.make_mesh(fsdp=3)
        raise AssertionError("fsdp=3 on 8 devices must fail")
    except ValueError as error:
        assert "8 devices" in str(error), error

    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"),
                                 eager_sharding=False)
    layer = nnx.Linear(8, 6, kernel_init=init, rngs=nnx.Rngs(0))
    state = nnx.state(layer)
    shardings = parallel.state_shardings(state, mesh)
    assert shardings["kernel"].get_value().spec == P("fsdp", None)
    assert shardings["bias"].get_value().spec == P(None)
    placed = jax.device_put(state, shardings)
    assert placed["kernel"].get_value().sharding.shard_shape((8, 6)) == (2, 6)
    np.testing.assert_array_equal(placed["kernel"].get_value(), state["kernel"].get_value())

    batch = {"x": jnp.arange(16 * 3.0).reshape(16, 3), "host": np.arange(16.0)}
    sharded = parallel.shard_batch(batch, mesh)
    for name, leaf in sharded.items():
        assert leaf.sharding.spec == P(("data", "fsdp")), name
        assert leaf.addressable_shards[3].data.shape[0] == 2, name
        np.testing.assert_array_equal(leaf, batch[name])
    try:
        parallel.shard_batch({"odd": jnp.ones((12, 2))}, mesh)
        raise AssertionError("12 samples over 8 devices must fail")
    except ValueError as error:
        assert "['odd']" in str(error) and "multiple of 8" in str(error), error
    print("8-device mesh and sharding checks passed")


def test_mesh_and_sharding_on_8_fake_devices():
    _run_on_8_devices(os.path.abspath(__file__))


def test_train_step_on_8_fake_devices_matches_one_device():
    # Prints max |param diff| for meshes 2x4 and 8x1 against one device.
    _run_on_8_devices(os.path.join(TESTS, "test_update.py"))


if __name__ == "__main__":
    check_on_8_devices()
