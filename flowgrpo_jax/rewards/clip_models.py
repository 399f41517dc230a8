"""Loading a transformers CLIP on the reward host and embedding images and prompts with it.

Shared by the pickscore, clipscore and aesthetic rewards. Models come from a local folder or
the Hugging Face cache only (never downloaded here): a missing model raises an error naming
the option and the environment variable that point to it.
"""

import os

import numpy as np


def resolve_source(option: str | None, env_var: str, default: str) -> str:
    """The model to load: the reward option, else the environment variable, else the Hub id."""
    return option or os.environ.get(env_var) or default


def load_clip(model_source: str, processor_source: str, *, reward: str, env_var: str, device=None):
    """Returns (model, processor, device) loaded from a folder or the local HF cache."""
    try:
        import torch
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as e:
        raise ImportError(f"the {reward} reward needs PyTorch and transformers on the reward host") from e
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = {}
    for what, source, cls in (("model", model_source, CLIPModel),
                              ("processor", processor_source, CLIPProcessor)):
        try:
            loaded[what] = cls.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"the {reward} reward could not load its CLIP {what} from {source!r}: it is neither "
                f"a local folder nor in the Hugging Face cache ({e.__class__.__name__}). Point the "
                f"option '{reward}.{what}=/path/to/folder' or ${env_var} at a saved copy, or fill "
                f"the cache on a machine with Hub access.") from e
    model = loaded["model"].eval().to(device)
    return model, loaded["processor"], device


def image_embeddings(model, processor, images: np.ndarray, device):
    """L2-normalised projected CLIP image embeddings, a (N, D) float32 torch tensor."""
    import torch

    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"].to(device)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        embeds = model.visual_projection(pooled).float()
    return embeds / embeds.norm(dim=-1, keepdim=True)


def text_embeddings(model, processor, prompts, device):
    """L2-normalised projected CLIP text embeddings, (N, D) float32; prompts cut at 77 tokens."""
    import torch

    tokens = processor(text=list(prompts), padding=True, truncation=True, max_length=77,
                       return_tensors="pt")
    with torch.no_grad():
        pooled = model.text_model(input_ids=tokens["input_ids"].to(device),
                                  attention_mask=tokens["attention_mask"].to(device)).pooler_output
        embeds = model.text_projection(pooled).float()
    return embeds / embeds.norm(dim=-1, keepdim=True)
