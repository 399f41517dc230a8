"""MMDiT parity with diffusers' SD3Transformer2DModel, through the conversion table.

Tiny random-init reference models (all weights perturbed, so zero-initialised parts matter),
converted in memory with `core.convert(RULES)`, compared at fp32 and with bf16 compute.
"""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from flax import nnx

from flowgrpo_jax.convert.core import ConversionError, convert, plan, target_shapes
from flowgrpo_jax.models.abstract import abstract_module
from flowgrpo_jax.models.mmdit_table import RULES
from flowgrpo_jax.models.mmdit import MMDiT, Buffer, MMDiTConfig
from flowgrpo_jax.families.sd3.loading import SD35M_CONFIGS
from converted import converted_module

DATA = SD35M_CONFIGS

TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=3, joint_attention_dim=20, caption_projection_dim=24,
            pooled_projection_dim=12, out_channels=5, pos_embed_max_size=8)
# (diffusers config, latent (B, H, W), text length): latent grids smaller than the 8x8 position
# table, non-square, so the centre crop is offset differently on each axis. The SD3.5-style
# case has dual attention in the first, a middle and the context_pre_only last block.
CASES = {
    "sd3": (TINY, (2, 10, 6), 7),
    "sd35": (dict(TINY, num_layers=4, dual_attention_layers=(0, 2, 3), qk_norm="rms_norm"),
             (3, 6, 14), 5),
}


def _reference(config: dict, seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**config).eval()
    with torch.no_grad():  # perturb everything, the pos_embed buffer included
        for tensor in model.state_dict(keep_vars=True).values():
            tensor.add_(0.1 * torch.randn_like(tensor))
    return model


def _convert(reference: SD3Transformer2DModel, dtype=jnp.float32, param_dtype=jnp.float32,
             **options) -> MMDiT:
    """The reference's weights in an MMDiT, via the table (shapes first: no random init)."""
    config = MMDiTConfig.from_diffusers(dict(reference.config), **options)
    tensors = {k: v.numpy() for k, v in reference.state_dict().items()}
    return converted_module(
        lambda rngs: MMDiT(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype),
        tensors, RULES, param_dtype)


def _inputs(config: dict, latent_shape, text_len, seed=1):
    rng = np.random.default_rng(seed)
    batch = latent_shape[0]
    return dict(
        x=rng.standard_normal((*latent_shape, config["in_channels"]), dtype=np.float32),
        timestep=rng.uniform(0, 1000, batch).astype(np.float32),
        encoder_hidden_states=rng.standard_normal(
            (batch, text_len, config["joint_attention_dim"]), dtype=np.float32),
        pooled_projections=rng.standard_normal(
            (batch, config["pooled_projection_dim"]), dtype=np.float32))


def _reference_output(reference, inputs) -> np.ndarray:
    with torch.no_grad():
        out = reference(
            hidden_states=torch.from_numpy(inputs["x"]).permute(0, 3, 1, 2),
            timestep=torch.from_numpy(inputs["timestep"]),
            encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"]),
            pooled_projections=torch.from_numpy(inputs["pooled_projections"])).sample
    return out.permute(0, 2, 3, 1).numpy()


def _jitted_output(model: MMDiT, inputs) -> np.ndarray:
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, kw: nnx.merge(graphdef, s)(**kw))
    out = forward(state, {k: jnp.asarray(v) for k, v in inputs.items()})
    return np.asarray(out.astype(jnp.float32))


def _relative_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    config, latent_shape, text_len = CASES[request.param]
    reference = _reference(config)
    inputs = _inputs(config, latent_shape, text_len)
    return request.param, reference, inputs, _reference_output(reference, inputs)


def test_fp32_matches_diffusers(case):
    name, reference, inputs, expected = case
    out = _jitted_output(_convert(reference), inputs)
    assert out.shape == expected.shape
    error = _relative_l2(out, expected)
    print(f"{name} fp32 relative L2 error {error:.2e}")
    assert error < 1e-5


def _diffusers_bf16_error(reference, inputs, expected) -> float:
    """What bf16 costs diffusers itself on this case: the yardstick for our bf16 error."""
    bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    with torch.no_grad():
        out = bf16(hidden_states=torch.from_numpy(inputs["x"]).permute(0, 3, 1, 2).bfloat16(),
                   timestep=torch.from_numpy(inputs["timestep"]),
                   encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"]).bfloat16(),
                   pooled_projections=torch.from_numpy(inputs["pooled_projections"]).bfloat16()).sample
    return _relative_l2(out.float().permute(0, 2, 3, 1).numpy(), expected)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16], ids=["fp32-params", "bf16-params"])
def test_bf16_compute_close_to_fp32_reference(case, param_dtype):
    name, reference, inputs, expected = case
    model = _convert(reference, dtype=jnp.bfloat16, param_dtype=param_dtype)
    error = _relative_l2(_jitted_output(model, inputs), expected)
    diffusers_error = _diffusers_bf16_error(reference, inputs, expected)
    print(f"{name} bf16 compute, {jnp.dtype(param_dtype).name} params: relative L2 error "
          f"{error:.2e} (diffusers in bf16: {diffusers_error:.2e})")
    assert error < min(2e-2, 2 * diffusers_error)


