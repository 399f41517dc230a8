"""Training checkpoints in a workdir: array state via orbax, host-side progress as JSON.

A checkpoint is one step under `checkpoints/` (the trainer numbers them by epoch) with two
items: "state", the trainer's TrainState (optimizer update count, trained params, optimizer
state, EMA params) as one pytree, restored into the shardings of the abstract state given;
and "host", a JSON dict, which the trainer fills with the epoch and the advantage tracker's
seen prompts. Nothing else is saved: the trainer derives every PRNG key and the epoch's
prompts from the config's seed and the epoch, and the frozen weights (and a full fine-tune's
KL reference) come from the model again. The last `max_to_keep` (2) steps are kept. Orbax
commits a step atomically, so a run killed mid-save resumes from the previous complete one.

Every saved step also gets a manifest (`sha256.json` in its folder): each file's size and
SHA-256, written once orbax has committed the step. Orbax does not notice every damaged file
(a flipped byte in array data may restore silently), so `restore_latest` first checks the
newest step's files against its manifest; a damaged step is moved to `checkpoints_damaged/`
and the next older one is tried. A step without a manifest (a kill between orbax's commit and
the manifest, or a checkpoint from before manifests) is restored on orbax's checks alone.
A state holding NaN or inf is never saved (`save` raises CheckpointError).

The workdir also keeps the config it was started with (`config.json`) and refuses to resume
under another, unless the change is only in RESUMABLE_KEYS or is explicitly allowed.
"""
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from flowgrpo_jax import parallel

CONFIG_FILE = "config.json"
MANIFEST = "sha256.json"
DAMAGED_DIR = "checkpoints_damaged"


class WorkdirError(ValueError):
    """The workdir cannot be used as it is; the message names the file and what to do."""


class ConfigMismatchError(WorkdirError):
    """The workdir was started with a different config."""


class CheckpointError(RuntimeError):
    """No intact checkpoint to resume from, or a state that must not be saved."""


def _flatten_config(d: dict, prefix="") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten_config(value, name + "."))
        else:
            out[name] = value
    return out


# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_KEYS = ("num_epochs", "save_every", "eval_every", "log_every", "max_nonfinite_updates",
                  "compilation_cache.enabled", "compilation_cache.dir")


def is_workdir(folder: str) -> bool:
    """Whether `folder` is a training workdir: its recorded config and a checkpoints folder."""
    return os.path.isfile(os.path.join(folder, CONFIG_FILE)) and os.path.isdir(
        os.path.join(folder, "checkpoints"))


def recorded_config(workdir: str) -> dict:
    """The config a training workdir was started with (WorkdirError when it is no workdir)."""
    if not is_workdir(workdir):
        raise WorkdirError(f"{workdir} is not a training workdir (no {CONFIG_FILE} and "
                           f"checkpoints/)")
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
        return json.load(f)


def restore_trained_params(workdir: str, abstract_state, *, step: int | None = None,
                           ema: bool = True):
    """(step, params) of a workdir's checkpoint `step` (default: the latest): its EMA params,
    or with `ema=False` the trained ones; the state restores into `abstract_state`'s shardings.
    WorkdirError when the workdir holds no such checkpoint."""
    checkpointer = TrainCheckpointer(workdir)
    try:
        steps = sorted(checkpointer.all_steps())
        if not steps:
            raise WorkdirError(f"{workdir} holds no complete training checkpoint yet")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise WorkdirError(f"{workdir} has no checkpoint {step} (saved: {steps})")
        state, _ = checkpointer.restore(step, abstract_state)
    finally:
        checkpointer.close()
    return step, state.ema_params if ema else state.params


def check_workdir_config(workdir: str, config: dict, allow_change: bool = False) -> None:
    """Records `config` in a new workdir; in an existing one, refuses a different config."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    config = json.loads(json.dumps(config))  # tuples -> lists, as they come back from disk
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WorkdirError(f"{path} cannot be read ({e}); it records the config this "
                               f"workdir was started with: restore it, or use another "
                               f"workdir") from None
        if not isinstance(old, dict):
            raise WorkdirError(f"{path} holds a {type(old).__name__}, not the config this "
                               f"workdir was started with: restore it, or use another workdir")
        old = _flatten_config(old)
        new = _flatten_config(config)
        changed = sorted(k for k in set(old) | set(new)
                         if old.get(k) != new.get(k) and not k.endswith(RESUMABLE_KEYS))
        if changed and not allow_change:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:10])
            raise ConfigMismatchError(
                f"{workdir} was started with a different config ({details}); use another "
                f"workdir, or pass --allow_config_change to resume anyway")
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def nonfinite_leaves(tree) -> list:
    """Paths of the floating-point leaves of `tree` holding NaN or inf (a jitted check per
    leaf, so sharded arrays are checked where they lie)."""
    leaves = [(jax.tree_util.keystr(path), leaf)
              for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
              if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    finite = jax.device_get(_all_finite([leaf for _, leaf in leaves]))
    return [path for (path, _), ok in zip(leaves, finite) if not ok]


@jax.jit
def _all_finite(leaves):
    return [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _step_files(folder: str) -> dict:
    """{path relative to folder: absolute path} of every file but the manifest."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            relative = os.path.relpath(full, folder)
            if relative not in (MANIFEST, MANIFEST + ".tmp"):
                files[relative] = full
    return files


