"""One GRPO optimizer update as a pure, jitted, sharded function, and the forward-only
rescoring that gives its ratios exact values.

The update rescores the rollout's stored transitions with the current policy (the same
`score_step` the rollout used, CFG with gradients through both branches), builds the GRPO loss
of `loss.py` per (micro-batch, timestep), averages the gradients over all of them with an
explicit `lax.scan` (what the reference's gradient accumulation computes, exactly), clips them
to a global norm, applies AdamW and updates an EMA of the trained params every `ema_every`
updates. An update whose loss or gradient norm is not finite is skipped (the state returned
unchanged) and counted in the metric "skipped_nonfinite" (1.0 for a skipped update, else 0.0).

The value of each log-ratio log p_theta - log p_old comes from one of two places
(docs/design.md, section 7):
- `batch.log_ratios` given (B, n): these values, with the gradient of the update's own
  log-prob (`with_gradient_of`). The trainer passes zeros on an epoch's first update, which is
  on-policy, and on later updates the difference of two `make_rescore` runs (the current params
  and the sampling params) of one compiled program, so no value ever mixes two programs;
- `batch.log_ratios` None: the update's log-prob minus the rollout's `batch.log_probs`, two
  programs whose numbers agree to float32 rounding only.

Parameters enter as two NNX states: `trainable` (what the optimizer updates) and `frozen`
(the rest). The velocity model is `velocity_fn((trainable, frozen), x, t, text)`
(`generator.nnx_velocity` builds one from an NNX graphdef). The reference policy for the KL term is
- with LoRA: the same weights with the LoRA zeroed (`lora.disabled`); pass `reference=None`;
- with full fine-tuning: a frozen copy of the initial trainable params, passed as `reference`
  (it costs a second copy of the weights, which LoRA avoids).
"""
import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from flowgrpo_jax import parallel
from flowgrpo_jax.grpo.loss import grpo_loss
from flowgrpo_jax.lora import disabled
from flowgrpo_jax.sampling.rollout import score_step


@dataclasses.dataclass(frozen=True)
class StepConfig:
    sigma_max: float  # the schedule's sigmas[1] (the SDE's stand-in for sigma == 1)
    num_train_steps: int  # train the first n stored steps of each trajectory
    micro_batch_size: int  # global samples per forward/backward
    kind: str = "sde"
    noise_level: float = 0.7
    guidance_scale: float = 4.5
    clip_range: float = 1e-4
    beta: float = 0.04
    ema_max_decay: float = 0.9
    ema_every: int = 1  # the EMA steps after updates n with (n + 1) % ema_every == 0


class TrainBatch(NamedTuple):
    """One optimizer update's share of an epoch's rollouts; B samples, T stored steps."""

    latents: jax.Array  # (B, T, H, W, C) step inputs
    next_latents: jax.Array  # (B, T, H, W, C) the sampled step outputs
    log_probs: jax.Array  # (B, T) log-probs at sampling time
    sigmas: jax.Array  # (B, T)
    next_sigmas: jax.Array  # (B, T)
    advantages: jax.Array  # (B,)
    text: Any  # pytree of (B, ...) prompt embeddings
    log_ratios: Any = None  # (B, n) values of the trained steps' log-ratios, or None (module doc)


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # optimizer updates done
    params: Any  # trainable NNX state
    opt_state: Any
    ema_params: Any


def num_train_timesteps(num_steps: int, fraction: float) -> int:
    """Trained steps per trajectory: the first int(num_steps * fraction) (0.99 of 10 -> 9)."""
    count = int(num_steps * fraction)
    if not 1 <= count <= num_steps:
        raise ValueError(f"timestep_fraction {fraction} of {num_steps} steps trains {count} steps")
    return count


def make_optimizer(learning_rate=3e-4, b1=0.9, b2=0.999, weight_decay=1e-4, eps=1e-8,
                   max_grad_norm=1.0, decay_steps: int = 0,
                   warmup_steps: int = 0) -> optax.GradientTransformation:
    """AdamW (decoupled decay, as torch.optim.AdamW) after global-norm gradient clipping. The
    rate is constant (as in the reference), or with `decay_steps` > 0 follows a cosine from
    `learning_rate` down to 0 over that many updates, or with `warmup_steps` > 0 rises
    linearly from 0 over that many updates, then stays."""
    if decay_steps > 0 and warmup_steps > 0:
        raise ValueError("give decay_steps or warmup_steps, not both")
    if decay_steps > 0:
        learning_rate = optax.cosine_decay_schedule(learning_rate, decay_steps)
    if warmup_steps > 0:
        learning_rate = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )


def init_train_state(params, optimizer) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
    )


def create_train_state(params, optimizer, mesh, rules=parallel.DEFAULT_RULES) -> TrainState:
    """The initial state, built under jit directly into its shardings over `mesh`."""
    init = functools.partial(init_train_state, optimizer=optimizer)
    shardings = parallel.state_shardings(jax.eval_shape(init, params), mesh, rules)
    return jax.jit(init, out_shardings=shardings)(params)


