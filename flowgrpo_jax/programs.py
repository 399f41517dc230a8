"""What a training run builds from its config, for the trainer and the planner alike: the
trainable split of the model, the objective, the optimizer, the update's settings and
hyperparameters, the train state, and the jitted programs over the run's device mesh.

A run compiles: prompt encoding (a chunk's prompts, and the negative prompt once), a rollout
chunk (the sampler's kind and window, keeping the records its objective reads) and the eval
rollout (the ODE), decoding a chunk's final latents, the update and, for exact ratios over
several updates an epoch, the forward-only rescoring of an update's samples, and the
objective's step after an epoch (NFT's old policy). Each is traced, compiled and called under
the mesh (`jax.set_mesh`), which the TPU attention kernel needs to split the batch over the
devices. `build_run` makes them, with real weights for the trainer or with shapes only for the
planner (`plan.py`), so what the planner measures is what a run executes.
"""
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flowgrpo_jax import families, lora_io, objectives, parallel, population
from flowgrpo_jax import update as up
from flowgrpo_jax.generator import Family, Generator, nnx_velocity
from flowgrpo_jax.lora import apply_lora
from flowgrpo_jax.objectives.base import Objective
from flowgrpo_jax.sampling.rollout import STEP_RECORDS, Window, trajectory
from flowgrpo_jax.sampling.schedule import flow_match_schedule


@dataclasses.dataclass
class TrainableModel:
    """The generator split for training: what trains, what stays, and how to run it."""

    velocity: object  # velocity_fn((trainable, frozen), x, t, text)
    trainable: object
    frozen: object


def optimizer_for_config(config):
    """The config's AdamW (its rate set by each update from the train state)."""
    t = config.train
    return up.make_optimizer(t.adam_b1, t.adam_b2, t.weight_decay, t.adam_eps, t.max_grad_norm)


def hyperparameters_for(config, objective: Objective) -> dict:
    """The numeric hyperparameters of the train state: the shared ones and the objective's."""
    s, t = config.sample, config.train
    return {"learning_rate": t.learning_rate, "beta": t.beta, "ema_max_decay": t.ema_max_decay,
            "noise_level": s.noise_level, "guidance_scale": s.guidance_scale,
            **objective.hyperparameters(config)}


def settings_for(config, sigmas) -> up.Settings:
    """The update's fixed settings from the config; `sigmas` is the training schedule."""
    s, t = config.sample, config.train
    decay = config.num_epochs * t.updates_per_epoch if t.get("lr_schedule") == "cosine" else 0
    return up.Settings(
        num_terms=up.num_train_timesteps(s.window_size or s.num_steps, t.timestep_fraction),
        micro_batch_size=t.micro_batch_size, sigma_max=float(sigmas[1]), kind=s.kind,
        train_sigmas=tuple(float(x) for x in sigmas[:-1]), kl=t.beta > 0,
        adv_clip_max=t.adv_clip_max, ema_every=t.get("ema_every", 1), lr_decay_steps=decay)


def abstract_state(config, trainable, device):
    """The train state of a run of `config` on `trainable` params, as shapes on `device` (to
    restore a checkpoint into)."""
    objective = objectives.for_config(config)
    hyper = hyperparameters_for(config, objective)
    state = jax.eval_shape(lambda p: up.init_train_state(
        p, optimizer_for_config(config), hyper, objective.init_extra(p)), trainable)
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), state)


def rescores(config, objective: Objective) -> bool:
    """Whether a run rescores for exact ratios: a likelihood objective, train.exact_ratio, and
    updates after an epoch's first (grpo update docs)."""
    return bool(objective.ratio_records and config.train.exact_ratio
                and config.train.updates_per_epoch > 1)


def build_trainable_model(config, family: Family, generator: Generator, *,
                          load_adapter: bool = True) -> TrainableModel:
    """LoRA on the config's targets (the family's by default), or the family's trainable
    variables for full fine-tuning.

    With `lora.init_from` (a PEFT adapter folder or a diffusers LoRA file) the LoRA starts
    from that adapter, after checking it fits the targets, rank and shapes (lora_io.py's
    AdapterError, naming the modules, otherwise). load_adapter=False leaves it unread, for a
    model whose params come from a checkpoint."""
    if config.lora.enabled:
        apply_lora(generator.model, rank=config.lora.rank, alpha=config.lora.alpha,
                   rngs=nnx.Rngs(config.seed),
                   targets=tuple(config.lora.targets) or family.lora_targets)
        if load_adapter and config.lora.get("init_from"):
            load_lora_adapter(config, family, generator.model)
        trained = nnx.LoRAParam
    else:
        trained = family.trainable
    graphdef, trainable, frozen = nnx.split(generator.model, trained, ...)
    return TrainableModel(nnx_velocity(graphdef, generator.apply), trainable, frozen)


