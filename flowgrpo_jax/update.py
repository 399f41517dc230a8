"""One optimizer update of any objective as a pure, jitted, sharded function, the train state it
updates, and the forward-only rescoring that gives likelihood objectives exact ratios.

The update cuts its batch (a dict of per-sample arrays, `objectives.base.Objective.records`
plus "text", "targets", "ids") into micro batches, runs the objective's loss on every term of
every micro batch (`Objective.term_loss`; a trained step for GRPO, a training timestep for
NFT), averages the gradients over all of them with an explicit `lax.scan` (what the
reference's gradient accumulation computes, exactly), clips them to a global norm, applies
AdamW at the rate of the state's hyperparameters (times the cosine schedule when asked) and
steps the EMA of the trained params every `ema_every` updates. An update whose loss or
gradient norm is not finite is skipped (the state returned unchanged) and counted in the metric
"skipped_nonfinite" (1.0 for a skipped update, else 0.0).

Numeric hyperparameters live in the train state as float32 scalars (`TrainState.hyper`), so
one compiled update serves any values of them; what changes a program's shapes or control flow
is in `Settings`. Parameters enter as two NNX states: `trainable` (what the optimizer updates)
and `frozen` (the rest). The KL reference is, with LoRA, the same weights with the LoRA zeroed
(`lora.disabled`; pass `reference=None`), with full fine-tuning a frozen copy of the initial
trainable params passed as `reference`.

Exact ratios (docs/design.md, section 7): given `batch["log_ratios"]` (B, n), a likelihood
objective takes those values with the gradient of its own log-prob; the trainer passes zeros on
an epoch's first update, which is on-policy, and after it the objective's log-ratio between two
`make_rescore` runs of one compiled program (the current params and the sampling params).
"""
import dataclasses
import functools
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from flowgrpo_jax import parallel
from flowgrpo_jax.lora import disabled
from flowgrpo_jax.objectives.base import Inputs, Objective
from flowgrpo_jax.population import stack as stack_members


@dataclasses.dataclass(frozen=True)
class Settings:
    """What is fixed when the update compiles."""

    num_terms: int  # loss terms per micro batch (trained steps, training timesteps)
    micro_batch_size: int  # global samples per forward/backward
    sigma_max: float = 1.0  # the schedule's sigmas[1] (the SDE's stand-in for sigma == 1)
    kind: str = "sde"  # the rollout's step kind
    train_sigmas: tuple = ()  # the sampler's grid (NFT's training timesteps)
    kl: bool = True  # a KL term to the reference (its forward runs)
    adv_clip_max: float = 5.0
    ema_every: int = 1  # the EMA steps after updates n with (n + 1) % ema_every == 0
    lr_decay_steps: int = 0  # > 0: the rate follows a cosine down to 0 over this many updates


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # optimizer updates done
    params: Any  # trainable NNX state
    opt_state: Any
    ema_params: Any
    hyper: dict  # numeric hyperparameters, float32 scalars
    extra: Any  # the objective's own state (Objective.init_extra)


def num_train_timesteps(num_steps: int, fraction: float) -> int:
    """Trained steps per trajectory: the first int(num_steps * fraction) (0.99 of 10 -> 9)."""
    count = int(num_steps * fraction)
    if not 1 <= count <= num_steps:
        raise ValueError(f"timestep_fraction {fraction} of {num_steps} steps trains {count} steps")
    return count


def _adamw(learning_rate, b1, b2, eps, weight_decay, max_grad_norm):
    return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                       optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


def make_optimizer(b1=0.9, b2=0.999, weight_decay=1e-4, eps=1e-8,
                   max_grad_norm=1.0) -> optax.GradientTransformation:
    """AdamW (decoupled decay, as torch.optim.AdamW) after global-norm gradient clipping, its
    rate a hyperparameter of its state that the update sets (optax.inject_hyperparams)."""
    return optax.inject_hyperparams(_adamw, static_args=("max_grad_norm",))(
        learning_rate=0.0, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm)


def learning_rate(hyper: dict, updates_done, settings: Settings):
    """The rate of the update after `updates_done`: constant, or a cosine down to 0."""
    rate = hyper["learning_rate"]
    if settings.lr_decay_steps > 0:
        progress = jnp.minimum(updates_done / settings.lr_decay_steps, 1.0)
        rate = rate * 0.5 * (1 + jnp.cos(math.pi * progress))
    return rate


