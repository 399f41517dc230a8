import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowgrpo_jax.checkpoint import ConfigMismatchError, TrainCheckpointer, check_workdir_config


def test_save_restore_round_trip(tmp_path):
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(7),
             "key": jax.random.key_data(jax.random.key(3))}
    ckpt = TrainCheckpointer(str(tmp_path))
    assert ckpt.latest_step() is None
    ckpt.save(1, state, {"epoch": 1, "tracker": {"a": [1.0, 2.0]}})
    state2 = jax.tree.map(lambda x: x + 1, state)
    ckpt.save(2, state2, {"epoch": 2})
    ckpt.close()

    again = TrainCheckpointer(str(tmp_path))
    assert again.latest_step() == 2
    restored, host = again.restore(2, jax.eval_shape(lambda: state))
    assert host == {"epoch": 2}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_workdir_refuses_another_config(tmp_path):
    config = {"train": {"lr": 3e-4, "beta": 0.04}, "num_epochs": 10}
    check_workdir_config(str(tmp_path), config)
    check_workdir_config(str(tmp_path), {**config, "num_epochs": 20})  # more epochs: fine
    other = {"train": {"lr": 1e-3, "beta": 0.04}, "num_epochs": 10}
    with pytest.raises(ConfigMismatchError, match="train.lr"):
        check_workdir_config(str(tmp_path), other)
    check_workdir_config(str(tmp_path), other, allow_change=True)
