"""The RL objectives, by the name a config's `train.objective` gives.

Each is a module of this package whose `OBJECTIVE` (an `objectives.base.Objective`) tells the
core what its rollout records, how rewards become its targets, its loss and its own state; the
trainer, the shared update and the planner name none of them. Adding one is a module and a
line in `OBJECTIVES`.
"""
import importlib

from flowgrpo_jax.objectives.base import Objective

# name -> module holding OBJECTIVE
OBJECTIVES = {
    "grpo": "flowgrpo_jax.objectives.grpo",
    "grpo_guard": "flowgrpo_jax.objectives.grpo_guard",
    "nft": "flowgrpo_jax.objectives.nft",
}


def load(name: str) -> Objective:
    """The Objective registered as `name`, with its default options."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return importlib.import_module(OBJECTIVES[name]).OBJECTIVE


def for_config(config) -> Objective:
    """config.train.objective with the options config sets."""
    return load(config.train.objective).configured(config)
