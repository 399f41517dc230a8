"""The toy world's text-to-image model: a small MMDiT (the SD3.5 code) and the toy text encoder.

Latents are the RGB image itself in [-1, 1], NHWC, so there is no VAE. A 16 px patch makes
one token per cell of the scene grid, the pixel footprint of an SD3 token (8x VAE, patch 2).
The encoder's per-token states are the MMDiT's `encoder_hidden_states` and its <cls> state
the `pooled_projections`.

The MMDiT predicts the clean image x0 and the velocity is derived from it, v = (x - x0) / sigma
(sigma floored at MIN_SIGMA): a patch of pixels (16*16*3 = 768 values) is far wider than the
model (96), so a predicted velocity, which must carry the noise, cannot be represented exactly and
samples keep visible noise; a clean image of flat shapes can ("Back to Basics: Let Denoising
Generative Models Denoise", Li & He 2025). The RL code only ever sees the velocity.

On disk a model is a folder of two files: `config.json` (`ToyModelConfig` as JSON) and
`params.npz`, every float32 parameter under its path ("transformer/..." or "text_encoder/...",
parts joined by "/"). Loading checks the stored names and shapes against the model first.
"""
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowgrpo_jax.models.abstract import abstract_module
from flowgrpo_jax.models.mmdit import MMDiT, MMDiTConfig
from flowgrpo_jax.families.toy.text import DEFAULT_MAX_LENGTH, TextEncoder, Tokenizer
from flowgrpo_jax.families.toy.world import DEFAULT_IMAGE_SIZE

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.npz"
SHIPPED = os.path.join(os.path.dirname(__file__), "checkpoint")
MIN_SIGMA = 0.05  # floor of the sigma that divides x - x0: bounds v near the data end


@dataclasses.dataclass(frozen=True)
class ToyModelConfig:
    image_size: int = DEFAULT_IMAGE_SIZE
    patch_size: int = 16  # one token per cell of the scene grid (scenes.py)
    width: int = 96  # MMDiT width = heads * head_dim
    heads: int = 3
    layers: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_embed_std: float = 1.0  # init std of the text encoder's embeddings (text.py)
    max_length: int = DEFAULT_MAX_LENGTH
    shift: float = 3.0  # flow-match shift of the sampler's schedule and of pretraining's times

    def mmdit_config(self, remat: str = "none") -> MMDiTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        grid = self.image_size // self.patch_size
        return MMDiTConfig(
            sample_size=self.image_size, patch_size=self.patch_size, in_channels=3, out_channels=3,
            num_layers=self.layers, attention_head_dim=self.width // self.heads,
            num_attention_heads=self.heads, joint_attention_dim=self.text_width,
            caption_projection_dim=self.width, pooled_projection_dim=self.text_width,
            pos_embed_max_size=grid, remat=remat)

    @classmethod
    def from_dict(cls, values: dict) -> "ToyModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown keys in the toy model config: {unknown}")
        return cls(**values)


def sincos_positions(grid: int, dim: int) -> np.ndarray:
    """(grid*grid, dim) 2-D sin-cos position features: half the dims code the row, half the column.

    Frequencies k*pi/n radians per cell (k = 1..n, n = dim/4), not SD3's geometric ones from 1
    down to 1/10000. Over a 3x3 grid those are nearly constant: the cells' features differ by a
    norm of about 1.4 against about 12 for a noise patch's embedding, so at high noise, where
    the layout is decided, a token cannot tell which cell it is and a layout asked for in the
    text ("A left of B") cannot be learnt (docs/demo.md, "Why position barely moves"). These
    keep any two cells 6.9 apart at width 96."""
    if dim % 4:
        raise ValueError(f"width {dim} is not a multiple of 4")
    omega = np.pi * np.arange(1, dim // 4 + 1) / (dim // 4)
    rows, columns = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    angles = [pos.reshape(-1, 1) * omega for pos in (rows, columns)]
    return np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)], axis=1).astype(np.float32)


