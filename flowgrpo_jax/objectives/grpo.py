"""Flow-GRPO: the clipped likelihood-ratio objective on the rollout's stochastic steps, with a KL
to the reference (docs/design.md, section 7).

Per micro batch and trained step j (the first int(T * timestep_fraction) stored steps):

    ratio = exp(log_ratio),  log_ratio = log p_theta - log p_old
    L_pg  = mean_batch[ w * max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) ]
    KL    = mean_batch[ mean_dims((mean - mean_ref)^2) / (2 * std^2) ]
    loss  = L_pg + beta * KL

with w = 1 here (GRPO-Guard's per-step weight otherwise). `std` is the sampler's per-step
noise scale std_t (StepOutput.std, without the sqrt(-dt) factor), as in the Flow-GRPO
reference; the KL between the two step Gaussians would divide by std_t^2 * (-dt) instead, so
this KL is the reference's scaled variant, kept for parity.

The log-ratio's value comes from the update itself against the rollout's log-probs, or, with
exact ratios, from `micro["log_ratios"]` (zeros on an epoch's first update, rescore-program
differences after it) with the gradient of the update's own log-prob (`with_gradient_of`).
"""
import jax
import jax.numpy as jnp

from flowgrpo_jax.objectives.base import Inputs, LikelihoodObjective
from flowgrpo_jax.sampling.rollout import score_step


def clipped_surrogate(log_ratio, advantages, clip_range, weights=1.0):
    """PPO clipped policy loss (scalar) and the per-sample probability ratio (B,)."""
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return jnp.mean(weights * jnp.maximum(unclipped, clipped)), ratio


def mean_kl(mean, ref_mean, std):
    """KL penalty between the policy's and the reference's step means, averaged over the batch.

    `mean`, `ref_mean`: (B, ...); `std`: per-sample std_t, shape (B,) or broadcastable to it.
    """
    batch = mean.shape[0]
    sq = jnp.mean(jnp.square(mean - ref_mean).reshape(batch, -1), axis=1)
    std = jnp.broadcast_to(jnp.reshape(std, (-1,)) if jnp.ndim(std) else std, (batch,))
    return jnp.mean(sq / (2.0 * jnp.square(std)))


def grpo_loss(log_ratio, advantages, mean, ref_mean, std, *, clip_range, beta, weights=1.0):
    """Total loss and its statistics for one step; no KL term when ref_mean is None.
    Statistics named *_min and *_max are the batch's extremes, the others its means."""
    policy_loss, ratio = clipped_surrogate(log_ratio, advantages, clip_range, weights)
    stats = {
        "policy_loss": policy_loss,
        "approx_kl": 0.5 * jnp.mean(jnp.square(log_ratio)),
        "clipfrac": jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32)),
        "ratio_mean": jnp.mean(ratio),
        "ratio_min": jnp.min(ratio),
        "ratio_max": jnp.max(ratio),
    }
    loss = policy_loss
    if ref_mean is not None:
        stats["kl"] = mean_kl(mean, ref_mean, std)
        loss = loss + beta * stats["kl"]
    stats["loss"] = loss
    return loss, stats


@jax.custom_vjp
def with_gradient_of(value, source):
    """`value` itself, with the gradient of `source` (same shape): the forward pass returns
    `value` bit for bit, the backward pass hands `source` the whole cotangent."""
    return value


with_gradient_of.defvjp(lambda value, source: (value, None),
                        lambda _, cotangent: (jnp.zeros_like(cotangent), cotangent))


class GRPO(LikelihoodObjective):
    name = "grpo"
    # step j goes trajectory[:, j] -> trajectory[:, j + 1]: each latent stored once
    records = ("trajectory", "log_probs", "sigmas", "next_sigmas")
    ratio_records = ("log_probs",)

    def check(self, config):
        if config.sample.kind not in ("sde", "cps"):
            return (f"config.sample.kind={config.sample.kind!r}: {self.name} trains the "
                    f"log-probabilities of a stochastic sampler, 'sde' or 'cps'")
        return None

    def hyperparameters(self, config):
        return {"clip_range": config.train.clip_range}

    def _score(self, params, inputs: Inputs, micro, j):
        s, h = inputs.settings, inputs.hyper
        x, x_next = micro["trajectory"][:, j], micro["trajectory"][:, j + 1]
        sigma, sigma_next = micro["sigmas"][:, j], micro["next_sigmas"][:, j]
        return score_step(inputs.velocity_fn, (params, inputs.frozen), x, x_next, sigma,
                          sigma_next, micro["text"], kind=s.kind, noise_level=h["noise_level"],
                          sigma_max=s.sigma_max, guidance_scale=h["guidance_scale"],
                          uncond_text=inputs.uncond)

    def step_records(self, params, inputs, micro, j):
        return self._records(self._score(params, inputs, micro, j))

    def _records(self, out):
        """The ratio_records (and the noise std) of a scored step."""
        every = {"log_probs": out.log_prob, "means": out.mean}
        return {**{k: every[k] for k in self.ratio_records}, "noise_std": out.noise_std}

    def log_ratio(self, new, old):
        return new["log_probs"] - old["log_probs"]

    def step_weights(self, micro, j):
        """Each sample's weight in the policy loss of step j."""
        return 1.0

    def term_loss(self, params, inputs, micro, j, key):
        del key
        out = self._score(params, inputs, micro, j)
        new = self._records(out)
        old = {**{k: micro[k][:, j] for k in self.ratio_records}, "noise_std": out.noise_std}
        log_ratio = self.log_ratio(new, old)
        if "log_ratios" in micro:
            log_ratio = with_gradient_of(micro["log_ratios"][:, j], log_ratio)
        ref_mean = None
        if inputs.settings.kl:
            ref_mean = jax.lax.stop_gradient(self._score(inputs.reference, inputs, micro, j).mean)
        h = inputs.hyper
        return grpo_loss(log_ratio, micro["targets"], out.mean, ref_mean, out.std,
                         clip_range=h["clip_range"], beta=h["beta"],
                         weights=self.step_weights(micro, j))


OBJECTIVE = GRPO()
