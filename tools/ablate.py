"""Ablations: runs of a config over chosen keys and seeds, one table and one plot of reward curves.

    python tools/ablate.py --vmap train.learning_rate=1e-4,2e-4,4e-4 --seeds 8 \
        [--grid sample.kind=sde,cps] [--set num_epochs=50 ...] --out runs/ablate \
        [--config configs/toy_geneval.py[:variant]]

`--vmap` keys (numeric hyperparameters: rates, KL weight, clip range, noise level, guidance,
EMA decay, NFT's beta and decay) and `--seeds N` (seeds seed .. seed+N-1) make a population:
all their combinations train as one program (flowgrpo_jax/population.py). `--grid` keys may be
any key; each of their combinations is a run of its own (a population with --vmap or --seeds),
one after another, in OUT/<grid values>, its members in OUT/<grid values>/<member>. OUT must not
hold those runs yet (give a fresh OUT). Values are parsed as the type of the key's current value.

Results, per setting (the values of every key but the seed): over its seeds the mean, the
standard deviation and a 95% interval (Student's t) of the final reward (the mean of the last
`--last` epochs' reward means), of the last eval reward (when eval_every > 0) and of each
eval category (metadata tags: eval/<reward>_mean/<tag>); the first reward, and "epoch s" and
"rollout s" (sampling plus the wait for the last rewards), medians over epochs; `--show METRIC
...` adds the mean last value of logged metrics. A table on stdout (with a second one of the
categories), OUT/ablate.json (every member's overrides, history and summary, every setting's
statistics, every run's wall time) and OUT/ablate.png (each setting's mean reward per epoch,
its seeds' range shaded; its data in ablate.data.json), both rewritten after every run, so a
grid stopped part-way (SIGTERM, Ctrl-C) keeps the runs it finished.
"""
import argparse
import itertools
import json
import math
import os
import sys
import time

import numpy as np
from absl import logging
from scipy import stats

from flowgrpo_jax import compile_cache
from flowgrpo_jax import config as config_lib
from flowgrpo_jax import plot, population
from flowgrpo_jax.population import PopulationError, apply, parse_assignment, parse_value, run_name
from flowgrpo_jax.train import TrainingStopped, train

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "toy_geneval.py")


def summarize(history: list[dict], last: int, show=()) -> dict:
    rewards = [h["reward/total_mean"] for h in history if "reward/total_mean" in h]
    evals = [h for h in history if "eval/reward_mean" in h]
    epochs = [h for h in history if "time/epoch_s" in h]
    # rollout = sampling + waiting for the last rewards: the part reward.overlap changes
    rollout = [h["time/sample_s"] + h["time/reward_wait_s"] for h in epochs]
    categories = {k.rpartition("/")[2]: v for k, v in (evals[-1] if evals else {}).items()
                  if k.count("/") == 2 and k.startswith("eval/") and "_mean/" in k}
    return {"first_reward": rewards[0] if rewards else None,
            "final_reward": float(np.mean(rewards[-last:])) if rewards else None,
            "eval_reward": evals[-1]["eval/reward_mean"] if evals else None,
            "categories": categories,
            "median_epoch_s": float(np.median([h["time/epoch_s"] for h in epochs])) if epochs else None,
            "median_rollout_s": float(np.median(rollout)) if epochs else None,
            "shown": {name: next((h[name] for h in reversed(history) if name in h), None)
                      for name in show}}


