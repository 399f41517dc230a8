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

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from flowgrpo_jax import checkpoint as ckpt
from flowgrpo_jax import config as config_lib
from flowgrpo_jax import parallel
from flowgrpo_jax.generator import Family
from flowgrpo_jax.logging_utils import MetricWriter
from flowgrpo_jax.objectives.advantages import PerPromptStatTracker
from flowgrpo_jax.programs import build_run
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
    rewards: list  # per chunk, the future RewardResult of this process's rows
    prompts: list  # per chunk, this process's prompts
    groups: list  # per chunk, the prompt index of each of this process's rows
    images: np.ndarray  # this process's images of the first chunk, for the image log


class Trainer:
    """A training run in `workdir`. It owns a reward server from construction on; use it as a
    context manager (or call close()) to stop it.

    on_metrics(step, metrics) is called with every metrics dict the run logs: each epoch's
    (step = the epoch) and each evaluation's (step = the epochs trained before it).
    """

    def __init__(self, config, workdir: str, *, allow_config_change: bool = False,
                 on_metrics: Callable[[int, dict], None] | None = None):
        config_lib.validate(config, jax.device_count(), jax.process_count())
        self.config = config
        self.workdir = workdir
        self.on_metrics = on_metrics
        self.is_main = jax.process_index() == 0
        # Progress bars on a terminal only; a log file gets one line per epoch (`_log`).
        self.bars = self.is_main and sys.stderr.isatty()
        # Before the workdir and the model: a bad prompt file stops the run at once.
        self.train_prompts = load_prompts(config.prompts.train_file, config.prompts.format)
        test_file = config.prompts.test_file or config.prompts.train_file
        self.test_prompts = load_prompts(test_file, config.prompts.format)
        self._check_workdir(allow_config_change)
        self.sizes = config_lib.sizes(config)
        s, t = config.sample, config.train

        run = build_run(config)
        self.mesh, self.family, self.generator = run.mesh, run.family, run.generator
        self.objective, self.programs, self.state = run.objective, run.programs, run.state
        self.frozen, self.reference = run.frozen, run.reference
        self.encoder, self.decoder = run.encoder, run.decoder
        self.sigmas, self.eval_sigmas, self.window = run.sigmas, run.eval_sigmas, run.window
        self.uncond = (self._encode_replicated([self.family.negative_prompt])
                       if s.guidance_scale != 1.0 else None)
        batch_sh = parallel.batch_sharding(self.mesh)
        self._concat = jax.jit(lambda chunks: jax.tree.map(lambda *a: jnp.concatenate(a), *chunks),
                               out_shardings=batch_sh)
        self._take = jax.jit(lambda data, idx: jax.tree.map(lambda a: a[idx], data),
                             out_shardings=batch_sh)
        self._zero_ratios = jax.jit(  # an on-policy update's log-ratios
            lambda: jnp.zeros((self.sizes["update"], run.settings.num_terms)),
            out_shardings=batch_sh)
        self._warned_off_policy = False

        self.tracker = PerPromptStatTracker(global_std=t.global_std, clip_max=t.adv_clip_max)
        self.checkpointer = ckpt.TrainCheckpointer(workdir)
        self.writer = MetricWriter(os.path.join(workdir, "tensorboard"), enabled=self.is_main,
                                   wandb_project=config.logging.wandb_project
                                   if config.logging.wandb else None,
                                   run_config=config.to_dict())
        self.base_key = jax.random.key(config.seed)
        self.epoch = 0
        self.nonfinite_streak = 0  # updates skipped in a row for a non-finite loss or gradient
        self.rewards = reward_client(config, self.family)  # last: a failure above starts none
        self._eval_rewards = None  # evaluation's, started by its first call

    def close(self) -> None:
        self.rewards.close()
        if self._eval_rewards not in (None, self.rewards):
            self._eval_rewards.close()
        self.checkpointer.close()
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_workdir(self, allow_change: bool) -> None:
        """Process 0 checks (and records) the config; every process stops if it refuses."""
        error = None
        if self.is_main:
            try:
                ckpt.check_workdir_config(self.workdir, self.config.to_dict(), allow_change)
            except ckpt.WorkdirError as e:
                error = e
        if parallel.any_process(error is not None):
            raise error or ckpt.WorkdirError(
                f"{self.workdir}: its recorded config refused this run (see process 0)")

    # ---- checkpoints -------------------------------------------------------------------------

    def restore(self) -> None:
        """Resumes from the newest intact checkpoint; one line per damaged newer one. The
        hyperparameters stay the config's (a run resumed with another config trains with its
        values)."""
        hyper = self.state.hyper
        restored = self.checkpointer.restore_latest(self.state)
        if restored is None:
            return
        step, state, host, damaged = restored
        self.state = state.replace(hyper=hyper)
        if self.is_main:
            for bad, problem, moved_to in damaged:
                print(f"warning: checkpoint {bad} in {self.checkpointer.directory} is damaged "
                      f"({problem}); moved to {moved_to}, resuming from checkpoint {step}",
                      file=sys.stderr, flush=True)
        self.epoch = host["epoch"]
        self.tracker.load_state_dict(host["tracker"])
        if self.is_main:
            tqdm.write(f"resumed from the checkpoint of epoch {self.epoch} in {self.workdir}")

    def save(self) -> None:
        if self.checkpointer.latest_step() == self.epoch:
            return
        self.checkpointer.save(self.epoch, self.state,
                               {"epoch": self.epoch, "tracker": self.tracker.state_dict()})

    # ---- sampling ----------------------------------------------------------------------------

    def _encode_replicated(self, prompts):
        tokens = parallel.replicate(self.generator.tokenize(prompts), self.mesh)
        return self.programs.encode_replicated(self.encoder, tokens)

    def _sample_chunk(self, params, sigmas, key, noise, prompts, *, kind, window=None,
                      records=()):
        """One chunk on the global mesh from this process's rows -> (Rollout, text), global."""
        tokens = parallel.shard_batch(self.generator.tokenize(prompts), self.mesh)
        text = self.programs.encode(self.encoder, tokens)
        hyper = self.state.hyper
        out = self.programs.rollout(kind, window, records)(
            params, parallel.shard_batch(noise, self.mesh), text, parallel.replicate(sigmas, self.mesh),
            parallel.replicate(key, self.mesh), hyper["noise_level"], hyper["guidance_scale"],
            self.uncond)
        return out, text

    def _images(self, final_latents) -> np.ndarray:
        return parallel.local_rows(self.programs.decode(self.decoder, final_latents))

    def sample_epoch(self, stop: StopFlag | None = None) -> SampledEpoch | None:
        """This epoch's rollouts, submitted to the reward server chunk by chunk; None if a
        stop was requested before its sampling finished."""
        s = self.config.sample
        chunk = s.batch_size
        epoch_key = jax.random.fold_in(self.base_key, self.epoch)
        noise_key = jax.random.fold_in(epoch_key, _NOISE)
        groups = epoch_prompt_indices(len(self.train_prompts), s.groups_per_epoch,
                                      self.config.seed, self.epoch)
        start, stop_row = parallel.local_range(self.mesh, chunk)
        params = (self.objective.sampling_params(self.state.params, self.state.extra), self.frozen)
        records = tuple(r for r in self.objective.records if r in STEP_RECORDS)
        sampled = SampledEpoch([], [], [], [], None)
        for c in tqdm(range(self.sizes["chunks"]), desc=f"epoch {self.epoch} sampling",
                      leave=False, disable=not self.bars):
            ids = c * chunk + np.arange(start, stop_row)  # global sample ids of this process
            group = ids // s.group_size
            prompts, metadata = self.train_prompts.take(groups[group])
            noise = np.asarray(_noise(noise_key, group if s.same_latent else ids,
                                      self.generator.latent_shape))
            out, text = self._sample_chunk(
                params, self.sigmas, jax.random.fold_in(jax.random.fold_in(epoch_key, _ROLLOUT), c),
                noise, prompts, kind=s.kind, window=self.window, records=records)
            images = self._images(out.final_latents)
            sampled.rewards.append(self.rewards.submit(images, prompts, metadata))  # scored meanwhile
            if not self.config.reward.overlap:
                sampled.rewards[-1].result()
            batch = {name: getattr(out, name) for name in self.objective.records}
            batch["text"] = text
            batch["ids"] = parallel.shard_batch(ids.astype(np.int32), self.mesh)
            sampled.batches.append(batch)
            sampled.prompts.append(prompts)
            sampled.groups.append(groups[group])
            sampled.images = images if sampled.images is None else sampled.images
            if parallel.any_process(stop is not None and stop.requested):
                return None
        return sampled

    # ---- one epoch -----------------------------------------------------------------------------

    def _gather_rewards(self, futures):
        """Global (N,) totals and components, in global sample order, from every process."""
        results = [f.result() for f in futures]
        total = parallel.gather_rows(np.stack([r.total for r in results]))
        components = {name: parallel.gather_rows(np.stack([r.components[name] for r in results]))
                      for name in results[0].components}
        return total, components

    def train_epoch(self, stop: StopFlag | None = None) -> dict | None:
        """One epoch; returns its metrics, or None when stopped before its updates."""
        t = self.config.train
        started = time.perf_counter()
        sampled = self.sample_epoch(stop)
        if sampled is None:
            return None
        data = self._concat(sampled.batches)  # the epoch's rollouts in one copy; chunks freed
        sampled.batches = None
        sample_seconds = time.perf_counter() - started
        total, components = self._gather_rewards(sampled.rewards)
        reward_wait = time.perf_counter() - started - sample_seconds
        # groups are keyed by prompt index: equal prompts of an epoch pool their rewards
        advantages = self.tracker.update(parallel.gather_rows(np.stack(sampled.groups)), total)

        metrics = {"reward/total_mean": total.mean(), "reward/total_std": total.std(),
                   "advantages/zero_std_ratio": advantages.zero_std_ratio,
                   "advantages/group_std_mean": advantages.group_std_mean,
                   "advantages/abs_mean": np.abs(advantages.advantages).mean(),
                   "data/seen_prompts": self.tracker.num_seen_prompts}
        for name, values in components.items():
            metrics[f"reward/{name}_mean"] = values.mean()
            metrics[f"reward/{name}_std"] = values.std()
        if self.is_main and self.epoch % self.config.log_every == 0:
            count = self.config.logging.num_images
            self.writer.images(self.epoch, "train/images", sampled.images[:count],
                               [f"{p} ({r:.3f})" for p, r in zip(sampled.prompts[0][:count], total)])

        if parallel.any_process(stop is not None and stop.requested):
            return None
        train_started = time.perf_counter()
        order = update_order(advantages.keep, seed=self.config.seed, epoch=self.epoch,
                             drop_zero_std=t.drop_zero_std_groups)
        if order is not None:
            targets = self.objective.targets(advantages, self.config)
            data = {**data, "targets": parallel.replicate(targets, self.mesh)}
            step_metrics, metrics["time/rescore_s"] = self._updates(data, order)
            step_metrics = jax.device_get(step_metrics)
            for name in step_metrics[0]:
                values = [float(m[name]) for m in step_metrics]
                metrics[f"train/{name}"] = (min(values) if name.endswith("_min") else
                                            max(values) if name.endswith("_max") else np.mean(values))
            if "ratio_min" in step_metrics[0]:  # the first update is on-policy: its ratios apart
                for name in ("ratio_mean", "ratio_min", "ratio_max", "clipfrac", "approx_kl"):
                    metrics[f"train/on_policy/{name}"] = float(step_metrics[0][name])
                self._check_on_policy(step_metrics[0])
            # the updates the train step skipped for a non-finite loss or gradient norm
            metrics["train/skipped_nonfinite"] = sum(float(m["skipped_nonfinite"])
                                                     for m in step_metrics)
            diverged = self._count_nonfinite(step_metrics)
        if self.programs.after_epoch is not None:
            self.state = self.programs.after_epoch(self.state)
        metrics["train/skipped"] = float(order is None)
        metrics["time/sample_s"] = sample_seconds
        metrics["time/reward_wait_s"] = reward_wait
        metrics["time/train_s"] = time.perf_counter() - train_started
        metrics["time/epoch_s"] = time.perf_counter() - started
        if order is not None and diverged:
            self._log(metrics)
            latest = self.checkpointer.latest_step()
            kept = "no checkpoint was written" if latest is None else (
                f"checkpoint {latest} is the newest")
            raise NonFiniteUpdatesError(
                f"training stopped in epoch {self.epoch}: {self.nonfinite_streak} updates in a "
                f"row had a non-finite loss or gradient norm (the last: loss="
                f"{float(diverged['loss']):.4g}, grad_norm={float(diverged['grad_norm']):.4g}; "
                f"train.max_nonfinite_updates={t.max_nonfinite_updates}); each was skipped, "
                f"nothing is saved after them ({kept}); try a lower train.learning_rate")
        self.epoch += 1
        return metrics

    def _updates(self, data, order) -> tuple[list, float]:
        """The epoch's updates, each on its slice of `order`; their metrics, and the seconds
        spent rescoring at the sampling params. With exact ratios (a likelihood objective and
        train.exact_ratio) the first update's log-ratios are zeros (its params sampled the
        epoch) and a later update's the objective's log-ratio between the rescore program at
        its params and the same program at the sampling params."""
        size = self.sizes["update"]
        exact = self.config.train.exact_ratio and self.programs.rescore is not None
        updates = range(self.config.train.updates_per_epoch)
        # taken anew each time it is needed: one update's copy of the epoch's data at a time
        take = lambda u: self._take(data, parallel.replicate(order[u * size:(u + 1) * size], self.mesh))
        rescore = lambda batch: self.programs.rescore(self.state.params, self.frozen,
                                                      self.state.hyper, batch, self.uncond)
        started = time.perf_counter()
        at_sampling = [rescore(take(u)) for u in updates[1:]] if exact else []
        jax.block_until_ready(at_sampling)
        rescore_seconds = time.perf_counter() - started
        train_key = jax.random.fold_in(jax.random.fold_in(self.base_key, self.epoch), _TRAIN)
        step_metrics = []
        for u in updates:
            batch = take(u)
            if exact:
                batch["log_ratios"] = self._zero_ratios() if u == 0 else self.programs.log_ratio(
                    rescore(batch), at_sampling[u - 1])
            key = parallel.replicate(jax.random.fold_in(train_key, u), self.mesh)
            self.state, m = self.programs.train_step(self.state, self.frozen, self.reference,
                                                      batch, self.uncond, key)
            step_metrics.append(m)
        return step_metrics, rescore_seconds

    def _check_on_policy(self, first: dict) -> None:
        """One warning, the first time an epoch's first update (on-policy: its params sampled
        the epoch) sees ratios beyond the clip range: log-probs of two programs that disagree."""
        clip = self.config.train.clip_range
        if self._warned_off_policy or 1 - clip <= first["ratio_min"] <= first["ratio_max"] <= 1 + clip:
            return
        self._warned_off_policy = True
        if self.is_main:
            print(f"warning: epoch {self.epoch}: its first update is on-policy, yet its ratios span "
                  f"[{float(first['ratio_min']):.6f}, {float(first['ratio_max']):.6f}], beyond "
                  f"train.clip_range={clip:g} (clipfrac {float(first['clipfrac']):.3f}): the "
                  f"rollout's log-probs disagree with the update's; train.exact_ratio=True makes "
                  f"the ratios exact", file=sys.stderr, flush=True)

    def _count_nonfinite(self, step_metrics) -> dict | None:
        """Counts skipped updates in a row, across epochs; the last skipped update's metrics
        once the count reaches train.max_nonfinite_updates, else None."""
        reached = None
        for m in step_metrics:
            self.nonfinite_streak = self.nonfinite_streak + 1 if m["skipped_nonfinite"] else 0
            if self.nonfinite_streak >= self.config.train.max_nonfinite_updates:
                reached = m
        return reached

    # ---- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """ODE at eval_num_steps on the test prompts with the EMA params, scored by evaluation's
        reward server (reward_client); mean rewards, overall and per metadata tag."""
        s = self.config.sample
        count = s.num_eval_prompts or len(self.test_prompts)
        count = min(count, len(self.test_prompts))
        chunk = s.eval_batch_size
        padded = -(-count // chunk) * chunk
        rows = np.minimum(np.arange(padded), count - 1)  # the last prompt repeats as padding
        eval_key = jax.random.fold_in(self.base_key, _EVAL)
        params = (self.state.ema_params if self.config.train.ema else self.state.params, self.frozen)
        if self._eval_rewards is None:
            self._eval_rewards = reward_client(self.config, self.family, evaluation=True) or self.rewards
        start, stop_row = parallel.local_range(self.mesh, chunk)
        futures, first_images, first_prompts = [], None, None
        for c in tqdm(range(padded // chunk), desc="eval", leave=False, disable=not self.bars):
            ids = c * chunk + np.arange(start, stop_row)
            prompts, metadata = self.test_prompts.take(rows[ids])
            noise = np.asarray(_noise(eval_key, ids, self.generator.latent_shape))
            out, _ = self._sample_chunk(params, self.eval_sigmas, eval_key, noise, prompts, kind="ode")
            images = self._images(out.final_latents)
            futures.append(self._eval_rewards.submit(images, prompts, metadata))
            if first_images is None:
                first_images, first_prompts = images, prompts
        total, components = self._gather_rewards(futures)
        metrics = {"eval/reward_mean": total[:count].mean()}
        tags = np.array([str(m.get("tag", "")) for m in self.test_prompts.take(rows[:count])[1]])
        for name, values in components.items():
            metrics[f"eval/{name}_mean"] = values[:count].mean()
            for tag in sorted(set(tags) - {""}):
                metrics[f"eval/{name}_mean/{tag}"] = values[:count][tags == tag].mean()
        if self.is_main:
            n = self.config.logging.num_images
            self.writer.images(self.epoch, "eval/images", first_images[:n], first_prompts[:n])
        return metrics

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
                    self._log(self.evaluate())
                metrics = self.train_epoch(stop)
                if metrics is None:
                    stopped = True
                    break
                per_epoch = (time.perf_counter() - started) / (self.epoch - first)
                left = round(per_epoch * (c.num_epochs - self.epoch))
                self._log(metrics, step=self.epoch - 1,
                          suffix=f" left={left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}")
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/total_mean']:.3f}")
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
            self._log(self.evaluate())
        self.save()
        # Every process reports the params it holds: replicas must agree across processes.
        print(f"process {jax.process_index()}/{jax.process_count()}: epoch {self.epoch}, params "
              f"fingerprint {parallel.fingerprint(self.state.params)}", flush=True)

    def _log(self, metrics: dict, step: int | None = None, suffix: str = "") -> None:
        """Logs `metrics` (TensorBoard, wandb, on_metrics) and prints one line of them."""
        step = self.epoch if step is None else step
        self.writer.scalars(step, metrics)
        if self.on_metrics is not None:
            self.on_metrics(step, metrics)
        if self.is_main:
            shown = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items()
                             if k.endswith("_mean") and k.startswith("eval/") or k in (
                                 "reward/total_mean", "train/loss", "train/kl", "train/approx_kl",
                                 "train/clipfrac", "train/skipped_nonfinite", "time/epoch_s"))
            tqdm.write(f"epoch {step}: {shown}{suffix}")


class TrainingStopped(RuntimeError):
    """The run stopped before config.num_epochs (SIGTERM); its checkpoint is saved."""


def train(config, workdir: str) -> list[dict]:
    """Trains to config.num_epochs in `workdir` (resuming what is there); returns every logged
    metrics dict as {"epoch": step, **metrics}. Raises TrainingStopped when a signal stopped
    the run first."""
    history = []
    record = lambda step, metrics: history.append(
        {"epoch": step, **{k: float(v) for k, v in metrics.items()}})
    with Trainer(config, workdir, on_metrics=record) as trainer:
        trainer.run()
        if trainer.epoch < config.num_epochs:
            raise TrainingStopped(f"training in {workdir} stopped at epoch {trainer.epoch} of "
                                  f"{config.num_epochs}")
    return history


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
_INPUT_ERRORS = (config_lib.ConfigError, ckpt.WorkdirError, PromptFileError)
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
