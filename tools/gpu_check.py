"""One command for a GPU: the trainer's programs at SD3.5-M size, the bench against PyTorch,
the bf16 ratio checks and the planner, in one call, one JSON and one table.

    python tools/gpu_check.py --out gpu_check.json                 # a GPU (H100 / H200)
    python tools/gpu_check.py --config tiny --out gpu_check.json   # any CPU (CI)

Sections, run in the order of --sections, each in a process of its own (torch and JAX keep the
device memory they took, and a section that fails or overruns leaves the others their device):

- programs: the trainer's own programs (programs.build_run, what `train` compiles) with random
  weights at the config's batch sizes: one rollout chunk, then two updates of the chunk's
  halves with exact ratios, as an epoch of two updates runs them (update 1 on-policy at zero
  log-ratios, update 2 at the log-ratios of the rescore program against its run at the
  sampling params). Per program: the planner's compile of it on this device
  (`planner.plan`: memory, FLOPs, its roofline time and MFU), seconds per call, images/s,
  TFLOP/s and MFU at the chip's peak (flowgrpo_jax/roofline.py, or --peak_tflops). The ratio checks on the way, in the model's dtype (bf16 for
  SD3.5-M): the on-policy update's ratios are exactly 1 (none clipped); the rescore program
  run twice on the same params gives bitwise the same log-probs (so exact ratios are exact
  on this device); how far the rollout's own log-probs are from the rescore's, which is what
  ratios without train.exact_ratio would start from.
- bench: tools/bench.py's rollout and GRPO loss step, JAX against PyTorch (diffusers'
  SD3Transformer2DModel), the same weights and batch.
- plan: the planner on this device (`python -m flowgrpo_jax.plan` without --topology) for the
  shipped config, every program, no search.

--config sd35m (default): SD3.5-M at 512 px in bf16 (configs/sd35m_geneval.py; no weights are
read: the model is its shapes with random values), micro batches of 32 and rollout chunks of
64 as shipped; bench --config sd35m. --config tiny: the toy world's tiny run
(configs/toy_geneval.py:tiny, micro batches of 4, chunks of 8) and bench --config tiny, for a
CPU. A section starts only while --budget_s lasts and is stopped at its share of it (programs
1/2, bench 3/10, plan 1/5 of the budget, time a section leaves unused going to the next); the
JSON is rewritten as results come, so a stopped section keeps what it measured. Programs are
cached in the persistent compilation cache (flowgrpo_jax/compile_cache.py), so the sections
share their compiles and a second call on the same machine compiles nothing.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path[:0] = [ROOT, TOOLS]  # run as a script: the package and bench.py beside it

from flowgrpo_jax import compile_cache, machine  # noqa: E402
from flowgrpo_jax import config as config_lib  # noqa: E402
from flowgrpo_jax import parallel, planner, roofline  # noqa: E402
from flowgrpo_jax import programs as programs_lib  # noqa: E402
from flowgrpo_jax import update as up  # noqa: E402
from flowgrpo_jax.objectives.advantages import PerPromptStatTracker  # noqa: E402
from flowgrpo_jax.sampling.rollout import STEP_RECORDS  # noqa: E402

SECTIONS = ("programs", "bench", "plan")
SHARES = {"programs": 0.5, "bench": 0.3, "plan": 0.2}  # of the budget, in this order
SIZES = {  # config file, bench config
    "sd35m": ("configs/sd35m_geneval.py", "sd35m"),
    "tiny": ("configs/toy_geneval.py:tiny", "tiny"),
}
PLANNED = ("rollout", "rescore", "train step")  # the programs the programs section runs


class Part:
    """A section's results, written to its JSON file whenever they grow."""

    def __init__(self, path: str):
        self.path, self.data = path, {}

    def add(self, **results) -> None:
        self.data.update(results)
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(self.path + ".tmp", self.path)


def log(*args, **kwargs) -> None:
    print(*args, **{**kwargs, "file": sys.stderr})


# ----------------------------------------------------------------------------- configs


def shipped_config(size: str):
    return config_lib.load_file(os.path.join(ROOT, SIZES[size][0]))


