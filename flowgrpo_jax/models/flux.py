"""The FLUX.1 transformer (diffusers' `FluxTransformer2DModel`) in Flax NNX.

Numerics follow diffusers (transformer_flux.py: FluxTransformerBlock, FluxSingleTransformerBlock,
FluxAttention with FluxAttnProcessor, FluxPosEmbed; embeddings.py: get_1d_rotary_pos_embed,
apply_rotary_emb, CombinedTimestep(Guidance)TextProjEmbeddings; normalization.py:
AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous). The layers FLUX shares with
the SD3 MMDiT (norms, modulation, embedders, feed-forward) are mmdit.py's.
Submodules keep diffusers' names so the conversion table (flux_table.py) and LoRA patterns stay
short. The renames, as in mmdit.py: `to_out` is diffusers' `to_out.0`, `ff.proj_in` /
`ff.proj_out` are `ff.net.0.proj` / `ff.net.2`, and norms hold `scale` where torch holds `weight`.

Inputs are diffusers' packed latent tokens: no patchify here (FluxPipeline packs 2x2 latent
patches into 64 channels before the model). Text tokens come first in every joint sequence, as
in diffusers, and the single-stream blocks run on that joint sequence, concatenated once before
them and split once after (diffusers concatenates and splits in every block: the same numbers).

Parameters are stored in `param_dtype`, computed in `dtype`; layer-norm statistics, the qk RMS
norm, the rotary embedding (angles, and its application to q and k) and the sinusoidal timestep
features are always float32.
"""
import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowgrpo_jax import remat
from flowgrpo_jax.models import layer_stack
from flowgrpo_jax.models.diffusers_config import architecture_values
from flowgrpo_jax.models.attention import IMPLEMENTATIONS, attention
from flowgrpo_jax.models.mmdit import (TIMESTEP_CHANNELS, AdaLNModulation, FeedForward, MLPEmbedder,
                                       RMSNorm, _layer_norm, _linear, _modulate)

DIFFUSERS_CLASS = "FluxTransformer2DModel"
ROPE_THETA = 10000.0
MLP_RATIO = 4  # the single-stream blocks' MLP width, in model widths
# Keys that configs written before diffusers had them may lack; diffusers' defaults.
_OPTIONAL_DIFFUSERS_KEYS = {"out_channels": None, "axes_dims_rope": (16, 56, 56)}

# Every parameter is trained by full fine-tuning: FLUX has no buffers.
TRAINABLE = nnx.Param
# LoRA targets: the modules the reference Flow-GRPO FLUX run trains (yifan123/flow_grpo,
# scripts/train_flux.py, PEFT suffix matches, here in our names): the double-stream blocks'
# attention projections and feed-forwards, and the single-stream blocks' to_q/to_k/to_v (their
# `attn` has no output projection; proj_mlp and proj_out stay untouched).
LORA_TARGETS = (
    r"(^|\.)attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
    r"(^|\.)(ff|ff_context)\.(proj_in|proj_out)$",
)


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    patch_size: int
    in_channels: int
    num_layers: int
    num_single_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    pooled_projection_dim: int
    guidance_embeds: bool
    out_channels: int | None = None  # None: in_channels, as diffusers reads it
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    remat: str = "none"  # per-block policy for the backward pass (flowgrpo_jax/remat.py)
    attention_impl: str = "auto"
    scan_layers: bool = True  # blocks as scans over stacked params (models/layer_stack.py)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {list(self.axes_dims_rope)} must sum to "
                             f"attention_head_dim ({self.attention_head_dim})")
        if any(d <= 0 or d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {list(self.axes_dims_rope)}: every axis needs a "
                             f"positive, even number of dims (cos/sin pairs)")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {IMPLEMENTATIONS}")
        remat.check_policy(self.remat)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, config: Mapping, *, remat: str = "none", attention_impl: str = "auto",
                       scan_layers: bool = True) -> "FluxConfig":
        """Reads a diffusers `FluxTransformer2DModel` config.json dict, strictly
        (models/diffusers_config.py)."""
        values = architecture_values(cls, config, DIFFUSERS_CLASS, _OPTIONAL_DIFFUSERS_KEYS)
        return cls(**values, remat=remat, attention_impl=attention_impl, scan_layers=scan_layers)


