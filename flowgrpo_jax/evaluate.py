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

`--checkpoint` is a model folder of the family (a toy `config.json` + `params.npz`) or a
training workdir; without `--config` the model comes from `--model_path` (family `--family`)
with the default sampling settings of `flowgrpo_jax.config.defaults()`.
"""
import argparse
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from flowgrpo_jax.config import defaults
from flowgrpo_jax.generator import Generator, load_generator
from flowgrpo_jax.logging_utils import image_grid
from flowgrpo_jax.sampling.rollout import rollout
from flowgrpo_jax.sampling.schedule import flow_match_schedule
from flowgrpo_jax.toy.checker import score_batch
from flowgrpo_jax.toy.prompts import load_prompts


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
             images_per_prompt: int = 1, seed: int = 0, batch_size: int = 64, progress: bool = True):
    """(summary dict, uint8 images (num_lines, images_per_prompt, H, W, 3)) of `params`."""
    if not metadata:
        raise ValueError("no prompts to evaluate")
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"images_per_prompt ({images_per_prompt}) and batch_size ({batch_size}) must be >= 1")
    velocity_fn = velocity_function(generator)
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


def resolve_model(config, checkpoint: str | None, model_path: str | None):
    """(generator, params) for a model folder, a base model path, or the config's model."""
    model_config = config.model
    folder = checkpoint or model_path
    if folder is not None:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
        if os.path.isdir(os.path.join(folder, "checkpoints")):
            raise ValueError(f"{folder} is a training workdir; evaluating workdirs needs the trainer's "
                             f"checkpoint layout, pass the exported model folder instead")
        model_config = model_config.copy_and_resolve_references()
        model_config.path = folder
    generator = load_generator(model_config)
    return generator, nnx.state(generator.model)


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
        if args.config:
            config = load_config(args.config)
        else:
            config = defaults()
            config.model.family = args.family
        generator, params = resolve_model(config, args.checkpoint, args.model_path)
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
                               batch_size=args.batch_size)
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
