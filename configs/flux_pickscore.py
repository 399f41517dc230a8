"""Flow-GRPO on FLUX.1-dev with the PickScore reward.

    python -m flowgrpo_jax.train --config configs/flux_pickscore.py --workdir runs/flux-pickscore \
        --config.model.path=flux1-dev-flax --config.prompts.train_file=pickscore/train.txt \
        --config.prompts.test_file=pickscore/test.txt \
        --config.reward.options.pickscore.model=/models/PickScore_v1

Reproduces the reference's config/grpo.py:pickscore_flux: 6 SDE steps at noise 0.9 (28 ODE
steps at evaluation), 512 px, 128 T5 tokens, the model's distilled guidance 3.5 and no CFG,
groups of 24 images of 48 prompts an epoch, two updates an epoch, no KL, LoRA r64 alpha 128,
the EMA every 8 updates. Variants (flowgrpo_jax/families/flux/configs.py): ":fast" (the
reference's pickscore_flux_fast: the CPS window, clip 1e-5, per-group advantage std), ":nft",
":guard", ":tiny" (a tiny FLUX-style pipeline on CPU, given as --config.model.path; reward
brightness, an offline stand-in).
"""
import ml_collections

from flowgrpo_jax import config as config_lib
from flowgrpo_jax.families.flux import configs as flux_configs


def get_config(variant: str = ""):
    config = config_lib.defaults()
    config.model = flux_configs.flux1_dev()
    config.prompts.format = "text"
    config.prompts.train_file = "pickscore/train.txt"
    config.prompts.test_file = "pickscore/test.txt"
    config.reward.rewards = "pickscore:1.0"
    config.reward.options = ml_collections.ConfigDict({"pickscore": {"model": "PickScore_v1"}})
    flux_configs.reference_run(config)
    config.sample.noise_level = 0.9
    config.eval_every, config.save_every = 30, 30
    config.num_epochs = 10000
    config = flux_configs.variant(config, variant, tiny_rewards="brightness:1.0")
    if "fast" in variant.split(","):  # pickscore_flux_fast: the advantage std per group
        config.train.global_std = False
    return config
