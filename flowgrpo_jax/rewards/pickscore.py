"""PickScore: logit_scale * cos(text, image) of the PickScore_v1 CLIP-H, divided by 26 as in
the reference implementation (brings typical values near 0.8 .. 0.9)."""

from flowgrpo_jax.rewards.clip_models import image_embeddings, load_clip, resolve_source, text_embeddings
from flowgrpo_jax.rewards.registry import register

MODEL = "yuvalkirstain/PickScore_v1"
PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


@register("pickscore")
def pickscore(model=None, processor=None, device=None):
    model_source = resolve_source(model, "FLOWGRPO_PICKSCORE_MODEL", MODEL)
    # A local model folder usually carries its processor files too.
    processor_source = resolve_source(processor, "FLOWGRPO_PICKSCORE_PROCESSOR",
                                      PROCESSOR if model_source == MODEL else model_source)
    clip, clip_processor, device = load_clip(model_source, processor_source, reward="pickscore",
                                             env_var="FLOWGRPO_PICKSCORE_MODEL", device=device)
    logit_scale = clip.logit_scale.exp().item()

    def fn(images, prompts, metadata):
        image = image_embeddings(clip, clip_processor, images, device)
        text = text_embeddings(clip, clip_processor, prompts, device)
        return {"score": (logit_scale * (image * text).sum(-1) / 26).cpu().numpy()}

    return fn
