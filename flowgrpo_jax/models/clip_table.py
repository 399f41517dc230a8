"""transformers CLIPTextModel / CLIPTextModelWithProjection keys -> `models.clip_text` paths.

The `text_model.embeddings.` / `text_model.encoder.` / `text_model.` prefixes are dropped;
norm weights are `scale`, linear weights `kernel`, embedding tables `embedding`. CLIPTextModel's
keys come with `text_model.` (as FLUX.1-dev's checkpoint holds them) or without it (as
transformers 5 saves that class): the table reads both and writes the first.
"""
from flowgrpo_jax.convert.core import Rule, identity, linear


def _text_model(prefix: str) -> tuple:
    layer = prefix + r"encoder\.layers\.(\d+)"
    return (
        Rule(prefix + r"embeddings\.(token_embedding|position_embedding)\.weight",
             r"\1.embedding", identity),
        # A non-persistent buffer that older checkpoints still hold.
        Rule(prefix + r"embeddings\.position_ids", None),
        Rule(layer + r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight",
             r"layers.\1.self_attn.\2.kernel", linear),
        Rule(layer + r"\.mlp\.(fc1|fc2)\.weight", r"layers.\1.mlp.\2.kernel", linear),
        Rule(layer + r"\.(layer_norm1|layer_norm2)\.weight", r"layers.\1.\2.scale", identity),
        Rule(layer + r"\.(.+)\.bias", r"layers.\1.\2.bias", identity),
        Rule(prefix + r"final_layer_norm\.weight", "final_layer_norm.scale", identity),
        Rule(prefix + r"final_layer_norm\.bias", "final_layer_norm.bias", identity),
    )


RULES = (*_text_model(r"text_model\."),
         Rule(r"text_projection\.weight", "text_projection.kernel", linear),
         *_text_model(""))
