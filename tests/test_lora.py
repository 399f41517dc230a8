import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowgrpo_jax.lora import apply_lora, disabled
from flowgrpo_jax.models.mmdit import JOINT_ATTENTION, MMDiT, MMDiTConfig

WIDTH = 16
JOINT_PROJECTIONS = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class JointAttention(nnx.Module):
    """Projection names as in diffusers' SD3 attention (to_out is a list, like to_out.0)."""

    def __init__(self, rngs):
        for name in JOINT_PROJECTIONS:
            setattr(self, name, nnx.Linear(WIDTH, WIDTH, rngs=rngs))
        self.to_out = nnx.List([nnx.Linear(WIDTH, WIDTH, rngs=rngs)])

    def __call__(self, x, c):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        cq, ck, cv = self.add_q_proj(c), self.add_k_proj(c), self.add_v_proj(c)
        mixed = jnp.tanh(q * k + v) + jnp.tanh(cq * ck + cv).mean(axis=1, keepdims=True)
        return self.to_out[0](mixed), self.to_add_out(jnp.tanh(cq + cv))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.attn = JointAttention(rngs)
        self.attn2 = JointAttention(rngs)  # the dual self-attention: must stay without LoRA
        self.ff = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x, c):
        h, c = self.attn(x, c)
        h2, _ = self.attn2(x + h, c)
        return x + h + h2 + self.ff(x), c


class TinyModel(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])

    def __call__(self, x, c):
        for block in self.blocks:
            x, c = block(x, c)
        return x


def _inputs():
    kx, kc = jax.random.split(jax.random.key(7))
    return jax.random.normal(kx, (2, 5, WIDTH)), jax.random.normal(kc, (2, 3, WIDTH))


def _model_with_lora(rank=4, alpha=8.0):
    model = TinyModel(nnx.Rngs(0))
    base_out = model(*_inputs())
    paths = apply_lora(model, rank=rank, alpha=alpha, rngs=nnx.Rngs(1), targets=JOINT_ATTENTION)
    return model, base_out, paths


def test_mmdit_targets_are_the_joint_attention_projections_only():
    _, _, paths = _model_with_lora()
    expected = sorted(
        f"blocks.{i}.attn.{name}" for i in range(2) for name in JOINT_PROJECTIONS + ["to_out.0"]
    )
    assert sorted(paths) == expected
    assert not any("attn2" in p or ".ff" in p for p in paths)


def test_lora_params_are_selected_by_nnx_lora_param():
    model, _, paths = _model_with_lora(rank=4)
    lora_state, rest = nnx.state(model, nnx.LoRAParam, ...)
    leaves = jax.tree.leaves(lora_state)
    assert len(leaves) == 2 * len(paths)
    shapes = jax.tree.map(jnp.shape, lora_state)
    assert shapes["blocks"][0]["attn"]["to_q"]["lora_a"] == (WIDTH, 4)
    assert shapes["blocks"][0]["attn"]["to_q"]["lora_b"] == (4, WIDTH)
    # the base weights kept their paths
    assert rest["blocks"][0]["attn"]["to_q"]["kernel"].shape == (WIDTH, WIDTH)
    assert "lora_a" not in rest["blocks"][0]["attn2"]["to_q"]


def test_fresh_lora_gives_exactly_the_base_output():
    model, base_out, _ = _model_with_lora()
    np.testing.assert_array_equal(model(*_inputs()), base_out)


def test_gaussian_init_matches_peft():
    # peft's init_lora_weights="gaussian": A ~ N(0, std=1/r), B = 0
    model = nnx.Linear(512, 8, rngs=nnx.Rngs(0))
    holder = nnx.List([model])
    apply_lora(holder, rank=8, alpha=16, rngs=nnx.Rngs(3), targets=(r"^0$",))
    a, b = holder[0].lora_a[...], holder[0].lora_b[...]
    assert abs(float(jnp.std(a)) - 1 / 8) < 0.01
    assert abs(float(jnp.mean(a))) < 0.01
    np.testing.assert_array_equal(b, 0.0)


