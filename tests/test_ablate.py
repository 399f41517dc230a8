"""tools/ablate.py on a 2-point grid of tiny runs and on a population of settings x seeds (the
brightness reward on a tiny random model), and its value parsing."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from train_runs import ROOT, make_tiny_model, train_env


def run_ablate(*args, timeout=300):
    return subprocess.run([sys.executable, "tools/ablate.py", "--config", "configs/toy_geneval.py:tiny",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=train_env())


@pytest.mark.slow  # the suite's budget: ablate's tables and plots also come from the population test
def test_two_point_grid_runs_tables_and_plots(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    out = tmp_path / "ablate"
    command = [sys.executable, "tools/ablate.py", "--config", "configs/toy_geneval.py:tiny",
               "--grid", "sample.noise_level=0.5,1.0",
               "--set", f"model.path={model}", "reward.rewards=brightness:1.0", "num_epochs=3",
               "--show", "train/clipfrac", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=train_env())
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "ablate.json").read_text())
    runs = results["runs"]
    assert [r["overrides"] for r in runs] == [{"sample.noise_level": 0.5}, {"sample.noise_level": 1.0}]
    for run in runs:
        # each run trained with its own value, the fixed ones, and all its epochs
        saved = json.loads((out / run["name"] / "config.json").read_text())
        assert saved["sample"]["noise_level"] == run["overrides"]["sample.noise_level"]
        assert saved["reward"]["rewards"] == "brightness:1.0"
        rewards = [h["reward/total_mean"] for h in run["history"] if "reward/total_mean" in h]
        assert len(rewards) == 3
        assert run["summary"]["final_reward"] == pytest.approx(np.mean(rewards))
        assert f"{run['summary']['final_reward']:.3f}" in result.stdout
        clipfrac = [h["train/clipfrac"] for h in run["history"] if "train/clipfrac" in h][-1]
        assert run["summary"]["shown"] == {"train/clipfrac": clipfrac}
    # one seed a setting: its values, no interval
    assert [s["final_reward"]["n"] for s in results["settings"]] == [1, 1]
    assert results["settings"][0]["final_reward"]["ci95"] is None
    table = result.stdout[result.stdout.index("sample.noise_level  seeds  first reward"):]
    assert [line.split()[0] for line in table.splitlines()[1:3]] == ["0.5", "1.0"]
    assert table.splitlines()[0].split()[-1] == "train/clipfrac"
    assert Image.open(out / "ablate.png").size[0] > 0

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, env=train_env())
    assert again.returncode == 2 and "fresh --out" in again.stderr


def test_a_population_of_settings_and_seeds_gives_intervals_over_seeds(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    out = tmp_path / "ablate"
    result = run_ablate("--vmap", "train.learning_rate=1e-4,1e-3", "--seeds", "3",
                        "--set", f"model.path={model}", "reward.rewards=brightness:1.0",
                        "eval_every=1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "ablate.json").read_text())
    assert list(results["seconds"]) == ["base"]  # one population, one program
    assert [r["name"] for r in results["runs"]][:2] == ["base/learning_rate=0.0001_seed=0",
                                                         "base/learning_rate=0.0001_seed=1"]
    for setting in results["settings"]:
        final = setting["final_reward"]
        members = [r for r in results["runs"] if r["name"] in setting["runs"]]
        values = [r["summary"]["final_reward"] for r in members]
        assert final["n"] == 3 and final["values"] == pytest.approx(values)
        assert final["mean"] == pytest.approx(np.mean(values))
        assert final["std"] == pytest.approx(np.std(values, ddof=1))
        assert final["ci95"] == pytest.approx(4.302653 * final["std"] / np.sqrt(3), rel=1e-5)
        assert f"{final['mean']:.3f} ±{final['ci95']:.3f}" in result.stdout
    data = json.loads((out / "ablate.data.json").read_text())
    assert set(data["bands"]) == set(data["lines"]) and len(data["lines"]) == 2
    assert "\r" not in result.stdout + result.stderr

    # the toy benchmark evaluates every member as the demo does and compares the settings
    compared = subprocess.run([sys.executable, "tools/toy_benchmark.py", "--ablation", f"lr={out}",
                               "--out", str(tmp_path / "compare"), "--num_test_prompts", "6",
                               "--images_per_prompt", "1"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env=train_env())
    assert compared.returncode == 0, compared.stderr[-3000:]
    rows = json.loads((tmp_path / "compare" / "toy_benchmark.json").read_text())
    assert [r["label"] for r in rows] == ["lr/learning_rate=0.0001", "lr/learning_rate=0.001"]
    for row in rows:
        overall = [m["held_out"]["overall"] for m in row["members"]]
        assert len(overall) == 3 and row["stats"]["held_out"]["overall"]["mean"] == pytest.approx(
            np.mean(overall))
        exact = [m["exact"]["seen"] for m in row["members"]]
        assert row["exact"]["seen"]["mean"] == pytest.approx(np.mean(exact))
        assert all(e <= m["seen"]["overall"] for e, m in zip(exact, row["members"]))
    for figure in ("held_out.png", "seen.png", "reward_curves.png"):
        assert Image.open(tmp_path / "compare" / figure).size[0] > 0


def population(folder, seeds, seconds):
    """An ablate.json in `folder` for one setting over `seeds`; its member workdirs' paths."""
    runs = [{"name": f"base/seed={s}", "history": [{"reward/total_mean": float(s)}]} for s in seeds]
    folder.mkdir()
    (folder / "ablate.json").write_text(json.dumps({
        "runs": runs, "settings": [{"name": "base", "runs": [r["name"] for r in runs]}],
        "seconds": {"base": seconds}}))
    return [folder / r["name"] for r in runs]


