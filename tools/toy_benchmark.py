"""The toy benchmark over seeds: every member of some ablations evaluated as `make demo`
evaluates its run, and the ablations compared.

    python tools/toy_benchmark.py --ablation grpo=runs/grpo --ablation nft=runs/nft ... \
        --out runs/compare [--images_per_prompt 4] [--num_test_prompts N]

An ablation is a `tools/ablate.py` output folder; each of its settings (every one with its
seeds) is a row, labelled LABEL or LABEL/<setting> when it has several. Rows that share a label
are pooled into one over all their members: `--ablation x=runs/seeds0-3 --ablation
x=runs/seeds4-7` gives one row over 8 seeds run as two populations. Every member's EMA
params are evaluated like the demo's trained model: strict accuracy of the toy checker per
category, and exact accuracy overall (strict with no stray object), on the held-out test prompts
and on the seen prompts, ODE at the config's eval steps and CFG, 4 images per line, the demo's
noise; the base model once per CFG scale. Written to OUT: `toy_benchmark.json` (every member's
results, per row the mean, standard deviation, min and max over seeds, the reward curves, the
ablations' wall times), a table per prompt set on stdout, `held_out.png` and `seen.png` (mean
strict accuracy per category with the seeds' standard deviation as error bars, the base beside)
and `reward_curves.png` (mean train reward per epoch, the seeds' range shaded), each figure's
data beside it as JSON.
"""
import argparse
import json
import os
import sys

from absl import logging

from flowgrpo_jax import checkpoint as ckpt
from flowgrpo_jax import config as config_lib
from flowgrpo_jax import demo, plot
from flowgrpo_jax import evaluate as ev
from flowgrpo_jax.prompts import load_prompts

from ablate import seed_curves, spread  # tools/, beside this script

PROMPT_SETS = {"held_out": "held-out test prompts", "seen": "prompts seen in training"}


def prompt_sets(config, num_prompts: int) -> dict:
    files = {"held_out": config.prompts.test_file, "seen": demo.SEEN_PROMPTS}
    sets = {name: load_prompts(path, config.prompts.format) for name, path in files.items()}
    return {name: s.subset(range(min(num_prompts or len(s), len(s)))) for name, s in sets.items()}


def strict(summary: dict) -> dict:
    """{category: strict accuracy, ..., "overall": ...} of an evaluation summary."""
    return {**{tag: row["strict"] for tag, row in summary["per_tag"].items()},
            "overall": summary["strict"]}


def rows_of(label: str, folder: str) -> list[dict]:
    """The settings of the ablation in `folder` as rows: label, member workdirs, histories."""
    with open(os.path.join(folder, "ablate.json")) as f:
        ablation = json.load(f)
    runs = {r["name"]: r for r in ablation["runs"]}
    several = len(ablation["settings"]) > 1
    return [{"label": f"{label}/{s['name']}" if several else label,
             "workdirs": [os.path.join(folder, name) for name in s["runs"]],
             "histories": [runs[name]["history"] for name in s["runs"]],
             "seconds": sum(ablation["seconds"].values())} for s in ablation["settings"]]


def pooled(rows: list[dict]) -> list[dict]:
    """One row per label, over the members (and wall time) of every row with that label, in the
    order the labels first appear."""
    by_label = {}
    for row in rows:
        into = by_label.setdefault(row["label"], {"label": row["label"], "workdirs": [],
                                                  "histories": [], "seconds": 0.0})
        into["workdirs"] += row["workdirs"]
        into["histories"] += row["histories"]
        into["seconds"] += row["seconds"]
    return list(by_label.values())


def guidance_scale(row: dict) -> float:
    """The CFG scale every member of `row` samples with, the one its base is evaluated at
    (ValueError when its members differ: they are two settings, not one)."""
    scales = {ckpt.recorded_config(w)["sample"]["guidance_scale"] for w in row["workdirs"]}
    if len(scales) > 1:
        raise ValueError(f"{row['label']!r} pools members sampled at CFG "
                         f"{', '.join(f'{s:g}' for s in sorted(scales))}; give them different labels")
    return scales.pop()


