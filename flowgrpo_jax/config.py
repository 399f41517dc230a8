"""The training config: every key with its default, and the checks a config must pass.

Config files (`configs/*.py`) start from `defaults()` and change what their run needs; the
trainer calls `validate(config, num_devices, num_processes)` before building anything, so a
wrong value stops the run at once with an error naming the key and saying what to change.

Batch sizes are GLOBAL (over all devices and processes): one epoch samples
`sample.groups_per_epoch` prompts x `sample.group_size` images, in rollout chunks of
`sample.batch_size` images; it is split into `train.updates_per_epoch` optimizer updates, each
accumulating gradients over micro-batches of `train.micro_batch_size` images. Any device count
works as long as it divides the chunk and micro-batch sizes.
"""
import importlib.util
import math
import os

import ml_collections

from flowgrpo_jax import families, objectives
from flowgrpo_jax.convert import hub
from flowgrpo_jax.remat import POLICIES as REMAT_POLICIES
from flowgrpo_jax.rewards.registry import options_in_use, parse_weights
from flowgrpo_jax.sampling.rollout import SAMPLERS


class ConfigError(ValueError):
    """A config key holds a value the trainer cannot use; the message names the key."""


PROMPT_FORMATS = ("geneval", "text")
LR_SCHEDULES = ("constant", "cosine")