def spread(values: list) -> dict | None:
    """Mean, standard deviation, the 95% interval's half-width (Student's t), min and max of
    seeds' values; None when there are none, std and interval None for one."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    n = len(values)
    std = float(np.std(values, ddof=1)) if n > 1 else None
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else None
    return {"mean": float(np.mean(values)), "std": std, "ci95": half, "n": n,
            "min": float(np.min(values)), "max": float(np.max(values)),
            "values": [float(v) for v in values]}


def settings_of(runs: list[dict]) -> list[dict]:
    """The runs grouped by their overrides but the seed, in order, with statistics over seeds."""
    groups = {}
    for r in runs:
        setting = {k: v for k, v in r["overrides"].items() if k != "seed"}
        groups.setdefault(json.dumps(setting), (setting, []))[1].append(r)
    settings = []
    for setting, members in groups.values():
        summaries = [m["summary"] for m in members]
        categories = sorted({c for s in summaries for c in s["categories"]})
        median = lambda name: float(np.median([s[name] for s in summaries if s[name] is not None])) \
            if any(s[name] is not None for s in summaries) else None
        settings.append({
            "name": run_name(setting), "overrides": setting, "runs": [m["name"] for m in members],
            **{name: spread([s[name] for s in summaries])
               for name in ("first_reward", "final_reward", "eval_reward")},
            "categories": {c: spread([s["categories"].get(c) for s in summaries]) for c in categories},
            "median_epoch_s": median("median_epoch_s"), "median_rollout_s": median("median_rollout_s"),
            "shown": {name: spread([s["shown"][name] for s in summaries])
                      for name in summaries[0]["shown"]}})
    return settings


def _cell(stat, digits: int = 3, interval: bool = False) -> str:
    """mean, or with `interval` "mean ±95% interval (sd std)" over seeds."""
    if stat is None:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    if interval and stat["ci95"] is not None:
        text += f" ±{stat['ci95']:.{digits}f} (sd {stat['std']:.{digits}f})"
    return text


def _format(header: list, rows: list) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def format_table(settings: list[dict]) -> str:
    """One row per setting: its values, seeds, rewards (mean ±95% interval and sd over seeds),
    times."""
    keys, shown = list(settings[0]["overrides"]), list(settings[0]["shown"])
    header = [*keys, "seeds", "first reward", "final reward", "eval reward", "epoch s",
              "rollout s", *shown]
    rows = [[str(s["overrides"][k]) for k in keys] + [
        str(len(s["runs"])), _cell(s["first_reward"]), _cell(s["final_reward"], interval=True),
        _cell(s["eval_reward"], interval=True),
        "-" if s["median_epoch_s"] is None else f"{s['median_epoch_s']:.2f}",
        "-" if s["median_rollout_s"] is None else f"{s['median_rollout_s']:.2f}"] + [
        _cell(s["shown"][name], 6) for name in shown] for s in settings]
    return _format(header, rows)


def format_categories(settings: list[dict]) -> str | None:
    """The last eval per category: one row per setting, mean ±95% interval over seeds."""
    categories = sorted({c for s in settings for c in s["categories"]})
    if not categories:
        return None
    keys = list(settings[0]["overrides"])
    rows = [[str(s["overrides"][k]) for k in keys] + [
        _cell(s["categories"].get(c), interval=True) for c in categories] for s in settings]
    return _format([*keys, *categories], rows)


def seed_curves(groups: dict, title: str) -> plot.Chart:
    """{label: its seeds' histories} -> each label's reward mean per epoch averaged over its
    seeds, their range shaded."""
    lines, bands = {}, {}
    for label, histories in groups.items():
        per_seed = [[h["reward/total_mean"] for h in history if "reward/total_mean" in h]
                    for history in histories]
        epochs = min(map(len, per_seed))
        values = np.array([p[:epochs] for p in per_seed])
        if len(per_seed) > 1:
            label = f"{label} ({len(per_seed)} seeds)"
            bands[label] = (values.min(axis=0), values.max(axis=0))
        lines[label] = (np.arange(epochs), values.mean(axis=0))
    return plot.line_chart(lines, bands=bands, title=title, xlabel="epoch", ylabel="reward")


def curves(runs: list[dict], settings: list[dict]) -> plot.Chart:
    """Each setting's reward mean per epoch, averaged over its seeds, their range shaded."""
    by_name = {r["name"]: r["history"] for r in runs}
    return seed_curves({s["name"]: [by_name[n] for n in s["runs"]] for s in settings},
                       "reward mean per epoch (mean over seeds, their range shaded)")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="configs/NAME.py[:variant]")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                        help="config keys and values, each combination a run of its own")
    parser.add_argument("--vmap", nargs="+", default=[], metavar="KEY=V1,V2",
                        help="numeric hyperparameters and values, all combinations one population")
    parser.add_argument("--seeds", type=int, default=0,
                        help="seeds per setting (seed .. seed+N-1), members of the population")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="fixed overrides of every run")
    parser.add_argument("--out", default="runs/ablate", help="folder of the runs and results")
    parser.add_argument("--last", type=int, default=3, help="epochs averaged into the final reward")
    parser.add_argument("--show", nargs="*", default=[], metavar="METRIC",
                        help="logged metrics whose last value each setting's row shows")
    args = parser.parse_args(argv)
    if not (args.grid or args.vmap or args.seeds):
        parser.error("give at least one of --grid, --vmap, --seeds")
    return args