def write_manifest(folder: str) -> None:
    """Records each file's size and SHA-256 in folder/MANIFEST (written atomically)."""
    manifest = {relative: {"size": os.path.getsize(full), "sha256": _sha256(full)}
                for relative, full in sorted(_step_files(folder).items())}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": manifest}, f, indent=1)
    os.replace(tmp, os.path.join(folder, MANIFEST))


def check_manifest(folder: str) -> str | None:
    """What is wrong with the files of a step folder, in one line naming the file; None when
    every file matches its manifest or there is no manifest to check against."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST}: unreadable ({type(e).__name__}: {e})"
    for name, size, digest in entries:
        full = os.path.join(folder, name)
        if not os.path.isfile(full):
            return f"{name}: missing"
        if os.path.getsize(full) != size:
            return f"{name}: {os.path.getsize(full)} bytes, {size} when saved"
        if _sha256(full) != digest:
            return f"{name}: contents differ from when saved (SHA-256 mismatch)"
    return None


def _one_line(text, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class TrainCheckpointer:
    def __init__(self, workdir: str, max_to_keep: int = 2):
        self._workdir = os.path.abspath(workdir)
        self._directory = os.path.join(self._workdir, "checkpoints")
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "host"))

    @property
    def directory(self) -> str:
        return self._directory

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list:
        return list(self._manager.all_steps())

    def save(self, step: int, state, host: dict) -> None:
        """Saves and waits: a checkpoint is complete on disk, with its manifest, when this
        returns. A state with a NaN or inf anywhere is refused (CheckpointError)."""
        bad = nonfinite_leaves(state)
        if bad:
            raise CheckpointError(
                f"refusing to write checkpoint {step}: {len(bad)} array(s) hold NaN or inf "
                f"(first: {bad[0]}); the checkpoint before it is kept")
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)), force=True)
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            write_manifest(os.path.join(self._directory, str(step)))

    def restore(self, step: int, abstract_state):
        """Restores into `abstract_state` (ShapeDtypeStructs with shardings) -> (state, host)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
        return restored.state, restored.host

    def restore_latest(self, abstract_state):
        """The newest intact checkpoint -> (step, state, host, damaged), or None when there is
        none at all. `damaged` lists (step, what is wrong, where it was moved) for each newer
        step that failed its manifest or orbax's restore; those are moved out of the way, so
        that the run can write those steps again. With no intact step, CheckpointError.
        Every process must call this (process 0 checks the files; all restore together)."""
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            folder = os.path.join(self._directory, str(step))
            problem = check_manifest(folder) if jax.process_index() == 0 else None
            if not parallel.any_process(problem is not None):
                try:
                    state, host = self.restore(step, abstract_state)
                    if not isinstance(host, dict) or not isinstance(host.get("epoch"), int):
                        raise ValueError(f"host item {host!r:.80} has no integer 'epoch'")
                except Exception as e:  # orbax raises many types for damaged files
                    problem = f"restoring it failed: {type(e).__name__}: {e}"
                if not parallel.any_process(problem is not None):
                    return step, state, host, self._move_aside(damaged)
            damaged.append((step, _one_line(problem or "damaged on another process")))
        if not damaged:
            return None
        details = "; ".join(f"step {step}: {problem}" for step, problem in damaged)
        raise CheckpointError(f"no intact checkpoint in {self._directory} ({details}); move "
                              f"that folder away to start the run afresh")

    def _move_aside(self, damaged) -> list:
        """Moves damaged step folders to WORKDIR/checkpoints_damaged/ -> (step, why, where)."""
        moved = []
        for step, problem in damaged:
            target = os.path.join(self._workdir, DAMAGED_DIR, str(step))
            suffix = 1
            while os.path.exists(target):
                target = os.path.join(self._workdir, DAMAGED_DIR, f"{step}-{suffix}")
                suffix += 1
            if jax.process_index() == 0:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.move(os.path.join(self._directory, str(step)), target)
            moved.append((step, problem, target))
        if damaged:
            parallel.any_process(False)  # every process waits for the moves
            self._manager.reload()
        return moved

    def close(self) -> None:
        self._manager.close()
