"""diffusers `FluxTransformer2DModel` state-dict keys -> `FluxTransformer` parameter paths.

Rules are tried in order; the first full match wins. The specific renames come first, then
the generic Linear rules: every other `.weight` in this model is a torch Linear.
"""
from flowgrpo_jax.convert.core import Rule, identity, linear

RULES = [
    Rule(r"(.+)\.to_out\.0\.weight", r"\1.to_out.kernel", linear),
    Rule(r"(.+)\.to_out\.0\.bias", r"\1.to_out.bias", identity),
    Rule(r"(.+)\.(ff|ff_context)\.net\.0\.proj\.weight", r"\1.\2.proj_in.kernel", linear),
    Rule(r"(.+)\.(ff|ff_context)\.net\.0\.proj\.bias", r"\1.\2.proj_in.bias", identity),
    Rule(r"(.+)\.(ff|ff_context)\.net\.2\.weight", r"\1.\2.proj_out.kernel", linear),
    Rule(r"(.+)\.(ff|ff_context)\.net\.2\.bias", r"\1.\2.proj_out.bias", identity),
    Rule(r"(.+\.norm_(?:q|k|added_q|added_k))\.weight", r"\1.scale", identity),
    Rule(r"(.+)\.weight", r"\1.kernel", linear),
    Rule(r"(.+)\.bias", r"\1.bias", identity),
]
