"""transformers' `CLIPTextModel` (FLUX's CLIP-L/14: its pooled output) and
`CLIPTextModelWithProjection` (SD3's CLIP-L/14 and CLIP-G/14: the pooled output projected) in
Flax NNX.

Causal self-attention over the tokens, as in transformers; no padding mask (SD3 passes none).
Module names follow transformers' with the `text_model.encoder` / `text_model.embeddings`
prefixes dropped (see `flowgrpo_jax/models/clip_table.py`).
"""
import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flowgrpo_jax.models import layer_stack
from flowgrpo_jax.models.attention import IMPLEMENTATIONS, attention

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
# transformers' pooling rule: configs from before its PR #24773 carry eos_token_id 2 and pool
# at the largest token id (the EOS token is the last in the vocabulary).
_LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' CLIPTextConfig that shape the network; defaults are its."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    attention_impl: str = "auto"
    scan_layers: bool = True  # layers as a scan over stacked params (models/layer_stack.py)

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {self.hidden_act!r} not supported; "
                             f"expected one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {IMPLEMENTATIONS}")

    @classmethod
    def from_transformers(cls, config: Mapping, *, attention_impl: str = "auto",
                          scan_layers: bool = True) -> "CLIPTextConfig":
        """Reads a transformers CLIPTextConfig config.json dict (other keys are bookkeeping)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"attention_impl", "scan_layers"}
        return cls(**{k: v for k, v in config.items() if k in fields},
                   attention_impl=attention_impl, scan_layers=scan_layers)


class CLIPTextOutput(NamedTuple):
    hidden_states: tuple  # the embeddings, then every layer's output (before the final norm)
    last_hidden_state: jax.Array  # final layer norm of hidden_states[-1]
    pooler_output: jax.Array  # last_hidden_state at the EOS token
    text_embeds: jax.Array | None  # text_projection of pooler_output (None: CLIPTextModel)


def _linear(cin, cout, names, *, rngs, param_dtype, dtype, use_bias=True):
    return nnx.Linear(
        cin, cout, use_bias=use_bias,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names,
                                          eager_sharding=False),
        rngs=rngs, param_dtype=param_dtype, dtype=dtype)


def _layer_norm(cfg, *, rngs, param_dtype, dtype):
    # nnx.LayerNorm computes its statistics in float32 whatever the compute dtype.
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False,
                         rngs=rngs, param_dtype=param_dtype, dtype=dtype)


def _embed(count, cfg, names, *, rngs, param_dtype, dtype):
    return nnx.Embed(
        count, cfg.hidden_size,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), names,
                                             eager_sharding=False),
        rngs=rngs, param_dtype=param_dtype, dtype=dtype)


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, **kw):
        width = cfg.hidden_size
        self.heads, self.impl = cfg.num_attention_heads, cfg.attention_impl
        self.q_proj = _linear(width, width, ("embed", "heads"), **kw)
        self.k_proj = _linear(width, width, ("embed", "heads"), **kw)
        self.v_proj = _linear(width, width, ("embed", "heads"), **kw)
        self.out_proj = _linear(width, width, ("heads", "embed"), **kw)

    def __call__(self, x, bias):
        b, length, width = x.shape
        q, k, v = (proj(x).reshape(b, length, self.heads, width // self.heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v, bias=bias, impl=self.impl).reshape(b, length, width))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, **kw):
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = _linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = _linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, **kw):
        self.layer_norm1 = _layer_norm(cfg, **kw)
        self.self_attn = CLIPAttention(cfg, **kw)
        self.layer_norm2 = _layer_norm(cfg, **kw)
        self.mlp = CLIPMLP(cfg, **kw)

    def __call__(self, x, bias):
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=jnp.float32):
        self.config = config
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.token_embedding = _embed(config.vocab_size, config, ("vocab", "embed"), **kw)
        self.position_embedding = _embed(config.max_position_embeddings, config, (None, "embed"), **kw)
        self.layers = nnx.List([CLIPEncoderLayer(config, **kw)
                                for _ in range(config.num_hidden_layers)])
        self.final_layer_norm = _layer_norm(config, **kw)

    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        """input_ids: (batch, length) integer tokens, length <= max_position_embeddings."""
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"CLIP input_ids must be (batch, length <= "
                             f"{self.config.max_position_embeddings}), got shape {input_ids.shape}")
        length = input_ids.shape[1]
        x = x0 = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))
        causal = jnp.tril(jnp.ones((length, length), bool))
        bias = jnp.where(causal, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)[None, None]

        def step(layer, x):
            x = layer(x, bias)
            return x, x

        x, outputs = layer_stack.apply_layers(self.layers, x, step, scan=self.config.scan_layers)
        last = self.final_layer_norm(x)

        if self.config.eos_token_id == _LEGACY_EOS_TOKEN_ID:
            eos_position = jnp.argmax(input_ids, axis=-1)
        else:  # the first EOS: padding may reuse the EOS token
            eos_position = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        pooled = last[jnp.arange(input_ids.shape[0]), eos_position]
        return CLIPTextOutput((x0, *outputs), last, pooled, None)


class CLIPTextModelWithProjection(CLIPTextModel):
    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=jnp.float32):
        super().__init__(config, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.text_projection = _linear(config.hidden_size, config.projection_dim, ("embed", "mlp"),
                                       use_bias=False, rngs=rngs, param_dtype=param_dtype,
                                       dtype=dtype)

    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        out = super().__call__(input_ids)
        return out._replace(text_embeds=self.text_projection(out.pooler_output))