def hyperparameters(values: dict) -> dict:
    """A hyperparameter dict as the train state holds it: float32 scalars."""
    return {name: jnp.asarray(value, jnp.float32) for name, value in values.items()}


def init_train_state(params, optimizer, hyper: dict, extra=None) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        hyper=hyperparameters(hyper),
        extra={} if extra is None else extra,
    )


def create_train_state(params, optimizer, mesh, hyper: dict, objective: Objective | None = None,
                       rules=parallel.DEFAULT_RULES) -> TrainState:
    """The initial state, built under jit directly into its shardings over `mesh`, with the
    objective's extra state."""
    def init(params):
        extra = None if objective is None else objective.init_extra(params)
        return init_train_state(params, optimizer, hyper, extra)

    shardings = parallel.state_shardings(jax.eval_shape(init, params), mesh, rules)
    return jax.jit(init, out_shardings=shardings)(params)


def create_population_state(params: list, optimizer, mesh, hypers: list, objective: Objective,
                            rules=parallel.DEFAULT_RULES) -> TrainState:
    """A population's initial state: member i's (from params[i] and hypers[i]) stacked on a
    leading axis, built under jit into its shardings over `mesh`."""
    def init(params, hyper):
        return init_train_state(params, optimizer, hyper, objective.init_extra(params))

    member = parallel.state_shardings(jax.eval_shape(init, params[0], hypers[0]), mesh, rules)
    stack = lambda params: stack_members([init(p, h) for p, h in zip(params, hypers)])
    return jax.jit(stack, out_shardings=parallel.stacked(member, mesh))(params)


def ema_decay(updates_done, max_decay, every: int = 1):
    """min((1 + n) / (10 + n), max_decay) after update n when (n + 1) % every == 0 (as the
    reference counts), else 1 (the EMA stays): a short memory early, then the fixed decay."""
    n = updates_done.astype(jnp.float32)
    stepped = (updates_done + 1) % every == 0
    return jnp.where(stepped, jnp.minimum((1.0 + n) / (10.0 + n), max_decay), 1.0)


def ema_update(ema, params, decay):
    """One step of the exponential moving average of a params tree, in the EMA's own dtype
    (the float32 decay would otherwise turn a bf16 EMA into float32 after the first step)."""
    return jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), ema, params)


def _micro_batches(batch: dict, micro_batch_size: int, mesh, rules):
    """(B, ...) -> (B / m, m, ...); micro-batch i takes samples i, i + B/m, ... so that each one
    stays split over all devices the way the full batch is."""
    count = batch["targets"].shape[0] // micro_batch_size
    sharding = NamedSharding(mesh, PartitionSpec(None, *parallel.batch_sharding(mesh, rules).spec))

    def split(a):
        a = jnp.swapaxes(a.reshape((micro_batch_size, count) + a.shape[1:]), 0, 1)
        return jax.lax.with_sharding_constraint(a, sharding)

    return jax.tree.map(split, batch)


def _unsplit(per_micro, size: int):
    """(B / m, ..., m, ...) per micro batch back to (B, ...) in sample order: row r of micro
    batch j is sample r * B/m + j (_micro_batches); the sample axis is axis 2."""
    return jnp.moveaxis(per_micro, 2, 0).reshape((size,) + per_micro.shape[1:2] + per_micro.shape[3:])


def _check_batch(batch: dict, settings: Settings, mesh, rules):
    size = batch["targets"].shape[0]
    if size % settings.micro_batch_size:
        raise ValueError(f"batch of {size} samples is not a multiple of micro_batch_size "
                         f"{settings.micro_batch_size}")
    shards = parallel.batch_shard_count(mesh, rules)
    if settings.micro_batch_size % shards:
        raise ValueError(f"micro_batch_size {settings.micro_batch_size} must be a multiple of the "
                         f"{shards} devices the batch is split over")
    if "log_probs" in batch and settings.num_terms > batch["log_probs"].shape[1]:
        raise ValueError(f"{settings.num_terms} trained steps exceed the "
                         f"{batch['log_probs'].shape[1]} stored steps")
    if "log_ratios" in batch and batch["log_ratios"].shape != (size, settings.num_terms):
        raise ValueError(f"log_ratios of shape {batch['log_ratios'].shape}, expected "
                         f"{(size, settings.num_terms)} (samples, trained steps)")


