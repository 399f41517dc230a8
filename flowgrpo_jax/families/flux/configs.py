"""The FLUX family's model and run settings, for the `configs/flux_*.py` files."""
import ml_collections

from flowgrpo_jax import config as config_lib
from flowgrpo_jax.families.sd3.configs import TINY_PROMPTS


def flux1_dev(path: str = "flux1-dev-flax") -> ml_collections.ConfigDict:
    """FLUX.1-dev converted by tools/convert_weights.py, at 512 px in bf16 with its distilled
    guidance 3.5 (an input of the model, not classifier-free guidance) and 128 T5 tokens, as the
    reference's train_flux.py encodes prompts."""
    return ml_collections.ConfigDict({
        "family": "flux", "path": path, "resolution": 512, "dtype": "bfloat16",
        "max_sequence_length": 128, "guidance": 3.5, "attention": "auto", "scan_layers": True})


def reference_run(config) -> ml_collections.ConfigDict:
    """What every FLUX run of the reference (config/grpo.py: pickscore_flux, geneval_flux_fast;
    scripts/train_flux.py) shares: 6 sampling steps, 28 at evaluation, no CFG (the guidance is
    the model's input), groups of 24 images of 48 prompts an epoch, two updates an epoch, no
    KL, LoRA r64 alpha 128, every group kept, and the EMA stepped every 8 updates at 0.9 once
    per sample batch: 6 batches an update on its 32 GPUs, so a decay of 0.9^6 (docs/design.md,
    section 9)."""
    s, t = config.sample, config.train
    s.num_steps, s.eval_num_steps, s.guidance_scale = 6, 28, 1.0
    s.group_size, s.groups_per_epoch = 24, 48
    t.updates_per_epoch, t.beta, t.ema = 2, 0.0, True
    t.ema_every, t.ema_max_decay = 8, 0.9 ** 6
    config.lora.rank, config.lora.alpha = 64, 128.0
    return config


def tiny(config, rewards: str) -> ml_collections.ConfigDict:
    """`config` at CPU size (config.tiny) on a tiny FLUX-style pipeline, in float32 at 64 px
    (16 packed latent tokens) with 16 T5 tokens, trained on short text prompts with the offline
    reward `rewards`. The pipeline's folder is `--config.model.path` (tests convert a tiny
    random diffusers one)."""
    config = config_lib.tiny(config)
    config.model = ml_collections.ConfigDict({
        "family": "flux", "path": "", "resolution": 64, "dtype": "float32",
        "max_sequence_length": 16, "guidance": 3.5, "attention": "auto", "scan_layers": True})
    config.prompts.format = "text"
    config.prompts.train_file = config.prompts.test_file = TINY_PROMPTS
    config.reward.rewards = rewards
    return config


# The variants every configs/flux_*.py file offers beside its default (""); several join with
# commas and apply in order, e.g. "nft,tiny".
VARIANTS = ("fast", "nft", "guard", "tiny")


def variant(config, names: str, *, tiny_rewards: str) -> ml_collections.ConfigDict:
    """`config` as the variants `names` (of VARIANTS, comma-separated; "" for itself)."""
    for name in filter(None, names.split(",")):
        if name == "tiny":
            config = tiny(config, rewards=tiny_rewards)
        elif name == "fast":  # FLUX has no CFG to keep: the windowed run is the reference's
            config = config_lib.fast(config, cfg=False)
        elif name == "nft":
            config = config_lib.nft(config)
        elif name == "guard":
            config = config_lib.guard(config)
        else:
            raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return config
