"""Structured pruning: unit/filter scores, selection, masking and physical removal (pytree surgery).

A **unit** is one output of a layer: a column of a dense kernel ``(in, out)`` or a filter of a conv kernel
``(kh, kw, cin, out)``. :func:`unit_vectors` lays a layer out as one row per unit. Selection returns the *kept*
indices, sorted ascending, with exact counts; ties are broken deterministically (lower index kept).

Weight criteria (registered in :data:`jaxprune.unit_criteria.CRITERIA`, the one table of criteria, also
:data:`CRITERIA` here): ``l1``/``l2`` (norm of the unit's weights), ``random`` (uniform scores from a
key), ``l2_gm`` (Kim et al. 2020 / FPGM: keep the units farthest from the others, i.e. with the largest sum of
Euclidean distances to all other units of the layer) and ``kmeans`` (cluster the units into ``n_keep`` clusters
with scikit-learn and keep the unit nearest each centre). Data-driven criteria (gradient, Taylor, LRP) hand in
scores directly: ``dict[layer, (n_units,)]`` with higher = more important, via :func:`select_by_scores` /
:func:`select_layers`.

:func:`remove_units` shrinks one layer of a model — its kernel and bias, the following BatchNorm's parameters and
statistics, and the input dimension of the next layer (conv → conv, conv → flatten → dense, conv → global average
pool → dense, dense → dense) — and returns the matching smaller model definition. :func:`mask_units` zeroes the
same units in place (same shapes); both networks compute the same logits.

Attention heads are units too (read from the program, :mod:`jaxprune.graph.attention`): the ``q``/``k``/``v``
projections of a head are coupled layers, removed together with :func:`remove_many` (every head axis shrinks: the
projections' kernels and biases, the output projection's rows); :func:`keep_coupled` extends one layer's kept units
to the layers coupled to it (a key/value head takes its query group under grouped-query attention; a gated MLP's
two layers keep the same units). **Unit groups** prune such coupled layers as one: :func:`unit_groups` lists the
layers pruned alone and each attention's q/k/v heads, :func:`group_widths` counts a group's units (its coupling
classes: a head, a key/value group under grouped-query attention) and :func:`select_groups` scores each class once
over the group's layers (weight criteria on the concatenated incoming weights, data-driven scores summed) and
returns every layer's kept units.

Which layers can be shrunk (:func:`prunable_layers`): every hidden layer of ``MLP``, ``LeNet5`` and ``ConvNet``,
every conv of ``VGG`` and, in a ``ResNet``, only the block-internal ``block{s}_{b}/conv_0`` (so residual widths
stay aligned). Output layers are never shrunk.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _validate, conventions, graph
from jaxprune.unit_criteria import CRITERIA, get as _criterion, register_criterion

Array = jax.Array
Variables = dict[str, Any]
_ON_KERNELS = ("vectors", "selection")  # the kinds scored from a layer's (or a class's) weight vectors


# ----------------------------------------------------------------------------------------------- selection
def unit_vectors(kernel: Array, bias: Array | None = None) -> Array:
    """One row per output unit: dense ``(in, out)`` → ``(out, in)``; conv ``(kh, kw, cin, out)`` →
    ``(out, kh·kw·cin)``; ``bias: (out,)`` appended as the last column when given."""
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 2:
        raise ValueError(f"kernel: expected a dense (in, out) or conv (kh, kw, cin, out) kernel, got shape "
                         f"{kernel.shape}")
    rows = kernel.reshape(-1, kernel.shape[-1]).T
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (kernel.shape[-1],):
            raise ValueError(f"bias: expected shape ({kernel.shape[-1]},) to match the kernel's units, got "
                             f"{bias.shape}")
        rows = jnp.concatenate([rows, bias[:, None].astype(rows.dtype)], axis=1)
    return rows


def _check_n_keep(n_keep: int, n: int, name: str = "n_keep") -> int:
    if isinstance(n_keep, bool) or not isinstance(n_keep, (int, np.integer)) or not 0 <= int(n_keep) <= n:
        raise ValueError(f"{name}={n_keep!r}: expected an integer number of kept units in [0, {n}]")
    return int(n_keep)


def _check_scores(scores: Array, name: str = "scores") -> np.ndarray:
    """``scores: (n_units,)`` as float64 numpy; a ValueError naming ``name`` unless it is 1-D and finite (NaN
    would otherwise sort as the largest score, and every unit silently tie)."""
    s = np.asarray(scores, np.float64)
    if s.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array (n_units,), got shape {s.shape}")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ValueError(f"{name}: contains NaN or infinite values (units {bad[:8].tolist()}"
                         f"{', …' if bad.size > 8 else ''}); expected finite unit importances (check the "
                         "parameters and the reference batch for NaN/Inf)")
    return s


def select_by_scores(scores: Array, n_keep: int) -> Array:
    """Indices of the ``n_keep`` highest ``scores: (n_units,)``, sorted ascending, int32; equal scores keep the
    lower index. The entry point for data-driven criteria (gradient, Taylor, LRP)."""
    s = _check_scores(scores)
    n_keep = _check_n_keep(n_keep, s.size)
    order = np.argsort(-s, kind="stable")  # highest first, lower index first among ties
    return jnp.asarray(np.sort(order[:n_keep]), jnp.int32)


def _pairwise_distances(v: np.ndarray) -> np.ndarray:
    """``v: (n, d)`` float64 → ``(n, n)`` Euclidean distances (exactly 0 between identical rows)."""
    sq = np.sum(v * v, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (v @ v.T)
    d2 = np.maximum(d2, 0.0)
    # The Gram identity loses precision for near-identical rows; recompute those pairs exactly.
    close = d2 <= 1e-6 * (sq[:, None] + sq[None, :] + 1e-30)
    ii, jj = np.nonzero(close)
    d2[ii, jj] = np.sum((v[ii] - v[jj]) ** 2, axis=1)
    return np.sqrt(d2)


def _seed(key: Array | None) -> int:
    if key is None:
        return 0
    _validate.key(key)
    return int(jax.random.randint(key, (), 0, 2**31 - 1))


def unit_scores(kernel: Array, criterion: str, *, bias: Array | None = None,
                key: Array | None = None) -> Array:
    """Per-unit importance ``(n_units,)`` float for the score-based criteria ``l1``, ``l2``, ``random``, ``l2_gm``
    (higher = kept), computed in float64 and returned as a JAX array (float32 unless x64 is enabled).
    ``kmeans`` is a selection, not a score: use :func:`select_units`."""
    return jnp.asarray(_scores64(kernel, criterion, bias, key))


def _scores64(kernel: Array, criterion: str, bias: Array | None, key: Array | None) -> np.ndarray:
    _criterion(criterion, ("vectors",), note=f" ({', '.join(_criteria_of('selection'))} select units directly: "
                                            "use select_units)")
    return _vector_scores(np.asarray(unit_vectors(kernel, bias), np.float64), criterion, key)


def _criteria_of(kind: str) -> tuple[str, ...]:
    return tuple(n for n, c in CRITERIA.items() if c.kind == kind)


def _vector_scores(v: np.ndarray, criterion: str, key: Array | None) -> np.ndarray:
    """Scores ``(n,)`` float64 of the units laid out as rows of ``v: (n, d)`` under a ``"vectors"`` criterion of
    :data:`CRITERIA` (``key``: checked and passed to one that ``needs_key``)."""
    entry = _criterion(criterion, ("vectors",))
    _need_key(entry, key)
    s = np.asarray(entry.fn(v, key), np.float64)
    if s.shape != (v.shape[0],):
        raise ValueError(f"criterion={criterion!r}: its scores have shape {s.shape}, expected ({v.shape[0]},)")
    return s


def _need_key(entry, key: Array | None) -> None:
    if entry.needs_key and key is None:
        raise ValueError(f"key: criterion={entry.name!r} needs a jax.random key")
    _validate.optional_key(key)


@register_criterion("l1", kind="vectors")
def _l1(v: np.ndarray, key: Array | None) -> np.ndarray:
    """``Σ |v|`` per row."""
    return np.abs(v).sum(axis=1)


@register_criterion("l2", kind="vectors")
def _l2(v: np.ndarray, key: Array | None) -> np.ndarray:
    """``‖v‖₂`` per row."""
    return np.sqrt((v * v).sum(axis=1))


@register_criterion("random", kind="vectors", needs_key=True)
def _random(v: np.ndarray, key: Array) -> np.ndarray:
    """Uniform scores in [0, 1) from ``key``."""
    return np.asarray(jax.random.uniform(key, (v.shape[0],)), np.float64)


@register_criterion("kmeans", kind="selection")
def _kmeans(v: np.ndarray, n_keep: int, key: Array | None) -> np.ndarray:
    """:func:`_kmeans_select` seeded from ``key`` (seed 0 without one)."""
    return _kmeans_select(v, n_keep, _seed(key))


@register_criterion("l2_gm", kind="vectors")
def _l2_gm(v: np.ndarray, key: Array | None) -> np.ndarray:
    """Sum of distances to the other rows: units near the geometric median are redundant (Kim et al. 2020)."""
    return _pairwise_distances(v).sum(axis=1)


def _select_rows(v: np.ndarray, n_keep: int, criterion: str, key: Array | None) -> np.ndarray:
    """Kept row indices ``(n_keep,)`` ascending of ``v: (n, d)`` float64 under a criterion of kind ``"vectors"``
    or ``"selection"``."""
    entry = _criterion(criterion, _ON_KERNELS)
    if entry.kind == "vectors":
        return np.asarray(select_by_scores(_vector_scores(v, criterion, key), n_keep))
    _need_key(entry, key)
    kept = np.sort(np.asarray(entry.fn(v, n_keep, key), np.int64))
    if kept.shape != (n_keep,) or np.unique(kept).size != n_keep or np.any((kept < 0) | (kept >= len(v))):
        raise ValueError(f"criterion={criterion!r}: expected {n_keep} distinct row indices in [0, {len(v)}), got "
                         f"{kept.tolist()}")
    return kept


def _kmeans_select(v: np.ndarray, n_keep: int, seed: int) -> np.ndarray:
    """Cluster rows of ``v: (n, d)`` into ``n_keep`` groups; keep the member nearest each centre. If fewer than
    ``n_keep`` distinct representatives result (fewer distinct rows than clusters), fill greedily with the unit
    farthest from those kept (duplicates, at distance 0, come last)."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    n = v.shape[0]
    if n_keep == n:
        return np.arange(n)
    if n_keep == 0:
        return np.zeros((0,), np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=n_keep, n_init=10, random_state=seed).fit(v)
    kept: list[int] = []
    for c in range(n_keep):
        members = np.flatnonzero(km.labels_ == c)
        if members.size == 0:
            continue
        dist = np.sum((v[members] - km.cluster_centers_[c]) ** 2, axis=1)
        kept.append(int(members[np.argmin(dist)]))  # argmin: lowest index among ties
    kept = sorted(set(kept))
    if len(kept) < n_keep:
        dist = _pairwise_distances(v)
        nearest = dist[:, kept].min(axis=1) if kept else np.full(n, np.inf)
        while len(kept) < n_keep:
            cand = np.where(np.isin(np.arange(n), kept), -np.inf, nearest)
            j = int(np.argmax(cand))
            kept.append(j)
            nearest = np.minimum(nearest, dist[:, j])
    return np.sort(np.asarray(kept))


