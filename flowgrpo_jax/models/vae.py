"""diffusers' AutoencoderKL (the SD3 VAE: 16 latent channels, 8x downsampling) in Flax NNX.

Images and latents are NHWC. Module names follow diffusers so the conversion table
(`flowgrpo_jax/models/vae_table.py`) stays short; single up/down samplers and the single
mid-block attention drop diffusers' one-element lists.
"""
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flowgrpo_jax.models.attention import attention

_CONV_NAMES = (None, None, "conv_in", "conv_out")
_EPS = 1e-6  # diffusers' resnet and attention group-norm epsilon in the VAE


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The AutoencoderKL config fields that shape the network; defaults are diffusers'."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_diffusers(cls, config: dict) -> "VAEConfig":
        """Reads a diffusers AutoencoderKL config.json dict, refusing variants not ported here."""
        for key, allowed in (("down_block_types", "DownEncoderBlock2D"),
                             ("up_block_types", "UpDecoderBlock2D")):
            kinds = set(config.get(key, [allowed]))
            if kinds != {allowed}:
                raise ValueError(f"VAE {key} {sorted(kinds)} not supported; only {allowed}")
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"VAE act_fn {config['act_fn']!r} not supported; only 'silu'")
        if config.get("latents_mean") is not None or config.get("latents_std") is not None:
            raise ValueError("VAE latents_mean / latents_std normalisation not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        if kwargs.get("shift_factor") is None:
            kwargs["shift_factor"] = 0.0
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        return cls(**kwargs)


def _conv(cin, cout, kernel, *, rngs, param_dtype, dtype, stride=1, padding=None):
    pad = kernel // 2 if padding is None else padding
    return nnx.Conv(
        cin, cout, (kernel, kernel), strides=stride,
        padding=pad if isinstance(pad, tuple) else ((pad, pad), (pad, pad)),
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), _CONV_NAMES,
                                          eager_sharding=False),
        rngs=rngs, param_dtype=param_dtype, dtype=dtype)


def _group_norm(channels, groups, *, rngs, param_dtype, dtype):
    # nnx.GroupNorm computes its statistics in float32 whatever the compute dtype.
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=_EPS, use_fast_variance=False,
                         rngs=rngs, param_dtype=param_dtype, dtype=dtype)


def _linear(cin, cout, names, *, rngs, param_dtype, dtype):
    return nnx.Linear(
        cin, cout,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names,
                                          eager_sharding=False),
        rngs=rngs, param_dtype=param_dtype, dtype=dtype)


class ResnetBlock(nnx.Module):
    def __init__(self, cin, cout, groups, **kw):
        self.norm1 = _group_norm(cin, groups, **kw)
        self.conv1 = _conv(cin, cout, 3, **kw)
        self.norm2 = _group_norm(cout, groups, **kw)
        self.conv2 = _conv(cout, cout, 3, **kw)
        self.conv_shortcut = _conv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class SpatialAttention(nnx.Module):
    """Single-head self-attention over all pixels, with a residual (diffusers' VAE Attention)."""

    def __init__(self, channels, groups, **kw):
        self.group_norm = _group_norm(channels, groups, **kw)
        self.to_q = _linear(channels, channels, ("embed", "heads"), **kw)
        self.to_k = _linear(channels, channels, ("embed", "heads"), **kw)
        self.to_v = _linear(channels, channels, ("embed", "heads"), **kw)
        self.to_out = _linear(channels, channels, ("heads", "embed"), **kw)

    def __call__(self, x):
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = (proj(tokens).reshape(b, h * w, 1, c) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out(attention(q, k, v).reshape(b, h * w, c))
        return x + out.reshape(b, h, w, c)


class MidBlock(nnx.Module):
    def __init__(self, channels, groups, add_attention, **kw):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, **kw) for _ in range(2)])
        self.attention = SpatialAttention(channels, groups, **kw) if add_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after zero-padding only the bottom and right edges, as diffusers does."""

    def __init__(self, channels, **kw):
        self.conv = _conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), **kw)

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels, **kw):
        self.conv = _conv(channels, channels, 3, **kw)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownEncoderBlock(nnx.Module):
    def __init__(self, cin, cout, num_layers, groups, add_downsample, **kw):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, **kw)
                                 for i in range(num_layers)])
        self.downsample = Downsample(cout, **kw) if add_downsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class UpDecoderBlock(nnx.Module):
    def __init__(self, cin, cout, num_layers, groups, add_upsample, **kw):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, **kw)
                                 for i in range(num_layers)])
        self.upsample = Upsample(cout, **kw) if add_upsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, **kw):
        channels, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, channels[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock(channels[max(i - 1, 0)], c, cfg.layers_per_block, groups,
                             add_downsample=i < len(channels) - 1, **kw)
            for i, c in enumerate(channels)])
        self.mid_block = MidBlock(channels[-1], groups, cfg.mid_block_add_attention, **kw)
        self.conv_norm_out = _group_norm(channels[-1], groups, **kw)
        self.conv_out = _conv(channels[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, **kw):
        channels, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, channels[0], 3, **kw)
        self.mid_block = MidBlock(channels[0], groups, cfg.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List([
            UpDecoderBlock(channels[max(i - 1, 0)], c, cfg.layers_per_block + 1, groups,
                           add_upsample=i < len(channels) - 1, **kw)
            for i, c in enumerate(channels)])
        self.conv_norm_out = _group_norm(channels[-1], groups, **kw)
        self.conv_out = _conv(channels[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=jnp.float32):
        self.config = config
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        latent = config.latent_channels
        self.quant_conv = _conv(2 * latent, 2 * latent, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = (_conv(latent, latent, 1, **kw) if config.use_post_quant_conv
                                else None)

    def _check_channels(self, x, expected, what):
        if x.ndim != 4 or x.shape[-1] != expected:
            raise ValueError(f"VAE {what} must be NHWC with {expected} channels, got shape {x.shape}")

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """NHWC images in [-1, 1] -> (mean, logvar) of the latent posterior, logvar clipped."""
        self._check_channels(images, self.config.in_channels, "images")
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Raw (unscaled) NHWC latents -> NHWC images, nominally in [-1, 1]."""
        self._check_channels(latents, self.config.latent_channels, "latents")
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def latents_from_mean(self, mean: jax.Array) -> jax.Array:
        """Posterior mean -> the normalised latents the diffusion model works in."""
        return (mean - self.config.shift_factor) * self.config.scaling_factor

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Normalised diffusion latents -> images (inverse of `latents_from_mean`, then decode)."""
        return self.decode(latents / self.config.scaling_factor + self.config.shift_factor)
