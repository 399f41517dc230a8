"""JPEG-size rewards: the size in kB of each image saved as JPEG at quality 95.

As in the reference implementation, incompressibility is the size and compressibility is
-size / 500 (the scale keeps typical 512px values near -0.1 .. -0.5).
"""

import io

import numpy as np
from PIL import Image

from flowgrpo_jax.rewards.registry import register


def jpeg_size_kb(images: np.ndarray, quality: int = 95) -> np.ndarray:
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return np.array(sizes)


@register("jpeg_incompressibility")
def jpeg_incompressibility():
    return lambda images, prompts, metadata: {"score": jpeg_size_kb(images)}


@register("jpeg_compressibility")
def jpeg_compressibility():
    return lambda images, prompts, metadata: {"score": -jpeg_size_kb(images) / 500}
