"""CLIP score: logit_scale * cos(text, image) of CLIP ViT-L/14, divided by 30 as in the
reference implementation."""

from flowgrpo_jax.rewards.clip_models import image_embeddings, load_clip, resolve_source, text_embeddings
from flowgrpo_jax.rewards.registry import register

MODEL = "openai/clip-vit-large-patch14"


@register("clipscore")
def clipscore(model=None, processor=None, device=None):
    model_source = resolve_source(model, "FLOWGRPO_CLIPSCORE_MODEL", MODEL)
    processor_source = processor or model_source
    clip, clip_processor, device = load_clip(model_source, processor_source, reward="clipscore",
                                             env_var="FLOWGRPO_CLIPSCORE_MODEL", device=device)
    logit_scale = clip.logit_scale.exp().item()

    def fn(images, prompts, metadata):
        image = image_embeddings(clip, clip_processor, images, device)
        text = text_embeddings(clip, clip_processor, prompts, device)
        return {"score": (logit_scale * (image * text).sum(-1) / 30).cpu().numpy()}

    return fn