def select_units(kernel: Array, n_keep: int, criterion: str, *, bias: Array | None = None,
                 key: Array | None = None) -> Array:
    """Indices ``(n_keep,)`` int32, sorted ascending, of the units of ``kernel`` kept under ``criterion``.

    ``kernel``: dense ``(in, out)`` or conv ``(kh, kw, cin, out)``; ``bias: (out,)`` joins the unit vectors.
    ``key`` is required for ``random`` and seeds ``kmeans`` (seed 0 without one). ``criterion``: a name of
    :data:`CRITERIA` of kind ``"vectors"`` or ``"selection"``.
    """
    _criterion(criterion, _ON_KERNELS)
    n = int(np.shape(kernel)[-1]) if np.ndim(kernel) >= 2 else 0
    v = unit_vectors(kernel, bias)
    n_keep = _check_n_keep(n_keep, n)
    return jnp.asarray(_select_rows(np.asarray(v, np.float64), n_keep, criterion, key), jnp.int32)


def n_keep_for(n_units: int, fraction: float) -> int:
    """Units kept when removing ``ceil(fraction · n_units)`` of them (:func:`jaxprune.conventions.n_to_prune`)."""
    return int(n_units) - conventions.n_to_prune(fraction, int(n_units))


# ----------------------------------------------------------------------------------------------- topology
def _graph(model: Any, variables: Any, x: Any = None) -> graph.Graph:
    return graph.build(model, variables, graph.example_input(model, variables, x))


