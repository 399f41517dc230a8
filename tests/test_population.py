"""Populations (flowgrpo_jax/population.py): the members a config gives and the ones it refuses;
members trained as one program end where their solo runs end, on one device and split over a
mesh, with each objective; a killed population resumes exactly; wandb logs one run a member."""
import glob
import os
import subprocess
import time

import jax
import numpy as np
import pytest

from flowgrpo_jax import config as config_lib
from flowgrpo_jax import population
from flowgrpo_jax.programs import population_members
from flowgrpo_jax.train import train
from train_runs import (ROOT, checkpoint_state, checkpoint_steps, make_tiny_model, run_train,
                        train_command, train_env)

# train_runs.TOY_RUN as a config: LoRA on the tiny toy model, brightness reward, 2 updates an epoch
TOY = {"reward.rewards": "brightness:1.0", "lora.enabled": True, "train.learning_rate": 3e-4,
       "train.lr_schedule": "constant", "train.updates_per_epoch": 2, "sample.window_size": 0,
       "train.timestep_fraction": 0.99}


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model"))


def _config(model="", variant="tiny", **overrides):
    config = config_lib.load_file(f"configs/toy_geneval.py:{variant}")
    return population.apply(config, {**TOY, "model.path": model, **overrides})


def test_members_are_the_product_of_the_vmapped_values_and_the_seeds():
    config = _config(**{"population.vmap": "train.learning_rate=1e-4,2e-4 train.clip_range=1e-3,2e-3",
                        "population.seeds": 2, "seed": 5})
    members = population_members(config)
    assert [m.name for m in members][:3] == [
        "learning_rate=0.0001_clip_range=0.001_seed=5", "learning_rate=0.0001_clip_range=0.001_seed=6",
        "learning_rate=0.0001_clip_range=0.002_seed=5"]
    assert len(members) == 8
    last = members[-1].config
    assert (last.train.learning_rate, last.train.clip_range, last.seed) == (2e-4, 2e-3, 6)
    # a member's config is its solo run's: no population left in it
    assert not population.is_population(last) and last.mesh.population == 1
    assert [m.name for m in population_members(_config())] == [""]


