"""The objectives' math: DiffusionNFT's and GRPO-Guard's losses against hand-computed cases, and
identities that hold only if the math is right (docs/design.md, sections 12 and 13)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowgrpo_jax import objectives
from flowgrpo_jax import update as up
from flowgrpo_jax.objectives.base import Inputs
from flowgrpo_jax.objectives.nft import nft_loss, old_policy_decay, optimality
from flowgrpo_jax.sampling.rollout import STEP_RECORDS, rollout
from test_update import SIGMAS, _model

GUARD = objectives.load("grpo_guard")


# ---- DiffusionNFT -------------------------------------------------------------------------

def test_optimality_probability_and_the_old_policys_decay():
    np.testing.assert_allclose(optimality([-7.0, -5.0, 0.0, 2.5, 5.0], 5.0), [0, 0, 0.5, 0.75, 1])
    decay = lambda n, *schedule: float(old_policy_decay(jnp.asarray(n), *schedule))
    assert [decay(n, 0, 0.001, 0.5) for n in (0, 10, 499, 900)] == pytest.approx([0, 0.01, 0.499, 0.5])
    assert [decay(n, 75, 0.0075, 0.999) for n in (0, 74, 75, 95, 400)] == pytest.approx(
        [0, 0, 0, 0.15, 0.999])


def test_nft_loss_by_hand():
    """Two samples of two elements, every term written out."""
    x0 = jnp.array([[1.0, -1.0], [0.5, 0.0]])
    eps = jnp.array([[0.0, 1.0], [-1.0, 2.0]])
    t = jnp.array([0.5, 0.25])
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v = jnp.array([[0.2, 0.4], [-0.3, 0.1]])
    v_old = jnp.array([[0.0, 0.5], [-0.1, 0.3]])
    v_ref = jnp.zeros((2, 2))
    r = jnp.array([1.0, 0.25])
    beta, kl_weight, c = 0.5, 0.1, 5.0
    expected_policy = 0.0
    for i in range(2):
        v_pos = beta * np.asarray(v[i]) + (1 - beta) * np.asarray(v_old[i])
        v_neg = (1 + beta) * np.asarray(v_old[i]) - beta * np.asarray(v[i])
        e_pos = np.asarray(x_t[i]) - float(t[i]) * v_pos - np.asarray(x0[i])
        e_neg = np.asarray(x_t[i]) - float(t[i]) * v_neg - np.asarray(x0[i])
        pos = np.mean(e_pos ** 2) / max(np.mean(np.abs(e_pos)), 1e-5)
        neg = np.mean(e_neg ** 2) / max(np.mean(np.abs(e_neg)), 1e-5)
        expected_policy += (float(r[i]) * pos + (1 - float(r[i])) * neg) / 2
    expected_policy *= c / beta
    expected_kl = float(np.mean(np.asarray(v) ** 2))
    loss, stats = nft_loss(v, v_old, v_ref, x_t, x0, t, r, beta=beta, kl_weight=kl_weight,
                           adv_clip_max=c)
    np.testing.assert_allclose(stats["policy_loss"], expected_policy, rtol=1e-6)
    np.testing.assert_allclose(stats["kl"], expected_kl, rtol=1e-6)
    np.testing.assert_allclose(loss, expected_policy + kl_weight * expected_kl, rtol=1e-6)


def _random_case():
    """x0, eps, v_old, t and x_t for B = 3 samples of 4 x 4 x 2."""
    keys = jax.random.split(jax.random.key(0), 3)
    x0, eps, v_old = (jax.random.normal(k, (3, 4, 4, 2)) for k in keys)
    t = jnp.array([1.0, 0.6, 0.2])
    x_t = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * eps
    return x0, eps, v_old, t, x_t


def _policy_gradient(beta, r, v_old, x_t, x0, t):
    """d L_pol / d v, a function of v."""
    return jax.grad(lambda v: nft_loss(v, v_old, None, x_t, x0, t, r, beta=beta, kl_weight=0.0,
                                       adv_clip_max=5.0)[0])


@pytest.mark.parametrize("beta", [1.0, 0.1, 3.0])
def test_nft_gradient_at_the_old_policy_is_minus_2_2r_minus_1_v_star_minus_v_old(beta):
    """At theta = theta_old both branches' weights are w = mean|t (v* - v_old)|, and the policy
    loss's gradient is (c / (B D)) (-2 (2r - 1)) t^2 (v* - v_old) / w, whatever beta."""
    r = jnp.array([0.9, 0.5, 0.1])
    x0, eps, v_old, t, x_t = _random_case()
    grad = _policy_gradient(beta, r, v_old, x_t, x0, t)(v_old)
    t_ = t.reshape(-1, 1, 1, 1)
    v_star = eps - x0
    w = jnp.mean(jnp.abs(t_ * (v_star - v_old)), axis=(1, 2, 3), keepdims=True)
    size = v_old.shape[0] * np.prod(v_old.shape[1:])
    expected = 5.0 / size * (-2 * (2 * r - 1)).reshape(-1, 1, 1, 1) * t_ ** 2 * (v_star - v_old) / w
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(grad[1]).max()) < 1e-7  # r = 0.5: nothing to learn from that sample


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_nft_loss_pulls_v_back_to_the_old_policy_with_a_strength_proportional_to_beta(beta):
    """The policy loss's Hessian in v at v = v_old (the weights held, as stop_grad holds them) is
    (c / (B D)) 2 beta t^2 / w times the identity, whatever r: away from theta_old the gradient
    gains a pull back toward v_old in proportion to beta."""
    r = jnp.array([0.9, 0.5, 0.1])
    x0, eps, v_old, t, x_t = _random_case()
    grad = _policy_gradient(beta, r, v_old, x_t, x0, t)
    direction = jax.random.normal(jax.random.key(7), v_old.shape)
    _, hessian_times_direction = jax.jvp(grad, (v_old,), (direction,))
    t_ = t.reshape(-1, 1, 1, 1)
    w = jnp.mean(jnp.abs(t_ * (eps - x0 - v_old)), axis=(1, 2, 3), keepdims=True)
    size = v_old.shape[0] * np.prod(v_old.shape[1:])
    expected = 5.0 / size * 2 * beta * t_ ** 2 * direction / w
    np.testing.assert_allclose(hessian_times_direction, expected, rtol=1e-4, atol=1e-7)