def prunable_layers(model: Any, kind: str = "all", *, variables: Any = None, x: Any = None) -> tuple[str, ...]:
    """Layers :func:`remove_units` can shrink alone, in forward order; ``kind``: all, conv or dense.

    Read from the model's graph (:mod:`jaxprune.graph`): every linear layer whose units neither are the model's
    outputs nor are coupled to another layer's (a residual add) or to the input. ``variables`` (or an example input
    ``x``) is needed to trace the model; coupled layers shrink together through :func:`remove_many`
    (:func:`coupled_groups` lists them)."""
    if kind not in ("all", "conv", "dense"):
        raise ValueError(f"kind={kind!r}: expected 'all', 'conv' or 'dense'")
    variables = _need(model, variables, x, "prunable_layers")
    g = _graph(model, variables, x)
    return tuple(n for n in g.prunable() if kind == "all" or g.layers[n].kind == kind)


def coupled_groups(model: Any, variables: Any, *, x: Any = None) -> tuple[tuple[str, ...], ...]:
    """Groups of layers whose units are coupled (residual adds) and can only shrink together, each unit index
    kept or removed in every layer of the group alike (:func:`remove_many`)."""
    return _graph(model, variables, x).coupled_groups()


def _need(model: Any, variables: Any, x: Any, fn: str) -> Any:
    """``variables``, or abstract ones initialised for the example input ``x`` (a TypeError naming both)."""
    if variables is not None or graph._is_nnx_module(model):
        return variables
    if x is None:
        raise TypeError(f"{fn}: pass variables= (the model's variables) or x= (an example input or its shape) so "
                        "the model's graph can be traced")
    spec = graph.example_input(model, None, x)
    kwargs = dict(graph.call_kwargs(model))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(spec.shape, spec.dtype), **kwargs))


