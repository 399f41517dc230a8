"""The memory planner's library: a training run's programs compiled, never run, for a TPU slice
(compile-only devices from libtpu) or this host's devices, with what each needs per chip.

`RunPlan` builds the run as the trainer does (the same programs, `programs.py`) from an abstract
generator (shapes only, no weights), with abstract inputs placed on the mesh; `plan` compiles
each program at the config's sizes, counts its FLOPs and memory traffic from the compiled HLO
(`hlo_cost.py`), gives its roofline time on the chip (`roofline.py`) and an epoch's, and
searches the largest micro batch and rollout chunk per chip that fit. `python -m
flowgrpo_jax.plan` is its command line.
"""
import dataclasses
import math
import os
import re
import time

import jax
import jax.numpy as jnp

from flowgrpo_jax import config as config_lib
from flowgrpo_jax import hlo_cost, machine, parallel, roofline
from flowgrpo_jax import programs as programs_lib
from flowgrpo_jax import update as up
from flowgrpo_jax.programs import OnMesh, build_run, rescores
from flowgrpo_jax.sampling.rollout import STEP_RECORDS

# libtpu takes a host-wide lock when it loads; compiling needs no TPU, so let it load beside
# another JAX process of this host (a test run, a second planner). Read when libtpu loads.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GiB = 2 ** 30
# HBM per device of the TPU generations (v4 and v5p as megacores, as JAX sees them) that the TPU
# compiler reports available to a program (v5e: 15.75 of its 16 GiB).
TPU_MEMORY = {"TPU v4": 30.75 * GiB, "TPU v5 lite": 15.75 * GiB, "TPU v5": 95.74 * GiB,
              "TPU v6 lite": 31.25 * GiB}
# Single-host slices: libtpu's default splits an 8-chip v5e / v6e slice over two hosts.
_SINGLE_HOST = {"v5e:2x4": (2, 4, 1), "v6e:2x4": (2, 4, 1)}
_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory|exceeds? .*memory")
# "the total memory required for HLO temporaries (28.81G) exceeds available HBM (15.75G)"
_NEEDED = re.compile(r"required for ([\w ]+?) \(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)")


class PlanError(ValueError):
    """A topology or config the planner cannot plan; the message says what to change."""


def tpu_devices(topology: str) -> list:
    """Compile-only devices of a TPU slice (jax.experimental.topologies)."""
    from jax.experimental import topologies

    options = {}
    if topology.startswith("v4:"):
        options["chip_config_name"] = "megacore"  # one device per chip, as on a v4 VM
    if topology in _SINGLE_HOST:
        options["chips_per_host_bounds"] = _SINGLE_HOST[topology]
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology, **options).devices
    except Exception as e:  # libtpu raises several types for unknown names or a missing wheel
        raise PlanError(f"cannot compile for TPU topology {topology!r} ({str(e).splitlines()[0]}); "
                        f"names look like v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4, and libtpu must be "
                        f"installed (pip install libtpu)") from None


def chip_memory(device) -> int:
    """Bytes one device can hold: the runtime's limit where there is a runtime (a GPU, or a CPU
    host's memory shared by its devices), else the TPU generation's HBM."""
    if device.device_kind in TPU_MEMORY:
        return int(TPU_MEMORY[device.device_kind])
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        raise PlanError(f"memory of a {device.device_kind!r} device is unknown to the planner")
    return int(stats["bytes_limit"])


def _per_device_bytes(tree) -> int:
    """Bytes of `tree` (arrays or ShapeDtypeStructs with shardings) held by one device."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * getattr(leaf.dtype, "itemsize", 8)
    return total


def _batched(shapes, lead: tuple, sharding):
    """ShapeDtypeStructs of per-sample `shapes` with leading dims `lead` ((members,) samples)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct((*lead, *s.shape), s.dtype, sharding=sharding), shapes)


