import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowgrpo_jax.checkpoint import (CheckpointError, ConfigMismatchError, TrainCheckpointer,
                                     WorkdirError, check_workdir_config)


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


def _state(scale: float):
    return {"params": {"w": scale * jnp.arange(4096.0).reshape(64, 64)}, "step": jnp.int32(7)}


def _two_steps(workdir):
    """Checkpoints 1 and 2 of a small state in `workdir` -> the abstract state."""
    ckpt = TrainCheckpointer(str(workdir))
    ckpt.save(1, _state(1.0), {"epoch": 1})
    ckpt.save(2, _state(2.0), {"epoch": 2})
    ckpt.close()
    return jax.eval_shape(lambda: _state(1.0))


def _data_file(step_dir):
    """The largest file of the state's arrays (OCDBT data under state/ocdbt.process_0/d/)."""
    return max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(),
               key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    path = _data_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "state/ocdbt.process_0/d/"


def _flip(step_dir):
    """One bit of array data: orbax (0.12) restores it without noticing, the values wrong."""
    path = _data_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return "state/ocdbt.process_0/d/"


def _empty_metadata(step_dir):
    (step_dir / "state" / "_METADATA").write_bytes(b"")
    return "state/_METADATA"


def _garbage_host(step_dir):
    (step_dir / "host" / "metadata").write_text('{"epoch": 2, garbage')
    return "host/metadata"


def _garbage_step_metadata(step_dir):
    (step_dir / "_CHECKPOINT_METADATA").write_text("not json")
    return "_CHECKPOINT_METADATA"


@pytest.mark.parametrize("damage", [_truncate, _flip, _empty_metadata, _garbage_host,
                                    _garbage_step_metadata])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage):
    abstract = _two_steps(tmp_path)
    named = damage(tmp_path / "checkpoints" / "2")
    ckpt = TrainCheckpointer(str(tmp_path))
    step, state, host, damaged = ckpt.restore_latest(abstract)
    assert (step, host) == (1, {"epoch": 1})
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]),
                                  np.asarray(_state(1.0)["params"]["w"]))
    ((bad, problem, moved_to),) = damaged  # one line's worth: the step, the file, the new place
    assert bad == 2 and problem.startswith(named), problem
    assert "\n" not in problem and moved_to == str(tmp_path / "checkpoints_damaged" / "2")
    assert (tmp_path / "checkpoints_damaged" / "2" / "state").is_dir()
    assert ckpt.latest_step() == 1
    ckpt.save(2, _state(3.0), {"epoch": 2})  # the run can write step 2 again
    ckpt.close()


def test_a_step_without_manifest_falls_back_on_orbax_refusing_it(tmp_path):
    abstract = _two_steps(tmp_path)
    step_dir = tmp_path / "checkpoints" / "2"
    (step_dir / "sha256.json").unlink()  # as a checkpoint written before manifests
    _empty_metadata(step_dir)
    step, _, _, ((bad, problem, _),) = TrainCheckpointer(str(tmp_path)).restore_latest(abstract)
    assert (step, bad) == (1, 2) and problem.startswith("restoring it failed: "), problem


def test_no_intact_checkpoint_is_one_error_naming_each_step(tmp_path):
    abstract = _two_steps(tmp_path)
    _flip(tmp_path / "checkpoints" / "2")
    _empty_metadata(tmp_path / "checkpoints" / "1")
    ckpt = TrainCheckpointer(str(tmp_path))
    with pytest.raises(CheckpointError) as error:
        ckpt.restore_latest(abstract)
    message = str(error.value)
    assert "no intact checkpoint" in message and "\n" not in message
    assert "step 2: state/ocdbt.process_0/d/" in message
    assert "step 1: state/_METADATA" in message
    assert ckpt.latest_step() == 2  # nothing moved when nothing can be resumed
    assert TrainCheckpointer(str(tmp_path / "empty")).restore_latest(abstract) is None


def test_a_state_with_nan_or_inf_is_never_saved(tmp_path):
    ckpt = TrainCheckpointer(str(tmp_path))
    ckpt.save(1, _state(1.0), {"epoch": 1})
    for bad in (jnp.nan, jnp.inf):
        state = _state(1.0)
        state["params"]["w"] = state["params"]["w"].at[3, 5].set(bad)
        message = (r"refusing to write checkpoint 2: 1 array\(s\) hold NaN or inf "
                   r"\(first: \[.params.\]")
        with pytest.raises(CheckpointError, match=message):
            ckpt.save(2, state, {"epoch": 2})
    assert ckpt.latest_step() == 1


def test_an_unreadable_workdir_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"train": {"lr": ')  # truncated
    with pytest.raises(WorkdirError, match=r"config.json cannot be read .* restore it, or use "
                                           r"another workdir"):
        check_workdir_config(str(tmp_path), {"train": {"lr": 1.0}})
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(WorkdirError, match="config.json holds a list"):
        check_workdir_config(str(tmp_path), {"train": {"lr": 1.0}})
