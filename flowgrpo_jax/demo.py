"""The built-in default (`make demo`): Flow-GRPO on the toy world, base vs trained, on a CPU.

    python -m flowgrpo_jax.demo [--workdir runs/demo] [--config configs/toy_geneval.py[:variant]]
        [--config.key=value ...] [--seen_prompts FILE] [--images_per_prompt 4] [--overwrite]

1. evaluates the base model (the config's `model`): strict and partial accuracy of the toy
   checker on the held-out test prompts (`prompts.test_file`) and on prompts seen in training
   (`--seen_prompts`; "" skips them), ODE at `sample.eval_num_steps`, image j of prompt i from
   noise seeded by (seed, i, j) (`evaluate.evaluate`, with the toy family's own scoring);
2. trains with `flowgrpo_jax.train.train` (rewards from the local reward process);
3. evaluates the trained EMA params of the last checkpoint the same way, on the same noise;
4. prints a per-category table per prompt set and writes to the workdir: `results.json`
   (every number, the per-epoch metrics and the phase times), `reward_curve.png` (train reward
   per epoch, eval accuracy points), `accuracy_per_category.png` (held out) and
   `accuracy_per_category_seen.png` (base vs trained strict accuracy per category), drawn with
   matplotlib and each with its data in `<name>.data.json`, `grid_base.png` /
   `grid_trained.png` (held-out prompts, the same seeds) and `before_after.png` (both side by
   side, one labelled row per prompt).
"""
import json
import os
import shutil
import sys
import time

import jax
from absl import flags, logging
from ml_collections import config_flags
from PIL import Image

from flowgrpo_jax import compile_cache
from flowgrpo_jax import evaluate as ev
from flowgrpo_jax import plot
from flowgrpo_jax.families.toy.prompts import DATA_DIR, TAGS
from flowgrpo_jax.logging_utils import image_grid
from flowgrpo_jax.prompts import PromptSet, load_prompts
from flowgrpo_jax.train import TrainingStopped, train

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "toy_geneval.py")
STRICT = "toy_geneval/strict"  # the reward's strict sub-score, as the trainer logs it
PARTIAL = "toy_geneval/partial"
IMAGES_PER_PROMPT = 4  # GenEval's protocol: 4 images per test prompt
SEEN_PROMPTS = str(DATA_DIR / "seen.jsonl")
# results.json key, table title and bar chart file of each prompt set
PROMPT_SETS = {"held_out": ("held-out test prompts (compositions never trained)", "accuracy_per_category.png"),
               "seen": ("prompts seen in training", "accuracy_per_category_seen.png")}


def grid_rows(metadata, per_tag: int) -> list[int]:
    """The first `per_tag` test lines of every tag, tags in TAGS order."""
    rows = []
    for tag in TAGS:
        rows += [i for i, m in enumerate(metadata) if m.get("tag") == tag][:per_tag]
    return rows


def evaluate_model(config, model: ev.Model, prompt_set: PromptSet, *, images_per_prompt: int,
                   seed: int, desc: str):
    print(f"-- evaluating the {desc} model: {len(prompt_set)} prompts x {images_per_prompt}, "
          f"ODE {config.sample.eval_num_steps} steps, CFG {config.sample.guidance_scale}", flush=True)
    return ev.evaluate(model, prompt_set, ev.scorer_for(config, model.family),
                       num_steps=config.sample.eval_num_steps,
                       guidance_scale=config.sample.guidance_scale, images_per_prompt=images_per_prompt,
                       seed=seed, batch_size=config.sample.eval_batch_size)


def reward_curve(history: list[dict], base: dict, trained: dict, num_epochs: int):
    """Train reward per epoch (lines) and strict test accuracy (points)."""
    epochs = [h for h in history if "reward/total_mean" in h]
    lines = {"train reward (the configured score), mean per epoch":
             ([h["epoch"] for h in epochs], [h["reward/total_mean"] for h in epochs])}
    for name, label in ((STRICT, "train strict accuracy"), (PARTIAL, "train partial credit")):
        if epochs and f"reward/{name}_mean" in epochs[0]:
            lines[f"{label}, mean per epoch"] = (
                [h["epoch"] for h in epochs], [h[f"reward/{name}_mean"] for h in epochs])
    points = {"strict test accuracy (all test prompts, before / after)":
              ([0, num_epochs], [base["strict"], trained["strict"]])}
    evals = [h for h in history if f"eval/{STRICT}_mean" in h]
    if evals:
        points["strict accuracy during training (trainer's eval subset)"] = (
            [h["epoch"] for h in evals], [h[f"eval/{STRICT}_mean"] for h in evals])
    return plot.line_chart(lines, points=points, title="Flow-GRPO on the toy world",
                           xlabel="epoch", ylabel="reward / accuracy")


