"""The HLO walker's FLOPs and bytes (flowgrpo_jax/hlo_cost.py) against exact counts of small
programs, compiled for this host's CPU (XLA writes each loop's trip count) and for a TPU with
no TPU attached (it does not: the walker runs the loop's counter)."""
import functools
import math

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from flowgrpo_jax import hlo_cost, planner
from flowgrpo_jax.models.attention import attention

M, K, N = 64, 128, 256
MATMUL = 2 * M * K * N


def _device(platform: str):
    return planner.tpu_devices("v5e:2x2")[0] if platform == "tpu" else jax.devices("cpu")[0]


def _compiled(fn, *shapes, platform="cpu", dtype=jnp.float32):
    placed = SingleDeviceSharding(_device(platform))
    args = [jax.ShapeDtypeStruct(s, dtype, sharding=placed) for s in shapes]
    return jax.jit(fn).lower(*args).compile()


def test_a_loop_free_program_counts_what_xla_counts():
    """No loop, no elementwise work: a matmul and a strided, dilated convolution; XLA's own
    cost analysis says the same FLOPs and bytes."""
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(2, 1),
                             padding="VALID", rhs_dilation=(1, 2),
                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    for fn, shapes in (((lambda x, w: x @ w), ((M, K), (K, N))),
                       (conv, ((2, 16, 16, 8), (3, 3, 8, 4)))):
        compiled = _compiled(fn, *shapes)
        xla, cost = compiled.cost_analysis(), hlo_cost.program_cost(compiled.as_text())
        assert cost.flops == xla["flops"] and cost.bytes == xla["bytes accessed"]
    assert hlo_cost.program_cost(_compiled(lambda x, w: x @ w, (M, K), (K, N)).as_text()).flops == MATMUL


def _nested_scans(x, w):
    def inner(c, _):
        return jnp.tanh(c @ w), None

    def outer(c, _):
        return jax.lax.scan(inner, c, None, length=3)[0], None

    return jax.lax.scan(outer, x, None, length=5)[0]


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_nested_scans_count_every_trip(platform):
    """5 x 3 matmuls of (64, 256) x (256, 256); XLA's cost analysis counts one."""
    compiled = _compiled(_nested_scans, (M, N), (N, N), platform=platform)
    text = compiled.as_text()
    assert ("known_trip_count" in text) == (platform == "cpu")  # the TPU's must be run
    assert hlo_cost.program_cost(text).flops == 15 * 2 * M * N * N
    assert compiled.cost_analysis()["flops"] < 2 * 2 * M * N * N


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_a_checkpointed_gradient_counts_its_recompute(platform):
    """value_and_grad of two layers under jax.checkpoint (nothing saved), inside a scan of 4:
    per trip the forward (2 matmuls), its recompute in the backward (2) and the backward
    (dW2, dX2, dW1: x is not differentiated, so no dX1): 7 matmuls, 2 of them recompute."""
    def layers(w1, w2, x):
        return jnp.sum(jnp.tanh(jnp.tanh(x @ w1) @ w2))

    def loss(w1, w2, xs):
        step = jax.checkpoint(layers, policy=jax.checkpoint_policies.nothing_saveable)
        return jax.lax.scan(lambda total, x: (total + step(w1, w2, x), None), 0.0, xs)[0]

    compiled = _compiled(jax.value_and_grad(loss, argnums=(0, 1)), (K, K), (K, K), (4, M, K),
                         platform=platform)
    cost = hlo_cost.program_cost(compiled.as_text())
    one = 2 * M * K * K
    assert cost.flops == 4 * 7 * one
    assert cost.recompute_flops == 4 * 2 * one
    assert cost.model_flops == 4 * 5 * one


def test_the_tpu_writes_a_batched_matmul_as_a_padded_convolution_counted_on_its_input():
    """XLA's TPU pipeline turns some batched matmuls into convolutions over a padded window
    whose taps mostly fall on padding; only the taps on the input count."""
    compiled = _compiled(lambda q, k: jnp.einsum("bqd,bkd->bqk", q, k), (16, 1024, 32),
                         (16, 205, 32), platform="tpu", dtype=jnp.bfloat16)
    assert hlo_cost.program_cost(compiled.as_text()).flops == 2 * 16 * 1024 * 205 * 32


