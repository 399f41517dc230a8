"""GRPO-Guard: Flow-GRPO with the per-step log-ratio normalised (RatioNorm) and the policy
gradient reweighted per step (docs/design.md, section 12).

With sigma_s = std_t * sqrt(-dt) the step's noise std and mu, mu_old the step means of the
current and the sampling policy:

    b         = mean_dims((mu - mu_old)^2) / (2 sigma_s^2)     (per sample; not detached)
    log_ratio = (log p - log p_old + b) * sigma_s
    L_pg      = mean_batch[ max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) / (-dt) ]

Since the rollout drew x_next = mu_old + sigma_s eps, log_ratio = mean_dims(eps (mu - mu_old)):
zero-mean, at one scale for every step, where GRPO's log-ratio carries a negative bias
-mean_dims((mu - mu_old)^2) / (2 sigma_s^2) that grows as sigma_s shrinks. `guard.batch_bias`
takes b as the mean over the micro batch, as the reference code computes it.
"""
import jax.numpy as jnp

from flowgrpo_jax.objectives.grpo import GRPO


class GRPOGuard(GRPO):
    name = "grpo_guard"
    records = GRPO.records + ("means",)
    ratio_records = ("log_probs", "means")

    def __init__(self, batch_bias: bool = False):
        self.batch_bias = batch_bias

    def configured(self, config):
        return GRPOGuard(batch_bias=config.guard.batch_bias)

    def check(self, config):
        if config.sample.kind != "sde":
            return (f"config.sample.kind={config.sample.kind!r}: grpo_guard normalises the "
                    f"SDE step's log-ratio; use 'sde'")
        return None

    def log_ratio(self, new, old):
        scale = new["noise_std"]
        bias = jnp.mean(jnp.square(new["means"] - old["means"]), axis=(-3, -2, -1))
        bias = bias / (2 * jnp.square(scale))
        if self.batch_bias:  # over the samples given: a micro batch's, or an update's
            bias = jnp.broadcast_to(jnp.mean(bias, axis=0), bias.shape)
        return (new["log_probs"] - old["log_probs"] + bias) * scale

    def step_weights(self, micro, j):
        return 1.0 / (micro["sigmas"][:, j] - micro["next_sigmas"][:, j])


OBJECTIVE = GRPOGuard()
