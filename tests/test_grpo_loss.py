import jax.numpy as jnp
import numpy as np
import pytest

from flowgrpo_jax.objectives.grpo import clipped_surrogate, grpo_loss, mean_kl

EPS = 0.1


def _surrogate(dlogp, adv):
    return clipped_surrogate(jnp.asarray(dlogp, jnp.float32), jnp.asarray(adv), EPS)


def test_surrogate_clips_on_both_sides():
    r_hi, r_lo = 1.5, 0.5
    dlogp = [np.log(r_hi), np.log(r_hi), np.log(r_lo), np.log(r_lo)]
    adv = [2.0, -2.0, 2.0, -2.0]
    # ratio 1.5, A>0: max(-3, -2.2) = -2.2 (clipped: no extra credit past 1+eps)
    # ratio 1.5, A<0: max(3, 2.2) = 3      (unclipped: the full penalty stays)
    # ratio 0.5, A>0: max(-1, -1.8) = -1   (unclipped)
    # ratio 0.5, A<0: max(1, 1.8) = 1.8    (clipped at 1-eps)
    per_sample = np.array([-2.2, 3.0, -1.0, 1.8])
    loss, ratio = _surrogate(dlogp, adv)
    np.testing.assert_allclose(ratio, [1.5, 1.5, 0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(loss, per_sample.mean(), rtol=1e-6)


def test_surrogate_inside_clip_range_is_plain_weighted_ratio():
    dlogp = [np.log(1.05), np.log(0.97)]
    adv = [1.0, -3.0]
    loss, _ = _surrogate(dlogp, adv)
    np.testing.assert_allclose(loss, np.mean([-1.05, 3 * 0.97]), rtol=1e-6)


def test_kl_by_hand_and_zero_for_equal_means():
    mean = jnp.arange(2 * 2 * 2 * 1, dtype=jnp.float32).reshape(2, 2, 2, 1)
    ref = mean.at[0].add(1.0).at[1].add(2.0)
    std = jnp.array([0.5, 2.0])
    # sample 0: 1 / (2*0.25) = 2; sample 1: 4 / (2*4) = 0.5
    np.testing.assert_allclose(mean_kl(mean, ref, std), 1.25, rtol=1e-6)
    np.testing.assert_allclose(mean_kl(mean, ref, std.reshape(2, 1, 1, 1)), 1.25, rtol=1e-6)
    assert float(mean_kl(mean, mean, std)) == 0.0


def test_total_loss_and_stats():
    logp = jnp.array([0.2, -0.1, 0.0])
    old = jnp.array([0.0, 0.0, 0.0])
    adv = jnp.array([1.0, -1.0, 0.5])
    mean = jnp.ones((3, 4))
    ref = jnp.zeros((3, 4))
    std = jnp.array([1.0, 1.0, 1.0])
    loss, stats = grpo_loss(logp - old, adv, mean, ref, std, clip_range=0.1, beta=0.04)
    ratio = np.exp([0.2, -0.1, 0.0])
    pg = np.mean(
        np.maximum(-np.array(adv) * ratio, -np.array(adv) * np.clip(ratio, 0.9, 1.1))
    )
    np.testing.assert_allclose(stats["policy_loss"], pg, rtol=1e-6)
    np.testing.assert_allclose(stats["kl"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(loss, pg + 0.04 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(stats["approx_kl"], 0.5 * np.mean([0.04, 0.01, 0.0]), rtol=1e-6)
    # |ratio - 1|: 0.221, 0.095, 0 -> one of three beyond 0.1
    np.testing.assert_allclose(stats["clipfrac"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(stats["ratio_mean"], ratio.mean(), rtol=1e-6)
    np.testing.assert_allclose([stats["ratio_min"], stats["ratio_max"]], [ratio.min(), ratio.max()],
                               rtol=1e-6)


def test_matches_the_reference_pytorch_formulas():
    """The reference's per-step loss (train_sd3.py), written out in torch on the same inputs."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    batch, clip_range, beta = 6, 1e-4, 0.04
    log_prob = rng.normal(size=batch).astype(np.float32) * 3e-4
    old = rng.normal(size=batch).astype(np.float32) * 3e-4
    adv = rng.normal(size=batch).astype(np.float32) * 2
    mean = rng.normal(size=(batch, 4, 4, 3)).astype(np.float32)  # NHWC here, NCHW in torch
    ref_mean = mean + 0.1 * rng.normal(size=mean.shape).astype(np.float32)
    std = rng.uniform(0.2, 1.5, size=batch).astype(np.float32)

    t = lambda a: torch.from_numpy(a)
    ratio = torch.exp(t(log_prob) - t(old))
    unclipped = -t(adv) * ratio
    clipped = -t(adv) * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy = torch.mean(torch.maximum(unclipped, clipped))
    m, m_ref = t(mean).permute(0, 3, 1, 2), t(ref_mean).permute(0, 3, 1, 2)
    std_dev_t = t(std).view(-1, 1, 1, 1)
    kl = torch.mean(((m - m_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2))
    expected = {
        "loss": policy + beta * kl, "policy_loss": policy, "kl": kl,
        "approx_kl": 0.5 * torch.mean((t(log_prob) - t(old)) ** 2),
        "clipfrac": torch.mean((torch.abs(ratio - 1.0) > clip_range).float()),
    }
    _, stats = grpo_loss(jnp.asarray(log_prob) - jnp.asarray(old), jnp.asarray(adv),
                         jnp.asarray(mean), jnp.asarray(ref_mean), jnp.asarray(std),
                         clip_range=clip_range, beta=beta)
    assert 0 < float(expected["clipfrac"]) < 1  # both clipped and unclipped samples
    for name, value in expected.items():
        np.testing.assert_allclose(stats[name], value.numpy(), rtol=1e-5, atol=1e-9, err_msg=name)