def test_nft_gradient_reaches_the_params_through_the_velocity_jacobian():
    """With v = x_t W (a linear model on the channels) at W = W_old, d L / d W = J^T (d L / d v):
    the identity above, times the Jacobian, for the params themselves."""
    x0, eps = (jax.random.normal(k, (3, 4, 4, 2)) for k in jax.random.split(jax.random.key(1)))
    t, r = jnp.array([1.0, 0.6, 0.2]), jnp.array([0.9, 0.5, 0.1])
    x_t = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * eps
    w_old = jnp.array([[0.3, -0.2], [0.1, 0.4]])
    loss = lambda v: nft_loss(v, x_t @ w_old, None, x_t, x0, t, r, beta=1.0, kl_weight=0.0,
                              adv_clip_max=5.0)[0]
    grad_w = jax.grad(lambda w: loss(x_t @ w))(w_old)
    grad_v = jax.grad(loss)(x_t @ w_old)
    np.testing.assert_allclose(grad_w, jnp.einsum("bhwi,bhwo->io", x_t, grad_v), rtol=1e-5,
                               atol=1e-8)
    assert float(jnp.abs(grad_w).max()) > 1e-3


# ---- GRPO-Guard ---------------------------------------------------------------------------

def test_guard_log_ratio_and_step_weight_by_hand():
    new = {"log_probs": jnp.array([0.3]), "means": jnp.full((1, 1, 1, 2), 0.5),
           "noise_std": jnp.array([0.5])}
    old = {"log_probs": jnp.array([0.1]), "means": jnp.array([[[[0.0, 1.0]]]])}
    # b = mean((0.5, -0.5)^2) / (2 * 0.25) = 0.5; (0.3 - 0.1 + 0.5) * 0.5 = 0.35
    np.testing.assert_allclose(GUARD.log_ratio(new, old), [0.35], rtol=1e-6)
    micro = {"sigmas": jnp.array([[0.8, 0.5]]), "next_sigmas": jnp.array([[0.5, 0.1]])}
    np.testing.assert_allclose(GUARD.step_weights(micro, 1), [1 / 0.4], rtol=1e-6)


