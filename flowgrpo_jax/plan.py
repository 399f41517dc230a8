"""The memory planner: compiles, never runs, every program of a training run and says per chip
what fits.

    python -m flowgrpo_jax.plan --config configs/sd35m_geneval.py --topology v5e:2x4 \
        [--config.key=value ...] [--nosearch] [--memory_gib 14] [--json plan.json] \
        [--programs "rollout,train step"]

With `--topology` (a libtpu topology name: v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4, ...) it
compiles for that TPU slice on any host with libtpu installed; without it, for this host's
devices (a GPU host). No weights are read: the model is built from its configs (a converted
folder at `model.path`, or SD3.5 Medium's bundled configs when there is none).

For each program a run compiles (prompt encoding, a rollout chunk, decoding, the rescoring of
exact ratios when an epoch has several updates, the update, the eval rollout and its
decoding) it prints per chip: the arguments, the temporaries, the outputs,
what else the run keeps on the chip meanwhile (weights, optimizer state, the epoch's rollouts),
their total against the chip's memory, the FLOPs and memory traffic of one call counted from
the compiled program (every loop trip and the TPU attention kernel included), its roofline
time on the chip (public peaks: TPU v4, v5e, v5p, v6e, H100, H200) and the model-FLOPs
utilisation that time implies; then an epoch's roofline time, images per second per chip and
MFU (docs/benchmarks.md, "FLOPs, roofline time and MFU"). Then it searches the largest
`train.micro_batch_size` and `sample.batch_size` per chip that fit. `--programs` picks some of
the programs (the search then covers only theirs; the epoch then counts only theirs): at full
size each compile takes minutes. It exits 1 when the config does not fit, naming the knobs to
change.
"""
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import jax

from flowgrpo_jax import compile_cache
from flowgrpo_jax import config as config_lib
from flowgrpo_jax import planner

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant]")
flags.DEFINE_string("topology", None, "a TPU topology to compile for (v5e:2x4, v4:2x2x1, ...); "
                    "default: this host's devices")
flags.DEFINE_bool("search", True, "search the largest micro batch and rollout chunk that fit")
flags.DEFINE_float("memory_gib", None, "plan against this much memory per device (GiB) instead "
                   "of the chip's, e.g. to keep headroom")
flags.DEFINE_list("programs", list(planner.PROGRAMS), "the programs to compile, of: "
                  + ", ".join(planner.PROGRAMS))
flags.DEFINE_string("json", None, "also write the plan here as JSON")
flags.mark_flags_as_required(["config"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # JAX logs each backend it cannot start at INFO
    config = _CONFIG.value
    # Programs compiled for a topology's compile-only devices cannot be loaded back (JAX needs
    # a device client to deserialize them): the cache serves only this host's devices.
    compile_cache.setup(config.compilation_cache.enabled and not FLAGS.topology,
                        config.compilation_cache.dir)
    try:
        devices = planner.tpu_devices(FLAGS.topology) if FLAGS.topology else jax.devices()
        memory = int(FLAGS.memory_gib * planner.GiB) if FLAGS.memory_gib else None
        result = planner.plan(config, devices, FLAGS.topology or devices[0].device_kind,
                              search=FLAGS.search, memory=memory,
                              programs=tuple(FLAGS.programs))
    except (planner.PlanError, config_lib.ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(planner.format_plan(result))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(planner.plan_json(result), f, indent=2)
    if not result.fits:
        print(planner.advice(result, config), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
