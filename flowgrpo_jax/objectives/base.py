"""What the core asks of an RL objective (docs/design.md, section 11).

An objective says what the rollout must record, how rewards become its per-sample targets,
which numeric hyperparameters it reads, what state it carries beside the trained params, its
loss on one term of a micro batch (a trained step for GRPO, a training timestep for NFT), and
what follows an epoch's updates. The shared update (`flowgrpo_jax/update.py`) scans the terms
of every micro batch, averages the gradients and applies them; the trainer and the planner
call an objective only through this class.

Likelihood objectives (GRPO and GRPO-Guard, subclasses of `LikelihoodObjective`) also say
which per-step records their log-ratio compares (`ratio_records`), how to score them
(`step_records`) and how two scorings compare (`log_ratio`), which the exact ratios of
`train.exact_ratio` use to rescore an epoch's samples.
"""
import abc
from typing import Any, Callable, NamedTuple

import numpy as np

from flowgrpo_jax.sampling.rollout import guided_velocity


class Inputs(NamedTuple):
    """Everything a term's loss reads beside the params it differentiates."""

    velocity_fn: Callable  # velocity_fn((trainable, frozen), x, t, text)
    frozen: Any  # the untrained part of the model
    reference: Any  # trainable params of the KL reference (LoRA off, or the initial copy)
    extra: Any  # the objective's own state (Objective.init_extra)
    hyper: dict  # float32 scalars (update.hyperparameters)
    uncond: Any  # the negative prompt's embeddings (CFG), or None
    settings: Any  # update.Settings: what is fixed when the program compiles

    def velocity(self, params, x, sigma, text):
        """The float32 (guided) velocity of trainable `params` at x and per-sample sigma."""
        return guided_velocity(self.velocity_fn, (params, self.frozen), x, sigma, text,
                               guidance_scale=self.hyper["guidance_scale"],
                               uncond_text=self.uncond)


class Objective(abc.ABC):
    """An objective's defaults; each module of this package subclasses it (or
    LikelihoodObjective) as OBJECTIVE."""

    name = ""
    # Per-sample arrays of the rollout the update reads (sampling.rollout.Rollout fields).
    records: tuple = ()
    # The per-step records a likelihood objective's log-ratio compares; () for the others.
    ratio_records: tuple = ()

    def configured(self, config) -> "Objective":
        """This objective with the options `config` sets (the same one when it has none)."""
        return self

    def check(self, config) -> str | None:
        """What makes `config` unusable for this objective (one line), or None."""
        return None

    def hyperparameters(self, config) -> dict:
        """Its own numeric hyperparameters (float32 scalars of the train state)."""
        return {}

    def targets(self, advantages, config) -> np.ndarray:
        """Per-sample targets of the update from the epoch's group advantages."""
        return advantages.advantages

    def num_terms(self, settings) -> int:
        """Loss terms per micro batch."""
        return settings.num_terms

    def init_extra(self, params) -> Any:
        """State carried beside the trained params, in the train state (checkpointed)."""
        return {}

    def sampling_params(self, params, extra):
        """The trainable params the rollout samples with."""
        return params

    @abc.abstractmethod
    def term_loss(self, params, inputs: Inputs, micro: dict, j, key) -> tuple:
        """(loss, stats) of term j (traced) of a micro batch; `key` is this term's PRNG key.
        Stats named *_min / *_max are extremes, the others means."""

    def after_epoch(self, state):
        """The train state after an epoch's updates (NFT moves its old policy); None: as is."""
        return None


class LikelihoodObjective(Objective):
    """An objective on the rollout's step likelihoods (GRPO, GRPO-Guard): what the exact ratios
    rescore, and how two scorings become a log-ratio."""

    @abc.abstractmethod
    def step_records(self, params, inputs: Inputs, micro: dict, j) -> dict:
        """The ratio_records of term j scored at `params`, and the step's noise_std."""

    @abc.abstractmethod
    def log_ratio(self, new: dict, old: dict):
        """log(pi_new / pi_old) of each transition from two step_records dicts (leading dims
        alike: (B,) or (B, n))."""
