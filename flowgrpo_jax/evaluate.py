"""GenEval-style evaluation of a toy-world model: strict and partial accuracy, overall and per tag.

    python -m flowgrpo_jax.evaluate --config configs/toy_geneval.py --checkpoint DIR \
        --prompts flowgrpo_jax/toy/data/test.jsonl --out results.json [--grid grid.png]
    python -m flowgrpo_jax.evaluate --model_path flowgrpo_jax/toy/checkpoint \
        --prompts flowgrpo_jax/toy/data/test.jsonl --out base.json

Images come from the deterministic ODE sampler at `config.sample.eval_num_steps` steps with CFG
`config.sample.guidance_scale`; image j of prompt line i starts from noise seeded by
(seed, i, j), so results do not depend on the batch size and two models compare on the same
noise. Images are scored by the toy checker (`toy.checker.score_batch`), so the prompts must be
in GenEval's format over the toy world's shapes and colours.

`--checkpoint` is a training workdir (its latest checkpoint's EMA params, on the model and,
without `--config`, the sampling settings it was trained with) or a model folder of the
config's family (a toy `config.json` + `params.npz`). Without `--config` a model folder comes
from `--model_path` (family `--family`) with the sampling settings of `config.defaults()`.
"""
import argparse
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from flowgrpo_jax import checkpoint as ckpt
from flowgrpo_jax.config import defaults
from flowgrpo_jax.grpo import train_step as ts
from flowgrpo_jax.generator import Generator, load_generator
from flowgrpo_jax.logging_utils import image_grid
from flowgrpo_jax.sampling.rollout import rollout
from flowgrpo_jax.sampling.schedule import flow_match_schedule
from flowgrpo_jax.toy.checker import score_batch
from flowgrpo_jax.toy.prompts import load_prompts
from flowgrpo_jax.programs import build_trainable_model, optimizer_for_config  # as the trainer builds them


def load_config(path: str):
    """`get_config()` of a config file (configs/*.py)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location("evaluated_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config() function")
    return module.get_config()


def initial_noise(seed: int, line: int, image: int, latent_shape) -> jax.Array:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), line), image)
    return jax.random.normal(key, latent_shape, jnp.float32)


def sample_images(generator: Generator, params, prompts: list[str], noise: jax.Array, *,
                  num_steps: int, guidance_scale: float, velocity_fn) -> np.ndarray:
    """uint8 images from initial `noise` (B, *latent_shape) by the ODE sampler with CFG."""
    sigmas, _ = flow_match_schedule(num_steps, shift=generator.shift)
    uncond = generator.encode([""]) if guidance_scale > 1 else None
    out = rollout(velocity_fn, params, noise, generator.encode(prompts), sigmas, key=jax.random.key(0),
                  kind="ode", noise_level=0.0, guidance_scale=guidance_scale, uncond_text=uncond)
    return generator.decode(out.final_latents)


def velocity_function(generator: Generator):
    """velocity_fn(params, x, t, text) for `rollout`, params = nnx.state of generator.model."""
    graphdef = nnx.graphdef(generator.model)

    def velocity(params, x, t, text):
        return generator.apply(nnx.merge(graphdef, params), x, t, text)

    return velocity


def summarize(metadata: list[dict], strict: np.ndarray, partial: np.ndarray) -> dict:
    """Means overall and per tag of (num_lines, images_per_prompt) scores."""
    tags = np.array([m.get("tag", "untagged") for m in metadata])
    per_tag = {tag: {"strict": float(strict[tags == tag].mean()), "partial": float(partial[tags == tag].mean()),
                     "num_prompts": int((tags == tag).sum())} for tag in sorted(set(tags))}
    return {"strict": float(strict.mean()), "partial": float(partial.mean()),
            "num_prompts": len(metadata), "images_per_prompt": int(strict.shape[1]), "per_tag": per_tag}


def evaluate(generator: Generator, params, metadata: list[dict], *, num_steps: int, guidance_scale: float,
             images_per_prompt: int = 1, seed: int = 0, batch_size: int = 64, progress: bool = True,
             velocity_fn=None):
    """(summary dict, uint8 images (num_lines, images_per_prompt, H, W, 3)) of `params`.

    `velocity_fn(params, x, t, text)` defaults to the generator's model with params its
    nnx.state; a trainer's LoRA or fine-tuned params come with their own velocity_fn."""
    if not metadata:
        raise ValueError("no prompts to evaluate")
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"images_per_prompt ({images_per_prompt}) and batch_size ({batch_size}) must be >= 1")
    velocity_fn = velocity_fn or velocity_function(generator)
    jobs = [(i, j) for i in range(len(metadata)) for j in range(images_per_prompt)]
    strict = np.zeros((len(metadata), images_per_prompt), np.float32)
    partial = np.zeros_like(strict)
    images = np.zeros((len(metadata), images_per_prompt, *generator.latent_shape[:2], 3), np.uint8)
    for start in tqdm(range(0, len(jobs), batch_size), desc="evaluate", disable=not progress):
        batch = jobs[start:start + batch_size]
        padded = batch + [batch[-1]] * (batch_size - len(batch))  # one shape, one compilation
        noise = jnp.stack([initial_noise(seed, i, j, generator.latent_shape) for i, j in padded])
        out = sample_images(generator, params, [metadata[i]["prompt"] for i, _ in padded], noise,
                            num_steps=num_steps, guidance_scale=guidance_scale,
                            velocity_fn=velocity_fn)[:len(batch)]
        scores = score_batch(out, [metadata[i] for i, _ in batch])
        for k, (i, j) in enumerate(batch):
            strict[i, j], partial[i, j], images[i, j] = scores["strict"][k], scores["partial"][k], out[k]
    summary = summarize(metadata, strict, partial)
    summary["per_prompt"] = [{"prompt": m["prompt"], "tag": m.get("tag"), "strict": float(s.mean()),
                              "partial": float(p.mean())} for m, s, p in zip(metadata, strict, partial)]
    return summary, images