def get_path(tree: Mapping, path: Sequence[str]) -> Any:
    """``tree[path[0]]…[path[-1]]`` (a params/batch_stats subtree; ``path`` as ``'block0_0/conv_0'.split('/')``)."""
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: Mapping, path: Sequence[str], value: Any) -> dict:
    """Copy of ``tree`` with ``tree[path[0]]…[path[-1]] = value`` (untouched branches shared)."""
    new = dict(tree)
    new[path[0]] = value if len(path) == 1 else set_path(tree[path[0]], path[1:], value)
    return new


def layer_params(variables: Variables, layer: str) -> dict:
    """``{'kernel': …, ['bias': …]}`` of ``layer`` (``'conv_1'``, ``'block0_0/conv_0'``) in linen variables."""
    try:
        return dict(get_path(variables["params"], layer.split("/")))
    except (KeyError, TypeError):
        raise ValueError(f"layer={layer!r}: not found in variables['params']") from None


def unit_params(g: graph.Graph, layer: str) -> dict:
    """``{'kernel': (…, units) with the units last, ['bias': (units,)]}`` of a graph layer (any model)."""
    l = g.layer(layer)
    leaves = g.net.leaves
    out = {"kernel": jnp.moveaxis(leaves[l.kernel], l.out_axis, -1)}
    bias = l.bias if l.bias is not None else (l.bn or {}).get("layer_bias")
    if bias is not None and np.ndim(leaves[bias]) > 1:  # a head bias (heads, head_dim): joins the kernel's rows
        axis = _unit_axis(g, bias, layer)
        rows = [out["kernel"].reshape(-1, l.units), jnp.moveaxis(leaves[bias], axis, -1).reshape(-1, l.units)]
        out["kernel"] = jnp.concatenate(rows, axis=0)
    elif bias is not None:
        out["bias"] = leaves[bias]
    return out


def _unit_axis(g: graph.Graph, leaf: int, layer: str) -> int:
    """The axis of parameter ``leaf`` indexed by ``layer``'s units: the slice the graph recorded, else (a single head,
    whose size-1 axis is not followed as a slice) the one axis of that size the graph did not record as channels."""
    axes = [a for lf, a, ids in g.slices if lf == leaf and np.array_equal(ids, g.unit_ids[layer])]
    if not axes:
        seen = {a for lf, a, _ in g.slices if lf == leaf}
        shape = np.shape(g.net.leaves[leaf])
        axes = [a for a in range(len(shape)) if a not in seen and shape[a] == g.layers[layer].units]
    if len(axes) != 1:
        raise ValueError(f"layer={layer!r}: cannot tell which axis of {g.net.paths[leaf]!r} "
                         f"{np.shape(g.net.leaves[leaf])} holds its {g.layers[layer].units} units")
    return axes[0]


def keep_coupled(model: Any, variables: Variables, keep: Mapping[str, Array], *, x: Any = None) -> dict[str, Array]:
    """``keep: {layer: kept indices}`` extended to every layer coupled to one of them: a coupled layer keeps the
    units whose coupling class holds no removed unit. For attention heads (one unit of the ``q``/``k``/``v``
    projections) ``{key projection: kept kv heads}`` gives the query projection the heads of those groups
    (grouped-query attention) and the value projection the same heads; for a gated MLP the gate's kept units give
    the up projection's. Feed the result to :func:`remove_many` / :func:`mask_many`."""
    g = _graph(model, variables, x)
    k = _keeps(g, keep, allow_empty=True)
    removed = np.zeros(g.owner.shape, bool)
    for layer, kept in k.items():
        off = np.ones(g.layers[layer].units, bool)
        off[kept] = False
        removed[g.unit_ids[layer][off]] = True
    gone = np.isin(g.cls, np.unique(g.cls[removed]))
    out = {layer: jnp.asarray(kept, jnp.int32) for layer, kept in k.items()}
    for name in g.layers:
        hit = gone[g.unit_ids[name]]
        if name not in out and hit.any():
            out[name] = jnp.asarray(np.flatnonzero(~hit), jnp.int32)
    return out


