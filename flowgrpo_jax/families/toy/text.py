"""The toy world's own text encoder: a word-level tokenizer and a tiny NNX transformer.

The vocabulary is every word of the prompt grammar plus <pad> and <cls>; a prompt becomes
<cls> followed by its words, padded to `max_length`. The encoder returns per-token states
(B, L, D), the MMDiT's `encoder_hidden_states`, and the final <cls> state (B, D), its
`pooled_projections`. Padding is masked out of attention, so a prompt's states do not depend
on how much padding follows it. The empty string (CFG's negative prompt) is <cls> alone.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowgrpo_jax.models.attention import attention
from flowgrpo_jax.families.toy.prompts import vocabulary

PAD, CLS = "<pad>", "<cls>"
DEFAULT_MAX_LENGTH = 16  # <cls> + the grammar's longest prompt (10 words), with room to spare
_MASKED = -1e9


class Tokenizer:
    """Word-level tokenizer over a fixed vocabulary; ids 0 and 1 are <pad> and <cls>."""

    def __init__(self, words=None, max_length: int = DEFAULT_MAX_LENGTH):
        words = vocabulary() if words is None else list(words)
        self.tokens = [PAD, CLS] + words
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        if len(self.ids) != len(self.tokens):
            raise ValueError("the vocabulary has repeated words")
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 (B, max_length), mask bool (B, max_length)) of a list of prompts."""
        ids = np.zeros((len(prompts), self.max_length), np.int32)
        for row, prompt in enumerate(prompts):
            words = prompt.split()
            unknown = [w for w in words if w not in self.ids or w in (PAD, CLS)]
            if unknown:
                raise ValueError(f"unknown words {unknown} in prompt {prompt!r}; the toy"
                                 f" vocabulary is {self.tokens[2:]}")
            if len(words) + 1 > self.max_length:
                raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most"
                                 f" {self.max_length - 1} fit in max_length={self.max_length}")
            ids[row, :len(words) + 1] = [self.ids[CLS]] + [self.ids[w] for w in words]
        return ids, ids != self.ids[PAD]

    def decode(self, ids) -> list[str]:
        """Prompts back from ids (special tokens dropped)."""
        return [" ".join(self.tokens[i] for i in row if i > 1) for row in np.asarray(ids)]


def _partitioned(init, axes):
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def _linear(n_in, n_out, axes, *, rngs, dtype, param_dtype):
    return nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      kernel_init=_partitioned(nnx.initializers.lecun_normal(), axes),
                      bias_init=_partitioned(nnx.initializers.zeros_init(), (None,)))


def _layer_norm(dim, *, rngs, dtype, param_dtype):
    return nnx.LayerNorm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                         scale_init=_partitioned(nnx.initializers.ones_init(), ("embed",)),
                         bias_init=_partitioned(nnx.initializers.zeros_init(), ("embed",)))


class EncoderBlock(nnx.Module):
    """Pre-norm transformer block: masked self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32, attention_impl: str = "auto"):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.heads = heads
        self.attention_impl = attention_impl
        self.norm1 = _layer_norm(width, **kw)
        self.to_q = _linear(width, width, ("embed", "heads"), **kw)
        self.to_k = _linear(width, width, ("embed", "heads"), **kw)
        self.to_v = _linear(width, width, ("embed", "heads"), **kw)
        self.to_out = _linear(width, width, ("heads", "embed"), **kw)
        self.norm2 = _layer_norm(width, **kw)
        self.fc1 = _linear(width, width * mlp_ratio, ("embed", "mlp"), **kw)
        self.fc2 = _linear(width * mlp_ratio, width, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        b, length, width = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).reshape(b, length, self.heads, width // self.heads)
                   for p in (self.to_q, self.to_k, self.to_v))
        out = attention(q, k, v, bias=bias, impl=self.attention_impl)
        x = x + self.to_out(out.reshape(b, length, width))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class TextEncoder(nnx.Module):
    """Token embeddings + learned positions, `depth` blocks, a final norm."""

    def __init__(self, vocab_size: int, max_length: int = DEFAULT_MAX_LENGTH, width: int = 64,
                 depth: int = 2, heads: int = 4, mlp_ratio: int = 4, embed_std: float = 1.0, *,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "auto"):
        self.max_length = max_length
        # embed_std: init std of the word and position embeddings. At 0.02 the blocks' outputs
        # (size ~1) swamp the token identity in the residual stream and pretraining leaves the
        # relation words nearly alike; 1.0 (Flax's default) keeps them apart (docs/demo.md).
        self.embed = nnx.Embed(vocab_size, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               embedding_init=_partitioned(nnx.initializers.normal(embed_std),
                                                           ("vocab", "embed")))
        self.position = nnx.Param(_partitioned(nnx.initializers.normal(embed_std), (None, "embed"))(
            rngs.params(), (max_length, width), param_dtype))
        self.blocks = nnx.List([
            EncoderBlock(width, heads, mlp_ratio, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                         attention_impl=attention_impl) for _ in range(depth)])
        self.norm = _layer_norm(width, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """ids int (B, L), mask bool (B, L) -> (states (B, L, D), pooled (B, D))."""
        if ids.shape[-1] != self.max_length:
            raise ValueError(f"ids have length {ids.shape[-1]}, the encoder expects {self.max_length}")
        x = self.embed(ids)
        x = x + self.position[...].astype(x.dtype)
        bias = jnp.where(mask[:, None, None, :], 0.0, _MASKED).astype(jnp.float32)
        for block in self.blocks:
            x = block(x, bias)
        x = self.norm(x)
        return x, x[:, 0]
