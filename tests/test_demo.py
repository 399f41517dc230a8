"""`python -m flowgrpo_jax.demo` end to end on the tiny variant: a tiny random toy model, 2 epochs
of 16 images, the brightness reward (learnable by a random model, so training moves the
weights; the toy checker's strict accuracy of such a model is near 0 before and after)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flowgrpo_jax.demo import PROMPT_SETS, grid_rows, table
from train_runs import ROOT, make_tiny_model, train_env

TEST_PROMPTS = 24  # of each prompt set


def run_demo(workdir, model, *extra):
    command = [sys.executable, "-m", "flowgrpo_jax.demo", "--config", "configs/toy_geneval.py:tiny",
               f"--config.model.path={model}", "--config.reward.rewards=brightness:1.0",
               "--config.train.learning_rate=0.01", "--config.eval_every=1",
               "--workdir", str(workdir), f"--num_test_prompts={TEST_PROMPTS}", *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=train_env())


def test_demo_writes_table_figures_and_results(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    result = run_demo(tmp_path / "demo", model)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "demo"
    results = json.loads((out / "results.json").read_text())
    assert set(PROMPT_SETS) <= set(results)
    assert "-- training with objective 'grpo' (train.objective): 2 epochs" in result.stdout
    printed = result.stdout.split(PROMPT_SETS["seen"][0])
    assert len(printed) == 2 and PROMPT_SETS["held_out"][0] in printed[0]
    for name, table_text in zip(("held_out", "seen"), printed):
        base, trained = results[name]["base"], results[name]["trained"]
        tags = sorted({row["tag"] for row in base["per_prompt"]})
        assert len(base["per_prompt"]) == TEST_PROMPTS and sorted(trained["per_tag"]) == tags
        for summary in (base, trained):
            assert summary["strict"] == pytest.approx(np.mean([row["strict"] for row in summary["per_prompt"]]))
        for tag in tags:  # each printed table holds every category's numbers
            assert any(line.startswith(tag) for line in table_text.splitlines())
        assert "overall" in table_text
        assert (out / PROMPT_SETS[name][1]).exists()
    assert "single_object" in {row["tag"] for row in results["seen"]["base"]["per_prompt"]}
    epochs = [h["epoch"] for h in results["history"] if "reward/total_mean" in h]
    evals = [h["epoch"] for h in results["history"] if "eval/reward_mean" in h]
    assert epochs == [0, 1] and evals == [0, 1, 2]
    assert set(results["seconds"]) == {"eval_base_s", "train_s", "eval_trained_s", "total_s"}

    rows = len(grid_rows(results["held_out"]["base"]["per_prompt"], 2))
    size = 16  # the tiny model's images; grids hold 4 seeds per prompt
    grids = [np.asarray(Image.open(out / name)) for name in ("grid_base.png", "grid_trained.png")]
    assert grids[0].shape == grids[1].shape == (rows * size, 4 * size, 3)
    assert np.abs(grids[0].astype(int) - grids[1].astype(int)).max() > 0, "training changed nothing"
    assert np.asarray(Image.open(out / "before_after.png")).shape[0] > rows * 2 * size
    curve = np.asarray(Image.open(out / "reward_curve.png").convert("RGB"))
    assert (np.abs(curve.astype(int) - (31, 119, 180)).sum(-1) == 0).sum() > 50  # the reward line


def test_demo_refuses_a_used_workdir(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "results.json").write_text("{}")
    result = run_demo(tmp_path / "demo", "unused")
    assert result.returncode == 2 and "--overwrite" in result.stderr


def test_grid_rows_take_each_category_in_order():
    metadata = [{"tag": t} for t in ("colors", "counting", "colors", "single_object", "colors")]
    assert grid_rows(metadata, 2) == [3, 1, 0, 2]


def test_table_shows_change_per_category():
    base = {"strict": 0.25, "per_tag": {"colors": {"strict": 0.5}, "counting": {"strict": 0.0}}}
    trained = {"strict": 0.75, "per_tag": {"colors": {"strict": 1.0}, "counting": {"strict": 0.5}}}
    lines = table(base, trained).splitlines()
    assert lines[1].split() == ["colors", "0.500", "1.000", "+0.500"]
    assert lines[-1].split() == ["overall", "0.250", "0.750", "+0.500"]
