"""SD3.5-M's training programs compiled for a TPU slice (v5e:2x2) with no TPU attached.

A reduced SD3.5 Medium (the real width, heads, text encoders and VAE; two MMDiT layers, a
dual-attention one and the context_pre_only last one) at the real 512 px and 128 T5 token
shapes, through the planner's RunPlan, i.e. the trainer's own programs: the LoRA train step
(CFG, 9 trained steps, per-block remat) at 2 images per chip and a rollout chunk at 8. Each must
fit a 16 GiB chip, run attention in the TPU kernel (Mosaic custom calls, no XLA softmax), and
move no activations between chips under data parallelism (no all-gather). The full depth is in
the slow suite (tests/test_plan.py).
"""
import importlib.util
import json
import os
import pathlib

import pytest

from flowgrpo_jax import planner
from flowgrpo_jax.families.sd3.loading import SD35M_CONFIGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOPOLOGY = "v5e:2x2"
PER_CHIP = {"train step": 2, "rollout": 8}


def reduced_sd35m_folder(folder, num_layers: int) -> str:
    """A converted-pipeline folder of configs only (no weights: the planner reads none), the
    MMDiT cut to its first `num_layers - 1` layers plus the context_pre_only last one."""
    index = {"_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "tokenizer_3": ["transformers", "T5TokenizerFast"]}
    kinds = {"transformer": "transformer", "vae": "vae", "text_encoder": "clip_text",
             "text_encoder_2": "clip_text", "text_encoder_3": "t5_encoder"}
    for name, kind in kinds.items():
        with open(os.path.join(SD35M_CONFIGS, f"{name}.json")) as f:
            config = json.load(f)
        if name == "transformer":
            config["num_layers"] = num_layers
            config["dual_attention_layers"] = [i for i in config["dual_attention_layers"] if i < num_layers - 1]
        os.makedirs(os.path.join(folder, name))
        for file, content in (("config.json", config), ("flowgrpo_jax.json", {"format": 2, "kind": kind})):
            with open(os.path.join(folder, name, file), "w") as f:
                json.dump(content, f)
        index[name] = ["diffusers", config.get("_class_name", kind)]
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(SD35M_CONFIGS, "scheduler.json")) as f:
        scheduler = f.read()
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        f.write(scheduler)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    return str(folder)


def sd35m_config(model_path, devices: int):
    spec = importlib.util.spec_from_file_location("sd35m_geneval", ROOT / "configs" / "sd35m_geneval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.path = model_path
    config.train.remat = "block"
    config.train.micro_batch_size = PER_CHIP["train step"] * devices
    config.sample.batch_size = PER_CHIP["rollout"] * devices
    return config


def _compile(tmp_path, name):
    folder = reduced_sd35m_folder(tmp_path / "sd35m_2_layers", num_layers=2)
    devices = planner.tpu_devices(TOPOLOGY)
    config = sd35m_config(folder, len(devices))
    run = planner.RunPlan(config, devices, log=lambda *a, **k: None)
    program = (run.train(config.train.micro_batch_size) if name == "train step"
               else run.rollout(config.sample.batch_size))
    return run, run.compile(name, PER_CHIP[name], program, keep_hlo=True)


# One test a program, so that a parallel run compiles them on two workers at once.
@pytest.mark.parametrize("name", sorted(PER_CHIP))
def test_fits_a_v5e_chip_with_the_tpu_kernel_and_no_activation_gathers(tmp_path, name):
    run, result = _compile(tmp_path, name)
    print(f"{name}: {result.total / planner.GiB:.2f} GiB per chip of {run.memory / planner.GiB:.2f}")
    assert result.fits and result.total < run.memory
    assert "tpu_custom_call" in result.hlo  # the Pallas splash kernel
    assert " all-gather(" not in result.hlo and "all-gather-start" not in result.hlo
