"""Every attention implementation that runs here against jax.nn's XLA path: the CPU arrangement
("xla" and "auto" lowered for a CPU), splash in Pallas interpret mode, the chunking the CPU path
loops over, and the names. The TPU programs are checked by compiling for a TPU topology
(tests/test_tpu_compile.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowgrpo_jax.models import attention as attention_lib
from flowgrpo_jax.models.attention import attention


def _qkv(batch, q_len, k_len, heads, head_dim, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, heads, head_dim)).astype(dtype)
    k = rng.standard_normal((batch, k_len, heads, head_dim)).astype(dtype)
    v = rng.standard_normal((batch, k_len, heads, head_dim)).astype(dtype)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _reference(q, k, v, bias=None):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")


def test_chunk_size_is_the_largest_divisor_that_fits():
    limit = attention_lib._CPU_CHUNK_LOGITS
    assert attention_lib._chunk_size(32, limit // 3) == 2  # 3 fit; 2 is the largest divisor
    assert attention_lib._chunk_size(7, limit // 3) == 1  # a prime: one row at a time
    assert attention_lib._chunk_size(8, 1) == 8  # all rows in one chunk
    assert attention_lib._chunk_size(5, 4 * limit) == 1  # a row larger than the budget


@pytest.mark.parametrize("shape", [
    (8, 288, 288, 4, 32),  # the tiny benchmark's joint attention: 2 heads per loop step
    (3, 5, 7, 2, 8),       # q and k lengths differ; both heads in one step
    (1, 600, 600, 1, 16),  # one head larger than the chunk budget
])
def test_cpu_path_matches_jax_nn(shape):
    q, k, v = _qkv(*shape)
    out = attention_lib._cpu_attention(q, k, v, None)
    np.testing.assert_allclose(out, _reference(q, k, v), rtol=1e-5, atol=2e-6)


def test_cpu_path_with_bias_matches_jax_nn():
    q, k, v = _qkv(4, 6, 9, 3, 8, seed=1)
    rng = np.random.default_rng(2)
    per_head = jnp.asarray(rng.standard_normal((1, 3, 6, 9)), jnp.float32)  # T5-style position bias
    causal = jnp.where(jnp.tril(jnp.ones((6, 9), bool)), 0.0, -1e9)[None, None]  # CLIP-style mask
    for bias in (per_head, causal, per_head + causal):
        np.testing.assert_allclose(attention_lib._cpu_attention(q, k, v, bias), _reference(q, k, v, bias),
                                   rtol=1e-5, atol=2e-6)


def test_cpu_path_gradients_match_jax_nn():
    q, k, v = _qkv(2, 12, 10, 3, 8, seed=3)
    weights = jnp.asarray(np.random.default_rng(4).standard_normal((2, 12, 3, 8)), jnp.float32)
    loss = lambda fn: lambda *qkv: jnp.sum(fn(*qkv) * weights)
    ours = jax.grad(loss(lambda *a: attention_lib._cpu_attention(*a, None)), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_cpu_path_bf16_close_to_float32():
    q, k, v = _qkv(2, 16, 16, 2, 8, seed=5)
    out = attention_lib._cpu_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), None)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), _reference(q, k, v), atol=3e-2)


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_a_cpu_lowering_takes_the_cpu_path(impl):
    q, k, v = _qkv(8, 288, 288, 4, 32)
    ours = jax.jit(lambda *a: attention(*a, impl=impl))(q, k, v)
    np.testing.assert_array_equal(ours, jax.jit(lambda *a: attention_lib._cpu_attention(*a, None))(q, k, v))
    # chosen by the platform the program is lowered for: the TPU lowering has no such loop
    assert "while" in jax.jit(lambda *a: attention(*a, impl=impl)).lower(q, k, v).as_text()


@pytest.mark.parametrize("shape", [
    (2, 200, 300, 2, 64),  # lengths padded to 256 and 384, key padding masked
    (1, 128, 128, 3, 16),  # already aligned
    (2, 5, 7, 1, 8),       # shorter than one block
])
def test_splash_in_interpret_mode_matches_jax_nn(shape):
    q, k, v = _qkv(*shape, seed=6)
    splash = lambda *a: attention(*a, impl="splash")
    np.testing.assert_allclose(jax.jit(splash)(q, k, v), _reference(q, k, v), rtol=1e-5, atol=2e-6)
    weights = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape[:3] + v.shape[3:]), jnp.float32)
    loss = lambda fn: lambda *qkv: jnp.sum(fn(*qkv) * weights)
    ours = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_splash_refuses_a_bias_and_cudnn_needs_a_gpu():
    q, k, v = _qkv(1, 2, 2, 1, 8)
    with pytest.raises(ValueError, match="splash' takes no bias"):
        attention(q, k, v, bias=jnp.zeros((1, 1, 2, 2)), impl="splash")
    if not attention_lib._has_backend("cuda"):
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            attention(q, k, v, impl="cudnn")


def test_unknown_implementation_is_named():
    q, k, v = _qkv(1, 2, 2, 1, 4)
    with pytest.raises(ValueError, match="'flash'"):
        attention(q, k, v, impl="flash")
