"""Flow-GRPO on the toy world (the built-in default, what `make demo` trains).

    python -m flowgrpo_jax.train --config configs/toy_geneval.py --workdir runs/toy
    python -m flowgrpo_jax.demo                      # base eval + this run + trained eval + figures

The shipped base checkpoint (flowgrpo_jax/toy/checkpoint/) with the toy checker's partial
credit (`toy_geneval`) as the reward, served by the local reward process. Sized for a 2-core
CPU: see docs/demo.md for what it reaches (measured there: strict test accuracy, base vs
trained, per category, and the wall time).

Variant ":tiny" (a couple of epochs of 16 images, 4 steps): what the tests run, with
`--config.model.path` pointing at a tiny random model.
"""
import os

import ml_collections

from flowgrpo_jax import config as config_lib
from flowgrpo_jax.toy.prompts import DATA_DIR


def get_config(variant: str = ""):
    config = config_lib.defaults()
    config.model = ml_collections.ConfigDict({"family": "toy", "path": ""})  # "": the shipped base
    config.prompts.format = "geneval"
    config.prompts.train_file = os.path.join(DATA_DIR, "train.jsonl")
    config.prompts.test_file = os.path.join(DATA_DIR, "test.jsonl")
    config.reward.rewards = "toy_geneval:1.0"

    s, t = config.sample, config.train
    s.kind, s.noise_level = "sde", 0.7
    s.num_steps, s.eval_num_steps = 10, 20
    s.guidance_scale = 4.5
    s.group_size, s.groups_per_epoch = 8, 8
    s.batch_size = 32  # two rollout chunks an epoch: the second samples while the first is scored
    s.eval_batch_size, s.num_eval_prompts = 96, 96
    # The whole MMDiT (about 0.6M parameters) trains: LoRA saves nothing at this size.
    config.lora.enabled = False
    t.learning_rate = 3e-4
    t.updates_per_epoch, t.micro_batch_size = 2, 32
    t.beta = 0.0
    t.clip_range = 1e-4
    config.num_epochs = 40
    config.eval_every, config.save_every = 10, 10
    config.logging.num_images = 16

    if variant == "tiny":
        return config_lib.tiny(config, rewards="toy_geneval:1.0")
    if variant:
        raise ValueError(f"unknown variant {variant!r} of toy_geneval; known: tiny")
    return config
