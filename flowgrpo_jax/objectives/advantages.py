"""Group-relative advantages: each reward is compared with the other samples of its prompt.

Runs on the host in numpy: rewards come back from the reward process as host data, and the
result feeds the next train step as a plain array.

A = (r - mean of its group) / (std + 1e-4), with std over all rewards of the epoch
(`global_std=True`, the Flow-GRPO default) or over the group, then clipped to +-clip_max.
Groups with identical rewards carry no learning signal: their advantages are exactly zero and
`keep` marks the samples of the other groups, for callers that drop them.
"""
from dataclasses import dataclass

import numpy as np

STD_EPS = 1e-4


@dataclass(frozen=True)
class Advantages:
    advantages: np.ndarray  # (N,) float32
    keep: np.ndarray  # (N,) bool: False for samples of zero-std groups
    zero_std_ratio: float  # fraction of groups whose rewards are all equal
    group_std_mean: float  # mean over groups of the within-group reward std
    num_groups: int


def group_advantages(prompts, rewards, *, global_std: bool = True, clip_max: float = 5.0):
    """Advantages of one epoch's rewards, grouped by prompt (any hashable keys: text or ids)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    keys = np.asarray(prompts)
    if rewards.ndim != 1 or keys.shape != rewards.shape:
        raise ValueError(
            f"prompts and rewards must be 1-D of equal length, got {keys.shape} and {rewards.shape}"
        )
    if rewards.size == 0:
        raise ValueError("no rewards to compute advantages from")
    if not np.all(np.isfinite(rewards)):
        raise ValueError("rewards contain NaN or inf")

    _, group, counts = np.unique(keys, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    num_groups = counts.size
    group_mean = np.bincount(group, weights=rewards, minlength=num_groups) / counts
    centered = rewards - group_mean[group]
    group_std = np.sqrt(np.bincount(group, weights=centered**2, minlength=num_groups) / counts)
    # Decided on max == min, not std == 0: a float mean of equal values need not equal them.
    group_max = np.full(num_groups, -np.inf)
    group_min = np.full(num_groups, np.inf)
    np.maximum.at(group_max, group, rewards)
    np.minimum.at(group_min, group, rewards)
    constant = group_max == group_min

    std = np.std(rewards) if global_std else group_std[group]
    advantages = np.clip(centered / (std + STD_EPS), -clip_max, clip_max)
    advantages[constant[group]] = 0.0
    return Advantages(
        advantages=advantages.astype(np.float32),
        keep=~constant[group],
        zero_std_ratio=float(constant.mean()),
        group_std_mean=float(group_std.mean()),
        num_groups=int(num_groups),
    )


class PerPromptStatTracker:
    """Advantages per epoch plus the running set of prompts trained on so far.

    Statistics never carry over between epochs (the reference clears them after each update);
    what persists is the set of prompts seen, saved and restored with `state_dict` /
    `load_state_dict` as plain lists.
    """

    def __init__(self, *, global_std: bool = True, clip_max: float = 5.0):
        self.global_std = global_std
        self.clip_max = clip_max
        self.seen_prompts: set = set()

    def update(self, prompts, rewards) -> Advantages:
        result = group_advantages(
            prompts, rewards, global_std=self.global_std, clip_max=self.clip_max
        )
        self.seen_prompts.update(np.asarray(prompts).tolist())
        return result

    @property
    def num_seen_prompts(self) -> int:
        return len(self.seen_prompts)

    def state_dict(self) -> dict:
        return {"seen_prompts": sorted(self.seen_prompts)}

    def load_state_dict(self, state: dict) -> None:
        self.seen_prompts = set(state["seen_prompts"])