def _check_keep(keep: Any, n: int, layer: str, allow_empty: bool = False) -> np.ndarray:
    """``keep`` as unique int64 indices in ``[0, n)``; a boolean mask or float indices are refused (not cast).
    Empty only with ``allow_empty`` (masking every unit is representable, a zero-width layer is not)."""
    k = np.asarray(keep)
    if k.ndim != 1 or not (np.issubdtype(k.dtype, np.integer) or k.size == 0):
        raise ValueError(f"keep: expected a 1-D integer array of kept unit indices of {layer!r}, got shape "
                         f"{k.shape} dtype {k.dtype}")
    k = k.astype(np.int64)
    if k.size == 0:
        if allow_empty:
            return k
        raise ValueError(f"keep: empty — refusing to remove every unit of {layer!r} (it has {n})")
    if k.min() < 0 or k.max() >= n:
        raise ValueError(f"keep: indices must lie in [0, {n}) for {layer!r}, got range [{k.min()}, {k.max()}]")
    if np.unique(k).size != k.size:
        raise ValueError(f"keep: indices of {layer!r} must be unique")
    return k


def _keeps(g: graph.Graph, keep: Mapping[str, Any], allow_empty: bool = False) -> dict[str, np.ndarray]:
    out = {}
    for layer, k in keep.items():
        l = g.layer(layer)
        out[layer] = _check_keep(k, l.units, layer, allow_empty)
    return out


def remove_units(model: Any, variables: Variables, layer: str, keep: Array, *,
                 x: Any = None) -> tuple[Any, Variables]:
    """Physically keep only units ``keep: (k,) int`` of ``layer``: its kernel/bias, the BatchNorm after it (scale,
    bias, mean, var), and the input rows of every layer reading it (through flattening, pooling, concatenation).
    Returns ``(smaller model, its variables)``; the smaller network computes the same logits as ``model`` with the
    removed units masked (:func:`mask_units`). A layer coupled to others (a residual add) is refused: remove
    their units together with :func:`remove_many`. ``x``: an example input (default: inferred)."""
    return remove_many(model, variables, {layer: keep}, x=x)


def remove_many(model: Any, variables: Variables, keep: Mapping[str, Array], *,
                x: Any = None) -> tuple[Any, Variables]:
    """:func:`remove_units` for every ``layer → kept indices`` at once (indices refer to the original widths).
    Coupled layers (one residual width) are shrunk together when every one of them keeps the same units."""
    spec = graph.example_input(model, variables, x)
    g = graph.build(model, variables, spec)
    k = _keeps(g, keep)
    leaves = graph.shrink(g, k)
    widths = {layer: int(v.size) for layer, v in k.items()}
    new_model, new_variables = graph.rebuild(g, leaves, widths, spec)
    new_model = graph.regrouped(g, g.removed_units(k), new_model, new_variables, spec)
    return new_model, new_variables


def mask_units(model: Any, variables: Variables, layer: str, keep: Array, *, x: Any = None) -> Variables:
    """Same shapes, units outside ``keep`` silenced: their kernel columns/filters and bias zeroed and, when a
    BatchNorm follows, its scale and offset zeroed too (so the unit's post-BN activation is exactly 0), and the
    input rows of the layers reading them zeroed (so an activation that does not map 0 to 0 — sigmoid, or a
    BatchNorm after the ReLU — sends nothing on).

    ``keep: (k,) int`` is validated exactly as by :func:`remove_units` (unique integer indices in range; a boolean
    mask or float indices are refused), and the masked network computes the same logits as the shrunk one. The one
    difference: an empty ``keep`` is allowed here and silences the whole layer (e.g. one-shot unit pruning at
    100 % sparsity), while :func:`remove_units` refuses to build a zero-width layer. Units normalised together with
    other channels (a LayerNorm or RMSNorm over them) are refused naming the norm: only removal is defined there."""
    return mask_many(model, variables, {layer: keep}, x=x)


