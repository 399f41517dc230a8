"""Times our jitted rollout and GRPO loss step against the same computation in PyTorch.

    python tools/bench.py --config tiny --repeats 20 --out bench_tiny.json     # CPU
    python tools/bench.py --config sd35m --attention cudnn --out bench_sd35m.json  # GPU

One run, one machine, one model config, the same weights and the same batch for both sides:
a diffusers `SD3Transformer2DModel` with random init is converted in memory to our MMDiT.

- rollout: 10 Flow-GRPO SDE steps with CFG (uncond and cond in one forward of batch 2B),
  recording every step's latents and log-probs. JAX: `sampling.rollout`, compiled ahead of
  time. PyTorch: diffusers' model under `torch.inference_mode()` and the same step formula
  (docs/design.md section 2) written in torch. Both get identical initial noise and per-step noise
  (the noise `rollout` draws from its key is drawn here once and handed to torch).
- loss step: one forward+backward of the GRPO loss on one stored transition of that rollout:
  the policy re-scores it with CFG, a frozen reference model (a second random-init model, so
  the KL term is not zero) gives the step means without gradient, loss = clipped surrogate +
  beta*KL, gradients for every trainable weight. JAX: `score_step` + `objectives.grpo.grpo_loss`
  under `jax.value_and_grad`; PyTorch: the same formulas and `loss.backward()`.

Each side is warmed up first; JAX's trace+compile time is reported apart; the figures are
medians of --repeats timed calls (JAX: block_until_ready; torch: cuda synchronize). On CPU,
torch gets as many threads as cores XLA uses (the process's CPU affinity) unless --threads
says otherwise. On a CPU shared with other processes, torch's OpenMP threads spin-wait and
collapse; run with OMP_WAIT_POLICY=PASSIVE, or pin both to one core with `taskset -c 0`, to
compare compute (docs/benchmarks.md). The JSON (--out) also holds how closely the two sides agree.

--config sd35m is the real SD3.5-Medium transformer (random weights, 512 px = 64x64 latents,
bf16, 77 CLIP + 128 T5 text tokens) and needs a GPU; without one it only checks the shapes of
both JAX computations with `jax.eval_shape` and exits with status 2.
"""
import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from functools import partial

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU with JAX

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import nnx

from flowgrpo_jax.convert.core import convert, target_shapes
from flowgrpo_jax.families.sd3.loading import SD35M_CONFIGS
from flowgrpo_jax import machine
from flowgrpo_jax.generator import nnx_velocity
from flowgrpo_jax.objectives.grpo import grpo_loss
from flowgrpo_jax.models.abstract import abstract_module
from flowgrpo_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from flowgrpo_jax.models.mmdit import TRAINABLE, MMDiT, MMDiTConfig
from flowgrpo_jax.models.mmdit_table import RULES
from flowgrpo_jax.remat import POLICIES as REMAT_POLICIES
from flowgrpo_jax.sampling.rollout import rollout, score_step
from flowgrpo_jax.sampling.schedule import flow_match_schedule

SD35M_CONFIG = os.path.join(SD35M_CONFIGS, "transformer.json")
NUM_STEPS = 10
NOISE_LEVEL = 0.7
GUIDANCE_SCALE = 4.5
CLIP_RANGE = 1e-4
KL_BETA = 0.04
LOSS_STEP = 1  # which stored transition the loss step re-scores (an interior step)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model: dict        # diffusers SD3Transformer2DModel config
    batch: int         # prompts per batch; the CFG forward runs 2*batch
    latent_size: int   # latent height = width
    text_len: int      # text tokens (CLIP 77 + T5 tokens for SD3)
    dtype: str         # parameter and compute dtype of both models
    needs_gpu: bool


def _sd35m_model() -> dict:
    with open(SD35M_CONFIG) as f:
        return json.load(f)


# SD3.5's block kinds (dual attention, qk RMS norm, a context_pre_only last block) at width 128.
TINY_MODEL = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=32,
                  num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=128,
                  pooled_projection_dim=128, out_channels=16, pos_embed_max_size=32,
                  dual_attention_layers=(0,), qk_norm="rms_norm")
CONFIGS = {
    "tiny": lambda: BenchConfig(TINY_MODEL, batch=4, latent_size=32, text_len=32, dtype="float32",
                                needs_gpu=False),
    # 512 px -> 64x64 latents; Flow-GRPO's prompts: 77 CLIP tokens + 128 T5 tokens.
    "sd35m": lambda: BenchConfig(_sd35m_model(), batch=4, latent_size=64, text_len=77 + 128,
                                 dtype="bfloat16", needs_gpu=True),
}
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------- inputs


