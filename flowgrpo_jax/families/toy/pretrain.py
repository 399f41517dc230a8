"""Flow-matching pretraining of the toy model (MMDiT + toy text encoder) on rendered scenes.

Each step draws a batch of train prompts, renders a fresh scene that satisfies each one
(`scenes.ground_truth_images`), and regresses the rectified-flow velocity as SD3 does:
x_s = (1 - s) x0 + s eps, target v = eps - x0, the MMDiT's time input 1000*s
(`flow_matching_loss` says how s is drawn and how the error is weighted). The text is the
empty prompt with probability `cfg_dropout`, so the model also learns the unconditional
velocity that classifier-free guidance needs. AdamW at a constant rate after a linear warmup,
so a run of N steps equals the first N steps of a longer run with the same seed: the
snapshots written every `save_every` steps are the checkpoints of shorter runs. With
`ema_decay` > 0 the weights saved are an exponential moving average of the trained ones
(decay ramped as the trainer's EMA).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from flowgrpo_jax.families.toy.model import ToyModel, ToyModelConfig, save
from flowgrpo_jax.families.toy.scenes import ground_truth_images
from flowgrpo_jax.families.toy.text import Tokenizer
from flowgrpo_jax.update import ema_decay as ramped_ema_decay
from flowgrpo_jax.update import ema_update
from flowgrpo_jax.sampling.schedule import shift_sigmas


def to_latents(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC images -> float32 latents in [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


def flow_matching_loss(model: ToyModel, x0, ids, mask, key):
    """Error of the predicted velocity, weighted by s^2, at a time s = shift(u), u uniform.

    Times: shifting uniform times like the sampler's schedule spends training where sampling
    spends its steps, including s > 0.9, where the layout (counts, positions) of a sample is
    decided and which SD3's logit-normal times almost never draw. Weight: the model predicts
    x0 and v - v_hat = (x0_hat - x0) / s, so the plain velocity error would weight the nearly
    clean times (s -> MIN_SIGMA) up to 400 times the noisy ones and leave the layout
    untrained; the s^2-weighted error is the x0 error."""
    s_key, noise_key = jax.random.split(key)
    s = shift_sigmas(jax.random.uniform(s_key, (x0.shape[0],)), model.config.shift)
    noise = jax.random.normal(noise_key, x0.shape)
    s_b = s[:, None, None, None]
    x_s = (1 - s_b) * x0 + s_b * noise
    v = model.velocity(x_s, 1000.0 * s, ids, mask)
    return jnp.mean(jnp.square(s_b * (v.astype(jnp.float32) - (noise - x0))))


def make_train_step(graphdef, optimizer, ema_decay: float):
    @jax.jit
    def train_step(params, ema, opt_state, x0, ids, mask, key, step):
        loss, grads = jax.value_and_grad(
            lambda p: flow_matching_loss(nnx.merge(graphdef, p), x0, ids, mask, key))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = ema_update(ema, params, ramped_ema_decay(step, ema_decay))
        return params, ema, opt_state, loss

    return train_step


class Batches:
    """Seeded stream of (latents, prompts) from prompt metadata; each step renders new scenes."""

    def __init__(self, prompts: list[dict], batch_size: int, cfg_dropout: float, seed: int,
                 image_size: int):
        self.prompts, self.batch_size, self.cfg_dropout = prompts, batch_size, cfg_dropout
        self.image_size = image_size
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[np.ndarray, list[str]]:
        rows = [self.prompts[i] for i in self.rng.integers(len(self.prompts), size=self.batch_size)]
        images = ground_truth_images(rows, self.rng, self.image_size)
        dropped = self.rng.random(self.batch_size) < self.cfg_dropout
        texts = ["" if drop else row["prompt"] for drop, row in zip(dropped, rows)]
        return to_latents(images), texts


def pretrain(config: ToyModelConfig, prompts: list[dict], *, steps: int, batch_size: int,
             lr: float, warmup: int, weight_decay: float, cfg_dropout: float, seed: int,
             ema_decay: float = 0.0, save_every: int = 0, out: str | None = None,
             progress: bool = True):
    """Trains from a seeded init; returns (model, losses). Snapshots go to out/step_N."""
    model = ToyModel(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    # AdamW after clipping the gradient norm to 1, the rate rising linearly over `warmup` steps
    rate = optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else lr
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(rate, weight_decay=weight_decay))
    opt_state = optimizer.init(params)
    train_step = make_train_step(graphdef, optimizer, ema_decay)
    ema = params
    tokenizer = Tokenizer(max_length=config.max_length)
    batches = Batches(prompts, batch_size, cfg_dropout, seed, config.image_size)
    key = jax.random.key(seed)
    losses = []
    bar = tqdm(range(1, steps + 1), desc="pretrain", disable=not progress)
    for step in bar:
        x0, texts = batches.next()
        ids, mask = tokenizer.encode(texts)
        key, step_key = jax.random.split(key)
        params, ema, opt_state, loss = train_step(params, ema, opt_state, x0, ids, mask, step_key, step)
        losses.append(float(loss))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if out and save_every and step % save_every == 0:
            save(os.path.join(out, f"step_{step}"), nnx.merge(graphdef, ema))
    return nnx.merge(graphdef, ema), losses
