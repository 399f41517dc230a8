"""The memory planner: its search, its command line on the toy model for a TPU slice (quick),
and at full SD3.5-M depth on v5e:2x4 (slow)."""
import json
import pathlib
import re
import subprocess
import sys

import pytest

from flowgrpo_jax import config as config_lib
from flowgrpo_jax import planner

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _Linear:
    """A fake compile: total = 2 GiB + 1.5 GiB per sample, against 16 GiB."""

    def __init__(self):
        self.calls = []

    def __call__(self, per_chip):
        self.calls.append(per_chip)
        total = int((2 + 1.5 * per_chip) * planner.GiB)
        result = planner.Compiled("train step", per_chip, total <= 16 * planner.GiB, temporaries=total,
                               memory=16 * planner.GiB)
        return result


def test_candidates_are_the_sizes_that_divide_the_batch_and_split_over_the_devices():
    assert planner._candidates(576, 8) == [8 * n for n in (1, 2, 3, 4, 6, 8, 9, 12, 18, 24, 36, 72)]
    assert planner._candidates(12, 8) == []


@pytest.mark.parametrize("start", [1, 4, 72])
def test_search_finds_the_largest_fitting_size_in_few_compiles(start):
    candidates = [n // 8 for n in planner._candidates(576, 8)]  # per chip
    measure = _Linear()
    assert planner.largest_fitting(candidates, measure, start) == 9  # 2 + 1.5 * 9 = 15.5 GiB
    assert 9 in measure.calls and 12 in measure.calls  # both sides of the edge were compiled
    assert len(measure.calls) <= 5, measure.calls


def test_search_says_none_when_nothing_fits():
    measure = lambda n: planner.Compiled("train step", n, False, error="compiler: out of memory")
    assert planner.largest_fitting([1, 2, 4], measure, 2) is None


def test_the_compilers_refusal_is_one_line():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
               "temporaries (28.81G) exceeds available HBM (15.75G).")
    assert planner._OOM.search(message)
    assert planner._oom_summary(message) == "compiler: HLO temporaries need 28.81G of 15.75G"


def _plan_command(*args, topology="v5e:2x2"):
    return [sys.executable, "-m", "flowgrpo_jax.plan", "--config", "configs/toy_geneval.py",
            "--topology", topology, *args]