def evaluate_row(row: dict, sets: dict, base_cache: dict, **evaluation) -> dict:
    """Every member of `row` and its base, per prompt set: strict accuracy per category."""
    members = []
    for workdir in row["workdirs"]:
        config, model = ev.workdir_model(workdir)
        members.append(accuracies(demo._evaluate_sets(
            config, model, sets, f"{row['label']} {os.path.basename(workdir)}", **evaluation)))
    guidance = row["guidance_scale"]
    if guidance not in base_cache:
        base_cache[guidance] = accuracies(demo._evaluate_sets(
            config, ev.base_model(config.model), sets, f"base, CFG {guidance}", **evaluation))
    stats = {name: {tag: spread([m[name][tag] for m in members]) for tag in members[0][name]}
             for name in sets}
    exact = {name: spread([m["exact"][name] for m in members]) for name in sets}
    return {"label": row["label"], "members": members, "base": base_cache[guidance],
            "stats": stats, "exact": exact, "seconds": row["seconds"], "guidance_scale": guidance}


def accuracies(summaries: dict) -> dict:
    """{set: strict accuracy per category and overall, ..., "exact": {set: exact accuracy}}:
    exact (strict with no stray object) beside strict tells how much of a score stray objects
    cost."""
    return {**{name: strict(s) for name, s in summaries.items()},
            "exact": {name: s["exact"] for name, s in summaries.items()}}


def table(results: list[dict], name: str) -> str:
    """A row per ablation setting, a column per category and one of exact accuracy: mean ±std
    over seeds (change)."""
    tags = list(results[0]["stats"][name])
    cell = lambda stat, base: f"{stat['mean']:.3f} ±{stat['std'] or 0.0:.3f} ({stat['mean'] - base:+.3f})"
    rows = [[r["label"]] + [cell(r["stats"][name][t], r["base"][name][t]) for t in tags]
            + [cell(r["exact"][name], r["base"]["exact"][name])] for r in results]
    header = ["", *tags, "exact: overall"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [header, *rows])


def figures(results: list[dict], out: str) -> None:
    for name, title in PROMPT_SETS.items():
        tags = list(results[0]["stats"][name])
        series, errors = {}, {}
        for r in results:
            base_label = f"base (CFG {r['guidance_scale']:g})"
            series.setdefault(base_label, [r["base"][name][t] for t in tags])
            series[r["label"]] = [r["stats"][name][t]["mean"] for t in tags]
            errors[r["label"]] = [r["stats"][name][t]["std"] or 0.0 for t in tags]
        plot.bar_chart(tags, series, errors=errors, ylim=(0, 1.05), ylabel="strict accuracy",
                       title=f"strict accuracy per category, {title} (mean and std over seeds)"
                       ).save(os.path.join(out, f"{name}.png"))
    seed_curves({r["label"]: r["histories"] for r in results}, "train reward per epoch (mean "
                "over seeds, range shaded)").save(os.path.join(out, "reward_curves.png"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ablation", action="append", required=True, metavar="LABEL=FOLDER")
    parser.add_argument("--out", required=True)
    parser.add_argument("--images_per_prompt", type=int, default=demo.IMAGES_PER_PROMPT)
    parser.add_argument("--num_test_prompts", type=int, default=0, help="the first N lines of "
                        "each prompt set; 0: all")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.WARNING)
    try:
        rows = pooled([row for text in args.ablation for row in rows_of(*text.split("=", 1))])
        rows = [{**row, "guidance_scale": guidance_scale(row)} for row in rows]
    except (OSError, KeyError, ValueError, TypeError) as e:
        print(f"error: --ablation: {e}", file=sys.stderr)
        return 2
    sets = prompt_sets(config_lib.load_file(demo.DEFAULT_CONFIG), args.num_test_prompts)
    os.makedirs(args.out, exist_ok=True)
    base_cache, results = {}, []
    for row in rows:
        results.append({**evaluate_row(row, sets, base_cache, seed=0,
                                       images_per_prompt=args.images_per_prompt),
                        "histories": row["histories"]})
    for name, title in PROMPT_SETS.items():
        print(f"\nstrict accuracy, {title}: mean ±std over seeds (change from its base)")
        print(table(results, name))
    figures(results, args.out)
    with open(os.path.join(args.out, "toy_benchmark.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}/toy_benchmark.json, held_out.png, seen.png, reward_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