def rollout_noise(key, num_steps: int, shape) -> jax.Array:
    """The per-step noise (num_steps, *shape) that `rollout(key=key)` draws without a window:
    the key is split into (window key, noise key) and the noise key into one key per step."""
    _, noise_key = jax.random.split(key)
    step_keys = jax.random.split(noise_key, num_steps)
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(step_keys)


def make_inputs(config: BenchConfig, seed: int = 0) -> dict:
    """The batch both sides use, float32 numpy (NHWC latents): initial noise, the rollout key,
    the per-step noise that key gives, text states/pooled for the prompts and for the negative
    prompt (batch 1), advantages."""
    rng = np.random.default_rng(seed)
    model = config.model
    shape = (config.batch, config.latent_size, config.latent_size, model["in_channels"])
    key = jax.random.key(seed)
    text = lambda batch: dict(
        states=rng.standard_normal((batch, config.text_len, model["joint_attention_dim"]), np.float32),
        pooled=rng.standard_normal((batch, model["pooled_projection_dim"]), np.float32))
    return dict(latents=rng.standard_normal(shape, np.float32), key=key,
                noise=np.asarray(rollout_noise(key, NUM_STEPS, shape)),
                text=text(config.batch), uncond=text(1),
                advantages=np.clip(rng.standard_normal(config.batch), -5, 5).astype(np.float32),
                old_logp_offset=(CLIP_RANGE * rng.uniform(-2, 2, config.batch)).astype(np.float32))


# ----------------------------------------------------------------------------- models


def build_torch_model(model_config: dict, seed: int, dtype: str, device):
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = SD3Transformer2DModel(**model_config)
    if dtype != "float32":  # (a cast diffusers warns about even when it is a no-op)
        model = model.to(getattr(torch, dtype))
    return model.eval()


def _to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def apply_mmdit(model, x, t, text):
    """The MMDiT's velocity; the rollout's params are (trainable, buffers), split by TRAINABLE."""
    return model(x, t, text["states"], text["pooled"])


def abstract_mmdit(model_config: dict, dtype: str, attention: str, remat: str) -> MMDiT:
    config = MMDiTConfig.from_diffusers(model_config, attention_impl=attention, remat=remat)
    return abstract_module(lambda rngs: MMDiT(config, rngs=rngs, dtype=JAX_DTYPES[dtype],
                                              param_dtype=JAX_DTYPES[dtype]))


def to_jax(torch_model, dtype: str, attention: str, remat: str):
    """Converts a diffusers model in memory; returns (graphdef, (trainable, buffers))."""
    model = abstract_mmdit(dict(torch_model.config), dtype, attention, remat)
    tensors = {k: _to_numpy(v) for k, v in torch_model.state_dict().items()}
    flat = convert(tensors, RULES, target_shapes(model))
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(flat[tuple(path)], JAX_DTYPES[dtype]))
    nnx.update(model, state)
    graphdef, trainable, buffers = nnx.split(model, TRAINABLE, ...)
    return graphdef, (trainable, buffers)


# ----------------------------------------------------------------------------- JAX side


def jax_text(inputs: dict, dtype: str):
    cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, JAX_DTYPES[dtype]), tree)
    return cast(inputs["text"]), cast(inputs["uncond"])


def make_jax_rollout(velocity_fn, sigmas):
    """(params, latents, text, uncond, key) -> Rollout: 10 SDE steps with CFG, jitted whole."""
    def run(params, latents, text, uncond, key):
        return rollout(velocity_fn, params, latents, text, sigmas, key=key, kind="sde",
                       noise_level=NOISE_LEVEL, guidance_scale=GUIDANCE_SCALE, uncond_text=uncond)
    return jax.jit(run)


