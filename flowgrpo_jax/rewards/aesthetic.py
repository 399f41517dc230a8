"""LAION aesthetic score: the L2-normalised CLIP ViT-L/14 image embedding fed to the
"improved aesthetic predictor" MLP (768-1024-128-64-16-1, linear layers with no activation
between them; dropout is off at inference).

The MLP weights are the predictor's state dict (`sac+logos+ava1-l14-linearMSE.pth`, keys
layers.{0,2,4,6,7}.{weight,bias}), read from a local .pth, .safetensors or .npz file.
"""

import os
import pathlib
import re

import numpy as np

from flowgrpo_jax.rewards.clip_models import image_embeddings, load_clip, resolve_source
from flowgrpo_jax.rewards.registry import register

CLIP_MODEL = "openai/clip-vit-large-patch14"
MLP_ENV = "FLOWGRPO_AESTHETIC_MLP"


def load_mlp(path) -> list:
    """[(weight (out, in), bias (out,)), ...] in layer order, as float32 numpy arrays."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic MLP weights {path} do not exist")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        tensors = load_file(str(path))
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            tensors = dict(data)
    else:
        import torch
        tensors = {k: v.float().numpy() for k, v in
                   torch.load(path, map_location="cpu", weights_only=True).items()}
    indices = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"layers\.(\d+)\.weight$", k))})
    layers = [(np.asarray(tensors[f"layers.{i}.weight"], np.float32),
               np.asarray(tensors[f"layers.{i}.bias"], np.float32)) for i in indices]
    widths = [layers[0][0].shape[1]] + [w.shape[0] for w, _ in layers] if layers else []
    if widths != [768, 1024, 128, 64, 16, 1]:
        raise ValueError(f"{path} holds an MLP of widths {widths}, expected 768-1024-128-64-16-1")
    return layers


def apply_mlp(layers, x: np.ndarray) -> np.ndarray:
    for weight, bias in layers:
        x = x @ weight.T + bias
    return x


@register("aesthetic")
def aesthetic(mlp=None, model=None, processor=None, device=None):
    mlp_path = mlp or os.environ.get(MLP_ENV)
    if not mlp_path:
        raise FileNotFoundError(
            f"the aesthetic reward needs the predictor MLP weights: pass 'aesthetic.mlp=/path/to/"
            f"sac+logos+ava1-l14-linearMSE.pth' or set ${MLP_ENV}")
    layers = load_mlp(mlp_path)
    model_source = resolve_source(model, "FLOWGRPO_AESTHETIC_CLIP", CLIP_MODEL)
    clip, clip_processor, device = load_clip(model_source, processor or model_source,
                                             reward="aesthetic", env_var="FLOWGRPO_AESTHETIC_CLIP",
                                             device=device)
    if clip.config.projection_dim != layers[0][0].shape[1]:
        raise ValueError(f"the aesthetic MLP takes {layers[0][0].shape[1]}-d embeddings, CLIP "
                         f"{model_source!r} gives {clip.config.projection_dim}-d ones (use ViT-L/14)")

    def fn(images, prompts, metadata):
        embeds = image_embeddings(clip, clip_processor, images, device).cpu().numpy()
        return {"score": apply_mlp(layers, embeds)[:, 0]}

    return fn
