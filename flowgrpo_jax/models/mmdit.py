"""The SD3 / SD3.5 MMDiT (diffusers' `SD3Transformer2DModel`) in Flax NNX.

Numerics follow diffusers (transformer_sd3.py, attention.py JointTransformerBlock,
attention_processor.py JointAttnProcessor2_0, normalization.py, embeddings.py); images are NHWC.
Submodules keep diffusers' names so the conversion table (mmdit_table.py) and LoRA
patterns stay short. The renames: `to_out` is diffusers' `to_out.0`, `ff.proj_in` / `ff.proj_out`
are `ff.net.0.proj` / `ff.net.2`, and norms hold `scale` where torch holds `weight`.

Parameters are stored in `param_dtype`, computed in `dtype`; layer-norm statistics, the qk RMS
norm and the sinusoidal timestep features are always float32.
"""
import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from flowgrpo_jax import remat
from flowgrpo_jax.models import layer_stack
from flowgrpo_jax.models.diffusers_config import architecture_values
from flowgrpo_jax.models.attention import IMPLEMENTATIONS, attention

TIMESTEP_CHANNELS = 256
NORM_EPS = 1e-6
DIFFUSERS_CLASS = "SD3Transformer2DModel"
# Keys that configs written before SD3.5 lack; diffusers' defaults.
_OPTIONAL_DIFFUSERS_KEYS = {"dual_attention_layers": (), "qk_norm": None}
_QK_NORMS = (None, "rms_norm")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    sample_size: int
    patch_size: int
    in_channels: int
    num_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    caption_projection_dim: int
    pooled_projection_dim: int
    out_channels: int
    pos_embed_max_size: int
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    remat: str = "none"  # per-block policy for the backward pass (flowgrpo_jax/remat.py)
    attention_impl: str = "auto"
    scan_layers: bool = True  # blocks as scans over stacked params (models/layer_stack.py)

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        if self.qk_norm not in _QK_NORMS:
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported; expected one of {_QK_NORMS}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal num_attention_heads"
                f" * attention_head_dim ({self.inner_dim}): the joint blocks use one width")
        outside = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if outside:
            raise ValueError(f"dual_attention_layers {outside} outside 0..{self.num_layers - 1}")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {IMPLEMENTATIONS}")
        remat.check_policy(self.remat)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, config: Mapping, *, remat: str = "none", attention_impl: str = "auto",
                       scan_layers: bool = True) -> "MMDiTConfig":
        """Reads a diffusers `SD3Transformer2DModel` config.json dict, strictly
        (models/diffusers_config.py)."""
        values = architecture_values(cls, config, DIFFUSERS_CLASS, _OPTIONAL_DIFFUSERS_KEYS)
        if values["out_channels"] is None:
            values["out_channels"] = values["in_channels"]  # diffusers' meaning of null
        return cls(**values, remat=remat, attention_impl=attention_impl, scan_layers=scan_layers)


class Buffer(nnx.Param):
    """A converted weight that diffusers keeps as a buffer: loaded like a parameter, but not
    counted as one, and not trained (`TRAINABLE`)."""


# The weights full fine-tuning trains: every parameter but the buffers (the position table).
TRAINABLE = nnx.All(nnx.Param, nnx.Not(Buffer))
# LoRA targets: the joint attention projections (diffusers names; `to_out` may be `to_out.0`).
# `(^|\.)attn\.` anchors on a submodule named exactly "attn", so the dual attention "attn2" and
# the feed-forward layers stay untouched.
JOINT_ATTENTION = (
    r"(^|\.)attn\.(to_q|to_k|to_v|to_out(\.0)?|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
)


def _partitioned(init, axes):
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def _linear(in_features, out_features, axes, *, rngs, dtype, param_dtype):
    return nnx.Linear(
        in_features, out_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=_partitioned(nnx.initializers.lecun_normal(), axes),
        bias_init=_partitioned(nnx.initializers.zeros_init(), (None,)))


