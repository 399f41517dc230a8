"""A grid of short Flow-GRPO runs over chosen config keys: one table and one plot of reward curves.

    python tools/ablate.py --grid sample.noise_level=0.5,0.7,1.0 train.beta=0,0.04 \
        --set num_epochs=10 --out runs/ablate [--config configs/toy_geneval.py[:variant]]

Every combination of the `--grid` values (a cartesian product, in the order given) is one
training run of the config with those values and the fixed `--set` ones, in OUT/<run name>
(which must not exist yet: give a fresh OUT). Values are parsed as the
type of the key's current value (bool, int, float, str). Results: a table on stdout,
OUT/ablate.json (every run's overrides, per-epoch reward means and summary) and OUT/ablate.png
(the reward mean per epoch of every run, drawn with matplotlib; its data in ablate.data.json). A run's "final reward" is the mean of its last
`--last` epochs' reward means; "eval reward" is the trainer's last eval (when eval_every > 0);
"epoch s" and "rollout s" (sampling plus the wait for the last rewards) are medians over epochs;
`--show METRIC ...` adds a column per logged metric with its last value (e.g.
`train/on_policy/clipfrac`).
"""
import argparse
import itertools
import json
import os
import sys
import time

import numpy as np
from absl import logging

from flowgrpo_jax import config as config_lib
from flowgrpo_jax import plot
from flowgrpo_jax.train import TrainingStopped, train

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "toy_geneval.py")


def parse_value(config, key: str, text: str):
    """`text` as the type of config's current value at dotted `key`."""
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        if part not in node:
            raise KeyError(f"config has no key {key!r} ({part!r} is missing)")
        node = node[part]
    if leaf not in node:
        raise KeyError(f"config has no key {key!r}")
    current = node[leaf]
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key}={text!r}: expected true or false")
        return text.lower() in ("true", "1")
    if isinstance(current, (int, float, str)):
        try:
            return type(current)(text)
        except ValueError:
            raise ValueError(f"{key}={text!r}: expected {type(current).__name__}") from None
    raise ValueError(f"{key} holds a {type(current).__name__}; only bool, int, float and str keys "
                     f"can be set from the command line")


def parse_assignment(text: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise ValueError(f"{text!r} is not KEY=VALUE[,VALUE...]")
    return key, values.split(",")


def apply(config, overrides: dict):
    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def run_name(overrides: dict) -> str:
    return "_".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "base"


def summarize(history: list[dict], last: int, show=()) -> dict:
    rewards = [h["reward/total_mean"] for h in history if "reward/total_mean" in h]
    evals = [h["eval/reward_mean"] for h in history if "eval/reward_mean" in h]
    epochs = [h for h in history if "time/epoch_s" in h]
    # rollout = sampling + waiting for the last rewards: the part reward.overlap changes
    rollout = [h["time/sample_s"] + h["time/reward_wait_s"] for h in epochs]
    return {"first_reward": rewards[0] if rewards else None,
            "final_reward": float(np.mean(rewards[-last:])) if rewards else None,
            "eval_reward": evals[-1] if evals else None,
            "median_epoch_s": float(np.median([h["time/epoch_s"] for h in epochs])) if epochs else None,
            "median_rollout_s": float(np.median(rollout)) if epochs else None,
            "shown": {name: next((h[name] for h in reversed(history) if name in h), None)
                      for name in show}}


def format_table(results: list[dict]) -> str:
    keys, shown = list(results[0]["overrides"]), list(results[0]["summary"]["shown"])
    header = [*keys, "first reward", "final reward", "eval reward", "epoch s", "rollout s", *shown]
    rows = []
    for r in results:
        s = r["summary"]
        rows.append([str(r["overrides"][k]) for k in keys] + [
            "-" if s[name] is None else f"{s[name]:.2f}" if name.endswith("_s") else f"{s[name]:.3f}"
            for name in ("first_reward", "final_reward", "eval_reward", "median_epoch_s",
                         "median_rollout_s")] + [
            "-" if s["shown"][name] is None else f"{s['shown'][name]:.6g}" for name in shown])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="configs/NAME.py[:variant]")
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                        help="config keys and the values to try")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="fixed overrides of every run")
    parser.add_argument("--out", default="runs/ablate", help="folder of the runs and results")
    parser.add_argument("--last", type=int, default=3, help="epochs averaged into the final reward")
    parser.add_argument("--show", nargs="*", default=[], metavar="METRIC",
                        help="logged metrics whose last value each run's row shows")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.set_verbosity(logging.WARNING)
    try:
        config = config_lib.load_file(args.config)
        fixed = {}
        for text in args.set:
            key, values = parse_assignment(text)
            if len(values) != 1:
                raise ValueError(f"--set {text!r}: one value per key")
            fixed[key] = parse_value(config, key, values[0])
        config = apply(config, fixed)
        grid = [parse_assignment(text) for text in args.grid]
        axes = [[(key, parse_value(config, key, v)) for v in values] for key, values in grid]
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = [dict(combination) for combination in itertools.product(*axes)]
    taken = [run_name(r) for r in runs if os.path.exists(os.path.join(args.out, run_name(r)))]
    if taken:
        print(f"error: {args.out} already holds runs {taken}; give a fresh --out", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    results = []
    for overrides in runs:
        name = run_name(overrides)
        print(f"-- run {len(results) + 1}: {name}", flush=True)
        started = time.perf_counter()
        try:
            history = train(apply(config, overrides), os.path.join(args.out, name))
        except TrainingStopped as e:
            print(f"grid stopped: {e}", file=sys.stderr)
            return 1
        results.append({"name": name, "overrides": overrides, "history": history,
                        "summary": summarize(history, args.last, args.show),
                        "seconds": round(time.perf_counter() - started, 1)})
    table = format_table(results)
    print(table)
    with open(os.path.join(args.out, "ablate.json"), "w") as f:
        json.dump({"config": args.config, "fixed": fixed, "runs": results}, f, indent=1)
    lines = {}
    for r in results:
        epochs = [h for h in r["history"] if "reward/total_mean" in h]
        lines[r["name"]] = ([h["epoch"] for h in epochs], [h["reward/total_mean"] for h in epochs])
    plot.line_chart(lines, title=f"reward mean per epoch ({os.path.basename(args.config)})",
                    xlabel="epoch", ylabel="reward").save(os.path.join(args.out, "ablate.png"))
    print(f"wrote {args.out}/ablate.json and {args.out}/ablate.png (data: ablate.data.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
