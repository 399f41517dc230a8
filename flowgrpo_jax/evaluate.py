"""Evaluation of a model of any family: images of a prompt file by the deterministic ODE, scored
by the family's own scoring or by registered rewards; means overall, per tag and per prompt.

    python -m flowgrpo_jax.evaluate --config configs/toy_geneval.py --out base.json
    python -m flowgrpo_jax.evaluate --checkpoint WORKDIR --out trained.json [--grid grid.png]
    python -m flowgrpo_jax.evaluate --config configs/sd35m_ocr.py --checkpoint sd35m-flax \
        --prompts ocr/test.txt --reward ocr:1.0 --out ocr.json

Images come from the ODE at `config.sample.eval_num_steps` steps with CFG
`config.sample.guidance_scale` (against the family's negative prompt); image j of prompt line
i starts from noise seeded by (seed, i, j), so results do not depend on the batch size and two
models compare on the same noise.

`--checkpoint` is a training workdir (its latest checkpoint's EMA params, on the model the run
trained; without `--config`, with that run's config) or a model folder of the config's family
(it takes the place of `config.model.path`); without it, `config.model` itself is evaluated.
`--lora` adds a PyTorch LoRA adapter (a PEFT adapter folder or a diffusers LoRA file, as
`lora.init_from` reads them) to that model, at the adapter's own modules, rank and scale.
Scores: `--reward "name:weight,..."` (registered rewards: "reward" is the weighted total,
every reward and sub-score is a column of its own), else the family's own scoring (the toy
family: its checker's strict, partial and exact), else the config's rewards. Prompts are read
in `config.prompts.format` (default file: `config.prompts.test_file`); a metadata "tag" groups
the per-tag means.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from flowgrpo_jax import checkpoint as ckpt
from flowgrpo_jax import config as config_lib
from flowgrpo_jax import families, lora_io
from flowgrpo_jax.generator import Family, Generator, nnx_velocity
from flowgrpo_jax.logging_utils import image_grid
from flowgrpo_jax.programs import abstract_state, build_trainable_model
from flowgrpo_jax.prompts import PromptSet, load_prompts
from flowgrpo_jax.rewards import registry
from flowgrpo_jax.sampling.rollout import rollout


@dataclasses.dataclass
class Model:
    """What to sample from: a family's generator and the params its velocity_fn takes."""

    family: Family
    generator: Generator
    params: tuple  # of NNX states, merged by velocity_fn
    velocity_fn: Callable  # velocity_fn(params, x, t, text)


def base_model(model_config) -> Model:
    """The model `model_config` describes, as its family builds it."""
    family = families.load(model_config.family)
    generator = family.build(model_config)
    return Model(family, generator, (nnx.state(generator.model),),
                 nnx_velocity(nnx.graphdef(generator.model), generator.apply))


def workdir_model(workdir: str) -> tuple[ml_collections.ConfigDict, Model]:
    """(config, model) of a training workdir's latest checkpoint: the EMA params (the trained
    ones when train.ema is off) on the model the run was started with, split as it trains."""
    config = ml_collections.ConfigDict(ckpt.recorded_config(workdir))
    family = families.load(config.model.family)
    generator = family.build(config.model)
    model = build_trainable_model(config, family, generator, load_adapter=False)
    _, trained = ckpt.restore_trained_params(
        workdir, abstract_state(config, model.trainable, jax.devices()[0]), ema=config.train.ema)
    return config, Model(family, generator, (trained, model.frozen), model.velocity)


def adapter_model(config, path: str) -> Model:
    """The config's model with the LoRA adapter at `path` (a PEFT adapter folder or a diffusers
    LoRA file, as lora.init_from): LoRA exactly on the adapter's modules, at its rank and scale."""
    family = families.load(config.model.family)
    if family.torch is None:
        raise lora_io.AdapterError(f"--lora {path}: model family {config.model.family!r} has no "
                                   f"PyTorch counterpart, so no PyTorch LoRA adapter fits it")
    adapter = lora_io.read_adapter(path, family.torch.component)
    generator = family.build(config.model)
    ranks = sorted(set(adapter.ranks.values()))
    if len(ranks) != 1:
        raise lora_io.AdapterError(f"--lora {path}: modules of different ranks {ranks}")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.lora.enabled, config.lora.rank, config.lora.alpha = True, ranks[0], float(ranks[0])
        config.lora.targets = lora_io.adapter_targets(generator.model, family.torch, adapter)
        config.lora.init_from = path
    model = build_trainable_model(config, family, generator)
    return Model(family, generator, (model.trainable, model.frozen), model.velocity)


