"""LoRA for the `nnx.Linear` layers of any NNX model, picked by regular expressions on paths.

`apply_lora` swaps each matching `nnx.Linear` for a `LoRALinear` that keeps the original
`kernel`/`bias` variables at their original paths (weight conversion tables and checkpoints of
the base model stay valid) and adds two `nnx.LoRAParam`s, `lora_a` (in, r) and `lora_b`
(r, out), so that `nnx.split(model, nnx.LoRAParam, ...)` separates what trains:

    y = x @ kernel + bias + (alpha / r) * (x @ lora_a) @ lora_b

Init as peft's `init_lora_weights="gaussian"` (what Flow-GRPO uses): lora_a ~ N(0, std=1/r),
lora_b = 0, so a fresh LoRA leaves the model's output unchanged.

The reference policy is the same model with the LoRA switched off: `disabled(lora_state)`
returns a LoRA state of zeros, and applying the model with it gives exactly the base output
(the delta is x @ a @ 0 = 0), with no second copy of the base weights.
"""
import re

import jax
import jax.numpy as jnp
from flax import nnx

class LoRALinear(nnx.Linear):
    """An `nnx.Linear` built from an existing one (same variables, same paths) plus LoRA."""

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        # Take over the base layer's variables and settings instead of re-initialising them.
        for name, value in vars(base).items():
            if not name.startswith("_"):
                setattr(self, name, value)
        in_axis, out_axis = _axis_names(base.kernel)
        a_init = nnx.initializers.normal(stddev=1.0 / rank)
        self.lora_a = nnx.LoRAParam(
            a_init(rngs.params(), (base.in_features, rank), param_dtype),
            out_sharding=(in_axis, None), eager_sharding=False,
        )
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((rank, base.out_features), param_dtype),
            out_sharding=(None, out_axis), eager_sharding=False,
        )
        self.lora_scale = alpha / rank

    def __call__(self, inputs, out_sharding=None):
        y = super().__call__(inputs, out_sharding=out_sharding)
        x, a, b = self.promote_dtype(
            (inputs, self.lora_a[...], self.lora_b[...]), dtype=self.dtype
        )
        return y + ((x @ a) @ b * self.lora_scale).astype(y.dtype)


def _axis_names(kernel):
    names = kernel.get_metadata().get("out_sharding") or (None, None)
    return names[0], names[1]


def _path_name(path) -> str:
    return ".".join(str(part) for part in path)


def _set_child(parent, key, child) -> None:
    if isinstance(key, int):
        parent[key] = child
    else:
        setattr(parent, key, child)


def _matching_linears(model: nnx.Module, targets) -> list:
    patterns = [re.compile(t) for t in targets]
    return [
        (path, module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, nnx.Linear) and not isinstance(module, LoRALinear)
        and any(p.search(_path_name(path)) for p in patterns)
    ]


def apply_lora(model: nnx.Module, *, rank: int, alpha: float, rngs: nnx.Rngs, targets,
               param_dtype=jnp.float32) -> list:
    """Adds LoRA in place to every matching `nnx.Linear`; returns the dotted paths changed.

    Raises if no layer matches: a typo in a target pattern must not silently train nothing.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    matches = _matching_linears(model, targets)
    if not matches:
        raise ValueError(f"no nnx.Linear path matches the LoRA targets {list(targets)}")
    for path, module in matches:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        _set_child(parent, path[-1], LoRALinear(
            module, rank=rank, alpha=alpha, rngs=rngs, param_dtype=param_dtype))
    return [_path_name(path) for path, _ in matches]


def disabled(lora_state):
    """The LoRA state with every delta switched off (zeros): the reference policy's LoRA."""
    return jax.tree.map(jnp.zeros_like, lora_state)