def is_workdir(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, ckpt.CONFIG_FILE)) and os.path.isdir(
        os.path.join(folder, "checkpoints"))


def load_workdir(workdir: str):
    """(config, generator, params, velocity_fn) of a training workdir's latest checkpoint: the
    EMA params (the trained ones when train.ema is off) on the model the run was started with."""
    with open(os.path.join(workdir, ckpt.CONFIG_FILE)) as f:
        config = ml_collections.ConfigDict(json.load(f))
    generator = load_generator(config.model)
    model = build_trainable_model(config, generator)
    optimizer = optimizer_for_config(config)
    checkpointer = ckpt.TrainCheckpointer(workdir)
    step = checkpointer.latest_step()
    if step is None:
        raise ValueError(f"{workdir} holds no complete training checkpoint yet")
    state, _ = checkpointer.restore(step, ts.init_train_state(model.trainable, optimizer))
    checkpointer.close()
    trained = state.ema_params if config.train.ema else state.params
    return config, generator, (trained, model.frozen), model.velocity


def resolve_model(config, checkpoint: str | None, model_path: str | None):
    """(config, generator, params, velocity_fn) of a training workdir, or of a model folder
    (`checkpoint` or `model_path`) of config.model's family, or of config.model itself."""
    folder = checkpoint or model_path
    if folder is not None and not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if folder is not None and is_workdir(folder):
        workdir_config, generator, params, velocity_fn = load_workdir(folder)
        return config or workdir_config, generator, params, velocity_fn
    if config is None:
        raise ValueError("give --config, or a training workdir as --checkpoint")
    model_config = config.model.copy_and_resolve_references()
    if folder is not None:
        model_config.path = folder
    generator = load_generator(model_config)
    return config, generator, nnx.state(generator.model), velocity_function(generator)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="config file with get_config(); default: flowgrpo_jax.config.defaults()")
    parser.add_argument("--checkpoint", help="model folder (or training workdir) to evaluate")
    parser.add_argument("--model_path", help="base model folder, when there is no training checkpoint")
    parser.add_argument("--family", default="toy", help="model family when --config is not given")
    parser.add_argument("--prompts", required=True, help="GenEval-format JSON lines")
    parser.add_argument("--out", required=True, help="JSON file of the results")
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
        config = load_config(args.config) if args.config else None
        if config is None and not (args.checkpoint and is_workdir(args.checkpoint)):
            config = defaults()
            config.model.family = args.family
        config, generator, params, velocity_fn = resolve_model(config, args.checkpoint, args.model_path)
        metadata = load_prompts(args.prompts)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.num_prompts:
        metadata = metadata[:args.num_prompts]
    num_steps = args.num_steps or config.sample.eval_num_steps
    guidance = config.sample.guidance_scale if args.guidance_scale is None else args.guidance_scale
    start = time.perf_counter()
    summary, images = evaluate(generator, params, metadata, num_steps=num_steps, guidance_scale=guidance,
                               images_per_prompt=args.images_per_prompt, seed=args.seed,
                               batch_size=args.batch_size, velocity_fn=velocity_fn)
    summary.update(prompts_file=args.prompts, checkpoint=args.checkpoint or args.model_path,
                   num_steps=num_steps, guidance_scale=guidance, seed=args.seed,
                   seconds=round(time.perf_counter() - start, 1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    if args.grid:
        rows = images[:args.grid_prompts]
        Image.fromarray(image_grid(rows.reshape(-1, *rows.shape[2:]), columns=rows.shape[1])).save(args.grid)
    print(f"strict {summary['strict']:.3f}  partial {summary['partial']:.3f}  "
          f"({len(metadata)} prompts x {args.images_per_prompt}, {num_steps} steps, cfg {guidance})")
    for tag, row in summary["per_tag"].items():
        print(f"  {tag:14s} strict {row['strict']:.3f}  partial {row['partial']:.3f}  n={row['num_prompts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