def programs_config(size: str, micro_batch: int | None = None):
    """The shipped config as an epoch of one rollout chunk in one group, updated twice (each
    update half the chunk) with exact ratios, in micro batches of `micro_batch` (default: the
    shipped size; the tiny run's halved to fit an update)."""
    config = shipped_config(size)
    s, t = config.sample, config.train
    if micro_batch or size == "tiny":
        t.micro_batch_size = micro_batch or s.batch_size // 2
    s.group_size, s.groups_per_epoch = s.batch_size, 1
    t.updates_per_epoch, t.exact_ratio = 2, True
    return config


# ----------------------------------------------------------------------------- random values


@functools.cache
def _normal(shape: tuple, dtype, sharding):
    """scale * N(0, 1) draws of one shape, jitted once per shape (SD3.5-M's 1291 weights have 20
    shapes: one program for all of them takes minutes to compile)."""
    return jax.jit(lambda key, scale: (scale * jax.random.normal(key, shape, jnp.float32)
                                       ).astype(dtype), out_shardings=sharding)


def random_like(abstract, key, scale: float):
    """Arrays of the shapes, dtypes and shardings of `abstract` (ShapeDtypeStructs): normal
    draws times `scale` for floating point, zeros otherwise."""
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([
        _normal(a.shape, a.dtype, a.sharding)(k, scale) if jnp.issubdtype(a.dtype, jnp.floating)
        else jax.device_put(np.zeros(a.shape, a.dtype), a.sharding) for k, a in zip(keys, leaves)])


def _placed(shapes, sharding):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def text_shapes(run, size: int, sharding):
    """The encoded text of `size` prompts, as the encode program gives it."""
    tokens = jax.tree.map(lambda s: jax.ShapeDtypeStruct((size, *s.shape), s.dtype),
                          run.generator.token_shapes)
    return _placed(jax.eval_shape(run.programs.encode.jitted, run.encoder, tokens), sharding)


# ----------------------------------------------------------------------------- timing


def timed(fn, *args):
    """(seconds, result) of one call, waited for."""
    started = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return time.perf_counter() - started, result


def compiled(program, *args) -> tuple:
    """The program compiled for `args`; its compile seconds and whether the compilation cache
    held it (the planner compiled it first)."""
    before = compile_cache.counts()
    started = time.perf_counter()
    executable = program.lower(*args).compile()
    loaded = compile_cache.counts().loaded > before.loaded
    return executable, {"compile_s": round(time.perf_counter() - started, 2),
                        "from_cache": loaded}


def throughput(seconds: list, images: int, program, peak_flops: float | None) -> dict:
    """Per call of a program, measured against the planner's count of one call (`program`, a
    planner.Compiled): its hardware FLOPs a second, and MFU = its model FLOPs (no remat
    recompute) / (seconds x the chip's peak); beside them the planner's roofline estimate."""
    median = statistics.median(seconds)
    return {"seconds": seconds, "median_s": median, "images": images,
            "images_per_s": images / median, "planned_flops": program.flops,
            "planned_model_flops": program.model_flops,
            "achieved_flops_per_s": program.flops / median,
            "mfu": None if peak_flops is None else program.model_flops / median / peak_flops,
            "roofline_s": program.roofline_seconds or None,
            "roofline_mfu": program.mfu or None}


def peak_memory(device) -> int | None:
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ----------------------------------------------------------------------------- sections


@dataclasses.dataclass
class RandomRun:
    """A run of a config as the trainer builds it (programs.build_run, shapes only), its
    weights, prompt embeddings and initial noise drawn at random."""

    config: Any
    run: programs_lib.Run
    state: up.TrainState
    frozen: Any
    reference: Any  # None with LoRA
    uncond: Any  # the negative prompt's embeddings (None without CFG)
    text: Any  # a rollout chunk's prompt embeddings
    latents: jax.Array  # a rollout chunk's initial noise

    def rescore_args(self, batch) -> tuple:
        return (self.state.params, self.frozen, self.state.hyper, batch, self.uncond)

    def step_args(self, batch, key) -> tuple:
        return (self.state, self.frozen, self.reference, batch, self.uncond,
                parallel.replicate(key, self.run.mesh))