def test_delta_matches_hand_computation():
    layer = nnx.List([nnx.Linear(6, 3, rngs=nnx.Rngs(0))])
    apply_lora(layer, rank=2, alpha=5.0, rngs=nnx.Rngs(1), targets=(r"^0$",))
    lora = layer[0]
    lora.lora_b[...] = jax.random.normal(jax.random.key(2), (2, 3))
    x = np.asarray(jax.random.normal(jax.random.key(3), (4, 6)), np.float64)
    k, bias = np.asarray(lora.kernel[...], np.float64), np.asarray(lora.bias[...], np.float64)
    a, b = np.asarray(lora.lora_a[...], np.float64), np.asarray(lora.lora_b[...], np.float64)
    expected = x @ k + bias + (5.0 / 2) * x @ a @ b
    np.testing.assert_allclose(lora(jnp.asarray(x, jnp.float32)), expected, rtol=1e-5, atol=1e-6)


def test_disabled_lora_is_the_reference_after_training_changes_b():
    model, base_out, _ = _model_with_lora()
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
    trained = jax.tree.map(lambda p: p + 0.1 * jnp.ones_like(p), lora_state)
    policy_out = nnx.merge(graphdef, trained, rest)(*_inputs())
    assert float(jnp.max(jnp.abs(policy_out - base_out))) > 1e-2
    reference_out = nnx.merge(graphdef, disabled(trained), rest)(*_inputs())
    np.testing.assert_array_equal(reference_out, base_out)


def test_partition_names_follow_the_base_kernel():
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "heads"),
                                 eager_sharding=False)
    holder = nnx.List([nnx.Linear(8, 4, kernel_init=init, rngs=nnx.Rngs(0))])
    apply_lora(holder, rank=2, alpha=2, rngs=nnx.Rngs(1), targets=(r"^0$",))
    specs = nnx.get_partition_spec(nnx.state(holder, nnx.LoRAParam))
    assert tuple(specs[0]["lora_a"].get_value()) == ("embed", None)
    assert tuple(specs[0]["lora_b"].get_value()) == (None, "heads")


def test_bad_targets_and_rank_are_errors():
    with pytest.raises(ValueError, match="no nnx.Linear path matches"):
        apply_lora(TinyModel(nnx.Rngs(0)), rank=2, alpha=2, rngs=nnx.Rngs(1), targets=("nope",))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(TinyModel(nnx.Rngs(0)), rank=0, alpha=2, rngs=nnx.Rngs(1), targets=JOINT_ATTENTION)


# A tiny SD3.5-style MMDiT: dual attention (attn2) in blocks 0 and 2, qk RMS norm, and the
# context_pre_only last block (which has no to_add_out).
MMDIT = MMDiTConfig(sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=6,
                    caption_projection_dim=16, pooled_projection_dim=5, out_channels=4,
                    pos_embed_max_size=4, dual_attention_layers=(0, 2), qk_norm="rms_norm")


def _mmdit_inputs():
    keys = jax.random.split(jax.random.key(3), 4)
    return (jax.random.normal(keys[0], (2, 4, 6, 4)), jax.random.uniform(keys[1], (2,)) * 1000,
            jax.random.normal(keys[2], (2, 5, 6)), jax.random.normal(keys[3], (2, 5)))


def test_tiny_mmdit_lora_targets_zero_init_and_reference():
    model = MMDiT(MMDIT, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, inputs: m(*inputs))
    base_out = forward(model, _mmdit_inputs())
    paths = apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1), targets=JOINT_ATTENTION)
    expected = [f"transformer_blocks.{i}.attn.{name}" for i in range(3)
                for name in JOINT_PROJECTIONS + ["to_out"] if not (i == 2 and name == "to_add_out")]
    assert sorted(paths) == sorted(expected)
    np.testing.assert_array_equal(forward(model, _mmdit_inputs()), base_out)

    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
    trained = jax.tree.map(lambda p: p + 0.05, lora_state)
    policy_out = forward(nnx.merge(graphdef, trained, rest), _mmdit_inputs())
    assert float(jnp.max(jnp.abs(policy_out - base_out))) > 1e-3
    reference_out = forward(nnx.merge(graphdef, disabled(trained), rest), _mmdit_inputs())
    np.testing.assert_array_equal(reference_out, base_out)
