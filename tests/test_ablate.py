"""tools/ablate.py on a 2-point grid of tiny runs (the brightness reward on a tiny random model),
and its value parsing."""
import json
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


def test_two_point_grid_runs_tables_and_plots(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    out = tmp_path / "ablate"
    command = [sys.executable, "tools/ablate.py", "--config", "configs/toy_geneval.py:tiny",
               "--grid", "sample.noise_level=0.5,1.0",
               "--set", f"model.path={model}", "reward.rewards=brightness:1.0", "num_epochs=3",
               "--show", "train/clipfrac", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=train_env())
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((out / "ablate.json").read_text())["runs"]
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
    table = result.stdout[result.stdout.index("sample.noise_level  first reward"):]
    assert [line.split()[0] for line in table.splitlines()[1:3]] == ["0.5", "1.0"]
    assert table.splitlines()[0].split()[-1] == "train/clipfrac"
    assert Image.open(out / "ablate.png").size[0] > 0

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, env=train_env())
    assert again.returncode == 2 and "fresh --out" in again.stderr


@pytest.mark.parametrize("grid, message", [
    ("train.betta=0", "config has no key 'train.betta'"),
    ("sample.group_size=2.5", "sample.group_size='2.5': expected int"),
    ("train.ema=maybe", "train.ema='maybe': expected true or false"),
    ("train.beta", "'train.beta' is not KEY=VALUE"),
])
def test_values_must_fit_the_type_of_their_key(tmp_path, grid, message):
    result = run_ablate("--grid", grid, "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the trainer's own SIGTERM handling is in tests/test_train_resume.py
def test_sigterm_stops_the_grid_after_saving(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    out = tmp_path / "ablate"
    command = [sys.executable, "tools/ablate.py", "--config", "configs/toy_geneval.py:tiny",
               "--grid", "train.beta=0,0.04", "--set", f"model.path={model}",
               "reward.rewards=brightness:1.0", "num_epochs=1000", "save_every=1", "--out", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=train_env())
    first = out / "beta=0.0" / "checkpoints"
    deadline = time.time() + 120
    while not (first.exists() and any(p.name.isdigit() for p in first.iterdir())):
        assert process.poll() is None and time.time() < deadline, "no checkpoint written"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1 and "grid stopped" in stderr
    assert not (out / "beta=0.04").exists() and not (out / "ablate.json").exists()
