"""Flow-GRPO on SD3.5 Medium with the PickScore reward (the paper's human-preference run).

    python -m flowgrpo_jax.train --config configs/sd35m_pickscore.py --workdir runs/pickscore \
        --config.model.path=sd35m-flax --config.prompts.train_file=pickscore/train.txt \
        --config.prompts.test_file=pickscore/test.txt \
        --config.reward.options.pickscore.model=/models/PickScore_v1

PickScore_v1 and its CLIP-H processor must be on disk (no downloads; see docs/rewards.md).
Should reach: PickScore clearly above the base model's (the paper reports it up, with image
quality kept by the KL; beta 0.01, lower than GenEval/OCR's 0.04). Our reward is the
PickScore logit divided by 26 (docs/rewards.md).

Reproduces the reference's config/grpo.py:pickscore_sd3 (groups of equal rewards dropped, EMA
every 8 updates). Variants (flowgrpo_jax/families/sd3/configs.py): ":fast_nocfg" (the
reference's pickscore_sd3_fast_nocfg: the CPS window without CFG, 64 prompts x 18 images an
epoch), ":fast" (this project's composition: the window with CFG), ":full" (full
fine-tuning, FSDP), ":tiny" (a tiny SD3.5-style pipeline on CPU, given as --config.model.path;
reward brightness, a learnable offline stand-in for a CLIP preference model; the pickscore
options stay in the config and are not used).
"""
import ml_collections

from flowgrpo_jax import config as config_lib
from flowgrpo_jax.families.sd3 import configs as sd3_configs


def get_config(variant: str = ""):
    config = config_lib.defaults()
    config.model = sd3_configs.sd35m()
    config.prompts.format = "text"
    config.prompts.train_file = "pickscore/train.txt"
    config.prompts.test_file = "pickscore/test.txt"
    config.reward.rewards = "pickscore:1.0"
    config.reward.options = ml_collections.ConfigDict({"pickscore": {"model": "PickScore_v1"}})
    config.train.beta = 0.01
    config.eval_every, config.save_every = 60, 60
    config.num_epochs = 10000
    sd3_configs.reference_protocol(config)
    config = sd3_configs.variant(config, variant, tiny_rewards="brightness:1.0")
    names = variant.split(",")
    if "fast_nocfg" in names:  # the reference's pickscore_sd3_fast_nocfg: 64 prompts x 18
        config.sample.groups_per_epoch, config.sample.group_size = 64, 18
    if "guard" in names:  # GRPO-Guard's PickScore clip
        config.train.clip_range = 4e-6
    return config
