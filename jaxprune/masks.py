"""Mask pytrees over parameters: select prunable leaves, rank, prune, apply, report; the masked optimizer.

* A **mask** has the structure of the params; every leaf is a bool array of the leaf's shape (non-prunable
  leaves are all ``True``).
* A **prunable** tree has the same structure with Python ``bool`` leaves saying which leaves may be pruned.
* Pruning removes a *fraction of the remaining* prunable weights with exact counts: ``ceil(fraction · remaining)``
  (OpenLTH's rounding), either over all prunable leaves at once (``scope="global"``, raw scores compared across
  layers) or per leaf (``scope="layerwise"``). Ties are broken deterministically, as for units
  (``jaxprune.conventions``): among equal scores the weight that comes first in flattening order (leaf order, then
  row-major) is kept, the later one pruned first.
* Two backends give the same masks: ``"host"`` (numpy, on concrete arrays) and ``"jax"`` (XLA, no sort;
  jittable: under ``jit``/``vmap`` close over ``prunable``, ``fraction`` and ``scope``); ``"auto"`` picks ``"jax"``
  exactly when the scores or the mask are traced.
* Trees may be any pytrees: Flax linen ``params`` dicts, plain dicts ``{"w": (3, 4), "b": (4,)}``, NNX ``State``s
  (``nnx.state(model, nnx.Param)``; paths read ``"fc1/kernel"``, the ``Variable``'s ``value`` key dropped) and the
  state of an ``nnx.Optimizer`` over :func:`masked`. Trees are compared up to NNX ``Variable`` wrappers, so a mask
  may be a pure (``nnx.as_pure``) state of a params ``State``.
"""
from __future__ import annotations

import functools
import math
import re
import sys
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import _compat, _validate, conventions

PyTree = Any
Array = jax.Array
SCOPES = ("global", "layerwise")
BACKENDS = ("auto", "host", "jax")


def _variable_types() -> tuple[type, ...]:
    """``(nnx.Variable,)`` once ``flax.nnx`` is imported, ``()`` before (then no tree can hold one), so this module
    does not import flax. (Since flax 0.12 ``VariableState`` is a deprecated alias of ``Variable``.)"""
    nnx = sys.modules.get("flax.nnx")
    variable = getattr(nnx, "Variable", None) if nnx is not None else None
    return (variable,) if isinstance(variable, type) else ()


def _unwrap(x: Any) -> Any:
    """An NNX ``Variable``'s value; anything else unchanged."""
    types = _variable_types()
    if types and isinstance(x, types):
        return _compat.variable_value(x)
    return x


def _pure(tree: PyTree) -> PyTree:
    """``tree`` with every NNX ``Variable`` replaced by its value: the structure trees are compared by."""
    types = _variable_types()
    if not types:
        return tree
    return jax.tree_util.tree_map(_unwrap, tree, is_leaf=lambda x: isinstance(x, types))


def path_str(path: tuple) -> str:
    """``(DictKey('dense_0'), DictKey('kernel'))`` → ``"dense_0/kernel"``; an NNX ``Variable``'s trailing
    ``GetAttrKey('value')`` is dropped (``fc1/kernel/value`` → ``"fc1/kernel"``)."""
    path = tuple(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def default_prunable(path: str, leaf: Array) -> bool:
    """Floating arrays with ``ndim >= 2``, whatever their names (OpenLTH / jaxpruner): dense and conv kernels,
    embeddings; not biases, norm scales/offsets or statistics (1-D), nor integer leaves (step counts, RNG state).
    ``leaf``: an array, a ``jax.ShapeDtypeStruct`` or an NNX ``Variable`` (its value is read); ``path`` unused."""
    x = _unwrap(leaf)
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        x = np.asarray(x)
        shape, dtype = x.shape, x.dtype
    return len(shape) >= 2 and bool(jnp.issubdtype(dtype, jnp.floating))


def compile_patterns(exclude: Iterable[str]) -> list[re.Pattern]:
    """The ``exclude`` regexes compiled; a ValueError naming the one that is not a regular expression."""
    out = []
    for pattern in exclude:
        try:
            out.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"exclude: {pattern!r} is not a regular expression ({e})") from None
    return out