@dataclasses.dataclass
class Compiled:
    """One program compiled for one batch size, per chip."""

    name: str
    per_chip: int  # samples per chip
    fits: bool
    arguments: int = 0
    temporaries: int = 0
    outputs: int = 0  # not aliased to a donated argument
    resident_other: int = 0  # what the run keeps on the chip beside this program's arguments
    flops: float = 0.0  # hardware FLOPs of one call (hlo_cost.Cost.hardware_flops)
    kernel_flops: float = 0.0  # of them, the custom kernels' (the TPU attention)
    model_flops: float = 0.0  # the hardware FLOPs without the rematerialisation's recompute
    xla_flops: float = 0.0  # XLA's cost_analysis(): each loop body once, no custom kernel
    bytes: float = 0.0  # memory traffic of one call
    unknown_kernels: tuple = ()  # custom calls whose FLOPs are not counted
    roofline_seconds: float = 0.0  # of one call on the chip (0: a chip without known peaks)
    mfu: float = 0.0  # model-FLOPs utilisation at the roofline time
    seconds: float = 0.0  # compiling it
    error: str = ""
    hlo: str = dataclasses.field(default="", repr=False)  # the compiled program, when kept
    memory: int = 0  # the chip's

    @property
    def total(self) -> int:
        return self.resident_other + self.arguments + self.temporaries + self.outputs