def category_bars(base: dict, trained: dict, title: str):
    """Strict accuracy per category and overall, base vs trained."""
    tags = list(base["per_tag"])
    return plot.bar_chart(
        tags + ["overall"],
        {"base": [base["per_tag"][t]["strict"] for t in tags] + [base["strict"]],
         "trained (Flow-GRPO, EMA)": [trained["per_tag"][t]["strict"] for t in tags]
         + [trained["strict"]]},
        title=f"strict accuracy per category: {title}", ylabel="strict accuracy", ylim=(0, 1.05))


def table(base: dict, trained: dict) -> str:
    lines = [f"{'category':14s} {'base':>6s} {'trained':>8s} {'change':>7s}   (strict accuracy)"]
    for tag in base["per_tag"]:
        b, t = base["per_tag"][tag]["strict"], trained["per_tag"][tag]["strict"]
        lines.append(f"{tag:14s} {b:6.3f} {t:8.3f} {t - b:+7.3f}")
    lines.append(f"{'overall':14s} {base['strict']:6.3f} {trained['strict']:8.3f} "
                 f"{trained['strict'] - base['strict']:+7.3f}")
    return "\n".join(lines)


def _summary(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "per_prompt"}


def write_figures(workdir: str, metadata, rows, base_images, trained_images) -> None:
    """grid_base.png / grid_trained.png (one row per prompt) and before_after.png."""
    for name, images in (("grid_base.png", base_images), ("grid_trained.png", trained_images)):
        picked = images[rows]
        Image.fromarray(image_grid(picked.reshape(-1, *picked.shape[2:]), columns=picked.shape[1])
                        ).save(os.path.join(workdir, name))
    labels = [f"[{metadata[i]['tag']}] {metadata[i]['prompt'].removeprefix('a photo of ')}" for i in rows]
    plot.labelled_rows([[base_images[i], trained_images[i]] for i in rows], labels, scale=2,
                       column_titles=["base", "trained (Flow-GRPO)"]
                       ).save(os.path.join(workdir, "before_after.png"))


def _evaluate_sets(config, model, prompt_sets: dict, desc: str, **kwargs) -> dict:
    summaries = {}
    for name, prompt_set in prompt_sets.items():
        summaries[name], _ = evaluate_model(config, model, prompt_set, desc=f"{desc}, {name}", **kwargs)
        print(f"{desc} strict accuracy, {name}: {summaries[name]['strict']:.3f}", flush=True)
    return summaries