def test_the_benchmark_pools_populations_that_share_a_label(tmp_path, monkeypatch):
    """Seeds 0-1 and 4-5 of one setting, run as two populations, are one row of 4 members."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import toy_benchmark

    first = population(tmp_path / "a", [0, 1], 10.0)
    other = population(tmp_path / "b", [0], 5.0)
    second = population(tmp_path / "c", [4, 5], 20.0)
    rows = toy_benchmark.pooled([*toy_benchmark.rows_of("x", str(tmp_path / "a")),
                                 *toy_benchmark.rows_of("y", str(tmp_path / "b")),
                                 *toy_benchmark.rows_of("x", str(tmp_path / "c"))])
    assert [r["label"] for r in rows] == ["x", "y"]
    assert rows[0]["workdirs"] == [str(w) for w in first + second]
    assert rows[1]["workdirs"] == [str(w) for w in other]
    assert [h[0]["reward/total_mean"] for h in rows[0]["histories"]] == [0.0, 1.0, 4.0, 5.0]
    assert [r["seconds"] for r in rows] == [30.0, 5.0]


def test_the_benchmark_refuses_to_pool_members_of_two_guidance_scales(tmp_path, monkeypatch, capsys):
    """Each row's base is evaluated at its members' CFG scale, so one label over members sampled
    at two scales (DiffusionNFT's 1 and Flow-GRPO's 4.5) is refused before any evaluation."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import toy_benchmark

    for folder, scale in (("nft", 1.0), ("grpo", 4.5)):
        workdir, = population(tmp_path / folder, [0], 1.0)
        (workdir / "checkpoints").mkdir(parents=True)
        (workdir / "config.json").write_text(json.dumps({"sample": {"guidance_scale": scale}}))
    both = ["--ablation", f"x={tmp_path / 'nft'}", "--ablation", f"x={tmp_path / 'grpo'}"]
    assert toy_benchmark.main([*both, "--out", str(tmp_path / "out")]) == 2
    assert "'x' pools members sampled at CFG 1, 4.5; give them different labels" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    row, = toy_benchmark.pooled(toy_benchmark.rows_of("x", str(tmp_path / "grpo")))
    assert toy_benchmark.guidance_scale(row) == 4.5


@pytest.fixture(scope="module")
def ablate():
    """tools/ablate.py as a module, loaded once."""
    spec = importlib.util.spec_from_file_location("ablate", os.path.join(ROOT, "tools", "ablate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("grid, message", [
    ("train.betta=0", "config has no key 'train.betta'"),
    ("sample.group_size=2.5", "sample.group_size='2.5': expected int"),
    ("train.ema=maybe", "train.ema='maybe': expected true or false"),
    ("train.beta", "'train.beta' is not KEY=VALUE"),
])
def test_values_must_fit_the_type_of_their_key(ablate, tmp_path, capsys, grid, message):
    """In this process: main's exit code and its line (the CLI runs `sys.exit(main())`)."""
    config = os.path.join(ROOT, "configs", "toy_geneval.py:tiny")
    code = ablate.main(["--config", config, "--grid", grid, "--out", str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.startswith(f"error: {message}") and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the trainer's own SIGTERM handling is in tests/test_train_resume.py
def test_sigterm_stops_the_grid_keeping_the_finished_runs(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    out = tmp_path / "ablate"
    command = [sys.executable, "tools/ablate.py", "--config", "configs/toy_geneval.py:tiny",
               "--grid", "num_epochs=2,1000", "--set", f"model.path={model}",
               "reward.rewards=brightness:1.0", "save_every=1", "--out", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=train_env())
    second = out / "num_epochs=1000" / "checkpoints"
    deadline = time.time() + 180
    while not (second.exists() and any(p.name.isdigit() for p in second.iterdir())):
        assert process.poll() is None and time.time() < deadline, "no checkpoint written"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-3000:]
    assert "ablation stopped" in stderr and "holds the runs that finished (num_epochs=2)" in stderr
    results = json.loads((out / "ablate.json").read_text())
    assert [r["overrides"] for r in results["runs"]] == [{"num_epochs": 2}]
    assert len([h for h in results["runs"][0]["history"] if "reward/total_mean" in h]) == 2
    assert (out / "ablate.png").exists()