def timestep_embedding(timesteps: jax.Array, dim: int = TIMESTEP_CHANNELS,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0), float32.

    As mmdit.timestep_embedding, but with the frequencies as constants: diffusers' float32
    exponents, exponentiated in float64 and rounded once. XLA's float32 exp is an ulp off on
    some of them, and FLUX's arguments reach thousands of radians (1000x the guidance scale),
    where that ulp moves a feature by 1e-4 and the model output past 1e-5 from diffusers'.
    """
    half = dim // 2
    exponents = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponents.astype(np.float64)).astype(np.float32)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rotary_embedding(ids: jax.Array, axes_dims: tuple[int, ...],
                     theta: float = ROPE_THETA) -> tuple[jax.Array, jax.Array]:
    """diffusers' FluxPosEmbed as (cos, sin), each (tokens, head_dim // 2) float32: the angle of
    each rotated pair of head dims, axis i of `ids` (tokens, n_axes) turning axes_dims[i] // 2
    pairs. diffusers repeats each value for both dims of its pair; apply_rotary keeps one.

    The frequencies are float64 constants rounded once to float32 (diffusers computes them and
    the angles in float64, then rounds cos and sin): the angles here carry float32 rounding.
    """
    if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
        raise ValueError(f"expected position ids of shape (tokens, {len(axes_dims)}), got {ids.shape}")
    freqs = np.concatenate([theta ** -(np.arange(0, d, 2, dtype=np.float64) / d) for d in axes_dims])
    axis = np.repeat(np.arange(len(axes_dims)), [d // 2 for d in axes_dims])
    angles = ids.astype(jnp.float32)[:, axis] * jnp.asarray(freqs, jnp.float32)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, rotary: tuple[jax.Array, jax.Array]) -> jax.Array:
    """diffusers apply_rotary_emb (use_real, pairs of adjacent dims) on (B, S, H, D), in float32."""
    cos, sin = (r[None, :, None, :] for r in rotary)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([real * cos - imag * sin, imag * cos + real * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


class TimeTextEmbed(nnx.Module):
    """diffusers' CombinedTimestepGuidanceTextProjEmbeddings (guidance=True) or
    CombinedTimestepTextProjEmbeddings: the conditioning vector `temb`."""

    def __init__(self, config: FluxConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.timestep_embedder = MLPEmbedder(TIMESTEP_CHANNELS, config.inner_dim, **kw)
        self.guidance_embedder = (MLPEmbedder(TIMESTEP_CHANNELS, config.inner_dim, **kw)
                                  if config.guidance_embeds else None)
        self.text_embedder = MLPEmbedder(config.pooled_projection_dim, config.inner_dim, **kw)

    def _embed(self, embedder: MLPEmbedder, t: jax.Array) -> jax.Array:
        return embedder(timestep_embedding(t).astype(self.dtype))

    def __call__(self, timestep: jax.Array, guidance: jax.Array | None,
                 pooled_projections: jax.Array) -> jax.Array:
        """timestep and guidance on the 0..1000 scale."""
        temb = self._embed(self.timestep_embedder, timestep)
        if self.guidance_embedder is not None:
            temb = temb + self._embed(self.guidance_embedder, guidance)
        return temb + self.text_embedder(pooled_projections)


class FluxAttention(nnx.Module):
    """diffusers FluxAttention with FluxAttnProcessor: qk RMS norm per head, then rotary on the
    queries and keys.

    joint=True (double-stream blocks): context tokens (add_q/k/v_proj) and image tokens
    (to_q/k/v) attend together, context first; outputs through to_add_out and to_out.
    joint=False (single-stream blocks, diffusers' pre_only): self-attention over the given
    tokens, with no output projection (the block's proj_out takes the result).
    """

    def __init__(self, config: FluxConfig, *, joint: bool, dtype, param_dtype, rngs: nnx.Rngs):
        width, head_dim = config.inner_dim, config.attention_head_dim
        self.heads, self.impl = config.num_attention_heads, config.attention_impl
        linear = functools.partial(_linear, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        norm = functools.partial(RMSNorm, head_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.to_q = linear(width, width, ("embed", "heads"))
        self.to_k = linear(width, width, ("embed", "heads"))
        self.to_v = linear(width, width, ("embed", "heads"))
        self.norm_q = norm()
        self.norm_k = norm()
        if joint:
            self.to_out = linear(width, width, ("heads", "embed"))
            self.add_q_proj = linear(width, width, ("embed", "heads"))
            self.add_k_proj = linear(width, width, ("embed", "heads"))
            self.add_v_proj = linear(width, width, ("embed", "heads"))
            self.norm_added_q = norm()
            self.norm_added_k = norm()
            self.to_add_out = linear(width, width, ("heads", "embed"))
        self.joint = joint

    def _split_heads(self, x: jax.Array, norm=None) -> jax.Array:
        x = x.reshape(*x.shape[:2], self.heads, -1)
        return norm(x) if norm is not None else x

    def __call__(self, x: jax.Array, rotary, context: jax.Array | None = None):
        """joint: (image output, context output); else the attention output over `x`. `rotary`:
        the (cos, sin) of every token attending, context tokens first."""
        q = self._split_heads(self.to_q(x), self.norm_q)
        k = self._split_heads(self.to_k(x), self.norm_k)
        v = self._split_heads(self.to_v(x))
        if self.joint:
            q = jnp.concatenate([self._split_heads(self.add_q_proj(context), self.norm_added_q), q], 1)
            k = jnp.concatenate([self._split_heads(self.add_k_proj(context), self.norm_added_k), k], 1)
            v = jnp.concatenate([self._split_heads(self.add_v_proj(context)), v], 1)
        out = attention(apply_rotary(q, rotary), apply_rotary(k, rotary), v, impl=self.impl)
        out = out.reshape(*out.shape[:2], -1)
        if not self.joint:
            return out
        n_context = context.shape[1]
        return self.to_out(out[:, n_context:]), self.to_add_out(out[:, :n_context])


class FluxTransformerBlock(nnx.Module):
    """diffusers FluxTransformerBlock (double stream): AdaLN-Zero modulated joint attention
    and feed-forwards, with separate weights for the image and context streams."""

    def __init__(self, config: FluxConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width = config.inner_dim
        self.norm1 = AdaLNModulation(width, 6, **kw)
        self.norm1_context = AdaLNModulation(width, 6, **kw)
        self.attn = FluxAttention(config, joint=True, **kw)
        self.ff = FeedForward(width, **kw)
        self.ff_context = FeedForward(width, **kw)

    def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array, rotary):
        """Returns (image tokens, context tokens)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        (c_shift_msa, c_scale_msa, c_gate_msa,
         c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(temb)
        attn_out, context_attn_out = self.attn(
            _modulate(_layer_norm(x), shift_msa, scale_msa, x.dtype), rotary,
            _modulate(_layer_norm(context), c_shift_msa, c_scale_msa, context.dtype))

        x = x + gate_msa[:, None] * attn_out
        x = x + gate_mlp[:, None] * self.ff(_modulate(_layer_norm(x), shift_mlp, scale_mlp, x.dtype))
        context = context + c_gate_msa[:, None] * context_attn_out
        ff_in = _modulate(_layer_norm(context), c_shift_mlp, c_scale_mlp, context.dtype)
        return x, context + c_gate_mlp[:, None] * self.ff_context(ff_in)


class FluxSingleTransformerBlock(nnx.Module):
    """diffusers FluxSingleTransformerBlock (single stream) on the joint (context, image)
    sequence: one AdaLN-Zero modulated input feeds attention and a tanh-GELU MLP in parallel,
    and proj_out maps their concatenation back to the model width."""

    def __init__(self, config: FluxConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width, mlp_width = config.inner_dim, MLP_RATIO * config.inner_dim
        self.norm = AdaLNModulation(width, 3, **kw)
        self.proj_mlp = _linear(width, mlp_width, ("embed", "mlp"), **kw)
        self.proj_out = _linear(width + mlp_width, width, ("mlp", "embed"), **kw)
        self.attn = FluxAttention(config, joint=False, **kw)

    def __call__(self, x: jax.Array, temb: jax.Array, rotary) -> jax.Array:
        shift, scale, gate = self.norm(temb)
        normed = _modulate(_layer_norm(x), shift, scale, x.dtype)
        mlp = jax.nn.gelu(self.proj_mlp(normed), approximate=True)
        out = self.proj_out(jnp.concatenate([self.attn(normed, rotary), mlp], axis=-1))
        return x + gate[:, None] * out


class FluxTransformer(nnx.Module):
    """FLUX.1 transformer: `model(hidden_states, timestep, encoder_hidden_states,
    pooled_projections, img_ids, txt_ids, guidance)`.

    hidden_states: packed latent tokens (B, L, in_channels); timestep: (B,) on diffusers' 0..1
    scale (sigma; the model multiplies by 1000, as diffusers does); encoder_hidden_states:
    (B, T, joint_attention_dim); pooled_projections: (B, pooled_projection_dim); img_ids (L, 3)
    and txt_ids (T, 3): position ids for the rotary embedding; guidance: (B,) the guidance scale
    (FLUX.1-dev: e.g. 3.5; also multiplied by 1000 inside), required iff config.guidance_embeds,
    else None.
    Returns the velocity (B, L, patch_size**2 * out_channels) in `dtype`.
    """

    def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width, p = config.inner_dim, config.patch_size
        self.config, self.dtype = config, dtype
        self.time_text_embed = TimeTextEmbed(config, **kw)
        self.context_embedder = _linear(config.joint_attention_dim, width, ("embed", "mlp"), **kw)
        self.x_embedder = _linear(config.in_channels, width, ("conv_in", "embed"), **kw)
        self.transformer_blocks = nnx.List(
            [FluxTransformerBlock(config, **kw) for _ in range(config.num_layers)])
        self.single_transformer_blocks = nnx.List(
            [FluxSingleTransformerBlock(config, **kw) for _ in range(config.num_single_layers)])
        self.norm_out = AdaLNModulation(width, 2, **kw)
        self.proj_out = _linear(width, p * p * config.out_channels, ("embed", "mlp"), **kw)

    def _check_inputs(self, hidden_states, timestep, encoder_hidden_states, img_ids, txt_ids,
                      guidance):
        config = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != config.in_channels:
            raise ValueError(f"expected packed latent tokens (B, L, {config.in_channels}), got "
                             f"{hidden_states.shape}")
        batch, length = hidden_states.shape[:2]
        if timestep.shape != (batch,):
            raise ValueError(f"expected timestep of shape ({batch},), got {timestep.shape}")
        if config.guidance_embeds and (guidance is None or guidance.shape != (batch,)):
            raise ValueError(f"this model embeds guidance: expected guidance of shape ({batch},), "
                             f"got {None if guidance is None else guidance.shape}")
        if not config.guidance_embeds and guidance is not None:
            raise ValueError("this model has no guidance embedding (guidance_embeds is false); "
                             "pass guidance=None")
        n_axes = len(config.axes_dims_rope)
        for name, ids, tokens in (("img_ids", img_ids, length),
                                  ("txt_ids", txt_ids, encoder_hidden_states.shape[1])):
            if ids.shape != (tokens, n_axes):
                raise ValueError(f"expected {name} of shape ({tokens}, {n_axes}), got {ids.shape}")

    def __call__(self, hidden_states: jax.Array, timestep: jax.Array,
                 encoder_hidden_states: jax.Array, pooled_projections: jax.Array,
                 img_ids: jax.Array, txt_ids: jax.Array,
                 guidance: jax.Array | None = None) -> jax.Array:
        config = self.config
        self._check_inputs(hidden_states, timestep, encoder_hidden_states, img_ids, txt_ids,
                           guidance)
        timestep = timestep.astype(jnp.float32) * 1000  # diffusers' 0..1000 scale, in float32
        if guidance is not None:
            guidance = guidance.astype(jnp.float32) * 1000
        temb = self.time_text_embed(timestep, guidance, pooled_projections)
        hidden = self.x_embedder(hidden_states)
        context = self.context_embedder(encoder_hidden_states)
        rotary = rotary_embedding(jnp.concatenate([txt_ids, img_ids], axis=0), config.axes_dims_rope)

        (hidden, context), _ = layer_stack.apply_layers(
            self.transformer_blocks, (hidden, context),
            lambda block, carry: (block(*carry, temb, rotary), None),
            scan=config.scan_layers, policy=config.remat)
        joint, _ = layer_stack.apply_layers(
            self.single_transformer_blocks, jnp.concatenate([context, hidden], axis=1),
            lambda block, x: (block(x, temb, rotary), None),
            scan=config.scan_layers, policy=config.remat)
        hidden = joint[:, context.shape[1]:]
        scale, shift = self.norm_out(temb)  # AdaLayerNormContinuous: scale first
        return self.proj_out(_modulate(_layer_norm(hidden), shift, scale, self.dtype))