class RunPlan:
    """A training run's programs and their abstract inputs on a mesh of (compile-only) devices."""

    def __init__(self, config, devices, log=print, memory: int | None = None):
        self.config, self.log = config, log
        processes = len({d.process_index for d in devices})
        config_lib.validate(config, len(devices), processes)
        self.devices = len(devices)
        self.memory = memory or chip_memory(devices[0])
        self.chip = roofline.chip_for(devices[0].device_kind)
        self.run = run = build_run(config, devices, abstract=True)
        self.mesh, self.generator, self.programs = run.mesh, run.generator, run.programs
        self.state, self.frozen, self.reference = run.state, run.frozen, run.reference
        # a population's batches, keys and flags carry a leading member axis
        self.population = run.programs.population
        self.lanes = len(run.members) if self.population else 1
        self.lead = (self.lanes,) if self.population else ()
        self.batch = programs_lib.batch_sharding(self.mesh, self.population)
        self.replicated = parallel.replicated(self.mesh)
        self.each = parallel.stacked(self.replicated, self.mesh) if self.population else self.replicated
        self.uncond = (self._encoded(_batched(self.generator.token_shapes, (1,), self.replicated),
                                     self.programs.encode_replicated, self.replicated)
                       if config.sample.guidance_scale != 1.0 else None)
        self.weights = _per_device_bytes((self.state, self.frozen, self.reference, run.encoder,
                                          run.decoder, self.uncond))
        self.epoch = config_lib.sizes(config)["epoch"]
        self.records = tuple(r for r in run.objective.records if r in STEP_RECORDS)

    def per_chip(self, size: int) -> int:
        """Samples per chip of a batch of `size` samples (each member's, in a population)."""
        return size * self.lanes // self.devices

    def _tokens(self, size):
        return _batched(self.generator.token_shapes, (*self.lead, size), self.batch)

    def _encoded(self, tokens, program, sharding):
        out = jax.eval_shape(program.jitted, self.run.encoder, tokens)
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), out)

    def _text(self, size):
        return self._encoded(self._tokens(size), self.programs.encode, self.batch)

    def _latents(self, size, *steps):
        shape = (*self.lead, size, *steps, *self.generator.latent_shape)
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self.batch)

    def _per_sample(self, size, dtype=jnp.float32, *rest):
        return jax.ShapeDtypeStruct((*self.lead, size, *rest), dtype, sharding=self.batch)

    def _key(self):
        key = jax.eval_shape(lambda: jax.random.key(0))
        return jax.ShapeDtypeStruct(self.lead, key.dtype, sharding=self.each)

    def epoch_data(self, size: int, *, log_ratios: bool = False):
        """The epoch's stored rollouts of `size` samples as the update takes them: the
        objective's records (their shapes from the rollout program itself), the text, the
        sample ids and targets, and with `log_ratios` the exact ones of train.exact_ratio."""
        program, args = self._rollout(size)
        out = jax.eval_shape(program.jitted, *args)
        per_sample = lambda name: getattr(out, name).shape[len(self.lead) + 1:]
        data = {name: self._per_sample(size, getattr(out, name).dtype, *per_sample(name))
                for name in self.run.objective.records}
        data.update(text=self._text(size), ids=self._per_sample(size, jnp.int32),
                    targets=self._per_sample(size))
        if log_ratios:
            data["log_ratios"] = self._per_sample(size, jnp.float32, self.run.settings.num_terms)
        return data

    # ---- the programs, as (jitted, args, bytes of the args the run keeps, resident others)

    def _sampling_resident(self, chunk_size):
        """Held while a chunk samples: the weights and the epoch's earlier chunks (none when
        the epoch is one chunk)."""
        earlier = self.epoch - chunk_size
        return self.weights + (_per_device_bytes(self.epoch_data(earlier)) if earlier else 0)

    def encode(self, size):
        return (self.programs.encode, (self.run.encoder, self._tokens(size)),
                _per_device_bytes(self.run.encoder), self._sampling_resident(size))

    def _rollout(self, size, *, eval_: bool = False):
        s, run = self.config.sample, self.run
        steps = s.eval_num_steps if eval_ else s.num_steps
        program = (self.programs.rollout("ode", None, ()) if eval_ else
                   self.programs.rollout(s.kind, run.window, self.records))
        sigmas = jax.ShapeDtypeStruct((steps + 1,), jnp.float32, sharding=self.replicated)
        params = (self.state.ema_params if eval_ else
                  run.objective.sampling_params(self.state.params, self.state.extra))
        hyper = self.state.hyper
        args = ((params, self.frozen), self._latents(size), self._text(size), sigmas, self._key(),
                hyper["noise_level"], hyper["guidance_scale"], self.uncond)
        return program, args

    def rollout(self, size, *, eval_: bool = False):
        program, args = self._rollout(size, eval_=eval_)
        kept = _per_device_bytes((args[0], self.uncond))
        resident = self.weights if eval_ else self._sampling_resident(size)
        return program, args, kept, resident

    def decode(self, size, *, eval_: bool = False):
        resident = self.weights if eval_ else self._sampling_resident(size)
        return (self.programs.decode, (self.run.decoder, self._latents(size)),
                _per_device_bytes(self.run.decoder), resident)

    def train(self, micro_size):
        run = self.run
        settings = dataclasses.replace(run.settings, micro_batch_size=micro_size)
        step = self.programs.train_step if micro_size == run.settings.micro_batch_size else OnMesh(
            up.make_train_step(run.objective, self.programs.velocity, run.optimizer, settings,
                               self.mesh, state=run.member_state, frozen=self.frozen,
                               reference=self.reference, population=self.population), self.mesh)
        update = config_lib.sizes(self.config)["update"]
        batch = self.epoch_data(update, log_ratios=bool(self.programs.rescore is not None
                                                        and self.config.train.exact_ratio))
        args = (self.state, self.frozen, self.reference, batch, self.uncond, self._key())
        if self.population:  # which members update
            args += (jax.ShapeDtypeStruct(self.lead, jnp.bool_, sharding=self.each),)
        kept = _per_device_bytes((self.state, self.frozen, self.reference, self.uncond))
        resident = self.weights + _per_device_bytes(self.epoch_data(self.epoch))
        return step, args, kept, resident

    def rescore(self):
        """The forward-only rescoring of one update's samples (exact ratios, update.py)."""
        update = config_lib.sizes(self.config)["update"]
        args = (self.state.params, self.frozen, self.state.hyper, self.epoch_data(update),
                self.uncond)
        kept = _per_device_bytes((self.state.params, self.frozen, self.uncond))
        resident = self.weights + _per_device_bytes(self.epoch_data(self.epoch))
        return self.programs.rescore, args, kept, resident

    def sampling_phase(self, chunk_size: int) -> Compiled:
        """Encode, rollout and decode of one chunk, compiled; the largest total of the three
        (the first that does not fit, if one does not)."""
        per_chip = self.per_chip(chunk_size)
        results = []
        for name, program in (("encode", self.encode), ("rollout", self.rollout),
                              ("decode", self.decode)):
            results.append(self.compile(name, per_chip, program(chunk_size)))
            if not results[-1].fits:
                return results[-1]
        return max(results, key=lambda r: r.total)

    def compile(self, name: str, per_chip: int, program, keep_hlo: bool = False) -> Compiled:
        jitted, args, kept, resident = program
        self.log(f"  compiling {name}, {per_chip} per chip ...", end="", flush=True)
        started = time.perf_counter()
        try:
            compiled = jitted.lower(*args).compile()
        except Exception as e:  # the compiler's out-of-memory refusal, or a real bug
            if not _OOM.search(str(e)):
                raise
            result = Compiled(name, per_chip, False, resident_other=resident - kept,
                              seconds=time.perf_counter() - started, error=_oom_summary(str(e)),
                              memory=self.memory)
        else:
            m = compiled.memory_analysis()
            hlo = compiled.as_text()
            cost = hlo_cost.program_cost(hlo)
            result = Compiled(
                name, per_chip, True, arguments=m.argument_size_in_bytes,
                temporaries=m.temp_size_in_bytes,
                outputs=m.output_size_in_bytes - m.alias_size_in_bytes,
                resident_other=max(resident - kept, 0), flops=cost.hardware_flops,
                kernel_flops=cost.kernel_flops, model_flops=cost.model_flops,
                xla_flops=float((compiled.cost_analysis() or {}).get("flops", 0.0)),
                bytes=cost.bytes,
                unknown_kernels=cost.unknown_kernels,
                seconds=time.perf_counter() - started, hlo=hlo if keep_hlo else "",
                memory=self.memory)
            result.fits = result.total <= self.memory
            if self.chip is not None:
                result.roofline_seconds = roofline.seconds(cost.hardware_flops, cost.bytes, self.chip)
                if result.roofline_seconds > 0:
                    result.mfu = roofline.utilisation(cost.model_flops, result.roofline_seconds,
                                                      self.chip)
        self.log(f" {result.seconds:.0f} s (host peak so far {machine.host_peak_bytes() / 1e9:.2f} GB): "
                 f"{_describe(result, self.memory)}", flush=True)
        return result


