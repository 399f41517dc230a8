"""Online RL training: sample -> rewards -> advantages -> shuffled updates, epoch after epoch,
with the objective of `train.objective` (Flow-GRPO, GRPO-Guard, DiffusionNFT; objectives/).

    python -m flowgrpo_jax.train --config configs/sd35m_geneval.py[:variant] --workdir DIR \
        [--config.key=value ...] [--allow_config_change]
    # several processes: add --coordinator HOST:PORT --num_processes N --process_id I
    # (or set JAX_COORDINATOR_ADDRESS etc.; jax.distributed.initialize reads them)

One epoch:
1. its prompts (a function of seed and epoch) x group_size samples; every process takes, in
   every rollout chunk, the rows its devices hold;
2. rollout chunk by chunk (the sampler, CFG, optional window; the params the objective samples
   with; the records it reads) on the global mesh; each chunk's images are decoded and
   submitted to the reward server at once, and the next chunk samples while the server
   scores (the trainer waits only when it needs the rewards);
3. rewards gathered from all processes; group advantages (the same on every process), turned
   into the objective's per-sample targets;
4. `updates_per_epoch` updates, each on a slice of a shuffled order of the epoch's samples
   (exact ratios for likelihood objectives: `_updates`), then the objective's step after an
   epoch (NFT's old policy).
Every random draw comes from (seed, epoch, chunk, sample), so an epoch's work does not depend on
the device count and a resumed run repeats exactly what the uninterrupted one does.

A population (population.py: `population.seeds`, `population.vmap`) trains runs that differ
only in seed or numeric hyperparameters as one program: the same steps with the trainable state
and the batches stacked on a member axis and every program vmapped over it; each member draws
what its solo run draws and keeps its own advantages, metrics, logs and checkpoints in
WORKDIR/<member>.

Checkpoints (orbax) are written every `save_every` epochs, at the end, and when SIGTERM
arrives (the handler sets a flag; the loop saves at its next safe point and exits). A restart
with the same workdir resumes from the latest intact checkpoint (a damaged newer one is moved
aside, checkpoint.py); one with another config refuses unless --allow_config_change.

An update with a non-finite loss or gradient norm changes nothing (the train step skips it);
`train.max_nonfinite_updates` skipped in a row stop the run with NonFiniteUpdatesError and
nothing saved after them. Errors of the command line, the config, the workdir, the prompt files,
the reward server's address and the checkpoints end the command with one line, no traceback.

From Python: `with Trainer(config, workdir, on_metrics=...) as trainer: trainer.run()`, or
`train(config, workdir)`, which also returns every logged metrics dict.
"""
import dataclasses
import functools
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from flowgrpo_jax import checkpoint as ckpt
from flowgrpo_jax import compile_cache
from flowgrpo_jax import config as config_lib
from flowgrpo_jax import parallel, population
from flowgrpo_jax import programs as programs_lib
from flowgrpo_jax.generator import Family
from flowgrpo_jax.logging_utils import MetricWriter
from flowgrpo_jax.objectives.advantages import PerPromptStatTracker
from flowgrpo_jax.programs import build_run, population_members
from flowgrpo_jax.prompts import PromptFileError, epoch_prompt_indices, load_prompts
from flowgrpo_jax.rewards.client import RewardClient, RewardServerUnreachable
from flowgrpo_jax.rewards.registry import merged_options, options_in_use, parse_weights
from flowgrpo_jax.sampling.rollout import STEP_RECORDS

# Streams folded into an epoch's key; the eval stream is fixed so evals are comparable.
_NOISE, _ROLLOUT, _SHUFFLE, _TRAIN = 0, 1, 2, 3
_EVAL = 2**31 - 1


class NonFiniteUpdatesError(RuntimeError):
    """train.max_nonfinite_updates updates in a row had a non-finite loss or gradient norm."""