def make_jax_loss_step(velocity_fn, sigma_max):
    """(trainable, buffers, ref_params, batch) -> ((loss, stats), grads wrt trainable).

    The reference model is a separate argument so XLA cannot merge its forward with the policy's."""
    def loss_fn(trainable, buffers, ref_params, batch):
        score = partial(score_step, velocity_fn, latents=batch["latents"], next_latents=batch["next_latents"],
                        sigma=batch["sigma"], sigma_next=batch["sigma_next"], text=batch["text"],
                        kind="sde", noise_level=NOISE_LEVEL, sigma_max=sigma_max,
                        guidance_scale=GUIDANCE_SCALE, uncond_text=batch["uncond"])
        policy = score((trainable, buffers))
        ref_mean = jax.lax.stop_gradient(score(ref_params).mean)
        return grpo_loss(policy.log_prob - batch["old_log_prob"], batch["advantages"], policy.mean,
                         ref_mean, policy.std, clip_range=CLIP_RANGE, beta=KL_BETA)
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def loss_batch(rollout_out, inputs: dict, text, uncond) -> dict:
    """One stored transition (step LOSS_STEP) of a rollout, as the loss step consumes it."""
    k = LOSS_STEP
    return dict(latents=rollout_out.latents[:, k], next_latents=rollout_out.next_latents[:, k],
                sigma=rollout_out.sigmas[:, k], sigma_next=rollout_out.next_sigmas[:, k],
                old_log_prob=rollout_out.log_probs[:, k] + inputs["old_logp_offset"],
                advantages=jnp.asarray(inputs["advantages"]), text=text, uncond=uncond)


