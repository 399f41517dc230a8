"""Flow-GRPO on the FLUX family through the real trainer: the tiny FLUX config trains two
epochs with each objective, every epoch's first update exactly on-policy (ratio 1) in bfloat16
(Flow-GRPO) and float32 (GRPO-Guard), and the trained LoRA exported as PEFT and diffusers files
and merged into the transformer gives PyTorch's FluxTransformer2DModel our velocity."""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import PeftModel
from safetensors.numpy import load_file

from flowgrpo_jax import config as config_lib
from flowgrpo_jax import evaluate as ev
from flowgrpo_jax import export as export_cli
from flowgrpo_jax import lora_io
from flowgrpo_jax.families.flux.pipeline import latent_image_ids, pack_latents, unpack_latents
from flowgrpo_jax.models.conversion import convert_folder
from flowgrpo_jax.train import train
from test_encode_prompt import rel_l2
from train_runs import checkpoint_state

VARIANTS = {"grpo": "", "grpo_guard": "guard,", "nft": "nft,"}
# Flow-GRPO in bfloat16, the others in float32: exact ratios checked in both dtypes.
DTYPES = {"grpo": "bfloat16", "grpo_guard": "float32", "nft": "float32"}


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    """(the tiny random diffusers FluxPipeline, its converted folder)."""
    from test_flux_pipeline import tiny_flux_pipeline  # torch and diffusers: only here
    reference = tiny_flux_pipeline()
    src, dst = tmp_path_factory.mktemp("flux-diffusers"), tmp_path_factory.mktemp("flux-flax")
    reference.save_pretrained(src)
    convert_folder(str(src), str(dst), log=lambda *_: None)
    return reference, dst


def tiny_config(folder, objective="grpo", dtype="float32"):
    config = config_lib.load_file(f"configs/flux_pickscore.py:{VARIANTS[objective]}tiny")
    config.model.path, config.model.dtype = str(folder), dtype
    return config


def _epochs(history):
    return [m for m in history if "train/loss" in m]


def _on_policy(metrics) -> tuple:
    return tuple(metrics[f"train/on_policy/{name}"] for name in ("ratio_min", "ratio_max", "clipfrac"))


@pytest.mark.parametrize("objective", sorted(VARIANTS))
def test_the_tiny_flux_config_trains_two_epochs_with_each_objective(tiny_flux, tmp_path, objective):
    config = tiny_config(tiny_flux[1], objective, DTYPES[objective])
    epochs = _epochs(train(config, str(tmp_path)))
    assert len(epochs) == 2 and all(np.isfinite(m["train/loss"]) for m in epochs)
    assert all(np.isfinite(m["reward/total_mean"]) for m in epochs)
    if objective != "nft":  # exact ratios: every epoch's first update is on-policy
        assert all(_on_policy(m) == (1.0, 1.0, 0.0) for m in epochs), epochs
    first, second = checkpoint_state(tmp_path, 1)["params"], checkpoint_state(tmp_path, 2)["params"]
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
               for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))


def test_trained_lora_exports_to_peft_diffusers_and_merged(tiny_flux, tmp_path):
    reference, folder = tiny_flux
    config = tiny_config(folder)
    config.num_epochs, config.train.ema = 1, False
    config.train.learning_rate = 0.05  # a LoRA that moves the velocity enough to compare
    workdir = tmp_path / "run"
    train(config, str(workdir))
    _, model = ev.workdir_model(str(workdir))

    rng = np.random.default_rng(0)
    h, w, t = 4, 6, np.array([300.0, 800.0], np.float32)
    x = rng.standard_normal((2, h, w, 16), dtype=np.float32)
    text = model.generator.encode(["a red cube", "a dog"])
    ours = np.asarray(model.velocity_fn(model.params, jnp.asarray(x), jnp.asarray(t), text))

    def torch_velocity(transformer):
        with torch.no_grad():
            out = transformer(
                hidden_states=torch.from_numpy(np.array(pack_latents(jnp.asarray(x)))),
                timestep=torch.from_numpy(t / 1000), guidance=torch.full((2,), 3.5),
                encoder_hidden_states=torch.from_numpy(np.array(text.prompt_embeds)),
                pooled_projections=torch.from_numpy(np.array(text.pooled)),
                img_ids=torch.from_numpy(latent_image_ids(h // 2, w // 2)),
                txt_ids=torch.zeros(text.prompt_embeds.shape[1], 3)).sample
        return np.asarray(unpack_latents(jnp.asarray(out.numpy()), h, w))

    base = torch_velocity(reference.transformer)
    assert rel_l2(ours - base, base) > 1e-2  # the LoRA matters to the velocity

    out = tmp_path / "peft"
    assert export_cli.main(["--workdir", str(workdir), "--out", str(out)]) == 0
    targets = json.loads((out / lora_io.PEFT_CONFIG).read_text())["target_modules"]
    assert "transformer_blocks.0.attn.to_out.0" in targets and "transformer_blocks.0.ff.net.2" in targets
    assert "single_transformer_blocks.0.attn.to_q" in targets
    peft = torch_velocity(PeftModel.from_pretrained(copy.deepcopy(reference.transformer), str(out)))
    assert rel_l2(ours, peft) < 1e-5 and rel_l2(ours - base, peft - base) < 1e-4

    out = tmp_path / "diffusers"
    assert export_cli.main(["--workdir", str(workdir), "--out", str(out), "--format", "diffusers"]) == 0
    assert all(k.startswith("transformer.") for k in load_file(str(out / lora_io.DIFFUSERS_WEIGHTS)))
    pipe = copy.deepcopy(reference)
    pipe.load_lora_weights(str(out))
    theirs = torch_velocity(pipe.transformer)
    assert rel_l2(ours, theirs) < 1e-5 and rel_l2(ours - base, theirs - base) < 1e-4

    out = tmp_path / "merged"
    assert export_cli.main(["--workdir", str(workdir), "--out", str(out), "--format", "merged"]) == 0
    merged = torch_velocity(FluxTransformer2DModel.from_pretrained(str(out)).eval())
    assert rel_l2(ours, merged) < 1e-5 and rel_l2(ours - base, merged - base) < 1e-4