def _oom_summary(message: str) -> str:
    needed = _NEEDED.search(message)
    if needed:
        return f"compiler: {needed.group(1)} need {needed.group(2)} of {needed.group(3)}"
    return "compiler: out of memory"


def _describe(result: Compiled, memory: int) -> str:
    if result.error:
        return f"does not fit ({result.error})"
    verdict = "fits" if result.fits else "does not fit"
    return f"{result.total / GiB:.2f} of {memory / GiB:.2f} GiB, {verdict}"


def _candidates(total: int, devices: int) -> list[int]:
    """Batch sizes that divide `total` and split evenly over `devices` (a run's, or one
    population member's group of devices)."""
    return [n for n in range(devices, total + 1, devices) if total % n == 0]


def largest_fitting(candidates: list[int], measure, start: int) -> int | None:
    """The largest candidate that fits, or None when not even the smallest does.

    measure(candidate) -> Compiled. Memory grows with the batch, so the
    search keeps an interval [largest known to fit, smallest known not to] and probes inside
    it: first `start`, then where the line through the measured totals meets the chip's memory
    (a compile takes minutes at full size, and the totals grow nearly linearly), bisecting when
    there is no line yet.
    """
    lo, hi = -1, len(candidates)  # indices: candidates[lo] fits, candidates[hi] does not
    measured = {}  # candidate -> total bytes, of compiles that gave one
    probe = candidates.index(start) if start in candidates else len(candidates) // 2
    while hi - lo > 1:
        result = measure(candidates[probe])
        if not result.error:
            measured[candidates[probe]] = result.total
        if result.fits:
            lo = probe
        else:
            hi = probe
        probe = _next_probe(candidates, lo, hi, measured, result.memory)
    return candidates[lo] if lo >= 0 else None