def _reduce(name: str):
    """How per-term statistics combine: extremes by min / max, the rest summed (then averaged)."""
    return jnp.minimum if name.endswith("_min") else jnp.maximum if name.endswith("_max") else jnp.add


def _identity(name: str, like):
    fill = jnp.inf if name.endswith("_min") else -jnp.inf if name.endswith("_max") else 0.0
    return jnp.full(like.shape, fill, like.dtype)


def _shardings(mesh, rules, *trees):
    return tuple(None if t is None else parallel.state_shardings(t, mesh, rules) for t in trees)


def make_train_step(objective: Objective, velocity_fn: Callable, optimizer, settings: Settings,
                    mesh, *, state: TrainState, frozen, reference=None,
                    rules=parallel.DEFAULT_RULES, population: bool = False):
    """Returns step(state, frozen, reference, batch, uncond_text, key) -> (state, metrics),
    jitted over `mesh` with the state donated. `state`, `frozen` and `reference` (real or
    abstract) give the shapes and logical names the shardings come from. `uncond_text` (the
    negative prompt's embeddings, batch 1) turns CFG on; None trains without CFG. `key` seeds
    the objective's own draws (NFT's training noise).

    population=True: the step of a population (`_population_step`): state, batch, key and
    metrics carry a leading member axis, `state` gives one member's shapes, and a last
    argument `active` (members,) says which members update."""

    def term_grads(state, frozen, ref_trainable, uncond, micro, j, key):
        def loss(params):
            inputs = Inputs(velocity_fn, frozen, ref_trainable, state.extra, state.hyper, uncond,
                            settings)
            return objective.term_loss(params, inputs, micro, j, key)

        return jax.grad(loss, has_aux=True)(state.params)

    def train_step(state: TrainState, frozen, reference, batch: dict, uncond_text, key):
        _check_batch(batch, settings, mesh, rules)
        ref_trainable = disabled(state.params) if reference is None else reference
        grads_of = functools.partial(term_grads, state, frozen, ref_trainable, uncond_text)
        terms = jnp.arange(objective.num_terms(settings))

        def accumulate(carry, new):
            (grads, stats), (new_grads, new_stats) = carry, new
            return (jax.tree.map(jnp.add, grads, new_grads),
                    {k: _reduce(k)(stats[k], new_stats[k]) for k in stats})

        def micro_step(carry, micro):
            def term(carry, j):
                return accumulate(carry, grads_of(micro, j, key)), None

            return jax.lax.scan(term, carry, terms)[0], None

        micro = _micro_batches(batch, settings.micro_batch_size, mesh, rules)
        first = jax.tree.map(lambda a: a[0], micro)
        grad_shapes, stat_shapes = jax.eval_shape(grads_of, first, terms[0], key)
        initial = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), grad_shapes),
                   {k: _identity(k, s) for k, s in stat_shapes.items()})
        (grad_sum, stats), _ = jax.lax.scan(micro_step, initial, micro)
        count = micro["targets"].shape[0] * terms.shape[0]
        grads = jax.tree.map(lambda g: g / count, grad_sum)

        rate = learning_rate(state.hyper, state.step, settings)
        opt_state = state.opt_state._replace(
            hyperparams={**state.opt_state.hyperparams, "learning_rate": rate})
        updates, opt_state = optimizer.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # n counts this update, as the reference steps its EMA after incrementing global_step
        decay = ema_decay(state.step + 1, state.hyper["ema_max_decay"], settings.ema_every)
        ema_params = ema_update(state.ema_params, params, decay)
        metrics = {k: v if _reduce(k) is not jnp.add else v / count for k, v in stats.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["ema_decay"] = decay
        metrics["learning_rate"] = rate
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_params)
        # A non-finite loss or gradient norm (NaN anywhere in the gradients makes the norm NaN)
        # skips the update: the whole state, step count included, stays as it was. A select
        # per leaf keeps this one program on any mesh; a finite update passes through exactly.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics["skipped_nonfinite"] = 1.0 - finite.astype(jnp.float32)
        return new_state, metrics

    state_sh, frozen_sh, ref_sh = _shardings(mesh, rules, state, frozen, reference)
    replicated = parallel.replicated(mesh)
    batch_sh, key_sh, metrics_sh, step = parallel.batch_sharding(mesh, rules), replicated, replicated, train_step
    if population:
        step = _population_step(train_step, mesh)
        state_sh, batch_sh, key_sh, metrics_sh = parallel.stacked(
            (state_sh, batch_sh, key_sh, metrics_sh), mesh)
    return jax.jit(
        step,
        in_shardings=(state_sh, frozen_sh, ref_sh, batch_sh, replicated, key_sh) + (
            (key_sh,) if population else ()),
        out_shardings=(state_sh, metrics_sh),
        donate_argnums=0,
    )


