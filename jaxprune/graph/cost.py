"""What the program costs and what its parameters are: MACs of every product, parameter roles."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import masks
from jaxprune.graph.model_graph import Graph
from jaxprune.graph.ops import LINEAR, inner_jaxpr as _inner, kernel_view as _kernel_view
from jaxprune.graph.program import Eqn

Array = jax.Array
PyTree = Any


def param_roles(g: Graph) -> dict[str, str]:
    """``{Net.paths[i]: role}`` of every parameter, read from the program: ``"kernel"`` (an operand of a
    ``dot_general`` or convolution of an activation — dense, conv, ``DenseGeneral`` and attention projections, a
    tied ``kernel.T``, whatever its shape), ``"embedding"`` (a table ``gather``-ed by activation indices; wins over a
    tied readout's ``"kernel"``), ``"other"`` (biases of any shape, norms' scales, statistics, position embeddings,
    class tokens). A parameter passed into control flow or a custom call with activations, whose use cannot be read,
    is a ``"kernel"`` when it is a floating array of ``ndim >= 2`` (the ``ndim`` rule it replaces), else ``"other"``."""
    prog, leaves = g.program, g.net.leaves
    src = {vid: frozenset({i}) for i, vid in enumerate(prog.leaf_ids)}
    roles: dict[int, str] = {}
    for e in prog.eqns:
        act = [isinstance(a, int) and a in g.origins for a in e.ins]
        weights = [src.get(a, frozenset()) for a, f in zip(e.ins, act) if not f and isinstance(a, int)]
        if not any(act):
            for o in e.outs:
                src[o] = frozenset().union(*weights)
            continue
        if e.name in ("gather", "dynamic_slice") and not act[0]:
            role = "embedding"
        elif e.name in LINEAR:
            role = "kernel"
        elif _inner(e) is not None or "branches" in e.params or "body_jaxpr" in e.params:
            role = "opaque"
        else:
            continue
        for leaf in frozenset().union(*weights):
            if role == "opaque":
                x = leaves[leaf]
                role_here = "kernel" if len(x.shape) >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else "other"
                roles.setdefault(leaf, role_here)
            elif roles.get(leaf) != "embedding":
                roles[leaf] = role
    return {p: roles.get(i, "other") for i, p in enumerate(g.net.paths)}


# ----------------------------------------------------------------------------------------------- cost
def count_macs(g: Graph) -> dict[str, int]:
    """Multiply-accumulates per example of every ``dot_general`` and convolution of the program.

    A linear layer is keyed by its name (kernel size × output positions); every other product is keyed
    ``"<op> after <layer>"`` (numbered from ``#2`` when repeated): attention's activation × activation products
    (``q·kᵀ``, ``attn·v``), ``DenseGeneral``/einsum projections, grouped and depthwise convolutions (``out_elems ·
    kh·kw·cin/groups``). Products of weights alone (a kernel computed from parameters) count once per call.
    Operations whose inner programs hold products the count cannot read (control flow, custom calls) are listed by
    :func:`uncounted`, never dropped silently."""
    out = {}
    for name, l in g.layers.items():
        out[name] = int(l.positions) * int(np.prod(np.shape(g.net.leaves[l.kernel])))
    batch = int(g.program.shapes[g.program.x_id][0]) if g.program.shapes[g.program.x_id] else 1
    layer_eqns = {l.eqn for l in g.layers.values()}
    for k, e in enumerate(g.program.eqns):
        if e.name not in LINEAR or k in layer_eqns:
            continue
        macs = _eqn_macs(e, g.program.shapes)
        per_example = g.kinds[k] != "weight"
        key = _product_name(g, k, e) if per_example else f"{e.name} of weights"
        key = next(f"{key}#{i}" if i > 1 else key for i in range(1, len(out) + 2)
                   if (f"{key}#{i}" if i > 1 else key) not in out)
        out[key] = int(macs // max(batch, 1)) if per_example else int(macs)
    return out


def _product_name(g: Graph, k: int, e: Eqn) -> str:
    """The module path of a parameter operand (``"enc/attn/query"``), else ``"<op> after <layer>"``."""
    leaf_of = {vid: i for i, vid in enumerate(g.program.leaf_ids)}
    for a in e.ins:
        leaf, _ = _kernel_view(a, leaf_of, g.program)
        if leaf is not None:
            return g.net.module_path(leaf) or g.net.paths[leaf]
    return f"{e.name} after {g.near[k]}" if g.near[k] else f"{e.name} before the first layer"


def _eqn_macs(e: Eqn, shapes: dict) -> int:
    """MACs of one ``dot_general`` (``out_elems · contracted size``) or convolution (``out_elems · kernel size /
    output features``, i.e. ``kh·kw·cin/groups``)."""
    def shape(a):
        return tuple(np.shape(a[1])) if isinstance(a, tuple) else tuple(shapes[a])

    out = int(np.prod(e.shapes[0]))
    if e.name == "dot_general":
        (lc, _), _ = e.params["dimension_numbers"]
        lhs = shape(e.ins[0])
        return out * int(np.prod([lhs[i] for i in lc]))
    rhs = shape(e.ins[1])
    out_feature_axis = e.params["dimension_numbers"].rhs_spec[0]
    return out * int(np.prod(rhs)) // int(rhs[out_feature_axis])


def uncounted(g: Graph) -> tuple[str, ...]:
    """Operations whose inner programs contain products :func:`count_macs` does not count (``scan``, ``while``,
    ``cond``, custom calls around a matmul), each named with the layer before it; empty when every product counts."""
    found = []
    for k, e in enumerate(g.program.eqns):
        inner = [j for j in (_inner(e),) if j is not None] + [b.jaxpr for b in e.params.get("branches", ())]
        inner += [j.jaxpr for key in ("body_jaxpr", "cond_jaxpr") for j in [e.params.get(key)] if j is not None]
        if any(_has_product(j) for j in inner):
            where = f"after layer {g.near[k]!r}" if g.near[k] else "before the first layer"
            found.append(f"{e.name} {where}")
    return tuple(found)


def _has_product(jaxpr) -> bool:
    for e in jaxpr.eqns:
        if e.primitive.name in LINEAR:
            return True
        subs = [v for v in e.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr")]
        subs += [b for b in e.params.get("branches", ())]
        if any(_has_product(getattr(v, "jaxpr", v)) for v in subs):
            return True
    return False


def role_prunable(model: Any, variables: Any, x: Any = None, *,
                  embeddings: bool = False) -> Callable[[str, Array], bool]:
    """A ``predicate`` for :func:`jaxprune.masks.prunable_leaves` that chooses leaves by their role in the model's
    program (:func:`param_roles`), not their ``ndim``: the kernels of dense, conv and attention projections
    (``DenseGeneral``'s ``(features, heads, head_dim)`` too), and, with ``embeddings=True``, embedding tables. Biases
    of any shape (``DenseGeneral``'s ``(heads, head_dim)``), norms' scales, position embeddings and class tokens are
    never chosen (``prunable_leaves(biases=True)`` adds the biases of chosen kernels). ``model, variables``: a linen
    module and its variables, or NNX ``(graphdef, state)``; ``x``: an example input or its shape (default:
    inferred). Paths are those of the ``params`` tree (``"fc1/kernel"``)."""
    from jaxprune.graph.analyse import build
    from jaxprune.graph.inputs import example_input

    g = build(model, variables, example_input(model, variables, x))
    want = ("kernel", "embedding") if embeddings else ("kernel",)
    chosen = {"/".join(p.split("/")[g.net.prefix:]) for p, r in param_roles(g).items() if r in want}

    def predicate(path: str, leaf: Array) -> bool:
        return path in chosen and masks.default_prunable(path, leaf)

    return predicate
