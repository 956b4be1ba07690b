"""Structured pruning: unit/filter scores, selection, masking and physical removal (pytree surgery).

A **unit** is one output of a layer: a column of a dense kernel ``(in, out)`` or a filter of a conv kernel
``(kh, kw, cin, out)``. :func:`unit_vectors` lays a layer out as one row per unit. Selection returns the *kept*
indices, sorted ascending, with exact counts; ties are broken deterministically (lower index kept).

Weight criteria (:data:`CRITERIA`): ``l1``/``l2`` (norm of the unit's weights), ``random`` (uniform scores from a
key), ``l2_gm`` (Kim et al. 2020 / FPGM: keep the units farthest from the others, i.e. with the largest sum of
Euclidean distances to all other units of the layer) and ``kmeans`` (cluster the units into ``n_keep`` clusters
with scikit-learn and keep the unit nearest each centre). Data-driven criteria (gradient, Taylor, LRP) hand in
scores directly: ``dict[layer, (n_units,)]`` with higher = more important, via :func:`select_by_scores` /
:func:`select_layers`.

:func:`remove_units` shrinks one layer of a model — its kernel and bias, the following BatchNorm's parameters and
statistics, and the input dimension of the next layer (conv → conv, conv → flatten → dense, conv → global average
pool → dense, dense → dense) — and returns the matching smaller model definition. :func:`mask_units` zeroes the
same units in place (same shapes); both networks compute the same logits.

Which layers can be shrunk (:func:`prunable_layers`): every hidden layer of ``MLP``, ``LeNet5`` and ``ConvNet``,
every conv of ``VGG`` and, in a ``ResNet``, only the block-internal ``block{s}_{b}/conv_0`` (so residual widths
stay aligned). Output layers are never shrunk.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import models

Array = jax.Array
Variables = dict[str, Any]
CRITERIA = ("l1", "l2", "random", "kmeans", "l2_gm")


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
    return int(jax.random.randint(key, (), 0, 2**31 - 1))


def unit_scores(kernel: Array, criterion: str, *, bias: Array | None = None,
                key: Array | None = None) -> Array:
    """Per-unit importance ``(n_units,)`` float for the score-based criteria ``l1``, ``l2``, ``random``, ``l2_gm``
    (higher = kept), computed in float64 and returned as a JAX array (float32 unless x64 is enabled).
    ``kmeans`` is a selection, not a score: use :func:`select_units`."""
    return jnp.asarray(_scores64(kernel, criterion, bias, key))


def _scores64(kernel: Array, criterion: str, bias: Array | None, key: Array | None) -> np.ndarray:
    if criterion not in CRITERIA or criterion == "kmeans":
        raise ValueError(f"criterion={criterion!r}: expected one of {tuple(c for c in CRITERIA if c != 'kmeans')} "
                         "(kmeans selects units directly: use select_units)")
    v = np.asarray(unit_vectors(kernel, bias), np.float64)
    if criterion == "l1":
        s = np.abs(v).sum(axis=1)
    elif criterion == "l2":
        s = np.sqrt((v * v).sum(axis=1))
    elif criterion == "random":
        if key is None:
            raise ValueError("key: criterion='random' needs a jax.random key")
        s = np.asarray(jax.random.uniform(key, (v.shape[0],)), np.float64)
    else:  # l2_gm: distance to the others; units near the geometric median are redundant
        s = _pairwise_distances(v).sum(axis=1)
    return s


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
    ``key`` is required for ``random`` and seeds ``kmeans`` (seed 0 without one).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}: expected one of {CRITERIA}")
    n = int(np.shape(kernel)[-1]) if np.ndim(kernel) >= 2 else 0
    v = unit_vectors(kernel, bias)
    n_keep = _check_n_keep(n_keep, n)
    if criterion == "kmeans":
        kept = _kmeans_select(np.asarray(v, np.float64), n_keep, _seed(key))
        return jnp.asarray(kept, jnp.int32)
    return select_by_scores(_scores64(kernel, criterion, bias, key), n_keep)


def n_keep_for(n_units: int, fraction: float) -> int:
    """Units kept when removing ``ceil(fraction · n_units)`` of them (the masks module's rounding)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: expected a fraction of units to remove in [0, 1]")
    return n_units - math.ceil(fraction * n_units - 1e-9)


# ----------------------------------------------------------------------------------------------- topology
@dataclasses.dataclass(frozen=True)
class Edge:
    """How one shrinkable layer is wired: its params path, the BatchNorm after it, the layer reading it."""

    layer: tuple[str, ...]
    bn: tuple[str, ...] | None
    consumer: tuple[str, ...]
    rebuild: Callable[[int], nn.Module]  # n_units → model with this layer's width replaced


def _replace(seq: Sequence, i: int, value: Any) -> tuple:
    out = list(seq)
    out[i] = value
    return tuple(out)


def _edges(model: nn.Module) -> dict[str, Edge]:
    """Shrinkable layers of ``model`` by name (``'dense_0'``, ``'conv_1'``, ``'block0_0/conv_0'``)."""
    edges: dict[str, Edge] = {}
    if isinstance(model, models.MLP):
        f = tuple(model.features)
        for i in range(len(f) - 1):
            edges[f"dense_{i}"] = Edge((f"dense_{i}",), None, (f"dense_{i + 1}",),
                                       lambda n, i=i: model.clone(features=_replace(f, i, n)))
    elif isinstance(model, models.LeNet5):
        w = tuple(model.widths)
        names = ("conv_0", "conv_1", "dense_0", "dense_1", "dense_2")
        for i in range(4):
            edges[names[i]] = Edge((names[i],), None, (names[i + 1],),
                                   lambda n, i=i: model.clone(widths=_replace(w, i, n)))
    elif isinstance(model, models.ConvNet):
        convs = tuple(model.widths) if model.widths is not None else tuple(
            v for v in models.CONV_CFGS.get(model.depth, ()) if v != "M")
        hidden = tuple(model.hidden)
        k = len(convs)
        for i in range(k):
            nxt = f"conv_{i + 1}" if i + 1 < k else "dense_0"
            edges[f"conv_{i}"] = Edge((f"conv_{i}",), None, (nxt,),
                                      lambda n, i=i: model.clone(widths=_replace(convs, i, n)))
        for j in range(len(hidden)):
            edges[f"dense_{j}"] = Edge((f"dense_{j}",), None, (f"dense_{j + 1}",),
                                       lambda n, j=j: model.clone(hidden=_replace(hidden, j, n)))
    elif isinstance(model, models.VGG):
        cfg = tuple(model.cfg)
        pos = [p for p, v in enumerate(cfg) if v != "M"]
        for i, p in enumerate(pos):
            nxt = f"conv_{i + 1}" if i + 1 < len(pos) else "dense_0"
            edges[f"conv_{i}"] = Edge((f"conv_{i}",), (f"bn_{i}",), (nxt,),
                                      lambda n, p=p: model.clone(cfg=_replace(cfg, p, n)))
    elif isinstance(model, models.ResNet):
        if (model.depth - 2) % 6 or model.depth < 8:
            raise ValueError(f"model: ResNet depth={model.depth} is not 6n+2")
        nb = (model.depth - 2) // 6
        widths = tuple(model.block_widths) if model.block_widths is not None else tuple(
            model.width * 2**s for s in range(3) for _ in range(nb))
        for s in range(3):
            for b in range(nb):
                blk, i = f"block{s}_{b}", s * nb + b
                edges[f"{blk}/conv_0"] = Edge((blk, "conv_0"), (blk, "bn_0"), (blk, "conv_1"),
                                              lambda n, i=i: model.clone(block_widths=_replace(widths, i, n)))
    else:
        raise TypeError(f"model: structured pruning supports jaxprune.models MLP, LeNet5, ConvNet, VGG and "
                        f"ResNet, got {type(model).__name__}")
    return edges


def prunable_layers(model: nn.Module, kind: str = "all") -> tuple[str, ...]:
    """Names of the layers :func:`remove_units` can shrink, in forward order; ``kind``: all, conv or dense."""
    if kind not in ("all", "conv", "dense"):
        raise ValueError(f"kind={kind!r}: expected 'all', 'conv' or 'dense'")
    names = tuple(_edges(model))
    if kind == "all":
        return names
    return tuple(n for n in names if ("conv" in n.rsplit("/", 1)[-1]) == (kind == "conv"))


def edge(model: nn.Module, layer: str) -> Edge:
    """The :class:`Edge` of a shrinkable ``layer``; a ValueError naming the shrinkable layers otherwise."""
    edges = _edges(model)
    if layer not in edges:
        out = getattr(model, "output_layer", None)
        why = ("it is the output layer" if layer == out else
               "a ResNet keeps residual widths aligned, so only block-internal conv_0 layers shrink"
               if isinstance(model, models.ResNet) else "no such shrinkable layer")
        raise ValueError(f"layer={layer!r}: cannot remove units ({why}); expected one of {tuple(edges)}")
    return edges[layer]


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
    """``{'kernel': …, ['bias': …]}`` of ``layer`` (``'conv_1'``, ``'block0_0/conv_0'``)."""
    try:
        return dict(get_path(variables["params"], layer.split("/")))
    except KeyError:
        raise ValueError(f"layer={layer!r}: not found in variables['params']") from None


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


def _consumer_take(kernel: Array, keep: np.ndarray, n: int, what: str) -> Array:
    """Keep input channels ``keep`` of the layer reading a width-``n`` output: conv ``(kh, kw, n, out)``, or dense
    ``(s·n, out)`` after a channel-last flatten (``s`` spatial positions; ``s = 1`` after global pooling)."""
    if kernel.ndim == 4:
        if kernel.shape[2] != n:
            raise ValueError(f"{what}: expects {kernel.shape[2]} input channels, the pruned layer has {n}; "
                             "cannot follow this shape")
        return kernel[:, :, keep, :]
    if kernel.ndim == 2 and kernel.shape[0] % n == 0:
        s = kernel.shape[0] // n
        return kernel.reshape(s, n, kernel.shape[1])[:, keep, :].reshape(s * keep.size, kernel.shape[1])
    raise ValueError(f"{what}: kernel of shape {kernel.shape} does not read a width-{n} layer; cannot follow "
                     "this shape")


def remove_units(model: nn.Module, variables: Variables, layer: str, keep: Array) -> tuple[nn.Module, Variables]:
    """Physically keep only units ``keep: (k,) int`` of ``layer``: its kernel/bias, the following BatchNorm's
    scale/bias and mean/var, and the next layer's input dimension. Returns ``(smaller model, its variables)``;
    the smaller network computes the same logits as ``model`` with the removed units masked
    (:func:`mask_units`)."""
    e = edge(model, layer)
    params = variables["params"]
    lp = layer_params(variables, layer)
    n = int(lp["kernel"].shape[-1])
    k = _check_keep(keep, n, layer)
    new_params = set_path(params, e.layer, {name: leaf[..., k] for name, leaf in lp.items()})
    new_vars = dict(variables)
    if e.bn is not None:
        bn = dict(get_path(params, e.bn))
        new_params = set_path(new_params, e.bn, {name: leaf[k] for name, leaf in bn.items()})
        if "batch_stats" not in variables:
            raise ValueError(f"variables: {layer!r} is followed by BatchNorm {'/'.join(e.bn)!r}; expected a "
                             "'batch_stats' collection")
        stats = dict(get_path(variables["batch_stats"], e.bn))
        new_vars["batch_stats"] = set_path(variables["batch_stats"], e.bn, {s: v[k] for s, v in stats.items()})
    cons = dict(get_path(params, e.consumer))
    cons["kernel"] = _consumer_take(cons["kernel"], k, n, f"next layer {'/'.join(e.consumer)!r}")
    new_params = set_path(new_params, e.consumer, cons)
    new_vars["params"] = new_params
    return e.rebuild(int(k.size)), new_vars


def mask_units(model: nn.Module, variables: Variables, layer: str, keep: Array) -> Variables:
    """Same shapes, units outside ``keep`` silenced: their kernel columns/filters and bias zeroed and, when a
    BatchNorm follows, its scale and offset zeroed too (so the unit's post-BN activation is exactly 0).

    ``keep: (k,) int`` is validated exactly as by :func:`remove_units` (unique integer indices in range; a boolean
    mask or float indices are refused), and the masked network computes the same logits as the shrunk one. The one
    difference: an empty ``keep`` is allowed here and silences the whole layer (e.g. one-shot unit pruning at
    100 % sparsity), while :func:`remove_units` refuses to build a zero-width layer."""
    e = edge(model, layer)
    lp = layer_params(variables, layer)
    n = int(lp["kernel"].shape[-1])
    k = _check_keep(keep, n, layer, allow_empty=True)
    on = jnp.zeros((n,), bool).at[k].set(True)
    zero = lambda leaf: jnp.where(on, leaf, jnp.zeros_like(leaf))
    params = set_path(variables["params"], e.layer, {name: zero(leaf) for name, leaf in lp.items()})
    if e.bn is not None:
        bn = dict(get_path(params, e.bn))
        params = set_path(params, e.bn, {name: zero(leaf) for name, leaf in bn.items()})
    return {**variables, "params": params}


# ----------------------------------------------------------------------------------------------- whole models
ScoreSource = str | Mapping[str, Array] | Callable[[str, dict], Array]


def select_layers(model: nn.Module, variables: Variables, n_keep: Mapping[str, int], criterion: ScoreSource,
                  *, key: Array | None = None) -> dict[str, Array]:
    """Kept indices for several layers at once, all scored on the *unpruned* ``variables``.

    ``criterion``: a weight criterion name (:data:`CRITERIA`), a dict ``layer → (n_units,)`` of data-driven
    scores (higher = kept), or a callable ``(layer, layer_params) -> (n_units,)`` scores.
    ``key`` (split per layer) is needed for ``random``.
    """
    if isinstance(criterion, str) and criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}: expected one of {CRITERIA}, a dict of scores or a callable")
    if criterion == "random" and key is None:
        raise ValueError("key: criterion='random' needs a jax.random key")
    keep = {}
    for i, (layer, nk) in enumerate(n_keep.items()):
        edge(model, layer)
        lp = layer_params(variables, layer)
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
    return keep


