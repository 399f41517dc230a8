"""The conversion table machinery, the safetensors reader and the converted-folder store."""
import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from flowgrpo_jax.convert.core import ConversionError, Rule, conv2d, convert, linear, target_shapes
from flowgrpo_jax.convert.safetensors_io import CheckpointError, SafetensorsFolder
from flowgrpo_jax.models.store import ComponentLoadError, load_params, save_component


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


def test_store_round_trip_and_damage(tmp_path):
    model = Tiny(nnx.Rngs(1))
    flat = {tuple(p): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    save_component(str(tmp_path), "tiny", {"width": 4}, flat)
    loaded = load_params(str(tmp_path), nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))))
    x = np.random.default_rng(0).normal(size=(1, 5, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))

    class Wider(Tiny):
        def __init__(self, rngs):
            super().__init__(rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

    with pytest.raises(ComponentLoadError, match="head.kernel"):
        load_params(str(tmp_path), nnx.eval_shape(lambda: Wider(nnx.Rngs(0))))
    # Damage every data file of the checkpoint: loading must fail with a named error.
    for root, _, files in os.walk(tmp_path / "params"):
        for name in files:
            if root.endswith("d"):
                os.truncate(os.path.join(root, name), 10)
    with pytest.raises(ComponentLoadError, match="damaged"):
        load_params(str(tmp_path), nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))))


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
