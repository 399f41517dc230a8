"""Flow-GRPO on FLUX.1-dev with the GenEval reward.

    python -m flowgrpo_jax.train --config configs/flux_geneval.py --workdir runs/flux-geneval \
        --config.model.path=flux1-dev-flax --config.prompts.train_file=geneval/train_metadata.jsonl \
        --config.prompts.test_file=geneval/test_metadata.jsonl \
        --config.reward.options.geneval_remote.url=http://127.0.0.1:18085

Reproduces the reference's config/grpo.py:geneval_flux_fast, its only FLUX GenEval run: 6 steps
with the CPS SDE at noise 0.8 only in a 3-step window starting in steps 0-2 (28 ODE steps at
evaluation), clip 1e-5, 512 px, 128 T5 tokens, the model's distilled guidance 3.5 and no CFG,
groups of 24 images of 48 prompts an epoch, two updates an epoch, no KL, LoRA r64 alpha 128,
the EMA every 8 updates. GenEval trains strict and evaluates with only_strict=0, as
configs/sd35m_geneval.py. Variants (flowgrpo_jax/families/flux/configs.py): ":nft", ":guard",
":tiny" (a tiny FLUX-style pipeline on CPU, given as --config.model.path; reward brightness, an
offline stand-in); ":fast" is the default already.
"""
import ml_collections

from flowgrpo_jax import config as config_lib
from flowgrpo_jax.families.flux import configs as flux_configs


def get_config(variant: str = ""):
    config = config_lib.defaults()
    config.model = flux_configs.flux1_dev()
    config.prompts.format = "geneval"
    config.prompts.train_file = "geneval/train_metadata.jsonl"
    config.prompts.test_file = "geneval/test_metadata.jsonl"
    config.reward.rewards = "geneval_remote:1.0"
    config.reward.options = ml_collections.ConfigDict(
        {"geneval_remote": {"url": "http://127.0.0.1:18085"}})
    config.reward.eval_options = ml_collections.ConfigDict({"geneval_remote": {"only_strict": 0}})
    flux_configs.reference_run(config)
    config = config_lib.fast(config, cfg=False)
    config.eval_every, config.save_every = 30, 30
    config.num_epochs = 10000
    return flux_configs.variant(config, variant, tiny_rewards="brightness:1.0")
