"""Flow-GRPO on SD3.5 Medium with the GenEval reward (the paper's GenEval run).

    python -m flowgrpo_jax.train --config configs/sd35m_geneval.py --workdir runs/geneval \
        --config.model.path=sd35m-flax --config.prompts.train_file=geneval/train_metadata.jsonl \
        --config.prompts.test_file=geneval/test_metadata.jsonl \
        --config.reward.options.geneval_remote.url=http://127.0.0.1:18085

The reference's GenEval server (its protocol: docs/rewards.md) runs beside, at the URL given.
Reproduces the reference's config/grpo.py:geneval_sd3. Should reach: GenEval overall 0.63
(base) -> 0.95 (paper, about 2k+ epochs on 32 GPUs), with little reward hacking (watch
train/kl). 24 images x 48 prompts per epoch, 10 SDE steps (noise 0.7), eval with the 40-step
ODE, CFG 4.5, beta 0.04, clip 1e-4, LoRA r32/alpha 64, lr 3e-4, 2 updates per epoch,
global-std advantages, groups of equal rewards dropped, EMA every 8 updates. Training scores
GenEval strictly; evaluation logs GenEval's accuracy (eval/geneval_remote/accuracy_mean).

Variants: ":fast_nocfg" (the reference's Flow-GRPO-Fast, config/grpo.py:geneval_sd3_fast_nocfg:
CPS window of 3 steps starting in steps 0-2, noise 0.8, clip 1e-5, beta 0, no CFG), ":fast"
(this project's composition: the same window with CFG, which the reference does not ship),
":full" (full fine-tuning of the MMDiT, sharded over every chip, 16 images a micro batch, lr
1e-5), ":tiny" (a tiny SD3.5-style pipeline on CPU, given as --config.model.path, 2 epochs of
16 images with the offline jpeg_compressibility reward; what the tests run).
"""
import ml_collections

from flowgrpo_jax import config as config_lib
from flowgrpo_jax.families.sd3 import configs as sd3_configs


def get_config(variant: str = ""):
    config = config_lib.defaults()
    config.model = sd3_configs.sd35m()
    config.prompts.format = "geneval"
    config.prompts.train_file = "geneval/train_metadata.jsonl"
    config.prompts.test_file = "geneval/test_metadata.jsonl"
    config.reward.rewards = "geneval_remote:1.0"
    config.reward.options = ml_collections.ConfigDict(
        {"geneval_remote": {"url": "http://127.0.0.1:18085"}})
    config.train.beta = 0.04
    config.eval_every, config.save_every = 60, 60
    # Training scores strictly, as the reference does; evaluation asks for GenEval's own
    # accuracy, the paper's metric (eval/geneval_remote/accuracy_mean, and per tag).
    config.reward.eval_options = ml_collections.ConfigDict({"geneval_remote": {"only_strict": 0}})
    config.num_epochs = 10000
    sd3_configs.reference_protocol(config)
    return sd3_configs.variant(config, variant, tiny_rewards="jpeg_compressibility:1.0")
