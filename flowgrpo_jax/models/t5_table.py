"""transformers T5EncoderModel keys -> `models.t5.T5EncoderModel` paths.

`encoder.embed_tokens.weight` is a tied copy of `shared.weight`: used only when saved alone.
"""
from flowgrpo_jax.convert.core import Rule, identity, linear

_BLOCK = r"encoder\.block\.(\d+)\.layer"

RULES = (
    Rule(r"shared\.weight", "shared.embedding", identity),
    Rule(r"encoder\.embed_tokens\.weight", "shared.embedding", identity, fallback=True),
    Rule(r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
         "relative_attention_bias.embedding", identity),
    Rule(_BLOCK + r"\.0\.SelfAttention\.(q|k|v|o)\.weight", r"blocks.\1.attention.\2.kernel", linear),
    Rule(_BLOCK + r"\.0\.layer_norm\.weight", r"blocks.\1.attention_norm.scale", identity),
    Rule(_BLOCK + r"\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight", r"blocks.\1.ff.\2.kernel",
         linear),
    Rule(_BLOCK + r"\.1\.layer_norm\.weight", r"blocks.\1.ff_norm.scale", identity),
    Rule(r"encoder\.final_layer_norm\.weight", "final_layer_norm.scale", identity),
)
