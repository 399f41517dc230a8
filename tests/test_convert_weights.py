"""The converter CLI end to end: diffusers save_pretrained -> convert_weights -> load_transformer."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from flowgrpo_jax import parallel
from flowgrpo_jax.models.conversion import convert_folder
from flowgrpo_jax.families.sd3.loading import load_pipeline, load_transformer
from test_encode_prompt import tiny_sd3_pipeline
from test_mmdit import CASES, _inputs, _jitted_output, _reference, _reference_output, _relative_l2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_converter(src, dst, *extra):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"),
                           "--src", str(src), "--dst", str(dst), *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sd35_tiny(tmp_path_factory):
    config, latent_shape, text_len = CASES["sd35"]
    reference = _reference(config)
    src = tmp_path_factory.mktemp("src")
    reference.save_pretrained(src, max_shard_size="20KB")  # sharded, with an index
    inputs = _inputs(config, latent_shape, text_len)
    return reference, src, inputs, _reference_output(reference, inputs)


def test_cli_conversion_matches_diffusers(sd35_tiny, tmp_path):
    _, src, inputs, expected = sd35_tiny
    assert any(n.endswith(".index.json") for n in os.listdir(src))
    result = run_converter(src, tmp_path / "dst")
    assert result.returncode == 0, result.stderr
    model = load_transformer(str(tmp_path / "dst"), dtype=jnp.float32)
    assert _relative_l2(_jitted_output(model, inputs), expected) < 1e-5


def test_load_transformer_places_params_with_the_trainers_shardings(sd35_tiny, tmp_path):
    _, src, inputs, expected = sd35_tiny
    assert run_converter(src, tmp_path / "dst").returncode == 0
    mesh = parallel.make_mesh()
    model = load_transformer(str(tmp_path / "dst"),
                             shardings=lambda state: parallel.state_shardings(state, mesh))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert isinstance(var.get_value().sharding, jax.sharding.NamedSharding), path
        assert var.get_value().sharding.mesh == mesh, path
    assert _relative_l2(_jitted_output(model, inputs), expected) < 1e-5


def test_load_pipeline_asks_shardings_for_each_component_by_name(tmp_path):
    tiny_sd3_pipeline().save_pretrained(tmp_path / "src")
    convert_folder(str(tmp_path / "src"), str(tmp_path / "dst"), log=lambda *_: None)
    asked = []
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def shardings(name, abstract_state):
        asked.append(name)
        return jax.tree.map(lambda _: device, abstract_state)

    pipeline = load_pipeline(str(tmp_path / "dst"), shardings=shardings)
    assert sorted(asked) == ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer",
                             "vae"]
    assert pipeline.vae.decoder.conv_in.kernel.get_value().sharding == device


def test_bf16_weights_stay_bf16(sd35_tiny, tmp_path):
    reference, _, inputs, _ = sd35_tiny
    bf16 = tmp_path / "bf16"
    reference.to(torch.bfloat16).save_pretrained(bf16)
    reference.to(torch.float32)
    assert run_converter(bf16, tmp_path / "dst").returncode == 0
    assert "bfloat16" in (tmp_path / "dst" / "flowgrpo_jax.json").read_text()
    model = load_transformer(str(tmp_path / "dst"), dtype=jnp.bfloat16)
    assert model.transformer_blocks[0].attn.to_q.kernel.get_value().dtype == jnp.bfloat16
    # fp32 on request
    assert run_converter(bf16, tmp_path / "dst32", "--dtype", "float32").returncode == 0
    assert "float32" in (tmp_path / "dst32" / "flowgrpo_jax.json").read_text()


def _single_file_copy(reference, tmp_path, edit):
    src = tmp_path / "src"
    reference.save_pretrained(src)
    path = src / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return src


@pytest.mark.parametrize("damage, named", [
    (lambda t: t.pop("transformer_blocks.1.attn.to_k.weight"), "transformer_blocks.1.attn.to_k.kernel"),
    (lambda t: t.update({"pos_embed.proj.bias": np.zeros(7, np.float32)}), "pos_embed.proj.bias"),
    (lambda t: t.update({"bogus.weight": np.zeros(3, np.float32)}), "bogus.weight"),
])
def test_corrupted_checkpoint_is_named_and_nothing_written(sd35_tiny, tmp_path, damage, named):
    src = _single_file_copy(sd35_tiny[0], tmp_path, damage)
    result = run_converter(src, tmp_path / "dst")
    assert result.returncode == 1
    assert named in result.stderr, result.stderr
    assert not (tmp_path / "dst").exists()


def test_truncated_file_is_named(sd35_tiny, tmp_path):
    src = _single_file_copy(sd35_tiny[0], tmp_path, lambda t: None)
    path = src / "diffusion_pytorch_model.safetensors"
    os.truncate(path, os.path.getsize(path) // 2)
    result = run_converter(src, tmp_path / "dst")
    assert result.returncode == 1 and "truncated" in result.stderr, result.stderr


def test_loading_an_unconverted_folder_says_what_to_do(sd35_tiny):
    with pytest.raises(ValueError, match="convert_weights"):
        load_transformer(str(sd35_tiny[1]))
