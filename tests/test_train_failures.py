"""The trainer failing loudly and briefly: a diverging run stops with an error and keeps no
non-finite checkpoint; bad inputs (config values, the mesh, prompt files, the workdir's
config, an unreachable reward server, checkpoints none of which is intact) end the command with
one line naming the key or file, and a non-zero exit, no traceback."""
import json
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from flowgrpo_jax.checkpoint import TrainCheckpointer
from train_runs import ROOT, TOY_RUN, checkpoint_state, checkpoint_steps, make_tiny_model, train_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def test_failing_commands_end_with_one_line_and_a_diverging_run_keeps_no_nonfinite_state(
        tmp_path):
    """Every command runs in one process (tests/cli_driver.py): one interpreter start and one
    import of jax, flax and orbax for all of them."""
    model = make_tiny_model(tmp_path / "model")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "exclude.jsonl").write_text(json.dumps(
        {"tag": "counting", "prompt": "two circles", "include": [{"class": "circle", "count": 2}],
         "exclude": {"class": "circle", "count": 3}}) + "\n")
    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / "config.json").write_text('{"seed": 0, "train": {"learning_')
    # a workdir whose only checkpoint is damaged: its _METADATA emptied
    damaged = TrainCheckpointer(str(tmp_path / "damaged"))
    damaged.save(1, {"w": jnp.zeros(4)}, {"epoch": 1})
    damaged.close()
    (tmp_path / "damaged" / "checkpoints" / "1" / "state" / "_METADATA").write_bytes(b"")
    url = f"http://127.0.0.1:{_free_port()}"
    cases = [  # (overrides, workdir, exit status, what the one line says)
        (["--config.mesh.fsdp=2"], "a", 2,
         "error: config.mesh.fsdp=2: must divide the 1 device(s) (mesh.data=-1 takes the devices"),
        (["--config.train.learning_rate=inf"], "a", 2,
         "error: config.train.learning_rate=inf: must be a finite number"),
        (["--config.save_every=0"], "a", 2, "error: config.save_every=0: must be >= 1"),
        (["--config.log_every=0"], "a", 2, "error: config.log_every=0: must be >= 1"),
        ([f"--config.prompts.train_file={tmp_path / 'missing.jsonl'}"], "a", 2,
         f"error: prompt file {tmp_path / 'missing.jsonl'} cannot be read: [Errno 2]"),
        ([f"--config.prompts.train_file={tmp_path / 'empty.jsonl'}"], "a", 2,
         f"error: prompt file {tmp_path / 'empty.jsonl'} holds no prompts"),
        ([f"--config.prompts.train_file={tmp_path / 'bad.jsonl'}"], "a", 2,
         f"error: {tmp_path / 'bad.jsonl'}:1 is not JSON"),
        ([f"--config.prompts.test_file={tmp_path / 'exclude.jsonl'}"], "a", 2,
         f"error: {tmp_path / 'exclude.jsonl'}:1: 'exclude' must be a list of objects"),
        ([], "truncated", 2, f"error: {tmp_path / 'truncated' / 'config.json'} cannot be read"),
        ([f"--config.reward.url={url}"], "url", 1,
         f"error: cannot reach the reward server at {url}: "),
        ([], "damaged", 1, f"error: no intact checkpoint in {tmp_path / 'damaged' / 'checkpoints'}"
                           f" (step 1: state/_METADATA: 0 bytes, "),
        # diverges: the first update is finite, then every loss is NaN
        (["--config.train.learning_rate=1e6", "--config.num_epochs=4"], "diverged", 1,
         "error: training stopped in epoch "),
    ]
    commands = [[*TOY_RUN, "--workdir", str(tmp_path / workdir), f"--config.model.path={model}",
                 *overrides] for overrides, workdir, _, _ in cases]
    driver = subprocess.run([sys.executable, "tests/cli_driver.py", json.dumps(commands)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=train_env())
    assert driver.returncode == 0, driver.stderr[-3000:]
    results = json.loads(driver.stdout.splitlines()[-1])
    for (overrides, workdir, status, start), (got_status, output) in zip(cases, results):
        # the diverging run also logs its epochs; every other command prints its error only
        lines = [line for line in output.strip().splitlines()
                 if workdir != "diverged" or line.startswith("error:")]
        assert (got_status, len(lines)) == (status, 1), (overrides, got_status, output[-3000:])
        assert lines[0].startswith(start) and "Traceback" not in output, (overrides, output)
    assert not (tmp_path / "a").exists()  # refused before the workdir was made

    error = results[-1][1].replace("\r", "\n")
    assert re.search(r"error: training stopped in epoch \d: 3 updates in a row had a non-finite "
                     r"loss or gradient norm \(the last: loss=nan", error), error[-3000:]
    skipped = [float(n) for n in re.findall(r"train/skipped_nonfinite=([\d.]+)", error)]
    assert sum(skipped) >= 3 and skipped[0] == 0, skipped  # the first update is finite
    diverged = tmp_path / "diverged"
    steps = checkpoint_steps(diverged)
    assert steps and steps[-1] < 4  # the run never reached its end
    for step in steps:  # params, optimizer state and EMA
        arrays = jax.tree_util.tree_leaves_with_path(checkpoint_state(diverged, step))
        floats = [(path, a) for path, a in arrays if np.issubdtype(a.dtype, np.floating)]
        assert len(floats) > 10
        for path, a in floats:
            assert np.isfinite(a).all(), (step, jax.tree_util.keystr(path))
