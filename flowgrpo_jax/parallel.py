"""The device mesh and the rules that place parameters and batches on it.

Parameters carry logical axis names ("embed", "mlp", "heads", ...; see the model files); a
rule table maps each name to mesh axes, so data parallelism, FSDP or a mix is a config change:
the default shards "embed" over `fsdp` and replicates every other parameter dim, and splits
the batch over both axes. A dim whose size the mesh axes do not divide stays replicated.

A generator's modules are placed by role (`placement`): the velocity network by the rules,
the frozen text encoders fully sharded over every device whatever the mesh (T5-XXL alone is
9.5 GB in bf16, and they run once per rollout chunk, so gathering their weights costs little),
the decoder replicated.

With several processes each one feeds and reads only the rows of a batch its devices hold;
the helpers at the end move host values between processes and the mesh.
"""
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

DATA, FSDP = "data", "fsdp"
# The axis a population's members are split over (population.py); only in a mesh that has it.
POPULATION = "population"
BATCH = "batch"
DEFAULT_RULES = ((BATCH, (DATA, FSDP)), ("embed", FSDP))
REPLICATED_RULES = ((BATCH, (DATA, FSDP)),)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None, population: int = 1) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh over `devices` (default: all); one axis may be -1 to take the rest.
    population > 1: a (population, data, fsdp) mesh, each member's batch and params on one of
    `population` groups of devices, data x fsdp within a group."""
    devices = jax.devices() if devices is None else list(devices)
    if population < 1 or len(devices) % population:
        raise ValueError(f"mesh population={population} must divide the {len(devices)} devices")
    data, fsdp = mesh_shape(data, fsdp, len(devices) // population)
    if population == 1:
        return jax.sharding.Mesh(np.asarray(devices).reshape(data, fsdp), (DATA, FSDP),
                                 axis_types=(AxisType.Auto,) * 2)
    return jax.sharding.Mesh(np.asarray(devices).reshape(population, data, fsdp),
                             (POPULATION, DATA, FSDP), axis_types=(AxisType.Auto,) * 3)


def member_axis(mesh) -> str | None:
    """The mesh axis a population's leading axis is split over, or None (not split)."""
    return POPULATION if POPULATION in mesh.axis_names else None


def stacked(shardings, mesh):
    """The shardings of a pytree stacked on a leading population axis, from its members'."""
    return jax.tree.map(lambda s: NamedSharding(mesh, PartitionSpec(member_axis(mesh), *s.spec)),
                        shardings, is_leaf=lambda s: isinstance(s, NamedSharding))


def mesh_shape(data: int, fsdp: int, count: int) -> tuple[int, int]:
    """The (data, fsdp) sizes of a mesh over `count` devices, -1 resolved to the rest."""
    if data == -1 and fsdp == -1:
        raise ValueError("only one of mesh data / fsdp may be -1")
    # the sizes as given, -1 included, for the error below (not the 0 a misfit -1 becomes)
    asked = f"data={data} fsdp={fsdp}"
    rest = "" if -1 not in (data, fsdp) else (
        f" (-1 takes the devices left, so {'fsdp' if data == -1 else 'data'} must divide {count})")
    if data == -1:
        data = count // fsdp if fsdp > 0 and count % fsdp == 0 else 0
    elif fsdp == -1:
        fsdp = count // data if data > 0 and count % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != count:
        raise ValueError(f"mesh data x fsdp must use all {count} devices exactly, got {asked}{rest}")
    return data, fsdp


def _mesh_axes_of(name, rules):
    for logical, mesh_axes in rules:
        if logical == name:
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    return ()


