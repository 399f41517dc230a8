"""FluxTransformer parity with diffusers' FluxTransformer2DModel, through the conversion table.

Tiny random-init reference models (all weights perturbed, so zero-initialised parts matter),
converted in memory with `core.convert(RULES)`, compared at fp32 (blocks scanned and unrolled)
and with bf16 compute; the full FLUX.1-dev config as shapes only against diffusers on the meta
device; scanned and unrolled gradients; the LoRA targets against the reference's PEFT targets.
"""
import copy
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from flax import nnx

import flowgrpo_jax
from flowgrpo_jax import lora
from flowgrpo_jax.convert.core import ConversionError, convert, parse_path, plan, source_keys, target_shapes
from flowgrpo_jax.models import layer_stack
from flowgrpo_jax.models.abstract import abstract_module
from flowgrpo_jax.models.components import component_for_class
from flowgrpo_jax.models.flux import LORA_TARGETS, FluxConfig, FluxTransformer
from flowgrpo_jax.models.flux_table import RULES
from converted import converted_module

FLUX1_DEV = os.path.join(os.path.dirname(flowgrpo_jax.__file__), "families", "flux", "flux1dev",
                         "transformer", "config.json")

TINY = dict(patch_size=1, in_channels=6, num_layers=2, num_single_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
            axes_dims_rope=(2, 2, 4))
# (diffusers config, batch, packed latent grids (h, w), text length, first image id): non-square
# grids of several token counts run through one converted model. "schnell" (no guidance
# embedding) also has a 2x2 patch output and image ids marked 1 on the first axis (as FLUX
# Kontext marks its reference image), so every rotary axis turns.
CASES = {
    "dev": (dict(TINY, guidance_embeds=True, out_channels=None), 2, [(3, 5), (4, 2)], 7, 0),
    "schnell": (dict(TINY, guidance_embeds=False, out_channels=5, patch_size=2), 3, [(2, 6), (5, 3)],
                4, 1),
}
# The reference run's PEFT target_modules (yifan123/flow_grpo, scripts/train_flux.py).
REFERENCE_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                          "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                          "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def _reference(config: dict, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**config).eval()
    with torch.no_grad():  # perturb everything
        for tensor in model.state_dict(keep_vars=True).values():
            tensor.add_(0.1 * torch.randn_like(tensor))
    return model


def _convert(reference: FluxTransformer2DModel, dtype=jnp.float32, param_dtype=jnp.float32,
             **options) -> FluxTransformer:
    """The reference's weights in a FluxTransformer, via the table (shapes first: no random init)."""
    config = FluxConfig.from_diffusers(dict(reference.config), **options)
    tensors = {k: v.numpy() for k, v in reference.state_dict().items()}
    return converted_module(
        lambda rngs: FluxTransformer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype),
        tensors, RULES, param_dtype)


def _image_ids(height: int, width: int, first: int = 0) -> np.ndarray:
    """FluxPipeline._prepare_latent_image_ids for an h x w packed grid: (first, row, column)."""
    ids = np.zeros((height, width, 3), np.float32)
    ids[..., 0] = first
    ids[..., 1] = np.arange(height)[:, None]
    ids[..., 2] = np.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def _inputs(config: dict, batch: int, grid, text_len: int, first_id: int, seed=1):
    rng = np.random.default_rng(seed)
    inputs = dict(
        hidden_states=rng.standard_normal((batch, grid[0] * grid[1], config["in_channels"]),
                                          dtype=np.float32),
        timestep=rng.uniform(0, 1, batch).astype(np.float32),
        encoder_hidden_states=rng.standard_normal(
            (batch, text_len, config["joint_attention_dim"]), dtype=np.float32),
        pooled_projections=rng.standard_normal((batch, config["pooled_projection_dim"]),
                                               dtype=np.float32),
        img_ids=_image_ids(*grid, first_id),
        txt_ids=np.zeros((text_len, 3), np.float32))
    if config["guidance_embeds"]:
        inputs["guidance"] = rng.uniform(1, 5, batch).astype(np.float32)
    return inputs


def _reference_output(reference, inputs, dtype=torch.float32) -> np.ndarray:
    floats = ("hidden_states", "encoder_hidden_states", "pooled_projections")
    with torch.no_grad():
        out = reference(**{k: torch.from_numpy(v).to(dtype) if k in floats else torch.from_numpy(v)
                           for k, v in inputs.items()}).sample
    return out.float().numpy()


def _jitted_output(model: FluxTransformer, inputs) -> np.ndarray:
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, kw: nnx.merge(graphdef, s)(**kw))
    out = forward(state, {k: jnp.asarray(v) for k, v in inputs.items()})
    return np.asarray(out.astype(jnp.float32))


def _relative_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.cache
def _case(name: str):
    """(name, reference, [(grid, inputs, reference output)]) of CASES[name]."""
    config, batch, grids, text_len, first_id = CASES[name]
    reference = _reference(config)
    runs = []
    for grid in grids:
        inputs = _inputs(config, batch, grid, text_len, first_id)
        runs.append((grid, inputs, _reference_output(reference, inputs)))
    return name, reference, runs


