"""transformers CLIPTextModelWithProjection keys -> `models.clip_text` paths.

The `text_model.embeddings.` / `text_model.encoder.` / `text_model.` prefixes are dropped;
norm weights are `scale`, linear weights `kernel`, embedding tables `embedding`.
"""
from flowgrpo_jax.convert.core import Rule, identity, linear

_LAYER = r"text_model\.encoder\.layers\.(\d+)"

RULES = (
    Rule(r"text_model\.embeddings\.(token_embedding|position_embedding)\.weight",
         r"\1.embedding", identity),
    # A non-persistent buffer that older checkpoints still hold.
    Rule(r"text_model\.embeddings\.position_ids", None),
    Rule(_LAYER + r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight",
         r"layers.\1.self_attn.\2.kernel", linear),
    Rule(_LAYER + r"\.mlp\.(fc1|fc2)\.weight", r"layers.\1.mlp.\2.kernel", linear),
    Rule(_LAYER + r"\.(layer_norm1|layer_norm2)\.weight", r"layers.\1.\2.scale", identity),
    Rule(_LAYER + r"\.(.+)\.bias", r"layers.\1.\2.bias", identity),
    Rule(r"text_model\.final_layer_norm\.weight", "final_layer_norm.scale", identity),
    Rule(r"text_model\.final_layer_norm\.bias", "final_layer_norm.bias", identity),
    Rule(r"text_projection\.weight", "text_projection.kernel", linear),
)