def mesh_spec(logical_spec, shape, mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """Mesh PartitionSpec for an array of `shape` whose dims have logical names `logical_spec`.

    A dim stays replicated when no rule names it, when its size is not divisible by the
    product of its mesh axes, or when an earlier dim already uses one of those axes.
    """
    used = set()
    dims = []
    for size, name in zip(shape, tuple(logical_spec) + (None,) * (len(shape) - len(logical_spec))):
        axes = _mesh_axes_of(name, rules) if name is not None else ()
        if axes and not used.intersection(axes) and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            dims.append(axes[0] if len(axes) == 1 else axes)
        else:
            dims.append(None)
    return PartitionSpec(*dims)


def state_shardings(state, mesh, rules=DEFAULT_RULES):
    """NamedShardings, in the structure of the NNX `state`, from its logical partition specs."""
    specs = nnx.get_partition_spec(state)
    return jax.tree.map(
        lambda x, spec: NamedSharding(mesh, mesh_spec(spec, x.shape, mesh, rules)),
        state, specs, is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_shard_count(mesh, rules=DEFAULT_RULES) -> int:
    """Into how many parts the batch dim is split."""
    return math.prod(mesh.shape[a] for a in _mesh_axes_of(BATCH, rules))


def batch_sharding(mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of arrays whose leading dim is the batch (other dims replicated)."""
    axes = _mesh_axes_of(BATCH, rules)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch, mesh, rules=DEFAULT_RULES):
    """Every leaf of `batch` (leading dim = batch) as a global array split over the batch axes.

    Device arrays are resharded as they are; host (numpy) leaves are this process's share of
    the global batch (the whole batch with one process), as with several processes each feeds
    its own samples.
    """
    sharding = batch_sharding(mesh, rules)
    ways = batch_shard_count(mesh, rules)

    def put(path, leaf):
        on_host = not isinstance(leaf, jax.Array)
        size = np.shape(leaf)[0] * (jax.process_count() if on_host else 1) if np.ndim(leaf) else 0
        if size == 0 or size % ways:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} of shape {np.shape(leaf)} cannot be "
                f"split over {ways} devices: its global leading dim must be a multiple of {ways}"
            )
        if on_host:
            return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))
        return jax.device_put(leaf, sharding)

    return jax.tree_util.tree_map_with_path(put, batch)


def placement(mesh, rules=DEFAULT_RULES):
    """place(role, state) -> NamedShardings for a generator module of `role` (generator.ROLES):
    "model" by `rules`, "encoder" fully sharded, "decoder" replicated."""
    encoder_rules = ((BATCH, (DATA, FSDP)), ("embed", tuple(mesh.axis_names)))  # every device
    by_role = {"model": rules, "encoder": encoder_rules, "decoder": REPLICATED_RULES}
    return lambda role, state: state_shardings(state, mesh, by_role[role])


def place(tree, shardings):
    """`tree` with every leaf on its sharding. Leaves already there stay as they are (a model
    read straight into its shardings is not copied); others (host values or arrays on one
    device, the same on every process) are cut into their shards on the host, so this works
    with several processes too."""

    def put(x, sharding):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


# ---- several processes --------------------------------------------------------------------


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process; every process must call it (a collective)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.int32(flag)).any())


def gather_rows(local: np.ndarray) -> np.ndarray:
    """(chunks, rows of this process) from every process -> (chunks * all rows,) global order."""
    stacked = multihost_utils.process_allgather(np.asarray(local))  # (P, chunks, rows)
    return np.swapaxes(stacked, 0, 1).reshape(-1)


def replicate(tree, mesh):
    """Host values, the same on every process, as global arrays replicated over the mesh."""
    sharding = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def local_range(mesh, size: int) -> tuple:
    """[start, stop) of the rows of a (size, ...) batch-sharded array this process holds."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((size,))
    starts = sorted({idx[0].start or 0 for idx in index_map.values()})
    stops = sorted({idx[0].stop or size for idx in index_map.values()})
    if any(a != b for a, b in zip(starts[1:], stops[:-1])):
        raise RuntimeError(f"this process's devices hold non-contiguous batch rows {starts}..{stops}")
    return starts[0], stops[-1]


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    shards = {s.index[0].start or 0: s.data for s in array.addressable_shards}
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def fingerprint(tree) -> str:
    """SHA-256 (16 hex digits) of the array shards this process holds."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        for shard in sorted(leaf.addressable_shards, key=lambda s: str(s.index)):
            digest.update(np.asarray(shard.data).tobytes())
    return digest.hexdigest()[:16]