class StopFlag:
    """Set by SIGTERM; the loop checks it at safe points (between chunks, before updates)."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        logging.warning("signal %d: saving a checkpoint at the next safe point, then exiting", signum)
        self.requested = True


@functools.partial(jax.jit, static_argnums=2)
def _noise(key, ids, shape):
    """Initial noise of samples `ids`: each id its own draw, whatever device it lands on."""
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(ids)


def update_order(keep: np.ndarray, *, seed: int, epoch: int, drop_zero_std: bool):
    """The epoch's samples in shuffled order, to be cut into equal update slices.

    With `drop_zero_std`, samples of groups whose rewards were all equal (keep False) are left
    out and the kept ones are cycled to fill the epoch's size, so batch shapes (hence compiled
    steps) never change; None when no sample is left to learn from.
    """
    order = np.random.default_rng([seed, epoch, _SHUFFLE]).permutation(keep.size)
    if drop_zero_std:
        order = order[keep[order]]
        if order.size == 0:
            return None
        order = np.resize(order, keep.size)
    return order


def reward_client(config, family: Family, *, evaluation: bool = False) -> RewardClient | None:
    """The run's reward server: the one at config.reward.url, or a local process scoring
    config.reward.rewards, with the family's reward plugins beside the configured ones. Of
    config.reward.options only those of the rewards in use are passed, so a config keeps its
    reward's options when a run picks another reward.

    evaluation=True: evaluation's own server (reward.eval_url, or a local process with
    reward.eval_options laid over the options), or None when it scores as training does."""
    r = config.reward
    weights = parse_weights(r.rewards)
    eval_options = options_in_use(weights, r.eval_options.to_dict())
    if evaluation and r.eval_url:
        return RewardClient(url=r.eval_url, token=r.token)
    if evaluation and not eval_options:
        return None
    if r.url:
        return RewardClient(url=r.url, token=r.token)
    options = options_in_use(weights, r.options.to_dict())
    if evaluation:
        options = merged_options(options, eval_options)
    return RewardClient(r.rewards, options=options, token=r.token,
                        plugins=tuple(r.plugins) + tuple(family.reward_plugins))


@dataclasses.dataclass
class SampledEpoch:
    """One epoch's rollouts, and what this process sent to the reward server."""

    batches: list  # per rollout chunk, a dict of global arrays: the objective's records, text, ids
    rewards: list  # per chunk, the future RewardResult of this process's rows (all members')
    prompts: list  # per chunk, per member, this process's prompts
    groups: list  # per chunk, per member, the prompt index of each of this process's rows
    images: list  # per member, this process's images of the first chunk, for the image log


@dataclasses.dataclass
class MemberRun:
    """What a run keeps on the host for one member (a solo run is its one member): its seed's
    key, advantages, checkpoints and logs, in its own workdir."""

    name: str  # "" for a solo run
    config: Any  # its solo run's config
    workdir: str
    key: Any  # jax.random.key(config.seed): every draw of its run comes from it
    tracker: PerPromptStatTracker
    checkpointer: ckpt.TrainCheckpointer
    writer: MetricWriter
    nonfinite_streak: int = 0  # updates skipped in a row for a non-finite loss or gradient
    warned_off_policy: bool = False
    stopped: str = ""  # why a population's member stopped training ("" while it trains)