def _parse(args):
    """(config with --set and the population applied, fixed overrides, grid runs' overrides)."""
    config = config_lib.load_file(args.config)
    fixed = {}
    for text in args.set:
        key, values = parse_assignment(text)
        if len(values) != 1:
            raise ValueError(f"--set {text!r}: one value per key")
        fixed[key] = parse_value(config, key, values[0])
    for text in args.vmap:  # checked here, before any run starts
        key, values = parse_assignment(text)
        [parse_value(config, key, v) for v in values]
    config = apply(config, {**fixed, "population.vmap": " ".join(args.vmap),
                            "population.seeds": args.seeds})
    axes = [[(key, parse_value(config, key, v)) for v in values]
            for key, values in map(parse_assignment, args.grid)]
    return config, fixed, [dict(combination) for combination in itertools.product(*axes)]


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.set_verbosity(logging.WARNING)
    try:
        config, fixed, grid = _parse(args)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    taken = [run_name(g) for g in grid if os.path.exists(os.path.join(args.out, run_name(g)))]
    if taken:
        print(f"error: {args.out} already holds runs {taken}; give a fresh --out", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    compile_cache.setup(config.compilation_cache.enabled, config.compilation_cache.dir)
    runs, seconds = [], {}
    for i, overrides in enumerate(grid):
        name = run_name(overrides)
        print(f"-- run {i + 1} of {len(grid)}: {name}", flush=True)
        started = time.perf_counter()
        try:
            histories = train(apply(config, overrides), os.path.join(args.out, name))
        except TrainingStopped as e:
            print(f"ablation stopped: {e}" + (f"; {args.out}/ablate.json holds the runs that "
                                              f"finished ({', '.join(seconds)})" if seconds else ""),
                  file=sys.stderr)
            return 1
        except (PopulationError, config_lib.ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        seconds[name] = round(time.perf_counter() - started, 1)
        if isinstance(histories, list):  # a solo run
            histories = {"": histories}
        members = {m.name: {**overrides, **m.overrides}
                   for m in population.members(apply(config, overrides))}
        for member, history in histories.items():
            runs.append({"name": os.path.join(name, member) if member else name,
                         "overrides": members[member], "history": history,
                         "summary": summarize(history, args.last, args.show)})
        settings = write_results(args, fixed, runs, seconds)
    print(format_table(settings))
    categories = format_categories(settings)
    if categories:
        print(f"\nlast eval per category (mean ±95% interval over seeds, their sd):\n{categories}")
    print(f"wrote {args.out}/ablate.json and {args.out}/ablate.png (data: ablate.data.json)")
    return 0


def write_results(args, fixed: dict, runs: list[dict], seconds: dict) -> list[dict]:
    """OUT/ablate.json and ablate.png of the runs finished so far (rewritten after each run, so
    a grid stopped part-way keeps them); their settings."""
    settings = settings_of(runs)
    with open(os.path.join(args.out, "ablate.json"), "w") as f:
        json.dump({"config": args.config, "fixed": fixed, "vmap": args.vmap, "seeds": args.seeds,
                   "seconds": seconds, "settings": settings, "runs": runs}, f, indent=1)
    curves(runs, settings).save(os.path.join(args.out, "ablate.png"))
    return settings


if __name__ == "__main__":
    sys.exit(main())
