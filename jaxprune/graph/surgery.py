"""Pytree surgery on the unit table: removing units (:func:`shrink`), silencing them (:func:`silence`) and
rebuilding the smaller model (:func:`rebuild`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.graph.model_graph import Graph
from jaxprune.graph.program import _path_str

Array = jax.Array
PyTree = Any


def shrink(g: Graph, keep: Mapping[str, Any]) -> list[Array]:
    """The variables' leaves with every unit not kept removed: ``keep: {layer: kept indices}`` (others untouched).

    Every leaf axis indexed by the removed units shrinks: kernels (their output and the consumers' input axes,
    through flattening, pooling and concatenation), biases, BatchNorm parameters and statistics."""
    removed = g.removed_units(keep)
    leaves = list(g.net.leaves)
    for leaf, axis, ids in g.slices:
        on = ~removed[ids]
        if on.all():
            continue
        leaves[leaf] = jnp.take(leaves[leaf], jnp.asarray(np.flatnonzero(on)), axis=axis)
    return leaves


def silence(g: Graph, keep: Mapping[str, Any]) -> list[Array]:
    """Same shapes, the units not kept silenced: their kernel columns and the chain's per-channel offsets and
    scales (bias; BatchNorm's scale and bias) zeroed, so their pre-activation is exactly 0, and the input rows of
    every layer reading them zeroed, so whatever the activation makes of 0 reaches no consumer (the network then
    computes what the shrunk one does). An empty ``keep`` for a layer silences all of it. Units normalised together
    with other channels (a LayerNorm or RMSNorm statistic, ``Graph.normed``) are refused: zeros still count in the
    statistic, so no masking equals their removal."""
    removed = g.removed_units(keep)
    _refuse_normed(g, removed)
    leaves = list(g.net.leaves)
    by_leaf: dict[int, list] = {}
    for leaf, axis, ids in g.slices:
        by_leaf.setdefault(leaf, []).append((axis, ids))
    targets = []
    for name in keep:
        l = g.layers[name]
        targets.append((l.kernel, l.out_axis))
        targets += [(leaf, axis) for leaf in l.zero for axis, _ in by_leaf.get(leaf, [])]
    # the consumers' input rows: a silenced unit still sends act(0) (sigmoid: 0.5; ReLU → BatchNorm: BN(0) ≠ 0)
    targets += [(l.kernel, l.in_axis) for l in g.layers.values() if l.in_axis in dict(by_leaf.get(l.kernel, []))]
    for leaf, axis in dict.fromkeys(targets):
        ids = dict(by_leaf[leaf])[axis]
        off = removed[ids]
        if not off.any():
            continue
        shape = [1] * len(np.shape(leaves[leaf]))
        shape[axis] = ids.size
        leaves[leaf] = jnp.where(jnp.asarray(~off).reshape(shape), leaves[leaf], jnp.zeros_like(leaves[leaf]))
    return leaves


def _refuse_normed(g: Graph, removed: np.ndarray) -> None:
    """A one-line error naming the norm when a removed unit is normalised together with other channels."""
    for c in np.unique(g.cls[removed]).tolist():
        if int(c) in g.normed:
            who = sorted({g._owner_name(int(u)) for u in np.flatnonzero(removed & (g.cls == c))})
            raise ValueError(f"keep: units of {who} are normalised together with other channels by {g.normed[c]!r} "
                             "(a statistic over the channel axis): masking them changes that statistic, removing "
                             "them defines the smaller model; use remove_units / remove_many")


def rebuild(g: Graph, leaves: Sequence[Array], widths: Mapping[str, int], x: Any) -> tuple[Any, PyTree]:
    """``(smaller model, its variables)`` for shrunk ``leaves`` whose layers now have ``widths`` units.

    Uses the model's ``with_widths`` hook, NNX's parameters-only shrinking, or linen integer width fields (see the
    module docstring); checks that the rebuilt model's variable shapes are the shrunk ones."""
    n = g.net
    tree = n.with_leaves(leaves)
    model = n.model
    if hasattr(model, "with_widths"):
        new_model = model.with_widths(dict(widths))
    elif n.kind == "nnx":
        return model, tree
    else:
        new_model = _rebuild_by_fields(g, model, widths, x)
    spec = jax.ShapeDtypeStruct(tuple(np.shape(x)), jnp.result_type(x) if not isinstance(
        x, jax.ShapeDtypeStruct) else x.dtype)
    try:
        shapes = jax.eval_shape(lambda: new_model.init(jax.random.PRNGKey(0), jnp.zeros(spec.shape, spec.dtype),
                                                       **dict(n.call_kwargs)))
    except Exception as e:
        raise ValueError(f"model: the rebuilt model ({type(new_model).__name__} with widths {dict(widths)}) does "
                         f"not initialise: {str(e).splitlines()[0]}") from e
    want = {p: tuple(np.shape(a)) for p, a in zip(n.paths, leaves)}
    got = {_path_str(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(shapes)
           if _path_str(p).split("/")[0] in {q.split("/")[0] for q in n.paths}}
    bad = {p: (got.get(p), s) for p, s in want.items() if got.get(p) != s}
    if bad:
        p, (g_, w_) = next(iter(bad.items()))
        raise ValueError(f"model: the rebuilt model's variable {p!r} has shape {g_}, the shrunk variables {w_}: its "
                         "with_widths hook (or width field) does not set the widths it was given")
    return new_model, tree


def _rebuild_by_fields(g: Graph, model, widths: Mapping[str, int], x) -> Any:
    fields = _discover_fields(g, model, x)
    updates: dict[str, Any] = {}
    for layer, w in widths.items():
        if layer not in fields:
            raise ValueError(
                f"model: cannot rebuild {type(model).__name__} with layer {layer!r} of width {w}: the model has no "
                "`with_widths(widths: dict[str, int]) -> Module` method and no integer (or tuple-of-integer) field "
                "that sets this layer's width. Contract for user models: give the model such a method, or a width "
                "field per layer (e.g. `hidden: Sequence[int]`); NNX models need neither (pass nnx.split's "
                "(graphdef, state))")
        field, idx, group = fields[layer]
        others = [m for m in group if m != layer]
        for m in others:
            if widths.get(m, g.layers[m].units) != w and m not in widths:
                raise ValueError(f"model: layer {layer!r} shares its width field {field!r} with {others}; shrink "
                                 "them to the same width together")
        cur = updates.get(field, getattr(model, field))
        if idx is None:
            updates[field] = int(w)
        else:
            seq = list(cur)
            seq[idx] = int(w)
            updates[field] = type(cur)(seq) if isinstance(cur, tuple) else seq
    return model.clone(**updates)


_FIELD_CACHE: dict = {}


def _discover_fields(g: Graph, model, x) -> dict:
    """``{layer: (field, index, layers sharing it)}`` found by perturbing each integer width field by one."""
    key = (model, tuple(np.shape(x)))
    try:
        if key in _FIELD_CACHE:
            return _FIELD_CACHE[key]
    except TypeError:
        key = None
    n = g.net
    spec = jnp.zeros(tuple(np.shape(x)), jnp.float32)
    kernel_paths = {name: n.paths[l.kernel] for name, l in g.layers.items()}

    def units(m) -> dict:
        try:
            shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), spec, **dict(n.call_kwargs)))
        except Exception:
            return {}
        flat = {_path_str(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(shapes)}
        return {name: flat.get(p, (None,))[g.layers[name].out_axis] if p in flat else None
                for name, p in kernel_paths.items()}

    base = {name: l.units for name, l in g.layers.items()}
    found: dict = {}
    for f in dataclasses.fields(model):
        if f.name in ("parent", "name"):
            continue
        v = getattr(model, f.name)
        cands = []
        if isinstance(v, int) and not isinstance(v, bool):
            cands.append((None, v + 1))
        elif isinstance(v, (tuple, list)) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            for i in range(len(v)):
                seq = list(v)
                seq[i] += 1
                cands.append((i, type(v)(seq)))
        for idx, new in cands:
            try:
                got = units(model.clone(**{f.name: new}))
            except Exception:
                continue
            changed = [name for name in base if got.get(name) is not None and got[name] == base[name] + 1]
            rest_same = all(got.get(name) in (base[name], base[name] + 1) for name in base)
            if changed and rest_same:
                for name in changed:
                    found.setdefault(name, (f.name, idx, tuple(changed)))
    if key is not None:
        _FIELD_CACHE[key] = found
    return found

