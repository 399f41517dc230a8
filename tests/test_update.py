"""The shared, sharded update (flowgrpo_jax/update.py) with the GRPO objective on a tiny MMDiT
with LoRA.

Run as a script (tests/test_parallel.py does, with 8 fake CPU devices) it compares one update
on meshes 2x4 and 8x1 (data parallel with and without fsdp) with the same update on one device.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowgrpo_jax import objectives, parallel
from flowgrpo_jax import update as up
from flowgrpo_jax.generator import nnx_velocity
from flowgrpo_jax.lora import apply_lora
from flowgrpo_jax.models.mmdit import JOINT_ATTENTION, TRAINABLE, MMDiT, MMDiTConfig
from flowgrpo_jax.sampling.rollout import rollout
from flowgrpo_jax.sampling.schedule import flow_match_schedule

# A tiny SD3.5-style MMDiT: dual attention (attn2, which LoRA must leave alone) in block 0,
# qk RMS norm, the context_pre_only last block.
CONFIG = MMDiTConfig(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=6,
                     caption_projection_dim=16, pooled_projection_dim=6, out_channels=4,
                     pos_embed_max_size=4, dual_attention_layers=(0,), qk_norm="rms_norm")
CHANNELS, TEXT_LEN, SIZE = CONFIG.in_channels, 3, 4
SIGMAS = flow_match_schedule(3)[0]
GRPO = objectives.load("grpo")
HYPER = dict(learning_rate=3e-4, beta=0.04, ema_max_decay=0.9, noise_level=0.7,
             guidance_scale=4.5, clip_range=1e-4)
KEY = jax.random.key(0)


def _settings(**overrides):
    return up.Settings(**{"num_terms": 2, "micro_batch_size": 8, "sigma_max": float(SIGMAS[1]),
                          **overrides})


def _state(params, mesh, **hyper):
    return up.create_train_state(params, up.make_optimizer(), mesh, {**HYPER, **hyper}, GRPO)


def _apply(model, x, t, text):
    return model(x, t, *text)


@functools.lru_cache(maxsize=None)
def _model(remat="none"):
    """The tiny model with LoRA, split for training; one velocity function object per remat
    policy for all tests, so that the jitted rollout compiles once."""
    model = MMDiT(dataclasses.replace(CONFIG, remat=remat), rngs=nnx.Rngs(0))
    apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1), targets=JOINT_ATTENTION)
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    return nnx_velocity(graphdef, _apply), lora, frozen


@functools.lru_cache(maxsize=None)
def _data(lora_b_scale=0.02, logp_offset=2e-4, batch_size=16, kind="sde"):
    """LoRA params and a rollout batch with advantages. lora_b_scale > 0 stands for a LoRA that
    has trained a little (KL and all grads nonzero); logp_offset moves the old log-probs a little
    off the current policy, so some ratios leave the clip range."""
    velocity, lora, frozen = _model()
    if lora_b_scale:
        keys = iter(jax.random.split(jax.random.key(5), 64))
        lora = jax.tree.map(lambda p: p + lora_b_scale * jax.random.normal(next(keys), p.shape), lora)
    k_text, k_pool, k_noise, k_roll, k_adv, k_lp = jax.random.split(jax.random.key(11), 6)
    text_dim, pooled_dim = CONFIG.joint_attention_dim, CONFIG.pooled_projection_dim
    text = (jax.random.normal(k_text, (batch_size, TEXT_LEN, text_dim)),
            jax.random.normal(k_pool, (batch_size, pooled_dim)))
    uncond = (jnp.zeros((1, TEXT_LEN, text_dim)), jnp.zeros((1, pooled_dim)))
    noise = jax.random.normal(k_noise, (batch_size, SIZE, SIZE, CHANNELS))
    roll = rollout(velocity, (lora, frozen), noise, text, SIGMAS, key=k_roll, kind=kind,
                   noise_level=0.7, guidance_scale=4.5, uncond_text=uncond)
    old_log_probs = roll.log_probs + logp_offset * jax.random.normal(k_lp, roll.log_probs.shape)
    batch = {name: getattr(roll, name) for name in GRPO.records}
    batch.update(log_probs=old_log_probs, targets=jax.random.normal(k_adv, (batch_size,)),
                 text=text, ids=jnp.arange(batch_size))
    return lora, batch, uncond


_STEPS = {}


def _step(mesh, settings, remat="none", state=None):
    """The compiled update for these settings (one per settings, remat policy and mesh)."""
    key = (settings, remat, mesh.shape_tuple, tuple(d.id for d in mesh.devices.flat))
    if key not in _STEPS:
        velocity, lora, frozen = _model(remat)
        state = state or _state(lora, mesh)
        _STEPS[key] = up.make_train_step(GRPO, velocity, up.make_optimizer(), settings, mesh,
                                         state=state, frozen=frozen)
    return _STEPS[key]


def _run_steps(mesh, num_updates=2, lora_b_scale=0.02, logp_offset=2e-4, remat="none",
               hyper=None, **settings):
    _, _, frozen = _model(remat)
    lora, batch, uncond = _data(lora_b_scale, logp_offset)
    state = _state(lora, mesh, **(hyper or {}))  # new buffers: `lora` survives donation
    step = _step(mesh, _settings(**settings), remat, state)
    frozen = jax.device_put(frozen, parallel.state_shardings(frozen, mesh))
    batch = parallel.shard_batch(batch, mesh)
    history = []
    for _ in range(num_updates):
        state, metrics = step(state, frozen, None, batch, uncond, KEY)
        history.append(jax.device_get(metrics))
    return state, history


def _max_abs_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def compare_meshes():
    """One-device result vs (data, fsdp) = (2, 4) and (8, 1): data parallel with and without
    fsdp; printed and asserted."""
    devices = jax.devices()
    assert len(devices) == 8, f"expected 8 fake CPU devices, got {len(devices)}"
    ref_state, ref_metrics = _run_steps(parallel.make_mesh(devices=devices[:1]))
    ref_state = jax.device_get(ref_state)
    moved = _max_abs_diff(ref_state.params, _data()[0])
    assert moved > 1e-5, f"the update did not change the params ({moved})"
    for data, fsdp in [(2, 4), (8, 1)]:
        state, metrics = _run_steps(parallel.make_mesh(data=data, fsdp=fsdp, devices=devices))
        # the params stay sharded as the rules say: lora_a of to_q is ("embed", None)
        spec = state.params["transformer_blocks"][0]["attn"]["to_q"]["lora_a"].get_value().sharding.spec
        assert tuple(spec) == ("fsdp", None), spec
        state = jax.device_get(state)
        diff_params = _max_abs_diff(state.params, ref_state.params)
        diff_ema = _max_abs_diff(state.ema_params, ref_state.ema_params)
        diff_opt = _max_abs_diff(state.opt_state, ref_state.opt_state)
        print(f"mesh {data}x{fsdp}: max|params diff| {diff_params:.2e}  ema {diff_ema:.2e}  "
              f"opt {diff_opt:.2e}  (update size {moved:.2e})")
        for tree_diff in (diff_params, diff_ema):
            assert tree_diff < 1e-6, f"mesh {data}x{fsdp} differs from one device by {tree_diff}"
        assert diff_opt < 1e-5
        for ref, got in zip(ref_metrics, metrics):
            for name in ref:
                np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-7, err_msg=name)


def test_micro_batching_does_not_change_the_update():
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    whole, _ = _run_steps(mesh, num_updates=1, micro_batch_size=16)
    halves, _ = _run_steps(mesh, num_updates=1, micro_batch_size=8)
    assert _max_abs_diff(whole.params, halves.params) < 1e-6


def test_zero_lora_has_zero_kl_and_metrics_are_sane():
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    state, (metrics,) = _run_steps(mesh, num_updates=1, lora_b_scale=0.0)
    assert float(metrics["kl"]) == 0.0
    assert 0.0 < float(metrics["clipfrac"]) < 1.0
    assert float(metrics["grad_norm"]) > 0.0
    assert int(state.step) == 1
    # EMA after the first update: decay (1 + 1) / (10 + 1) towards the new params
    np.testing.assert_allclose(metrics["ema_decay"], 2 / 11, rtol=1e-6)
    initial = _data(lora_b_scale=0.0)[0]
    expected = jax.tree.map(lambda e, p: 2 / 11 * e + 9 / 11 * p, initial, state.params)
    assert _max_abs_diff(state.ema_params, expected) < 1e-7


# block_save_dots in the slow suite for make test's budget: its gradient is checked in test_mmdit
@pytest.mark.parametrize("policy", ["block", pytest.param("block_save_dots", marks=pytest.mark.slow)])
def test_remat_gives_the_same_update(policy):
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    plain, _ = _run_steps(mesh, num_updates=1)
    remat, _ = _run_steps(mesh, num_updates=1, remat=policy)
    assert _max_abs_diff(plain.params, remat.params) < 1e-7


def test_updates_lower_the_loss_on_a_fixed_batch():
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    _, history = _run_steps(mesh, num_updates=6, hyper=dict(beta=0.0, clip_range=0.2), kl=False)
    losses = [float(m["policy_loss"]) for m in history]
    assert losses[-1] < losses[0] - 1e-3, losses


def test_full_fine_tuning_with_a_frozen_reference_copy():
    graphdef, params, rest = nnx.split(MMDiT(CONFIG, rngs=nnx.Rngs(0)), TRAINABLE, ...)
    assert jax.tree.leaves(rest)  # the position table, a buffer, stays frozen
    velocity = nnx_velocity(graphdef, _apply)
    _, batch, uncond = _data()
    reference = params  # create_train_state copies it, so this stays the initial weights
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    state = _state(params, mesh)
    step = up.make_train_step(GRPO, velocity, up.make_optimizer(), _settings(), mesh, state=state,
                              frozen=rest, reference=reference)
    state, first = step(state, rest, reference, batch, uncond, KEY)
    state, second = step(state, rest, reference, batch, uncond, KEY)
    assert float(first["kl"]) == 0.0  # the policy still equals its reference copy
    assert float(second["kl"]) > 0.0
    unchanged = [jax.tree_util.keystr(path)
                 for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state.params),
                                         jax.tree.leaves(reference))
                 if not bool(jnp.any(a != b))]
    # Only the zero-initialised bias of the last block's context queries: that block drops its
    # context output, so they get no gradient (the kernel still moves by weight decay).
    assert unchanged == ["['transformer_blocks'][0]['attn']['add_q_proj']['bias'].value"]


def test_a_nan_batch_is_skipped_and_counted_and_the_next_update_proceeds():
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    _, _, frozen = _model()
    lora, batch, uncond = _data()
    step = _step(mesh, _settings())
    state = _state(lora, mesh)
    initial = jax.device_get(state)  # the step donates `state`
    frozen = jax.device_put(frozen, parallel.state_shardings(frozen, mesh))
    # one NaN advantage: sample 3 lies in the second of the two micro batches of 8
    poisoned = {**batch, "targets": batch["targets"].at[3].set(jnp.nan)}
    state, metrics = step(state, frozen, None, parallel.shard_batch(poisoned, mesh), uncond, KEY)
    assert float(metrics["skipped_nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    state = jax.device_get(state)
    assert int(state.step) == 0
    assert _max_abs_diff(state, initial) == 0.0  # params, optimizer state and EMA unchanged
    state, metrics = step(state, frozen, None, parallel.shard_batch(batch, mesh), uncond, KEY)
    assert float(metrics["skipped_nonfinite"]) == 0.0 and int(state.step) == 1
    once, _ = _run_steps(mesh, num_updates=1)  # one update with no NaN batch before it
    assert _max_abs_diff(state, once) == 0.0


def test_exact_log_ratios_give_the_update_of_the_rollouts_own_log_probs():
    """In float32 the rollout's log-probs are the update's own to rounding: the update given
    log-ratio values of 0 (with the gradient of its own log-prob) matches the one that
    computes them against the rollout's."""
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    lora, batch, uncond = _data(logp_offset=0.0)
    from_rollout, (m_rollout,) = _run_steps(mesh, num_updates=1, logp_offset=0.0)
    exact_batch = {**batch, "log_ratios": jnp.zeros((batch["targets"].shape[0], 2))}
    _, _, frozen = _model()
    exact, m_exact = _step(mesh, _settings())(_state(lora, mesh), frozen, None, exact_batch,
                                              uncond, KEY)
    assert (float(m_exact["ratio_min"]), float(m_exact["ratio_max"])) == (1.0, 1.0)
    assert abs(float(m_rollout["ratio_mean"]) - 1.0) < 1e-5
    assert _max_abs_diff(exact.params, from_rollout.params) < 1e-6


