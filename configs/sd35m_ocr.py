"""Flow-GRPO on SD3.5 Medium with the OCR reward (the paper's visual-text rendering run).

    python -m flowgrpo_jax.train --config configs/sd35m_ocr.py --workdir runs/ocr \
        --config.model.path=sd35m-flax --config.prompts.train_file=ocr/train.txt \
        --config.prompts.test_file=ocr/test.txt

Prompts are a text file, one per line, the text to render between double quotes. The reward
server runs `ocr` (rapidocr-onnxruntime, offline; its agreement with the reference's PaddleOCR
scoring: docs/rewards.md). Reproduces the reference's config/grpo.py:general_ocr_sd3. Should
reach: OCR accuracy 0.59 (base) -> 0.92 (paper). Hyperparameters as sd35m_geneval (beta 0.04,
groups of equal rewards dropped, EMA every 8 updates).

Variants (flowgrpo_jax/families/sd3/configs.py): ":fast" and ":fast_nocfg" (this project's
compositions: the reference ships no Fast config for OCR), ":full" (full fine-tuning, FSDP),
":tiny" (a tiny SD3.5-style pipeline on CPU, given as --config.model.path;
the reward is jpeg_compressibility, an offline stand-in: a tiny random model draws no text).
"""
from flowgrpo_jax import config as config_lib
from flowgrpo_jax.families.sd3 import configs as sd3_configs


def get_config(variant: str = ""):
    config = config_lib.defaults()
    config.model = sd3_configs.sd35m()
    config.prompts.format = "text"
    config.prompts.train_file = "ocr/train.txt"
    config.prompts.test_file = "ocr/test.txt"
    config.reward.rewards = "ocr:1.0"
    config.train.beta = 0.04
    config.eval_every, config.save_every = 60, 60
    config.num_epochs = 10000
    sd3_configs.reference_protocol(config)
    config = sd3_configs.variant(config, variant, tiny_rewards="jpeg_compressibility:1.0")
    if "nft" in variant.split(","):  # DiffusionNFT's sd3_ocr: a weaker beta, two updates an
        # epoch, and an old policy that follows the current one for 75 updates, then slows
        config.nft.beta, config.train.updates_per_epoch = 0.1, 2
        config.nft.decay_start, config.nft.decay_rate, config.nft.decay_max = 75, 0.0075, 0.999
    return config