# Unrolled blocks on one case and grid: each is another compile, and the scanned-against-
# unrolled gradient test below compares the two on every parameter.
@pytest.mark.parametrize("name,scan", [("dev", True), ("schnell", True), ("dev", False)],
                         ids=["dev-scanned", "schnell-scanned", "dev-unrolled"])
def test_fp32_matches_diffusers(name, scan):
    name, reference, runs = _case(name)
    model = _convert(reference, scan_layers=scan)
    for grid, inputs, expected in runs if scan else runs[:1]:
        out = _jitted_output(model, inputs)
        assert out.shape == expected.shape
        error = _relative_l2(out, expected)
        print(f"{name} {grid[0]}x{grid[1]} fp32 relative L2 error {error:.2e}")
        assert error < 1e-5


def test_bf16_close_to_fp32_reference():
    """bf16 parameters and compute, the project's model dtype (config.model.dtype)."""
    name, reference, runs = _case("dev")
    _, inputs, expected = runs[0]
    model = _convert(reference, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    error = _relative_l2(_jitted_output(model, inputs), expected)
    # What bf16 costs diffusers itself on this case: the yardstick for our bf16 error.
    diffusers_error = _relative_l2(
        _reference_output(copy.deepcopy(reference).to(torch.bfloat16), inputs, torch.bfloat16),
        expected)
    print(f"{name} bf16: relative L2 error {error:.2e} (diffusers in bf16: {diffusers_error:.2e})")
    assert error < min(2e-2, 2 * diffusers_error)


def _flux1_dev_config() -> dict:
    with open(FLUX1_DEV) as f:
        return json.load(f)


def test_flux1_dev_parameter_count_and_table():
    config = FluxConfig.from_diffusers(_flux1_dev_config())
    assert config.out_channels == 64 and config.guidance_embeds and config.axes_dims_rope == (16, 56, 56)
    model = abstract_module(lambda rngs: FluxTransformer(config, rngs=rngs, param_dtype=jnp.bfloat16))
    target = target_shapes(model)
    ours = sum(int(np.prod(shape)) for shape in target.values())
    with torch.device("meta"):
        reference = FluxTransformer2DModel(**_flux1_dev_config())
    theirs = sum(p.numel() for p in reference.parameters())
    print(f"FLUX.1-dev transformer parameters: ours {ours:,}, diffusers {theirs:,}")
    assert ours == theirs == 11_901_408_320
    src_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert len(plan(src_shapes, RULES, target)) == len(src_shapes) == len(target)
    # each stack is one scan: one traced block each, however deep
    assert layer_stack.runs(model.transformer_blocks) == [list(range(19))]
    assert layer_stack.runs(model.single_transformer_blocks) == [list(range(38))]


def test_conversion_refuses_a_missing_or_misshaped_key():
    config, *_ = CASES["dev"]
    tensors = {k: v.numpy() for k, v in _reference(config).state_dict().items()}
    flux_config = FluxConfig.from_diffusers(config)
    target = target_shapes(abstract_module(lambda rngs: FluxTransformer(flux_config, rngs=rngs)))
    convert(tensors, RULES, target)  # the whole checkpoint fits

    missing = dict(tensors)
    del missing["single_transformer_blocks.1.attn.norm_k.weight"]
    with pytest.raises(ConversionError, match=r"missing from the checkpoint[\s\S]*"
                                              r"single_transformer_blocks\.1\.attn\.norm_k\.scale"):
        convert(missing, RULES, target)
    misshaped = dict(tensors, **{"transformer_blocks.0.attn.add_q_proj.weight": np.zeros((16, 15))})
    with pytest.raises(ConversionError, match=r"wrong shape[\s\S]*transformer_blocks\.0\.attn\."
                                              r"add_q_proj\.weight \[16, 15\]"):
        convert(misshaped, RULES, target)
    # a guidance-distilled checkpoint does not fit a model without the guidance embedding
    no_guidance = FluxConfig.from_diffusers(dict(config, guidance_embeds=False))
    target = target_shapes(abstract_module(lambda rngs: FluxTransformer(no_guidance, rngs=rngs)))
    with pytest.raises(ConversionError, match="guidance_embedder"):
        convert(tensors, RULES, target)


def test_scanned_and_unrolled_gradients_agree():
    config, batch, grids, text_len, first_id = CASES["dev"]
    config = dict(config, num_single_layers=2)  # runs of 2 blocks in each stack; less to compile
    reference = _reference(config)  # every weight away from its init: a mis-ordered stack shows
    scanned, unrolled = (_convert(reference, scan_layers=scan) for scan in (True, False))
    inputs = {k: jnp.asarray(v) for k, v in _inputs(config, batch, grids[0], text_len, first_id).items()}

    def loss_and_grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(**inputs) ** 2)
        # LLVM's cheapest codegen for both: half the compile time of these tiny programs
        compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile(
            compiler_options={"xla_backend_optimization_level": 0})
        return compiled(params)

    (loss_s, grads_s), (loss_u, grads_u) = loss_and_grads(scanned), loss_and_grads(unrolled)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    flat_s, flat_u = dict(nnx.to_flat_state(grads_s)), dict(nnx.to_flat_state(grads_u))
    assert flat_s.keys() == flat_u.keys()
    for path in flat_s:  # every block's own gradient, none mixed up across the stacks
        b = flat_u[path][...]
        np.testing.assert_allclose(flat_s[path][...], b, rtol=1e-4,
                                   atol=1e-5 * float(np.abs(b).max()), err_msg=str(path))
    for path in [("transformer_blocks", 0, "ff", "proj_in", "kernel"),
                 ("single_transformer_blocks", 1, "proj_mlp", "kernel"),
                 ("time_text_embed", "guidance_embedder", "linear_1", "kernel")]:
        assert float(jnp.abs(flat_s[path][...]).max()) > 0, path


