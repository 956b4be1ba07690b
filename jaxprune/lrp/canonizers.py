"""Canonizers: pure variable transforms that make a network LRP-friendly without changing its function.

:func:`fold_batchnorm` finds every BatchNorm that directly follows a linear layer from the model's graph
(:mod:`jaxprune.graph`: the inference form ``(z − mean) · scale / sqrt(var + ε) + bias`` in the layer's chain,
read from the traced program, not from names) and returns the **same model's** variables with the BatchNorm
folded into the layer and left in place as the identity plus an offset:

* kernel ``W → W · a`` with ``a = scale / sqrt(var + ε)`` per output unit (along the kernel's output axis);
* BatchNorm ``scale → 1``, ``mean → 0``, ``var → 1 − ε`` (so ``sqrt(var + ε) = 1`` exactly in float32/16),
  ``bias → (b − mean) · a + bias_bn`` (the folded offset, ``b`` the layer's own bias);
* the layer's own bias (a conv with a bias before BatchNorm) → 0.

So the original model (its ``apply``, its BatchNorm modules, its checkpoints' structure) computes the same
function on the folded variables, and every tool keeps working on them. Where the BatchNorm has no bias
(``use_bias=False``) the offset goes into the layer's bias, and where neither has one into ``mean`` (``−offset``).
LRP itself folds chains inside :func:`jaxprune.graph.run`, so this canonizer is for users who want folded
weights (inspection, export, other tools); the input variables are not modified. Applying it twice changes
nothing more.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import graph

__all__ = ["fold_batchnorm", "weight_env"]


def weight_env(g: graph.Graph, leaves: Sequence[jax.Array]) -> dict:
    """Values of the program's constants, ``leaves`` and every weight-only computation (e.g. BatchNorm's
    ``rsqrt(var + ε) · scale``): the environment :func:`jaxprune.graph.folded` reads a layer's chain from."""
    prog = g.program
    env: dict = dict(prog.consts)
    env.update(zip(prog.leaf_ids, leaves))
    for k, e in enumerate(prog.eqns):
        if g.kinds[k] == "weight":
            env.update(zip(e.outs, e.bind(*[a[1] if isinstance(a, tuple) else env[a] for a in e.ins])))
    return env


def fold_batchnorm(model: Any, variables: Any, x: Any) -> Any:
    """The variables of ``model`` with every BatchNorm that follows a linear layer folded into it (see the module
    docstring); the same structure as ``variables`` (a linen dict of collections, or an NNX ``State``).

    ``model``/``variables``: a linen module with ``{'params': …, 'batch_stats': …}`` or an NNX ``(graphdef,
    state)`` (an ``nnx.Module`` with ``variables=None``: its state is returned). ``x``: an example input (array
    or ``jax.ShapeDtypeStruct`` ``(n, …)``) the graph is traced for; the result does not depend on it.
    """
    from jaxprune.lrp.relevance import build_graph

    g = build_graph(model, variables, x)
    leaves = list(g.net.leaves)
    env = weight_env(g, leaves)
    for name, layer in g.layers.items():
        bn = layer.bn
        if bn is None:
            continue
        eps = float(bn["epsilon"])
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"model: BatchNorm after layer {name!r} has epsilon={eps}; folding leaves it as the "
                             "identity with var = 1 - epsilon, which needs 0 <= epsilon < 1")
        w, b = graph.folded(g, layer, env)
        kernel = leaves[layer.kernel]
        leaves[layer.kernel] = w.astype(jnp.result_type(kernel))

        def put(i: int | None, value) -> None:
            if i is not None:
                leaves[i] = jnp.broadcast_to(jnp.asarray(value, jnp.result_type(leaves[i])), np.shape(leaves[i]))

        put(bn["mean"], 0.0)
        put(bn["var"], 1.0 - eps)
        put(bn["scale"], 1.0)
        put(bn["layer_bias"], 0.0)
        if bn["bias"] is not None:
            put(bn["bias"], b)
        elif bn["layer_bias"] is not None:
            put(bn["layer_bias"], b)
        else:
            put(bn["mean"], -b)
    return g.net.with_leaves(leaves)
