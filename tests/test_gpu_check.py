"""tools/gpu_check.py on this CPU with the tiny config, as on a lent GPU at SD3.5-M size: every
section runs, its JSON holds sane figures, the ratio checks are exact, the bench's JAX and
PyTorch sides agree; and a section past its share of the budget is stopped with what it
measured kept."""
import json
import subprocess
import sys

import pytest

from train_runs import ROOT, train_env

PROGRAMS = ["encode", "rollout", "decode", "train step", "eval rollout", "eval decode"]


def _gpu_check(tmp_path, *args):
    out = tmp_path / "gpu_check.json"
    # torch's OpenMP threads wait passively: on a shared CPU spinning ones crawl (bench.py)
    done = subprocess.run([sys.executable, "tools/gpu_check.py", "--config", "tiny",
                           "--out", str(out), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**train_env(), "OMP_WAIT_POLICY": "PASSIVE"})
    return done, json.loads(out.read_text())


def test_every_section_on_cpu_with_the_tiny_config(tmp_path):
    done, result = _gpu_check(tmp_path, "--repeats", "1")
    sections = result["sections"]
    assert done.returncode == 0, {name: s["status"] for name, s in sections.items()}
    assert list(sections) == ["programs", "bench", "plan"]
    assert result["environment"]["platform"] == "cpu"

    programs = sections["programs"]
    for name in ("rollout", "rescore", "train_step"):
        figures = programs[name]
        assert figures["images_per_s"] > 0 and figures["planned_flops"] > 0, (name, figures)
        assert figures["from_cache"], name  # the planner's compile, loaded back
    ratio = programs["ratio"]
    assert ratio["exact"] and programs["finite"], ratio
    assert ratio["rescore_repeat_max_abs_log_ratio"] == 0
    assert ratio["later_updates"][0]["ratio_max"] > 1  # update 1 moved the params
    assert [p["name"] for p in programs["planned"]["programs"]] == ["rollout", "rescore",
                                                                   "train step"]

    _check_bench(sections["bench"])

    plan = sections["plan"]
    assert [p["name"] for p in plan["programs"]] == PROGRAMS and plan["fits"]
    for line in ("on-policy update, exact ratios", "rescore twice, same params", "train step",
                 "bench     rollout, batch 4", "plan      train step, 8 per chip"):
        assert line in done.stdout, line


def _check_bench(bench):
    """tools/bench.py's JSON with one timed repeat of the tiny config, and the JAX and PyTorch
    sides computing the same thing at fp32 (same weights, same initial and per-step noise)."""
    assert bench["images_per_s"]["jax"] > 0 and bench["images_per_s"]["torch"] > 0
    times, median = bench["times_s"], bench["median_s"]
    for name in ("jax_rollout", "torch_rollout", "jax_loss_step", "torch_loss_step"):
        assert len(times[name]) == 1 and median[name] == times[name][0] > 0, name
    for part in ("rollout", "loss_step"):
        assert bench["ratio_torch_over_jax"][part] == pytest.approx(
            median[f"torch_{part}"] / median[f"jax_{part}"])
        assert bench["jax_compile_s"][part]["compile"] > 0
    assert bench["config"]["num_steps"] == 10 and bench["config"]["dtype"] == "float32"
    assert bench["device"]["jax_backend"] == "cpu" and bench["torch_threads"] >= 1
    assert {"jax", "jaxlib", "flax", "torch", "diffusers"} <= bench["versions"].keys()

    agreement = bench["agreement"]
    # the final latents, and every step's log-prob (these depend on each step's noise and mean)
    assert agreement["final_latents_rel_l2"] < 1e-5
    assert agreement["log_probs_max_abs_diff"] < 1e-5
    for name in ("loss", "policy_loss", "kl"):
        pair = agreement[name]
        assert pair["torch"] == pytest.approx(pair["jax"], rel=1e-5, abs=1e-7), name
    assert agreement["kl"]["jax"] > 0  # the reference model differs, so the KL term is exercised
    pair = agreement["grad_norm"]
    assert pair["torch"] == pytest.approx(pair["jax"], rel=1e-4)


def test_a_section_past_its_share_of_the_budget_is_stopped(tmp_path):
    done, result = _gpu_check(tmp_path, "--sections", "programs,plan", "--budget_s", "6")
    programs, plan = result["sections"]["programs"], result["sections"]["plan"]
    assert done.returncode == 1
    assert programs["status"].startswith("stopped at its share of the budget"), programs
    assert programs["seconds"] < 6
    assert plan["status"].startswith(("stopped", "skipped")), plan