def test_the_splash_kernels_count_their_matrix_products_at_padded_lengths():
    """Forward: logits and values (2 products per query, key and head dim); its gradient adds
    the dq kernel (3) and the dkv kernel (4). Lengths 200 and 300 pad to 256 and 384."""
    batch, heads, head_dim = 2, 4, 64
    q_len, kv_len = 256, 384
    attend = lambda q, k, v: attention(q, k, v, impl="splash")
    shapes = ((batch, 200, heads, head_dim), (batch, 300, heads, head_dim), (batch, 300, heads, head_dim))
    one = 2 * batch * heads * q_len * kv_len * head_dim
    forward = hlo_cost.program_cost(_compiled(attend, *shapes, platform="tpu",
                                              dtype=jnp.bfloat16).as_text())
    assert forward.kernel_flops == 2 * one and not forward.unknown_kernels
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))
    gradient = hlo_cost.program_cost(_compiled(jax.value_and_grad(loss, argnums=(0, 1, 2)), *shapes,
                                               platform="tpu", dtype=jnp.bfloat16).as_text())
    assert gradient.kernel_flops == (2 + 3 + 4) * one


def test_a_loop_bounded_by_its_data_is_refused_by_name():
    def count_up(x, bound):
        return jax.lax.while_loop(lambda c: c[1] < bound[0], lambda c: (c[0] @ c[0], c[1] + 1),
                                  (x, 0))[0]

    placed = SingleDeviceSharding(_device("tpu"))
    compiled = jax.jit(count_up).lower(jax.ShapeDtypeStruct((K, K), jnp.float32, sharding=placed),
                                       jax.ShapeDtypeStruct((1,), jnp.int32, sharding=placed)).compile()
    with pytest.raises(hlo_cost.HloCostError, match=r"cannot count the trips of while loop %while"):
        hlo_cost.program_cost(compiled.as_text())


# GPU programs, in the form XLA's GPU compiler writes its cuBLAS and cuDNN calls (no GPU here).
_GPU = """HloModule gpu

ENTRY %main (p0: f32[8,16], p1: f32[16,4], x: f16[10,20,30,41], g: f16[10,20,30,40]) -> f16[2,2,41,40] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = f32[16,4]{1,0} parameter(1)
  %gemm = (f32[8,4]{1,0}, s8[256]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}
  %x = f16[10,20,30,41]{3,2,1,0} parameter(2)
  %g = f16[10,20,30,40]{3,2,1,0} parameter(3)
  %filter = (f16[2,2,41,40]{3,2,1,0}, u8[0]{0}) custom-call(%x, %g), window={size=2x2 pad=1_0x1_0}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBackwardFilter"
  ROOT %result = f16[2,2,41,40]{3,2,1,0} get-tuple-element(%filter), index=0
}
"""


def test_gpu_matmuls_and_convolutions_are_counted_from_their_library_calls():
    # the filter gradient of a 2x2 convolution padded by one row and column at the start:
    # per dimension 20 + 19 (or 30 + 29) taps of the (output position, tap) pairs fall inside
    taps = (20 + 19) * (30 + 29)
    assert hlo_cost.program_cost(_GPU).flops == 2 * 8 * 16 * 4 + 2 * 10 * 40 * 41 * taps


def test_the_valid_taps_of_a_padded_window():
    pairs = lambda **w: hlo_cost._valid_pairs(**w)
    # a batched matmul as the TPU writes it: an input of one position, a window of 16 padded
    # by 15 on each side; each of the 16 outputs meets the input at one tap
    assert pairs(size_in=1, size_out=16, size=16, stride=1, pad_low=15, lhs_dilate=1,
                 rhs_dilate=1) == 16
    brute = lambda size_in, size_out, size, stride, pad_low, lhs_dilate, rhs_dilate: sum(
        0 <= o * stride + t * rhs_dilate - pad_low <= (size_in - 1) * lhs_dilate
        and (o * stride + t * rhs_dilate - pad_low) % lhs_dilate == 0
        for o in range(size_out) for t in range(size))
    for window in [(7, 4, 3, 2, 1, 1, 2), (5, 9, 3, 1, 2, 2, 1), (10, 10, 3, 1, 1, 1, 1),
                   (4, 7, 4, 1, 3, 1, 1)]:
        names = ("size_in", "size_out", "size", "stride", "pad_low", "lhs_dilate", "rhs_dilate")
        assert pairs(**dict(zip(names, window))) == brute(*window), window
    assert math.isclose(hlo_cost.Cost(1.0, 2.0, 0.5).model_flops, 2.5)
