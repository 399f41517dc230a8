"""The Flax AutoencoderKL against diffusers' at fp32, through the real conversion table."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx

from flowgrpo_jax.convert.core import ConversionError, convert, plan, target_shapes
from flowgrpo_jax.convert.safetensors_io import SafetensorsFolder
from flowgrpo_jax.models.abstract import abstract_module
from flowgrpo_jax.models.vae_table import RULES
from flowgrpo_jax.models.vae import AutoencoderKL, VAEConfig
from flowgrpo_jax.families.sd3.loading import SD35M_CONFIGS
from converted import converted_module

DATA = SD35M_CONFIGS
TOLERANCE = 1e-5


def tiny_config(**overrides):
    """The SD3 VAE layout (4 blocks, 16 latent channels, mid attention), at toy widths."""
    config = dict(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16], layers_per_block=2, norm_num_groups=4,
        sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False)
    config.update(overrides)
    return config


def rel_l2(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def torch_vae(config, tmp_path):
    """A random diffusers VAE, saved and read back as a safetensors folder."""
    torch.manual_seed(0)
    model = TorchAutoencoderKL(**config).eval()
    with torch.no_grad():  # norms start at 1 / 0: perturb everything 1-D so its mapping shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model, SafetensorsFolder(str(tmp_path))


def make_vae(config):
    return lambda rngs: AutoencoderKL(VAEConfig.from_diffusers(config), rngs=rngs)


def abstract_vae(config):
    return abstract_module(make_vae(config))


def flax_vae(config, tensors):
    return converted_module(make_vae(config), tensors, RULES)


@pytest.mark.parametrize("quant_convs", [False, True], ids=["sd3", "quant_convs"])
def test_encode_decode_match_diffusers(tmp_path, quant_convs):
    config = tiny_config(use_quant_conv=quant_convs, use_post_quant_conv=quant_convs)
    reference, tensors = torch_vae(config, tmp_path)
    model = flax_vae(config, tensors)

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = rng.normal(size=(2, 4, 4, 16)).astype(np.float32)
    with torch.no_grad():
        posterior = reference.encode(nchw(images)).latent_dist
        decoded = reference.decode(nchw(latents)).sample
        # StableDiffusion3Pipeline's decode of diffusion latents.
        pipeline_decoded = reference.decode(
            nchw(latents) / config["scaling_factor"] + config["shift_factor"]).sample

    mean, logvar = nnx.jit(lambda m, x: m.encode(x))(model, images)
    errors = {
        "mean": rel_l2(mean, nhwc(posterior.mean)),
        "logvar": rel_l2(logvar, nhwc(posterior.logvar)),
        "decode": rel_l2(nnx.jit(lambda m, z: m.decode(z))(model, latents), nhwc(decoded)),
        "decode_latents": rel_l2(nnx.jit(lambda m, z: m.decode_latents(z))(model, latents),
                                 nhwc(pipeline_decoded)),
    }
    print(f"VAE ({'quant convs' if quant_convs else 'SD3'}) relative L2 errors: {errors}")
    assert all(e < TOLERANCE for e in errors.values()), errors

    expected = (nhwc(posterior.mean) - config["shift_factor"]) * config["scaling_factor"]
    assert rel_l2(model.latents_from_mean(mean), expected) < TOLERANCE


def test_conversion_rejects_a_mismatched_checkpoint(tmp_path):
    _, tensors = torch_vae(tiny_config(), tmp_path)
    wider = abstract_vae(tiny_config(use_post_quant_conv=True))
    with pytest.raises(ConversionError, match="post_quant_conv"):
        convert(tensors, RULES, target_shapes(wider))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="up_block_types"):
        VAEConfig.from_diffusers(tiny_config(up_block_types=["AttnUpDecoderBlock2D"] * 4))
    with pytest.raises(ValueError, match="NHWC with 3 channels"):
        abstract_vae(tiny_config()).encode(jnp.zeros((1, 3, 32, 32)))


def test_sd35_medium_shapes_and_parameter_count():
    with open(os.path.join(DATA, "vae.json")) as f:
        config = json.load(f)
    with open(os.path.join(DATA, "param_counts.json")) as f:
        recorded = json.load(f)["vae"]
    with torch.device("meta"):
        reference = TorchAutoencoderKL(**config)
    abstract = nnx.eval_shape(
        lambda: AutoencoderKL(VAEConfig.from_diffusers(config), rngs=nnx.Rngs(0)))

    ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    theirs = sum(p.numel() for p in reference.parameters())
    assert ours == theirs == recorded
    # Every real checkpoint key maps onto a parameter of the right shape.
    plan({k: tuple(v.shape) for k, v in reference.state_dict().items()}, RULES,
         target_shapes(abstract))