def timestep_embedding(timesteps: jax.Array, dim: int = TIMESTEP_CHANNELS,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0), float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _layer_norm(x: jax.Array) -> jax.Array:
    """Affine-free LayerNorm (eps 1e-6) in float32; returns float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + NORM_EPS)


def _modulate(normed: jax.Array, shift: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    return (normed * (1 + scale[:, None, :]) + shift[:, None, :]).astype(dtype)


class RMSNorm(nnx.Module):
    """diffusers RMSNorm over the last axis with a learned scale (the qk norm)."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.scale = nnx.Param(_partitioned(nnx.initializers.ones_init(), (None,))(
            rngs.params(), (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.square(x).mean(axis=-1, keepdims=True) + NORM_EPS)
        return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class PatchEmbed(nnx.Module):
    """Patchify conv (HWIO kernel) plus learned positions centre-cropped from a
    pos_embed_max_size^2 table, as diffusers' PatchEmbed with pos_embed_max_size."""

    def __init__(self, config: MMDiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p, width = config.patch_size, config.inner_dim
        self.patch_size, self.max_size, self.dtype = p, config.pos_embed_max_size, dtype
        self.proj = nnx.Conv(
            config.in_channels, width, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
            kernel_init=_partitioned(nnx.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
            bias_init=_partitioned(nnx.initializers.zeros_init(), (None,)))
        self.pos_embed = Buffer(_partitioned(nnx.initializers.normal(0.02), (None, None, "embed"))(
            rngs.params(), (1, self.max_size ** 2, width), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, _ = x.shape
        p, m = self.patch_size, self.max_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {p}")
        gh, gw = height // p, width // p
        if gh > m or gw > m:
            raise ValueError(f"latent grid {gh}x{gw} patches exceeds pos_embed_max_size {m}")
        tokens = self.proj(x).reshape(batch, gh * gw, -1)
        top, left = (m - gh) // 2, (m - gw) // 2
        table = self.pos_embed[...].reshape(m, m, -1)[top:top + gh, left:left + gw]
        positions = table.reshape(1, gh * gw, -1).astype(jnp.float32)
        return (tokens.astype(jnp.float32) + positions).astype(self.dtype)


class MLPEmbedder(nnx.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding and the SiLU
    PixArtAlphaTextProjection have this same form)."""

    def __init__(self, in_features: int, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = functools.partial(_linear, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = linear(in_features, width, ("embed", "mlp"))
        self.linear_2 = linear(width, width, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeTextEmbed(nnx.Module):
    """diffusers' CombinedTimestepTextProjEmbeddings: the conditioning vector `temb`."""

    def __init__(self, config: MMDiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.timestep_embedder = MLPEmbedder(TIMESTEP_CHANNELS, config.inner_dim, **kw)
        self.text_embedder = MLPEmbedder(config.pooled_projection_dim, config.inner_dim, **kw)

    def __call__(self, timestep: jax.Array, pooled_projections: jax.Array) -> jax.Array:
        t = self.timestep_embedder(timestep_embedding(timestep).astype(self.dtype))
        return t + self.text_embedder(pooled_projections)


class AdaLNModulation(nnx.Module):
    """The conditioning projection of AdaLayerNormZero (6 chunks), SD35AdaLayerNormZeroX (9) and
    AdaLayerNormContinuous (2): SiLU(temb) -> `linear` -> `chunks` vectors of the model width."""

    def __init__(self, width: int, chunks: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.chunks = chunks
        self.linear = _linear(width, chunks * width, ("embed", "mlp"), rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)

    def __call__(self, temb: jax.Array) -> list[jax.Array]:
        return jnp.split(self.linear(jax.nn.silu(temb)), self.chunks, axis=-1)


class FeedForward(nnx.Module):
    """diffusers FeedForward(activation_fn="gelu-approximate"): width -> 4*width -> width."""

    def __init__(self, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = functools.partial(_linear, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj_in = linear(width, 4 * width, ("embed", "mlp"))
        self.proj_out = linear(4 * width, width, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=True))


class JointAttention(nnx.Module):
    """diffusers Attention with JointAttnProcessor2_0.

    joint=True: image tokens (to_q/k/v) and context tokens (add_q/k/v_proj) attend together,
    image first; the context part of the output goes through to_add_out, except in the
    context_pre_only last block, where it is dropped. joint=False: self-attention on the image
    tokens only (SD3.5's attn2).
    """

    def __init__(self, config: MMDiTConfig, *, joint: bool, context_pre_only: bool = False,
                 dtype, param_dtype, rngs: nnx.Rngs):
        width, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.heads, self.impl = heads, config.attention_impl
        linear = functools.partial(_linear, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        norm = functools.partial(RMSNorm, head_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        qk_norm = config.qk_norm is not None
        self.to_q = linear(width, width, ("embed", "heads"))
        self.to_k = linear(width, width, ("embed", "heads"))
        self.to_v = linear(width, width, ("embed", "heads"))
        self.norm_q = norm() if qk_norm else None
        self.norm_k = norm() if qk_norm else None
        self.to_out = linear(width, width, ("heads", "embed"))
        self.add_q_proj = linear(width, width, ("embed", "heads")) if joint else None
        self.add_k_proj = linear(width, width, ("embed", "heads")) if joint else None
        self.add_v_proj = linear(width, width, ("embed", "heads")) if joint else None
        self.norm_added_q = norm() if joint and qk_norm else None
        self.norm_added_k = norm() if joint and qk_norm else None
        self.to_add_out = (linear(width, width, ("heads", "embed"))
                           if joint and not context_pre_only else None)

    def _split_heads(self, x: jax.Array, norm) -> jax.Array:
        x = x.reshape(*x.shape[:2], self.heads, -1)
        return norm(x) if norm is not None else x

    def __call__(self, x: jax.Array, context: jax.Array | None = None):
        """Returns (image output, context output or None)."""
        q = self._split_heads(self.to_q(x), self.norm_q)
        k = self._split_heads(self.to_k(x), self.norm_k)
        v = self._split_heads(self.to_v(x), None)
        context_out_wanted = context is not None and self.to_add_out is not None
        if context is not None:
            # The context_pre_only block drops the context rows of the output: its context tokens
            # are keys and values only, and their queries are not computed at all.
            if context_out_wanted:
                q = jnp.concatenate([q, self._split_heads(self.add_q_proj(context), self.norm_added_q)], 1)
            k = jnp.concatenate([k, self._split_heads(self.add_k_proj(context), self.norm_added_k)], 1)
            v = jnp.concatenate([v, self._split_heads(self.add_v_proj(context), None)], 1)
        out = attention(q, k, v, impl=self.impl)
        out = out.reshape(*out.shape[:2], -1)
        n_image = x.shape[1]
        context_out = self.to_add_out(out[:, n_image:]) if context_out_wanted else None
        return self.to_out(out[:, :n_image]), context_out


class JointTransformerBlock(nnx.Module):
    """diffusers JointTransformerBlock: AdaLN-Zero modulated joint attention and feed-forwards
    for the image and context streams; SD3.5's optional attn2; context_pre_only in the last."""

    def __init__(self, config: MMDiTConfig, *, context_pre_only: bool, dual_attention: bool,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width = config.inner_dim
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLNModulation(width, 9 if dual_attention else 6, **kw)
        self.norm1_context = AdaLNModulation(width, 2 if context_pre_only else 6, **kw)
        self.attn = JointAttention(config, joint=True, context_pre_only=context_pre_only, **kw)
        self.attn2 = JointAttention(config, joint=False, **kw) if dual_attention else None
        self.ff = FeedForward(width, **kw)
        self.ff_context = None if context_pre_only else FeedForward(width, **kw)

    def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array):
        """Returns (image tokens, context tokens; None after the context_pre_only block)."""
        mods = self.norm1(temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed = _layer_norm(x)
        normed_context = _layer_norm(context)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(temb)  # AdaLayerNormContinuous: scale first
            context_in = _modulate(normed_context, c_shift, c_scale, context.dtype)
        else:
            (c_shift_msa, c_scale_msa, c_gate_msa,
             c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(temb)
            context_in = _modulate(normed_context, c_shift_msa, c_scale_msa, context.dtype)

        attn_out, context_attn_out = self.attn(_modulate(normed, shift_msa, scale_msa, x.dtype),
                                               context_in)
        x = x + gate_msa[:, None] * attn_out
        if self.attn2 is not None:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            attn2_out, _ = self.attn2(_modulate(normed, shift_msa2, scale_msa2, x.dtype))
            x = x + gate_msa2[:, None] * attn2_out
        x = x + gate_mlp[:, None] * self.ff(_modulate(_layer_norm(x), shift_mlp, scale_mlp, x.dtype))

        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa[:, None] * context_attn_out
        ff_in = _modulate(_layer_norm(context), c_shift_mlp, c_scale_mlp, context.dtype)
        return x, context + c_gate_mlp[:, None] * self.ff_context(ff_in)


def _unpatchify(tokens: jax.Array, height: int, width: int, patch: int) -> jax.Array:
    """(B, N, p*p*C) patch tokens -> (B, H, W, C), the NHWC form of diffusers' unpatchify."""
    batch, gh, gw = tokens.shape[0], height // patch, width // patch
    x = tokens.reshape(batch, gh, gw, patch, patch, -1)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, -1)


class MMDiT(nnx.Module):
    """SD3 / SD3.5 transformer: `model(x, timestep, encoder_hidden_states, pooled_projections)`.

    x: latents (B, H, W, in_channels); timestep: (B,) on diffusers' 0..1000 scale (1000*sigma);
    encoder_hidden_states: (B, L, joint_attention_dim); pooled_projections:
    (B, pooled_projection_dim). Returns the velocity (B, H, W, out_channels) in `dtype`.
    """

    def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width, p = config.inner_dim, config.patch_size
        self.config, self.dtype = config, dtype
        self.pos_embed = PatchEmbed(config, **kw)
        self.time_text_embed = TimeTextEmbed(config, **kw)
        self.context_embedder = _linear(config.joint_attention_dim, config.caption_projection_dim,
                                        ("embed", "mlp"), **kw)
        self.transformer_blocks = nnx.List([
            JointTransformerBlock(config, context_pre_only=i == config.num_layers - 1,
                                  dual_attention=i in config.dual_attention_layers, **kw)
            for i in range(config.num_layers)])
        self.norm_out = AdaLNModulation(width, 2, **kw)
        self.proj_out = _linear(width, p * p * config.out_channels, ("embed", "mlp"), **kw)

    def __call__(self, x: jax.Array, timestep: jax.Array, encoder_hidden_states: jax.Array,
                 pooled_projections: jax.Array) -> jax.Array:
        config = self.config
        if x.ndim != 4 or x.shape[-1] != config.in_channels:
            raise ValueError(f"expected NHWC latents (B, H, W, {config.in_channels}), got {x.shape}")
        if timestep.shape != (x.shape[0],):
            raise ValueError(f"expected timestep of shape ({x.shape[0]},), got {timestep.shape}")
        hidden = self.pos_embed(x)
        temb = self.time_text_embed(timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        (hidden, _), _ = layer_stack.apply_layers(
            self.transformer_blocks, (hidden, context),
            lambda block, carry: (block(*carry, temb), None),
            scan=config.scan_layers, policy=config.remat)
        scale, shift = self.norm_out(temb)  # AdaLayerNormContinuous: scale first
        hidden = self.proj_out(_modulate(_layer_norm(hidden), shift, scale, self.dtype))
        return _unpatchify(hidden, x.shape[1], x.shape[2], config.patch_size)
