"""Rematerialisation policies: which activations of a block the backward pass keeps, and which
it recomputes from the block's input.

- "none": keep everything (fastest, most memory);
- "block": keep only each block's inputs, recompute the rest (least memory, one extra forward);
- "block_save_dots": keep each block's matmul outputs (the linear layers', not attention's
  batched ones), recompute norms, activations and attention between them.
"""
import jax

POLICIES = ("none", "block", "block_save_dots")
_CHECKPOINT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "block_save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"remat policy {policy!r}; expected one of {POLICIES}")
    return policy


def rematerialised(fn, policy: str):
    """`fn` as it runs under `policy`; a pure function of its array arguments."""
    if check_policy(policy) == "none":
        return fn
    return jax.checkpoint(fn, policy=_CHECKPOINT_POLICIES[policy])