def test_rescore_gives_the_rollouts_log_probs_in_sample_order():
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    velocity, lora, frozen = _model()
    lora, batch, uncond = _data(logp_offset=0.0)
    state = _state(lora, mesh)
    rescore = up.make_rescore(GRPO, velocity, _settings(micro_batch_size=4), mesh, state=state,
                              frozen=frozen)
    records = rescore(lora, frozen, state.hyper, batch, uncond)
    assert records["log_probs"].shape == records["noise_std"].shape == (16, 2)
    assert "means" not in records  # GRPO's log-ratio compares log-probs only
    np.testing.assert_allclose(records["log_probs"], batch["log_probs"][:, :2], rtol=0, atol=1e-5)
    assert float(jnp.std(batch["log_probs"][:, 0])) > 1e-2  # samples differ: the order is checked


def test_the_ema_steps_every_k_updates_as_the_reference_counts():
    decays = [float(up.ema_decay(jnp.asarray(n), 0.81, every=8)) for n in range(1, 17)]
    stepped = [n for n, d in zip(range(1, 17), decays) if d < 1]
    assert stepped == [7, 15]  # the reference: (global_step + 1) % 8 == 0
    assert decays[6] == pytest.approx(8 / 17) and decays[14] == pytest.approx(16 / 25)
    assert float(up.ema_decay(jnp.asarray(39), 0.81, every=8)) == pytest.approx(0.81)