def _next_probe(candidates, lo, hi, measured, memory) -> int:
    middle = (lo + hi) // 2
    if len(measured) < 2 or hi - lo <= 2:
        return middle
    (b0, m0), (b1, m1) = sorted(measured.items())[-2:]
    if m1 <= m0:
        return middle
    limit = b1 + (memory - m1) * (b1 - b0) / (m1 - m0)  # the batch the line puts at `memory`
    inside = [i for i in range(lo + 1, hi) if candidates[i] <= limit] or [lo + 1]
    return inside[-1]


@dataclasses.dataclass
class Epoch:
    """An epoch's roofline time from the programs it calls (evaluation left out)."""

    images: int  # sampled and trained on, all members'
    calls: dict  # program name -> calls an epoch
    seconds: float  # at the roofline, of the planned programs among `calls`
    missing: list  # programs of the epoch that were not planned (their time is not counted)
    images_per_second_per_chip: float | None  # None unless every program was planned
    mfu: float | None  # the epoch's model FLOPs over seconds x the chip's peak; the same


@dataclasses.dataclass
class Plan:
    topology: str
    devices: int
    chip_memory: int
    programs: list
    largest_micro_batch_per_chip: int | None = None
    largest_sample_batch_per_chip: int | None = None
    members: int = 1  # a population's members (their batches side by side on the chips)
    chip: roofline.Chip | None = None  # the chip's public peaks; None: no roofline
    epoch: Epoch | None = None

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)


def calls_per_epoch(config, objective) -> dict:
    """How often a run calls each program in an epoch: per rollout chunk its prompts' encoding,
    the rollout and the decoding; each update; and with exact ratios over U updates 2 (U - 1)
    rescores (update.py). Evaluation runs every eval_every epochs and is left out."""
    chunks, updates = config_lib.sizes(config)["chunks"], config.train.updates_per_epoch
    calls = {"encode": chunks, "rollout": chunks, "decode": chunks, "train step": updates}
    if rescores(config, objective):
        calls["rescore"] = 2 * (updates - 1)
    return calls


def epoch_roofline(programs: list, calls: dict, images: int, devices: int,
                   chip: roofline.Chip) -> Epoch | None:
    """The epoch at its programs' roofline times (each program's first, as planned), or None
    when none of its programs was planned; images/s and MFU only when all of them were."""
    planned = {}
    for p in programs:
        if p.name in calls and p.name not in planned and not p.error:
            planned[p.name] = p
    if not planned:
        return None
    seconds = sum(calls[name] * p.roofline_seconds for name, p in planned.items())
    model_flops = sum(calls[name] * p.model_flops for name, p in planned.items())
    missing = [name for name in calls if name not in planned]
    if missing:
        return Epoch(images, calls, seconds, missing, None, None)
    return Epoch(images, calls, seconds, missing, images / seconds / devices,
                 roofline.utilisation(model_flops, seconds, chip))


# The programs of a run, in the order a run compiles them ("rescore" only with exact ratios
# over several updates an epoch, programs.rescores).
PROGRAMS = ("encode", "rollout", "decode", "rescore", "train step", "eval rollout", "eval decode")


