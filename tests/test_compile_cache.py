"""The persistent compilation cache (flowgrpo_jax/compile_cache.py): a second start of the same
training run compiles nothing and trains to the same params, bit for bit; where the cache
folder comes from; a run resumes with another cache folder."""
import os
import sys

import jax
import pytest

from flowgrpo_jax import checkpoint as ckpt
from flowgrpo_jax import compile_cache
from flowgrpo_jax import config as config_lib
from train_runs import ROOT, TOY_RUN, checkpoint_params, make_tiny_model, max_abs_diff, train_env

sys.path.insert(0, str(ROOT / "tools"))
import startup_time  # noqa: E402


def test_a_second_start_compiles_nothing_and_trains_the_same(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    config_args = [*TOY_RUN, f"--config.model.path={model}"]
    config_args[1] = str(ROOT / config_args[1])  # the config file, wherever pytest runs
    cold, warm = startup_time.measure(config_args, str(tmp_path / "starts"), 2, env=train_env())
    assert cold["compiled"] > 0 and cold["loaded"] == 0, cold
    assert warm["compiled"] == 0 and warm["loaded"] == cold["compiled"], warm
    # the programs loaded from the cache compute what the compiled ones did
    assert max_abs_diff(checkpoint_params(tmp_path / "starts" / "start1", 1),
                        checkpoint_params(tmp_path / "starts" / "start2", 1)) == 0


@pytest.fixture
def jax_cache_settings():
    """The cache settings of this process, restored after the test."""
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs", "jax_compilation_cache_max_size")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_the_cache_folder_the_config_then_jax_then_the_user_cache(tmp_path, monkeypatch,
                                                                   jax_cache_settings):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_folder() == str(tmp_path / "xdg" / "flowgrpo_jax" / "jax_compilation")
    assert compile_cache.setup(True, str(tmp_path / "given")) == str(tmp_path / "given")
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "from_jax"))
    assert compile_cache.setup() == str(tmp_path / "from_jax")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    jax.config.update("jax_compilation_cache_dir", None)
    assert compile_cache.setup() == compile_cache.default_folder()
    assert compile_cache.setup(False) is None and not jax.config.jax_enable_compilation_cache


def test_a_run_resumes_with_another_cache_folder(tmp_path):
    config = config_lib.load_file(os.path.join(ROOT, "configs/toy_geneval.py"))
    ckpt.check_workdir_config(str(tmp_path), config.to_dict())
    config.compilation_cache.dir, config.compilation_cache.enabled = str(tmp_path / "cache"), False
    ckpt.check_workdir_config(str(tmp_path), config.to_dict())  # no WorkdirError
    config.seed = 1
    with pytest.raises(ckpt.WorkdirError):
        ckpt.check_workdir_config(str(tmp_path), config.to_dict())
