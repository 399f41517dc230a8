"""diffusers AutoencoderKL safetensors keys -> `flowgrpo_jax.models.vae.AutoencoderKL` paths.

Names match except: diffusers' one-element `downsamplers.0` / `upsamplers.0` /
`attentions.0` lists are single modules here, `to_out.0` is `to_out`, norm weights are
`scale` and conv / linear weights `kernel`. First matching rule wins.
"""
from flowgrpo_jax.convert.core import Rule, conv2d, identity, linear

RULES = (
    Rule(r"(.+)\.downsamplers\.0\.conv\.weight", r"\1.downsample.conv.kernel", conv2d),
    Rule(r"(.+)\.downsamplers\.0\.conv\.bias", r"\1.downsample.conv.bias", identity),
    Rule(r"(.+)\.upsamplers\.0\.conv\.weight", r"\1.upsample.conv.kernel", conv2d),
    Rule(r"(.+)\.upsamplers\.0\.conv\.bias", r"\1.upsample.conv.bias", identity),
    Rule(r"(.+)\.attentions\.0\.(to_q|to_k|to_v)\.weight", r"\1.attention.\2.kernel", linear),
    Rule(r"(.+)\.attentions\.0\.to_out\.0\.weight", r"\1.attention.to_out.kernel", linear),
    Rule(r"(.+)\.attentions\.0\.to_out\.0\.bias", r"\1.attention.to_out.bias", identity),
    Rule(r"(.+)\.attentions\.0\.group_norm\.weight", r"\1.attention.group_norm.scale", identity),
    Rule(r"(.+)\.attentions\.0\.(to_q|to_k|to_v|group_norm)\.bias", r"\1.attention.\2.bias",
         identity),
    Rule(r"(.+\.(?:norm1|norm2|conv_norm_out))\.weight", r"\1.scale", identity),
    # Every remaining weight belongs to a convolution.
    Rule(r"(.+)\.weight", r"\1.kernel", conv2d),
    Rule(r"(.+)\.bias", r"\1.bias", identity),
)