def reward_scorer(rewards: str, options: dict, plugins=()) -> Callable:
    """score(images, prompts, metadata) -> {"reward": weighted total, component: ...} of the
    registered rewards `rewards` ("name:weight,..."), built in this process."""
    for plugin in plugins:
        registry.load_plugin(plugin)
    weights = registry.parse_weights(rewards)
    weighted = registry.WeightedReward(weights, registry.options_in_use(weights, options))

    def score(images, prompts, metadata):
        total, components = weighted(images, prompts, metadata)
        return {"reward": total, **components}

    return score


def scorer_for(config, family: Family, rewards: str | None = None) -> Callable:
    """`rewards` if given, else the family's own scoring, else the config's rewards."""
    if rewards is None and family.score is not None:
        return family.score
    plugins = tuple(config.reward.plugins) + tuple(family.reward_plugins)
    eval_options = config.reward.get("eval_options")  # absent from older runs' configs
    options = registry.merged_options(config.reward.options.to_dict(),
                                      eval_options.to_dict() if eval_options else {})
    return reward_scorer(rewards or config.reward.rewards, options, plugins)


def initial_noise(seed: int, line: int, image: int, latent_shape) -> jax.Array:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), line), image)
    return jax.random.normal(key, latent_shape, jnp.float32)


def ode_images(model: Model, prompts: list[str], noise: jax.Array, *, num_steps: int,
               guidance_scale: float) -> np.ndarray:
    """uint8 images from initial `noise` (B, *latent_shape) by the ODE sampler with CFG."""
    generator = model.generator
    sigmas = generator.sigmas(num_steps)
    uncond = generator.encode([model.family.negative_prompt]) if guidance_scale > 1 else None
    out = rollout(model.velocity_fn, model.params, noise, generator.encode(prompts), sigmas,
                  key=jax.random.key(0), kind="ode", noise_level=0.0,
                  guidance_scale=guidance_scale, uncond_text=uncond, records=())
    return generator.decode(out.final_latents)


def summarize(prompt_set: PromptSet, scores: dict) -> dict:
    """Means overall, per tag and per prompt line of {name: (lines, images_per_prompt)} scores."""
    tags = np.array([m.get("tag", "untagged") for m in prompt_set.metadata])
    summary = {name: float(values.mean()) for name, values in scores.items()}
    summary.update(num_prompts=len(prompt_set),
                   images_per_prompt=int(next(iter(scores.values())).shape[1]))
    summary["per_tag"] = {
        tag: {**{name: float(values[tags == tag].mean()) for name, values in scores.items()},
              "num_prompts": int((tags == tag).sum())} for tag in sorted(set(tags))}
    summary["per_prompt"] = [
        {"prompt": prompt, "tag": metadata.get("tag"),
         **{name: float(values[i].mean()) for name, values in scores.items()}}
        for i, (prompt, metadata) in enumerate(zip(prompt_set.prompts, prompt_set.metadata))]
    return summary


def evaluate(model: Model, prompt_set: PromptSet, score: Callable, *, num_steps: int,
             guidance_scale: float, images_per_prompt: int = 1, seed: int = 0,
             batch_size: int = 64):
    """(summary dict, uint8 images (lines, images_per_prompt, H, W, 3)) of `model` on the
    prompt lines of `prompt_set`, scored by score(images, prompts, metadata)."""
    if not len(prompt_set):
        raise ValueError("no prompts to evaluate")
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"images_per_prompt ({images_per_prompt}) and batch_size ({batch_size}) must be >= 1")
    shape = model.generator.latent_shape
    jobs = [(i, j) for i in range(len(prompt_set)) for j in range(images_per_prompt)]
    scores = {}
    images = None
    # progress bars on a terminal only, not in a log file
    for start in tqdm(range(0, len(jobs), batch_size), desc="evaluate",
                      disable=not sys.stderr.isatty()):
        batch = jobs[start:start + batch_size]
        padded = batch + [batch[-1]] * (batch_size - len(batch))  # one shape, one compilation
        noise = jnp.stack([initial_noise(seed, i, j, shape) for i, j in padded])
        out = ode_images(model, [prompt_set.prompts[i] for i, _ in padded], noise,
                         num_steps=num_steps, guidance_scale=guidance_scale)[:len(batch)]
        prompts, metadata = prompt_set.take([i for i, _ in batch])
        batch_scores = score(out, prompts, metadata)
        if images is None:
            images = np.zeros((len(prompt_set), images_per_prompt, *out.shape[1:]), np.uint8)
        for name, values in batch_scores.items():
            scores.setdefault(name, np.zeros((len(prompt_set), images_per_prompt), np.float32))
            for k, (i, j) in enumerate(batch):
                scores[name][i, j] = values[k]
        for k, (i, j) in enumerate(batch):
            images[i, j] = out[k]
    return summarize(prompt_set, scores), images