def ema_decay(updates_done, max_decay, every: int = 1):
    """min((1 + n) / (10 + n), max_decay) after update n when (n + 1) % every == 0 (as the
    reference counts), else 1 (the EMA stays): a short memory early, then the fixed decay."""
    n = updates_done.astype(jnp.float32)
    stepped = (updates_done + 1) % every == 0
    return jnp.where(stepped, jnp.minimum((1.0 + n) / (10.0 + n), max_decay), 1.0)


def ema_update(ema, params, decay):
    """One step of the exponential moving average of a params tree."""
    return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


def _micro_batches(batch: TrainBatch, micro_batch_size: int, mesh, rules):
    """(B, ...) -> (B / m, m, ...); micro-batch i takes samples i, i + B/m, ... so that each one
    stays split over all devices the way the full batch is."""
    size = batch.advantages.shape[0]
    count = size // micro_batch_size

    sharding = NamedSharding(mesh, PartitionSpec(None, *parallel.batch_sharding(mesh, rules).spec))

    def split(a):
        a = jnp.swapaxes(a.reshape((micro_batch_size, count) + a.shape[1:]), 0, 1)
        return jax.lax.with_sharding_constraint(a, sharding)

    return jax.tree.map(split, batch)


def _transitions(batch: TrainBatch, num_train_steps: int):
    """The trained steps of a micro batch, time axis first: (m, T, ...) -> (n, m, ...), as
    (latents, next_latents, log_probs, sigmas, next_sigmas, log_ratios or None)."""
    per_step = lambda a: None if a is None else jnp.swapaxes(a[:, :num_train_steps], 0, 1)
    return tuple(map(per_step, (batch.latents, batch.next_latents, batch.log_probs, batch.sigmas,
                                batch.next_sigmas, batch.log_ratios)))


@jax.custom_vjp
def with_gradient_of(value, source):
    """`value` itself, with the gradient of `source` (same shape): the forward pass returns
    `value` bit for bit, the backward pass hands `source` the whole cotangent."""
    return value


with_gradient_of.defvjp(lambda value, source: (value, None),
                        lambda _, cotangent: (jnp.zeros_like(cotangent), cotangent))


def _scorer(velocity_fn, config: StepConfig):
    """score(params, x, x_next, sigma, sigma_next, text, uncond_text) -> StepOutput: one stored
    transition scored with the sampler's settings."""
    def score(params, x, x_next, sigma, sigma_next, text, uncond_text):
        return score_step(velocity_fn, params, x, x_next, sigma, sigma_next, text,
                          kind=config.kind, noise_level=config.noise_level,
                          sigma_max=config.sigma_max, guidance_scale=config.guidance_scale,
                          uncond_text=uncond_text)

    return score


def _reduce(name: str):
    """How per-step statistics combine: extremes by min / max, the rest summed (then averaged)."""
    return jnp.minimum if name.endswith("_min") else jnp.maximum if name.endswith("_max") else jnp.add


def _identity(name: str, like):
    fill = jnp.inf if name.endswith("_min") else -jnp.inf if name.endswith("_max") else 0.0
    return jnp.full(like.shape, fill, like.dtype)


def _check_batch(batch: TrainBatch, config: StepConfig, mesh, rules):
    size, steps = batch.log_probs.shape
    if size % config.micro_batch_size:
        raise ValueError(f"batch of {size} samples is not a multiple of micro_batch_size "
                         f"{config.micro_batch_size}")
    shards = parallel.batch_shard_count(mesh, rules)
    if config.micro_batch_size % shards:
        raise ValueError(f"micro_batch_size {config.micro_batch_size} must be a multiple of the "
                         f"{shards} devices the batch is split over")
    if config.num_train_steps > steps:
        raise ValueError(f"num_train_steps {config.num_train_steps} exceeds the {steps} stored steps")
    if batch.log_ratios is not None and batch.log_ratios.shape != (size, config.num_train_steps):
        raise ValueError(f"log_ratios of shape {batch.log_ratios.shape}, expected "
                         f"{(size, config.num_train_steps)} (samples, trained steps)")


