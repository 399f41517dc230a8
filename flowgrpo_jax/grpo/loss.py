"""The GRPO objective on one denoising step of a batch of trajectories (pure jnp).

loss = L_pg + beta * KL, where
  ratio = exp(log_ratio),  log_ratio = logp - logp_old  (train_step.py: where its value comes from)
  L_pg  = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))
  KL    = mean_batch[ mean_dims((mean - mean_ref)^2) / (2 * std^2) ]
`std` is the sampler's per-step noise scale std_t (StepOutput.std, without the sqrt(-dt)
factor), as in the Flow-GRPO reference; the KL between the two step Gaussians would divide by
std_t^2 * (-dt) instead, so this KL is the reference's scaled variant, kept for parity.
"""
import jax.numpy as jnp


def clipped_surrogate(log_ratio, advantages, clip_range):
    """PPO clipped policy loss (scalar) and the per-sample probability ratio (B,)."""
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return jnp.mean(jnp.maximum(unclipped, clipped)), ratio


def mean_kl(mean, ref_mean, std):
    """KL penalty between the policy's and the reference's step means, averaged over the batch.

    `mean`, `ref_mean`: (B, ...); `std`: per-sample std_t, shape (B,) or broadcastable to it.
    """
    batch = mean.shape[0]
    sq = jnp.mean(jnp.square(mean - ref_mean).reshape(batch, -1), axis=1)
    std = jnp.broadcast_to(jnp.reshape(std, (-1,)) if jnp.ndim(std) else std, (batch,))
    return jnp.mean(sq / (2.0 * jnp.square(std)))


def grpo_loss(log_ratio, advantages, mean, ref_mean, std, *, clip_range, beta):
    """Total loss and its statistics for one step; ref_mean may be None when beta == 0.
    Statistics named *_min and *_max are the batch's extremes, the others its means."""
    policy_loss, ratio = clipped_surrogate(log_ratio, advantages, clip_range)
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
    elif beta > 0:
        raise ValueError("beta > 0 needs the reference model's step means (ref_mean)")
    stats["loss"] = loss
    return loss, stats