def random_run(config, devices) -> RandomRun:
    run = programs_lib.build_run(config, devices, abstract=True)
    batch_sh, replicated = parallel.batch_sharding(run.mesh), parallel.replicated(run.mesh)
    keys = iter(jax.random.split(jax.random.key(config.seed), 5))
    trainable = random_like(run.member_state.params, next(keys), 0.02)
    hyper = programs_lib.hyperparameters_for(config, run.objective)
    chunk = config.sample.batch_size
    return RandomRun(
        config=config, run=run, frozen=random_like(run.frozen, next(keys), 0.02),
        state=up.create_train_state(trainable, run.optimizer, run.mesh, hyper, run.objective),
        reference=None if config.lora.enabled else jax.tree.map(jnp.copy, trainable),
        uncond=(random_like(text_shapes(run, 1, replicated), next(keys), 1.0)
                if config.sample.guidance_scale != 1.0 else None),
        text=random_like(text_shapes(run, chunk, batch_sh), next(keys), 1.0),
        latents=random_like(jax.ShapeDtypeStruct((chunk, *run.generator.latent_shape),
                                                 jnp.float32, sharding=batch_sh), next(keys), 1.0))


def sample_chunk(r: RandomRun) -> tuple:
    """The rollout program compiled and run once on the chunk, as the trainer samples it:
    (its output, compile info, seconds)."""
    run, s = r.run, r.config.sample
    records = tuple(name for name in run.objective.records if name in STEP_RECORDS)
    params = (run.objective.sampling_params(r.state.params, r.state.extra), r.frozen)
    args = (params, r.latents, r.text, parallel.replicate(run.sigmas, run.mesh),
            parallel.replicate(jax.random.key(r.config.seed), run.mesh),
            r.state.hyper["noise_level"], r.state.hyper["guidance_scale"], r.uncond)
    rollout, info = compiled(run.programs.rollout(s.kind, run.window, records), *args)
    seconds, out = timed(rollout, *args)
    return out, info, seconds


def update_batches(r: RandomRun, out) -> list:
    """The chunk's two update batches (its halves) with random rewards' targets, as
    `Trainer._updates` takes them from an epoch's data."""
    run, config = r.run, r.config
    chunk, update = config.sample.batch_size, config_lib.sizes(config)["update"]
    tracker = PerPromptStatTracker(global_std=config.train.global_std,
                                   clip_max=config.train.adv_clip_max)
    rewards = np.random.default_rng(config.seed).standard_normal(chunk)
    targets = run.objective.targets(tracker.update(np.zeros(chunk, np.int64), rewards), config)
    data = {name: getattr(out, name) for name in run.objective.records}
    data.update(text=r.text, ids=parallel.shard_batch(np.arange(chunk, dtype=np.int32), run.mesh),
                targets=parallel.shard_batch(np.asarray(targets, np.float32), run.mesh))
    take = jax.jit(lambda data, rows: jax.tree.map(lambda a: a[rows], data),
                   out_shardings=parallel.batch_sharding(run.mesh))
    return [take(data, parallel.replicate(np.arange(u * update, (u + 1) * update), run.mesh))
            for u in range(2)]


