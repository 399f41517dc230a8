"""The SD3 family's model configs, for the `configs/sd35m_*.py` files."""
import os

import ml_collections

from flowgrpo_jax import config as config_lib

# Short text prompts for the tiny variant: any text suits the tiny pipeline's tokenizers.
TINY_PROMPTS = os.path.join(os.path.dirname(__file__), "tiny_prompts.txt")


def sd35m(path: str = "sd35m-flax") -> ml_collections.ConfigDict:
    """SD3.5 Medium converted by tools/convert_weights.py, at 512 px in bf16, attention by
    platform (models/attention.py)."""
    return ml_collections.ConfigDict({
        "family": "sd3", "path": path, "resolution": 512, "dtype": "bfloat16",
        "max_sequence_length": 128, "attention": "auto"})


def tiny(config, rewards: str) -> ml_collections.ConfigDict:
    """`config` at CPU size (config.tiny) on a tiny SD3.5-style pipeline, in float32 at 32 px
    with 16 T5 tokens, trained on short text prompts with the offline reward `rewards`. The
    pipeline's folder is `--config.model.path` (tests convert a tiny random diffusers one)."""
    config = config_lib.tiny(config)
    config.model = ml_collections.ConfigDict({
        "family": "sd3", "path": "", "resolution": 32, "dtype": "float32",
        "max_sequence_length": 16, "attention": "auto"})
    config.prompts.format = "text"
    config.prompts.train_file = config.prompts.test_file = TINY_PROMPTS
    config.reward.rewards = rewards
    return config
