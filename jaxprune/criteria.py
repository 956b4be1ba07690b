"""Data-driven unit (neuron / filter) importance for structured pruning (Yeom et al. 2021, "Pruning by explaining"),
on any Flax model (linen, or NNX through ``nnx.split``), read from its graph (:mod:`jaxprune.graph`).

Every criterion returns ``dict[layer name -> (n_units,) float32]`` for the model's non-output linear layers (named
by module path, e.g. ``"fc1"``, ``"block1/conv_a"``; :func:`jaxprune.lrp.non_output_layers`), in forward order;
higher means more important (kept). These plug into ``jaxprune.structured.select_by_scores`` per layer, or into
:func:`global_keep` for one ranking across layers.

* ``weight``: L1 norm of a unit's incoming weights (Li et al. 2017), read from the layer's kernel leaf along its
  output axis (the raw kernel, BatchNorm not folded in); normalised by the layer's L1 norm.
* ``grad``: ``|mean ∂L/∂z|`` over samples (and positions) at the pre-activation ``z`` (Sun et al. 2017); layer L2.
* ``taylor``: ``|mean z · ∂L/∂z|`` (Molchanov et al. 2017); layer L2.
* ``lrp``: relevance summed over samples (and positions) at the unit's output; layer L1.

Attention heads (layers of kind ``"heads"``: the ``q``/``k``/``v`` projections ``(d, heads, head_dim)``,
:mod:`jaxprune.graph.attention`) are scored per head: ``weight`` sums the head's kernel slice, ``grad``/``taylor``
average over samples, tokens and the head's ``head_dim`` channels of ``z: (n, tokens, heads, head_dim)``. A head
whose output-projection rows are zero gets ``grad`` and ``taylor`` exactly 0 on its q, k and v. Coupled layers
(q/k/v heads, a gated MLP's two layers) are scored separately; :func:`jaxprune.structured.keep_coupled` carries one
layer's kept units to the others.

``L`` is the per-sample cross-entropy at the given labels; LRP explains the label's logit. ``z`` is the layer's
pre-activation as the graph defines it: the output of its chain (bias, BatchNorm), the input to the activation.
The gradients are taken with zero probes added there while the model's own program runs
(:func:`jaxprune.graph.run`), so ``grad``/``taylor`` take integer token ids ``(n, tokens)`` as well as float
batches (ids outside ``[0, vocabulary)`` of the model's embedding tables are refused); ``lrp`` needs a float batch.

``weight`` needs no data, but the graph (which layers exist, which is the output) is traced for an input shape:
pass ``x`` (an array, a ``jax.ShapeDtypeStruct`` or a shape tuple); without it the shape is inferred from the
kernels (:func:`jaxprune.graph.example_input`).

The four are entries of kind ``"model"`` of the one criterion table (:data:`CRITERIA`, the same dict as
:data:`jaxprune.unit_criteria.CRITERIA` and :data:`jaxprune.structured.CRITERIA`), with their normalisation as the
entry's ``norm``; :func:`scores` dispatches every criterion of the table through it (a ``"vectors"`` criterion such as
``l1`` scores each layer's unit vectors; ``"selection"`` ones like ``kmeans`` have no scores). :data:`YEOM` names
the four compared by Yeom et al. (the default of ``experiments.lrp_toy``).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import graph, lrp, structured
from jaxprune.unit_criteria import CRITERIA, get as _criterion, register_criterion
from jaxprune.lrp import composites as C
from jaxprune.lrp.relevance import build_graph, non_output_layers, num_classes, static

Array = jax.Array
Scores = dict[str, Array]

__all__ = ["CRITERIA", "YEOM", "scores", "weight", "grad", "taylor", "lrp_scores", "normalize", "global_keep",
           "register_criterion"]

YEOM = ("weight", "grad", "taylor", "lrp")  # Yeom et al.'s four, normalised per layer by l1, l2, l2, l1


def normalize(values: Array, norm: str, *, name: str = "values") -> Array:
    """``v / ‖v‖₁`` (``"l1"``), ``v / ‖v‖₂`` (``"l2"``) or ``v`` (``"none"``) for ``values: (n_units,)``; an
    all-zero layer stays zero.

    NaN or infinite values raise a ValueError naming ``name`` (a layer's scores), whatever ``norm``: normalising
    would hide them (a NaN norm turned the whole layer into zeros). Under ``jit`` (traced values) they propagate
    as NaN instead, which :func:`jaxprune.structured.select_by_scores` and :func:`global_keep` refuse.
    """
    if norm not in ("l1", "l2", "none"):
        raise ValueError(f"norm={norm!r}: expected 'l1', 'l2' or 'none'")
    if not isinstance(values, jax.core.Tracer):
        structured._check_scores(values, name)
    if norm == "none":
        return values
    size = jnp.sum(jnp.abs(values)) if norm == "l1" else jnp.sqrt(jnp.sum(values * values))
    return jnp.where(size == 0, 0.0, values / jnp.where(size == 0, 1.0, size))


def _normalize_layers(criterion: str, raw: Scores, layers, norm: str | None) -> Scores:
    return {k: normalize(raw[k], norm or "none", name=f"{criterion} scores of layer {k!r}") for k in layers}


def _unit_mean(a: Array, axis: int = -1) -> Array:
    """``(n, …, units, …) -> (units,)`` mean over samples, positions (and a head's channels) of the units on
    ``axis`` (-1: channels; -2: attention heads ``(n, tokens, heads, head_dim)``)."""
    return jnp.mean(_by_unit(a, axis), axis=0)


def _by_unit(a: Array, axis: int) -> Array:
    """``(n, …, units, …) -> (n·…, units)``: the units of ``axis`` last, every other axis flattened."""
    a = jnp.moveaxis(a, axis, -1)
    return a.reshape(-1, a.shape[-1])


def _check_batch(model: Any, variables: Any, x: Any, y: Any, ids: bool = False) -> tuple[graph.Graph, Array, Array]:
    """The graph for the reference batch ``x: (n, …)`` float (or, with ``ids``, integer token ids ``(n, tokens)``:
    the gradients are taken at pre-activations, never at the input) and its labels ``y: (n,)`` int in ``[0, C)``."""
    x = jnp.asarray(x)
    token_ids = ids and jnp.issubdtype(x.dtype, jnp.integer)
    if x.ndim < 2 or x.shape[0] < 1 or not (jnp.issubdtype(x.dtype, jnp.floating) or token_ids):
        raise ValueError(f"x: expected a non-empty {'float or integer token-id' if ids else 'float'} reference batch "
                         f"(n, …), got shape {x.shape} dtype {x.dtype}")
    g = build_graph(model, variables, x)
    if token_ids:
        _check_ids(g, x)
    classes = num_classes(g)
    y = np.asarray(y)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y: expected int labels of shape ({x.shape[0]},), got shape {y.shape} dtype {y.dtype}")
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"y: labels must lie in [0, {classes})")
    return g, x, jnp.asarray(y, jnp.int32)


def _check_ids(g: graph.Graph, x: Array) -> None:
    """Token ids lie in ``[0, vocabulary)`` (the smallest embedding table's rows): outside, a gather silently wraps
    (negative ids) or fills NaN."""
    roles = graph.param_roles(g)
    rows = [int(np.shape(a)[0]) for p, a in zip(g.net.paths, g.net.leaves) if roles.get(p) == "embedding"]
    lo, hi = int(jnp.min(x)), int(jnp.max(x))
    if lo < 0 or (rows and hi >= min(rows)):
        raise ValueError(f"x: integer token ids must lie in [0, {min(rows) if rows else 'vocabulary'}), got range "
                         f"[{lo}, {hi}]")


# ----------------------------------------------------------------------------------------------- weight
def _incoming_l1(kernel: Array, out_axis: int) -> Array:
    """``Σ |w|`` over every kernel axis but ``out_axis``: ``(units,)``."""
    k = jnp.moveaxis(jnp.asarray(kernel), out_axis, 0)
    return jnp.sum(jnp.abs(k.reshape(k.shape[0], -1)), axis=1)


def weight(model: Any, variables: Any, x: Any = None, *, norm: str | None = "l1") -> Scores:
    """Incoming-weight L1 norm per unit of each non-output layer, from its kernel leaf along its output axis
    (dense ``(in, out)`` → ``(out,)``, conv ``(kh, kw, cin, cout)`` → ``(cout,)``). ``x``: an example input (array,
    ``jax.ShapeDtypeStruct`` or shape tuple) to trace the graph for; inferred when None (:func:`jaxprune.graph.example_input`)."""
    spec = graph.example_input(model, variables, x)
    g = build_graph(model, variables, spec)
    layers = non_output_layers(g)
    leaves = g.net.leaves
    raw = {k: _incoming_l1(leaves[g.layers[k].kernel], g.layers[k].out_axis) for k in layers}
    return _normalize_layers("weight", raw, layers, norm)


# ----------------------------------------------------------------------------------------------- gradients
@jax.jit
def _ce(logits: Array, y: Array) -> Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _pre_activation_grads(sg, layers: tuple[str, ...], leaves: list, x: Array, y: Array) -> tuple[dict, dict]:
    """``({layer: z}, {layer: ∂L/∂z})``, ``z: (n, …, units)`` each layer's pre-activation, ``L = Σ CE``."""
    g = sg.graph
    shapes = jax.eval_shape(lambda v: graph.run(g, leaves, v)[1], x)
    zeros = {k: jnp.zeros(shapes[k].shape, shapes[k].dtype) for k in layers}

    def loss(p):
        logits, z = graph.run(g, leaves, x, probes=p)
        return jnp.sum(_ce(logits, y)), {k: z[k] for k in layers}

    gr, z = jax.grad(loss, has_aux=True)(zeros)
    return z, gr


_pre_activation_grads_jit = jax.jit(_pre_activation_grads, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=2)
def _grad_taylor(z: dict, g: dict, axes: tuple) -> tuple[dict, dict]:
    """``|mean ∂L/∂z|`` and ``|mean z·∂L/∂z|`` per unit; ``axes``: ``((layer, its unit axis), …)``."""
    ax = dict(axes)
    return ({k: jnp.abs(_unit_mean(g[k], ax[k])) for k in g},
            {k: jnp.abs(_unit_mean(z[k] * g[k], ax[k])) for k in g})


def _gradient_scores(which: int, model, variables, x, y, norm) -> Scores:
    g, x, y = _check_batch(model, variables, x, y, ids=True)
    return graph_gradient_scores(which, g, x, y, norm)


def graph_gradient_scores(which: int, g: graph.Graph, x: Array, y: Array, norm: str | None) -> Scores:
    """``grad`` (``which=0``) or ``taylor`` (1) scores of graph ``g`` at a checked batch ``x`` with labels ``y``
    of any shape ``optax.softmax_cross_entropy_with_integer_labels`` pairs with the logits (``(n,)`` for logits
    ``(n, C)``; ``(n, t)`` next tokens for ``(n, t, vocab)``); ``L = Σ CE`` over every label."""
    layers = non_output_layers(g)
    z, gr = _pre_activation_grads_jit(static(g), layers, list(g.net.leaves), x, y)
    raw = _grad_taylor(z, gr, tuple((k, g.layers[k].unit_axis) for k in layers))
    criterion = ("grad", "taylor")[which]
    if which == 0:  # a NaN pre-activation gets a zero ReLU gradient: only z·∂L/∂z shows it (Taylor: below)
        for k in layers:
            structured._check_scores(raw[1][k], f"{criterion} scores of layer {k!r} (z·∂L/∂z)")
    return _normalize_layers(criterion, raw[which], layers, norm)


def grad(model: Any, variables: Any, x: Any, y: Any, *, norm: str | None = "l2") -> Scores:
    """``|mean ∂L/∂z|`` at each non-output layer's pre-activation, over the reference batch ``x: (n, …)`` (float,
    or integer token ids ``(n, tokens)`` in ``[0, vocabulary)``), ``y: (n,)``."""
    return _gradient_scores(0, model, variables, x, y, norm)


def taylor(model: Any, variables: Any, x: Any, y: Any, *, norm: str | None = "l2") -> Scores:
    """``|mean z · ∂L/∂z|`` (first-order Taylor estimate of the loss change when the unit is removed); ``x`` as in
    :func:`grad` (token ids accepted)."""
    return _gradient_scores(1, model, variables, x, y, norm)


def lrp_scores(model: Any, variables: Any, x: Any, y: Any = None, *,
               composite: C.Composite | lrp.Rule | str = "zplus", norm: str | None = "l1") -> Scores:
    """Relevance summed over the reference batch (and positions) at each non-output layer's units (the
    pre-activation; ReLU passes relevance through, so it equals the activation's). ``y=None`` explains the
    predicted classes."""
    if y is not None:
        _check_batch(model, variables, x, y)
    rel = lrp.relevance(model, variables, x, composite=composite, target=y)
    g = build_graph(model, variables, jnp.asarray(x))
    layers = [k for k in non_output_layers(g) if k in rel.layers]
    raw = {k: _unit_sum(rel.layers[k], g.layers[k].unit_axis) for k in layers}  # heads: (heads,), not head_dim
    return _normalize_layers("lrp", raw, layers, norm)


def _unit_sum(a: Array, axis: int) -> Array:
    """``(n, …, units, …) -> (units,)``: the sum over every axis but ``axis`` (a head's channels included)."""
    return jnp.sum(_by_unit(a, axis), axis=0)


def scores(criterion: str, model: Any, variables: Any, x: Any = None, y: Any = None, *, normalized: bool = True,
           **options: Any) -> Scores:
    """Scores ``{layer: (n_units,)}`` of ``criterion`` (a name of :data:`CRITERIA` that scores: kind ``"model"`` or
    ``"vectors"``) for the model's non-output layers, each divided by the entry's ``norm`` (Yeom et al.'s
    normalisation for the four of :data:`YEOM`) unless ``normalized=False``. ``x, y``: the reference batch
    (``weight`` and the vector criteria use only ``x``'s shape, and infer one when ``x`` is None). ``options``:
    ``composite`` (``lrp``: the LRP composite, default ``"zplus"``), ``key`` (a criterion that needs one, e.g.
    ``random``, folded per layer), or an option a registered criterion names; each criterion gets only its own."""
    entry = _criterion(criterion, ("model", "vectors"), note=" (kmeans and the other 'selection' criteria choose "
                                                            "units directly: use jaxprune.structured.select_layers)")
    _check_options(options)
    if entry.needs_key and options.get("key") is None:
        raise ValueError(f"key: criterion={criterion!r} needs a jax.random key")
    if x is None and entry.needs_data or y is None and entry.needs_labels:
        raise ValueError(f"criterion={criterion!r} needs a reference batch: pass x (n, …) and labels y (n,)")
    if entry.kind == "vectors":
        raw = _vector_layer_scores(criterion, model, variables, x, options.get("key"))
    else:
        mine = {k: v for k, v in options.items() if k in entry.options or (k == "key" and entry.needs_key)}
        raw = entry.fn(model, variables, x, y, **mine)
    return _normalize_layers(criterion, raw, list(raw), entry.norm if normalized else "none")


def _check_options(options: dict) -> None:
    """Every option is read by some registered criterion (a misspelt one is refused, naming the known ones)."""
    known = {"key"}.union(*(c.options for c in CRITERIA.values()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"scores: unknown options {unknown}; the registered criteria read {sorted(known)}")


def _vector_layer_scores(criterion: str, model: Any, variables: Any, x: Any, key: Array | None) -> Scores:
    """A ``"vectors"`` criterion on each non-output layer's unit vectors (incoming weights and bias,
    :func:`jaxprune.structured.unit_params`); ``key`` folded in per layer (its index in forward order)."""
    g = build_graph(model, variables, graph.example_input(model, variables, x))
    out = {}
    for i, k in enumerate(non_output_layers(g)):
        v = np.asarray(structured.unit_vectors(**structured.unit_params(g, k)), np.float64)
        lkey = None if key is None else jax.random.fold_in(key, i)
        out[k] = jnp.asarray(structured._vector_scores(v, criterion, lkey))
    return out


@register_criterion("weight", kind="model", norm="l1")
def _weight(model: Any, variables: Any, x: Any, y: Any) -> Scores:
    return weight(model, variables, x, norm=None)


@register_criterion("grad", kind="model", needs_data=True, norm="l2")
def _grad(model: Any, variables: Any, x: Any, y: Any) -> Scores:
    return grad(model, variables, x, y, norm=None)


@register_criterion("taylor", kind="model", needs_data=True, norm="l2")
def _taylor(model: Any, variables: Any, x: Any, y: Any) -> Scores:
    return taylor(model, variables, x, y, norm=None)


@register_criterion("lrp", kind="model", needs_data=True, needs_labels=False, norm="l1", options=("composite",))
def _lrp(model: Any, variables: Any, x: Any, y: Any, composite: C.Composite | lrp.Rule | str = "zplus") -> Scores:
    return lrp_scores(model, variables, x, y, composite=composite, norm=None)


def global_keep(scores: Scores, n_remove: int, *, min_keep: int = 1) -> dict[str, Array]:
    """Remove the ``n_remove`` globally lowest-scoring units; ``{layer: kept indices (k,) int32, ascending}``.

    Ties go to the lower index within a layer and to the earlier layer across layers (both are kept first).
    Every layer keeps at least ``min_keep`` units (its best ones), so the network stays connected.
    ``scores[layer]`` must be 1-D and finite (a ValueError naming the layer otherwise).
    """
    names = list(scores)
    scores = {k: structured._check_scores(scores[k], f"scores[{k!r}]") for k in names}  # NaN would sort largest
    sizes = [int(scores[k].size) for k in names]
    total = sum(sizes)
    if not 0 <= n_remove <= total - min_keep * len(names):
        raise ValueError(f"n_remove={n_remove}: expected 0..{total - min_keep * len(names)} "
                         f"({total} units, keeping >= {min_keep} per layer)")
    vals = np.concatenate([scores[k] for k in names])
    layer = np.concatenate([np.full(s, i) for i, s in enumerate(sizes)])
    index = np.concatenate([np.arange(s) for s in sizes])
    rank_in_layer = np.concatenate([np.argsort(np.argsort(-scores[k], kind="stable"),
                                               kind="stable") for k in names])
    protected = rank_in_layer < min_keep
    # Order of removal: lowest score first; among ties the higher index / later layer goes first.
    order = np.lexsort((-index, -layer, vals))
    order = order[~protected[order]][:n_remove]
    removed = np.zeros(total, bool)
    removed[order] = True
    out, start = {}, 0
    for k, s in zip(names, sizes):
        out[k] = jnp.asarray(np.flatnonzero(~removed[start:start + s]), jnp.int32)
        start += s
    return out
