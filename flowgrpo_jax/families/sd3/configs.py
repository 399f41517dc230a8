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
        "max_sequence_length": 128, "attention": "auto", "scan_layers": True})


def reference_protocol(config) -> ml_collections.ConfigDict:
    """What the reference's SD3.5-M runs (32 GPUs) do beside their hyperparameters: samples of
    groups whose rewards are all equal leave the updates, and the eval EMA steps every 8
    updates, each step applied twice (once per sample batch, 2 an update), so its decay is
    0.9^2 (docs/design.md, section 9)."""
    config.train.drop_zero_std_groups = True
    config.train.ema_every, config.train.ema_max_decay = 8, 0.81
    return config


def tiny(config, rewards: str) -> ml_collections.ConfigDict:
    """`config` at CPU size (config.tiny) on a tiny SD3.5-style pipeline, in float32 at 32 px
    with 16 T5 tokens, trained on short text prompts with the offline reward `rewards`. The
    pipeline's folder is `--config.model.path` (tests convert a tiny random diffusers one)."""
    config = config_lib.tiny(config)
    config.model = ml_collections.ConfigDict({
        "family": "sd3", "path": "", "resolution": 32, "dtype": "float32",
        "max_sequence_length": 16, "attention": "auto", "scan_layers": True})
    config.prompts.format = "text"
    config.prompts.train_file = config.prompts.test_file = TINY_PROMPTS
    config.reward.rewards = rewards
    return config


def full_fine_tuning(config) -> ml_collections.ConfigDict:
    """`config` training every MMDiT weight instead of LoRA, the weights, optimizer state, EMA
    and reference copy sharded over every device (mesh.fsdp) and 16 images a micro batch (2 a
    chip on 8 chips, 4 on 4; the planner fits it on v6e-8, not on v5e-8: README). The
    rate is a full-weight one (LoRA's 3e-4 is far too large for the weights themselves); the
    paper trains LoRA only, so this is a starting point, not a reproduced setting."""
    config.lora.enabled = False
    config.mesh.data, config.mesh.fsdp = 1, -1
    config.train.micro_batch_size = 16
    config.train.learning_rate = 1e-5
    return config


# The variants every configs/sd35m_*.py file offers, beside its default (""); several join
# with commas and apply in order, e.g. "nft,tiny".
VARIANTS = ("fast", "fast_nocfg", "full", "nft", "guard", "tiny")


def variant(config, names: str, *, tiny_rewards: str) -> ml_collections.ConfigDict:
    """`config` as the variants `names` (of VARIANTS, comma-separated; "" for itself); the
    tiny one scores with the offline `tiny_rewards`."""
    for name in filter(None, names.split(",")):
        if name == "tiny":
            config = tiny(config, rewards=tiny_rewards)
        elif name in ("fast", "fast_nocfg"):
            config = config_lib.fast(config, cfg=name == "fast")
        elif name == "full":
            config = full_fine_tuning(config)
        elif name == "nft":
            config = config_lib.nft(config)
        elif name == "guard":
            config = config_lib.guard(config)
        else:
            raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return config
