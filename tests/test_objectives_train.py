"""GRPO-Guard and DiffusionNFT through the real trainer (Flow-GRPO's own runs are in the other
trainer tests): two epochs of the toy tiny config in float32 and bfloat16, the tiny SD3
pipeline in bfloat16 with its LoRA exported to PEFT, and an exact resume after kill -9."""
import json
import subprocess
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from flowgrpo_jax import config as config_lib
from flowgrpo_jax import export as export_cli
from flowgrpo_jax import lora_io
from flowgrpo_jax.train import train
from train_runs import (ROOT, checkpoint_state, checkpoint_steps, make_tiny_model, run_train,
                        train_command, train_env)

VARIANTS = {"grpo_guard": "guard", "nft": "nft"}
# The trainer tests' toy run (train_runs.TOY_RUN) with each objective's own settings.
OVERRIDES = {"grpo_guard": ("--config.train.objective=grpo_guard", "--config.train.beta=0.0",
                            "--config.train.clip_range=2e-6", "--config.train.global_std=False"),
             "nft": ("--config.train.objective=nft", "--config.sample.kind=dpm2",
                     "--config.sample.guidance_scale=1.0", "--config.train.beta=1e-4")}


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model"))


def max_abs_diff(a, b) -> float:
    return max((float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))),
               default=0.0)


def _epochs(history):
    return [m for m in history if "train/loss" in m]


def _check(objective, epochs):
    assert len(epochs) == 2 and all(np.isfinite(m["train/loss"]) for m in epochs)
    if objective == "grpo_guard":  # exact ratios: the first update of each epoch is on-policy
        assert all(m["train/on_policy/ratio_min"] == m["train/on_policy/ratio_max"] == 1.0
                   for m in epochs)


# The suite's budget: GRPO-Guard in float32 also trains in tests/test_flux_train.py and as a
# population in tests/test_population.py, DiffusionNFT in bfloat16 below on the SD3 pipeline.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("objective, dtype", [
    pytest.param("grpo_guard", "float32", marks=SLOW), ("grpo_guard", "bfloat16"),
    ("nft", "float32"), pytest.param("nft", "bfloat16", marks=SLOW)])
def test_the_toy_tiny_config_trains_two_epochs(toy_model, tmp_path, objective, dtype):
    config = config_lib.load_file(f"configs/toy_geneval.py:{VARIANTS[objective]},tiny")
    config.model.path, config.model.dtype = toy_model, dtype
    config.reward.rewards = "brightness:1.0"
    _check(objective, _epochs(train(config, str(tmp_path))))
    state = checkpoint_state(tmp_path, 2)
    moved = max_abs_diff(state["params"], checkpoint_state(tmp_path, 1)["params"])
    assert moved > 0
    if objective == "nft":  # the old policy followed the params a little, not all the way
        old = state["extra"]["old_params"]
        assert 0 < max_abs_diff(old, checkpoint_state(tmp_path, 1)["extra"]["old_params"])
        assert max_abs_diff(old, state["params"]) > 0


@pytest.fixture(scope="module")
def tiny_sd3_folder(tmp_path_factory):
    from test_encode_prompt import saved_and_converted  # torch and diffusers: only here
    return saved_and_converted(tmp_path_factory)[2]


# GRPO-Guard in the slow suite for the suite's budget: it trains in bfloat16 on the toy family above
@pytest.mark.parametrize("objective", [pytest.param("grpo_guard", marks=SLOW), "nft"])
def test_the_tiny_sd3_pipeline_trains_in_bf16_and_exports_its_lora(tiny_sd3_folder, tmp_path,
                                                                  objective):
    config = config_lib.load_file(f"configs/sd35m_pickscore.py:{VARIANTS[objective]},tiny")
    config.model.path, config.model.dtype = str(tiny_sd3_folder), "bfloat16"
    config.reward.rewards = "jpeg_compressibility:1.0"
    workdir = tmp_path / "run"
    _check(objective, _epochs(train(config, str(workdir))))
    out = tmp_path / "peft"
    assert export_cli.main(["--workdir", str(workdir), "--out", str(out), "--no-ema"]) == 0
    adapter = json.loads((out / lora_io.PEFT_CONFIG).read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (config.lora.rank, config.lora.alpha)
    weights = load_file(str(out / lora_io.PEFT_WEIGHTS))
    trained = [k for k in weights if ".lora_B." in k and np.abs(weights[k]).max() > 0]
    assert trained, "the exported LoRA is untrained"  # B starts at zero


# The suite's budget (slow suite): make test resumes Flow-GRPO runs in
# tests/test_train_resume.py; GRPO-Guard's state is Flow-GRPO's, DiffusionNFT's adds the old policy.
@pytest.mark.slow
@pytest.mark.parametrize("objective", ["grpo_guard", "nft"])
def test_a_run_killed_after_a_checkpoint_resumes_exactly(toy_model, tmp_path, objective):
    settings = ("--config.num_epochs=3", "--config.save_every=1", *OVERRIDES[objective])
    run_train(tmp_path / "whole", toy_model, *settings)
    workdir = tmp_path / "killed"
    process = subprocess.Popen(train_command(workdir, toy_model, *settings), cwd=ROOT,
                               env=train_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not checkpoint_steps(workdir):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.02)
    process.kill()
    process.wait(timeout=60)
    assert checkpoint_steps(workdir)[-1] < 3, "the kill came too late to interrupt the run"
    run_train(workdir, toy_model, *settings)
    whole, resumed = checkpoint_state(tmp_path / "whole", 3), checkpoint_state(workdir, 3)
    assert max_abs_diff(resumed["params"], whole["params"]) == 0.0
    assert max_abs_diff(resumed, whole) == 0.0  # optimizer, EMA, NFT's old policy too