def mask_many(model: Any, variables: Variables, keep: Mapping[str, Array], *, x: Any = None) -> Variables:
    """:func:`mask_units` for every ``layer → kept indices`` at once (coupled layers, e.g. one residual width,
    are masked together when every one of them keeps the same units)."""
    g = _graph(model, variables, x)
    k = _keeps(g, keep, allow_empty=True)
    return g.net.with_leaves(graph.silence(g, k))


# ----------------------------------------------------------------------------------------------- whole models
ScoreSource = str | Mapping[str, Array] | Callable[[str, dict], Array]


def _check_criterion(criterion: Any, key: Array | None, other: str) -> None:
    """A criterion name of :data:`CRITERIA` (``other``: the rest of the message, what else is accepted) and, for
    one that needs it (``random``), a key; ValueErrors name the argument."""
    if isinstance(criterion, str):
        _need_key(_criterion(criterion, note=other), key)
    _validate.optional_key(key)


def _resolve(criterion: Any, model: Any, variables: Any, x: Any) -> Any:
    """``criterion`` as :func:`select_layers` / :func:`select_groups` rank by: a name of kind ``"vectors"`` or
    ``"selection"`` stays a name; a ``"model"`` criterion that needs no data becomes its scores ``{layer: (n,)}``
    (computed on ``variables``, ``x`` the example input); one that needs data is refused (pass its scores)."""
    if not isinstance(criterion, str) or CRITERIA[criterion].kind in _ON_KERNELS:
        return criterion
    entry = CRITERIA[criterion]
    if entry.needs_data:
        raise ValueError(f"criterion={criterion!r} scores units on a reference batch: pass its scores, "
                         f"jaxprune.criteria.scores({criterion!r}, model, variables, x, y), as criterion")
    return entry.fn(model, variables, x, None)


def select_layers(model: Any, variables: Variables, n_keep: Mapping[str, int], criterion: ScoreSource,
                  *, key: Array | None = None, x: Any = None) -> dict[str, Array]:
    """Kept indices for several layers at once, all scored on the *unpruned* ``variables``.

    ``criterion``: a criterion name of :data:`CRITERIA` (one of kind ``"model"`` only if it needs no data), a dict
    ``layer → (n_units,)`` of data-driven scores (higher = kept), or a callable ``(layer, layer_params) ->
    (n_units,)`` scores.
    ``key`` (split per layer) is needed for ``random``. A layer whose units are removable only in whole groups (it
    feeds a grouped convolution or a GroupNorm) keeps whole groups: ``n_keep`` rounds up to a multiple of the group
    size, and the groups holding most of the units the criterion keeps are kept (:func:`_whole_classes`).
    """
    _check_criterion(criterion, key, ", a dict of scores or a callable")
    criterion = _resolve(criterion, model, variables, x)
    g = _graph(model, variables, x)
    keep = {}
    for i, (layer, nk) in enumerate(n_keep.items()):
        why = g.why_not_prunable(layer)
        if why is not None:
            raise ValueError(f"layer={layer!r}: cannot remove units ({why}); layers that can: {g.prunable()}")
        lp = unit_params(g, layer)
        lkey = None if key is None else jax.random.fold_in(key, i)
        if isinstance(criterion, str):
            keep[layer] = select_units(lp["kernel"], nk, criterion, bias=lp.get("bias"), key=lkey)
        else:
            if callable(criterion):
                scores = criterion(layer, lp)
            elif layer in criterion:
                scores = criterion[layer]
            else:
                raise ValueError(f"criterion: no scores for layer {layer!r}; got scores for {sorted(criterion)}")
            n = int(lp["kernel"].shape[-1])
            if np.shape(scores) != (n,):
                raise ValueError(f"criterion[{layer!r}]: expected scores of shape ({n},), got {np.shape(scores)}")
            keep[layer] = select_by_scores(scores, nk)
        keep[layer] = _whole_classes(g, layer, keep[layer], nk)
    return keep


# ----------------------------------------------------------------------------------------------- unit groups
def unit_groups(model: Any, variables: Any = None, *, x: Any = None, kind: str = "all",
                heads: bool = True) -> tuple[tuple[str, ...], ...]:
    """Groups of layers pruned as one, in forward order: every :func:`prunable_layers` layer of ``kind`` alone (a
    1-tuple) and, with ``heads``, every coupled group of attention-head layers: the ``q``/``k``/``v`` projections
    of one attention, whether of kind ``"heads"`` (``DenseGeneral``, einsum kernels) or dense layers reshaped into
    heads (each coupling class then holds a head's ``head_dim`` channels of every layer). Residual streams and
    gated-MLP pairs (one unit per layer in each class) are coupled groups too but are not listed (pass their layers
    to :func:`select_groups` yourself). Feed the groups to :func:`group_widths`."""
    singles = prunable_layers(model, kind, variables=variables, x=x)
    g = _graph(model, _need(model, variables, x, "unit_groups"), x)
    groups = [(n,) for n in singles]
    if heads:
        groups += [grp for grp in g.coupled_groups() if _is_heads(g, grp)]
    order = list(g.layers)
    return tuple(sorted(groups, key=lambda grp: order.index(grp[0])))