def load_lora_adapter(config, family: Family, model) -> None:
    """Sets the LoRA layers of `model` from the adapter at config.lora.init_from."""
    where = "config.lora.init_from"
    if family.torch is None:
        raise lora_io.AdapterError(f"{where}={config.lora.init_from!r}: model family "
                                   f"{config.model.family!r} has no PyTorch counterpart, so no "
                                   f"PyTorch LoRA adapter fits it")
    adapter = lora_io.read_adapter(config.lora.init_from, family.torch.component)
    lora_io.set_from_adapter(model, family.torch, adapter, where=where)


class OnMesh:
    """A jitted function whose traces, compiles and calls run under `mesh`."""

    def __init__(self, jitted, mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)


def _module_fn(module, fn: Callable):
    """fn(module, *args) as a pure function of the module's state: (state, *args) -> ..."""
    graphdef = nnx.graphdef(module)
    return lambda state, *args: fn(nnx.merge(graphdef, state), *args)


@dataclasses.dataclass
class Programs:
    mesh: jax.sharding.Mesh
    encode: OnMesh  # (encoder state, tokens) -> text, batch-sharded
    encode_replicated: OnMesh  # the same on a replicated batch (the negative prompt)
    decode: OnMesh  # (decoder state, final latents) -> uint8 images, batch-sharded
    train_step: OnMesh  # update.make_train_step's step
    rescore: OnMesh | None  # update.make_rescore's, for likelihood objectives
    log_ratio: OnMesh | None  # (records, records at sampling) -> the exact log-ratios (B, n)
    after_epoch: OnMesh | None  # update.make_after_epoch's, when the objective has one
    velocity: Callable  # velocity_fn((trainable, frozen), x, t, text)

    population: bool = False  # every program but encode_replicated maps a member axis
    _rollouts: dict = dataclasses.field(default_factory=dict)

    def rollout(self, kind: str, window: Window | None = None, records=STEP_RECORDS) -> OnMesh:
        """(params, latents, text, sigmas, key, noise_level, guidance_scale, uncond_text) ->
        Rollout, batch-sharded (sampling.rollout.rollout's arguments; with a population,
        params is (stacked trainable, frozen) and latents, text, key, noise_level and
        guidance_scale carry a member axis)."""
        records = tuple(records)
        if (kind, window, records) not in self._rollouts:
            fn = functools.partial(trajectory, self.velocity, kind=kind, window=window,
                                   records=records)
            fn = _members(fn, ((0, None), 0, 0, None, 0, 0, 0, None), self.mesh, self.population)
            self._rollouts[kind, window, records] = OnMesh(jax.jit(fn, out_shardings=batch_sharding(
                self.mesh, self.population)), self.mesh)
        return self._rollouts[kind, window, records]


def _members(fn, in_axes, mesh, population: bool):
    """fn, or with a population fn vmapped over the member axis (split over the mesh's
    population axis when it has one)."""
    if not population:
        return fn
    return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=parallel.member_axis(mesh))


def batch_sharding(mesh, population: bool):
    """The sharding of batches: (samples, ...), with a population (members, samples, ...)."""
    sharding = parallel.batch_sharding(mesh)
    return parallel.stacked(sharding, mesh) if population else sharding


def build_programs(generator: Generator, objective: Objective, velocity, optimizer,
                   settings: up.Settings, mesh, *, state, frozen, reference=None,
                   population: bool = False) -> Programs:
    """The run's programs; `state` (one member's with a population), `frozen` and `reference`
    (real or abstract) give the update's shardings, as in update.make_train_step."""
    batch, replicated = batch_sharding(mesh, population), parallel.replicated(mesh)
    encode = _module_fn(generator.encoder, generator.encode_tokens)
    decode = _module_fn(generator.decoder, generator.decode_latents)
    members = lambda fn, in_axes: _members(fn, in_axes, mesh, population)
    on_mesh = lambda jitted: None if jitted is None else OnMesh(jitted, mesh)
    shapes = dict(state=state, population=population)
    step = up.make_train_step(objective, velocity, optimizer, settings, mesh, frozen=frozen,
                              reference=reference, **shapes)
    likelihood = bool(objective.ratio_records)
    rescore = (up.make_rescore(objective, velocity, settings, mesh, frozen=frozen, **shapes)
               if likelihood else None)
    log_ratio = (jax.jit(members(objective.log_ratio, 0), out_shardings=batch)
                 if likelihood else None)
    return Programs(
        mesh=mesh,
        encode=OnMesh(jax.jit(members(encode, (None, 0)), out_shardings=batch), mesh),
        encode_replicated=OnMesh(jax.jit(encode, out_shardings=replicated), mesh),
        decode=OnMesh(jax.jit(members(decode, (None, 0)), out_shardings=batch), mesh),
        train_step=OnMesh(step, mesh), rescore=on_mesh(rescore), log_ratio=on_mesh(log_ratio),
        after_epoch=on_mesh(up.make_after_epoch(objective, mesh, **shapes)),
        velocity=velocity, population=population)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                        shardings)


def _placed_state(module, role: str, place, abstract: bool):
    """The state of a frozen generator module (nnx.state) on its shardings."""
    state = nnx.state(module)
    shardings = place(role, state)
    return _abstract(state, shardings) if abstract else parallel.place(state, shardings)


