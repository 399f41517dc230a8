"""dpm2_step (DPM-Solver++(2M), DiffusionNFT's deterministic "dpm2" sampler) against a torch
transcription of the reference's update formulas and sampling loop, against diffusers'
DPMSolverMultistepScheduler, on the straight-line flow, and under jit + lax.scan."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from flowgrpo_jax.sampling.dpm import dpm2_step
from flowgrpo_jax.sampling.schedule import flow_match_schedule

SHAPE = (2, 4, 4, 3)  # NHWC, batch 2
SIGMAS = flow_match_schedule(10, shift=3.0)[0]  # 11 entries, 1 ... 0


def linear_model(seed=0):
    """A fixed random affine velocity v(x, sigma) = A x + b*sigma over the flattened latent."""
    rng = np.random.default_rng(seed)
    dim = int(np.prod(SHAPE[1:]))
    a = (rng.standard_normal((dim, dim)) * 0.8 / np.sqrt(dim)).astype(np.float32)
    b = rng.standard_normal(SHAPE[1:]).astype(np.float32)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    return a, b, x


def jax_velocity(a, b):
    return lambda x, sigma: (x.reshape(x.shape[0], -1) @ a).reshape(x.shape) + b * sigma


def torch_velocity(a, b):
    a, b = torch.from_numpy(a), torch.from_numpy(b)
    return lambda x, sigma: (x.reshape(x.shape[0], -1) @ a).reshape(x.shape) + b * sigma


def jax_loop(velocity_fn, x, sigmas):
    """Python loop, Python-int step index; returns the trajectory (num_steps + 1, ...)."""
    x = jnp.asarray(x)
    n, traj, prev_x0 = len(sigmas) - 1, [x], jnp.zeros_like(x)
    for i in range(n):
        x, prev_x0 = dpm2_step(x, velocity_fn(x, sigmas[i]), prev_x0, sigmas[max(i - 1, 0)], sigmas[i],
                               sigmas[i + 1], step_index=i, num_steps=n)
        traj.append(x)
    return np.stack([np.asarray(t) for t in traj])


def jax_scan(velocity_fn, x, sigmas):
    """The same under lax.scan with a traced step index; returns the trajectory."""
    sigmas = jnp.asarray(sigmas, jnp.float32)
    n = sigmas.shape[0] - 1
    sigma_prev = jnp.concatenate([sigmas[:1], sigmas[:-2]])

    def body(carry, xs):
        x, prev_x0 = carry
        i, s_prev, s, s_next = xs
        x, x0_hat = dpm2_step(x, velocity_fn(x, s), prev_x0, s_prev, s, s_next, step_index=i, num_steps=n)
        return (x, x0_hat), x

    x = jnp.asarray(x)
    _, traj = jax.lax.scan(body, (x, jnp.zeros_like(x)), (jnp.arange(n), sigma_prev, sigmas[:-1], sigmas[1:]))
    return jnp.concatenate([x[None], traj])


# ---- the reference's formulas (DiffusionNFT, flow_grpo/diffusers_patch/solver.py), in torch ----

def ref_alpha_sigma(sigma):
    return 1 - sigma, sigma


def ref_ddim(x0, sigmas64, i, sample, eta, noise):
    t, s = sigmas64[i + 1], sigmas64[i]
    std_dev_t = eta * t
    dt_sqrt = torch.sqrt(1.0 - t**2 * (1 - s) ** 2 / (s**2 * (1 - t) ** 2))
    rho_t = std_dev_t * dt_sqrt
    noise_pred = (sample - (1 - s) * x0) / s
    return (1 - t) * x0 + torch.sqrt(t**2 - rho_t**2) * noise_pred + rho_t * noise


def ref_first_order(x0, sigmas64, i, sample):
    alpha_t, sigma_t = ref_alpha_sigma(sigmas64[i + 1])
    alpha_s, sigma_s = ref_alpha_sigma(sigmas64[i])
    h = (torch.log(alpha_t) - torch.log(sigma_t)) - (torch.log(alpha_s) - torch.log(sigma_s))
    return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0


def ref_second_order(outputs, sigmas64, i, sample):
    alpha_t, sigma_t = ref_alpha_sigma(sigmas64[i + 1])
    alpha_s0, sigma_s0 = ref_alpha_sigma(sigmas64[i])
    alpha_s1, sigma_s1 = ref_alpha_sigma(sigmas64[i - 1])
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
    m0, m1 = outputs[-1], outputs[-2]
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    d0, d1 = m0, (1.0 / r0) * (m0 - m1)
    coef = alpha_t * (torch.exp(-h) - 1.0)
    return (sigma_t / sigma_s0) * sample - coef * d0 - 0.5 * coef * d1


def ref_sample(velocity_fn, z, sigmas, order=2):
    """run_sampling(solver=f"dpm{order}", determistic=True): returns the trajectory and the
    update each step used."""
    sigmas = torch.from_numpy(np.asarray(sigmas, np.float32))
    sigmas64 = sigmas.to(torch.float64)
    n = len(sigmas) - 1
    outputs, lower_order_nums = [None] * order, 0
    gen = torch.Generator().manual_seed(0)
    traj, kinds = [z], []
    for i in range(n):
        v = velocity_fn(z, sigmas[i]).float()
        x0 = z - sigmas[i] * v
        outputs = outputs[1:] + [x0]
        final = i == n - 1
        if order == 1 or lower_order_nums < 1 or final:
            if i == 0 or final:
                z = ref_ddim(x0, sigmas64, i, z, 0.0, torch.randn(z.shape, generator=gen))
                kinds.append("ddim")
            else:
                z = ref_first_order(x0, sigmas64, i, z)
                kinds.append("first")
        else:  # order 2 takes this branch whatever the reference's lower_order_second says
            z = ref_second_order(outputs, sigmas64, i, z)
            kinds.append("second")
        lower_order_nums = min(lower_order_nums + 1, order)
        traj.append(z.float())
    return np.stack([t.numpy() for t in traj]), kinds


def assert_trajectories_close(ours, ref, tol=1e-5):
    assert ours.shape == ref.shape
    for i, (a, b) in enumerate(zip(ours, ref)):
        err = np.max(np.abs(a - b)) / np.max(np.abs(b))
        assert err <= tol, f"state {i}: relative error {err:.2e}"


def test_matches_reference_formulas_on_sd3_schedule():
    a, b, x = linear_model()
    ref, kinds = ref_sample(torch_velocity(a, b), torch.from_numpy(x), SIGMAS)
    assert kinds == ["ddim"] + ["second"] * 8 + ["ddim"]
    ours = jax_loop(jax_velocity(a, b), x, SIGMAS)
    assert_trajectories_close(ours, ref)
    # The second-order correction is far above the tolerance, so the test can tell it apart.
    first_order, _ = ref_sample(torch_velocity(a, b), torch.from_numpy(x), SIGMAS, order=1)
    assert np.max(np.abs(first_order[-1] - ref[-1])) / np.max(np.abs(ref[-1])) > 1e-2


def diffusers_sample(velocity_fn, z, sigmas=None):
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, lower_order_final=True,
        final_sigmas_type="zero")
    sched.set_timesteps(10)
    if sigmas is not None:  # this diffusers' set_timesteps takes no sigmas: put ours in place
        sched.sigmas = torch.from_numpy(np.asarray(sigmas, np.float32))
        sched.timesteps = (sched.sigmas[:-1] * 1000).to(torch.int64)
    sched.set_begin_index(0)
    traj = [z]
    for i, t in enumerate(sched.timesteps):
        z = sched.step(velocity_fn(z, sched.sigmas[i]), t, z).prev_sample
        traj.append(z)
    return np.stack([t.numpy() for t in traj]), sched.sigmas.numpy()


@pytest.mark.parametrize("schedule", ["sd3", "diffusers_flow_sigmas"])
def test_matches_diffusers_dpmsolver_multistep(schedule):
    """"sd3": our schedule put into the scheduler (sigma_0 = 1, so step 1's lambda_prev = -inf
    and its correction vanishes); "diffusers_flow_sigmas": diffusers' own use_flow_sigmas
    schedule (sigma_0 = shift(0.999) < 1), where step 1 is second order in full."""
    a, b, x = linear_model(1)
    ref, sigmas = diffusers_sample(torch_velocity(a, b), torch.from_numpy(x),
                                   SIGMAS if schedule == "sd3" else None)
    if schedule == "diffusers_flow_sigmas":
        assert 0.999 < sigmas[0] < 1 and sigmas[-1] == 0 and len(sigmas) == 11
    assert_trajectories_close(jax_loop(jax_velocity(a, b), x, sigmas), ref)


@pytest.mark.parametrize("schedule", ["sd3", "diffusers_flow_sigmas"])
def test_straight_line_flow_returns_its_data_point(schedule):
    """v = eps - x0 for one fixed (x0, eps), started on the line at sigma_0 (x = eps where
    sigma_0 = 1): every x0_hat is x0 and every state stays on the line (1 - sigma) x0 + sigma eps,
    so the last one is x0."""
    sigmas = SIGMAS if schedule == "sd3" else diffusers_sample(lambda x, s: x, torch.zeros(SHAPE))[1]
    rng = np.random.default_rng(2)
    x0, eps = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    start = eps if schedule == "sd3" else (1 - sigmas[0]) * x0 + sigmas[0] * eps
    traj = jax_loop(lambda x, sigma: jnp.asarray(eps - x0), start, sigmas)
    for state, sigma in zip(traj, sigmas):
        np.testing.assert_allclose(state, (1 - sigma) * x0 + sigma * eps, atol=1e-5)
    np.testing.assert_allclose(traj[-1], x0, atol=1e-5)


def test_jit_scan_with_traced_step_index_matches_python_loop_and_has_finite_gradients():
    a, b, x = linear_model(3)
    velocity_fn = jax_velocity(a, b)
    sample = jax.jit(lambda x, sigmas: jax_scan(velocity_fn, x, sigmas))
    scanned = np.asarray(sample(x, SIGMAS))
    np.testing.assert_allclose(scanned, jax_loop(velocity_fn, x, SIGMAS), rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(scanned))
    # Steps 0 and 9 would take log(0) in the second-order formula, and step 1 sees sigma_prev = 1:
    # neither values nor gradients (also with respect to the sigmas) may pick up a NaN.
    loss = lambda x, sigmas: jnp.sum(jax_scan(velocity_fn, x, sigmas)[-1] ** 2)
    grad_x, grad_sigmas = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(SIGMAS))
    assert np.all(np.isfinite(grad_x)) and np.all(np.isfinite(grad_sigmas))
    assert np.any(grad_x != 0)
    # prev_x0 is ignored at step 0, even when it is not finite
    nan = jnp.full(SHAPE, jnp.nan)
    step0 = dpm2_step(x, velocity_fn(x, 1.0), nan, 1.0, 1.0, SIGMAS[1], step_index=jnp.int32(0), num_steps=10)
    assert np.all(np.isfinite(step0[0]))