def run_programs(size: str, part: Part, *, micro_batch: int | None, train_steps: int,
                 peak_flops: float | None) -> None:
    config = programs_config(size, micro_batch)
    devices = jax.devices()
    s, t = config.sample, config.train
    update = config_lib.sizes(config)["update"]
    part.add(config={"file": SIZES[size][0], "rollout_chunk": s.batch_size, "update": update,
                     "micro_batch": t.micro_batch_size, "dtype": config.model.get("dtype"),
                     "remat": t.remat, "num_steps": s.num_steps})
    plan = planner.plan(config, devices, devices[0].device_kind, search=False, programs=PLANNED,
                        log=log)
    part.add(planned=planner.plan_json(plan))
    if not plan.fits:
        raise RuntimeError(f"the planner says {[p.name for p in plan.programs if not p.fits]} "
                           f"do not fit this device; try a smaller --micro_batch")
    planned = {p.name: p for p in plan.programs}
    if peak_flops is None and (chip := roofline.chip_for(devices[0].device_kind)):
        peak_flops = chip.flops
    measured = lambda name, seconds, info: {**info, **throughput(seconds, update, planned[name],
                                                                 peak_flops)}

    r = random_run(config, devices)
    out, info, seconds = sample_chunk(r)
    part.add(rollout={**info, **throughput([seconds], s.batch_size, planned["rollout"],
                                                     peak_flops)})
    batches = update_batches(r, out)

    # the rescore program at the sampling params, twice: exact ratios need it to repeat bit
    # for bit; and the rollout's own log-probs against it
    rescore, rescore_info = compiled(r.run.programs.rescore, *r.rescore_args(batches[1]))
    rescore_seconds, at_sampling = timed(rescore, *r.rescore_args(batches[1]))
    seconds, again = timed(rescore, *r.rescore_args(batches[1]))
    rescore_seconds = [rescore_seconds, seconds]
    log_ratio = jax.jit(r.run.objective.log_ratio)
    n = r.run.settings.num_terms
    rollout_logp = {**at_sampling, "log_probs": batches[1]["log_probs"][:, :n]}
    ratio = {"rescore_repeat_max_abs_log_ratio":
             float(jnp.max(jnp.abs(log_ratio(again, at_sampling)))),
             "rollout_vs_rescore": _ratio_spread(log_ratio(at_sampling, rollout_logp),
                                                 t.clip_range)}
    part.add(ratio=ratio)

    # the updates: the first on-policy at zero log-ratios, the later ones at the rescore's
    # log-ratios between the current and the sampling params (update 2 of an epoch)
    first = {**batches[0], "log_ratios": jax.device_put(np.zeros((update, n), np.float32),
                                                        parallel.batch_sharding(r.run.mesh))}
    train_step, step_info = compiled(r.run.programs.train_step,
                                     *r.step_args(first, jax.random.key(0)))
    step_seconds, metrics = [], []
    for u in range(train_steps):
        batch = first
        if u:
            seconds, current = timed(rescore, *r.rescore_args(batches[1]))
            rescore_seconds.append(seconds)
            batch = {**batches[1], "log_ratios": log_ratio(current, at_sampling)}
        seconds, (r.state, m) = timed(train_step, *r.step_args(batch, jax.random.key(u)))
        step_seconds.append(seconds)
        metrics.append({k: float(v) for k, v in m.items()})
        part.add(train_step=measured("train step", step_seconds, step_info),
                 rescore=measured("rescore", rescore_seconds, rescore_info), updates=metrics,
                 peak_memory_bytes=peak_memory(devices[0]))
    ratio["on_policy_update"] = {k: metrics[0][k] for k in
                                 ("ratio_min", "ratio_max", "clipfrac", "approx_kl")}
    ratio["later_updates"] = [{k: m[k] for k in ("ratio_min", "ratio_max", "clipfrac")}
                              for m in metrics[1:]]
    ratio["exact"] = (ratio["rescore_repeat_max_abs_log_ratio"] == 0
                      and ratio["on_policy_update"] == {"ratio_min": 1.0, "ratio_max": 1.0,
                                                        "clipfrac": 0.0, "approx_kl": 0.0})
    part.add(ratio=ratio, finite=all(m["skipped_nonfinite"] == 0 for m in metrics))


def _ratio_spread(log_ratio, clip_range: float) -> dict:
    ratio = np.exp(np.asarray(log_ratio, np.float64))
    return {"max_abs_log_ratio": float(np.max(np.abs(np.log(ratio)))),
            "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
            "beyond_clip_fraction": float(np.mean(np.abs(ratio - 1) > clip_range)),
            "clip_range": clip_range}


def run_bench(size: str, part: Part, *, repeats: int) -> None:
    import bench  # sets XLA_PYTHON_CLIENT_PREALLOCATE=false before JAX takes the device

    config = bench.CONFIGS[SIZES[size][1]]()
    result, _ = bench.run_bench(config, repeats=repeats, warmup=1, attention="auto",
                                remat="none", threads=machine.cpu_count())
    median = result["median_s"]
    part.add(**result, images_per_s={side: round(config.batch / median[f"{side}_rollout"], 3)
                                     for side in ("jax", "torch")})


def run_plan(size: str, part: Part) -> None:
    devices = jax.devices()
    lines = []

    def log_line(*args, end="\n", **_):
        log(*args, end=end, flush=True)
        lines.append(" ".join(map(str, args)) + end)
        part.add(log="".join(lines))  # what was compiled so far, should the section be stopped

    plan = planner.plan(shipped_config(size), devices, devices[0].device_kind, search=False,
                        log=log_line)
    part.add(**planner.plan_json(plan), table=planner.format_plan(plan))