def run(config, workdir: str, *, seen_prompts: str = SEEN_PROMPTS, images_per_prompt: int = IMAGES_PER_PROMPT,
        num_test_prompts: int = 0, grid_per_tag: int = 2, grid_images: int = 4, seed: int = 0) -> dict:
    """The whole demo; returns what results.json holds."""
    started = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    files = {"held_out": config.prompts.test_file} | ({"seen": seen_prompts} if seen_prompts else {})
    prompt_sets = {}
    for name, path in files.items():
        prompt_set = load_prompts(path, config.prompts.format)
        prompt_sets[name] = prompt_set.subset(range(min(num_test_prompts or len(prompt_set), len(prompt_set))))
    test = prompt_sets["held_out"]
    rows = grid_rows(test.metadata, grid_per_tag)
    times = {}
    evaluation = dict(images_per_prompt=images_per_prompt, seed=seed)

    base_model = ev.base_model(config.model)
    t = time.perf_counter()
    base = _evaluate_sets(config, base_model, prompt_sets, "base", **evaluation)
    times["eval_base_s"] = time.perf_counter() - t

    print(f"-- training with objective {config.train.objective!r} (train.objective): "
          f"{config.num_epochs} epochs of {config.sample.groups_per_epoch} prompts x "
          f"{config.sample.group_size} images", flush=True)
    t = time.perf_counter()
    history = train(config, workdir)
    times["train_s"] = time.perf_counter() - t

    _, trained_model = ev.workdir_model(workdir)
    t = time.perf_counter()
    trained = _evaluate_sets(config, trained_model, prompt_sets, "trained (EMA)", **evaluation)
    times["eval_trained_s"] = time.perf_counter() - t

    # Grids: more seeds of a few prompts per category, the same noise for both models.
    grid = test.subset(rows)
    _, base_images = evaluate_model(config, base_model, grid, images_per_prompt=grid_images,
                                    seed=seed, desc="base (grid)")
    _, trained_images = evaluate_model(config, trained_model, grid, images_per_prompt=grid_images,
                                       seed=seed, desc="trained (grid)")
    write_figures(workdir, grid.metadata, list(range(len(rows))), base_images, trained_images)
    reward_curve(history, base["held_out"], trained["held_out"], config.num_epochs).save(
        os.path.join(workdir, "reward_curve.png"))
    for name in prompt_sets:
        title, figure = PROMPT_SETS[name]
        category_bars(base[name], trained[name], title).save(os.path.join(workdir, figure))
    times["total_s"] = time.perf_counter() - started

    results = {name: {"base": base[name], "trained": trained[name]} for name in prompt_sets}
    results |= {"history": history, "seconds": {k: round(v, 1) for k, v in times.items()},
                "eval": {"files": files, "num_prompts": {k: len(v) for k, v in prompt_sets.items()},
                         "images_per_prompt": images_per_prompt,
                         "num_steps": config.sample.eval_num_steps,
                         "guidance_scale": config.sample.guidance_scale, "seed": seed},
                "config": config.to_dict(), "cpu_load_avg": list(os.getloadavg()),
                "devices": [str(d) for d in jax.devices()]}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    for name in prompt_sets:
        print(f"\n{PROMPT_SETS[name][0]}:")
        print(table(_summary(base[name]), _summary(trained[name])))
    print(f"demo finished in {times['total_s']:.0f} s; figures and results.json in {workdir}")
    return results


# Own flag set: flowgrpo_jax.train defines --config and --workdir on absl's global one.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "configs/NAME.py[:variant]",
                                          flag_values=FLAGS)
flags.DEFINE_string("workdir", "runs/demo", "training run, figures and results.json", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "delete an existing workdir first", flag_values=FLAGS)
flags.DEFINE_string("seen_prompts", SEEN_PROMPTS, "prompts seen in training, evaluated beside the"
                    " held-out test file; \"\": none", flag_values=FLAGS)
flags.DEFINE_integer("images_per_prompt", IMAGES_PER_PROMPT, "eval images per test prompt",
                     flag_values=FLAGS)
flags.DEFINE_integer("num_test_prompts", 0, "the first N prompts of each set only; 0: all", flag_values=FLAGS)
flags.DEFINE_integer("grid_per_tag", 2, "prompts per category in the image grids", flag_values=FLAGS)
flags.DEFINE_integer("grid_images", 4, "seeds per prompt in the image grids", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the eval noise", flag_values=FLAGS)


def main(argv=None) -> int:
    try:
        FLAGS(sys.argv if argv is None else argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    config = _CONFIG.value
    compile_cache.setup(config.compilation_cache.enabled, config.compilation_cache.dir)
    workdir = FLAGS.workdir
    if os.path.exists(workdir) and os.listdir(workdir):
        if not FLAGS.overwrite:
            print(f"error: {workdir} is not empty (a previous demo?); pass --overwrite to delete it "
                  f"or --workdir to use another folder", file=sys.stderr)
            return 2
        shutil.rmtree(workdir)
    try:
        run(config, workdir, seen_prompts=FLAGS.seen_prompts, images_per_prompt=FLAGS.images_per_prompt,
            num_test_prompts=FLAGS.num_test_prompts, grid_per_tag=FLAGS.grid_per_tag,
            grid_images=FLAGS.grid_images, seed=FLAGS.seed)
    except TrainingStopped as e:
        print(f"demo stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