def _is_heads(g: graph.Graph, group: Sequence[str]) -> bool:
    """Whether a coupled group is attention heads: layers of kind ``"heads"``, or classes of ≥ 2 channels of each
    layer (a dense projection reshaped into heads) that no norm's channel groups made (a GroupNorm after a residual
    add couples whole groups too; a per-head QK-norm is therefore not listed either)."""
    if all(g.layers[n].kind == "heads" for n in group):
        return True
    ids = np.concatenate([g.unit_ids[n] for n in group])
    if any(np.isin(ids, gr).any() for gr in g.norms.values() if np.shape(gr)[0] > 1):
        return False
    return all(np.unique(g.cls[g.unit_ids[n]], return_counts=True)[1].min() >= 2 for n in group)


def _group(g: graph.Graph, layer: str) -> tuple[tuple[str, ...], np.ndarray]:
    """The layers pruned with ``layer`` (``layer`` first) and its coupling classes ``(n,)`` in unit order; a
    ValueError names the layer when its units are frozen."""
    members = (layer,) + g.coupled(layer)
    ids = np.concatenate([g.unit_ids[m] for m in members])
    frozen = sorted({int(c) for c in g.cls[ids] if int(c) in g.frozen})
    if frozen:
        raise ValueError(f"layer={layer!r}: cannot remove units ({g.frozen[frozen[0]]}); groups that can: "
                         f"{[grp[0] for grp in g.coupled_groups()] + list(g.prunable())}")
    cls = g.cls[g.unit_ids[layer]]
    _, first = np.unique(cls, return_index=True)
    return members, cls[np.sort(first)]


def group_widths(model: Any, variables: Variables, groups: Sequence[Sequence[str]], *,
                 x: Any = None) -> dict[str, int]:
    """``{group[0]: removable units}``: a group's units are its coupling classes (one attention head across its
    q/k/v projections, one key/value group under grouped-query attention, one unit of a layer pruned alone)."""
    g = _graph(model, variables, x)
    return {grp[0]: int(_group(g, grp[0])[1].size) for grp in groups}


def _class_units(g: graph.Graph, members: Sequence[str], classes: np.ndarray) -> list[list[np.ndarray]]:
    """Per class, per member layer: the indices of the layer's units in that class."""
    return [[np.flatnonzero(g.cls[g.unit_ids[m]] == c) for m in members] for c in classes]


def _class_vectors(g: graph.Graph, members: Sequence[str], units: list[list[np.ndarray]], layer: str) -> np.ndarray:
    """``(classes, d)`` float64: each class's unit vectors (incoming weights, bias) concatenated over the layers."""
    vecs = {m: np.asarray(unit_vectors(**unit_params(g, m)), np.float64) for m in members}
    rows = [np.concatenate([vecs[m][u].ravel() for m, u in zip(members, per)]) for per in units]
    if len({r.size for r in rows}) > 1:
        raise ValueError(f"layer={layer!r}: its coupling classes hold different numbers of weights; a weight "
                         "criterion needs equal ones (pass data-driven scores instead)")
    return np.stack(rows)


def _class_scores(scores: Mapping[str, Array], members: Sequence[str], units: list[list[np.ndarray]],
                  g: graph.Graph) -> np.ndarray:
    """``(classes,)``: the sum of each class's unit scores over the group's layers."""
    missing = [m for m in members if m not in scores]
    if missing:
        raise ValueError(f"criterion: no scores for layers {missing} (a group is scored over all its layers); got "
                         f"scores for {sorted(scores)}")
    s = {m: _check_scores(scores[m], f"criterion[{m!r}]") for m in members}
    for m in members:
        if s[m].shape != (g.layers[m].units,):
            raise ValueError(f"criterion[{m!r}]: expected scores of shape ({g.layers[m].units},), got {s[m].shape}")
    return np.array([sum(s[m][u].sum() for m, u in zip(members, per)) for per in units])