def compile_timed(jitted, *args):
    """Ahead-of-time compile; returns (executable, trace seconds, compile seconds)."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile()
    return compiled, traced - start, time.perf_counter() - traced


# ----------------------------------------------------------------------------- torch side


def torch_guided_velocity(model, x, sigma, text, uncond, guidance_scale, dtype):
    """CFG velocity in float32 from one forward of batch 2B (uncond first), x NCHW float32."""
    import torch

    batch = x.shape[0]
    both = lambda u, c: torch.cat([u.expand(batch, *u.shape[1:]), c]).to(dtype)
    t = 1000.0 * sigma
    out = model(hidden_states=torch.cat([x, x]).to(dtype), timestep=torch.cat([t, t]),
                encoder_hidden_states=both(uncond["states"], text["states"]),
                pooled_projections=both(uncond["pooled"], text["pooled"]), return_dict=False)[0]
    v_uncond, v_cond = out.float().chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def torch_sde_step(v, x, sigma, sigma_next, sigma_max, noise_level, *, eps=None, prev_sample=None):
    """Flow-GRPO SDE step in float32 (docs/design.md section 2); sigma, sigma_next (B,).
    Returns (next_sample, log_prob (B,), mean, std_t (B,))."""
    import torch

    as_latent = lambda s: s.reshape(-1, 1, 1, 1)
    s, s_next = as_latent(sigma), as_latent(sigma_next)
    dt = s_next - s
    sigma_hat = torch.where(s == 1, sigma_max, s)
    std = noise_level * torch.sqrt(s / (1 - sigma_hat))
    mean = x + (v + std**2 / (2 * s) * (x + (1 - s) * v)) * dt
    noise_std = std * torch.sqrt(-dt)
    next_sample = mean + noise_std * eps if prev_sample is None else prev_sample.detach()
    log_prob = (-((next_sample - mean) ** 2) / (2 * noise_std**2) - torch.log(noise_std)
                - torch.log(torch.sqrt(torch.tensor(2 * np.pi, dtype=torch.float32, device=x.device))))
    return next_sample, log_prob.mean(dim=(1, 2, 3)), mean, std.reshape(-1)


def torch_rollout(model, latents, text, uncond, sigmas, noise, dtype):
    """The same rollout in torch: latents (B, C, H, W), noise (T, B, C, H, W), all float32.
    Returns (latents (B, T, ...), next latents (B, T, ...), log-probs (B, T), final latents)."""
    import torch

    with torch.inference_mode():
        x, batch = latents, latents.shape[0]
        records = []
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i].expand(batch), sigmas[i + 1].expand(batch)
            v = torch_guided_velocity(model, x, sigma, text, uncond, GUIDANCE_SCALE, dtype)
            next_x, log_prob, _, _ = torch_sde_step(v, x, sigma, sigma_next, sigmas[1], NOISE_LEVEL, eps=noise[i])
            records.append((x, next_x, log_prob))
            x = next_x
        step_latents, next_latents, log_probs = (torch.stack(r, dim=1) for r in zip(*records))
    return step_latents, next_latents, log_probs, x


def torch_loss_step(model, ref_model, batch, sigma_max, dtype):
    """One forward+backward of the GRPO loss; leaves the gradients in model's .grad.
    Returns (loss, policy_loss, kl) as detached tensors."""
    import torch

    model.zero_grad(set_to_none=True)
    args = (batch["text"], batch["uncond"], GUIDANCE_SCALE, dtype)
    v = torch_guided_velocity(model, batch["latents"], batch["sigma"], *args)
    _, log_prob, mean, std = torch_sde_step(v, batch["latents"], batch["sigma"], batch["sigma_next"],
                                            sigma_max, NOISE_LEVEL, prev_sample=batch["next_latents"])
    with torch.no_grad():
        v_ref = torch_guided_velocity(ref_model, batch["latents"], batch["sigma"], *args)
        _, _, ref_mean, _ = torch_sde_step(v_ref, batch["latents"], batch["sigma"], batch["sigma_next"],
                                           sigma_max, NOISE_LEVEL, prev_sample=batch["next_latents"])
    ratio = torch.exp(log_prob - batch["old_log_prob"])
    advantages = batch["advantages"]
    policy_loss = torch.mean(torch.maximum(-advantages * ratio,
                                           -advantages * torch.clamp(ratio, 1 - CLIP_RANGE, 1 + CLIP_RANGE)))
    kl = torch.mean(((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std**2))
    loss = policy_loss + KL_BETA * kl
    loss.backward()
    return loss.detach(), policy_loss.detach(), kl.detach()


def torch_grad_norm(model) -> float:
    return float(sum(p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None) ** 0.5)


def to_torch(tree, device):
    """NHWC float32 arrays (numpy or jax) -> NCHW torch tensors; other ranks as they are."""
    import torch

    def one(a):
        t = torch.from_numpy(np.array(a, np.float32)).to(device)
        return t.movedim(-1, -3) if t.ndim >= 4 else t
    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------- timing


def timed_calls(fn, repeats: int, warmup: int, sync=lambda: None) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _relative_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _versions() -> dict:
    import diffusers
    import flax
    import jaxlib
    import torch

    return dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                flax=flax.__version__, numpy=np.__version__, torch=torch.__version__,
                diffusers=diffusers.__version__)


def run_bench(config: BenchConfig, *, repeats: int, warmup: int, attention: str, remat: str,
              threads: int, seed: int = 0) -> tuple[dict, dict]:
    """Builds both sides from the same weights and batch and times them; returns (the result
    for the JSON, the raw outputs of both sides: final latents, log-probs, loss-step scalars)."""
    import torch

    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch_dtype = getattr(torch, config.dtype)
    inputs = make_inputs(config, seed)
    sigmas = flow_match_schedule(NUM_STEPS)[0]

    policy_torch = build_torch_model(config.model, seed, config.dtype, device)
    ref_torch = build_torch_model(config.model, seed + 1, config.dtype, device).requires_grad_(False)
    if remat != "none":  # torch's checkpointing is per block, what "block" does
        policy_torch.enable_gradient_checkpointing()
    graphdef, params = to_jax(policy_torch, config.dtype, attention, remat)
    _, ref_params = to_jax(ref_torch, config.dtype, attention, remat)
    velocity_fn = nnx_velocity(graphdef, apply_mmdit)

    # (a) rollouts
    text, uncond = jax_text(inputs, config.dtype)
    latents = jnp.asarray(inputs["latents"])
    rollout_args = (params, latents, text, uncond, inputs["key"])
    jax_rollout, trace_rollout, compile_rollout = compile_timed(
        make_jax_rollout(velocity_fn, sigmas), *rollout_args)
    jax_out = jax_rollout(*rollout_args)
    jax_rollout_times = timed_calls(lambda: jax.block_until_ready(jax_rollout(*rollout_args)), repeats, warmup)

    torch_sigmas = torch.from_numpy(sigmas).to(device)
    torch_inputs = to_torch(dict(latents=inputs["latents"], noise=inputs["noise"], text=inputs["text"],
                                 uncond=inputs["uncond"]), device)
    torch_args = (policy_torch, torch_inputs["latents"], torch_inputs["text"], torch_inputs["uncond"],
                  torch_sigmas, torch_inputs["noise"], torch_dtype)
    torch_out = torch_rollout(*torch_args)
    torch_rollout_times = timed_calls(lambda: torch_rollout(*torch_args), repeats, warmup, sync)

    # (c) loss steps on the same stored transition of our rollout
    batch = loss_batch(jax_out, inputs, text, uncond)
    loss_args = (params[0], params[1], ref_params, batch)
    jax_loss_step, trace_loss, compile_loss = compile_timed(
        make_jax_loss_step(velocity_fn, sigmas[1]), *loss_args)
    (jax_loss, jax_stats), jax_grads = jax_loss_step(*loss_args)
    jax_loss_times = timed_calls(lambda: jax.block_until_ready(jax_loss_step(*loss_args)), repeats, warmup)

    torch_batch = to_torch({k: v for k, v in batch.items() if k not in ("text", "uncond")}, device)
    torch_batch.update(text=torch_inputs["text"], uncond=torch_inputs["uncond"])
    torch_sigma_max = torch_sigmas[1]
    torch_loss, torch_policy_loss, torch_kl = torch_loss_step(policy_torch, ref_torch, torch_batch,
                                                              torch_sigma_max, torch_dtype)
    torch_grad = torch_grad_norm(policy_torch)
    torch_loss_times = timed_calls(
        lambda: torch_loss_step(policy_torch, ref_torch, torch_batch, torch_sigma_max, torch_dtype),
        repeats, warmup, sync)

    times = {"jax_rollout": jax_rollout_times, "torch_rollout": torch_rollout_times,
             "jax_loss_step": jax_loss_times, "torch_loss_step": torch_loss_times}
    median = {name: statistics.median(t) for name, t in times.items()}
    nchw_to_nhwc = lambda t: t.float().movedim(-3, -1).cpu().numpy()
    outputs = dict(
        jax_final_latents=np.asarray(jax_out.final_latents), torch_final_latents=nchw_to_nhwc(torch_out[3]),
        jax_log_probs=np.asarray(jax_out.log_probs), torch_log_probs=torch_out[2].float().cpu().numpy(),
        jax_loss=float(jax_loss), torch_loss=float(torch_loss),
        jax_policy_loss=float(jax_stats["policy_loss"]), torch_policy_loss=float(torch_policy_loss),
        jax_kl=float(jax_stats["kl"]), torch_kl=float(torch_kl),
        jax_grad_norm=float(optax.tree.norm(jax_grads)), torch_grad_norm=torch_grad)
    result = dict(
        config=dict(dataclasses.asdict(config), num_steps=NUM_STEPS, noise_level=NOISE_LEVEL,
                    guidance_scale=GUIDANCE_SCALE, clip_range=CLIP_RANGE, kl_beta=KL_BETA,
                    loss_step_index=LOSS_STEP, attention=attention, remat=remat, seed=seed),
        device=dict(jax=str(jax.devices()[0].device_kind), jax_backend=jax.default_backend(),
                    torch=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    cpu=machine.cpu_model(), cpu_count=machine.cpu_count()),
        versions=_versions(), torch_threads=torch.get_num_threads(),
        xla_flags=os.environ.get("XLA_FLAGS", ""), repeats=repeats, warmup=warmup,
        times_s=times, median_s=median,
        jax_compile_s=dict(rollout=dict(trace=trace_rollout, compile=compile_rollout),
                           loss_step=dict(trace=trace_loss, compile=compile_loss)),
        ratio_torch_over_jax=dict(rollout=median["torch_rollout"] / median["jax_rollout"],
                                  loss_step=median["torch_loss_step"] / median["jax_loss_step"]),
        agreement=agreement(outputs))
    return result, outputs


def agreement(outputs: dict) -> dict:
    """How closely the two sides agree: relative L2 of the final latents, the largest log-prob
    difference, and each scalar of the loss step side by side."""
    pair = lambda name: dict(jax=outputs[f"jax_{name}"], torch=outputs[f"torch_{name}"])
    return dict(final_latents_rel_l2=_relative_l2(outputs["jax_final_latents"], outputs["torch_final_latents"]),
                log_probs_max_abs_diff=float(np.max(np.abs(outputs["jax_log_probs"] - outputs["torch_log_probs"]))),
                **{name: pair(name) for name in ("loss", "policy_loss", "kl", "grad_norm")})


def check_shapes(config: BenchConfig, attention: str, remat: str) -> dict:
    """`jax.eval_shape` of the rollout and the loss step at full size: no weights, no compute."""
    model = abstract_mmdit(config.model, config.dtype, attention, remat)
    graphdef, trainable, buffers = nnx.split(model, TRAINABLE, ...)
    velocity_fn = nnx_velocity(graphdef, apply_mmdit)
    sigmas = flow_match_schedule(NUM_STEPS)[0]
    spec = lambda a, dtype=None: jax.ShapeDtypeStruct(np.shape(a), dtype or np.asarray(a).dtype)
    inputs = make_inputs(dataclasses.replace(config, batch=1), 0)
    batch, latent = config.batch, (config.latent_size, config.latent_size, config.model["in_channels"])
    text = {k: jax.ShapeDtypeStruct((batch, *v.shape[1:]), JAX_DTYPES[config.dtype])
            for k, v in inputs["text"].items()}
    uncond = {k: spec(v, JAX_DTYPES[config.dtype]) for k, v in inputs["uncond"].items()}
    latents = jax.ShapeDtypeStruct((batch, *latent), jnp.float32)
    out = jax.eval_shape(make_jax_rollout(velocity_fn, sigmas), (trainable, buffers), latents, text,
                         uncond, inputs["key"])
    step = jax.ShapeDtypeStruct((batch, *latent), jnp.float32)
    per_sample = jax.ShapeDtypeStruct((batch,), jnp.float32)
    loss_batch_spec = dict(latents=step, next_latents=step, sigma=per_sample, sigma_next=per_sample,
                           old_log_prob=per_sample, advantages=per_sample, text=text, uncond=uncond)
    (loss, _), grads = jax.eval_shape(make_jax_loss_step(velocity_fn, sigmas[1]), trainable, buffers,
                                      (trainable, buffers), loss_batch_spec)
    return dict(parameters=sum(int(np.prod(v.shape)) for v in jax.tree.leaves(trainable)),
                rollout_latents=out.latents.shape, final_latents=out.final_latents.shape,
                loss=loss.shape, gradient_leaves=len(jax.tree.leaves(grads)))


def format_table(result: dict) -> str:
    m, r, c = result["median_s"], result["ratio_torch_over_jax"], result["jax_compile_s"]
    agree = result["agreement"]
    lines = [
        f"{'':<26}{'jax (s)':>10}{'torch (s)':>11}{'torch/jax':>11}",
        f"{f'rollout ({NUM_STEPS} SDE steps, CFG)':<26}{m['jax_rollout']:>10.4f}{m['torch_rollout']:>11.4f}"
        f"{r['rollout']:>10.2f}x",
        f"{'loss step (fwd+bwd)':<26}{m['jax_loss_step']:>10.4f}{m['torch_loss_step']:>11.4f}"
        f"{r['loss_step']:>10.2f}x",
        f"medians of {result['repeats']} after {result['warmup']} warm-up calls; jax trace+compile: "
        f"rollout {c['rollout']['trace']:.1f}+{c['rollout']['compile']:.1f} s, loss step "
        f"{c['loss_step']['trace']:.1f}+{c['loss_step']['compile']:.1f} s",
        f"device: jax {result['device']['jax']}, torch {result['device']['torch']} "
        f"(torch threads: {result['torch_threads']}; CPUs XLA uses: {result['device']['cpu_count']})"
        if result["device"]["torch"] == "cpu" else
        f"device: jax {result['device']['jax']}, torch {result['device']['torch']}",
        f"agreement: final latents rel L2 {agree['final_latents_rel_l2']:.1e}, log-prob max diff "
        f"{agree['log_probs_max_abs_diff']:.1e}, loss jax {agree['loss']['jax']:.6g} torch "
        f"{agree['loss']['torch']:.6g}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--attention", choices=ATTENTION_IMPLEMENTATIONS, default="auto",
                        help="our attention implementation (models/attention.py; cudnn: GPU only)")
    parser.add_argument("--remat", choices=REMAT_POLICIES, default="none",
                        help="per-block remat policy of the backward pass (torch: gradient "
                             "checkpointing unless none)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the CPU count XLA uses)")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    config = CONFIGS[args.config]()
    on_gpu = jax.default_backend() == "gpu"
    if args.attention == "cudnn" and not on_gpu:
        parser.error(f"--attention cudnn needs a GPU; JAX runs on {jax.default_backend()}")
    if args.attention == "splash" and jax.default_backend() != "tpu":
        parser.error(f"--attention splash times the TPU kernel; JAX runs on {jax.default_backend()}")
    if config.needs_gpu and not on_gpu:
        shapes = check_shapes(config, args.attention, args.remat)
        print(f"--config {args.config} needs a GPU (JAX backend is {jax.default_backend()}): nothing "
              f"timed. Shapes checked with jax.eval_shape: {shapes}", file=sys.stderr)
        return 2

    threads = args.threads or machine.cpu_count()
    result, _ = run_bench(config, repeats=args.repeats, warmup=args.warmup, attention=args.attention,
                          remat=args.remat, threads=threads)
    result["command"] = " ".join(["python tools/bench.py", *(argv if argv is not None else sys.argv[1:])])
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
