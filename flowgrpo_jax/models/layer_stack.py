"""A list of layers run as `lax.scan`s, so the compiler sees each kind of layer once instead
of once per layer.

Each run of consecutive layers with the same structure (the same graph, shapes and dtypes:
SD3.5's dual-attention blocks, its plain blocks, the last context_pre_only block alone) is one
scan over the layer index, with one traced layer applied to each layer's parameters in turn.
The parameters stay where they are, one module per layer at the paths the conversion tables,
LoRA files and checkpoints name, with the layers' shardings. Per iteration:
- the weights (every variable but LoRA factors) are selected from the run's layers
  (`lax.switch`): only the running layer's are copied, where stacking them on a layer axis at
  the call would copy them all, a whole replicated transformer per chip (docs/benchmarks.md);
- the LoRA factors, small and trained, are stacked on a layer axis and scanned over, so their
  gradients come back as one stack.
Gradients reach each layer's own parameters.
"""
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flowgrpo_jax import remat


def _signature(layer: nnx.Module):
    graphdef, state = nnx.split(layer)
    return graphdef, jax.tree.structure(state), tuple(
        (x.shape, x.dtype) for x in jax.tree.leaves(state))


def runs(layers: Sequence[nnx.Module]) -> list[list[int]]:
    """The indices of `layers` grouped into runs of consecutive layers of one structure."""
    groups, last = [], None
    for i, layer in enumerate(layers):
        signature = _signature(layer)
        if groups and signature == last:
            groups[-1].append(i)
        else:
            groups.append([i])
        last = signature
    return groups


def _select(index, states):
    """states[index] for a traced index: one layer's parameters, copied out of the run's."""
    return jax.lax.switch(index, [lambda states, k=k: states[k] for k in range(len(states))],
                          states)


def apply_layers(layers: Sequence[nnx.Module], carry, step: Callable, *, scan: bool = True,
                 policy: str = "none"):
    """Applies `step(layer, carry) -> (carry, output)` to every layer in order, each layer under
    the remat `policy` (flowgrpo_jax/remat.py); returns the last carry and the list of outputs.

    scan=False runs the layers one after another (one traced copy each); scan=True scans each
    run of same-structure layers. Both compute the same thing in the same order.
    """
    outputs = []
    for group in runs(layers) if scan else [[i] for i in range(len(layers))]:
        graphdef = nnx.graphdef(layers[group[0]])
        if len(group) == 1:
            run = remat.rematerialised(lambda c, s: step(nnx.merge(graphdef, s), c), policy)
            carry, output = run(carry, nnx.state(layers[group[0]]))
            outputs.append(output)
            continue
        factors = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[nnx.state(layers[i], nnx.LoRAParam) for i in group])
        weights = [nnx.state(layers[i], nnx.Not(nnx.LoRAParam)) for i in group]

        # The selection sits inside the remat: the backward pass selects again instead of
        # keeping each layer's weights as a residual of the scan.
        def layer(c, xs, weights):
            index, factors = xs
            return step(nnx.merge(graphdef, _select(index, weights), factors), c)

        run = remat.rematerialised(layer, policy)
        carry, stacked_outputs = jax.lax.scan(lambda c, xs: run(c, xs, weights), carry,
                                              (jnp.arange(len(group)), factors))
        outputs += [jax.tree.map(lambda x, i=i: x[i], stacked_outputs) for i in range(len(group))]
    return carry, outputs
