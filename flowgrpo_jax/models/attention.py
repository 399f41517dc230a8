"""One attention function for every model, with the implementation chosen by name.

Inputs and output are (batch, length, heads, head_dim), the layout of
`jax.nn.dot_product_attention`.
"""
import jax

IMPLEMENTATIONS = ("xla", "cudnn")


def _xla_attention(q, k, v, bias):
    # jax.nn's XLA path is the same math (logits and softmax in float32, scale on the logits)
    # and runs ~5-10x faster on XLA:CPU than a hand-written einsum-softmax-einsum, which the CPU
    # compiler fuses into one slow kernel (tools/bench.py, docs/benchmarks.md).
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")


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
