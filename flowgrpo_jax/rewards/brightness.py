"""Brightness: the mean pixel value in [0, 1]. A reward any image model can learn quickly,
used to check that training moves the reward (tests, tiny configs)."""
from flowgrpo_jax.rewards.registry import register


@register("brightness")
def brightness():
    return lambda images, prompts, metadata: {"score": images.reshape(len(images), -1).mean(1) / 255.0}
