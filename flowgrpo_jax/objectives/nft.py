"""DiffusionNFT: negative-aware fine-tuning on the forward process (docs/design.md, section 13).

Rollouts come from the old policy theta_old with any sampler (deterministic by default, no
CFG); only their final latents x0 are kept. Rewards become optimality probabilities
r = clip(0.5 + 0.5 A / c, 0, 1) (A the group advantage, c = train.adv_clip_max). Each sample
trains int(T * timestep_fraction) of the sampler's T grid sigmas (a random permutation per
sample, its first ones), each with fresh noise:

    x_t   = (1 - t) x0 + t eps
    v_pos = beta v + (1 - beta) v_old,        v_neg = (1 + beta) v_old - beta v
    e_pos = x_t - t v_pos - x0,               e_neg = x_t - t v_neg - x0
    w     = stop_grad(max(mean_dims|e|, 1e-5))  per branch
    L_pol = (c / beta) mean_batch[ r mean_dims(e_pos^2) / w_pos + (1 - r) mean_dims(e_neg^2) / w_neg ]
    loss  = L_pol + kl_weight mean_batch[ mean_dims((v - v_ref)^2) ]

with v = v_theta(x_t, t), v_old and v_ref (the reference: LoRA off) without gradient, beta =
`nft.beta` and kl_weight = `train.beta`. After an epoch's updates, with n the updates so far,
theta_old <- d theta_old + (1 - d) theta, d = 0 for n < `nft.decay_start`, else
min((n - decay_start) * `nft.decay_rate`, `nft.decay_max`) (decay_max 0: fully on-policy).
"""
import jax
import jax.numpy as jnp
import numpy as np

from flowgrpo_jax.objectives.base import Objective

WEIGHT_FLOOR = 1e-5


def optimality(advantages, clip_max: float) -> np.ndarray:
    """r in [0, 1] from (clipped) advantages: 0.5 for A = 0, 1 at A = clip_max."""
    advantages = np.clip(np.asarray(advantages, np.float32), -clip_max, clip_max)
    return np.clip(0.5 + 0.5 * advantages / clip_max, 0.0, 1.0).astype(np.float32)


def _mean_dims(a):
    return jnp.mean(a, axis=tuple(range(1, a.ndim)))


def nft_loss(v, v_old, v_ref, x_t, x0, t, r, *, beta, kl_weight, adv_clip_max):
    """(loss, stats) of one training timestep of a batch; t (B,), r (B,); no KL term when
    v_ref is None."""
    t = t.reshape((-1,) + (1,) * (x0.ndim - 1))
    v_old = jax.lax.stop_gradient(v_old)

    def branch(v_branch):
        error = x_t - t * v_branch - x0
        weight = jax.lax.stop_gradient(jnp.maximum(_mean_dims(jnp.abs(error)), WEIGHT_FLOOR))
        return _mean_dims(jnp.square(error)) / weight

    positive = branch(beta * v + (1 - beta) * v_old)
    negative = branch((1 + beta) * v_old - beta * v)
    policy_loss = adv_clip_max / beta * jnp.mean(r * positive + (1 - r) * negative)
    stats = {"policy_loss": policy_loss,
             "old_deviation": jnp.mean(jnp.square(jax.lax.stop_gradient(v) - v_old))}
    loss = policy_loss
    if v_ref is not None:
        stats["kl"] = jnp.mean(_mean_dims(jnp.square(v - jax.lax.stop_gradient(v_ref))))
        loss = loss + kl_weight * stats["kl"]
    stats["loss"] = loss
    return loss, stats


def old_policy_decay(updates_done, start, rate, maximum):
    """The old policy's decay after `updates_done` optimizer updates."""
    n = updates_done.astype(jnp.float32)
    return jnp.where(n < start, 0.0, jnp.minimum((n - start) * rate, maximum))


class NFT(Objective):
    name = "nft"
    records = ("final_latents",)

    def check(self, config):
        n = config.nft
        if not n.beta > 0:
            return f"config.nft.beta={n.beta!r}: must be > 0"
        if not 0 <= n.decay_max < 1:
            return f"config.nft.decay_max={n.decay_max!r}: must be in [0, 1)"
        for key in ("decay_start", "decay_rate"):
            if n[key] < 0:
                return f"config.nft.{key}={n[key]!r}: must be >= 0"
        return None

    def hyperparameters(self, config):
        n = config.nft
        return {"nft_beta": n.beta, "decay_start": float(n.decay_start),
                "decay_rate": n.decay_rate, "decay_max": n.decay_max}

    def targets(self, advantages, config):
        return optimality(advantages.advantages, config.train.adv_clip_max)

    def init_extra(self, params):
        return {"old_params": jax.tree.map(jnp.copy, params)}

    def sampling_params(self, params, extra):
        return extra["old_params"]

    def term_loss(self, params, inputs, micro, j, key):
        grid = jnp.asarray(inputs.settings.train_sigmas, jnp.float32)
        x0 = micro["final_latents"].astype(jnp.float32)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(micro["ids"])
        order = jax.vmap(lambda k: jax.random.permutation(k, grid.shape[0]))(keys)
        t = grid[order[:, j]]
        eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1 + j), x0.shape[1:]))(keys)
        x_t = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * eps
        velocity = lambda p: inputs.velocity(p, x_t, t, micro["text"])
        h = inputs.hyper
        v_ref = velocity(inputs.reference) if inputs.settings.kl else None
        return nft_loss(velocity(params), velocity(inputs.extra["old_params"]), v_ref,
                        x_t, x0, t, micro["targets"],
                        beta=h["nft_beta"], kl_weight=h["beta"],
                        adv_clip_max=inputs.settings.adv_clip_max)

    def after_epoch(self, state):
        h = state.hyper
        d = old_policy_decay(state.step, h["decay_start"], h["decay_rate"], h["decay_max"])
        old = jax.tree.map(lambda o, p: (d * o + (1 - d) * p).astype(o.dtype),
                           state.extra["old_params"], state.params)
        return state.replace(extra={**state.extra, "old_params": old})


OBJECTIVE = NFT()