class Trainer:
    """A training run in `workdir`: one run, or a population of runs trained as one program
    (population.py), member i in WORKDIR/<its name>. It owns a reward server from construction
    on; use it as a context manager (or call close()) to stop it.

    on_metrics(step, metrics, member) is called with every metrics dict the run logs, per
    member (member: its name, "" in a solo run): each epoch's (step = the epoch) and each
    evaluation's (step = the epochs trained before it).
    """

    def __init__(self, config, workdir: str, *, allow_config_change: bool = False,
                 on_metrics: Callable[[int, dict, str], None] | None = None):
        self.started = time.perf_counter()
        self.sampled_once = False  # whether this process has sampled a rollout chunk yet
        config_lib.validate(config, jax.device_count(), jax.process_count())
        members = population_members(config)  # before the workdir: a bad population writes nothing
        self.config = config
        self.workdir = workdir
        self.population = population.is_population(config)
        self.on_metrics = on_metrics
        self.is_main = jax.process_index() == 0
        # Progress bars on a terminal only; a log file gets one line per epoch (`_log_epoch`).
        self.bars = self.is_main and sys.stderr.isatty()
        # Before the workdir and the model: a bad prompt file stops the run at once.
        self.train_prompts = load_prompts(config.prompts.train_file, config.prompts.format)
        test_file = config.prompts.test_file or config.prompts.train_file
        self.test_prompts = load_prompts(test_file, config.prompts.format)
        folder = lambda m: os.path.join(workdir, m.name) if self.population else workdir
        self._check_workdir(workdir, config, allow_config_change)
        for m in members if self.population else ():
            self._check_workdir(folder(m), m.config, allow_config_change)
        self.sizes = config_lib.sizes(config)
        s, t = config.sample, config.train

        run = build_run(config)
        self.mesh, self.family, self.generator = run.mesh, run.family, run.generator
        self.objective, self.programs, self.state = run.objective, run.programs, run.state
        self.member_state = run.member_state
        self.frozen, self.reference = run.frozen, run.reference
        self.encoder, self.decoder = run.encoder, run.decoder
        self.sigmas, self.eval_sigmas, self.window = run.sigmas, run.eval_sigmas, run.window
        self.uncond = (self._encode_replicated([self.family.negative_prompt])
                       if s.guidance_scale != 1.0 else None)
        batch_sh = programs_lib.batch_sharding(self.mesh, self.population)
        axis = 1 if self.population else 0  # the sample axis of the epoch's arrays
        self._concat = jax.jit(lambda chunks: jax.tree.map(
            lambda *a: jnp.concatenate(a, axis), *chunks), out_shardings=batch_sh)
        take = lambda data, idx: jax.tree.map(lambda a: a[idx], data)
        self._take = jax.jit(jax.vmap(take) if self.population else take, out_shardings=batch_sh)
        lead = (len(members),) if self.population else ()
        self._zero_ratios = jax.jit(  # an on-policy update's log-ratios
            lambda: jnp.zeros((*lead, self.sizes["update"], run.settings.num_terms)),
            out_shardings=batch_sh)

        wandb = config.logging.wandb
        group = config.logging.wandb_group or os.path.basename(os.path.abspath(workdir))
        self.members = [MemberRun(
            name=m.name, config=m.config, workdir=folder(m), key=jax.random.key(m.config.seed),
            tracker=PerPromptStatTracker(global_std=t.global_std, clip_max=t.adv_clip_max),
            checkpointer=ckpt.TrainCheckpointer(folder(m)),
            writer=MetricWriter(os.path.join(folder(m), "tensorboard"), enabled=self.is_main,
                                wandb_project=wandb or None, run_config=m.config.to_dict(),
                                wandb_group=group if self.population else None,
                                wandb_name=m.name or None))
            for m in members]
        self.epoch = 0
        self.rewards = reward_client(config, self.family)  # last: a failure above starts none
        self._eval_rewards = None  # evaluation's, started by its first call

    def close(self) -> None:
        self.rewards.close()
        if self._eval_rewards not in (None, self.rewards):
            self._eval_rewards.close()
        for m in self.members:
            m.checkpointer.close()
            m.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_workdir(self, workdir: str, config, allow_change: bool) -> None:
        """Process 0 checks (and records) the config; every process stops if it refuses."""
        error = None
        if self.is_main:
            try:
                ckpt.check_workdir_config(workdir, config.to_dict(), allow_change)
            except ckpt.WorkdirError as e:
                error = e
        if parallel.any_process(error is not None):
            raise error or ckpt.WorkdirError(
                f"{workdir}: its recorded config refused this run (see process 0)")

    # ---- host values to the programs' layout --------------------------------------------------

    def _batch(self, per_member):
        """Each member's host rows (leading dim: this process's samples) -> a global batch,
        members stacked in a population."""
        if not self.population:
            return parallel.shard_batch(per_member[0], self.mesh)
        stacked = jax.tree.map(lambda *rows: np.stack(rows), *per_member)
        return jax.device_put(stacked, programs_lib.batch_sharding(self.mesh, True))

    def _each(self, per_member):
        """One value per member (keys, index arrays) -> replicated in a solo run; stacked and
        each member's on its devices in a population."""
        if not self.population:
            return parallel.replicate(per_member[0], self.mesh)
        sharding = parallel.stacked(parallel.replicated(self.mesh), self.mesh)
        return jax.device_put(jax.tree.map(lambda *v: jnp.stack(v), *per_member), sharding)

    def _per_member(self, tree) -> list:
        """A program's output -> one host pytree per member."""
        tree = jax.device_get(tree)
        if not self.population:
            return [tree]
        return [population.member_of(tree, i) for i in range(len(self.members))]

    # ---- checkpoints -------------------------------------------------------------------------

    def restore(self) -> None:
        """Resumes every member from its newest intact checkpoint (a population from the
        newest epoch all members have); one line per damaged newer one. The hyperparameters
        stay the config's (a run resumed with another config trains with its values)."""
        template = self.member_state if self.population else self.state
        found = [m.checkpointer.restore_latest(template) for m in self.members]
        if all(r is None for r in found):
            return
        if any(r is None for r in found):
            missing = [m.name for m, r in zip(self.members, found) if r is None]
            raise ckpt.CheckpointError(f"{self.workdir}: members {missing} have no checkpoint "
                                       f"while others do; move the population's folder away to "
                                       f"start it afresh")
        epoch = min(host["epoch"] for _, _, host, _ in found)
        states = []
        for m, (step, state, host, damaged) in zip(self.members, found):
            if host["epoch"] != epoch:  # a member ahead of the others goes back to their epoch
                if epoch not in m.checkpointer.all_steps():
                    raise ckpt.CheckpointError(
                        f"{m.checkpointer.directory} has no checkpoint of epoch {epoch}, the "
                        f"newest every member has; move the population's folder away to start "
                        f"it afresh")
                step, (state, host) = epoch, m.checkpointer.restore(epoch, template)
            states.append(state)
            m.tracker.load_state_dict(host["tracker"])
            if self.is_main:
                for bad, problem, moved_to in damaged:
                    print(f"warning: checkpoint {bad} in {m.checkpointer.directory} is damaged "
                          f"({problem}); moved to {moved_to}, resuming from checkpoint {step}",
                          file=sys.stderr, flush=True)
        hyper = self.state.hyper
        if self.population:
            sharding = jax.tree.map(lambda x: x.sharding, self.state)
            restored = jax.jit(population.stack, out_shardings=sharding)(states)
        else:
            restored = states[0]
        self.state = restored.replace(hyper=hyper)
        self.epoch = epoch
        if self.is_main:
            tqdm.write(f"resumed from the checkpoint of epoch {self.epoch} in {self.workdir}")

    def save(self) -> None:
        for i, m in enumerate(self.members):
            if m.stopped or m.checkpointer.latest_step() == self.epoch:
                continue
            state = population.member_of(self.state, i) if self.population else self.state
            m.checkpointer.save(self.epoch, state,
                                {"epoch": self.epoch, "tracker": m.tracker.state_dict()})

    # ---- sampling ----------------------------------------------------------------------------

    def _encode_replicated(self, prompts):
        tokens = parallel.replicate(self.generator.tokenize(prompts), self.mesh)
        return self.programs.encode_replicated(self.encoder, tokens)

    def _sample_chunk(self, params, sigmas, keys, noise, prompts, *, kind, window=None,
                      records=()):
        """One chunk on the global mesh from this process's rows of each member ->
        (Rollout, text), global."""
        tokens = self._batch([self.generator.tokenize(p) for p in prompts])
        text = self.programs.encode(self.encoder, tokens)
        hyper = self.state.hyper
        out = self.programs.rollout(kind, window, records)(
            params, self._batch(noise), text, parallel.replicate(sigmas, self.mesh),
            self._each(keys), hyper["noise_level"], hyper["guidance_scale"], self.uncond)
        return out, text

    def _images(self, final_latents) -> list:
        """Each member's images (this process's rows) of a chunk's final latents."""
        images = self.programs.decode(self.decoder, final_latents)
        if not self.population:
            return [parallel.local_rows(images)]
        return list(np.asarray(images))

    def _submit(self, images: list, prompts: list, metadata: list, client):
        """All members' images of a chunk to the reward server in one request."""
        return client.submit(np.concatenate(images), sum(prompts, []), sum(metadata, []))

    def sample_epoch(self, stop: StopFlag | None = None) -> SampledEpoch | None:
        """This epoch's rollouts, submitted to the reward server chunk by chunk; None if a
        stop was requested before its sampling finished."""
        s = self.config.sample
        chunk = s.batch_size
        epoch_keys = [jax.random.fold_in(m.key, self.epoch) for m in self.members]
        groups = [epoch_prompt_indices(len(self.train_prompts), s.groups_per_epoch,
                                       m.config.seed, self.epoch) for m in self.members]
        start, stop_row = parallel.local_range(self.mesh, chunk)
        params = (self.objective.sampling_params(self.state.params, self.state.extra), self.frozen)
        records = tuple(r for r in self.objective.records if r in STEP_RECORDS)
        sampled = SampledEpoch([], [], [], [], None)
        for c in tqdm(range(self.sizes["chunks"]), desc=f"epoch {self.epoch} sampling",
                      leave=False, disable=not self.bars):
            ids = c * chunk + np.arange(start, stop_row)  # global sample ids of this process
            group = ids // s.group_size
            prompts, metadata = zip(*(self.train_prompts.take(g[group]) for g in groups))
            noise = [np.asarray(_noise(jax.random.fold_in(k, _NOISE),
                                       group if s.same_latent else ids, self.generator.latent_shape))
                     for k in epoch_keys]
            keys = [jax.random.fold_in(jax.random.fold_in(k, _ROLLOUT), c) for k in epoch_keys]
            out, text = self._sample_chunk(params, self.sigmas, keys, noise, prompts, kind=s.kind,
                                           window=self.window, records=records)
            images = self._images(out.final_latents)
            if not self.sampled_once:
                self._report_first_rollout()
            # scored meanwhile
            sampled.rewards.append(self._submit(images, prompts, metadata, self.rewards))
            if not self.config.reward.overlap:
                sampled.rewards[-1].result()
            batch = {name: getattr(out, name) for name in self.objective.records}
            batch["text"] = text
            batch["ids"] = self._batch([ids.astype(np.int32)] * len(self.members))
            sampled.batches.append(batch)
            sampled.prompts.append(prompts)
            sampled.groups.append([g[group] for g in groups])
            sampled.images = images if sampled.images is None else sampled.images
            if parallel.any_process(stop is not None and stop.requested):
                return None
        return sampled

    def _report_first_rollout(self) -> None:
        """One line when this process's first rollout chunk is done: how long the start took
        and how many programs it compiled and loaded from the compilation cache."""
        self.sampled_once = True
        if self.is_main:
            tqdm.write(f"first rollout chunk done {time.perf_counter() - self.started:.1f} s "
                       f"after the trainer started; XLA programs of this process so far: "
                       f"{compile_cache.counts()}")

    # ---- one epoch -----------------------------------------------------------------------------

    def _gather_rewards(self, futures) -> list:
        """Per member, global (N,) totals and {component: (N,)}, in global sample order, from
        every process."""
        results = [f.result() for f in futures]
        count = len(self.members)

        def per_member(values):  # per chunk (members x this process's rows) -> per member (N,)
            rows = np.stack(values).reshape(len(values), count, -1)
            return [parallel.gather_rows(rows[:, i]) for i in range(count)]

        totals = per_member([r.total for r in results])
        components = {name: per_member([r.components[name] for r in results])
                      for name in results[0].components}
        return [(totals[i], {name: v[i] for name, v in components.items()}) for i in range(count)]

    def train_epoch(self, stop: StopFlag | None = None) -> list | None:
        """One epoch; returns each member's metrics, or None when stopped before its updates."""
        t = self.config.train
        started = time.perf_counter()
        sampled = self.sample_epoch(stop)
        if sampled is None:
            return None
        data = self._concat(sampled.batches)  # the epoch's rollouts in one copy; chunks freed
        sampled.batches = None
        sample_seconds = time.perf_counter() - started
        rewards = self._gather_rewards(sampled.rewards)
        reward_wait = time.perf_counter() - started - sample_seconds

        all_metrics, advantages = [], []
        for i, (m, (total, components)) in enumerate(zip(self.members, rewards)):
            # groups are keyed by prompt index: equal prompts of an epoch pool their rewards
            adv = m.tracker.update(parallel.gather_rows(np.stack([g[i] for g in sampled.groups])),
                                   total)
            advantages.append(adv)
            metrics = {"reward/total_mean": total.mean(), "reward/total_std": total.std(),
                       "advantages/zero_std_ratio": adv.zero_std_ratio,
                       "advantages/group_std_mean": adv.group_std_mean,
                       "advantages/abs_mean": np.abs(adv.advantages).mean(),
                       "data/seen_prompts": m.tracker.num_seen_prompts}
            for name, values in components.items():
                metrics[f"reward/{name}_mean"] = values.mean()
                metrics[f"reward/{name}_std"] = values.std()
            if self.is_main and self.epoch % self.config.log_every == 0:
                count = self.config.logging.num_images
                m.writer.images(self.epoch, "train/images", sampled.images[i][:count],
                                [f"{p} ({r:.3f})" for p, r in zip(sampled.prompts[0][i][:count], total)])
            all_metrics.append(metrics)

        if parallel.any_process(stop is not None and stop.requested):
            return None
        train_started = time.perf_counter()
        orders = [None if m.stopped else update_order(
            adv.keep, seed=m.config.seed, epoch=self.epoch, drop_zero_std=t.drop_zero_std_groups)
            for m, adv in zip(self.members, advantages)]
        active = [order is not None for order in orders]
        diverged = []
        if any(active):
            targets = [self.objective.targets(adv, m.config)
                       for m, adv in zip(self.members, advantages)]
            data = {**data, "targets": self._each(targets)}
            # a member with nothing to learn this epoch runs the update on any order, discarded
            orders = [np.arange(advantages[0].keep.size) if o is None else o for o in orders]
            step_metrics, rescore_seconds = self._updates(data, orders, active)
            for i, (m, updates) in enumerate(zip(self.members, zip(*map(self._per_member, step_metrics)))):
                if active[i]:
                    all_metrics[i].update(self._update_metrics(m, updates))
                    all_metrics[i]["time/rescore_s"] = rescore_seconds
                    reached = self._count_nonfinite(m, updates)
                    if reached is not None:
                        diverged.append((m, reached))
        if self.programs.after_epoch is not None:
            self.state = self.programs.after_epoch(self.state)
        for metrics, is_active in zip(all_metrics, active):
            metrics["train/skipped"] = float(not is_active)
            metrics["time/sample_s"] = sample_seconds
            metrics["time/reward_wait_s"] = reward_wait
            metrics["time/train_s"] = time.perf_counter() - train_started
            metrics["time/epoch_s"] = time.perf_counter() - started
        for m, last in diverged:
            self._stop_diverged(m, last, all_metrics)
        self.epoch += 1
        return all_metrics

    def _update_metrics(self, member: MemberRun, updates: tuple) -> dict:
        """A member's epoch metrics from its updates' metrics (host dicts)."""
        metrics = {}
        for name in updates[0]:
            values = [float(u[name]) for u in updates]
            metrics[f"train/{name}"] = (min(values) if name.endswith("_min") else
                                        max(values) if name.endswith("_max") else np.mean(values))
        if "ratio_min" in updates[0]:  # the first update is on-policy: its ratios apart
            for name in ("ratio_mean", "ratio_min", "ratio_max", "clipfrac", "approx_kl"):
                metrics[f"train/on_policy/{name}"] = float(updates[0][name])
            self._check_on_policy(member, updates[0])
        # the updates the train step skipped for a non-finite loss or gradient norm
        metrics["train/skipped_nonfinite"] = sum(float(u["skipped_nonfinite"]) for u in updates)
        return metrics

    def _stop_diverged(self, member: MemberRun, last: dict, all_metrics: list) -> None:
        """max_nonfinite_updates skipped updates in a row: a solo run stops with
        NonFiniteUpdatesError; a population's member stops training (its last checkpoint
        stays), the others go on, and the run stops only when none is left."""
        t = self.config.train
        latest = member.checkpointer.latest_step()
        kept = "no checkpoint was written" if latest is None else f"checkpoint {latest} is the newest"
        why = (f"{member.nonfinite_streak} updates in a row had a non-finite loss or gradient "
               f"norm (the last: loss={float(last['loss']):.4g}, grad_norm="
               f"{float(last['grad_norm']):.4g}; train.max_nonfinite_updates="
               f"{t.max_nonfinite_updates}); each was skipped, nothing is saved after them "
               f"({kept}); try a lower train.learning_rate")
        member.stopped = why
        if self.population and not all(m.stopped for m in self.members):
            if self.is_main:
                print(f"warning: member {member.name} stopped in epoch {self.epoch}: {why}",
                      file=sys.stderr, flush=True)
            return
        self._log_epoch(all_metrics, self.epoch)
        who = f"member {member.name}, the last one training: " if self.population else ""
        raise NonFiniteUpdatesError(f"training stopped in epoch {self.epoch}: {who}{why}")

    def _updates(self, data, orders: list, active: list) -> tuple[list, float]:
        """The epoch's updates, each on its slice of every member's order; their metrics, and
        the seconds spent rescoring at the sampling params. With exact ratios (a likelihood
        objective and train.exact_ratio) the first update's log-ratios are zeros (its params
        sampled the epoch) and a later update's the objective's log-ratio between the rescore
        program at its params and the same program at the sampling params."""
        size = self.sizes["update"]
        exact = self.config.train.exact_ratio and self.programs.rescore is not None
        updates = range(self.config.train.updates_per_epoch)
        # taken anew each time it is needed: one update's copy of the epoch's data at a time
        take = lambda u: self._take(data, self._each([o[u * size:(u + 1) * size] for o in orders]))
        rescore = lambda batch: self.programs.rescore(self.state.params, self.frozen,
                                                      self.state.hyper, batch, self.uncond)
        started = time.perf_counter()
        at_sampling = [rescore(take(u)) for u in updates[1:]] if exact else []
        jax.block_until_ready(at_sampling)
        rescore_seconds = time.perf_counter() - started
        train_keys = [jax.random.fold_in(jax.random.fold_in(m.key, self.epoch), _TRAIN)
                      for m in self.members]
        active = (self._each([np.bool_(a) for a in active]),) if self.population else ()
        step_metrics = []
        for u in updates:
            batch = take(u)
            if exact:
                batch["log_ratios"] = self._zero_ratios() if u == 0 else self.programs.log_ratio(
                    rescore(batch), at_sampling[u - 1])
            keys = self._each([jax.random.fold_in(k, u) for k in train_keys])
            self.state, m = self.programs.train_step(self.state, self.frozen, self.reference,
                                                      batch, self.uncond, keys, *active)
            step_metrics.append(m)
        return step_metrics, rescore_seconds

    def _check_on_policy(self, member: MemberRun, first: dict) -> None:
        """One warning, the first time an epoch's first update (on-policy: its params sampled
        the epoch) sees ratios beyond the clip range: log-probs of two programs that disagree."""
        clip = member.config.train.clip_range
        if member.warned_off_policy or 1 - clip <= first["ratio_min"] <= first["ratio_max"] <= 1 + clip:
            return
        member.warned_off_policy = True
        if self.is_main:
            who = f"member {member.name}: " if member.name else ""
            print(f"warning: {who}epoch {self.epoch}: its first update is on-policy, yet its "
                  f"ratios span [{float(first['ratio_min']):.6f}, {float(first['ratio_max']):.6f}], "
                  f"beyond train.clip_range={clip:g} (clipfrac {float(first['clipfrac']):.3f}): the "
                  f"rollout's log-probs disagree with the update's; train.exact_ratio=True makes "
                  f"the ratios exact", file=sys.stderr, flush=True)

    def _count_nonfinite(self, member: MemberRun, updates) -> dict | None:
        """Counts a member's skipped updates in a row, across epochs; the last skipped update's
        metrics once the count reaches train.max_nonfinite_updates, else None."""
        reached = None
        for u in updates:
            member.nonfinite_streak = member.nonfinite_streak + 1 if u["skipped_nonfinite"] else 0
            if member.nonfinite_streak >= self.config.train.max_nonfinite_updates:
                reached = u
        return reached

    # ---- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> list:
        """ODE at eval_num_steps on the test prompts with each member's EMA params, scored by
        evaluation's reward server (reward_client); per member, mean rewards, overall and per
        metadata tag."""
        s = self.config.sample
        count = s.num_eval_prompts or len(self.test_prompts)
        count = min(count, len(self.test_prompts))
        chunk = s.eval_batch_size
        padded = -(-count // chunk) * chunk
        rows = np.minimum(np.arange(padded), count - 1)  # the last prompt repeats as padding
        eval_keys = [jax.random.fold_in(m.key, _EVAL) for m in self.members]
        params = (self.state.ema_params if self.config.train.ema else self.state.params, self.frozen)
        if self._eval_rewards is None:
            self._eval_rewards = reward_client(self.config, self.family, evaluation=True) or self.rewards
        start, stop_row = parallel.local_range(self.mesh, chunk)
        futures, first_images, first_prompts = [], None, None
        for c in tqdm(range(padded // chunk), desc="eval", leave=False, disable=not self.bars):
            ids = c * chunk + np.arange(start, stop_row)
            prompts, metadata = self.test_prompts.take(rows[ids])
            noise = [np.asarray(_noise(k, ids, self.generator.latent_shape)) for k in eval_keys]
            out, _ = self._sample_chunk(params, self.eval_sigmas, eval_keys, noise,
                                        [prompts] * len(self.members), kind="ode")
            images = self._images(out.final_latents)
            futures.append(self._submit(images, [prompts] * len(images),
                                        [metadata] * len(images), self._eval_rewards))
            if first_images is None:
                first_images, first_prompts = images, prompts
        tags = np.array([str(m.get("tag", "")) for m in self.test_prompts.take(rows[:count])[1]])
        all_metrics = []
        for i, (m, (total, components)) in enumerate(zip(self.members,
                                                         self._gather_rewards(futures))):
            metrics = {"eval/reward_mean": total[:count].mean()}
            for name, values in components.items():
                metrics[f"eval/{name}_mean"] = values[:count].mean()
                for tag in sorted(set(tags) - {""}):
                    metrics[f"eval/{name}_mean/{tag}"] = values[:count][tags == tag].mean()
            if self.is_main:
                n = self.config.logging.num_images
                m.writer.images(self.epoch, "eval/images", first_images[i][:n], first_prompts[:n])
            all_metrics.append(metrics)
        return all_metrics

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Resumes from the workdir's latest checkpoint and trains to config.num_epochs, or
        until SIGTERM (then it saves and returns with self.epoch short of num_epochs)."""
        self.restore()
        stop = StopFlag()
        previous = signal.signal(signal.SIGTERM, stop)
        try:
            self._loop(stop)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _loop(self, stop: StopFlag) -> None:
        c = self.config
        bar = tqdm(total=c.num_epochs, initial=self.epoch, desc="epochs", disable=not self.bars)
        stopped = False  # decided together by all processes, so they take the same path
        started, first = time.perf_counter(), self.epoch
        try:  # the bar ends its line even when an error ends the run, whose line comes next
            while self.epoch < c.num_epochs and not stopped:
                if c.eval_every and self.epoch % c.eval_every == 0:
                    self._log_epoch(self.evaluate())
                metrics = self.train_epoch(stop)
                if metrics is None:
                    stopped = True
                    break
                per_epoch = (time.perf_counter() - started) / (self.epoch - first)
                left = round(per_epoch * (c.num_epochs - self.epoch))
                self._log_epoch(metrics, step=self.epoch - 1,
                                suffix=f" left={left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}")
                bar.update(1)
                bar.set_postfix(reward=f"{np.mean([m['reward/total_mean'] for m in metrics]):.3f}")
                stopped = parallel.any_process(stop.requested)
                if stopped or self.epoch % c.save_every == 0:
                    self.save()
        finally:
            bar.close()
        if stopped:
            self.save()
            if self.is_main:
                tqdm.write(f"stopped by signal at epoch {self.epoch}; checkpoint saved")
            return
        if c.eval_every:
            self._log_epoch(self.evaluate())
        self.save()
        if self.is_main:
            tqdm.write(f"XLA programs of this process: {compile_cache.counts()}")
        # Every process reports the params it holds: replicas must agree across processes.
        print(f"process {jax.process_index()}/{jax.process_count()}: epoch {self.epoch}, params "
              f"fingerprint {parallel.fingerprint(self.state.params)}", flush=True)

    # the metrics of the line printed per epoch (and the eval/*_mean ones)
    _SHOWN = ("reward/total_mean", "train/loss", "train/kl", "train/approx_kl", "train/clipfrac",
              "train/skipped_nonfinite", "time/epoch_s")

    def _log_epoch(self, all_metrics: list, step: int | None = None, suffix: str = "") -> None:
        """Logs each member's metrics (TensorBoard, wandb, on_metrics) and prints one line: a
        solo run's metrics, a population's mean and range over its members."""
        step = self.epoch if step is None else step
        for m, metrics in zip(self.members, all_metrics):
            m.writer.scalars(step, metrics)
            if self.on_metrics is not None:
                self.on_metrics(step, metrics, m.name)
        if not self.is_main:
            return
        names = [k for k in all_metrics[0] if k.endswith("_mean") and k.startswith("eval/")
                 or k in self._SHOWN]
        shown = []
        for name in names:
            values = [float(metrics[name]) for metrics in all_metrics if name in metrics]
            text = f"{name}={np.mean(values):.4g}"
            if len(values) > 1:
                text += f" [{min(values):.4g}, {max(values):.4g}]"
            shown.append(text)
        who = f" ({len(all_metrics)} members: mean [min, max])" if self.population else ""
        tqdm.write(f"epoch {step}{who}: {' '.join(shown)}{suffix}")


class TrainingStopped(RuntimeError):
    """The run stopped before config.num_epochs (SIGTERM); its checkpoint is saved."""


def train(config, workdir: str) -> list[dict] | dict[str, list[dict]]:
    """Trains to config.num_epochs in `workdir` (resuming what is there); returns every logged
    metrics dict as {"epoch": step, **metrics}, a population's as {member name: that list}.
    Raises TrainingStopped when a signal stopped the run first."""
    histories = {}
    record = lambda step, metrics, member: histories.setdefault(member, []).append(
        {"epoch": step, **{k: float(v) for k, v in metrics.items()}})
    with Trainer(config, workdir, on_metrics=record) as trainer:
        trainer.run()
        if trainer.epoch < config.num_epochs:
            raise TrainingStopped(f"training in {workdir} stopped at epoch {trainer.epoch} of "
                                  f"{config.num_epochs}")
    return histories if trainer.population else histories.get("", [])


FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant]")
flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard logs and the run's config")
flags.DEFINE_bool("allow_config_change", False, "resume a workdir started with another config")
flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, for multi-process runs")
flags.DEFINE_integer("num_processes", None, "processes in a multi-process run")
flags.DEFINE_integer("process_id", None, "this process's index in a multi-process run")
flags.mark_flags_as_required(["config", "workdir"])


def _init_distributed() -> None:
    if FLAGS.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # CPU processes need gloo for their collectives; accelerators ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)


# Errors of the run's inputs (exit 2) and of the run itself (exit 1), each reported in one
# line: the message names the key, file or address at fault.
_INPUT_ERRORS = (config_lib.ConfigError, ckpt.WorkdirError, PromptFileError,
                 population.PopulationError)
_RUN_ERRORS = (RewardServerUnreachable, ckpt.CheckpointError, NonFiniteUpdatesError)


def _fail(error: Exception, code: int):
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def _parse_flags(argv):
    """absl's flag parsing, with a --config.KEY=... naming no key of the config file reported in
    one line (ml_collections raises an AttributeError with a traceback for it)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        while isinstance(e, BaseException) and e.args:  # AttributeError(KeyError(message))
            e = e.args[0]
        text = str(e)
        missing = re.search(r"'([^'\\]+)'", text)
        hint = re.search(r'Did you mean "([^"]+)"', text)
        for arg in argv[1:]:
            path = arg.partition("=")[0].removeprefix("--config.")
            parts = path.split(".")
            if arg.startswith("--config.") and missing and missing.group(1) in parts:
                key = ".".join(parts[:parts.index(missing.group(1)) + 1])
                print(f"error: {arg}: config.{key} is not a known config key"
                      + (f" (did you mean {hint.group(1)}?)" if hint else ""), file=sys.stderr)
                sys.exit(2)
        print(f"error: cannot apply the --config overrides: {' '.join(text.split())}",
              file=sys.stderr)
        sys.exit(2)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    _init_distributed()
    cache = _CONFIG.value.compilation_cache
    compile_cache.setup(cache.enabled, cache.dir)
    try:
        trainer = Trainer(_CONFIG.value, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
    except _INPUT_ERRORS as e:
        _fail(e, 2)
    except _RUN_ERRORS as e:
        _fail(e, 1)
    with trainer:
        try:
            trainer.run()
        except _RUN_ERRORS as e:
            _fail(e, 1)


def cli() -> None:
    """The command line: `python -m flowgrpo_jax.train ...` (sys.argv)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    cli()
