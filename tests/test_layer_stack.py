"""Layers under scan (models/layer_stack.py): the same numbers as the layers one after another,
for the MMDiT (its runs of dual-attention, plain and context_pre_only blocks), T5 and CLIP,
with remat, LoRA, and gradients reaching each layer's own parameters."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowgrpo_jax import lora
from flowgrpo_jax.families.sd3.loading import SD35M_CONFIGS
from flowgrpo_jax.models import layer_stack
from flowgrpo_jax.models.abstract import abstract_module
from flowgrpo_jax.models.clip_text import CLIPTextConfig, CLIPTextModelWithProjection
from flowgrpo_jax.models.mmdit import JOINT_ATTENTION, MMDiT, MMDiTConfig
from flowgrpo_jax.models.t5 import T5Config, T5EncoderModel

MMDIT = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=6, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
             pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8,
             dual_attention_layers=(0, 1, 2), qk_norm="rms_norm")


def _mmdit(scan: bool, remat: str = "none", seed: int = 0) -> MMDiT:
    config = MMDiTConfig(**MMDIT, remat=remat, scan_layers=scan)
    model = MMDiT(config, rngs=nnx.Rngs(seed))
    # every weight away from its init (zeros would hide a mis-ordered stack); numpy's draws
    # compile nothing (jax.random would compile a program per weight shape)
    rng = np.random.default_rng(seed + 1)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(
        lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), state))
    return model


def _mmdit_inputs(batch=2):
    rng = np.random.default_rng(0)
    return dict(x=jnp.asarray(rng.standard_normal((batch, 6, 4, 4), np.float32)),
                timestep=jnp.asarray(rng.uniform(0, 1000, batch).astype(np.float32)),
                encoder_hidden_states=jnp.asarray(rng.standard_normal((batch, 5, 12), np.float32)),
                pooled_projections=jnp.asarray(rng.standard_normal((batch, 10), np.float32)))


def _with_structure_of(model, other):
    """`model`'s parameters in `other`'s structure (both built from the same seed)."""
    nnx.update(other, nnx.state(model))
    return other


def _close(a, b, what):
    """Equal up to float32 rounding of a sum's order: 1e-5 of the array's largest entry."""
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()), err_msg=what)


def test_runs_group_sd35_medium_as_the_architecture_does():
    with open(os.path.join(SD35M_CONFIGS, "transformer.json")) as f:
        config = MMDiTConfig.from_diffusers(json.load(f))
    model = abstract_module(lambda rngs: MMDiT(config, rngs=rngs, param_dtype=jnp.bfloat16))
    assert layer_stack.runs(model.transformer_blocks) == [
        list(range(13)), list(range(13, 23)), [23]]


def _with_lora(model):
    lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(3), targets=JOINT_ATTENTION)
    return model


def test_mmdit_scanned_equals_unrolled_forward_and_gradients():
    """The scanned runs with per-block remat against the plain blocks one after another, with
    LoRA on the joint attention: the loss, and the gradients of every block's own weights and
    LoRA factors."""
    scanned = _with_lora(_mmdit(True, "block"))
    unrolled = _with_structure_of(_with_lora(_mmdit(True)), _with_lora(_mmdit(False)))
    inputs = _mmdit_inputs()

    def loss_and_grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(**inputs) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    (loss_s, grads_s), (loss_u, grads_u) = loss_and_grads(scanned), loss_and_grads(unrolled)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    flat_s, flat_u = dict(nnx.to_flat_state(grads_s)), dict(nnx.to_flat_state(grads_u))
    assert flat_s.keys() == flat_u.keys()
    assert sum(path[-1] in ("lora_a", "lora_b") for path in flat_s) == 6 * 8 * 2 - 2 * 1
    for path in flat_s:  # every block's own gradient, none mixed up across the stack
        _close(flat_s[path][...], flat_u[path][...], str(path))
    assert float(jnp.abs(flat_s[("transformer_blocks", 4, "ff", "proj_in", "kernel")][...]).max()) > 0


def test_mmdit_scan_traces_each_kind_of_block_once():
    """What cuts compile time: the scanned program holds one copy of each run's block."""
    inputs = _mmdit_inputs()

    def jaxpr(model):
        graphdef, state = nnx.split(model)
        return jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(**inputs))(state)

    scanned, unrolled = jaxpr(_mmdit(True)), jaxpr(_mmdit(False))
    lengths = sorted(e.params["length"] for e in scanned.eqns if e.primitive.name == "scan")
    assert lengths == [2, 3]  # the dual-attention blocks 0-2 and the plain 3-4; 5 runs alone
    count = lambda j: str(j).count("dot_general")
    assert count(scanned) < 0.6 * count(unrolled)


def test_a_block_of_another_structure_breaks_the_run():
    model = _mmdit(True)
    lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(3),
                    targets=(r"transformer_blocks\.1\.attn\.to_q$",))
    assert layer_stack.runs(model.transformer_blocks) == [[0], [1], [2], [3, 4], [5]]
    unrolled = _with_structure_of(model, _mmdit(False))
    lora.apply_lora(unrolled, rank=2, alpha=4.0, rngs=nnx.Rngs(3),
                    targets=(r"transformer_blocks\.1\.attn\.to_q$",))
    nnx.update(unrolled, nnx.state(model))
    inputs = _mmdit_inputs()
    np.testing.assert_allclose(model(**inputs), unrolled(**inputs), rtol=1e-5, atol=1e-6)


def _same_params(make):
    scanned = make(True)
    unrolled = make(False)
    nnx.update(unrolled, nnx.state(scanned))
    return scanned, unrolled


def test_t5_scanned_equals_unrolled():
    make = lambda scan: T5EncoderModel(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24,
                                                num_layers=4, num_heads=4,
                                                feed_forward_proj="gated-gelu", scan_layers=scan),
                                       rngs=nnx.Rngs(0))
    scanned, unrolled = _same_params(make)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 9)))
    np.testing.assert_allclose(jax.jit(lambda m: m(ids))(scanned), jax.jit(lambda m: m(ids))(unrolled),
                               rtol=1e-5, atol=1e-6)


def test_clip_scanned_equals_unrolled_every_hidden_state():
    make = lambda scan: CLIPTextModelWithProjection(
        CLIPTextConfig(vocab_size=60, hidden_size=16, intermediate_size=24, projection_dim=8,
                       num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=10,
                       eos_token_id=59, scan_layers=scan), rngs=nnx.Rngs(0))
    scanned, unrolled = _same_params(make)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 59, (2, 7)))
    a, b = scanned(ids), unrolled(ids)
    assert len(a.hidden_states) == len(b.hidden_states) == 4
    for x, y in zip((*a.hidden_states, a.last_hidden_state, a.text_embeds),
                    (*b.hidden_states, b.last_hidden_state, b.text_embeds)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