@pytest.fixture(scope="module")
def sde_rollout():
    """A tiny MMDiT's SDE rollout with every record, and LoRA params moved off the sampler's."""
    velocity, lora, frozen = _model()
    keys = iter(jax.random.split(jax.random.key(3), 64))
    sampler = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(next(keys), p.shape), lora)
    moved = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(next(keys), p.shape), sampler)
    text = (jax.random.normal(next(keys), (6, 3, 6)), jax.random.normal(next(keys), (6, 6)))
    out = rollout(velocity, (sampler, frozen), jax.random.normal(next(keys), (6, 4, 4, 4)), text,
                  SIGMAS, key=next(keys), kind="sde", noise_level=0.7, records=STEP_RECORDS)
    batch = {name: getattr(out, name) for name in GUARD.records}
    batch.update(text=text, targets=jnp.zeros(6), ids=jnp.arange(6))
    hyper = up.hyperparameters(dict(noise_level=0.7, guidance_scale=1.0, beta=0.0, clip_range=1e-4))
    settings = up.Settings(num_terms=2, micro_batch_size=6, sigma_max=float(SIGMAS[1]), kl=False)
    inputs = Inputs(velocity, frozen, None, {}, hyper, None, settings)
    return moved, batch, inputs


@pytest.mark.parametrize("j", [0, 1])
def test_guard_log_ratio_is_the_noise_times_the_mean_shift_on_rollout_data(sde_rollout, j):
    """x_next = mu_old + sigma_s eps, so log_ratio = mean_dims(eps (mu - mu_old))."""
    moved, batch, inputs = sde_rollout
    new = GUARD.step_records(moved, inputs, batch, j)
    old = {"log_probs": batch["log_probs"][:, j], "means": batch["means"][:, j]}
    eps = (batch["trajectory"][:, j + 1] - old["means"]) / new["noise_std"].reshape(-1, 1, 1, 1)
    expected = jnp.mean(eps * (new["means"] - old["means"]), axis=(1, 2, 3))
    got = GUARD.log_ratio(new, old)
    assert float(jnp.abs(expected).max()) > 1e-4  # the params moved the means
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-7)


def test_guard_has_no_gradient_without_advantages(sde_rollout):
    moved, batch, inputs = sde_rollout
    grads, stats = jax.grad(lambda p: GUARD.term_loss(p, inputs, batch, 0, None), has_aux=True)(moved)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) == 0.0
    assert float(stats["ratio_max"]) > 1.0 > float(stats["ratio_min"])  # ratios are not all 1


def test_the_trainer_the_update_and_the_planner_name_no_objective():
    """They see an objective only through objectives.base.Objective."""
    from test_families import PACKAGE, imported_modules
    own = tuple(f"flowgrpo_jax.objectives.{name}" for name in objectives.OBJECTIVES)
    for name in ("train.py", "update.py", "planner.py", "programs.py", "evaluate.py", "export.py"):
        source = (PACKAGE / name).read_text()
        assert not [m for m in imported_modules(PACKAGE / name) if m.startswith(own)], name
        assert not [o for o in objectives.OBJECTIVES if f'"{o}"' in source], name
