"""SD3.5-M's training programs compiled for a TPU slice (v5e:2x2) with no TPU attached.

A reduced SD3.5 Medium (the real width, heads, text encoders and VAE; two MMDiT layers, a
dual-attention one and the context_pre_only last one) at the real 512 px and 128 T5 token
shapes, through the planner's RunPlan, i.e. the trainer's own programs: the LoRA train step
(CFG, 9 trained steps, per-block remat) at 2 images per chip and a rollout chunk at 8. Each must
fit a 16 GiB chip, run attention in the TPU kernel (Mosaic custom calls, no XLA softmax), and
move no activations between chips under data parallelism (no all-gather). Slow suite, as the
full depth (tests/test_plan.py).
"""
import importlib.util
import pathlib

import pytest
from sd3_folders import sd35m_folder

from flowgrpo_jax import planner

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOPOLOGY = "v5e:2x2"
PER_CHIP = {"train step": 2, "rollout": 8}


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
    folder = sd35m_folder(tmp_path / "sd35m_2_layers", num_layers=2)
    devices = planner.tpu_devices(TOPOLOGY)
    config = sd35m_config(folder, len(devices))
    run = planner.RunPlan(config, devices, log=lambda *a, **k: None)
    program = (run.train(config.train.micro_batch_size) if name == "train step"
               else run.rollout(config.sample.batch_size))
    return run, run.compile(name, PER_CHIP[name], program, keep_hlo=True)


# One test a program, so that a parallel run compiles them on two workers at once. Both are in
# the slow suite (minutes each on 2 cores): in make test, tests/test_plan.py compiles the toy
# run's programs for TPU slices (the splash kernel, no collectives in a population's rollout).
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PER_CHIP))
def test_fits_a_v5e_chip_with_the_tpu_kernel_and_no_activation_gathers(tmp_path, name):
    run, result = _compile(tmp_path, name)
    print(f"{name}: {result.total / planner.GiB:.2f} GiB per chip of {run.memory / planner.GiB:.2f}")
    assert result.fits and result.total < run.memory
    assert "tpu_custom_call" in result.hlo  # the Pallas splash kernel
    assert " all-gather(" not in result.hlo and "all-gather-start" not in result.hlo
