"""Time to the first rollout of a training start: cold, then with the compilation cache the
start before filled (flowgrpo_jax/compile_cache.py).

    python tools/startup_time.py --config configs/toy_geneval.py [--config.key=value ...] \
        [--starts 2] [--dir runs/startup] [--out startup.json]

Runs `python -m flowgrpo_jax.train` with the config `--starts` times, one after another, each
in a fresh workdir for one epoch without evaluation, all with one new compilation cache folder
(DIR/compilation_cache). Per start: the seconds from launching the command to the trainer's
"first rollout chunk done" line and to its exit, and how many XLA programs the process
compiled and loaded from the cache (the trainer's last line, from JAX's monitoring events).
A start that compiles nothing shows 0 compiled.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from flowgrpo_jax import machine

_FIRST_ROLLOUT = "first rollout chunk done"
_PROGRAMS = re.compile(r"XLA programs of this process: (\d+) compiled, (\d+) loaded")


def one_start(command: list, env: dict) -> dict:
    """Runs one training command; the seconds to its first rollout and to its exit, and the
    programs it compiled and loaded."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**env, "PYTHONUNBUFFERED": "1"})
    first_rollout, programs, lines = None, None, []
    for line in process.stdout:
        lines.append(line)
        if first_rollout is None and _FIRST_ROLLOUT in line:
            first_rollout = time.perf_counter() - started
        programs = _PROGRAMS.search(line) or programs
    if process.wait() != 0 or first_rollout is None or programs is None:
        raise RuntimeError(f"{' '.join(command)} failed (exit {process.returncode}):\n"
                           + "".join(lines[-40:]))
    return {"first_rollout_s": round(first_rollout, 2),
            "total_s": round(time.perf_counter() - started, 2),
            "compiled": int(programs.group(1)), "loaded": int(programs.group(2))}


def measure(config_args: list, folder: str, starts: int = 2, env: dict | None = None) -> list:
    """`starts` training starts of the config (its --config and --config.* arguments) in
    workdirs under `folder`, sharing the compilation cache folder/compilation_cache."""
    cache = os.path.join(folder, "compilation_cache")
    results = []
    for i in range(starts):
        command = [sys.executable, "-m", "flowgrpo_jax.train", *config_args,
                   "--workdir", os.path.join(folder, f"start{i + 1}"), "--config.num_epochs=1",
                   "--config.eval_every=0", "--config.compilation_cache.enabled=True",
                   f"--config.compilation_cache.dir={cache}"]
        results.append(one_start(command, dict(os.environ if env is None else env)))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("--dir", default=None, help="an empty or new folder for the workdirs and "
                                                    "the cache (default: a temporary one)")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if not a.startswith("--config.")]
    if unknown or args.starts < 1:
        parser.error(f"unexpected arguments {unknown}" if unknown else "--starts must be >= 1")
    folder = args.dir or tempfile.mkdtemp(prefix="startup_")
    if os.path.isdir(folder) and os.listdir(folder):
        parser.error(f"--dir {folder} is not empty: a filled cache would not give a cold start")
    try:
        results = measure(["--config", args.config, *overrides], folder, args.starts)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{'start':>5} {'first rollout (s)':>18} {'exit (s)':>9} {'compiled':>9} {'loaded':>7}")
    for i, r in enumerate(results):
        print(f"{i + 1:>5} {r['first_rollout_s']:>18.1f} {r['total_s']:>9.1f} "
              f"{r['compiled']:>9} {r['loaded']:>7}")
    print(f"config {args.config} {' '.join(overrides)}; {machine.cpu_model()}, "
          f"{machine.cpu_count()} CPUs; workdirs and cache in {folder}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "overrides": overrides, "cpu": machine.cpu_model(),
                       "cpus": machine.cpu_count(), "starts": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
