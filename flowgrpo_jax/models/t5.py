"""transformers' `T5EncoderModel` (SD3's T5-XXL text encoder) in Flax NNX.

T5 specifics kept exactly: RMS norm without mean subtraction or bias, unscaled q.k logits, and a
bucketed bidirectional relative-position bias computed once (from layer 0's table) and added in
every layer. No padding mask (SD3 passes none). Renamed from transformers:
`encoder.block.N.layer.0` is `blocks.N.attention` / `attention_norm`, `...layer.1` is
`blocks.N.ff` / `ff_norm`, layer 0's `relative_attention_bias` sits at the top level.
"""
import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowgrpo_jax.models import layer_stack
from flowgrpo_jax.models.attention import IMPLEMENTATIONS, attention

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The fields of transformers' T5Config that shape the encoder; defaults are its."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    attention_impl: str = "auto"
    scan_layers: bool = True  # blocks as a scan over stacked params (models/layer_stack.py)

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or \
                self.activation not in _ACTIVATIONS:
            raise ValueError(f"T5 feed_forward_proj {self.feed_forward_proj!r} not supported; "
                             f"expected ACT or gated-ACT with ACT in {sorted(_ACTIVATIONS)}")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {IMPLEMENTATIONS}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation, kept for old checkpoints.
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_transformers(cls, config: Mapping, *, attention_impl: str = "auto",
                          scan_layers: bool = True) -> "T5Config":
        """Reads a transformers T5Config config.json dict (other keys are bookkeeping)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"attention_impl", "scan_layers"}
        return cls(**{k: v for k, v in config.items() if k in fields},
                   attention_impl=attention_impl, scan_layers=scan_layers)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) bucket of key position minus query position, bidirectional.

    Computed on the host in float32 in transformers' operation order, so bucket edges agree.
    """
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(relative)
    log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
    large = exact + (log_ratio / np.float32(math.log(max_distance / exact))
                     * np.float32(half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (relative > 0) * half + np.where(distance < exact, distance, large)


def _linear(cin, cout, names, *, rngs, param_dtype, dtype):
    return nnx.Linear(
        cin, cout, use_bias=False,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names,
                                          eager_sharding=False),
        rngs=rngs, param_dtype=param_dtype, dtype=dtype)


class T5RMSNorm(nnx.Module):
    """x / rms(x) * scale, the statistics in float32."""

    def __init__(self, width, eps, *, rngs, param_dtype, dtype):
        self.scale = nnx.Param(nnx.initializers.ones(rngs.params(), (width,), param_dtype))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, **kw):
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.head_dim, self.impl = cfg.num_heads, cfg.d_kv, cfg.attention_impl
        self.q = _linear(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.k = _linear(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.v = _linear(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.o = _linear(inner, cfg.d_model, ("heads", "embed"), **kw)

    def __call__(self, x, position_bias):
        b, length, _ = x.shape
        q, k, v = (proj(x).reshape(b, length, self.heads, self.head_dim)
                   for proj in (self.q, self.k, self.v))
        # attention() scales logits by head_dim**-0.5 and T5 does not: undo it on q.
        q = q * jnp.asarray(math.sqrt(self.head_dim), q.dtype)
        out = attention(q, k, v, bias=position_bias, impl=self.impl)
        return self.o(out.reshape(b, length, self.heads * self.head_dim))


class T5FeedForward(nnx.Module):
    """wo(act(wi_0 x) * wi_1 x) when gated, else wo(act(wi x))."""

    def __init__(self, cfg: T5Config, **kw):
        self.activation = _ACTIVATIONS[cfg.activation]
        if cfg.is_gated:
            self.wi_0 = _linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
            self.wi_1 = _linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
            self.wi = None
        else:
            self.wi = _linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
            self.wi_0 = self.wi_1 = None
        self.wo = _linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), **kw)

    def __call__(self, x):
        if self.wi is not None:
            return self.wo(self.activation(self.wi(x)))
        return self.wo(self.activation(self.wi_0(x)) * self.wi_1(x))


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, **kw):
        self.attention_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)
        self.attention = T5Attention(cfg, **kw)
        self.ff_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)
        self.ff = T5FeedForward(cfg, **kw)

    def __call__(self, x, position_bias):
        x = x + self.attention(self.attention_norm(x), position_bias)
        return x + self.ff(self.ff_norm(x))


class T5EncoderModel(nnx.Module):
    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=jnp.float32):
        self.config = config
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.shared = nnx.Embed(
            config.vocab_size, config.d_model,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed"),
                                                 eager_sharding=False),
            rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.relative_attention_bias = nnx.Embed(
            config.relative_attention_num_buckets, config.num_heads,
            rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.blocks = nnx.List([T5Block(config, **kw) for _ in range(config.num_layers)])
        self.final_layer_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon, **kw)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: (batch, length) integer tokens -> last hidden state (batch, length, d_model)."""
        if input_ids.ndim != 2:
            raise ValueError(f"T5 input_ids must be (batch, length), got shape {input_ids.shape}")
        cfg = self.config
        buckets = relative_position_buckets(input_ids.shape[1], cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        # (length, length, heads) -> (1, heads, length, length), shared by every layer.
        position_bias = self.relative_attention_bias(jnp.asarray(buckets)).transpose(2, 0, 1)[None]
        x, _ = layer_stack.apply_layers(self.blocks, self.shared(input_ids),
                                        lambda block, x: (block(x, position_bias), None),
                                        scan=cfg.scan_layers)
        return self.final_layer_norm(x)