def plan(config, devices, topology: str, *, search: bool = True, memory: int | None = None,
         programs: tuple = PROGRAMS, log=print) -> Plan:
    """Compiles the run's `programs` at the config's sizes, then (search) the largest micro
    batch per chip that fits (when the train step is planned) and the largest rollout chunk
    (when the rollout is); `memory` (bytes per device) replaces the chip's."""
    unknown = set(programs) - set(PROGRAMS)
    if unknown or not programs:
        raise PlanError(f"unknown programs {sorted(unknown)}; known: {', '.join(PROGRAMS)}")
    run = RunPlan(config, devices, log, memory)
    s, t, n = config.sample, config.train, run.devices
    members = f", {run.lanes} members" if run.population else ""
    log(f"{topology}: {n} devices of {run.memory / GiB:.2f} GiB{members}; weights and train "
        f"state {run.weights / GiB:.2f} GiB per device")
    chunk, micro, eval_chunk = map(run.per_chip, (s.batch_size, t.micro_batch_size,
                                                  s.eval_batch_size))
    builders = {
        "encode": (chunk, lambda: run.encode(s.batch_size)),
        "rollout": (chunk, lambda: run.rollout(s.batch_size)),
        "decode": (chunk, lambda: run.decode(s.batch_size)),
        "rescore": (micro, run.rescore),
        "train step": (micro, lambda: run.train(t.micro_batch_size)),
        "eval rollout": (eval_chunk, lambda: run.rollout(s.eval_batch_size, eval_=True)),
        "eval decode": (eval_chunk, lambda: run.decode(s.eval_batch_size, eval_=True)),
    }
    compiled = [run.compile(name, builders[name][0], builders[name][1]())
                for name in PROGRAMS
                if name in programs and (name != "rescore" or rescores(config, run.run.objective))]
    result = Plan(topology, n, run.memory, compiled, members=run.lanes, chip=run.chip)
    if run.chip is not None:
        result.epoch = epoch_roofline(compiled, calls_per_epoch(config, run.run.objective),
                                      run.epoch * run.lanes, n, run.chip)
    if not search:
        return result
    group = n // config.mesh.population  # the devices a member's batch is split over
    per_chip = lambda size: None if size is None else run.per_chip(size)
    if "train step" in programs:
        log("searching the largest micro batch per chip that fits")
        update = config_lib.sizes(config)["update"]
        result.largest_micro_batch_per_chip = per_chip(largest_fitting(
            _candidates(update, group),
            lambda m: run.compile("train step", run.per_chip(m), run.train(m)), t.micro_batch_size))
    if "rollout" in programs:
        log("searching the largest rollout chunk per chip that fits")
        result.largest_sample_batch_per_chip = per_chip(largest_fitting(
            _candidates(run.epoch, group), run.sampling_phase, s.batch_size))
    return result


def format_plan(result: Plan) -> str:
    header = (f"{'program':<13} {'per chip':>8} {'args':>8} {'temps':>8} {'outputs':>8} "
              f"{'others':>8} {'total':>8}  {'of':>6}  {'TFLOP':>8} {'GB moved':>8} "
              f"{'roofline s':>10} {'MFU':>5}  fits")
    lines = [header]
    for p in result.programs:
        gib = lambda b: f"{b / GiB:8.2f}"
        if p.error:
            lines.append(f"{p.name:<13} {p.per_chip:>8} {'':>8} {'':>8} {'':>8} "
                         f"{gib(p.resident_other)} {'':>8}  {result.chip_memory / GiB:6.2f}  "
                         f"{'':>8} {'':>8} {'':>10} {'':>5}  no ({p.error})")
            continue
        time = (f"{p.roofline_seconds:10.3f} {p.mfu:5.0%}" if result.chip else f"{'':>10} {'':>5}")
        lines.append(f"{p.name:<13} {p.per_chip:>8} {gib(p.arguments)} {gib(p.temporaries)} "
                     f"{gib(p.outputs)} {gib(p.resident_other)} {gib(p.total)}  "
                     f"{result.chip_memory / GiB:6.2f}  {p.flops / 1e12:8.1f} "
                     f"{p.bytes / 1e9:8.1f} {time}  {'yes' if p.fits else 'no'}")
    lines += _roofline_lines(result)
    for what, value in (("micro batch", result.largest_micro_batch_per_chip),
                        ("rollout chunk", result.largest_sample_batch_per_chip)):
        if value is not None:
            lines.append(f"largest {what} per chip that fits: {value} "
                         f"({global_size(result, value)} global{' a member' * (result.members > 1)})")
    return "\n".join(lines)


