"""What a training run builds from its config: the trainable split of the model, the optimizer,
the update's settings, and the jitted programs over the run's device mesh.

A run compiles: prompt encoding (a chunk's prompts, and the negative prompt once), a rollout
chunk (the sampler's kind and window) and the eval rollout (the ODE), decoding a chunk's final
latents, the GRPO update and, for exact ratios over several updates an epoch, the forward-only
rescoring of an update's samples. Each is traced, compiled and called under the mesh
(`jax.set_mesh`), which the TPU attention kernel needs to split the batch over the devices.
The trainer calls them; the planner (`plan.py`) compiles the same objects for a TPU topology
from abstract inputs, so what it measures is what a run executes.
"""
import dataclasses
import functools
from collections.abc import Callable

import jax
from flax import nnx

from flowgrpo_jax import lora_io, parallel
from flowgrpo_jax.generator import Family, Generator, nnx_velocity
from flowgrpo_jax.grpo import train_step as ts
from flowgrpo_jax.lora import apply_lora
from flowgrpo_jax.sampling.rollout import Window, trajectory


@dataclasses.dataclass
class TrainableModel:
    """The generator split for training: what trains, what stays, and how to run it."""

    velocity: object  # velocity_fn((trainable, frozen), x, t, text)
    trainable: object
    frozen: object


def optimizer_for_config(config):
    """The config's AdamW; "cosine" decays the rate over all of the run's updates."""
    t = config.train
    decay_steps = config.num_epochs * t.updates_per_epoch if t.get("lr_schedule") == "cosine" else 0
    return ts.make_optimizer(t.learning_rate, t.adam_b1, t.adam_b2, t.weight_decay, t.adam_eps,
                             t.max_grad_norm, decay_steps)


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


def step_config(config, sigmas) -> ts.StepConfig:
    """The GRPO update's settings from the config; `sigmas` is the training schedule."""
    s, t = config.sample, config.train
    return ts.StepConfig(
        sigma_max=float(sigmas[1]),
        num_train_steps=ts.num_train_timesteps(s.window_size or s.num_steps, t.timestep_fraction),
        micro_batch_size=t.micro_batch_size, kind=s.kind, noise_level=s.noise_level,
        guidance_scale=s.guidance_scale, clip_range=t.clip_range, beta=t.beta,
        ema_max_decay=t.ema_max_decay, ema_every=t.ema_every)


def rescores(config) -> bool:
    """Whether a run computes exact ratios with the rescore program: after an epoch's first
    update, which needs none (grpo/train_step.py)."""
    return config.train.exact_ratio and config.train.updates_per_epoch > 1


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
    train_step: OnMesh  # grpo.train_step.make_train_step's step
    rescore: OnMesh  # grpo.train_step.make_rescore's (params, frozen, batch, uncond) -> (B, n)
    velocity: Callable  # velocity_fn((trainable, frozen), x, t, text)

    _rollouts: dict = dataclasses.field(default_factory=dict)

    def rollout(self, kind: str, window: Window | None = None) -> OnMesh:
        """(params, latents, text, sigmas, key, noise_level, guidance_scale, uncond_text) ->
        Rollout, batch-sharded (sampling.rollout.rollout's arguments)."""
        if (kind, window) not in self._rollouts:
            fn = functools.partial(trajectory, self.velocity, kind=kind, window=window)
            self._rollouts[kind, window] = OnMesh(
                jax.jit(fn, out_shardings=parallel.batch_sharding(self.mesh)), self.mesh)
        return self._rollouts[kind, window]


def build_programs(generator: Generator, velocity, optimizer, step_config: ts.StepConfig, mesh, *,
                   state, frozen, reference=None) -> Programs:
    """The run's programs; `state`, `frozen` and `reference` (real or abstract) give the train
    step's shardings, as in make_train_step."""
    batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    encode = _module_fn(generator.encoder, generator.encode_tokens)
    decode = _module_fn(generator.decoder, generator.decode_latents)
    step = ts.make_train_step(velocity, optimizer, step_config, mesh, state=state, frozen=frozen,
                              reference=reference)
    rescore = ts.make_rescore(velocity, step_config, mesh, state=state, frozen=frozen)
    return Programs(
        mesh=mesh,
        encode=OnMesh(jax.jit(encode, out_shardings=batch), mesh),
        encode_replicated=OnMesh(jax.jit(encode, out_shardings=replicated), mesh),
        decode=OnMesh(jax.jit(decode, out_shardings=batch), mesh),
        train_step=OnMesh(step, mesh), rescore=OnMesh(rescore, mesh), velocity=velocity)
