"""Test-only rewards, loaded into real reward server processes with --plugin."""

import time

import numpy as np

from flowgrpo_jax.rewards.registry import register


@register("mean_pixel")
def mean_pixel():
    """Mean brightness in [0, 1], and the red channel's as a sub-score: easy to check per image.
    Also reports whether the server handed the reward a writable array."""
    def fn(images, prompts, metadata):
        writable = np.full(len(images), float(images.flags.writeable))
        images = images.astype(np.float64) / 255
        return {"score": images.mean(axis=(1, 2, 3)), "red": images[..., 0].mean(axis=(1, 2)),
                "writable": writable}
    return fn


@register("counted")
def counted(log, sleep="0"):
    """Appends 'start KEY' and, after sleeping, 'done KEY' to `log`; KEY is the first prompt.
    Counting 'done' lines tells how many times a batch was scored to the end."""
    def fn(images, prompts, metadata):
        with open(log, "a") as f:
            f.write(f"start {prompts[0]}\n")
        time.sleep(float(sleep))
        with open(log, "a") as f:
            f.write(f"done {prompts[0]}\n")
        return {"score": np.arange(len(images), dtype=np.float64) + float(prompts[0].split("-")[-1])}
    return fn


@register("failing")
def failing():
    def fn(images, prompts, metadata):
        if "fail" in prompts:
            raise ValueError("this batch asked to fail")
        return {"score": np.zeros(len(images))}
    return fn
