"""Model families as plug-ins: the core names none of them, a family from outside the package
trains after one registry line, and the SD3 family trains end to end from its shipped config."""
import ast
import math
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from flowgrpo_jax import config as config_lib
from flowgrpo_jax import families, programs
from flowgrpo_jax.train import train
from train_runs import ROOT, checkpoint_params, checkpoint_steps, train_env

PACKAGE = ROOT / "flowgrpo_jax"
# The RL core: what must work for every family, so it may name none.
CORE = ("sampling", "objectives", "rewards", "train.py", "update.py", "parallel.py",
        "checkpoint.py", "config.py", "programs.py", "generator.py", "lora.py", "remat.py",
        "prompts.py", "planner.py", "evaluate.py", "export.py", "lora_io.py", "logging_utils.py")


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module `path` imports (`from a import b` counts as a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def forbidden(module: str) -> bool:
    return module.startswith(("flowgrpo_jax.models", "flowgrpo_jax.families."))


def test_the_core_imports_no_family_and_no_model():
    files = [f for name in CORE for f in
             ((PACKAGE / name).rglob("*.py") if (PACKAGE / name).is_dir() else [PACKAGE / name])]
    assert len(files) > 25
    offenders = {str(f.relative_to(ROOT)): sorted(filter(forbidden, imported_modules(f)))
                 for f in files}
    assert {f: names for f, names in offenders.items() if names} == {}
    # The check sees what a family imports: it would catch the core doing the same.
    assert forbidden("flowgrpo_jax.models.mmdit")
    assert "flowgrpo_jax.models.mmdit" in imported_modules(PACKAGE / "families" / "sd3" / "__init__.py")


def test_a_family_from_outside_the_package_trains_after_one_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(families.FAMILIES, "throwaway", "throwaway_family")  # = families.register
    config = config_lib.load_file(str(ROOT / "configs" / "toy_geneval.py") + ":tiny")
    config.model = ml_collections.ConfigDict({"family": "throwaway"})
    config.reward.rewards = "brightness:1.0"
    config.lora.enabled, config.lora.targets = True, ()  # LoRA where the family puts it
    config.num_epochs, config.eval_every = 1, 0
    run = programs.build_run(config, abstract=True)  # its own schedule reaches the programs
    np.testing.assert_array_equal(run.sigmas, np.linspace(1, 0, config.sample.num_steps + 1))
    np.testing.assert_array_equal(run.eval_sigmas, np.linspace(1, 0, config.sample.eval_num_steps + 1))
    history = train(config, str(tmp_path))
    (epoch,) = [m for m in history if "train/loss" in m]
    assert math.isfinite(epoch["train/loss"]) and math.isfinite(epoch["reward/total_mean"])
    assert checkpoint_steps(tmp_path)[-1] == 1
    trained = checkpoint_params(tmp_path, 1)
    assert trained and all("proj" in path for path in trained), sorted(trained)  # its LoRA targets


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="'toy' is already registered"):
        families.register("toy", "somewhere_else")
    with pytest.raises(ValueError, match=r"unknown model family 'wan'; known: \['flux', 'sd3', 'toy'\]"):
        families.load("wan")


@pytest.fixture(scope="module")
def tiny_sd3_folder(tmp_path_factory):
    from test_encode_prompt import saved_and_converted  # torch and diffusers: only here
    return saved_and_converted(tmp_path_factory)[2]


@pytest.mark.slow  # the suite's budget: the SD3 family trains in make test in tests/test_objectives_train.py
def test_the_sd3_family_trains_two_epochs_from_a_shipped_config(tiny_sd3_folder, tmp_path):
    """sd35m_pickscore.py:tiny with another reward than its own: its pickscore options stay
    unused, as they must."""
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "flowgrpo_jax.train", "--config", "configs/sd35m_pickscore.py:tiny",
         "--workdir", str(workdir), f"--config.model.path={tiny_sd3_folder}",
         "--config.reward.rewards=jpeg_compressibility:1.0", "--config.eval_every=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=train_env(2))
    assert result.returncode == 0, result.stderr[-4000:]
    assert checkpoint_steps(workdir)[-1] == 2
    trained = checkpoint_params(workdir, 2)
    assert trained and all("attn" in path for path in trained), sorted(trained)[:5]