def remove_many(model: nn.Module, variables: Variables,
                keep: Mapping[str, Array]) -> tuple[nn.Module, Variables]:
    """Apply :func:`remove_units` for every ``layer → kept indices`` (indices refer to the original widths)."""
    for layer, k in keep.items():
        model, variables = remove_units(model, variables, layer, k)
    return model, variables


def widths(model: nn.Module, variables: Variables) -> dict[str, int]:
    """Current number of units of every shrinkable layer."""
    return {layer: int(layer_params(variables, layer)["kernel"].shape[-1]) for layer in prunable_layers(model)}


def count_flops(model: nn.Module, variables: Variables, input_shape: Sequence[int]) -> dict[str, Any]:
    """Multiply-accumulates of the conv and dense layers for one example of shape ``input_shape[1:]``:
    ``{'macs': int, 'flops': 2·macs, 'layers': {path: macs}}`` (BatchNorm, bias and pooling are not counted).

    A layer's MACs are its kernel size times its number of output positions (``h·w`` for a conv, 1 for dense).
    """
    x = jax.ShapeDtypeStruct((1,) + tuple(input_shape[1:]), jnp.float32)
    _, inter = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"]),
        variables, x)
    layers: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
        names = [str(getattr(p, "key", p)) for p in path]
        if names[-1] != "kernel" or leaf.ndim not in (2, 4):
            continue
        try:
            out = get_path(inter["intermediates"], names[:-1])["__call__"][0]
        except (KeyError, TypeError):
            continue
        positions = int(np.prod(out.shape[1:-1])) if len(out.shape) > 2 else 1
        layers["/".join(names[:-1])] = positions * int(np.prod(leaf.shape))
    macs = int(sum(layers.values()))
    return {"macs": macs, "flops": 2 * macs, "layers": layers}