def test_a_config_that_cannot_fit_is_told_what_to_change(tmp_path):
    # The toy run compiled for a v5e slice, planned against 64 MiB per chip: nothing fits.
    out = tmp_path / "plan.json"
    result = subprocess.run(_plan_command("--nosearch", "--memory_gib=0.0625", f"--json={out}",
                                          "--programs=decode,train step"),
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 1, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("does not fit:") and "Traceback" not in result.stderr
    for knob in ("train.remat=block", "mesh.fsdp=4", "train step"):
        assert knob in message, message
    saved = json.loads(out.read_text())
    assert not saved["fits"] and [p["name"] for p in saved["programs"]] == ["decode", "train step"]
    assert "compiling train step, 8 per chip" in result.stdout  # a progress line per compile


def test_unknown_programs_are_refused_before_compiling():
    config = config_lib.load_file(str(ROOT / "configs" / "toy_geneval.py"))
    with pytest.raises(planner.PlanError, match=r"unknown programs \['train'\]; known: encode, "
                       r"rollout, decode, rescore, train step, eval rollout, eval decode"):
        planner.plan(config, [], "v5e:2x2", programs=("train",))


def test_an_unknown_topology_is_one_line():
    result = subprocess.run(_plan_command(topology="v9z:1x1"), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot compile for TPU topology 'v9z:1x1'")


@pytest.mark.slow
def test_sd35m_lora_fits_a_v5e_8_slice_at_the_shipped_sizes(tmp_path):
    """The full SD3.5-M run of configs/sd35m_geneval.py (LoRA, CFG, 9 trained steps, 512 px,
    128 T5 tokens) compiled for v5e:2x4: the train step at its 4 images per chip and the rollout
    at 8 per chip fit 16 GiB chips (about 20 minutes of compiling on 2 cores)."""
    out = tmp_path / "plan.json"
    result = subprocess.run(
        [sys.executable, "-m", "flowgrpo_jax.plan", "--config", "configs/sd35m_geneval.py",
         "--topology", "v5e:2x4", "--nosearch", f"--json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=3600)
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-3000:]
    programs = {p["name"]: p for p in json.loads(out.read_text())["programs"]}
    assert programs["train step"]["fits"] and programs["train step"]["per_chip"] >= 2
    assert programs["rollout"]["fits"] and programs["rollout"]["per_chip"] >= 8


def test_advice_names_a_smaller_micro_batch_when_fsdp_and_remat_are_already_set():
    # What the planner says of full fine-tuning on v5e:2x4 at 4 images per chip (16.44 GiB).
    config = config_lib.load_file(str(ROOT / "configs" / "sd35m_geneval.py"))
    config.lora.enabled, config.mesh.fsdp = False, 8
    failed = planner.Compiled("train step", 4, False, error="compiler: HLO temporaries need 16.44G")
    result = planner.Plan("v5e:2x4", 8, int(15.75 * planner.GiB), [failed])
    assert planner.advice(result, config) == (
        "does not fit: train step over 15.75 GiB per chip; try a smaller "
        "--config.train.micro_batch_size, e.g. 16 (the search finds the largest)")
    result.programs = [planner.Compiled("train step", 1, False)]
    assert planner.advice(result, config).endswith("try more chips, or chips with more memory")
    config.mesh.data, config.mesh.fsdp = 1, -1  # the :full variant's mesh: fsdp over all 8
    assert planner.advice(result, config).endswith("try more chips, or chips with more memory")


def test_exact_ratios_over_several_updates_add_the_rescore_program():
    """Compiled for this host: with one update an epoch there is nothing to rescore; with two,
    one forward of the update's samples, a small share of the update's FLOPs."""
    import jax

    config = config_lib.load_file(str(ROOT / "configs" / "toy_geneval.py:tiny"))
    plan = lambda: planner.plan(config, jax.devices()[:1], "cpu", search=False,
                                programs=("rescore", "train step"), log=lambda *a, **k: None)
    assert [p.name for p in plan().programs] == ["train step"]
    config.train.updates_per_epoch = 2
    rescore, step = plan().programs
    assert rescore.name == "rescore" and rescore.fits and step.fits
    assert 0 < rescore.flops < step.flops / 2, (rescore.flops, step.flops)


def test_a_lora_population_shares_the_base_and_compiles_for_a_tpu_without_collectives():
    """Four seeds of the toy run with LoRA on a v5e:2x2 slice, one member a chip: each chip
    holds the frozen base once and one member's LoRA state, and the population's rollout (the
    TPU attention kernel vmapped over the members) moves nothing between chips."""
    config = config_lib.load_file(str(ROOT / "configs" / "toy_geneval.py"))
    config.lora.enabled = True
    devices = planner.tpu_devices("v5e:2x2")
    quiet = dict(log=lambda *a, **k: None)
    solo = planner.RunPlan(config, devices, **quiet)
    config.population.seeds, config.mesh.population = 4, 4
    population = planner.RunPlan(config, devices, **quiet)
    assert population.weights == solo.weights  # one member's state a chip, the base shared
    rollout = population.compile("rollout", 64, population.rollout(64), keep_hlo=True)
    assert rollout.fits and "tpu_custom_call" in rollout.hlo
    collectives = re.findall(r"(all-gather|all-reduce|all-to-all|collective-permute)", rollout.hlo)
    assert collectives == []


def test_the_planner_compiles_every_program_of_a_population_run():
    """A population of two seeds on this host, two updates an epoch: encode, rollout, decode,
    the vmapped rescore, the train step and the eval programs all compile, as the trainer runs
    them."""
    import jax

    config = config_lib.load_file(str(ROOT / "configs" / "toy_geneval.py:tiny"))
    config.population.seeds, config.train.updates_per_epoch = 2, 2
    result = planner.plan(config, jax.devices()[:1], "cpu", search=False, log=lambda *a, **k: None)
    assert [p.name for p in result.programs] == list(planner.PROGRAMS)
    assert result.fits and result.members == 2
    step = next(p for p in result.programs if p.name == "train step")
    assert step.per_chip == 2 * config.train.micro_batch_size


def test_an_epoch_of_one_rollout_chunk_holds_no_earlier_chunks_while_it_samples():
    import jax

    config = config_lib.load_file(str(ROOT / "configs" / "toy_geneval.py:tiny"))
    config.sample.group_size, config.sample.groups_per_epoch = config.sample.batch_size, 1
    run = planner.RunPlan(config, jax.devices()[:1], log=lambda *a, **k: None)
    resident = run.rollout(config.sample.batch_size)[3]
    assert resident == run.weights