@pytest.mark.parametrize("overrides, message", [
    ({"population.vmap": "sample.num_steps=4,6"},
     "sample.num_steps changes no hyperparameter of the train state"),
    ({"population.vmap": "train.beta=0,0.01"}, "changes the update's shapes or control flow"),
    ({"population.vmap": "sample.guidance_scale=1.0,4.5"}, "turns CFG on"),
    ({"population.vmap": "train.learning_rate=1e-4,fast"}, "expected float"),
    ({"population.vmap": "train.nonsense=1,2"}, "config has no key 'train.nonsense'"),
    ({"population.vmap": "seed=1,2"}, "'seed' is given twice or is not a hyperparameter"),
    ({"population.seeds": 1}, "a population has two or more"),
])
def test_a_population_that_is_not_one_program_is_refused_in_one_line(overrides, message):
    with pytest.raises(population.PopulationError, match=message) as error:
        population_members(_config(**overrides))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, devices, processes, message", [
    ({"population.seeds": 3, "mesh.population": 2}, 2, 1, "must divide the population's 3 members"),
    ({"population.seeds": 2, "mesh.population": 3}, 8, 1, "must divide the 8 device"),
    ({"mesh.population": 2}, 2, 1, "needs a population"),
    ({"population.seeds": 2}, 2, 2, "a population trains in one process"),
    ({"population.seeds": -1}, 1, 1, "must be >= 0"),
])
def test_population_config_errors_name_the_key(overrides, devices, processes, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(_config(**overrides), devices, processes)


def _params(workdir, step):
    return checkpoint_state(workdir, step)["params"]


def _relative_diff(member, solo, start) -> float:
    """|member - solo| / |solo - start| over all trained params: rounding against learning."""
    leaves = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
    member, solo, start = leaves(member), leaves(solo), leaves(start)
    return float(np.linalg.norm(member - solo) / np.linalg.norm(solo - start))


def test_population_members_end_where_their_solo_runs_end(toy_model, tmp_path):
    config = _config(toy_model, **{"population.seeds": 2, "save_every": 1, "num_epochs": 3,
                                   "population.vmap": "train.learning_rate=3e-4,1e-3"})
    histories = train(config, str(tmp_path / "population"))
    assert sorted(histories) == ["learning_rate=0.0003_seed=0", "learning_rate=0.0003_seed=1",
                                 "learning_rate=0.001_seed=0", "learning_rate=0.001_seed=1"]
    for name, overrides in (("learning_rate=0.0003_seed=1", {"seed": 1}),
                            ("learning_rate=0.001_seed=0", {"train.learning_rate": 1e-3})):
        solo_dir = str(tmp_path / f"solo_{name}")
        solo = train(population.apply(config, {**overrides, "population.seeds": 0,
                                               "population.vmap": ""}), solo_dir)
        member_dir = str(tmp_path / "population" / name)
        start = _params(solo_dir, 2)  # the last epoch's learning against the members' rounding
        diff = _relative_diff(_params(member_dir, 3), _params(solo_dir, 3), start)
        first = lambda history: [h for h in history if "reward/total_mean" in h][0]
        print(f"{name}: |member - solo| / |solo update| = {diff:.2e}")
        # before any update: the same prompts, noise and params, so the same images
        assert first(histories[name])["reward/total_mean"] == pytest.approx(
            first(solo)["reward/total_mean"], abs=1e-6)
        assert diff < 1e-2
    # members differ: their seeds draw other prompts and LoRA, their rates step otherwise
    a, b = (_params(tmp_path / "population" / n, 3) for n in ("learning_rate=0.0003_seed=0",
                                                                "learning_rate=0.0003_seed=1"))
    assert not np.allclose(jax.tree.leaves(a)[0], jax.tree.leaves(b)[0])


# GRPO-Guard in the slow suite for make test's budget: it trains solo in make test
# (tests/test_objectives_train.py, tests/test_flux_train.py), a full fine-tuning population with nft.
@pytest.mark.parametrize("objective", [pytest.param("grpo_guard", marks=pytest.mark.slow), "nft"])
def test_a_full_fine_tuning_population_trains_as_its_solo_runs_with_each_objective(toy_model, tmp_path,
                                                                                  objective):
    variant = {"grpo_guard": "guard", "nft": "nft"}[objective]
    config = _config(toy_model, variant=f"{variant},tiny",
                     **{"lora.enabled": False, "population.seeds": 2})
    histories = train(config, str(tmp_path))
    assert sorted(histories) == ["seed=0", "seed=1"]
    for name in histories:
        epochs = [h for h in histories[name] if "train/loss" in h]
        assert len(epochs) == 2 and all(np.isfinite(h["train/loss"]) for h in epochs)
        state = checkpoint_state(tmp_path / name, 2)
        moved = max(float(np.max(np.abs(x - y))) for x, y in zip(
            jax.tree.leaves(state["params"]), jax.tree.leaves(checkpoint_state(tmp_path / name, 1)["params"])))
        assert moved > 0
        if objective == "nft":
            assert "old_params" in state["extra"]
    # a member ends where its solo run ends (the NFT old policy too), up to float rounding
    solo_dir = str(tmp_path / "solo")
    train(population.apply(config, {"seed": 1, "population.seeds": 0}), solo_dir)
    member, solo = checkpoint_state(tmp_path / "seed=1", 2), checkpoint_state(solo_dir, 2)
    start = checkpoint_state(solo_dir, 1)
    trained = lambda state: [state["params"]] + ([state["extra"]["old_params"]]
                                                 if objective == "nft" else [])
    for m, s, s0 in zip(trained(member), trained(solo), trained(start)):
        assert _relative_diff(m, s, s0) < 1e-2


# The suite's budget (slow suite): make test compiles the sharded population for a TPU in
# tests/test_plan.py and trains on 8 fake devices in tests/test_parallel.py.
@pytest.mark.slow
def test_a_population_split_over_the_mesh_matches_one_on_one_device(toy_model, tmp_path):
    settings = ("--config.population.seeds=2", "--config.num_epochs=2")
    run_train(tmp_path / "one", toy_model, *settings)
    result = run_train(tmp_path / "eight", toy_model, *settings, "--config.mesh.population=2",
                       devices=8)
    assert "epoch 1 (2 members: mean [min, max]): reward/total_mean=" in result.stdout
    for name in ("seed=0", "seed=1"):
        one, eight = (_params(tmp_path / run / name, 2) for run in ("one", "eight"))
        start = _params(tmp_path / "one" / name, 1)  # the second epoch's learning
        assert _relative_diff(eight, one, start) < 1e-2


# The suite's budget (slow suite): make test resumes a run exactly in tests/test_train_resume.py
# and reads every member's checkpoints in the solo-equality test above.
@pytest.mark.slow
def test_a_killed_population_resumes_exactly(toy_model, tmp_path):
    settings = ("--config.population.seeds=2", "--config.num_epochs=8", "--config.save_every=1")
    run_train(tmp_path / "whole", toy_model, *settings)
    workdir = tmp_path / "killed"
    log = open(tmp_path / "first.log", "w")
    process = subprocess.Popen(train_command(workdir, toy_model, *settings), cwd=ROOT,
                               env=train_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while min((checkpoint_steps(workdir / m) or [0])[-1] for m in ("seed=0", "seed=1")) < 3:
        assert process.poll() is None, open(tmp_path / "first.log").read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    process.kill()
    process.wait(timeout=60)
    log.close()
    resumed = run_train(workdir, toy_model, *settings)
    assert "resumed from the checkpoint of epoch" in resumed.stdout + resumed.stderr
    for name in ("seed=0", "seed=1"):
        whole, again = (checkpoint_state(tmp_path / run / name, 8) for run in ("whole", "killed"))
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(again)))