def defaults() -> ml_collections.ConfigDict:
    """Flow-GRPO's SD3.5-Medium defaults (docs/design.md section 10), with global batch sizes."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_epochs = 100
    c.eval_every = 10  # epochs; 0 = never
    c.save_every = 10  # epochs; a checkpoint is also written at the end and on SIGTERM
    c.log_every = 1  # epochs between image grids in TensorBoard

    # `family` names a model family (flowgrpo_jax/families/); the rest of the group is the
    # family's own keys, passed as is to its build function.
    c.model = ml_collections.ConfigDict({"family": ""})

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = True  # False: full fine-tuning
    c.lora.rank = 32
    c.lora.alpha = 64.0
    c.lora.targets = ()  # regexes on dotted module paths; () = the family's own
    # A PyTorch LoRA to start from: a PEFT adapter folder, a diffusers LoRA file (or its
    # folder), or a Hub id in the local cache; its targets, rank and shapes must fit (lora_io.py).
    c.lora.init_from = ""

    c.prompts = ml_collections.ConfigDict()
    c.prompts.format = "geneval"  # "geneval": JSON lines with metadata; "text": one prompt a line
    c.prompts.train_file = ""
    c.prompts.test_file = ""

    c.sample = ml_collections.ConfigDict()
    # The rollout's sampler: "sde" (Flow-GRPO), "cps" (coefficients-preserving), or for
    # objectives without likelihoods also "ode" and "dpm2" (DPM-Solver++(2M), deterministic).
    c.sample.kind = "sde"
    c.sample.noise_level = 0.7
    c.sample.num_steps = 10
    c.sample.eval_num_steps = 40
    c.sample.guidance_scale = 4.5  # 1.0 turns CFG off (in rollouts and training)
    c.sample.group_size = 24  # images per prompt
    c.sample.groups_per_epoch = 48  # prompts per epoch
    c.sample.batch_size = 64  # global images per rollout chunk
    c.sample.eval_batch_size = 64  # global images per eval chunk
    c.sample.num_eval_prompts = 0  # 0 = the whole test file
    c.sample.same_latent = False  # a group shares its initial noise
    c.sample.window_size = 0  # > 0: SDE only in a window of this many steps (Flow-GRPO-Fast)
    c.sample.window_lo = 0  # the window starts uniformly in [window_lo, window_hi - window_size]
    c.sample.window_hi = 0

    c.train = ml_collections.ConfigDict()
    # The RL objective (flowgrpo_jax/objectives/): "grpo" (Flow-GRPO), "grpo_guard", "nft".
    c.train.objective = "grpo"
    c.train.learning_rate = 3e-4
    c.train.lr_schedule = "constant"  # "cosine": from learning_rate down to 0 over num_epochs
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.weight_decay = 1e-4
    c.train.max_grad_norm = 1.0
    c.train.updates_per_epoch = 2
    c.train.micro_batch_size = 32  # global images per forward/backward
    c.train.clip_range = 1e-4
    # The ratios' values from the trainer's own programs (docs/design.md, section 7): exactly 1
    # on an epoch's first update, which is on-policy, and on later ones from one forward-only
    # program run at the sampling and the current params (two forwards a sample of those
    # updates). False: from the rollout's log-probs, free, but they agree with the update's
    # only to float32 rounding: in bfloat16 most ratios of an on-policy update leave the clip.
    c.train.exact_ratio = True
    c.train.beta = 0.04  # KL to the reference (LoRA off)
    c.train.timestep_fraction = 0.99
    c.train.adv_clip_max = 5.0
    c.train.global_std = True  # advantage std over the epoch (False: per group)
    c.train.drop_zero_std_groups = False
    c.train.ema = True  # evaluate and export the EMA of the trained params
    c.train.ema_max_decay = 0.9
    c.train.ema_every = 1  # the EMA steps after every this many updates (the reference: 8)
    # An update whose loss or gradient norm is not finite is skipped (params, optimizer state
    # and EMA unchanged); this many skipped in a row stop the run with an error.
    c.train.max_nonfinite_updates = 3
    # Per-block rematerialisation of the velocity network in the backward pass: "none",
    # "block" (least memory) or "block_save_dots" (flowgrpo_jax/remat.py). SD3.5-M needs "block" to
    # train a micro batch of 2+ images per 16 GB chip (README, "Memory").
    c.train.remat = "block"

    c.reward = ml_collections.ConfigDict()
    c.reward.rewards = "toy_geneval:1.0"  # "name:weight,..." from the reward registry
    c.reward.url = ""  # a running reward server; "" starts a local one per process
    c.reward.token = ""  # the server's shared secret (--token); "" with a local server: a random one
    c.reward.options = ml_collections.ConfigDict()  # {"pickscore": {"model": "/path"}}
    # Options that evaluation scores with instead (merged over `options`), in a local reward
    # process of its own: {"geneval_remote": {"only_strict": 0}} makes eval report GenEval
    # accuracy. With reward.url, evaluation needs a server of its own at eval_url.
    c.reward.eval_options = ml_collections.ConfigDict()
    c.reward.eval_url = ""  # a running reward server for evaluation ("": as described above)
    c.reward.plugins = ()  # modules or .py files registering more rewards
    c.reward.overlap = True  # score chunk i while chunk i+1 samples (False: wait each chunk)

    # DiffusionNFT's own settings (train.objective="nft"; docs/design.md, section 13): the
    # strength of its implicit policies, and the old policy's decay after an epoch of n
    # updates: 0 while n < decay_start, then min((n - decay_start) * decay_rate, decay_max).
    c.nft = ml_collections.ConfigDict()
    c.nft.beta = 1.0
    c.nft.decay_start = 0
    c.nft.decay_rate = 0.001
    c.nft.decay_max = 0.5  # 0: the old policy is the current one (fully on-policy)

    # GRPO-Guard's (train.objective="grpo_guard"; docs/design.md, section 12): True takes the
    # RatioNorm bias as the micro batch's mean, as the reference code does, not per sample.
    c.guard = ml_collections.ConfigDict()
    c.guard.batch_bias = False

    # A population (flowgrpo_jax/population.py): runs of this config differing only in seed
    # or numeric hyperparameters, trained as one program, each member in WORKDIR/<its name>.
    c.population = ml_collections.ConfigDict()
    c.population.seeds = 0  # > 0: members with seeds seed, seed + 1, ...
    c.population.vmap = ""  # "train.learning_rate=1e-4,2e-4 train.beta=0.01,0.04": a product

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: the devices left after fsdp (and population)
    c.mesh.fsdp = 1
    c.mesh.population = 1  # devices groups a population's members are split over

    # JAX's persistent compilation cache (compile_cache.py): a second start of the same run
    # loads its programs instead of compiling them. dir "": JAX_COMPILATION_CACHE_DIR when
    # set, else $XDG_CACHE_HOME/flowgrpo_jax/jax_compilation (~/.cache/...).
    c.compilation_cache = ml_collections.ConfigDict()
    c.compilation_cache.enabled = True
    c.compilation_cache.dir = ""

    c.logging = ml_collections.ConfigDict()
    c.logging.num_images = 16  # per image grid
    c.logging.wandb = ""  # a wandb project: a wandb run per member ("": no wandb)
    c.logging.wandb_group = ""  # a population's wandb group ("": its workdir's name)
    return c


def _fail(key: str, value, why: str):
    raise ConfigError(f"config.{key}={value!r}: {why}")


# Groups whose keys belong to a model family or to rewards, not to defaults().
_FREE_GROUPS = ("model", "reward.options", "reward.eval_options")


def _check_known_keys(config, reference, prefix=""):
    """Every key of `config` must exist in `defaults()` (those of _FREE_GROUPS are free)."""
    for key in config.keys():
        name = f"{prefix}{key}"
        if name in _FREE_GROUPS:
            continue
        if key not in reference:
            raise ConfigError(f"config.{name} is not a known config key; known keys here: "
                              f"{sorted(reference.keys())}")
        value, default = config[key], reference[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                _fail(name, value, "must be a group of keys")
            _check_known_keys(value, default, name + ".")
        elif isinstance(default, bool) != isinstance(value, bool) or (
                isinstance(default, (int, float)) and not isinstance(value, (int, float))) or (
                isinstance(default, str) and not isinstance(value, str)) or (
                isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float)):
            _fail(name, value, f"must be of type {type(default).__name__}")


def _positive(config, *keys):
    for key in keys:
        value = _get(config, key)
        if not value > 0:
            _fail(key, value, "must be > 0")


# Float keys where inf means "no limit"; NaN is refused everywhere, inf in every other key.
_INF_ALLOWED = ("train.max_grad_norm", "train.adv_clip_max")


def _check_finite(config, prefix=""):
    """No float key holds NaN, and only the keys of _INF_ALLOWED hold inf."""
    for key in config.keys():
        name = f"{prefix}{key}"
        if name in _FREE_GROUPS:
            continue
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            _check_finite(value, name + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            if math.isnan(value) or name not in _INF_ALLOWED:
                _fail(name, value, "must be a finite number")


def _check_mesh(mesh, num_devices: int) -> None:
    """The mesh's data x fsdp must use the devices of a population group (all of them without
    a population) exactly (what parallel.make_mesh needs)."""
    if mesh.population < 1 or num_devices % mesh.population:
        _fail("mesh.population", mesh.population, f"must divide the {num_devices} device(s); "
                                                  f"e.g. one of {_divisors(num_devices)}")
    num_devices //= mesh.population
    data, fsdp = mesh.data, mesh.fsdp
    if data == -1 and fsdp == -1:
        _fail("mesh", mesh.to_dict(), "only one of mesh.data / mesh.fsdp may be -1")
    if data == -1 or fsdp == -1:
        key, size, other = ("mesh.fsdp", fsdp, "mesh.data") if data == -1 else (
            "mesh.data", data, "mesh.fsdp")
        if num_devices % size:
            _fail(key, size, f"must divide the {num_devices} device(s) ({other}=-1 takes the "
                             f"devices left); e.g. one of {_divisors(num_devices)}")
    elif data * fsdp != num_devices:
        _fail("mesh", mesh.to_dict(), f"data x fsdp = {data * fsdp} must equal the "
                                      f"{num_devices} device(s); set one axis to -1 for the rest")


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0][:8]


def _get(config, key):
    for part in key.split("."):
        config = config[part]
    return config


def validate(config, num_devices: int, num_processes: int = 1) -> None:
    """Raises ConfigError naming the first key whose value cannot be used on `num_devices`
    devices (global) in `num_processes` processes."""
    _check_known_keys(config, defaults())
    _check_finite(config)
    s, t = config.sample, config.train
    if config.model.get("family") not in families.FAMILIES:
        _fail("model.family", config.model.get("family"),
              f"must name a model family, one of {sorted(families.FAMILIES)}")
    if t.objective not in objectives.OBJECTIVES:
        _fail("train.objective", t.objective, f"must be one of {sorted(objectives.OBJECTIVES)}")
    if s.kind not in SAMPLERS:
        _fail("sample.kind", s.kind, f"must be one of {SAMPLERS}")
    problem = objectives.load(t.objective).check(config)
    if problem:
        raise ConfigError(problem)
    if s.window_size and s.kind not in ("sde", "cps"):
        _fail("sample.window_size", s.window_size, f"a window holds stochastic steps; "
                                                   f"sample.kind={s.kind!r} has none")
    if config.prompts.format not in PROMPT_FORMATS:
        _fail("prompts.format", config.prompts.format, f"must be one of {PROMPT_FORMATS}")
    if not config.prompts.train_file:
        _fail("prompts.train_file", config.prompts.train_file, "a prompt file is needed")
    _positive(config, "sample.noise_level", "sample.num_steps", "sample.eval_num_steps",
              "sample.guidance_scale", "sample.groups_per_epoch", "sample.batch_size",
              "sample.eval_batch_size", "train.learning_rate", "train.updates_per_epoch",
              "train.micro_batch_size", "train.clip_range", "train.timestep_fraction",
              "train.adv_clip_max", "train.max_grad_norm", "lora.rank", "lora.alpha",
              "logging.num_images", "train.max_nonfinite_updates", "train.ema_every")
    # The loop takes `epoch % save_every` and `epoch % log_every`; eval_every = 0 means never.
    for key, what in (("save_every", "epochs between checkpoints (one is also written at the end)"),
                      ("log_every", "epochs between image grids")):
        if _get(config, key) < 1:
            _fail(key, _get(config, key), f"must be >= 1: {what}")
    for key in ("num_epochs", "eval_every", "sample.num_eval_prompts",
                "train.beta", "train.weight_decay", "seed"):
        if _get(config, key) < 0:
            _fail(key, _get(config, key), "must be >= 0")
    if config.lora.init_from:
        _check_init_from(config.lora)
    r = config.reward
    try:
        weights = parse_weights(r.rewards)
    except ValueError as e:
        _fail("reward.rewards", r.rewards, str(e))
    if r.url and not r.eval_url and options_in_use(weights, r.eval_options.to_dict()):
        _fail("reward.eval_options", r.eval_options.to_dict(),
              f"the reward server at reward.url={r.url!r} scores with its own options; run one "
              f"with these for evaluation and give its address as reward.eval_url")
    if s.group_size < 2:
        _fail("sample.group_size", s.group_size, "needs >= 2 images per prompt to compare them")
    if s.kind == "cps" and not s.noise_level < 1:
        _fail("sample.noise_level", s.noise_level, "CPS needs a noise level in (0, 1)")
    if t.remat not in REMAT_POLICIES:
        _fail("train.remat", t.remat, f"must be one of {REMAT_POLICIES}")
    if t.lr_schedule not in LR_SCHEDULES:
        _fail("train.lr_schedule", t.lr_schedule, f"must be one of {LR_SCHEDULES}")
    if not 0 <= t.ema_max_decay < 1:
        _fail("train.ema_max_decay", t.ema_max_decay, "must be in [0, 1)")
    if t.timestep_fraction > 1:
        _fail("train.timestep_fraction", t.timestep_fraction, "must be in (0, 1]")
    for key in ("adam_b1", "adam_b2"):
        if not 0 <= t[key] < 1:
            _fail(f"train.{key}", t[key], "must be in [0, 1)")
    steps = s.num_steps
    if s.window_size:
        if not (s.window_size >= 1 and 0 <= s.window_lo <= s.window_hi - s.window_size
                and s.window_hi <= steps):
            _fail("sample.window_size", s.window_size,
                  f"the window needs 1 <= window_size and 0 <= window_lo ({s.window_lo}) <= "
                  f"window_hi ({s.window_hi}) - window_size, window_hi <= num_steps ({steps})")
        steps = s.window_size
    if int(steps * t.timestep_fraction) < 1:
        _fail("train.timestep_fraction", t.timestep_fraction, f"trains no step of {steps}")
    if config.mesh.data != -1 and config.mesh.data < 1 or config.mesh.fsdp != -1 and config.mesh.fsdp < 1:
        _fail("mesh", config.mesh.to_dict(), "axis sizes must be >= 1, or -1 for the rest")
    _check_mesh(config.mesh, num_devices)
    _check_population(config, num_processes)
    _check_batch_sizes(config, num_devices // config.mesh.population, num_processes)


def _check_population(config, num_processes: int) -> None:
    p = config.population
    if p.seeds < 0:
        _fail("population.seeds", p.seeds, "must be >= 0 (0: no seeds axis)")
    if not (p.seeds or p.vmap):
        if config.mesh.population != 1:
            _fail("mesh.population", config.mesh.population, "needs a population "
                                                             "(population.seeds or population.vmap)")
        return
    if num_processes > 1:
        _fail("population.seeds" if p.seeds else "population.vmap", p.seeds or p.vmap,
              f"a population trains in one process (its devices may be many), not "
              f"{num_processes}")
    count = max(p.seeds, 1) * math.prod(
        len(text.partition("=")[2].split(",")) for text in p.vmap.split())
    if count % config.mesh.population:
        _fail("mesh.population", config.mesh.population,
              f"must divide the population's {count} members")


def _check_init_from(lora) -> None:
    if not lora.enabled:
        _fail("lora.init_from", lora.init_from, "needs lora.enabled=True (it is a LoRA adapter)")
    try:
        found = os.path.exists(hub.local_path(lora.init_from))
    except hub.NotCachedError as e:
        _fail("lora.init_from", lora.init_from, str(e))
    if not found:
        _fail("lora.init_from", lora.init_from, "no such file or folder (a PEFT adapter folder, "
                                                "a diffusers LoRA .safetensors file or a Hub id "
                                                "in the local cache)")


def _check_batch_sizes(config, num_devices: int, num_processes: int) -> None:
    s, t = config.sample, config.train
    epoch = s.group_size * s.groups_per_epoch
    if epoch % s.batch_size:
        _fail("sample.batch_size", s.batch_size,
              f"must divide the epoch's {epoch} images (group_size {s.group_size} x "
              f"groups_per_epoch {s.groups_per_epoch}); e.g. {_divisors_hint(epoch, num_devices)}")
    if epoch % t.updates_per_epoch:
        _fail("train.updates_per_epoch", t.updates_per_epoch,
              f"must divide the epoch's {epoch} images")
    update = epoch // t.updates_per_epoch
    if update % t.micro_batch_size:
        _fail("train.micro_batch_size", t.micro_batch_size,
              f"must divide the {update} images of one update (epoch {epoch} / "
              f"updates_per_epoch {t.updates_per_epoch}); e.g. {_divisors_hint(update, num_devices)}")
    ways = num_devices  # the batch is split over every device (mesh data x fsdp)
    for key, value in (("sample.batch_size", s.batch_size),
                       ("sample.eval_batch_size", s.eval_batch_size),
                       ("train.micro_batch_size", t.micro_batch_size)):
        if value % ways or value % num_processes:
            _fail(key, value, f"is split over {num_devices} devices in {num_processes} "
                              f"process(es), so it must be a multiple of {max(ways, num_processes)}")


def _divisors_hint(total: int, multiple_of: int) -> str:
    fits = [d for d in range(multiple_of, total + 1, multiple_of) if total % d == 0]
    return f"one of {fits[:8]}" if fits else f"none fits {multiple_of} devices: change the epoch size"


def sizes(config) -> dict:
    """The derived counts the trainer uses (after validate)."""
    s, t = config.sample, config.train
    epoch = s.group_size * s.groups_per_epoch
    return {"epoch": epoch, "chunks": epoch // s.batch_size, "update": epoch // t.updates_per_epoch}


def tiny(config) -> ml_collections.ConfigDict:
    """A config's run at CPU size, for tests (the model and the reward are the caller's): 16
    images an epoch in chunks of 8, 4 sampling steps, a small LoRA, 2 epochs."""
    config.lora.rank, config.lora.alpha = 4, 8.0
    s = config.sample
    s.group_size, s.groups_per_epoch, s.batch_size = 4, 4, 8
    s.num_steps, s.eval_num_steps = 4, 4
    s.eval_batch_size, s.num_eval_prompts = 8, 8
    if s.window_size:
        s.window_size, s.window_lo, s.window_hi = 2, 0, 3
    config.train.micro_batch_size, config.train.remat = 8, "none"
    config.num_epochs, config.eval_every, config.save_every = 2, 0, 1
    config.logging.num_images = 8
    return config


def fast(config, *, cfg: bool = True) -> ml_collections.ConfigDict:
    """Flow-GRPO-Fast: the SDE (CPS, noise 0.8) only in a 3-step window starting in steps 0-2,
    every window step trained (the window never holds the last, peaked step), clip 1e-5, no
    KL. cfg=False also drops classifier-free guidance in rollouts, training and evaluation: the
    reference's *_sd3_fast_nocfg configs. cfg=True (with CFG) is this project's composition;
    the reference ships no windowed Fast config with CFG."""
    s = config.sample
    s.kind, s.noise_level = "cps", 0.8
    s.window_size, s.window_lo, s.window_hi = 3, 0, s.num_steps // 2
    config.train.clip_range, config.train.beta, config.train.timestep_fraction = 1e-5, 0.0, 1.0
    if not cfg:
        s.guidance_scale = 1.0
    return config


def nft(config) -> ml_collections.ConfigDict:
    """DiffusionNFT as its public SD3.5-M configs run it (its config/nft.py for GenEval and
    PickScore): rollouts with the 10-step DPM-Solver++(2M) and no CFG (evaluation too), beta 1,
    KL weight 1e-4, one update an epoch, the old policy's decay min(0.001 n, 0.5), every group
    kept, the EMA every update at 0.9."""
    s, t = config.sample, config.train
    t.objective = "nft"
    s.kind, s.guidance_scale, s.window_size = "dpm2", 1.0, 0
    t.beta, t.learning_rate, t.updates_per_epoch = 1e-4, 3e-4, 1
    t.drop_zero_std_groups, t.global_std = False, True
    t.ema_every, t.ema_max_decay = 1, 0.9
    n = config.nft
    n.beta, n.decay_start, n.decay_rate, n.decay_max = 1.0, 0, 0.001, 0.5
    return config


def guard(config) -> ml_collections.ConfigDict:
    """GRPO-Guard as its SD3.5-M config runs it (the Flow-GRPO repository's
    config/grpo_guard.py): Flow-GRPO's rollouts with RatioNorm and per-step reweighting, clip
    2e-6, lr 1e-4, no KL, per-group advantage std."""
    t = config.train
    t.objective = "grpo_guard"
    t.clip_range, t.learning_rate, t.beta, t.global_std = 2e-6, 1e-4, 0.0, False
    return config


def load_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config(variant)` of a config file named as "path.py[:variant]"."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location("loaded_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config() function")
    return module.get_config(variant) if variant else module.get_config()