@dataclasses.dataclass
class Run:
    """A training run as its config builds it: the same for the trainer (real weights, on
    this process's devices) and the planner (shapes only, on compile-only devices)."""

    config: Any
    mesh: jax.sharding.Mesh
    family: Family
    generator: Generator
    objective: Objective
    optimizer: Any
    settings: up.Settings
    state: Any  # update.TrainState, or its ShapeDtypeStructs (members stacked: population)
    members: list  # population.Member: the run's members (a solo run: one)
    member_state: Any  # one member's TrainState as ShapeDtypeStructs, with shardings
    frozen: Any
    reference: Any  # the initial trainable params with full fine-tuning; None with LoRA
    encoder: Any
    decoder: Any
    sigmas: Any  # the training schedule
    eval_sigmas: Any
    window: Window | None
    programs: Programs


def population_members(config) -> list[population.Member]:
    """The run's members (population.py), checked to make one program; a solo run's one."""
    # the members' settings are compared on one schedule: the vmapped keys never change it
    schedule = lambda c: flow_match_schedule(c.sample.num_steps, shift=1.0)[0]
    return population.check(config, lambda c: settings_for(c, schedule(c)),
                            lambda c: hyperparameters_for(c, objectives.for_config(c)))


def initial_trainables(config, family: Family, members, trainable) -> list:
    """Each member's initial trainable params, as its solo run starts: a LoRA drawn from its
    own seed (on a shapes-only copy of the model), else `trainable` itself."""
    if not config.lora.enabled or config.lora.get("init_from"):
        return [trainable] * len(members)
    drawn = {}
    for m in members:
        if m.config.seed not in drawn:
            copy = family.build(m.config.model, remat=m.config.train.remat, abstract=True)
            drawn[m.config.seed] = build_trainable_model(m.config, family, copy).trainable
    return [drawn[m.config.seed] for m in members]


def build_run(config, devices=None, *, abstract: bool = False) -> Run:
    """The run of `config` on `devices` (default: all), with weights read and placed, or with
    `abstract` as ShapeDtypeStructs carrying their shardings (no weights read). A population
    config (population.py) gets its members' state stacked and the population programs."""
    s = config.sample
    members = population_members(config)
    stacked = population.is_population(config)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices,
                              population=config.mesh.population)
    place = parallel.placement(mesh)
    family = families.load(config.model.family)
    generator = family.build(config.model, remat=config.train.remat,
                             place=None if abstract else place, abstract=abstract)
    model = build_trainable_model(config, family, generator)
    objective = objectives.for_config(config)
    optimizer = optimizer_for_config(config)
    trainable_sh = parallel.state_shardings(model.trainable, mesh)
    frozen = parallel.state_shardings(model.frozen, mesh)
    frozen = _abstract(model.frozen, frozen) if abstract else parallel.place(model.frozen, frozen)
    hypers = [hyperparameters_for(m.config, objective) for m in members]
    init = lambda p: up.init_train_state(p, optimizer, hypers[0], objective.init_extra(p))
    member_state = jax.eval_shape(init, model.trainable)
    member_state = _abstract(member_state, parallel.state_shardings(member_state, mesh))
    if abstract:
        trainable = _abstract(model.trainable, trainable_sh)
        state = member_state
        if stacked:
            state = jax.eval_shape(population.stack, [member_state] * len(members))
            state = _abstract(state, parallel.stacked(
                jax.tree.map(lambda x: x.sharding, member_state), mesh))
        reference = None if config.lora.enabled else trainable
    else:
        trainable = parallel.place(model.trainable, trainable_sh)
        # Full fine-tuning keeps the initial weights as the KL reference; LoRA switches itself off.
        reference = None if config.lora.enabled else jax.tree.map(jnp.copy, trainable)
        if stacked:
            trainables = [parallel.place(p, trainable_sh) for p in
                          initial_trainables(config, family, members, trainable)]
            state = up.create_population_state(trainables, optimizer, mesh, hypers, objective)
        else:
            state = up.create_train_state(trainable, optimizer, mesh, hypers[0], objective)
    sigmas = generator.sigmas(s.num_steps)
    settings = settings_for(config, sigmas)
    return Run(
        config=config, mesh=mesh, family=family, generator=generator, objective=objective,
        optimizer=optimizer, settings=settings, state=state, frozen=frozen, reference=reference,
        members=members, member_state=member_state,
        encoder=_placed_state(generator.encoder, "encoder", place, abstract),
        decoder=_placed_state(generator.decoder, "decoder", place, abstract),
        sigmas=sigmas, eval_sigmas=generator.sigmas(s.eval_num_steps),
        window=Window(s.window_size, s.window_lo, s.window_hi) if s.window_size else None,
        programs=build_programs(generator, objective, model.velocity, optimizer, settings, mesh,
                                state=member_state, frozen=frozen, reference=reference,
                                population=stacked))