def resolve(config, checkpoint: str | None, lora: str | None = None
            ) -> tuple[ml_collections.ConfigDict, Model]:
    """(config, model) of a training workdir, of a model folder of config.model's family, or
    of config.model itself; with `lora`, that model with the LoRA adapter at `lora`."""
    if lora is not None:
        if checkpoint is not None and ckpt.is_workdir(checkpoint):
            raise ValueError("--lora adds an adapter to a base model: give it a model folder, "
                             "not a training workdir, as --checkpoint")
        if config is None:
            raise ValueError("--lora needs --config (the base model's family and settings)")
        config = config.copy_and_resolve_references()
        if checkpoint is not None:
            config.model.path = checkpoint
        return config, adapter_model(config, lora)
    if checkpoint is not None and not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint folder {checkpoint} does not exist")
    if checkpoint is not None and ckpt.is_workdir(checkpoint):
        workdir_config, model = workdir_model(checkpoint)
        return config or workdir_config, model
    if config is None:
        raise ValueError("give --config, or a training workdir as --checkpoint")
    model_config = config.model.copy_and_resolve_references()
    if checkpoint is not None:
        model_config.path = checkpoint
    return config, base_model(model_config)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="configs/NAME.py[:variant]")
    parser.add_argument("--checkpoint", help="training workdir, or model folder of the config's family")
    parser.add_argument("--lora", help="a PEFT adapter folder or diffusers LoRA file to evaluate "
                                       "on the base model (a Hub id in the local cache too)")
    parser.add_argument("--prompts", help="prompt file; default: the config's test file")
    parser.add_argument("--out", required=True, help="JSON file of the results")
    parser.add_argument("--reward", help="registered rewards 'name:weight,...' to score with, "
                                         "instead of the family's own scoring")
    parser.add_argument("--images_per_prompt", type=int, default=1)
    parser.add_argument("--num_prompts", type=int, default=0, help="the first N lines only; 0: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_steps", type=int, help="override config.sample.eval_num_steps")
    parser.add_argument("--guidance_scale", type=float, help="override config.sample.guidance_scale")
    parser.add_argument("--grid", help="PNG of the first images, one row per prompt")
    parser.add_argument("--grid_prompts", type=int, default=16, help="prompts in the grid")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = config_lib.load_file(args.config) if args.config else None
        config, model = resolve(config, args.checkpoint, args.lora)
        prompts_file = args.prompts or config.prompts.test_file
        prompt_set = load_prompts(prompts_file, config.prompts.format)
        score = scorer_for(config, model.family, args.reward)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.num_prompts:
        prompt_set = prompt_set.subset(range(min(args.num_prompts, len(prompt_set))))
    num_steps = args.num_steps or config.sample.eval_num_steps
    guidance = config.sample.guidance_scale if args.guidance_scale is None else args.guidance_scale
    start = time.perf_counter()
    summary, images = evaluate(model, prompt_set, score, num_steps=num_steps,
                               guidance_scale=guidance, images_per_prompt=args.images_per_prompt,
                               seed=args.seed, batch_size=args.batch_size)
    summary.update(prompts_file=prompts_file, checkpoint=args.checkpoint, num_steps=num_steps,
                   guidance_scale=guidance, seed=args.seed,
                   seconds=round(time.perf_counter() - start, 1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    if args.grid:
        rows = images[:args.grid_prompts]
        Image.fromarray(image_grid(rows.reshape(-1, *rows.shape[2:]), columns=rows.shape[1])).save(args.grid)
    names = [name for name in summary["per_prompt"][0] if name not in ("prompt", "tag")]
    print("  ".join(f"{name} {summary[name]:.3f}" for name in names) +
          f"  ({len(prompt_set)} prompts x {args.images_per_prompt}, {num_steps} steps, cfg {guidance})")
    for tag, row in summary["per_tag"].items():
        print(f"  {tag:14s} " + "  ".join(f"{name} {row[name]:.3f}" for name in names) +
              f"  n={row['num_prompts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
