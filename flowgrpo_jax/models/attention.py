"""One attention function for every model, with the implementation chosen by name.

Inputs and output are (batch, length, heads, head_dim), the layout of
`jax.nn.dot_product_attention`. Implementations:

- "xla": the reference, softmax in float32: jax.nn's XLA path, or when lowered for a CPU the
  same math as a loop over cache-sized blocks.
- "cudnn": cuDNN's fused flash attention (CUDA GPUs, bf16/fp16).
- "splash": the Pallas splash-attention kernel for TPUs; off a TPU it runs in Pallas interpret
  mode (slow, for tests). No bias.
- "auto": the fast kernel of the platform the computation is lowered for when the inputs
  allow it (cuDNN: bf16/fp16, head_dim <= 128 and a multiple of 8, no bias; splash: no bias),
  else "xla".

The choice is made per target platform with `jax.lax.platform_dependent`, so a program
compiled on a CPU host for a TPU (or run on a GPU) gets that platform's path, never the
host's. Splash is a custom call the SPMD partitioner cannot split: under a mesh set with
`jax.set_mesh`, it runs in a `shard_map` with the batch split over every mesh axis (the
layout of the project's batches; a population's member axis is the vmap's, outside it), so
data parallelism moves no activations.
"""
import concurrent.futures
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from flowgrpo_jax.parallel import POPULATION

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# Logits per loop step of the CPU path: 1 MiB of float32, so a step's logits and exponentials stay
# in a core's L2 cache between the two matmuls instead of going through memory.
_CPU_CHUNK_LOGITS = 1 << 18
# Splash pads sequences to a multiple of this (the TPU's lane count) and takes the largest of
# these power-of-two blocks that divides the padded length.
_SPLASH_ALIGN = 128
_SPLASH_MAX_BLOCK = 512


def _chunk_size(rows: int, logits_per_row: int) -> int:
    """The largest divisor of `rows` whose logits fit in _CPU_CHUNK_LOGITS (at least 1)."""
    limit = max(1, _CPU_CHUNK_LOGITS // logits_per_row)
    return max(c for c in range(1, min(rows, limit) + 1) if rows % c == 0)


def _cpu_attention(q, k, v, bias):
    """The math of jax.nn's XLA path (float32 logits and softmax) arranged for XLA:CPU: a loop
    over (sample, L2-sized group of heads) that slices its heads out of the (batch, length, heads,
    head_dim) arrays and writes its output back in place, so no whole-array transposes; the scale
    applied to each q block (L x head_dim) rather than to the logits (L x L); the softmax division
    applied to the (q_len, head_dim) output instead of the (q_len, k_len) probabilities. It
    differs from jax.nn's form by float32 rounding only and is ~2x faster on one core
    (docs/benchmarks.md)."""
    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    chunk = _chunk_size(heads, q_len * k_len)
    chunks_per_sample = heads // chunk
    scale = jnp.float32(1.0 / math.sqrt(head_dim))
    if bias is not None:
        bias = jnp.broadcast_to(bias, (batch, heads, q_len, k_len))

    def heads_of(x, b, h):  # (chunk, length, dims): heads h..h+chunk of sample b
        block = jax.lax.dynamic_slice(x, (b, 0, h, 0), (1, x.shape[1], chunk, x.shape[3]))
        return jnp.swapaxes(block[0], 0, 1)

    def step(i, out):
        b, h = i // chunks_per_sample, (i % chunks_per_sample) * chunk
        q_block = (heads_of(q, b, h) * scale).astype(q.dtype)
        logits = jnp.einsum("cqd,ckd->cqk", q_block, heads_of(k, b, h),
                            preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + jax.lax.dynamic_slice(bias, (b, h, 0, 0), (1, chunk, q_len, k_len))[0]
        weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
        block = jnp.matmul(weights.astype(v.dtype), heads_of(v, b, h), preferred_element_type=jnp.float32)
        block = (block / weights.sum(axis=-1, keepdims=True)).astype(v.dtype)
        return jax.lax.dynamic_update_slice(out, jnp.swapaxes(block, 0, 1)[None], (b, 0, h, 0))

    out = jnp.zeros((batch, q_len, heads, v.shape[-1]), v.dtype)
    return jax.lax.fori_loop(0, batch * chunks_per_sample, step, out)


def _jax_nn_xla(q, k, v, bias):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")


def _xla_attention(q, k, v, bias):
    return jax.lax.platform_dependent(q, k, v, bias, cpu=_cpu_attention, default=_jax_nn_xla)


@functools.cache
def _has_backend(platform: str) -> bool:
    try:
        jax.devices(platform)
    except RuntimeError:
        return False
    return True


def _cudnn_fits(q, bias) -> bool:
    head_dim = q.shape[-1]
    return (bias is None and q.dtype in (jnp.bfloat16, jnp.float16) and head_dim <= 128
            and head_dim % 8 == 0)


def _cudnn_attention(q, k, v, bias):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="cudnn")


def _padded(length: int) -> int:
    return -(-length // _SPLASH_ALIGN) * _SPLASH_ALIGN


@functools.cache
def _splash_kernel(heads: int, q_len: int, k_len: int, interpret: bool):
    """The splash kernel for one sample's (heads, padded length, head_dim) inputs: every query
    attends to the first k_len keys (the rest is padding). Its mask tables are built in a
    thread of its own, outside the trace and mesh that called for them (both are thread-local),
    and kept as NumPy constants, so one cached kernel serves every trace and target."""
    q_pad, k_pad = _padded(q_len), _padded(k_len)
    block_q, block_k = math.gcd(q_pad, _SPLASH_MAX_BLOCK), math.gcd(k_pad, _SPLASH_MAX_BLOCK)
    keys = np.zeros((q_pad, k_pad), np.bool_)
    keys[:, :k_len] = True
    mask = splash_mask.MultiHeadMask([splash_mask.NumpyMask(keys)] * heads)
    blocks = splash_kernel.BlockSizes(
        block_q=block_q, block_kv=block_k, block_kv_compute=block_k,
        block_q_dkv=block_q, block_kv_dkv=block_k, block_kv_dkv_compute=block_k,
        block_q_dq=block_q, block_kv_dq=block_k)

    def build():
        kernel = splash_kernel.make_splash_mha(mask, block_sizes=blocks, head_shards=1,
                                               q_seq_shards=1, interpret=interpret)
        return jax.tree.map(np.asarray, kernel)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(build).result()


def _splash_local(q, k, v, *, interpret: bool):
    """Splash over a batch held by one device: scale q, pad the lengths, vmap the kernel."""
    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    kernel = _splash_kernel(heads, q_len, k_len, interpret)

    def heads_major(x, length):
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, _padded(length) - length), (0, 0)))

    q = (q * (1.0 / math.sqrt(head_dim))).astype(k.dtype)
    out = jax.vmap(kernel)(heads_major(q, q_len), heads_major(k, k_len), heads_major(v, k_len))
    return jnp.swapaxes(out[:, :, :q_len], 1, 2)


