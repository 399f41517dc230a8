"""Training checkpoints in a workdir: array state via orbax, host-side progress as JSON.

A checkpoint is one step under `checkpoints/` (the trainer numbers them by epoch) with two
items: "state", the trainer's TrainState (optimizer update count, trained params, optimizer
state, EMA params) as one pytree, restored into the shardings of the abstract state given;
and "host", a JSON dict, which the trainer fills with the epoch and the advantage tracker's
seen prompts. Nothing else is saved: the trainer derives every PRNG key and the epoch's
prompts from the config's seed and the epoch, and the frozen weights (and a full fine-tune's
KL reference) come from the model again. The last `max_to_keep` (2) steps are kept. Orbax
commits a step atomically, so a run killed mid-save resumes from the previous complete one.
The workdir also keeps the config it was started with (`config.json`) and refuses to resume
under another, unless the change is only in RESUMABLE_KEYS or is explicitly allowed.
"""
import json
import os

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"


class ConfigMismatchError(ValueError):
    """The workdir was started with a different config."""


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
RESUMABLE_KEYS = ("num_epochs", "save_every", "eval_every", "log_every")


def check_workdir_config(workdir: str, config: dict, allow_change: bool = False) -> None:
    """Records `config` in a new workdir; in an existing one, refuses a different config."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    config = json.loads(json.dumps(config))  # tuples -> lists, as they come back from disk
    if os.path.exists(path):
        with open(path) as f:
            old = _flatten_config(json.load(f))
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


class TrainCheckpointer:
    def __init__(self, workdir: str, max_to_keep: int = 2):
        self._manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "host"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, host: dict) -> None:
        """Saves and waits: a checkpoint is complete on disk when this returns."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state):
        """Restores into `abstract_state` (ShapeDtypeStructs with shardings) -> (state, host)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
        return restored.state, restored.host

    def close(self) -> None:
        self._manager.close()
