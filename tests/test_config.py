"""The config schema and its checks, the shipped configs, and the trainer CLI refusing bad input
(an unknown key, a bad value, a workdir started with another config)."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from flowgrpo_jax import config as config_lib
from flowgrpo_jax import families
from train_runs import checkpoint_steps, make_tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ("sd35m_geneval", "sd35m_ocr", "sd35m_pickscore")
VARIANTS = ("", "fast", "fast_nocfg", "full", "tiny")


def _load(name: str, variant: str = ""):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_shipped_configs_validate_on_1_and_8_devices(name, variant):
    config = _load(name, variant)
    for devices, processes in ((1, 1), (8, 1), (8, 2)):
        config_lib.validate(config, devices, processes)
    if variant not in ("tiny", "full"):  # the real runs also fit 32 GPUs, the paper's setup
        config_lib.validate(config, 32, 4)  # (full: 16 images a micro batch, sized for 8 chips)
    assert config.model.family == "sd3"  # the tiny variant too: a tiny SD3 pipeline


@pytest.mark.parametrize("variant", ["", "tiny"])
def test_toy_config_validates(variant):
    config = _load("toy_geneval", variant)
    config_lib.validate(config, 1)
    assert config.model.family == "toy"


def test_model_keys_are_checked_by_their_family():
    config = _load("sd35m_geneval", "tiny")
    config.model.family = "sd4"
    with pytest.raises(config_lib.ConfigError, match=r"config.model.family='sd4': must name a "
                       r"model family, one of \['flux', 'sd3', 'toy'"):
        config_lib.validate(config, 1)
    for key, value in (("attention", "flash"), ("dtype", "float8")):
        model = _load("sd35m_geneval", "tiny").model
        model[key] = value
        with pytest.raises(config_lib.ConfigError, match=f"config.model.{key}='{value}'"):
            families.load("sd3").build(model)  # before any file is read


@pytest.mark.parametrize("name, beta", [("sd35m_geneval", 0.04), ("sd35m_ocr", 0.04),
                                        ("sd35m_pickscore", 0.01)])
def test_real_configs_carry_the_paper_hyperparameters(name, beta):
    c = _load(name)
    s, t = c.sample, c.train
    assert (s.group_size, s.groups_per_epoch, s.num_steps, s.eval_num_steps) == (24, 48, 10, 40)
    assert (s.guidance_scale, s.noise_level, s.kind, s.window_size) == (4.5, 0.7, "sde", 0)
    assert (t.beta, t.clip_range, t.learning_rate, t.timestep_fraction) == (beta, 1e-4, 3e-4, 0.99)
    assert (c.lora.rank, c.lora.alpha, t.updates_per_epoch, t.global_std, t.ema) == (32, 64, 2, True, True)
    assert c.model.resolution == 512 and c.model.family == "sd3"
    fast = _load(name, "fast")
    assert (fast.sample.window_size, fast.sample.window_lo, fast.sample.window_hi) == (3, 0, 5)
    assert (fast.sample.kind, fast.sample.noise_level, fast.train.clip_range, fast.train.beta) == (
        "cps", 0.8, 1e-5, 0.0)
    assert _load(name, "fast_nocfg").sample.guidance_scale == 1.0
    full = _load(name, "full")
    assert (full.lora.enabled, full.mesh.fsdp, full.train.micro_batch_size) == (False, -1, 16)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        _load("sd35m_geneval", "huge")


@pytest.mark.parametrize("key, value, message", [
    ("sample.kind", "ode", "config.sample.kind='ode': grpo trains the log-probabilities of a "
                           "stochastic sampler, 'sde' or 'cps'"),
    ("train.objective", "ppo", "config.train.objective='ppo': must be one of ['grpo', "
                               "'grpo_guard', 'nft']"),
    ("sample.group_size", 1, "config.sample.group_size=1: needs >= 2"),
    ("sample.noise_level", 0.0, "config.sample.noise_level=0.0: must be > 0"),
    ("train.timestep_fraction", 1.5, "config.train.timestep_fraction=1.5"),
    ("train.ema_max_decay", 1.0, "config.train.ema_max_decay=1.0"),
    ("train.lr_schedule", "cos", "config.train.lr_schedule='cos': must be one of"),
    ("train.beta", -0.1, "config.train.beta=-0.1: must be >= 0"),
    ("prompts.format", "csv", "config.prompts.format='csv'"),
    ("sample.window_size", 4, "config.sample.window_size=4: the window needs"),
    ("sample.batch_size", 10, "config.sample.batch_size=10: must divide the epoch's 16 images"),
    ("train.micro_batch_size", 6, "config.train.micro_batch_size=6: must divide the 8 images"),
    ("train.updates_per_epoch", 3, "config.train.updates_per_epoch=3: must divide"),
    ("train.learning_rate", float("inf"), "config.train.learning_rate=inf: must be a finite"),
    ("train.learning_rate", float("nan"), "config.train.learning_rate=nan: must be a finite"),
    ("train.learning_rate", 0.0, "config.train.learning_rate=0.0: must be > 0"),
    ("train.learning_rate", -1e-4, "config.train.learning_rate=-0.0001: must be > 0"),
    ("train.max_grad_norm", float("nan"), "config.train.max_grad_norm=nan: must be a finite"),
    ("train.beta", float("inf"), "config.train.beta=inf: must be a finite"),
    ("train.max_nonfinite_updates", 0, "config.train.max_nonfinite_updates=0: must be > 0"),
    ("mesh.fsdp", 2, "config.mesh.fsdp=2: must divide the 1 device(s) (mesh.data=-1 takes"),
])
def test_bad_values_name_their_key(key, value, message):
    config = _load("sd35m_geneval", "tiny")
    group, name = key.split(".")
    config[group][name] = value
    if key == "sample.window_size":
        config.sample.window_lo, config.sample.window_hi = 0, 3
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config, 1)
    assert message in str(error.value)


@pytest.mark.parametrize("key", ["save_every", "log_every"])
@pytest.mark.parametrize("value", [0, -1])
def test_epoch_intervals_the_loop_divides_by_must_be_positive(key, value):
    config = _load("sd35m_geneval", "tiny")
    config[key] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.{key}={value}: must be >= 1"):
        config_lib.validate(config, 1)


def test_eval_every_0_means_never_and_inf_is_a_limit_only_where_it_means_none():
    config = _load("sd35m_geneval", "tiny")
    config.eval_every = 0
    config.train.max_grad_norm = config.train.adv_clip_max = float("inf")
    config_lib.validate(config, 1)
    config.eval_every = -1
    with pytest.raises(config_lib.ConfigError, match="config.eval_every=-1: must be >= 0"):
        config_lib.validate(config, 1)


def test_mesh_axes_must_use_the_devices_exactly():
    config = _load("sd35m_geneval", "tiny")
    config.mesh.data, config.mesh.fsdp = 2, 2
    config_lib.validate(config, 4)
    with pytest.raises(config_lib.ConfigError, match=r"data x fsdp = 4 must equal the 8 device"):
        config_lib.validate(config, 8)
    config.mesh.data, config.mesh.fsdp = 3, -1
    with pytest.raises(config_lib.ConfigError, match=r"config.mesh.data=3: must divide the 8 "
                                                     r"device\(s\) \(mesh.fsdp=-1"):
        config_lib.validate(config, 8)
    config.mesh.data = -1
    with pytest.raises(config_lib.ConfigError, match="only one of mesh.data / mesh.fsdp"):
        config_lib.validate(config, 8)


def test_device_count_that_does_not_divide_a_batch_says_what_to_change():
    config = _load("sd35m_geneval")  # 1152 images an epoch, updates of 576
    config.train.micro_batch_size = 24
    with pytest.raises(config_lib.ConfigError, match=r"train.micro_batch_size=24: is split over "
                       r"16 devices in 2 process\(es\), so it must be a multiple of 16"):
        config_lib.validate(config, 16, 2)
    config.train.micro_batch_size = 20
    with pytest.raises(config_lib.ConfigError, match=r"must divide the 576 images of one update.*"
                       r"one of \[8, 16, 24, 32"):
        config_lib.validate(config, 8)


def test_unknown_and_mistyped_keys_are_named():
    config = config_lib.defaults()
    config.prompts.train_file = "x.jsonl"
    config.train.learning_rat = 1e-3
    with pytest.raises(config_lib.ConfigError, match="config.train.learning_rat is not a known"):
        config_lib.validate(config, 1)
    config = config_lib.defaults()
    config.prompts.train_file = "x.jsonl"
    # ConfigDict keeps a field's type on assignment; a group built anew does not
    config.sample = ml_collections.ConfigDict({**config.sample.to_dict(), "group_size": 2.5})
    with pytest.raises(config_lib.ConfigError, match="config.sample.group_size=2.5: must be of type int"):
        config_lib.validate(config, 1)


def _train_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "flowgrpo_jax.train", "--config", "configs/toy_geneval.py:tiny",
         *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_names_a_bad_key_and_a_bad_value(tmp_path):
    unknown = _train_cli("--workdir", str(tmp_path / "a"), "--config.sample.groups_per_epok=3")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (  # one line, no traceback
        "error: --config.sample.groups_per_epok=3: config.sample.groups_per_epok is not a known "
        "config key (did you mean groups_per_epoch?)")
    bad = _train_cli("--workdir", str(tmp_path / "b"), "--config.sample.kind=euler")
    assert bad.returncode == 2
    assert "config.sample.kind='euler': must be one of ('ode', 'sde', 'cps', 'dpm2')" in bad.stderr
    not_a_number = _train_cli("--workdir", str(tmp_path / "c"), "--config.sample.group_size=many")
    assert not_a_number.returncode != 0 and "group_size" in not_a_number.stderr
    assert not (tmp_path / "b").exists(), "a refused config must not create its workdir"


def test_workdir_from_another_config_refuses_to_resume(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    recorded = _load("toy_geneval", "tiny").to_dict()
    recorded["train"]["learning_rate"] = 1e-3
    (workdir / "config.json").write_text(json.dumps(recorded))
    refused = _train_cli("--workdir", str(workdir))
    assert refused.returncode == 2
    assert "train.learning_rate: 0.001 -> 0.0002" in refused.stderr
    assert "--allow_config_change" in refused.stderr
    assert not (workdir / "checkpoints").exists()

    model = make_tiny_model(tmp_path / "model")
    allowed = _train_cli("--workdir", str(workdir), "--allow_config_change",
                         f"--config.model.path={model}", "--config.num_epochs=0")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert json.loads((workdir / "config.json").read_text())["train"]["learning_rate"] == 2e-4
    assert checkpoint_steps(workdir) == [0]


@pytest.mark.parametrize("variant, key, value, message", [
    ("nft,tiny", "nft.beta", 0.0, "config.nft.beta=0.0: must be > 0"),
    ("nft,tiny", "nft.decay_max", 1.0, "config.nft.decay_max=1.0: must be in [0, 1)"),
    ("nft,tiny", "sample.window_size", 2, "config.sample.window_size=2: a window holds "
                                           "stochastic steps; sample.kind='dpm2' has none"),
    ("guard,tiny", "sample.kind", "cps", "config.sample.kind='cps': grpo_guard normalises the "
                                         "SDE step's log-ratio"),
])
def test_each_objective_checks_its_own_settings(variant, key, value, message):
    config = _load("sd35m_geneval", variant)
    config_lib.validate(config, 1)
    group, name = key.split(".")
    config[group][name] = value
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config, 1)
    assert message in str(error.value)
