"""Stopping and resuming the real trainer: SIGTERM saves at the next safe point and a resumed
run ends with the same params as an uninterrupted one; after kill -9 a restart resumes from
the last complete checkpoint and also ends with those params; a damaged latest checkpoint is
set aside and the run resumes from the one before, to the same params again."""
import shutil
import signal
import subprocess
import time

import pytest

from train_runs import (ROOT, checkpoint_params, checkpoint_steps, make_tiny_model, max_abs_diff,
                        run_train, train_command, train_env)

EPOCHS = 12
SETTINGS = (f"--config.num_epochs={EPOCHS}", "--config.save_every=1")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def uninterrupted_run(model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_train(workdir, model, *SETTINGS)
    return workdir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return checkpoint_params(uninterrupted_run, EPOCHS)


def _start_and_wait_for_checkpoint(workdir, model, step: int, log_path):
    log = open(log_path, "w")
    process = subprocess.Popen(train_command(workdir, model, *SETTINGS), cwd=ROOT, env=train_env(),
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not checkpoint_steps(workdir) or checkpoint_steps(workdir)[-1] < step:
        assert process.poll() is None, f"training exited early:\n{open(log_path).read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    return process, log


def test_sigterm_then_resume_ends_like_an_uninterrupted_run(model, uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    process, log = _start_and_wait_for_checkpoint(workdir, model, 1, tmp_path / "first.log")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    log.close()
    stopped_at = checkpoint_steps(workdir)[-1]
    assert stopped_at < EPOCHS, "the signal came too late to stop the run"
    assert f"stopped by signal at epoch {stopped_at}" in (tmp_path / "first.log").read_text()

    resumed = run_train(workdir, model, *SETTINGS)
    assert f"resumed from the checkpoint of epoch {stopped_at}" in resumed.stdout + resumed.stderr
    diff = max_abs_diff(checkpoint_params(workdir, EPOCHS), uninterrupted)
    print(f"stopped at epoch {stopped_at}; max |params - uninterrupted| = {diff:.3g}")
    assert diff == 0.0


@pytest.mark.slow  # the suite's budget: make test resumes from a checkpoint in the two tests beside it
def test_kill_9_then_restart_resumes_from_the_last_checkpoint(model, uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    process, log = _start_and_wait_for_checkpoint(workdir, model, 3, tmp_path / "first.log")
    process.kill()
    process.wait(timeout=60)
    log.close()
    last = checkpoint_steps(workdir)[-1]  # complete checkpoints only; a cut save stays a tmp dir
    assert last < EPOCHS, "the kill came too late to interrupt the run"

    resumed = run_train(workdir, model, *SETTINGS)
    assert f"resumed from the checkpoint of epoch {last}" in resumed.stdout + resumed.stderr
    diff = max_abs_diff(checkpoint_params(workdir, EPOCHS), uninterrupted)
    print(f"killed after checkpoint {last}; max |params - uninterrupted| = {diff:.3g}")
    assert diff == 0.0


def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(model, uninterrupted_run,
                                                                 uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted_run, workdir)
    # One flipped bit in the last checkpoint's array data, which orbax alone restores silently.
    arrays = workdir / "checkpoints" / str(EPOCHS) / "state" / "ocdbt.process_0" / "d"
    data_file = max(arrays.iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0x10
    data_file.write_bytes(bytes(data))

    resumed = run_train(workdir, model, *SETTINGS)
    output = resumed.stdout + resumed.stderr
    warnings = [line for line in output.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1, output[-3000:]
    assert warnings[0].startswith(f"warning: checkpoint {EPOCHS} in {workdir / 'checkpoints'} is "
                                  f"damaged (state/ocdbt.process_0/d/{data_file.name}: contents "
                                  f"differ from when saved"), warnings[0]
    assert warnings[0].endswith(f"resuming from checkpoint {EPOCHS - 1}")
    assert f"resumed from the checkpoint of epoch {EPOCHS - 1}" in output
    assert (workdir / "checkpoints_damaged" / str(EPOCHS) / "state").is_dir()
    diff = max_abs_diff(checkpoint_params(workdir, EPOCHS), uninterrupted)
    print(f"resumed past a damaged checkpoint; max |params - uninterrupted| = {diff:.3g}")
    assert diff == 0.0
