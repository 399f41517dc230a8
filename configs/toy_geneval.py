"""Flow-GRPO on the toy world (the built-in default, what `make demo` trains).

    python -m flowgrpo_jax.train --config configs/toy_geneval.py --workdir runs/toy
    python -m flowgrpo_jax.demo                      # base eval + this run + trained eval + figures

The shipped base checkpoint (flowgrpo_jax/toy/checkpoint/) with the toy checker's partial
credit (`toy_geneval`) as the reward, served by the local reward process. Sized for a 2-core
CPU: 60 epochs of 64 images, about 10 s an epoch; the whole demo measured 11 min 55 s on 2
shared cores. Reaches (measured, docs/demo.md, on the base of commit 5210242): strict test
accuracy 0.003 -> 0.007, NOT the +25 points the demo aims at: that base draws blobs the
checker cannot read, so 91% of the groups score all 0 and GRPO has no signal; it needs a base
at 0.3-0.6.

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
    # The whole MMDiT (1.3M parameters) trains: LoRA saves nothing at this size.
    config.lora.enabled = False
    t.learning_rate = 3e-4
    t.updates_per_epoch, t.micro_batch_size = 2, 32
    # KL to the base: with sparse rewards most updates carry a few samples' signal, which Adam
    # turns into full-size steps; measured with beta 0 the model drifted (grid-like texture,
    # partial credit 0.016 -> 0 in 60 epochs).
    t.beta = 0.04
    t.clip_range = 1e-4
    config.num_epochs = 60  # about 12 s an epoch on 2 shared cores: the demo stays under 20 min
    config.eval_every, config.save_every = 20, 20
    config.logging.num_images = 16

    if variant == "tiny":
        return config_lib.tiny(config, rewards="toy_geneval:1.0")
    if variant:
        raise ValueError(f"unknown variant {variant!r} of toy_geneval; known: tiny")
    return config