def _over_members(fn, in_axes, mesh):
    """fn vmapped over a population's leading axis (split over the mesh's population axis)."""
    return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=parallel.member_axis(mesh))


def _population_step(train_step, mesh):
    """step(states, frozen, reference, batches, uncond_text, keys, active): each member's
    update, the state of a member whose `active` is False kept as it was (one whose epoch left
    no sample to learn from, or that has stopped)."""

    def step(state, frozen, reference, batch, uncond_text, key, active):
        new, metrics = _over_members(train_step, (0, None, None, 0, None, 0), mesh)(
            state, frozen, reference, batch, uncond_text, key)
        keep = lambda n, o: jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
        return jax.tree.map(keep, new, state), metrics

    return step


def make_rescore(objective: Objective, velocity_fn: Callable, settings: Settings, mesh, *,
                 state: TrainState, frozen, rules=parallel.DEFAULT_RULES,
                 population: bool = False):
    """Returns rescore(params, frozen, hyper, batch, uncond_text) -> {record: (B, n, ...)},
    jitted over `mesh`: a likelihood objective's step_records of each sample's first n stored
    transitions under `params` (the trainable state; `frozen` the rest), forward only, in the
    update's micro batches. `batch["log_ratios"]` is not read. population=True: params, hyper,
    batch and the records carry a leading member axis."""

    def rescore(params, frozen, hyper, batch: dict, uncond_text):
        _check_batch(batch, settings, mesh, rules)
        batch = {k: v for k, v in batch.items() if k != "log_ratios"}
        inputs = Inputs(velocity_fn, frozen, None, None, hyper, uncond_text, settings)

        def micro_records(_, micro):
            def term(_, j):
                return None, objective.step_records(params, inputs, micro, j)

            return None, jax.lax.scan(term, None, jnp.arange(settings.num_terms))[1]

        per_micro = jax.lax.scan(micro_records, None,
                                 _micro_batches(batch, settings.micro_batch_size, mesh, rules))[1]
        size = batch["targets"].shape[0]
        return jax.tree.map(lambda a: _unsplit(a, size), per_micro)  # (B / m, n, m, ...) -> (B, n, ...)

    batch_sh, params_sh = parallel.batch_sharding(mesh, rules), parallel.state_shardings(
        state.params, mesh, rules)
    replicated = hyper_sh = parallel.replicated(mesh)
    if population:
        rescore = _over_members(rescore, (0, None, 0, 0, None), mesh)
        params_sh, hyper_sh, batch_sh = parallel.stacked((params_sh, hyper_sh, batch_sh), mesh)
    return jax.jit(rescore, in_shardings=(
        params_sh, parallel.state_shardings(frozen, mesh, rules), hyper_sh, batch_sh, replicated),
        out_shardings=batch_sh)


def make_after_epoch(objective: Objective, mesh, *, state: TrainState,
                     rules=parallel.DEFAULT_RULES, population: bool = False):
    """The objective's step after an epoch's updates, jitted with the state donated (each
    member's with population=True); None when it has none."""
    if type(objective).after_epoch is Objective.after_epoch:
        return None
    state_sh, fn = parallel.state_shardings(state, mesh, rules), objective.after_epoch
    if population:
        state_sh, fn = parallel.stacked(state_sh, mesh), _over_members(fn, 0, mesh)
    return jax.jit(fn, in_shardings=(state_sh,), out_shardings=state_sh, donate_argnums=0)
