"""Flow-GRPO on FLUX.1-dev with the OCR reward.

    python -m flowgrpo_jax.train --config configs/flux_ocr.py --workdir runs/flux-ocr \
        --config.model.path=flux1-dev-flax --config.prompts.train_file=ocr/train.txt \
        --config.prompts.test_file=ocr/test.txt

The reference's config/grpo.py has no FLUX OCR run: this is its pickscore_flux (6 SDE steps at
noise 0.9, 28 at evaluation, 512 px, 128 T5 tokens, distilled guidance 3.5 and no CFG, groups
of 24 images of 48 prompts an epoch, two updates an epoch, no KL, LoRA r64 alpha 128, the EMA
every 8 updates) with configs/sd35m_ocr.py's reward and prompts. Variants
(flowgrpo_jax/families/flux/configs.py): ":fast" (the CPS window), ":nft", ":guard", ":tiny" (a
tiny FLUX-style pipeline on CPU, given as --config.model.path; reward jpeg_compressibility, an
offline stand-in).
"""
from flowgrpo_jax import config as config_lib
from flowgrpo_jax.families.flux import configs as flux_configs


def get_config(variant: str = ""):
    config = config_lib.defaults()
    config.model = flux_configs.flux1_dev()
    config.prompts.format = "text"
    config.prompts.train_file = "ocr/train.txt"
    config.prompts.test_file = "ocr/test.txt"
    config.reward.rewards = "ocr:1.0"
    flux_configs.reference_run(config)
    config.sample.noise_level = 0.9
    config.eval_every, config.save_every = 30, 30
    config.num_epochs = 10000
    return flux_configs.variant(config, variant, tiny_rewards="jpeg_compressibility:1.0")