def make_train_step(velocity_fn: Callable, optimizer: optax.GradientTransformation,
                    config: StepConfig, mesh, *, state: TrainState, frozen, reference=None,
                    rules=parallel.DEFAULT_RULES):
    """Returns step(state, frozen, reference, batch, uncond_text) -> (state, metrics), jitted
    over `mesh` with the state donated. `state`, `frozen` and `reference` (real or abstract)
    give the shapes and logical names the shardings come from. `uncond_text` (the negative
    prompt's embeddings, batch 1) turns CFG on; None trains without CFG."""
    if config.beta < 0 or config.clip_range <= 0:
        raise ValueError(f"need beta >= 0 and clip_range > 0, got {config.beta}, {config.clip_range}")

    score = _scorer(velocity_fn, config)

    def step_loss(trainable, frozen, ref_trainable, transition, advantages, text, uncond_text):
        x, x_next, old_log_prob, sigma, sigma_next, log_ratio = transition
        score_with = lambda params: score(params, x, x_next, sigma, sigma_next, text, uncond_text)
        out = score_with((trainable, frozen))
        if log_ratio is None:
            log_ratio = out.log_prob - old_log_prob
        else:
            log_ratio = with_gradient_of(log_ratio, out.log_prob)
        ref_mean = None
        if config.beta > 0:
            ref_mean = jax.lax.stop_gradient(score_with((ref_trainable, frozen)).mean)
        return grpo_loss(log_ratio, advantages, out.mean, ref_mean, out.std,
                         clip_range=config.clip_range, beta=config.beta)

    grad_fn = jax.grad(step_loss, has_aux=True)

    def train_step(state: TrainState, frozen, reference, batch: TrainBatch, uncond_text):
        _check_batch(batch, config, mesh, rules)
        ref_trainable = disabled(state.params) if reference is None else reference

        def grads_and_stats(micro, transition):
            return grad_fn(state.params, frozen, ref_trainable, transition, micro.advantages,
                           micro.text, uncond_text)

        def accumulate(carry, new):
            (grads, stats), (new_grads, new_stats) = carry, new
            return (jax.tree.map(jnp.add, grads, new_grads),
                    {k: _reduce(k)(stats[k], new_stats[k]) for k in stats})

        def micro_step(carry, micro):
            def timestep(carry, transition):
                return accumulate(carry, grads_and_stats(micro, transition)), None

            carry, _ = jax.lax.scan(timestep, carry, _transitions(micro, config.num_train_steps))
            return carry, None

        micro = _micro_batches(batch, config.micro_batch_size, mesh, rules)
        first = jax.tree.map(lambda a: a[0], micro)
        first_step = jax.tree.map(lambda a: a[0], _transitions(first, config.num_train_steps))
        grad_shapes, stat_shapes = jax.eval_shape(grads_and_stats, first, first_step)
        initial = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), grad_shapes),
                   {k: _identity(k, s) for k, s in stat_shapes.items()})
        (grad_sum, stats), _ = jax.lax.scan(micro_step, initial, micro)
        count = micro.advantages.shape[0] * config.num_train_steps
        grads = jax.tree.map(lambda g: g / count, grad_sum)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # n counts this update, as the reference steps its EMA after incrementing global_step
        decay = ema_decay(state.step + 1, config.ema_max_decay, config.ema_every)
        ema_params = ema_update(state.ema_params, params, decay)
        metrics = {k: v if _reduce(k) is not jnp.add else v / count for k, v in stats.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["ema_decay"] = decay
        new_state = TrainState(state.step + 1, params, opt_state, ema_params)
        # A non-finite loss or gradient norm (NaN anywhere in the gradients makes the norm NaN)
        # skips the update: the whole state, step count included, stays as it was. A select
        # per leaf keeps this one program on any mesh; a finite update passes through exactly.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics["skipped_nonfinite"] = 1.0 - finite.astype(jnp.float32)
        return new_state, metrics

    state_sh = parallel.state_shardings(state, mesh, rules)
    frozen_sh = parallel.state_shardings(frozen, mesh, rules)
    ref_sh = None if reference is None else parallel.state_shardings(reference, mesh, rules)
    replicated = parallel.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_sh, frozen_sh, ref_sh, parallel.batch_sharding(mesh, rules), replicated),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )



def make_rescore(velocity_fn, config: StepConfig, mesh, *, state: TrainState, frozen,
                 rules=parallel.DEFAULT_RULES):
    """Returns rescore(params, frozen, batch, uncond_text) -> (B, n) float32, jitted over `mesh`:
    the log-prob of each sample's first n stored transitions under `params` (the trainable
    state; `frozen` the rest), forward only, in the train step's micro batches. The trainer runs
    it at the sampling params and at the current ones: their difference is the log-ratio of an
    update after an epoch's first (module doc). `batch.log_ratios` is not read."""
    score = _scorer(velocity_fn, config)

    def rescore(params, frozen, batch: TrainBatch, uncond_text):
        _check_batch(batch, config, mesh, rules)
        size = batch.advantages.shape[0]
        micro = _micro_batches(batch._replace(log_ratios=None), config.micro_batch_size, mesh,
                               rules)

        def micro_scores(_, one):
            def timestep(_, transition):
                x, x_next, _, sigma, sigma_next, _ = transition
                return None, score((params, frozen), x, x_next, sigma, sigma_next, one.text,
                                   uncond_text).log_prob

            return None, jax.lax.scan(timestep, None, _transitions(one, config.num_train_steps))[1]

        log_probs = jax.lax.scan(micro_scores, None, micro)[1]  # (B / m, n, m)
        # micro batch j holds samples j, j + B/m, ...: row r of it is sample r * B/m + j
        return jnp.transpose(log_probs, (2, 0, 1)).reshape(size, config.num_train_steps)

    batch_sh = parallel.batch_sharding(mesh, rules)
    return jax.jit(rescore, in_shardings=(
        parallel.state_shardings(state.params, mesh, rules),
        parallel.state_shardings(frozen, mesh, rules), batch_sh, parallel.replicated(mesh)),
        out_shardings=batch_sh)
