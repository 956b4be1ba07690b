"""Neuron merging (Kim et al. 2020, "Neuron Merging: Compensating for Pruned Neurons").

Structured pruning keeps ``k`` of a layer's ``n`` units. Merging also *compensates* for the others: when a pruned
unit is (nearly) a positive multiple of a kept one, ``w_p ≈ s·w_k`` with ``s > 0`` (bias included), then
``relu(w_p·x) ≈ s·relu(w_k·x)`` because ReLU is positively homogeneous, so the next layer can take the pruned unit's
outgoing weights, scaled by ``s``, into the kept unit's: ``V'_k = V_k + Σ_{p→k} s_p V_p``. In matrix form the layer's
outputs are ``h ≈ Zᵀ h_kept`` with ``Z (k, n)`` holding one non-zero entry per merged unit's column (positive,
except in the authors' ``bn_scale="paper"`` mode, which can merge through a negative scale); the next layer's
kernel becomes ``Z V``. Nothing here needs data or retraining.

A :class:`Decomposition` stores ``Z`` sparsely, as a pytree: the kept indices, and for every original unit the
position of the kept unit that absorbs it and its scale (1 for kept units, 0 for pruned units that are dropped).
Folding is a segment sum over the next layer's input axis (:func:`fold`), never a dense matrix.

* Dense layers and convolutions without BatchNorm (Algorithms 1–2): :func:`decompose_dense`. Each pruned unit goes
  to its most cosine-similar kept unit (bias appended to the vectors) with scale ``‖w_p‖ / ‖w_k‖``; it is dropped
  instead when that cosine is below ``threshold``.
* Convolution + BatchNorm (Algorithm 3): :func:`decompose_conv_bn`. Candidates are ranked by
  ``λ·(1 − cos) + (1 − λ)·d`` with ``d`` the BN bias mismatch normalised to [0, 1] over the candidates; the scale is
  ``s·(γ_p/γ_k)·(σ_k/σ_p)``, ``σ = √(var + eps)`` (``bn_scale="exact"``, derived in BUILD-notes.md), or the
  authors' inverted ratio with raw variances (``bn_scale="paper"``).
* ``mode="prune"`` (the authors' ``--model-type prune``) makes the same selection and drops every pruned unit.

Network level (:func:`merge`, :func:`merge_layer`) for any model whose graph (:mod:`jaxprune.graph`) shows the
layer followed by a bias or a BatchNorm and a positively homogeneous path (ReLU, pooling, flatten) to the layers
reading it — the library's models are ordinary users: decompose, fold into every consumer, then shrink with
:func:`jaxprune.structured.remove_units`. Layers are processed in forward order, each decomposed as it stands after
its predecessors were merged.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import conventions, graph, models, structured

Array = jax.Array
PyTree = Any

MODES = ("merge", "prune")
BN_SCALES = ("exact", "paper")
SCALES = ("norm", "projection")
DENSE_THRESHOLD = 0.45  # the paper's LeNet-300-100 scripts
CONV_BN_THRESHOLD = 0.1  # the paper's VGG-16 scripts
LAMBDA = 0.85
BN_EPSILON = conventions.BN_EPSILON  # the default of decompose_conv_bn (merge() reads each model's own)


class Decomposition(NamedTuple):
    """``Z`` of ``h ≈ Zᵀ h_kept`` for one layer of ``n`` units, ``k`` kept (a pytree of arrays).

    ``keep``: ``(k,) int32`` kept unit indices, ascending. ``target``: ``(n,) int32`` position in ``keep`` of the
    unit that absorbs unit ``j`` (a kept unit: its own position). ``scale``: ``(n,) float`` 1 for kept units,
    ``s ≠ 0`` for merged units, exactly 0 for dropped ones. ``s > 0`` except with ``bn_scale="paper"``, which (as the
    authors' code) can merge through a negative scale; :func:`fold` applies it and the unit counts as merged.
    ``cosine``: ``(n,) float`` cosine between unit ``j`` and its best
    candidate (1 for kept units; ``-inf`` where no candidate was eligible).
    """

    keep: Array
    target: Array
    scale: Array
    cosine: Array

    @property
    def kept(self) -> Array:
        """``(n,) bool``."""
        return jnp.zeros(self.target.shape, bool).at[self.keep].set(True)

    @property
    def merged(self) -> Array:
        """``(n,) bool``: pruned units folded into a kept one (non-zero scale, of either sign; see the class)."""
        return (self.scale != 0) & ~self.kept

    def matrix(self) -> Array:
        """The dense ``Z: (k, n)`` (for inspection and tests; :func:`fold` never builds it)."""
        k, n = self.keep.shape[0], self.target.shape[0]
        return jnp.zeros((k, n), self.scale.dtype).at[self.target, jnp.arange(n)].add(self.scale)


# ----------------------------------------------------------------------------------------------- validation
def _check_common(n_units: int, n_keep: int, threshold: float, mode: str, scale: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: expected one of {SCALES}")
    if isinstance(n_keep, bool) or not isinstance(n_keep, (int, np.integer)):
        raise TypeError(f"n_keep={n_keep!r}: expected an int (number of units kept)")
    if n_keep < 1:
        raise ValueError(f"n_keep={n_keep}: expected at least 1 kept unit (merging every unit away leaves "
                         "nothing to absorb them)")
    if n_keep > n_units:
        raise ValueError(f"n_keep={n_keep}: the layer has only {n_units} units")
    if not (isinstance(threshold, (int, float, np.floating)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold={threshold!r}: expected a finite number >= 0 (0: always merge; "
                         "> 1: never merge, i.e. plain pruning)")


def _check_keep(keep: Any, n_units: int, n_keep: int) -> Array:
    k = np.asarray(keep)
    if k.ndim != 1 or not np.issubdtype(k.dtype, np.integer):
        raise ValueError(f"keep: expected a 1-D integer array of kept unit indices, got shape {k.shape} {k.dtype}")
    if k.shape[0] != n_keep:
        raise ValueError(f"keep: {k.shape[0]} indices given but n_keep={n_keep}")
    if k.size and (k.min() < 0 or k.max() >= n_units):
        raise ValueError(f"keep: indices must lie in [0, {n_units}), got min {k.min()} max {k.max()}")
    if len(np.unique(k)) != k.shape[0]:
        raise ValueError("keep: indices must be distinct (a unit cannot be kept twice)")
    return jnp.asarray(np.sort(k), jnp.int32)


def _select(kernel: Array, n_keep: int, criterion: str, bias: Array | None, key: Array | None,
            keep: Any | None) -> Array:
    n = kernel.shape[-1]
    if keep is not None:
        return _check_keep(keep, n, n_keep)
    return jnp.asarray(structured.select_units(kernel, n_keep, criterion, bias=bias, key=key), jnp.int32)


# ----------------------------------------------------------------------------------------------- jitted cores
def _cosines(v: Array, keep: Array) -> tuple[Array, Array]:
    """``v: (n, d)`` → cosine to every kept unit ``(n, k)`` (0 against zero vectors) and norms ``(n,)``."""
    norms = jnp.linalg.norm(v, axis=1)
    u = v / jnp.where(norms > 0, norms, 1.0)[:, None]
    return u @ u[keep].T, norms


def _finish(keep: Array, best: Array, cos_best: Array, scale_best: Array, ok: Array,
            projection: bool) -> Decomposition:
    n, k = best.shape[0], keep.shape[0]
    if projection:  # least-squares s·w_k ≈ w_p over s >= 0: the norm ratio times max(cos, 0)
        scale_best = scale_best * jnp.clip(cos_best, 0.0, 1.0)
        ok &= scale_best > 0
    kept = jnp.zeros((n,), bool).at[keep].set(True)
    pos = jnp.zeros((n,), jnp.int32).at[keep].set(jnp.arange(k, dtype=jnp.int32))
    one = jnp.ones((), scale_best.dtype)
    return Decomposition(
        keep=keep,
        target=jnp.where(kept, pos, best.astype(jnp.int32)),
        scale=jnp.where(kept, one, jnp.where(ok & ~kept, scale_best, 0.0)),
        cosine=jnp.where(kept, one, cos_best))


def _passes(threshold: Array, cos: Array) -> Array:
    # threshold 0 merges every pruned unit that has an eligible candidate, whatever its cosine.
    return jnp.isfinite(cos) & ((threshold <= 0) | (cos >= threshold))


@functools.partial(jax.jit, static_argnames=("merge", "projection"))
def _assign_dense(v: Array, keep: Array, threshold: Array, merge: bool, projection: bool) -> Decomposition:
    cos, norms = _cosines(v, keep)
    nk = norms[keep]
    c = jnp.where((nk > 0)[None, :], cos, -jnp.inf)
    best = jnp.argmax(c, axis=1)  # first maximum: ties go to the lower kept index
    cb = jnp.take_along_axis(c, best[:, None], 1)[:, 0]
    scale = norms / jnp.where(nk[best] > 0, nk[best], 1.0)
    ok = _passes(threshold, cb) & (norms > 0) & merge
    return _finish(keep, best, cb, scale, ok, projection)


@functools.partial(jax.jit, static_argnames=("merge", "paper", "projection"))
def _assign_conv_bn(v: Array, keep: Array, gamma: Array, beta: Array, mean: Array, var: Array, eps: Array,
                    threshold: Array, lam: Array, merge: bool, paper: bool, projection: bool) -> Decomposition:
    cos, norms = _cosines(v, keep)
    nk = norms[keep]
    s = norms[:, None] / jnp.where(nk > 0, nk, 1.0)[None, :]  # (n, k): ‖w_p‖ / ‖w_k‖
    gp, bp, mp = gamma[:, None], beta[:, None], mean[:, None]
    gk, bk, mk = gamma[keep][None, :], beta[keep][None, :], mean[keep][None, :]
    if paper:  # the authors' code: inverted γ and σ ratios, σ = the raw running variance
        sp, sk = var[:, None], var[keep][None, :]
        scale = s * (gk / gp) * (sp / sk)
        off = jnp.abs((gk / sk) * (s * (mp - sp * bp / gp) - mk) + bk)
    else:  # BN_p(s·u) = S·BN_k(u) + b, see BUILD-notes.md (neuron merging)
        sd = jnp.sqrt(var + eps)
        sp, sk = sd[:, None], sd[keep][None, :]
        scale = s * (gp / gk) * (sk / sp)
        off = jnp.abs(bp - scale * bk + gp * (s * mk - mp) / sp)
    dist = off / scale  # the offset in units of the kept unit's output: relu(S·y + b) = S·relu(y + b/S)
    eligible = (nk > 0)[None, :] & jnp.isfinite(scale) & jnp.isfinite(dist)
    if not paper:
        eligible &= scale > 0  # relu(S·y) = S·relu(y) needs S > 0
    lo = jnp.min(jnp.where(eligible, dist, jnp.inf), axis=1, keepdims=True)
    hi = jnp.max(jnp.where(eligible, dist, -jnp.inf), axis=1, keepdims=True)
    span = hi - lo
    # Guard the 0/0 of min-max scaling when all candidates tie (the authors' code gets NaN and picks index 0).
    nd = jnp.where(span > 0, (dist - lo) / jnp.where(span > 0, span, 1.0), 0.0)
    score = jnp.where(eligible, lam * (1.0 - cos) + (1.0 - lam) * nd, jnp.inf)
    best = jnp.argmin(score, axis=1)
    cb = jnp.where(jnp.isfinite(jnp.take_along_axis(score, best[:, None], 1)[:, 0]),
                   jnp.take_along_axis(cos, best[:, None], 1)[:, 0], -jnp.inf)
    sb = jnp.take_along_axis(scale, best[:, None], 1)[:, 0]
    ok = _passes(threshold, cb) & (norms > 0) & merge
    return _finish(keep, best, cb, sb, ok, projection)


# ----------------------------------------------------------------------------------------------- decompositions
def decompose_dense(kernel: Array, n_keep: int, *, bias: Array | None = None, criterion: str = "l1",
                    threshold: float = DENSE_THRESHOLD, mode: str = "merge", scale: str = "norm",
                    key: Array | None = None, keep: Any | None = None) -> Decomposition:
    """Algorithms 1–2 for a layer without BatchNorm.

    ``kernel``: dense ``(in, n)`` or conv ``(kh, kw, cin, n)``; ``bias``: ``(n,)`` or None (appended to the unit
    vectors for selection and similarity). ``criterion``: a :func:`jaxprune.structured.select_units` criterion;
    ``keep``: explicit kept indices ``(n_keep,)`` instead (e.g. from ``structured.select_by_scores``).
    ``threshold``: a pruned unit is merged when its best cosine is ``>= threshold``; 0 always merges, > 1 never.
    ``scale``: ``"norm"`` (the paper: ``‖w_p‖/‖w_k‖``) or ``"projection"`` (``cos·‖w_p‖/‖w_k‖``, the
    least-squares scale, which shrinks the compensation of poorly matched units).
    """
    kernel = jnp.asarray(kernel)
    _check_common(kernel.shape[-1], n_keep, threshold, mode, scale)
    keep = _select(kernel, n_keep, criterion, bias, key, keep)
    v = structured.unit_vectors(kernel, bias)
    return _assign_dense(v, keep, jnp.asarray(threshold, v.dtype), mode == "merge", scale == "projection")


def decompose_conv_bn(kernel: Array, n_keep: int, *, gamma: Array, beta: Array, mean: Array, var: Array,
                      eps: float = BN_EPSILON, criterion: str = "l1", threshold: float = CONV_BN_THRESHOLD,
                      lam: float = LAMBDA, bn_scale: str = "exact", mode: str = "merge", scale: str = "norm",
                      key: Array | None = None, keep: Any | None = None) -> Decomposition:
    """Algorithm 3 for a conv ``(kh, kw, cin, n)`` (no bias) followed by BatchNorm (``gamma, beta, mean, var: (n,)``).

    ``lam`` weighs the cosine distance against the normalised BN offset mismatch; ``bn_scale`` is ``"exact"``
    (``s·(γ_p/γ_k)·(σ_k/σ_p)``, ``σ = √(var + eps)``) or ``"paper"`` (the authors' code: ``s·(γ_k/γ_p)·(v_p/v_k)``
    with raw variances ``v``). Exact mode never merges through a non-positive scale (``γ_p/γ_k < 0``); paper mode
    can (a negative ``scale``, reported as merged by :attr:`Decomposition.merged` and :func:`summary`).
    ``scale="projection"`` multiplies the chosen scale by ``max(cos, 0)`` (see :func:`decompose_dense`).
    """
    kernel = jnp.asarray(kernel)
    n = kernel.shape[-1]
    _check_common(n, n_keep, threshold, mode, scale)
    if bn_scale not in BN_SCALES:
        raise ValueError(f"bn_scale={bn_scale!r}: expected one of {BN_SCALES}")
    if not (isinstance(lam, (int, float, np.floating)) and 0 <= lam <= 1):
        raise ValueError(f"lam={lam!r}: expected a number in [0, 1] (weight of the cosine distance)")
    if not (isinstance(eps, (int, float, np.floating)) and eps >= 0):
        raise ValueError(f"eps={eps!r}: expected the BatchNorm epsilon (>= 0)")
    stats = {"gamma": gamma, "beta": beta, "mean": mean, "var": var}
    for name, x in stats.items():
        if jnp.shape(x) != (n,):
            raise ValueError(f"{name}: expected shape ({n},) (one per output channel), got {jnp.shape(x)}")
    keep = _select(kernel, n_keep, criterion, None, key, keep)
    v = structured.unit_vectors(kernel)
    dt = v.dtype
    return _assign_conv_bn(v, keep, *(jnp.asarray(stats[k], dt) for k in ("gamma", "beta", "mean", "var")),
                           jnp.asarray(eps, dt), jnp.asarray(threshold, dt), jnp.asarray(lam, dt),
                           merge=mode == "merge", paper=bn_scale == "paper", projection=scale == "projection")


def summary(dec: Decomposition) -> dict:
    """What merged: counts, how many units the busiest kept unit absorbed, mean cosine and scale of merges."""
    merged = np.asarray(dec.merged)
    n, k = int(dec.target.shape[0]), int(dec.keep.shape[0])
    absorbed = np.bincount(np.asarray(dec.target)[merged], minlength=k) if k else np.zeros(0)
    cos, scale = np.asarray(dec.cosine)[merged], np.asarray(dec.scale)[merged]
    return {"units": n, "kept": k, "merged": int(merged.sum()), "dropped": n - k - int(merged.sum()),
            "max_absorbed": int(absorbed.max()) if absorbed.size else 0,
            "mean_cosine": float(cos.mean()) if cos.size else None,
            "mean_scale": float(scale.mean()) if scale.size else None}


# ----------------------------------------------------------------------------------------------- folding
def fold(w: Array, dec: Decomposition, axis: int = 0) -> Array:
    """``Z`` folded into the next layer's weights: ``w`` with ``n`` entries on ``axis`` → ``k`` entries.

    Row ``i`` of the result is ``Σ_j scale_j · w_j`` over units ``j`` with ``target_j = i`` (a segment sum).
    """
    n = dec.target.shape[0]
    if w.shape[axis] != n:
        raise ValueError(f"fold: w has {w.shape[axis]} entries on axis {axis}, the decomposition {n} units")
    x = jnp.moveaxis(w, axis, 0)
    y = jax.ops.segment_sum(dec.scale.astype(x.dtype).reshape((n,) + (1,) * (x.ndim - 1)) * x, dec.target,
                            num_segments=dec.keep.shape[0])
    return jnp.moveaxis(y, 0, axis)


# ----------------------------------------------------------------------------------------------- network level
# The wiring (which BatchNorm follows a layer, which layers read it) is the model's graph (jaxprune.graph), the one
# structured pruning uses, so merging and physical removal can never disagree about the topology.
def mergeable_layers(model: Any, *, variables: PyTree = None, x: Any = None) -> tuple[str, ...]:
    """Layers :func:`merge` accepts, in forward order, read from the model's graph: layers
    :func:`jaxprune.structured.remove_units` can shrink alone (not output layers, nor layers whose outputs are summed
    with a residual) whose path to the layers reading them is positively homogeneous (ReLU, pooling, reshapes; not
    sigmoid, nor a BatchNorm after the activation) and whose chain is a bias or a BatchNorm."""
    variables = structured._need(model, variables, x, "mergeable_layers")
    g = _graph(model, variables, x)
    return tuple(n for n in g.prunable() if _merge_refusal(g, n) is None)


def _merge_refusal(g: graph.Graph, layer: str) -> str | None:
    """Why :func:`merge` refuses ``layer`` (the error :func:`_link` raises), or None."""
    try:
        _link(g, layer)
    except ValueError as e:
        return str(e)
    return None


def _graph(model: Any, variables: PyTree, x: Any = None) -> graph.Graph:
    return graph.build(model, variables, graph.example_input(model, variables, x))


def homogeneous(g: graph.Graph, layer: str) -> bool:
    """True when every path from ``layer``'s pre-activation to the next linear layers passes only positively
    homogeneous ops (ReLU, max/average pooling, data movement, sums, scaling by constants): ``f(s·v) = s·f(v)`` for
    ``s > 0``, which lets a kept unit stand in for a merged one."""
    prog = g.program
    todo, seen = [g.layers[layer].out], set()
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        for k in g.uses.get(v, []):
            e, kind = prog.eqns[k], g.kinds[k]
            if kind == "linear":
                continue
            scaling = kind == "affine" and e.name in ("mul", "div") and all(isinstance(a, tuple) for a in e.ins
                                                                             if a is not v)
            if not (_is_relu(e) if kind == "activation" else kind in ("move", "pool") or scaling or (
                    kind == "reduce" and e.name == "reduce_sum")):
                return False
            todo.extend(e.outs)
    return True


def _is_relu(e) -> bool:
    """``max(x, 0)``, directly or as a call whose program is only that (``jax.nn.relu``)."""
    if e.name == "max":
        return any(isinstance(a, tuple) and float(np.asarray(a[1])) == 0.0 for a in e.ins)
    inner = graph.ops.inner_jaxpr(e)
    eqns = list(inner.eqns) if inner is not None else []
    while len(eqns) == 1 and eqns[0].primitive.name in graph.program._INLINE:
        eqns = list(eqns[0].params["jaxpr"].jaxpr.eqns)
    return (len(eqns) == 1 and eqns[0].primitive.name == "max"
            and any(hasattr(v, "val") and float(np.asarray(v.val)) == 0.0 for v in eqns[0].invars))


def _link(g: graph.Graph, layer: str) -> graph.Layer:
    """The graph layer of a mergeable ``layer``; a clear error for anything else."""
    l = g.layer(layer)
    why = g.why_not_prunable(layer)
    if why is not None:
        extra = (": it is an output layer, its units are the logits and no later layer could absorb them"
                 if why == graph.OUTPUT else
                 f" ({why})")
        raise ValueError(f"layer={layer!r} cannot be merged{extra}; mergeable layers: {g.prunable()}")
    if not homogeneous(g, layer):
        raise ValueError(f"layer={layer!r}: merging needs the path to the layers reading it to be positively "
                         "homogeneous (ReLU, max/average pooling, reshapes): relu(s·v) = s·relu(v) for s > 0 is what "
                         "lets a kept unit stand in for a pruned one")
    if l.chain and l.bn is None and l.bias is None:
        raise ValueError(f"layer={layer!r}: merging supports a bias or a BatchNorm after the layer; its per-channel "
                         "chain is another affine map")
    return l


def decompose_layer(model: Any, variables: PyTree, layer: str, n_keep: int, *, mode: str = "merge",
                    criterion: str = "l1", threshold: float | None = None, lam: float = LAMBDA,
                    bn_scale: str = "exact", scale: str = "norm", key: Array | None = None,
                    keep: Any | None = None, x: Any = None) -> Decomposition:
    """The decomposition of one mergeable layer of any model (``threshold=None``: 0.45 without BatchNorm, 0.1 with
    it, the paper's settings). The BatchNorm after a layer (and its epsilon) is read from the model's graph."""
    g = _graph(model, variables, x)
    l = _link(g, layer)
    leaves = g.net.leaves
    unit = structured.unit_params(g, layer)
    kernel = unit["kernel"]
    bn = l.bn
    if bn is None:
        return decompose_dense(kernel, n_keep, bias=unit.get("bias"), criterion=criterion,
                               threshold=DENSE_THRESHOLD if threshold is None else threshold, mode=mode,
                               scale=scale, key=key, keep=keep)
    ones = jnp.ones((l.units,), kernel.dtype)
    gamma = ones if bn["scale"] is None else leaves[bn["scale"]]
    beta = 0 * ones if bn["bias"] is None else leaves[bn["bias"]]
    mean = leaves[bn["mean"]]
    if bn.get("layer_bias") is not None:  # BN(conv(x) + c) normalises with mean − c
        mean = mean - leaves[bn["layer_bias"]]
    return decompose_conv_bn(kernel, n_keep, gamma=gamma, beta=beta, mean=mean, var=leaves[bn["var"]],
                             eps=float(bn["epsilon"]), criterion=criterion,
                             threshold=CONV_BN_THRESHOLD if threshold is None else threshold, lam=lam,
                             bn_scale=bn_scale, mode=mode, scale=scale, key=key, keep=keep)


def _fold_slice(w: Array, axis: int, ids: np.ndarray, units: np.ndarray, dec: Decomposition, what: str) -> Array:
    """Fold ``dec`` into the entries of ``w``'s ``axis`` that hold the layer's units (``ids`` per entry, ``units``
    the layer's unit ids in order); entries are laid out as ``s`` repeats of the ``n`` units (a flatten tiles them,
    channel fastest). Kept units' entries become ``Σ s_j w_j``; pruned entries are left for removal."""
    n = units.size
    pos = np.flatnonzero(np.isin(ids, units))
    if pos.size % n or not np.array_equal(ids[pos].reshape(-1, n), np.tile(units, (pos.size // n, 1))):
        raise ValueError(f"{what}: reads the merged layer's units in a layout other than repeats of all of them; "
                         "cannot fold")
    x = jnp.moveaxis(w, axis, 0)
    grid = pos.reshape(-1, n)  # (s, n)
    sub = x[jnp.asarray(grid)]  # (s, n, ...)
    folded = jax.vmap(lambda rows: fold(rows, dec, 0))(sub)  # (s, k, ...)
    x = x.at[jnp.asarray(grid[:, np.asarray(dec.keep)])].set(folded)
    return jnp.moveaxis(x, 0, axis)


def fold_into_consumers(g: graph.Graph, layer: str, dec: Decomposition) -> list[Array]:
    """The variables' leaves with ``dec`` folded into every layer reading ``layer`` (full size)."""
    l = g.layer(layer)
    if dec.target.shape[0] != l.units:
        raise ValueError(f"layer {layer!r} has {l.units} units, the decomposition {dec.target.shape[0]}")
    units = g.unit_ids[layer]
    cls = g.cls
    mine = set(cls[units].tolist())
    consumer_axes = {(c.kernel, c.in_axis) for c in g.layers.values()}
    leaves = list(g.net.leaves)
    for leaf, axis, ids in g.slices:
        if not set(cls[ids].tolist()) & mine or (leaf, axis) == (l.kernel, l.out_axis):
            continue
        if (leaf, axis) not in consumer_axes:
            continue  # the layer's own bias / BatchNorm entries: removed with the pruned units
        canon = {int(cls[u]): int(u) for u in units}
        leaves[leaf] = _fold_slice(leaves[leaf], axis, np.asarray([canon.get(int(cls[i]), -1) for i in ids]),
                                   units, dec, f"layer reading {layer!r} ({g.net.paths[leaf]})")
    return leaves


def fold_params(params: PyTree, layer: str, consumer: str, dec: Decomposition) -> PyTree:
    """``params`` with ``dec`` folded into ``consumer``'s kernel, full size (linen params of a dense or conv
    consumer reading ``layer`` directly or through a channel-last flatten; paths such as ``'block0_0/conv_1'``).

    The kept units' incoming rows of ``consumer`` become ``Σ s_j V_j``; pruned rows and ``layer`` itself are left
    as they are, for :func:`jaxprune.structured.remove_units` (or masking) to remove.
    """
    if consumer == layer:
        raise ValueError(f"consumer={consumer!r}: a layer cannot be merged into itself; the consumer is the layer "
                         "reading this layer's outputs")
    variables = {"params": params}
    produced = structured.layer_params(variables, layer)["kernel"].shape[-1]
    if produced != dec.target.shape[0]:
        raise ValueError(f"layer {layer!r} has {produced} units, the decomposition {dec.target.shape[0]}")
    cons = structured.layer_params(variables, consumer)
    kernel = cons["kernel"]
    n = dec.target.shape[0]
    axis = 2 if kernel.ndim == 4 else 0
    if kernel.shape[axis] % n:
        raise ValueError(f"consumer kernel of shape {kernel.shape} cannot take the {n} units of the merged layer")
    ids = np.tile(np.arange(n), kernel.shape[axis] // n)
    cons["kernel"] = _fold_slice(kernel, axis, ids, np.arange(n), dec, f"consumer {consumer!r}")
    return structured.set_path(params, consumer.split("/"), cons)


def apply(model: Any, variables: PyTree, layer: str, dec: Decomposition, *, x: Any = None) -> tuple[Any, PyTree]:
    """Fold ``dec`` into the layers reading ``layer`` and physically remove the pruned units: the smaller model and
    its variables."""
    spec = graph.example_input(model, variables, x)
    g = graph.build(model, variables, spec)
    _link(g, layer)
    folded = g.net.with_leaves(fold_into_consumers(g, layer, dec))
    return structured.remove_units(model, folded, layer, dec.keep, x=spec)


def merge_layer(model: Any, variables: PyTree, layer: str, n_keep: int,
                **kwargs) -> tuple[Any, PyTree, Decomposition]:
    """:func:`decompose_layer` then :func:`apply`: ``(new_model, new_variables, decomposition)``."""
    dec = decompose_layer(model, variables, layer, n_keep, **kwargs)
    new_model, new_variables = apply(model, variables, layer, dec, x=kwargs.get("x"))
    return new_model, new_variables, dec


class Merged(NamedTuple):
    model: Any
    variables: PyTree
    decompositions: dict[str, Decomposition]
    report: dict[str, dict]  # layer → summary()


def merge(model: Any, variables: PyTree, widths: Mapping[str, int], *, mode: str = "merge",
          criterion: str = "l1", threshold: float | None = None, lam: float = LAMBDA, bn_scale: str = "exact",
          scale: str = "norm", key: Array | None = None, keep: Mapping[str, Any] | None = None,
          x: Any = None) -> Merged:
    """Merge (or prune) several layers to the given widths ``{layer: n_keep}``, in forward order, each decomposed
    as it stands after its predecessors were merged.

    ``keep``: optional explicit kept indices per layer (e.g. from data-driven scores); ``key`` is split per layer
    (needed by the ``random``/``kmeans`` criteria). ``x``: an example input (default: inferred).
    """
    spec = graph.example_input(model, variables, x)
    g = graph.build(model, variables, spec)
    for layer in widths:
        _link(g, layer)
    for layer in keep or {}:
        if layer not in widths:
            raise ValueError(f"keep: layer {layer!r} is not in widths {list(widths)}")
    decs: dict[str, Decomposition] = {}
    for i, layer in enumerate(l for l in g.layers if l in widths):
        k = None if key is None else jax.random.fold_in(key, i)
        model, variables, dec = merge_layer(model, variables, layer, widths[layer], mode=mode, criterion=criterion,
                                            threshold=threshold, lam=lam, bn_scale=bn_scale, scale=scale, key=k,
                                            keep=(keep or {}).get(layer), x=spec)
        decs[layer] = dec
    return Merged(model, variables, decs, {layer: summary(d) for layer, d in decs.items()})


def widths_for_ratio(model: Any, variables: PyTree, ratio: float, layers: Sequence[str] | None = None, *,
                     x: Any = None) -> dict[str, int]:
    """``{layer: n − ceil(ratio·n)}`` (at least 1; :func:`jaxprune.conventions.n_to_prune`) for the given
    (default: all mergeable) layers.

    ``variables``: the model's variables (bare linen params are accepted when ``layers`` is given)."""
    if not (isinstance(ratio, (int, float, np.floating)) and 0 <= ratio < 1):
        raise ValueError(f"ratio={ratio!r}: expected the fraction of units pruned, in [0, 1)")
    if isinstance(variables, Mapping) and "params" not in variables and not graph._is_nnx_graphdef(model):
        variables = {"params": variables}
    if layers is None:
        g = _graph(model, variables, x)
        chosen = list(g.prunable())
        sizes = {layer: g.layers[layer].units for layer in chosen}
    else:
        chosen = list(layers)
        try:
            sizes = {layer: int(structured.layer_params(variables, layer)["kernel"].shape[-1]) for layer in chosen}
        except ValueError:
            g = _graph(model, variables, x)
            sizes = {layer: g.layer(layer).units for layer in chosen}
    return {layer: max(1, structured.n_keep_for(n, ratio)) for layer, n in sizes.items()}


def widths_from_cfg(model: nn.Module, cfg: Sequence) -> dict[str, int]:
    """VGG: a pruned cfg (conv widths, ``"M"`` entries ignored) → ``{conv_i: width}``, e.g. the paper's VGG-16
    ``[32, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 256, 256, 256, 'M', 256, 256, 256]``."""
    if not isinstance(model, models.VGG):
        raise ValueError(f"widths_from_cfg: expected a VGG model, got {type(model).__name__}")
    convs = [f"conv_{i}" for i, v in enumerate(v for v in model.cfg if v != "M")]
    widths = [int(v) for v in cfg if str(v) != "M"]
    if len(widths) != len(convs):
        raise ValueError(f"cfg: {len(widths)} conv widths given, the model has {len(convs)} convs")
    return dict(zip(convs, widths))