def test_bad_batch_layout_is_named():
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="micro_batch_size"):
        _run_steps(mesh, num_updates=1, micro_batch_size=5)
    with pytest.raises(ValueError, match="timestep_fraction"):
        up.num_train_timesteps(10, 0.05)
    assert up.num_train_timesteps(10, 0.99) == 9


if __name__ == "__main__":
    compare_meshes()


@pytest.mark.parametrize("decay_steps", [0, 10])
def test_optimizer_rate_is_constant_or_a_cosine_down_to_zero(decay_steps):
    optimizer = up.make_optimizer(weight_decay=0.0)
    settings = _settings(lr_decay_steps=decay_steps)
    params = jnp.zeros(3)
    state = optimizer.init(params)
    sizes = []
    for n in range(11):  # a constant gradient: Adam's step is the rate itself
        rate = up.learning_rate({"learning_rate": jnp.float32(1e-2)}, jnp.asarray(n), settings)
        state = state._replace(hyperparams={**state.hyperparams, "learning_rate": rate})
        updates, state = optimizer.update(jnp.ones(3), state, params)
        sizes.append(float(jnp.abs(updates).max()))
    if decay_steps:
        expected = [1e-2 * 0.5 * (1 + np.cos(np.pi * min(n, 10) / 10)) for n in range(11)]
    else:
        expected = [1e-2] * 11
    np.testing.assert_allclose(sizes, expected, rtol=1e-4, atol=1e-9)


def test_a_bf16_state_stays_bf16():
    """A full fine-tune of bf16 weights keeps its Adam moments and its EMA, and so its donated
    state, in bf16, whatever float32 arrays the rate and the decay are."""
    params = {"w": jnp.ones((4,), jnp.bfloat16)}
    optimizer = up.make_optimizer()
    state = optimizer.init(params)
    state = state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.float32(1e-3)})
    _, state = optimizer.update({"w": jnp.full((4,), 0.5, jnp.bfloat16)}, state, params)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.inner_state)
            if leaf.ndim} == {jnp.dtype(jnp.bfloat16)}
    decay = up.ema_decay(jnp.asarray(1), jnp.float32(0.9))
    assert up.ema_update(params, params, decay)["w"].dtype == jnp.bfloat16