def _splash_attention(q, k, v, *, interpret: bool):
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_splash_local, interpret=interpret)
    # a population's members are vmapped over their own axis, which the vmap adds to the specs
    axes = tuple(a for a in mesh.axis_names if a != POPULATION)
    if mesh.empty or q.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return local(q, k, v)
    batch = PartitionSpec(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, batch), out_specs=batch,
                         check_vma=False)(q, k, v)


def _splash(q, k, v, bias):
    del bias  # the callers pass None: splash takes no bias
    return jax.lax.platform_dependent(
        q, k, v, tpu=functools.partial(_splash_attention, interpret=False),
        default=functools.partial(_splash_attention, interpret=True))


def _auto_attention(q, k, v, bias):
    cuda = _cudnn_attention if _has_backend("cuda") and _cudnn_fits(q, bias) else _jax_nn_xla
    tpu = _splash if bias is None else _jax_nn_xla
    return jax.lax.platform_dependent(q, k, v, bias, cpu=_cpu_attention, cuda=cuda, tpu=tpu,
                                      default=_jax_nn_xla)


def attention(q, k, v, *, bias=None, impl: str = "auto"):
    """Softmax attention; `bias` broadcasts to (batch, heads, q_len, k_len). `impl` is one of
    IMPLEMENTATIONS (the module docstring says what each does)."""
    if impl == "auto":
        return _auto_attention(q, k, v, bias)
    if impl == "xla":
        return _xla_attention(q, k, v, bias)
    if impl == "cudnn":
        if not _has_backend("cuda"):
            raise ValueError("attention 'cudnn' needs a CUDA GPU; this host has none (use 'auto')")
        return _cudnn_attention(q, k, v, bias)
    if impl == "splash":
        if bias is not None:
            raise ValueError("attention 'splash' takes no bias; use 'auto' or 'xla' for this model")
        return _splash(q, k, v, None)
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