def environment() -> dict:
    import flax
    import jaxlib

    device = jax.devices()[0]
    return {"device": device.device_kind, "platform": device.platform,
            "devices": jax.device_count(), "cpu": machine.cpu_model(), "cpus": machine.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__}


# ----------------------------------------------------------------------------- the parent


def run_sections(args) -> dict:
    """Each section in a child process within its share of the budget; the merged results."""
    result = {"command": " ".join(["python tools/gpu_check.py", *args.argv]), "config": args.config,
              "budget_s": args.budget_s, "sections": {}}
    shares = [SHARES[name] for name in args.sections]
    started = time.perf_counter()
    for i, name in enumerate(args.sections):
        deadline = args.budget_s * sum(shares[:i + 1]) / sum(shares)
        left = deadline - (time.perf_counter() - started)
        part_path = f"{args.out}.{name}.json"
        with contextlib.suppress(FileNotFoundError):
            os.remove(part_path)
        if left < 1:
            result["sections"][name] = {"status": "skipped: the budget was spent"}
            continue
        log(f"-- {name} (at most {left:.0f} s)", flush=True)
        command = [sys.executable, os.path.abspath(__file__), *args.argv, "--section", name,
                   "--part", part_path]
        section_started = time.perf_counter()
        try:
            done = subprocess.run(command, timeout=left, stdout=subprocess.PIPE, text=True)
            status = "ok" if done.returncode == 0 else f"failed: {done.stdout.strip()[-2000:]}"
        except subprocess.TimeoutExpired:
            status = f"stopped at its share of the budget ({left:.0f} s)"
        section = {"status": status, "seconds": round(time.perf_counter() - section_started, 1)}
        if os.path.exists(part_path):
            with open(part_path) as f:
                section.update(json.load(f))
            os.remove(part_path)
        environment_seen = section.pop("environment", None)
        result["environment"] = result.get("environment") or environment_seen
        result["sections"][name] = section
        write_json(args.out, result)
    return result


def write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def _fmt_run(r: dict) -> str:
    text = (f"{r['images_per_s']:.3g} images/s ({r['median_s']:.3g} s a call of {r['images']}), "
            f"{r['achieved_flops_per_s'] / 1e12:.3g} TFLOP/s of the planner's "
            f"{r['planned_flops'] / 1e12:.4g} TFLOP a call")
    if r["mfu"] is not None:
        text += f", MFU {100 * r['mfu']:.1f}%"
    if r["roofline_s"]:
        text += (f" (planner's roofline: {r['roofline_s']:.3g} s a call, "
                 f"MFU {100 * r['roofline_mfu']:.1f}%)")
    return text