def prunable_leaves(params: PyTree, predicate: Callable[[str, Array], bool] = default_prunable,
                    exclude: Iterable[str] = (), biases: bool = False) -> PyTree:
    """Tree of Python bools: ``predicate(path, leaf)`` and no ``exclude`` regex matches the path.

    ``exclude=("dense_2",)`` leaves the output layer of an MLP(300, 100, 10) unpruned; patterns are
    ``re.search``-ed against paths such as ``"dense_2/kernel"`` (NNX: ``"head/kernel"``). ``biases=True`` also
    makes the ``bias`` of every module whose ``kernel`` is prunable (chosen by ``predicate`` and not excluded)
    prunable, ranked with the weights as pruning code that selects parameters by layer name does; the bias of an
    excluded kernel, and BatchNorm offsets, which sit beside no kernel, stay unpruned. The result has the
    structure of ``params`` (NNX ``Variable``s hold the bools).
    """
    pats = compile_patterns(exclude)
    excluded = lambda path: any(r.search(path) for r in pats)
    leaves = [(path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params)]
    # modules whose kernel is prunable (after ``exclude``): only their biases may be pruned with them
    with_kernel = {path.rpartition("/")[0] for path, x in leaves
                   if biases and path.endswith("/kernel") and predicate(path, x) and not excluded(path)}

    def prunable(path: str, leaf: Array) -> bool:
        head, _, name = path.rpartition("/")
        chosen = bool(predicate(path, leaf)) or (name == "bias" and head in with_kernel)
        return chosen and not excluded(path)

    tree = jax.tree_util.tree_map_with_path(lambda p, x: prunable(path_str(p), x), params)
    if not any(jax.tree_util.tree_leaves(tree)):
        raise ValueError(f"prunable_leaves: no leaf is prunable (exclude={list(exclude)}); "
                         f"paths are {[path for path, _ in leaves]}")
    return tree


def ones_like(params: PyTree) -> PyTree:
    """The dense mask."""
    return jax.tree_util.tree_map(lambda x: jnp.ones(jnp.shape(x), bool), params)


def check_trees(params: PyTree | None = None, mask: PyTree | None = None, prunable: PyTree | None = None, *,
                params_name: str = "params") -> None:
    """Refuse trees that do not belong together: a ValueError naming the argument and the offending leaf path.

    Pass the trees a function takes (``None``: not given); the first one given is the reference structure.
    ``params`` (named ``params_name``, e.g. ``"scores"``): array leaves. ``mask``: the same structure, bool leaves
    of the params' shapes. ``prunable``: the same structure, Python-bool leaves, at least one ``True``. Only static
    properties (tree structure, shapes, dtypes) are read, so this is safe on traced values inside ``jit``/``vmap``.
    """
    given = [(n, t) for n, t in ((params_name, params), ("mask", mask), ("prunable", prunable)) if t is not None]
    ref_name, ref = given[0]
    for name, tree in given[1:]:
        _check_structure(ref_name, ref, name, tree)
    if mask is not None:
        for path, m in jax.tree_util.tree_leaves_with_path(mask):
            dtype = getattr(m, "dtype", None) or np.asarray(m).dtype
            if dtype != bool:
                raise ValueError(f"mask: leaf {path_str(path)!r} has dtype {dtype}; expected bool (True = kept)")
        if params is not None:
            for (path, p), m in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(mask)):
                if np.shape(m) != np.shape(p):
                    raise ValueError(f"mask: leaf {path_str(path)!r} has shape {np.shape(m)}; expected "
                                     f"{np.shape(p)}, the shape of that leaf of {params_name}")
    if prunable is not None:
        flags = jax.tree_util.tree_leaves_with_path(prunable)
        for path, p in flags:
            if not isinstance(p, (bool, np.bool_)):
                traced = " (traced: close over prunable under jit)" if isinstance(p, jax.core.Tracer) else ""
                raise ValueError(f"prunable: leaf {path_str(path)!r} has type {type(p).__name__}{traced}; expected a "
                                 "Python bool per leaf (see prunable_leaves)")
        if not any(p for _, p in flags):
            raise ValueError(f"prunable: no leaf is prunable (paths {[path_str(q) for q, _ in flags]}); expected "
                             "at least one True leaf (see prunable_leaves)")