def select_groups(model: Any, variables: Variables, n_keep: Mapping[str, int], criterion: str | Mapping[str, Array],
                  *, key: Array | None = None, x: Any = None) -> dict[str, Array]:
    """Kept unit indices of every layer of each group, for :func:`remove_many` / :func:`mask_many`.

    ``n_keep``: ``{group's first layer: coupling classes kept}`` (:func:`group_widths` counts them);
    ``criterion``: a criterion of :data:`CRITERIA` of kind ``"vectors"``/``"selection"`` — a class is the vector of
    its units' incoming weights and biases concatenated over the group's layers (one score per head across q/k/v) —
    or data-driven scores ``{layer: (units,)}`` (:func:`jaxprune.criteria.scores`; a ``"model"`` criterion that
    needs no data is computed here), a class scoring the sum of its units' scores over the group's layers. Ties keep the lower class; ``key`` (folded per group) is needed for ``random``. A group of
    one layer whose units are their own classes selects exactly as :func:`select_layers`."""
    _check_criterion(criterion, key, " or a dict of scores")
    criterion = _resolve(criterion, model, variables, x)
    g = _graph(model, variables, x)
    keep = {}
    for i, (layer, nk) in enumerate(n_keep.items()):
        members, classes = _group(g, g.layer(layer).name)
        nk = _check_n_keep(nk, classes.size, f"n_keep[{layer!r}]")
        units = _class_units(g, members, classes)
        gkey = None if key is None else jax.random.fold_in(key, i)
        if isinstance(criterion, str):
            kept = _select_rows(_class_vectors(g, members, units, layer), nk, criterion, gkey)
        else:
            kept = np.asarray(select_by_scores(_class_scores(criterion, members, units, g), nk))
        for j, m in enumerate(members):
            idx = np.sort(np.concatenate([units[c][j] for c in kept])) if kept.size else np.zeros(0, np.int64)
            keep[m] = jnp.asarray(idx, jnp.int32)
    return keep

def _whole_classes(g: graph.Graph, layer: str, kept: Array, n_keep: int) -> Array:
    """``kept`` rounded to whole coupling classes of ``layer`` (a grouped convolution's or a GroupNorm's channel
    groups, each of ``s`` units): the ``ceil(n_keep / s)`` groups holding most of the units the criterion kept (ties:
    the group with the lower first unit). Unchanged when each class holds one unit of the layer or sizes differ."""
    _, inv, counts = np.unique(np.asarray(g.cls[g.unit_ids[layer]]), return_inverse=True, return_counts=True)
    if counts.max() == 1 or counts.min() != counts.max():
        return kept
    votes = np.bincount(inv[np.asarray(kept)], minlength=counts.size)
    first = np.array([np.flatnonzero(inv == c)[0] for c in range(counts.size)])
    chosen = np.lexsort((first, -votes))[:-(-n_keep // int(counts[0]))]
    return jnp.asarray(np.flatnonzero(np.isin(inv, chosen)), jnp.int32)


def widths(model: Any, variables: Variables, *, x: Any = None) -> dict[str, int]:
    """Current number of units of every layer :func:`remove_units` can shrink."""
    g = _graph(model, variables, x)
    return {layer: g.layers[layer].units for layer in g.prunable()}


def count_flops(model: Any, variables: Variables, input_shape: Sequence[int]) -> dict[str, Any]:
    """Multiply-accumulates of every product of the model for one example of shape ``input_shape[1:]``:
    ``{'macs': int, 'flops': 2·macs, 'layers': {name: macs}, 'uncounted': (op, …)}`` (BatchNorm, bias, norms and
    pooling are not counted).

    A layer's MACs are its kernel size times its number of output positions (``h·w`` for a conv, 1 for dense);
    every other ``dot_general``/convolution (attention's ``q·kᵀ`` and ``attn·v``, ``DenseGeneral`` projections,
    depthwise and grouped convolutions) is counted too, under ``"<op> after <layer>"``
    (:func:`jaxprune.graph.count_macs`). ``uncounted`` names operations (control flow, custom calls) holding
    products the count cannot read — empty when ``macs`` is the whole model. ``input_shape`` may be an example
    input (array or ``jax.ShapeDtypeStruct``): its dtype is used (token ids for a language model), else float32."""
    shape, dtype = tuple(getattr(input_shape, "shape", input_shape)), getattr(input_shape, "dtype", jnp.float32)
    g = graph.build(model, variables, jax.ShapeDtypeStruct((1,) + shape[1:], dtype))
    layers = graph.count_macs(g)
    macs = int(sum(layers.values()))
    return {"macs": macs, "flops": 2 * macs, "layers": layers, "uncounted": graph.uncounted(g)}
