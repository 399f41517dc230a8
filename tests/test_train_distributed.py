"""The real trainer as two `jax.distributed` processes on localhost (gloo CPU collectives):
each process samples and scores its own share, rewards are gathered, and both end with the
same params, which also match a one-process run of the same config."""
import re
import socket
import subprocess

from train_runs import (ROOT, checkpoint_params, checkpoint_steps, make_tiny_model, max_abs_diff,
                        train_command, train_env)

EPOCHS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fingerprints(output: str) -> dict:
    return dict(re.findall(r"process (\d+)/\d+: epoch \d+, params fingerprint (\w+)", output))


def test_two_processes_train_two_epochs_with_identical_params(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    workdir = tmp_path / "run"
    coordinator = f"127.0.0.1:{_free_port()}"
    processes = [
        subprocess.Popen(train_command(workdir, model, f"--config.num_epochs={EPOCHS}",
                                       "--coordinator", coordinator, "--num_processes", "2",
                                       "--process_id", str(i)),
                         cwd=ROOT, env=train_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=400)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for i, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"process {i} failed:\n{output[-3000:]}"
    prints = _fingerprints(outputs[0]) | _fingerprints(outputs[1])
    assert set(prints) == {"0", "1"}, outputs[1][-2000:]
    assert prints["0"] == prints["1"], f"the processes ended with different params: {prints}"
    assert checkpoint_steps(workdir)[-1] == EPOCHS
    # Both processes took part: epoch 0's reward mean is over all 16 images, as in one process.
    assert re.search(r"epoch 0: reward/total_mean=", outputs[0])

    single = tmp_path / "single"
    result = subprocess.run(train_command(single, model, f"--config.num_epochs={EPOCHS}"), cwd=ROOT,
                            env=train_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rewards = lambda text: re.findall(r"reward/total_mean=([\d.]+)", text)
    assert rewards(outputs[0]) == rewards(result.stdout + result.stderr)
    diff = max_abs_diff(checkpoint_params(workdir, EPOCHS), checkpoint_params(single, EPOCHS))
    print(f"2 processes vs 1: max |params diff| = {diff:.3g}")
    assert diff < 5e-5