class ToyModel(nnx.Module):
    """The two trained parts: `transformer` (velocity) and `text_encoder` (frozen during RL)."""

    def __init__(self, config: ToyModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: str = "none"):
        self.config = config
        self.transformer = MMDiT(config.mmdit_config(remat), rngs=rngs, dtype=dtype,
                                 param_dtype=param_dtype)
        # SD3 ships its position table as 2-D sin-cos values of magnitude ~1; the MMDiT's own
        # init (N(0, 0.02), for converted weights) would leave the positions of a randomly
        # initialised model drowned by the patches' noise, and the layout unlearnable.
        grid = config.image_size // config.patch_size
        self.transformer.pos_embed.pos_embed.set_value(
            sincos_positions(grid, config.width)[None].astype(param_dtype))
        self.text_encoder = TextEncoder(
            Tokenizer(max_length=config.max_length).vocab_size, config.max_length,
            width=config.text_width, depth=config.text_layers, heads=config.text_heads,
            embed_std=config.text_embed_std,
            rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def velocity(self, x, t, ids, mask):
        """x (B, H, W, 3) in [-1, 1], t (B,) = 1000*sigma, token ids/mask (B, L) -> v."""
        states, pooled = self.text_encoder(ids, mask)
        return velocity_from_x0(self.transformer, x, t, states, pooled)


def velocity_from_x0(transformer: MMDiT, x, t, states, pooled):
    """v = (x - x0_hat) / sigma, float32, with the MMDiT's output as x0_hat."""
    x0_hat = transformer(x, t, states, pooled).astype(jnp.float32)
    sigma = jnp.maximum(t.astype(jnp.float32) / 1000.0, MIN_SIGMA)[:, None, None, None]
    return (x.astype(jnp.float32) - x0_hat) / sigma


def _flat_params(module: nnx.Module) -> dict[str, np.ndarray]:
    state = nnx.state(module, nnx.Param)
    return {"/".join(str(k) for k in path): np.asarray(var.get_value())
            for path, var in nnx.to_flat_state(state)}


def save(folder: str, model: ToyModel) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(model.config), f, indent=2)
    np.savez(os.path.join(folder, PARAMS_FILE), **_flat_params(model))


def read_config(folder: str) -> ToyModelConfig:
    for name in (CONFIG_FILE, PARAMS_FILE):
        if not os.path.exists(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder} is not a toy model folder: {name} is missing")
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        return ToyModelConfig.from_dict(json.load(f))


def abstract(folder: str = SHIPPED, remat: str = "none", dtype=jnp.float32) -> ToyModel:
    """The model stored in `folder` as shapes only (nnx.eval_shape), no weights read."""
    config = read_config(folder)
    return abstract_module(lambda rngs: ToyModel(config, rngs=rngs, remat=remat, dtype=dtype))


def load(folder: str = SHIPPED, remat: str = "none", dtype=jnp.float32) -> ToyModel:
    """The model stored in `folder` (default: the shipped base checkpoint); `remat` is the
    MMDiT's per-block policy (flowgrpo_jax/remat.py), `dtype` what it computes in (its
    parameters stay float32)."""
    params_path = os.path.join(folder, PARAMS_FILE)
    graphdef, params, rest = nnx.split(abstract(folder, remat, dtype), nnx.Param, ...)
    with np.load(params_path) as stored:
        stored = dict(stored)
    expected = {"/".join(str(k) for k in path): var for path, var in nnx.to_flat_state(params)}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    misshaped = [f"{k}: stored {stored[k].shape}, model {expected[k].shape}"
                 for k in expected if k in stored and stored[k].shape != tuple(expected[k].shape)]
    if missing or unexpected or misshaped:
        raise ValueError(f"{params_path} does not match its config: missing {missing[:10]},"
                         f" unexpected {unexpected[:10]}, wrong shape {misshaped[:10]}")
    for name, var in expected.items():
        var.set_value(jnp.asarray(stored[name], var.dtype))
    return nnx.merge(graphdef, params, rest)
