"""tools/bench.py on the tiny config with one timed repeat: the JSON's fields, and that the JAX
and PyTorch sides compute the same thing (same weights, same initial and per-step noise) at fp32."""
import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "tools", "bench.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def tiny_run():
    # One torch thread: the test checks fields and agreement, and one thread is the fastest on
    # a shared machine (the timed comparison uses as many threads as XLA, see docs/benchmarks.md).
    return bench.run_bench(bench.CONFIGS["tiny"](), repeats=1, warmup=0, attention="xla",
                           remat="none", threads=1)


def _relative_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_json_has_every_figure(tiny_run):
    result = json.loads(json.dumps(tiny_run[0]))  # what --out writes
    for name in ("jax_rollout", "torch_rollout", "jax_loss_step", "torch_loss_step"):
        assert len(result["times_s"][name]) == 1
        assert result["median_s"][name] == result["times_s"][name][0] > 0
    median = result["median_s"]
    assert result["ratio_torch_over_jax"]["rollout"] == pytest.approx(median["torch_rollout"] / median["jax_rollout"])
    assert result["ratio_torch_over_jax"]["loss_step"] == pytest.approx(
        median["torch_loss_step"] / median["jax_loss_step"])
    for part in ("rollout", "loss_step"):
        assert result["jax_compile_s"][part]["compile"] > 0
    assert result["config"]["model"]["num_layers"] == bench.TINY_MODEL["num_layers"]
    assert result["config"]["num_steps"] == 10 and result["config"]["dtype"] == "float32"
    assert result["device"]["jax_backend"] == "cpu" and result["device"]["cpu_count"] >= 1
    assert result["torch_threads"] == 1
    assert {"jax", "jaxlib", "flax", "torch", "diffusers"} <= result["versions"].keys()
    assert {"final_latents_rel_l2", "log_probs_max_abs_diff", "loss", "kl", "grad_norm"} <= result["agreement"].keys()


def test_rollouts_agree_given_the_same_noise(tiny_run):
    out = tiny_run[1]
    assert out["jax_final_latents"].shape == (4, 32, 32, 16)
    error = _relative_l2(out["torch_final_latents"], out["jax_final_latents"])
    print(f"final latents relative L2 {error:.1e}")
    assert error < 1e-5
    # every step's log-prob: these depend on each step's noise and mean, not only the end point
    assert out["jax_log_probs"].shape == out["torch_log_probs"].shape == (4, 10)
    np.testing.assert_allclose(out["torch_log_probs"], out["jax_log_probs"], rtol=0, atol=1e-5)


def test_loss_steps_agree(tiny_run):
    out = tiny_run[1]
    for name in ("loss", "policy_loss", "kl"):
        print(name, out[f"jax_{name}"], out[f"torch_{name}"])
        assert out[f"torch_{name}"] == pytest.approx(out[f"jax_{name}"], rel=1e-5, abs=1e-7)
    assert out["jax_kl"] > 0  # the reference model differs, so the KL term is exercised
    assert out["torch_grad_norm"] == pytest.approx(out["jax_grad_norm"], rel=1e-4)


def test_rollout_noise_is_what_rollout_draws():
    """The noise handed to torch is the noise our rollout uses: one SDE step of a zero velocity
    model, sampled by `rollout` and rebuilt from rollout_noise, gives the same next latent."""
    import jax
    import jax.numpy as jnp

    from flowgrpo_jax.sampling.rollout import rollout
    from flowgrpo_jax.sampling.sde import sde_step

    shape, sigmas = (2, 4, 4, 3), jnp.array([1.0, 0.9, 0.5])
    latents, key = jnp.ones(shape), jax.random.key(3)
    zero_velocity = lambda params, x, t, text: jnp.zeros_like(x)
    out = rollout(zero_velocity, None, latents, {}, sigmas, key=key, kind="sde", noise_level=0.7)
    noise = bench.rollout_noise(key, 2, shape)
    step = sde_step(jnp.zeros(shape), latents, 1.0, 0.9, kind="sde", noise_level=0.7, sigma_max=0.9,
                    key=None, prev_sample=latents)  # the step's mean and noise std, without sampling
    expected = step.mean + step.noise_std[:, None, None, None] * noise[0]
    np.testing.assert_allclose(out.next_latents[:, 0], expected, rtol=1e-6, atol=1e-6)


def test_bad_options_are_refused():
    with pytest.raises(SystemExit):
        bench.main(["--config", "tiny", "--attention", "cudnn"])  # no GPU here
    with pytest.raises(SystemExit):
        bench.main(["--config", "tiny", "--repeats", "0"])
