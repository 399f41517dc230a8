"""The conversion table machinery, the safetensors reader and the converted-folder store.

The sharded-loading check needs 8 devices: its test runs this file as a script in a subprocess
with 8 fake CPU devices (XLA_FLAGS only takes effect before JAX starts)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from flowgrpo_jax.convert import safetensors_io
from flowgrpo_jax.convert.core import (ConversionError, LazyTensor, Rule, conv2d, convert,
                                       format_path, linear, target_shapes)
from flowgrpo_jax.convert.safetensors_io import (CheckpointError, SafetensorsFolder, read_header,
                                                 read_tensor)
from flowgrpo_jax.convert.store import (ComponentLoadError, load_params, read_component_info,
                                       save_component)

TESTS = os.path.dirname(os.path.abspath(__file__))


class Tiny(nnx.Module):
    def __init__(self, rngs, param_dtype=jnp.float32):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs, param_dtype=param_dtype)
        self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs, param_dtype=param_dtype)
                                for _ in range(2)])

    def __call__(self, x):
        x = self.conv(x)
        for block in self.blocks:
            x = block(x)
        return x


RULES = [
    Rule(r"conv\.weight", "conv.kernel", conv2d),
    Rule(r"conv\.bias", "conv.bias"),
    Rule(r"blocks\.(\d+)\.weight", r"blocks.\1.kernel", linear),
    Rule(r"blocks\.(\d+)\.bias", r"blocks.\1.bias"),
    Rule(r"position_ids", None),
]


def torch_style_weights(rng):
    return {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=(4,)).astype(np.float32),
        "blocks.0.weight": rng.normal(size=(4, 4)).astype(np.float32),
        "blocks.0.bias": rng.normal(size=(4,)).astype(np.float32),
        "blocks.1.weight": rng.normal(size=(4, 4)).astype(np.float32),
        "blocks.1.bias": rng.normal(size=(4,)).astype(np.float32),
        "position_ids": np.arange(7, dtype=np.int64),
    }


def target():
    return target_shapes(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))))


def test_convert_applies_transforms():
    w = torch_style_weights(np.random.default_rng(0))
    out = convert(w, RULES, target())
    np.testing.assert_array_equal(out[("conv", "kernel")], w["conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(out[("blocks", 1, "kernel")], w["blocks.1.weight"].T)
    assert ("position_ids",) not in out


def test_every_problem_is_named_at_once():
    w = torch_style_weights(np.random.default_rng(0))
    del w["blocks.1.bias"]
    w["blocks.0.weight"] = np.zeros((5, 4), np.float32)
    w["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as e:
        convert(w, RULES, target())
    msg = str(e.value)
    assert "blocks.1.bias" in msg and "missing" in msg
    assert "extra.weight" in msg and "unexpected" in msg
    assert "blocks.0.weight" in msg and "wrong shape" in msg


def test_safetensors_folder_reads_bf16_lazily_and_names_truncation(tmp_path):
    w = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
         "b": np.ones((4,), ml_dtypes.bfloat16)}
    save_file(w, str(tmp_path / "model.safetensors"))
    folder = SafetensorsFolder(str(tmp_path))
    assert folder.shapes() == {"a": (2, 3), "b": (4,)}
    np.testing.assert_array_equal(folder["a"], w["a"])
    assert folder["b"].dtype == ml_dtypes.bfloat16
    path = tmp_path / "model.safetensors"
    os.truncate(path, os.path.getsize(path) - 4)
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFolder(str(tmp_path))


def test_sharded_index_with_a_missing_shard_is_named(tmp_path):
    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "m-1.safetensors"))
    index = {"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="m-2.safetensors"):
        SafetensorsFolder(str(tmp_path))


def tiny_params(seed=1):
    model = Tiny(nnx.Rngs(seed))
    flat = {tuple(p): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return model, flat


def abstract_tiny():
    return nnx.eval_shape(lambda: Tiny(nnx.Rngs(0)))


def test_store_round_trip_and_damage(tmp_path):
    model, flat = tiny_params()
    save_component(str(tmp_path), "tiny", {"width": 4}, flat)
    assert sorted(os.listdir(tmp_path)) == [
        "config.json", "flowgrpo_jax.json", "params.safetensors"]
    # The params file is plain safetensors keyed by dotted Flax paths, in the Flax layout.
    stored = load_file(str(tmp_path / "params.safetensors"))
    np.testing.assert_array_equal(stored["blocks.1.kernel"], flat[("blocks", 1, "kernel")])
    loaded = load_params(str(tmp_path), abstract_tiny())
    x = np.random.default_rng(0).normal(size=(1, 5, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))

    class Wider(Tiny):
        def __init__(self, rngs):
            super().__init__(rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

    with pytest.raises(ComponentLoadError, match="head.kernel"):
        load_params(str(tmp_path), nnx.eval_shape(lambda: Wider(nnx.Rngs(0))))
    path = tmp_path / "params.safetensors"
    os.truncate(path, os.path.getsize(path) - 4)
    with pytest.raises(ComponentLoadError, match="damaged.*truncated"):
        load_params(str(tmp_path), abstract_tiny())


def test_load_casts_to_the_requested_dtype(tmp_path):
    _, flat = tiny_params()
    save_component(str(tmp_path), "tiny", {}, flat)
    loaded = load_params(str(tmp_path), abstract_tiny(), dtype=jnp.bfloat16)
    kernel = loaded.blocks[0].kernel.get_value()
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel),
                                  flat[("blocks", 0, "kernel")].astype(ml_dtypes.bfloat16))


def test_shardings_that_miss_a_parameter_are_refused_by_name(tmp_path):
    _, flat = tiny_params()
    save_component(str(tmp_path), "tiny", {}, flat)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    partial = nnx.from_flat_state([(p, device) for p in flat if p != ("conv", "bias")])
    with pytest.raises(ValueError, match="conv.bias"):
        load_params(str(tmp_path), abstract_tiny(), shardings=partial)


def test_save_materialises_lazy_arrays_one_at_a_time(tmp_path):
    _, flat = tiny_params()
    produced = []

    def lazy(path, array):
        def produce():
            produced.append(path)
            return array
        return LazyTensor(array.shape, array.dtype, produce)

    save_component(str(tmp_path), "tiny", {}, ((p, lazy(p, a)) for p, a in flat.items()))
    assert produced == list(flat)
    np.testing.assert_array_equal(load_file(str(tmp_path / "params.safetensors"))["conv.kernel"],
                                  flat[("conv", "kernel")])


def test_an_interrupted_save_leaves_no_loadable_folder(tmp_path):
    _, flat = tiny_params()
    save_component(str(tmp_path), "tiny", {}, flat)  # a complete folder, overwritten below

    def fail():
        raise KeyboardInterrupt

    broken = {**flat, ("blocks", 1, "bias"): LazyTensor((4,), np.dtype(np.float32), fail)}
    with pytest.raises(KeyboardInterrupt):
        save_component(str(tmp_path), "tiny", {}, broken)
    assert not (tmp_path / "flowgrpo_jax.json").exists()
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path))
    with pytest.raises(ComponentLoadError, match="not a converted"):
        read_component_info(str(tmp_path), "tiny")


def test_a_format_1_folder_says_to_convert_again(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "flowgrpo_jax.json").write_text(json.dumps({"format": 1, "kind": "tiny"}))
    with pytest.raises(ComponentLoadError) as e:
        read_component_info(str(tmp_path), "tiny")
    message = str(e.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "format 1" in message and "convert it again with tools/convert_weights.py" in message


@pytest.mark.parametrize("chunk", [8, 24, 1 << 20])
def test_read_tensor_reads_any_slice_in_bounded_chunks(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(safetensors_io, "READ_CHUNK_BYTES", chunk)
    a = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    save_file({"a": a, "s": np.array(3.0, np.float32)}, str(tmp_path / "m.safetensors"))
    header, start = read_header(str(tmp_path / "m.safetensors"))
    for index in [None, (slice(1, 4),), (slice(None), slice(2, 5)),
                  (slice(0, 5, 2), slice(1, 6, 3), slice(3, 7)),
                  (slice(4, 5), slice(None), slice(0, 1))]:
        got = read_tensor(str(tmp_path / "m.safetensors"), header["a"], start, index)
        np.testing.assert_array_equal(got, a if index is None else a[index])
    assert read_tensor(str(tmp_path / "m.safetensors"), header["s"], start, ()) == 3.0
    as_bf16 = read_tensor(str(tmp_path / "m.safetensors"), header["a"], start, None,
                          ml_dtypes.bfloat16)
    np.testing.assert_array_equal(as_bf16, a.astype(ml_dtypes.bfloat16))


# Each parameter's layout over the (data=2, fsdp=4) mesh of the 8-device check.
SPECS = {"conv.kernel": P(None, None, None, "fsdp"), "conv.bias": P("fsdp"),
         "blocks.0.kernel": P("fsdp", None), "blocks.0.bias": P(),
         "blocks.1.kernel": P("data", "fsdp"), "blocks.1.bias": P("data")}


def check_sharded_loading_on_8_devices(folder):
    """Loads a saved Tiny over 8 devices; every device must read and hold only its shard."""
    from jax.sharding import NamedSharding

    from flowgrpo_jax.convert import store

    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    _, flat = tiny_params()
    save_component(folder, "tiny", {}, flat)
    header, _ = read_header(os.path.join(folder, "params.safetensors"))
    name_at = {info["data_offsets"][0]: name for name, info in header.items()}
    requested = []

    def recording_read(path, info, data_start, index=None, dtype=None):
        array = read_tensor(path, info, data_start, index, dtype)
        requested.append((name_at[info["data_offsets"][0]], array.shape))
        return array

    store.read_tensor = recording_read

    def shardings(abstract_state):
        return nnx.from_flat_state([(p, NamedSharding(mesh, SPECS[format_path(p)]))
                                    for p, _ in nnx.to_flat_state(abstract_state)])

    as_pytree = shardings(nnx.state(abstract_tiny(), nnx.Param))
    for given, dtype in ((shardings, None), (as_pytree, jnp.bfloat16)):
        requested.clear()
        loaded = load_params(folder, abstract_tiny(), dtype=dtype, shardings=given)
        for path, var in nnx.to_flat_state(nnx.state(loaded, nnx.Param)):
            array, expected = var.get_value(), flat[tuple(path)]
            sharding = NamedSharding(mesh, SPECS[format_path(path)])
            assert array.sharding == sharding, (path, array.sharding)
            assert array.dtype == (dtype or jnp.float32), (path, array.dtype)
            assert len(array.addressable_shards) == 8
            for shard in array.addressable_shards:
                assert shard.data.shape == sharding.shard_shape(expected.shape), path
                np.testing.assert_array_equal(
                    np.asarray(shard.data), expected[shard.index].astype(array.dtype))
        # Every read brought in one device's shard, never a split tensor whole.
        assert {name for name, _ in requested} == set(SPECS)
        for name, read_shape in requested:
            full = tuple(header[name]["shape"])
            assert read_shape == NamedSharding(mesh, SPECS[name]).shard_shape(full), name
    print("sharded loading on 8 devices: every device read only its shard")


def test_sharded_loading_on_8_fake_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                   [os.path.dirname(TESTS), TESTS, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every device read only its shard" in result.stdout


def test_fallback_rule_fills_only_a_target_nobody_else_fills():
    rules = [Rule(r"blocks\.(\d+)\.weight", r"blocks.\1.kernel", linear),
             Rule(r"tied\.(\d+)\.weight", r"blocks.\1.kernel", linear, fallback=True),
             *RULES[:2], Rule(r"blocks\.(\d+)\.bias", r"blocks.\1.bias")]
    w = torch_style_weights(np.random.default_rng(0))
    del w["position_ids"]
    w["tied.0.weight"] = w["blocks.0.weight"] + 1  # both present: the primary wins
    w["tied.1.weight"] = w.pop("blocks.1.weight")  # alone: the fallback fills the target
    out = convert(w, rules, target())
    np.testing.assert_array_equal(out[("blocks", 0, "kernel")], w["blocks.0.weight"].T)
    np.testing.assert_array_equal(out[("blocks", 1, "kernel")], w["tied.1.weight"].T)


if __name__ == "__main__":
    check_sharded_loading_on_8_devices(sys.argv[1])