def _roofline_lines(result: Plan) -> list[str]:
    if result.chip is None:
        return [f"roofline: no peak FLOP/s and bandwidth known for {result.topology!r} "
                f"(roofline.CHIPS), no times"]
    chip = result.chip
    lines = [f"roofline on {chip.name} ({chip.flops / 1e12:.0f} TFLOP/s bf16, "
             f"{chip.bandwidth / 1e9:.0f} GB/s): a call's time is the longer of its FLOPs at peak "
             f"and its bytes at the bandwidth; MFU counts model FLOPs (no remat recompute)"]
    unknown = sorted({k for p in result.programs for k in p.unknown_kernels})
    if unknown:
        lines.append(f"FLOPs of custom calls not counted: {', '.join(unknown)}")
    epoch = result.epoch
    if epoch is not None:
        calls = ", ".join(f"{n} x {name}" for name, n in epoch.calls.items())
        about = f"an epoch ({epoch.images} images: {calls}; evaluation not included)"
        if epoch.missing:
            lines.append(f"{about}: its planned programs take {epoch.seconds:.1f} s at the "
                         f"roofline; not planned: {', '.join(epoch.missing)} (plan them for "
                         f"the epoch's images/s and MFU)")
        else:
            lines.append(f"{about}: {epoch.seconds:.1f} s at the roofline, "
                         f"{epoch.images_per_second_per_chip:.3g} images/s a chip, "
                         f"MFU {epoch.mfu:.0%}")
    return lines


def global_size(result: Plan, per_chip: int) -> int:
    """The config's batch size (a member's, in a population) that puts `per_chip` on a chip."""
    return per_chip * result.devices // result.members


def plan_json(result: Plan) -> dict:
    out = dataclasses.asdict(result)
    for program in out["programs"]:
        program.pop("hlo")
    return {**out, "fits": result.fits}


def advice(result: Plan, config) -> str:
    """What to change when a program does not fit, in config keys."""
    n, tips = result.devices, []
    failing = {p.name for p in result.programs if not p.fits}
    per_chip = {p.name: p.per_chip for p in result.programs}
    if "train step" in failing:
        if result.largest_micro_batch_per_chip:
            tips.append(f"--config.train.micro_batch_size="
                        f"{global_size(result, result.largest_micro_batch_per_chip)}")
        elif per_chip["train step"] > 1:
            tips.append(f"a smaller --config.train.micro_batch_size, e.g. "
                        f"{global_size(result, per_chip['train step'] // 2)} (the search finds "
                        f"the largest)")
        if config.train.remat != "block":
            tips.append("--config.train.remat=block")
    if failing & {"encode", "rollout", "decode"} and result.largest_sample_batch_per_chip:
        tips.append(f"--config.sample.batch_size="
                    f"{global_size(result, result.largest_sample_batch_per_chip)}")
    if failing & {"eval rollout", "eval decode"}:
        tips.append("a smaller --config.sample.eval_batch_size")
    if config.model.get("attention", "auto") != "auto":
        tips.append("--config.model.attention=auto")
    if parallel.mesh_shape(config.mesh.data, config.mesh.fsdp, n)[1] < n:
        tips.append(f"--config.mesh.fsdp={n} (shards the model's weights and optimizer state)")
    tips = tips or ["more chips, or chips with more memory"]
    return (f"does not fit: {', '.join(sorted(failing))} over {result.chip_memory / GiB:.2f} GiB "
            f"per chip; try " + ", ".join(tips))