def test_wandb_logs_one_run_per_member_in_the_population_group(toy_model, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = _config(toy_model, **{"population.seeds": 2, "num_epochs": 1,
                                   "logging.wandb": "flowgrpo-test"})
    train(config, str(tmp_path / "lr_sweep"))
    for name in ("seed=0", "seed=1"):
        runs = glob.glob(str(tmp_path / "lr_sweep" / name / "tensorboard" / "wandb" / "offline-run-*"))
        assert len(runs) == 1, runs
        # wandb's own service process writes the record: it may land after train() returns
        record, deadline = b"", time.monotonic() + 60
        while not (b"lr_sweep" in record and name.encode() in record) and time.monotonic() < deadline:
            time.sleep(0.5)
            record = open(glob.glob(os.path.join(runs[0], "*.wandb"))[0], "rb").read()
        assert b"lr_sweep" in record and name.encode() in record  # its group and its name


def test_an_inactive_member_keeps_its_state_through_the_population_step():
    """A member whose epoch has nothing to learn (or that stopped) passes the update unchanged."""
    from flowgrpo_jax import parallel, update

    def step(state, frozen, reference, batch, uncond, key):
        return jax.tree.map(lambda x: x + batch["x"].sum(), state), {"loss": batch["x"].sum()}

    population_step = update._population_step(step, parallel.make_mesh(devices=jax.devices()[:1]))
    state = {"params": np.zeros((3, 2), np.float32)}
    batch = {"x": np.ones((3, 4), np.float32)}
    keys = jax.random.split(jax.random.key(0), 3)
    new, metrics = population_step(state, None, None, batch, None, keys,
                                   np.array([True, False, True]))
    np.testing.assert_array_equal(new["params"], [[4, 4], [0, 0], [4, 4]])
    np.testing.assert_array_equal(metrics["loss"], [4, 4, 4])


def test_a_diverging_member_stops_alone(toy_model, tmp_path):
    """A rate of 1e6 makes one member's updates non-finite: it stops with one warning line and
    keeps its last finite checkpoint; the other member trains to the end."""
    result = run_train(tmp_path, toy_model, "--config.population.vmap=train.learning_rate=3e-4,1e6",
                       "--config.num_epochs=5", "--config.train.max_nonfinite_updates=2")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: member")]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: member learning_rate=1000000.0 stopped in epoch "), result.stderr[-2000:]
    assert checkpoint_steps(tmp_path / "learning_rate=0.0003")[-1] == 5
    stopped = checkpoint_steps(tmp_path / "learning_rate=1000000.0")[-1]
    assert stopped < 5 and f"(checkpoint {stopped} is the newest)" in warnings[0]
