"""Flow-GRPO on SD3.5 Medium with the GenEval reward (the paper's GenEval run).

    python -m flowgrpo_jax.train --config configs/sd35m_geneval.py --workdir runs/geneval \
        --config.model.path=sd35m-flax --config.prompts.train_file=geneval/train_metadata.jsonl \
        --config.prompts.test_file=geneval/test_metadata.jsonl \
        --config.reward.url=http://127.0.0.1:18085   # or a reward server with geneval_remote

Should reach: GenEval overall 0.63 (base) -> 0.95 (paper, about 2k+ epochs on 32 GPUs), with
little reward hacking (watch train/kl). 24 images x 48 prompts per epoch, 10 SDE steps
(noise 0.7), eval with the 40-step ODE, CFG 4.5, beta 0.04, clip 1e-4, LoRA r32/alpha 64,
lr 3e-4, 2 updates per epoch, global-std advantages, EMA.

Variants: ":fast" (Flow-GRPO-Fast: CPS window of 3 steps starting in steps 0-2, noise 0.8,
clip 1e-5, beta 0), ":fast_nocfg" (the same without CFG), ":full" (full fine-tuning of the
MMDiT, sharded over every chip, 16 images a micro batch, lr 1e-5), ":tiny" (a tiny SD3.5-style
pipeline on CPU, given as --config.model.path, 2 epochs of 16 images with the offline
jpeg_compressibility reward; what the tests run).
"""
from flowgrpo_jax import config as config_lib
from flowgrpo_jax.families.sd3 import configs as sd3_configs


def get_config(variant: str = ""):
    config = config_lib.defaults()
    config.model = sd3_configs.sd35m()
    config.prompts.format = "geneval"
    config.prompts.train_file = "geneval/train_metadata.jsonl"
    config.prompts.test_file = "geneval/test_metadata.jsonl"
    config.reward.rewards = "geneval_remote:1.0"
    config.train.beta = 0.04
    config.eval_every, config.save_every = 60, 60
    config.num_epochs = 10000
    return sd3_configs.variant(config, variant, tiny_rewards="jpeg_compressibility:1.0")
