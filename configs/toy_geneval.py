"""Flow-GRPO on the toy world (the built-in default, what `make demo` trains).

    python -m flowgrpo_jax.train --config configs/toy_geneval.py --workdir runs/toy
    python -m flowgrpo_jax.demo                      # base eval + this run + trained eval + figures

The shipped base checkpoint (flowgrpo_jax/families/toy/checkpoint/, strict accuracy 0.388 on
the held-out test file and 0.658 on seen prompts, 4 images per line) with the mean of the toy
checker's strict and exact scores (`toy_geneval`, score "strict+exact") as the reward, served
by the local reward process; 150 epochs of 16 prompts x 8 images with the SDE in a 2-step
window. Measured on training seed 0: 0.456 held out, 0.737 seen; over seeds 0-3 0.426 and
0.721 on average (docs/demo.md: the results and the reasons for each setting).

Variants: ":nft" (DiffusionNFT) and ":guard" (GRPO-Guard), each with its reference settings
on this world, NFT at the rate tuned for it (docs/demo.md compares the three objectives);
":tiny" (2 epochs of 16 images, 4 steps): what the tests run, with `--config.model.path`
pointing at a tiny random toy model. Several join with commas: ":nft,tiny".
"""
import os

import ml_collections

from flowgrpo_jax import config as config_lib
from flowgrpo_jax.families.toy.prompts import DATA_DIR


def get_config(variant: str = ""):
    config = config_lib.defaults()
    # path "": the shipped base; dtype: what the MMDiT and text encoder compute in
    config.model = ml_collections.ConfigDict({"family": "toy", "path": "", "dtype": "float32"})
    config.prompts.format = "geneval"
    config.prompts.train_file = os.path.join(DATA_DIR, "train.jsonl")
    config.prompts.test_file = os.path.join(DATA_DIR, "test.jsonl")
    config.reward.rewards = "toy_geneval:1.0"

    # The mean of the strict 0/1 score (the metric) and "exact" (strict with no stray object):
    # strict alone pays nothing for extra objects outside counting prompts, exact alone
    # punishes a stray object as hard as a missing one.
    config.reward.options = ml_collections.ConfigDict({"toy_geneval": {"score": "strict+exact"}})

    s, t = config.sample, config.train
    s.kind, s.noise_level = "sde", 0.7
    s.num_steps, s.eval_num_steps = 10, 20
    s.guidance_scale = 4.5
    # Flow-GRPO-Fast's window: the SDE and training on 2 steps starting in steps 0-2, the ODE
    # elsewhere. The layout (which cell holds what) is settled in the first steps; a window
    # starting later finds it already fixed by the initial noise.
    s.window_size, s.window_lo, s.window_hi = 2, 0, 4
    s.group_size, s.groups_per_epoch = 8, 16
    s.batch_size = 64  # two rollout chunks an epoch: the second samples while the first is scored
    s.eval_batch_size, s.num_eval_prompts = 96, 96
    # The whole MMDiT (1.5M parameters) trains: LoRA saves nothing at this size.
    config.lora.enabled = False
    # One update of all 128 images an epoch at 2e-4, decayed to 0 along a cosine, with a small
    # KL term: at a constant rate Adam turns each update's sampling noise into a full step and
    # the accuracy falls back after its first rise.
    t.learning_rate, t.lr_schedule = 2e-4, "cosine"
    t.updates_per_epoch, t.micro_batch_size = 1, 32
    t.remat = "none"  # the toy MMDiT's activations are small
    t.timestep_fraction = 1.0  # every window step
    t.beta = 0.01
    t.clip_range = 1e-4
    config.num_epochs = 150
    config.eval_every, config.save_every = 25, 25
    config.logging.num_images = 16

    for name in filter(None, variant.split(",")):
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r} of toy_geneval; known: {', '.join(VARIANTS)}")
        config = VARIANTS[name](config)
    return config


def nft(config):
    """DiffusionNFT with its reference settings (docs/design.md, section 13) on this world's
    batches: rollouts with the 10-step DPM-Solver++(2M) and, as everywhere in NFT, no CFG
    (evaluation too: the base scores 0.226 held out without it, against 0.388 with), beta 1,
    KL weight 1e-4, the old policy's decay min(0.001 n, 0.5); at half Flow-GRPO's rate."""
    s, t = config.sample, config.train
    t.objective = "nft"
    # At 2e-4 every seed collapses after epoch 60-90: faint ghost objects fill the empty cells
    # (docs/demo.md, Tuning DiffusionNFT).
    t.learning_rate = 1e-4
    s.kind, s.guidance_scale, s.window_size = "dpm2", 1.0, 0
    t.beta, t.timestep_fraction = 1e-4, 0.99
    config.nft.beta, config.nft.decay_rate, config.nft.decay_max = 1.0, 0.001, 0.5
    return config


def guard(config):
    """GRPO-Guard with its reference settings (docs/design.md, section 12) in this world's SDE
    window: clip 2e-6, no KL, per-group advantage std."""
    t = config.train
    t.objective = "grpo_guard"
    t.clip_range, t.beta, t.global_std = 2e-6, 0.0, False
    return config


# Variants, joined by commas and applied in order (e.g. "nft,tiny").
VARIANTS = {"nft": nft, "guard": guard, "tiny": config_lib.tiny}