def table(result: dict) -> str:
    """One row per measurement: section, what, value."""
    rows = []
    sections = result["sections"]
    for name, section in sections.items():
        rows.append((name, "status", f"{section['status']} ({section.get('seconds', 0)} s)"))
    p = sections.get("programs", {})
    for program in ("rollout", "rescore", "train_step"):
        if "images_per_s" in p.get(program, {}):
            rows.append(("programs", program.replace("_", " "), _fmt_run(p[program])))
    if p.get("peak_memory_bytes"):
        rows.append(("programs", "peak device memory", f"{p['peak_memory_bytes'] / 2**30:.2f} GiB"))
    ratio = p.get("ratio", {})
    if "on_policy_update" in ratio:
        o = ratio["on_policy_update"]
        rows.append(("programs", "on-policy update, exact ratios",
                     f"ratio [{o['ratio_min']:.7g}, {o['ratio_max']:.7g}], clipfrac "
                     f"{o['clipfrac']:.3g} ({'exact' if ratio['exact'] else 'NOT EXACT'})"))
    if "rescore_repeat_max_abs_log_ratio" in ratio:
        rows.append(("programs", "rescore twice, same params",
                     f"max |log-ratio| {ratio['rescore_repeat_max_abs_log_ratio']:.3g}"))
        r = ratio["rollout_vs_rescore"]
        rows.append(("programs", "rollout's log-probs vs rescore's",
                     f"ratio [{r['ratio_min']:.7g}, {r['ratio_max']:.7g}], "
                     f"{100 * r['beyond_clip_fraction']:.1f}% beyond clip {r['clip_range']:g}"))
    for u, later in enumerate(ratio.get("later_updates", []), start=2):
        rows.append(("programs", f"update {u}, exact ratios",
                     f"ratio [{later['ratio_min']:.7g}, {later['ratio_max']:.7g}], clipfrac "
                     f"{later['clipfrac']:.3g}"))
    b = sections.get("bench", {})
    if "median_s" in b:
        m, ratios = b["median_s"], b["ratio_torch_over_jax"]
        rows.append(("bench", f"rollout, batch {b['config']['batch']}",
                     f"jax {b['images_per_s']['jax']:.3g} images/s, torch "
                     f"{b['images_per_s']['torch']:.3g} (torch/jax {ratios['rollout']:.2f}x)"))
        rows.append(("bench", "loss step", f"jax {m['jax_loss_step']:.4g} s, torch "
                     f"{m['torch_loss_step']:.4g} s (torch/jax {ratios['loss_step']:.2f}x)"))
    for program in sections.get("plan", {}).get("programs", []):
        total = sum(program[k] for k in ("arguments", "temporaries", "outputs", "resident_other"))
        rows.append(("plan", f"{program['name']}, {program['per_chip']} per chip",
                     program["error"] or f"{total / 2**30:.2f} of {program['memory'] / 2**30:.2f} "
                     f"GiB, {'fits' if program['fits'] else 'does not fit'}, "
                     f"{program['flops'] / 1e12:.4g} TFLOP"))
    width = max(len(what) for _, what, _ in rows)
    env = result.get("environment") or {}
    head = (f"{env.get('device', '?')} x{env.get('devices', '?')} ({env.get('platform', '?')}), "
            f"{env.get('cpu', '?')}; jax {env.get('jax', '?')}; config {result['config']}")
    return "\n".join([head] + [f"{name:<9} {what:<{width}}  {value}" for name, what, value in rows])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(SIZES), default="sd35m")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON to write")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, run in this order, of {', '.join(SECTIONS)}")
    parser.add_argument("--budget_s", type=float, default=420.0,
                        help="seconds for all sections together")
    parser.add_argument("--train_steps", type=int, default=2, help="timed updates (>= 2)")
    parser.add_argument("--micro_batch", type=int, default=None,
                        help="the programs section's micro batch (default: the config's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per bench measurement")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the chip's dense peak in the model's dtype, for MFU (default: "
                             "flowgrpo_jax/roofline.py's for a known chip; none on a CPU)")
    parser.add_argument("--compilation_cache", default="",
                        help="folder of the compilation cache (default: compile_cache.py's)")
    parser.add_argument("--no_compilation_cache", action="store_true")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # a child's
    parser.add_argument("--part", help=argparse.SUPPRESS)  # the child's JSON
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # handed on to the sections
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        parser.error(f"--sections: unknown {unknown}; known: {', '.join(SECTIONS)}")
    if args.train_steps < 2 or args.repeats < 1 or args.budget_s <= 0 or (
            args.micro_batch is not None and args.micro_batch < 1):
        parser.error("--train_steps must be >= 2, --repeats and --micro_batch >= 1, "
                     "--budget_s > 0")
    return args


def run_section(args) -> int:
    """A child: one section into its part file, the device and versions after it (the parent
    never takes the device); its error in one line on stdout, the traceback on stderr."""
    part = Part(args.part)
    try:
        if args.section == "programs":
            run_programs(args.config, part, micro_batch=args.micro_batch,
                         train_steps=args.train_steps,
                         peak_flops=args.peak_tflops and args.peak_tflops * 1e12)
        elif args.section == "bench":
            run_bench(args.config, part, repeats=args.repeats)
        else:
            run_plan(args.config, part)
        return 0
    except Exception as e:  # reported in the JSON
        traceback.print_exc()
        print(f"{type(e).__name__}: {' '.join(str(e).split())[:1500]}", flush=True)
        return 1
    finally:
        part.add(environment=environment())


def main(argv=None) -> int:
    args = parse_args(argv)
    compile_cache.setup(not args.no_compilation_cache, args.compilation_cache)
    if args.section:
        return run_section(args)
    result = run_sections(args)
    print(table(result), flush=True)
    return 0 if all(s["status"] == "ok" for s in result["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
