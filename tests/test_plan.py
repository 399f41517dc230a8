"""The memory planner: its search, its command line on the toy model for a TPU slice (quick),
its FLOPs and roofline times on a small SD3.5-style model against an analytic count, and at
full SD3.5-M depth on v5e:2x4 (slow)."""
import json
import pathlib
import re
import subprocess
import sys

import pytest
from sd3_folders import sd35m_folder

from flowgrpo_jax import config as config_lib
from flowgrpo_jax import planner, roofline

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
    # a progress line per compile, with its seconds and the host memory the compiles took
    progress = re.search(r"compiling train step, 8 per chip \.\.\. \d+ s \(host peak so far "
                         r"([\d.]+) GB\)", result.stdout)
    assert progress and 0.2 < float(progress.group(1)) < 24, result.stdout


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


@pytest.mark.slow
def test_flux1_dev_lora_fits_a_v5p_8_slice_at_the_shipped_sizes(tmp_path):
    """FLUX.1-dev LoRA (configs/flux_pickscore.py: r64, 512 px, 6 steps, 128 T5 tokens, no CFG)
    on v5p:2x2x1 with the base replicated: the train step at 8 images per chip and the rollout
    at 16 fit 95 GiB chips (about 5 minutes of compiling and 10 GB of host memory on 2 cores)."""
    out = tmp_path / "plan.json"
    result = subprocess.run(
        [sys.executable, "-m", "flowgrpo_jax.plan", "--config", "configs/flux_pickscore.py",
         "--topology", "v5p:2x2x1", "--nosearch", "--programs", "rollout,train step",
         f"--json={out}"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-3000:]
    programs = {p["name"]: p for p in json.loads(out.read_text())["programs"]}
    assert programs["train step"]["fits"] and programs["train step"]["per_chip"] == 8
    assert programs["rollout"]["fits"] and programs["rollout"]["per_chip"] == 16


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
    the vmapped rescore (exact ratios: one forward of an update's samples, a small share of the
    update's FLOPs), the train step and the eval programs all compile, as the trainer runs them.
    With one update an epoch there is nothing to rescore."""
    import jax

    config = config_lib.load_file(str(ROOT / "configs" / "toy_geneval.py:tiny"))
    config.population.seeds, config.train.updates_per_epoch = 2, 2
    plan = lambda **kw: planner.plan(config, jax.devices()[:1], "cpu", search=False,
                                     log=lambda *a, **k: None, **kw)
    result = plan()
    assert [p.name for p in result.programs] == list(planner.PROGRAMS)
    assert result.fits and result.members == 2
    program = {p.name: p for p in result.programs}
    step, rescore = program["train step"], program["rescore"]
    assert step.per_chip == 2 * config.train.micro_batch_size
    assert 0 < rescore.flops < step.flops / 2, (rescore.flops, step.flops)
    config.train.updates_per_epoch = 1
    assert plan(programs=("rescore",)).programs == []


def test_an_epoch_of_one_rollout_chunk_holds_no_earlier_chunks_while_it_samples():
    import jax

    config = config_lib.load_file(str(ROOT / "configs" / "toy_geneval.py:tiny"))
    config.sample.group_size, config.sample.groups_per_epoch = config.sample.batch_size, 1
    run = planner.RunPlan(config, jax.devices()[:1], log=lambda *a, **k: None)
    resident = run.rollout(config.sample.batch_size)[3]
    assert resident == run.weights


# SD3.5 Medium's architecture at width 128 (2 heads of 64), 4 layers (the second with SD3.5's
# second attention), small text encoders: 256 px (256 image tokens), 77 + 16 text tokens.
SMALL_SD3 = {
    "transformer": {"num_attention_heads": 2, "caption_projection_dim": 128,
                    "joint_attention_dim": 128, "pooled_projection_dim": 96,
                    "dual_attention_layers": [1]},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "projection_dim": 32},
    "text_encoder_2": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "projection_dim": 64},
    "text_encoder_3": {"d_model": 128, "d_ff": 256, "num_layers": 1, "num_heads": 2}}


def mmdit_forward_flops(*, layers, dual, width, heads, head_dim, image, text, joint, pooled,
                        patch_in, patch_out, lora_rank, pad=lambda n: n):
    """(matmul FLOPs, attention FLOPs) of one MMDiT forward on one sample (docs/benchmarks.md):
    2 x in x out x the tokens each linear layer sees (image tokens, text tokens, or the one
    conditioning vector), LoRA on the joint attention's projections, and 4 x heads x q_len x
    kv_len x head_dim per attention (lengths as `pad` makes them)."""
    w = width
    linear = lambda tokens, inputs, outputs: 2 * tokens * inputs * outputs
    lora = lambda tokens, count: count * (linear(tokens, w, lora_rank) + linear(tokens, lora_rank, w))
    matmuls = (linear(image, patch_in, w) + linear(text, joint, w)
               + linear(1, 256, w) + linear(1, w, w) + linear(1, pooled, w) + linear(1, w, w)
               + linear(1, w, 2 * w) + linear(image, w, patch_out))
    attention = 0
    for i in range(layers):
        last = i == layers - 1
        matmuls += linear(1, w, (9 if i in dual else 6) * w) + linear(1, w, (2 if last else 6) * w)
        matmuls += 4 * linear(image, w, w) + lora(image, 4) + 2 * linear(image, w, 4 * w)
        if last:  # context_pre_only: the text's keys and values only
            matmuls += 2 * linear(text, w, w) + lora(text, 2)
            attention += 4 * heads * pad(image) * pad(image + text) * head_dim
        else:
            matmuls += 4 * linear(text, w, w) + lora(text, 4) + 2 * linear(text, w, 4 * w)
            attention += 4 * heads * pad(image + text) ** 2 * head_dim
        if i in dual:
            matmuls += 4 * linear(image, w, w)
            attention += 4 * heads * pad(image) ** 2 * head_dim
    return matmuls, attention


@pytest.fixture(scope="module")
def small_sd3_plan(tmp_path_factory):
    """The LoRA run of configs/sd35m_geneval.py (CFG, 10 SDE steps of which 9 train, KL,
    per-block remat, the splash kernel) on the small model, planned for v5e:2x2: 2 images a
    chip in rollout chunks and micro batches, 2 updates of 16 an epoch of 32."""
    folder = sd35m_folder(tmp_path_factory.mktemp("sd3") / "small", 4, SMALL_SD3)
    config = config_lib.load_file(str(ROOT / "configs" / "sd35m_geneval.py"))
    config.model.path, config.model.resolution, config.model.max_sequence_length = folder, 256, 16
    config.lora.rank, config.lora.alpha = 4, 8.0
    s, t = config.sample, config.train
    s.group_size, s.groups_per_epoch, s.batch_size = 4, 8, 8
    t.micro_batch_size, t.updates_per_epoch, t.remat = 8, 2, "block"
    result = planner.plan(config, planner.tpu_devices("v5e:2x2"), "v5e:2x2", search=False,
                          programs=("rollout", "train step"), log=lambda *a, **k: None)
    return config, result


def test_the_planners_flops_agree_with_the_analytic_count(small_sd3_plan):
    """Per chip: the rollout is 2 images x 2 CFG branches x 10 steps of forwards; the update
    (72 per chip: 2 images x 2 branches x 9 steps x 2 micro batches) runs per sample and step
    4 forwards' matmuls (policy, KL reference, remat recompute, and the LoRA backward, which
    needs input gradients only) and the splash kernels' 6.5 forwards of attention (3 forwards,
    the dq kernel's 1.5 and the dkv kernel's 2). The attention is counted at the kernel's
    lengths, padded to multiples of 128: exact; the matmuls are fewer than 4 forwards where
    XLA leaves out what the gradient does not need (the recompute of each block's output
    projections, the first block's input gradients)."""
    config, result = small_sd3_plan
    matmuls, attention = mmdit_forward_flops(
        layers=4, dual=[1], width=128, heads=2, head_dim=64, image=256, text=77 + 16, joint=128,
        pooled=96, patch_in=2 * 2 * 16, patch_out=2 * 2 * 16, lora_rank=4,
        pad=lambda n: -(-n // 128) * 128)
    rollout, step = result.programs
    forwards = 2 * 2 * config.sample.num_steps
    analytic = {"rollout": forwards * (matmuls + attention),
                "train step": 72 * (4 * matmuls + 6.5 * attention)}
    for program in (rollout, step):
        print(f"{program.name}: planner {program.flops / 1e9:.2f} GFLOP, analytic "
              f"{analytic[program.name] / 1e9:.2f} GFLOP per chip")
        assert program.flops == pytest.approx(analytic[program.name], rel=0.10)
    assert rollout.model_flops == rollout.flops  # nothing recomputed
    # model FLOPs leave the recompute out: 3 forwards of matmuls, 5.5 of attention
    assert step.model_flops == pytest.approx(72 * (3 * matmuls + 5.5 * attention), rel=0.10)


def test_the_roofline_times_of_each_program_and_of_an_epoch(small_sd3_plan):
    config, result = small_sd3_plan
    chip = result.chip
    assert chip is roofline.TPU_V5E and (chip.flops, chip.bandwidth) == (197e12, 819e9)
    for p in result.programs:
        assert p.roofline_seconds == max(p.flops / chip.flops, p.bytes / chip.bandwidth)
        assert p.mfu == pytest.approx(p.model_flops / (p.roofline_seconds * chip.flops))
        assert 0 < p.mfu <= 1 and not p.unknown_kernels
    rollout, step = result.programs
    epoch = result.epoch  # 4 chunks and 2 updates, the second rescored twice (exact ratios)
    assert epoch.calls == {"encode": 4, "rollout": 4, "decode": 4, "train step": 2, "rescore": 2}
    assert epoch.missing == ["encode", "decode", "rescore"]
    assert epoch.seconds == pytest.approx(4 * rollout.roofline_seconds + 2 * step.roofline_seconds)
    assert epoch.images_per_second_per_chip is None and epoch.mfu is None  # not a whole epoch
    text = planner.format_plan(result)
    assert "roofline on TPU v5e (197 TFLOP/s bf16, 819 GB/s)" in text
    assert f"take {epoch.seconds:.1f} s at the roofline; not planned: encode, decode, rescore" in text
    saved = json.loads(json.dumps(planner.plan_json(result)))
    assert saved["epoch"]["seconds"] == epoch.seconds and saved["chip"]["name"] == "TPU v5e"
    assert saved["programs"][1]["model_flops"] == step.model_flops
    # every program of the epoch planned: its images/s a chip and MFU
    others = [planner.Compiled(name, 2, True, flops=1e12, model_flops=5e11, roofline_seconds=0.01)
              for name in ("encode", "decode", "rescore")]
    whole = planner.epoch_roofline(result.programs + others, epoch.calls, 32, 4, chip)
    seconds = epoch.seconds + (4 + 4 + 2) * 0.01
    assert whole.missing == [] and whole.seconds == pytest.approx(seconds)
    assert whole.images_per_second_per_chip == pytest.approx(32 / seconds / 4)
    assert whole.mfu == pytest.approx((4 * rollout.model_flops + 2 * step.model_flops
                                       + (4 + 4 + 2) * 5e11) / (seconds * chip.flops))


def test_each_slice_and_gpu_the_readme_plans_for_has_its_public_peaks():
    for topology, chip in (("v5e:2x4", roofline.TPU_V5E), ("v6e:2x4", roofline.TPU_V6E),
                           ("v4:2x2x1", roofline.TPU_V4), ("v5p:2x2x1", roofline.TPU_V5P)):
        assert roofline.chip_for(topology) is chip
        assert roofline.chip_for(planner.tpu_devices(topology)[0].device_kind) is chip
    assert roofline.chip_for("NVIDIA H100 80GB HBM3") is roofline.H100_SXM
    assert roofline.chip_for("NVIDIA H100 PCIe") is roofline.H100_PCIE
    assert roofline.chip_for("NVIDIA H200") is roofline.H200_SXM
    assert roofline.chip_for("cpu") is None
