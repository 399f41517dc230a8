"""One attention function for every model, with the implementation chosen by name.

Inputs and output are (batch, length, heads, head_dim), the layout of
`jax.nn.dot_product_attention`.
"""
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")


def _xla_attention(q, k, v, bias):
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def attention(q, k, v, *, bias=None, impl: str = "xla"):
    """Softmax attention; `bias` broadcasts to (batch, heads, q_len, k_len).

    "xla" is the reference (softmax in float32 whatever the input dtype); "cudnn" is the fused
    flash kernel of `jax.nn.dot_product_attention` (GPU only, bf16/fp16 inputs).
    """
    if impl == "xla":
        return _xla_attention(q, k, v, bias)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="cudnn")
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