def test_lora_targets_are_the_reference_runs():
    config, *_ = CASES["dev"]
    flux_config, ours = FluxConfig.from_diffusers(config), []

    def with_lora(rngs):  # as shapes only
        model = FluxTransformer(flux_config, rngs=rngs)
        ours.extend(lora.apply_lora(model, rank=2, alpha=4.0, rngs=rngs, targets=LORA_TARGETS))
        return model

    abstract_module(with_lora)
    # PEFT's target_modules match a module whose name ends in one of them
    reference = {name for name, module in _reference(config).named_modules()
                 if isinstance(module, torch.nn.Linear)
                 and any(name == t or name.endswith("." + t) for t in REFERENCE_LORA_TARGETS)}
    as_torch = source_keys(RULES, [parse_path(p + ".kernel") for p in ours])
    assert {key.removesuffix(".weight") for key, _ in as_torch.values()} == reference
    assert len(ours) == 2 * 12 + 3 * 3


def test_every_parameter_has_logical_axes():
    config = FluxConfig.from_diffusers(CASES["dev"][0])
    model = abstract_module(lambda rngs: FluxTransformer(config, rngs=rngs))
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param))))
    shapes = target_shapes(model)
    assert specs.keys() == shapes.keys()
    for path, spec in specs.items():
        assert len(spec.get_value()) == len(shapes[path]), path
    assert tuple(specs[("transformer_blocks", 0, "attn", "add_q_proj", "kernel")].get_value()) == ("embed", "heads")
    assert tuple(specs[("transformer_blocks", 0, "attn", "to_add_out", "kernel")].get_value()) == ("heads", "embed")
    assert tuple(specs[("single_transformer_blocks", 0, "proj_out", "kernel")].get_value()) == ("mlp", "embed")


def test_config_from_diffusers_and_the_component_registry():
    component = component_for_class("FluxTransformer2DModel")
    assert component.kind == "flux_transformer"
    config = component.parse_config(_flux1_dev_config(), {"remat": "block", "scan_layers": False})
    assert config.remat == "block" and not config.scan_layers and config.num_single_layers == 38
    # keys older configs lack take diffusers' defaults
    older = {k: v for k, v in _flux1_dev_config().items() if k not in ("out_channels", "axes_dims_rope")}
    assert FluxConfig.from_diffusers(older) == FluxConfig.from_diffusers(_flux1_dev_config())
    with pytest.raises(ValueError, match="guidance_embeds"):
        FluxConfig.from_diffusers(TINY)
    with pytest.raises(ValueError, match="use_flash"):
        FluxConfig.from_diffusers(dict(CASES["dev"][0], use_flash=True))
    with pytest.raises(ValueError, match="SD3Transformer2DModel"):
        FluxConfig.from_diffusers(dict(CASES["dev"][0], _class_name="SD3Transformer2DModel"))
    with pytest.raises(ValueError, match="must sum to attention_head_dim"):
        FluxConfig.from_diffusers(dict(CASES["dev"][0], axes_dims_rope=(2, 2, 2)))


def test_bad_inputs_are_named():
    config = FluxConfig.from_diffusers(CASES["dev"][0])
    model = abstract_module(lambda rngs: FluxTransformer(config, rngs=rngs))  # shapes are all it checks
    kw = dict(hidden_states=jnp.zeros((2, 6, 6)), timestep=jnp.zeros((2,)),
              encoder_hidden_states=jnp.zeros((2, 3, 12)), pooled_projections=jnp.zeros((2, 10)),
              img_ids=jnp.zeros((6, 3)), txt_ids=jnp.zeros((3, 3)), guidance=jnp.ones((2,)))
    with pytest.raises(ValueError, match="guidance of shape"):
        model(**dict(kw, guidance=None))
    with pytest.raises(ValueError, match="packed latent tokens"):
        model(**dict(kw, hidden_states=jnp.zeros((2, 2, 3, 6))))
    with pytest.raises(ValueError, match="img_ids of shape"):
        model(**dict(kw, img_ids=jnp.zeros((1, 6, 3))))
    schnell = FluxConfig.from_diffusers(dict(CASES["dev"][0], guidance_embeds=False))
    model = abstract_module(lambda rngs: FluxTransformer(schnell, rngs=rngs))
    with pytest.raises(ValueError, match="no guidance embedding"):
        model(**kw)
