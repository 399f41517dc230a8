"""Helpers of the trainer's end-to-end tests: a tiny random-init toy model on disk, the real
`python -m flowgrpo_jax.train` command on a tiny config, and reading a run's checkpoints."""
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flowgrpo_jax.families.toy.model import ToyModel, ToyModelConfig, save

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 16 px images, one MMDiT block of width 32: a CPU epoch of 16 images takes well under a second.
# Every field is pinned (shift too) so that the measured reward noise stays this model's.
TINY_MODEL = ToyModelConfig(image_size=16, patch_size=4, width=32, heads=2, layers=1,
                            text_width=16, text_layers=1, text_heads=2, max_length=16, shift=1.0)


def make_tiny_model(folder) -> str:
    save(str(folder), ToyModel(TINY_MODEL, rngs=nnx.Rngs(0)))
    return str(folder)


# The trainer tests' run: the toy family's tiny variant with LoRA (rank 4 on the MMDiT's joint
# attention), the brightness reward (learnable by a random model), the SDE on all 4 steps and
# 2 updates an epoch at a constant 3e-4.
TOY_RUN = ("--config", "configs/toy_geneval.py:tiny", "--config.reward.rewards=brightness:1.0",
           "--config.lora.enabled=True", "--config.train.learning_rate=3e-4",
           "--config.train.lr_schedule=constant", "--config.train.updates_per_epoch=2",
           "--config.sample.window_size=0", "--config.train.timestep_fraction=0.99")


def train_command(workdir, model, *overrides) -> list:
    return [sys.executable, "-m", "flowgrpo_jax.train", *TOY_RUN, "--workdir", str(workdir),
            f"--config.model.path={model}", *overrides]


def train_env(devices: int = 1) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_train(workdir, model, *overrides, devices: int = 1, timeout: int = 300):
    result = subprocess.run(train_command(workdir, model, *overrides), cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout, env=train_env(devices))
    assert result.returncode == 0, f"training failed:\n{result.stderr[-4000:]}"
    # a log file, not a terminal: one line per epoch with the time left, no progress bars
    assert "\r" not in result.stdout + result.stderr
    assert re.search(r"epoch \d+( \(\d+ members: mean \[min, max\]\))?: reward/total_mean=.* "
                     r"left=\d+:\d\d:\d\d", result.stdout)
    return result


def checkpoint_steps(workdir) -> list:
    folder = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def checkpoint_state(workdir, step: int) -> dict:
    """The TrainState saved at `step`, as a dict of numpy arrays."""
    path = pathlib.Path(workdir).resolve() / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    # onto this process's first device, whatever mesh the run saved from
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata.tree)
    return jax.tree.map(np.asarray, checkpointer.restore(path, target))


def checkpoint_params(workdir, step: int) -> dict:
    """{path: array} of the trained params saved at `step`."""
    return {jax.tree_util.keystr(k): v for k, v in
            jax.tree_util.tree_leaves_with_path(checkpoint_state(workdir, step)["params"])}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