@pytest.mark.parametrize("policy", ["block", "block_save_dots"])
def test_remat_recomputes_blocks_and_keeps_the_gradient(policy):
    config = dict(TINY, num_layers=2, dual_attention_layers=(0,), qk_norm="rms_norm")
    reference = _reference(config)
    inputs = {k: jnp.asarray(v) for k, v in _inputs(config, (2, 6, 4), 3).items()}

    def input_gradient(model):  # parameters closed over, not traced
        graphdef, state = nnx.split(model)
        return jax.grad(lambda x: jnp.mean(nnx.merge(graphdef, state)(**dict(inputs, x=x)) ** 2))

    plain = input_gradient(_convert(reference))
    remat_model = _convert(reference, remat=policy)
    remat = input_gradient(remat_model)
    # jax.checkpoint shows as a remat primitive in the gradient's jaxpr
    assert "remat" in str(jax.make_jaxpr(remat)(inputs["x"]))
    assert "remat" not in str(jax.make_jaxpr(plain)(inputs["x"]))
    np.testing.assert_allclose(jax.jit(remat)(inputs["x"]), jax.jit(plain)(inputs["x"]),
                               rtol=1e-5, atol=1e-9)

    # traced parameters (a training step) work too
    graphdef, params = nnx.split(remat_model, nnx.Param)
    param_loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(**inputs) ** 2)
    assert "remat" in str(jax.make_jaxpr(jax.grad(param_loss))(params))


def _sd35m_diffusers_config() -> dict:
    with open(os.path.join(DATA, "transformer.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def sd35m_abstract() -> MMDiT:
    """The full-size SD3.5-Medium model as shapes only, shared by the tests here."""
    config = MMDiTConfig.from_diffusers(_sd35m_diffusers_config())
    return abstract_module(lambda rngs: MMDiT(config, rngs=rngs, param_dtype=jnp.bfloat16))


def test_sd35_medium_parameter_count(sd35m_abstract):
    def count(state):
        return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(state))
    with open(os.path.join(DATA, "param_counts.json")) as f:
        expected = json.load(f)["transformer"]
    trainable = nnx.state(sd35m_abstract, nnx.All(nnx.Param, nnx.Not(Buffer)))
    assert count(trainable) == expected == 2_243_171_520
    # diffusers' position table is a buffer, outside its parameter count
    assert count(nnx.state(sd35m_abstract, Buffer)) == 384 * 384 * 1536


def test_table_covers_sd35_medium_checkpoint_keys(sd35m_abstract):
    with torch.device("meta"):
        reference = SD3Transformer2DModel(**_sd35m_diffusers_config())
    src_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    target = target_shapes(sd35m_abstract)
    mapping = plan(src_shapes, RULES, target)
    assert len(mapping) == len(src_shapes) == len(target)


def test_conversion_rejects_a_checkpoint_of_another_config():
    config, _, _ = CASES["sd3"]
    tensors = {k: v.numpy() for k, v in _reference(config).state_dict().items()}
    sd35 = MMDiTConfig.from_diffusers(CASES["sd35"][0])
    target = target_shapes(abstract_module(lambda rngs: MMDiT(sd35, rngs=rngs)))
    with pytest.raises(ConversionError, match="attn2.to_q.kernel"):
        convert(tensors, RULES, target)


def test_every_parameter_has_logical_axes():
    config = MMDiTConfig.from_diffusers(CASES["sd35"][0])
    model = abstract_module(lambda rngs: MMDiT(config, rngs=rngs))
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param))))
    shapes = target_shapes(model)
    assert specs.keys() == shapes.keys()
    for path, spec in specs.items():
        assert len(spec.get_value()) == len(shapes[path]), path
    assert tuple(specs[("transformer_blocks", 0, "attn", "to_q", "kernel")].get_value()) == ("embed", "heads")
    assert tuple(specs[("transformer_blocks", 0, "attn", "to_out", "kernel")].get_value()) == ("heads", "embed")
    assert tuple(specs[("transformer_blocks", 1, "ff", "proj_in", "kernel")].get_value()) == ("embed", "mlp")


def test_config_from_diffusers_reads_sd3_and_rejects_bad_configs():
    sd3_medium = dict(TINY, _class_name="SD3Transformer2DModel", _diffusers_version="0.29.0")
    config = MMDiTConfig.from_diffusers(sd3_medium, remat="block")
    assert config.dual_attention_layers == () and config.qk_norm is None and config.remat == "block"
    assert MMDiTConfig.from_diffusers(dict(TINY, out_channels=None)).out_channels == TINY["in_channels"]
    sd35m = MMDiTConfig.from_diffusers(_sd35m_diffusers_config())
    assert sd35m.dual_attention_layers == tuple(range(13)) and sd35m.qk_norm == "rms_norm"
    missing = {k: v for k, v in TINY.items() if k != "joint_attention_dim"}
    with pytest.raises(ValueError, match="joint_attention_dim"):
        MMDiTConfig.from_diffusers(missing)
    with pytest.raises(ValueError, match="use_flash"):
        MMDiTConfig.from_diffusers(dict(TINY, use_flash=True))
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        MMDiTConfig.from_diffusers(dict(TINY, _class_name="FluxTransformer2DModel"))
    with pytest.raises(ValueError, match="qk_norm"):
        MMDiTConfig.from_diffusers(dict(TINY, qk_norm="layer_norm"))


def test_bad_latent_sizes_are_named():
    config = MMDiTConfig.from_diffusers(TINY)
    model = abstract_module(lambda rngs: MMDiT(config, rngs=rngs))  # shapes are all it checks
    text, pooled, t = jnp.zeros((1, 3, 20)), jnp.zeros((1, 12)), jnp.zeros((1,))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(jnp.zeros((1, 7, 6, 4)), t, text, pooled)
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size"):
        model(jnp.zeros((1, 18, 6, 4)), t, text, pooled)
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 4, 6, 6)), t, text, pooled)