def _check_structure(ref_name: str, ref: PyTree, name: str, tree: PyTree) -> None:
    """Same structure up to NNX ``Variable`` wrappers (a ``Param`` and an ``OptVariable`` holding the same
    leaf match), else a ValueError naming the first missing or extra leaf path."""
    a, b = jax.tree_util.tree_structure(ref), jax.tree_util.tree_structure(tree)
    if a == b:
        return
    a, b = jax.tree_util.tree_structure(_pure(ref)), jax.tree_util.tree_structure(_pure(tree))
    if a == b:
        return
    pa = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(ref)]
    pb = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    missing = [p for p in pa if p not in set(pb)]
    extra = [p for p in pb if p not in set(pa)]
    if missing:
        raise ValueError(f"{name}: has no leaf {missing[0]!r}; expected the structure of {ref_name} "
                         f"(leaves {pa})")
    if extra:
        raise ValueError(f"{name}: leaf {extra[0]!r} is not in {ref_name}; expected the structure of {ref_name} "
                         f"(leaves {pa})")
    raise ValueError(f"{name}: the leaf paths of {ref_name} but other containers ({b}); expected {a}")


def _map(f: Callable, tree: PyTree, other: PyTree, names: tuple[str, str] = ("params", "mask")) -> PyTree:
    """``f(leaf, other_leaf)`` over two trees of one structure up to NNX ``Variable`` wrappers (checked; errors
    use ``names``), rebuilt in ``tree``'s containers."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    _check_structure(names[0], tree, names[1], other)
    return treedef.unflatten([f(a, b) for a, b in zip(leaves, jax.tree_util.tree_leaves(other))])


def apply_mask(params: PyTree, mask: PyTree) -> PyTree:
    """Zero the pruned weights (keeps dtypes and ``params``' containers). ``mask``: bool leaves of the params'
    shapes."""
    check_trees(params, mask)
    return _map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, mask)


def _check(fraction: float, scope: str, backend: str = "auto") -> None:
    _validate.fraction(fraction, what="a fraction of the remaining weights")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: expected one of {SCOPES}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")


def prune_by_score(scores: PyTree, mask: PyTree, prunable: PyTree, fraction: float,
                   scope: str = "global", backend: str = "auto") -> PyTree:
    """Remove the ``ceil(fraction · remaining)`` surviving prunable weights with the lowest ``scores``.

    ``scores``: finite values, ``mask``: bools, both shaped like the params. Returns the new mask (the structure of
    ``scores``); non-prunable leaves unchanged. ``backend``: ``"host"`` (numpy; concrete arrays only), ``"jax"``
    (XLA; jittable) or ``"auto"`` (``"jax"`` when ``scores`` or ``mask`` are traced); all give the same
    mask. Non-finite survivors are refused (ValueError naming the leaf) unless traced, where values cannot be read:
    there NaN ranks above +inf (pruned last).
    """
    check_trees(scores, mask, prunable, params_name="scores")
    return _prune(scores, mask, prunable, fraction, scope, "scores", backend)


def _count(fraction: float, remaining: np.ndarray) -> np.ndarray:
    """``ceil(fraction · remaining)`` per entry (int64 array): :func:`jaxprune.conventions.n_to_prune`, the one
    count formula of both backends."""
    return np.asarray(conventions.n_to_prune(fraction, remaining), np.int64)


def _traced(leaves: list) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in leaves)


def _prune(scores: PyTree, mask: PyTree, prunable: PyTree, fraction: float, scope: str, name: str,
           backend: str = "auto") -> PyTree:
    """:func:`prune_by_score` on checked trees; ``name``: what the scores are called in errors."""
    _check(fraction, scope, backend)
    s_leaves, treedef = jax.tree_util.tree_flatten(scores)
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(scores)]
    m_leaves = jax.tree_util.tree_leaves(mask)  # the same order: check_trees compared the structures
    p_leaves = jax.tree_util.tree_leaves(prunable)
    idx = [i for i, p in enumerate(p_leaves) if p]
    groups = (tuple(idx),) if scope == "global" else tuple((i,) for i in idx)
    traced = _traced(s_leaves) or _traced(m_leaves)
    if backend == "host" and traced:
        raise ValueError(f"backend='host': {name} or mask are traced (inside jit/vmap); expected concrete arrays, "
                         "or backend='jax' / 'auto'")
    if backend == "jax" or traced:
        if not traced:
            _refuse_non_finite_jax(s_leaves, m_leaves, idx, paths, name)
        pos = {i: j for j, i in enumerate(idx)}  # leaf index → position among the prunable leaves
        new = _prune_jax(tuple(s_leaves[i] for i in idx), tuple(m_leaves[i] for i in idx),
                         tuple(tuple(pos[i] for i in g) for g in groups), float(fraction))
        out = list(m_leaves)
        for i, m in zip(idx, new):
            out[i] = m
        return treedef.unflatten(out)
    return treedef.unflatten(_prune_host(s_leaves, m_leaves, groups, fraction, paths, name))


def _prune_host(s_leaves: list, m_leaves: list, groups: tuple, fraction: float, paths: list, name: str) -> list:
    """The host backend: numpy, one lexsort per group; returns the new mask leaves."""
    out = list(m_leaves)
    for group in groups:
        # Host-side numpy: one sort per level, no per-shape XLA compilation.
        flat_m = np.concatenate([np.asarray(m_leaves[i], bool).ravel() for i in group])
        flat_s = np.concatenate([np.asarray(s_leaves[i], np.float64).ravel() for i in group])
        if not np.isfinite(flat_s[flat_m]).all():  # name the first leaf at fault
            for i in group:
                bad = int(np.sum(~np.isfinite(np.asarray(s_leaves[i], np.float64)[np.asarray(m_leaves[i], bool)])))
                if bad:
                    raise _non_finite(name, bad, paths[i])
        k = int(_count(fraction, flat_m.sum()))
        if k == 0:
            continue
        # Survivors first, then by score; already-pruned weights rank last whatever their score, so they are never
        # chosen again. Among equal scores the later weight goes first (the earlier is kept: conventions' tie-break).
        order = np.lexsort((-np.arange(flat_m.size), flat_s, ~flat_m))
        flat_m = flat_m.copy()
        flat_m[order[:k]] = False
        offset = 0
        for i in group:
            size = int(np.prod(np.shape(m_leaves[i])))
            out[i] = jnp.asarray(flat_m[offset:offset + size].reshape(np.shape(m_leaves[i])))
            offset += size
    return out


def _non_finite(name: str, bad: int, path: str) -> ValueError:
    return ValueError(f"{name}: {bad} NaN or ±Inf values among the surviving weights of {path!r}; expected "
                      "finite values to rank (did training diverge?)")


def _refuse_non_finite_jax(s_leaves: list, m_leaves: list, idx: list, paths: list, name: str) -> None:
    """The host backend's check on concrete arrays, counted on the device (one small transfer)."""
    bad = jax.device_get(jnp.stack([jnp.sum(~jnp.isfinite(s_leaves[i]) & m_leaves[i]) for i in idx]))
    for i, b in zip(idx, bad):
        if b:
            raise _non_finite(name, int(b), paths[i])


def _order_keys(s: Array) -> Array:
    """``s: (n,)`` → unsigned ints ``(n,)`` ordered as ``s`` is, ``-0 = +0`` and every NaN one step above ``+inf``
    (where a stable sort puts NaN); floats below 32 bits are widened first (exactly), ints map order-preservingly.
    Standardised on the bits (XLA may elide a float ``where(s == 0, 0, s)``)."""
    dt = s.dtype
    if dt == jnp.bool_ or (jnp.issubdtype(dt, jnp.unsignedinteger) and dt.itemsize < 4):
        return s.astype(jnp.uint32)
    if jnp.issubdtype(dt, jnp.unsignedinteger):
        return s
    wide = (jnp.float32 if jnp.issubdtype(dt, jnp.floating) else jnp.int32) if dt.itemsize < 4 else dt
    s = s.astype(wide)
    u = jnp.uint32 if s.dtype.itemsize == 4 else jnp.uint64
    top = u(1 << (8 * s.dtype.itemsize - 1))
    bits = jax.lax.bitcast_convert_type(s, u)
    if not jnp.issubdtype(dt, jnp.floating):  # two's complement: flipping the sign bit orders them
        return bits ^ top
    inf = jax.lax.bitcast_convert_type(jnp.array(jnp.inf, s.dtype), u)
    mag = bits & ~top
    bits = jnp.where(mag == 0, u(0), jnp.where(mag > inf, inf + u(1), bits))
    return jnp.where(bits >= top, ~bits, bits | top)


def _smallest_reaching(count: Callable[[Array], Array], k: Array, dtype) -> Array:
    """The smallest unsigned ``t`` (of ``dtype``) with ``count(t) ≥ k``, ``count`` nondecreasing: one bit per
    step from the top, ``8 · itemsize`` reductions."""
    nbits = 8 * np.dtype(dtype).itemsize
    one = dtype(1)

    def step(i, t):
        b = (nbits - 1 - i).astype(dtype)
        return jnp.where(count(t | ((one << b) - one)) >= k, t, t | (one << b))

    return jax.lax.fori_loop(0, nbits, step, dtype(0))


def _prune_lowest(flat_m: Array, flat_s: Array, k: Array) -> Array:
    """``flat_m`` with its ``k`` lowest-scored survivors pruned, ties by position: the host's lexsort without a
    sort. The threshold key ``t`` (``k``-th lowest survivor) by a bitwise search; every survivor below ``t`` goes,
    and of those at ``t`` the last ``k − #below`` in flattening order. ``flat_m, flat_s: (n,)``."""
    key = _order_keys(flat_s)
    t = _smallest_reaching(lambda c: jnp.sum(flat_m & (key <= c), dtype=jnp.int32), k, key.dtype.type)
    below = flat_m & (key < t)
    ties = flat_m & (key == t)
    left = k - jnp.sum(below, dtype=jnp.int32)
    from_end = jnp.cumsum(ties[::-1], dtype=jnp.int32)[::-1]  # ties at or after each position
    return flat_m & ~(below | (ties & (from_end <= left)))


@functools.partial(jax.jit, static_argnames=("groups", "fraction"))
def _prune_jax(scores: tuple, masks_: tuple, groups: tuple, fraction: float) -> tuple:
    """The jax backend. ``scores``/``masks_``: the prunable leaves; ``groups``: tuples of indices into them (one
    per scope group). Per group the ``k`` lowest-scored survivors are pruned (:func:`_prune_lowest`), ``k`` from
    :func:`_count` through one host callback for all groups: the host's float64 formula (float32 on the device
    would make ``0.2 · 265`` 54)."""
    flats = [(jnp.concatenate([jnp.ravel(masks_[i]).astype(bool) for i in g]),
              jnp.concatenate([jnp.ravel(scores[i]) for i in g])) for g in groups]
    if any(m.size >= 2 ** 31 for m, _ in flats):
        raise ValueError("backend='jax': a group of 2³¹ or more weights; expected fewer (int32 counts)")
    remaining = jnp.stack([jnp.sum(m, dtype=jnp.int32) for m, _ in flats])
    ks = jax.pure_callback(lambda r: _count(fraction, r).astype(np.int32),
                           jax.ShapeDtypeStruct(remaining.shape, jnp.int32), remaining, vmap_method="expand_dims")
    out = list(masks_)
    for j, (g, (flat_m, flat_s)) in enumerate(zip(groups, flats)):
        flat_m = _prune_lowest(flat_m, flat_s, ks[j])
        offset = 0
        for i in g:
            size = math.prod(jnp.shape(masks_[i]))
            out[i] = flat_m[offset:offset + size].reshape(jnp.shape(masks_[i]))
            offset += size
    return tuple(out)


def magnitude_prune(params: PyTree, mask: PyTree, prunable: PyTree, fraction: float,
                    scope: str = "global", backend: str = "auto") -> PyTree:
    """Prune the smallest-|w| ``fraction`` of the remaining prunable weights (OpenLTH ``sparse_global``).
    ``backend`` as in :func:`prune_by_score`; under ``jit`` close over ``prunable``, ``fraction`` and ``scope``:
    ``jax.jit(lambda p, m: magnitude_prune(p, m, prunable, 0.2))``."""
    check_trees(params, mask, prunable)
    return _prune(jax.tree_util.tree_map(jnp.abs, params), mask, prunable, fraction, scope, "params", backend)


def random_prune(key: Array, mask: PyTree, prunable: PyTree, fraction: float, scope: str = "global",
                 backend: str = "auto") -> PyTree:
    """Prune a uniformly random ``fraction`` of the remaining prunable weights."""
    _validate.key(key)
    check_trees(mask=mask, prunable=prunable)
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    keys = jax.random.split(key, len(leaves))
    scores = treedef.unflatten([jax.random.uniform(k, jnp.shape(m)) for k, m in zip(keys, leaves)])
    return _prune(scores, mask, prunable, fraction, scope, "scores", backend)


def random_like(key: Array, mask: PyTree, prunable: PyTree) -> PyTree:
    """A random mask with exactly the same number of kept weights in every prunable leaf (control branch)."""
    _validate.key(key)
    check_trees(mask=mask, prunable=prunable)
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    p_leaves = jax.tree_util.tree_leaves(prunable)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, m, p in zip(keys, leaves, p_leaves):
        if not p:
            out.append(m)
            continue
        keep = int(np.sum(m))
        order = np.argsort(np.asarray(jax.random.uniform(k, (m.size,))), kind="stable")
        flat = np.zeros((m.size,), bool)
        flat[order[:keep]] = True
        out.append(jnp.asarray(flat.reshape(m.shape)))
    return treedef.unflatten(out)


def density_report(mask: PyTree, prunable: PyTree) -> dict:
    """``{"density": overall kept fraction of prunable weights, "kept": int, "total": int,
    "layers": {path: density}}`` (only prunable leaves)."""
    check_trees(mask=mask, prunable=prunable)
    layers, kept, total = {}, 0, 0
    for (path, m), p in zip(jax.tree_util.tree_leaves_with_path(mask),
                            jax.tree_util.tree_leaves(prunable)):
        if not p:
            continue
        k = int(np.sum(m))
        layers[path_str(path)] = k / m.size
        kept += k
        total += m.size
    return {"density": kept / total, "kept": kept, "total": total, "layers": layers}


# ----------------------------------------------------------------------------------------------- optimizer
class MaskedState(NamedTuple):
    mask: PyTree  # bool tree like the params
    inner: PyTree


def masked(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wrap ``inner`` so pruned weights never move: gradients are masked before ``inner`` (so its moments stay
    zero there) and updates after it (so weight decay and the like cannot leak). The mask lives in the state
    (``MaskedState.mask``, dense after ``init``); set it with :func:`with_mask`. Keeping it in the state lets one
    compiled train step serve every pruning level.
    """

    def init(params):
        return MaskedState(ones_like(params), inner.init(params))

    def update(updates, state, params=None):
        zero = lambda u, m: jnp.where(m, u, jnp.zeros_like(u))
        updates = _map(zero, updates, state.mask, ("updates", "state.mask"))
        updates, new_inner = inner.update(updates, state.inner, params)
        updates = _map(zero, updates, state.mask, ("updates", "state.mask"))
        return updates, MaskedState(state.mask, new_inner)

    return optax.GradientTransformation(init, update)


def with_mask(tx: optax.GradientTransformation, state: MaskedState, mask: PyTree) -> MaskedState:
    """Install ``mask`` in a :func:`masked` optimizer's state and zero the param-shaped moments it prunes.

    The result keeps ``state``'s containers, so with NNX: ``opt.opt_state = with_mask(opt.tx, opt.opt_state,
    mask)`` for an ``nnx.Optimizer(model, masked(...), wrt=nnx.Param)`` (its state holds ``OptVariable``s; ``mask``
    may be a params ``State``)."""
    if not isinstance(state, MaskedState):
        raise TypeError(f"state: expected the state of jaxprune.masks.masked(...), got {type(state).__name__}")
    check_trees(state.mask, mask)  # the state's mask has the params' structure and shapes
    inner_tx = _inner_of(tx)
    # on wrapper-free trees (an nnx.Optimizer's OptVariables vs a params State's Params), then back into state's
    zeroed = optax.tree_utils.tree_map_params(
        inner_tx, lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), _pure(state.inner), _pure(mask),
        transform_non_params=lambda x: x)
    inner = jax.tree_util.tree_structure(state.inner).unflatten(jax.tree_util.tree_leaves(zeroed))
    return MaskedState(_map(lambda _, m: jnp.asarray(m, bool), state.mask, mask, ("state.mask", "mask")), inner)


def _inner_of(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    # tree_map_params only needs ``init`` to learn which state leaves are param-shaped.
    return optax.GradientTransformation(lambda p: tx.init(p).inner, None)
