"""One-shot calibrated pruning of dense layers: magnitude, Wanda and SparseGPT, unstructured and N:M.

The dense layers are read from the model's own program: ``apply(params, x)`` is traced with ``jax.make_jaxpr`` and
every ``dot_general`` whose right operand is a parameter leaf is a dense layer, its left operand the layer input
``X``. A kernel with more than two dims (``DenseGeneral``) is viewed as ``(in, out)``: its contracted dims, flattened,
are the inputs. A leaf used by several ``dot_general`` pools their inputs. Layers whose output reaches the model's
output without passing another ``dot_general`` (the readout) are left alone unless ``prune_readout``; embeddings
(gathers) and LayerNorm scales are never touched.

Layers are pruned one at a time in program order; each is calibrated on its input in the *already pruned* network
(sequential): before layer ``i`` the calibration set is run through the network with layers ``< i`` pruned and the
Gram ``H = Xᵀ X: (in, in)`` of layer ``i``'s input is accumulated (the only statistic the methods need).

Methods (:data:`METHODS`, :func:`register_method`) map ``(w: (in, out) kernel, H: (in, in), pattern, options)`` to
``(new w, keep mask)``; masks are True where a weight is kept:

* ``magnitude``: ``|w|``, the lowest of the whole layer (unstructured) or of each N:M group.
* ``wanda`` (Sun et al. 2023): ``|w_ij| · ‖X_i‖₂`` with ``‖X_i‖₂² = H_ii``, compared within each output (a column
  of the Flax kernel; the paper's "per output" row of a PyTorch weight), or within each N:M group along the inputs.
  ``Options(wanda_group="layer")`` compares over the whole layer instead (the paper's ablation; not the default).
* ``sparsegpt`` (Frantar & Alistarh 2023, Algorithm 1): ``H ← H + λ·mean(diag H)·I`` (``damp`` = λ), inputs with
  ``H_ii = 0`` zeroed (``H_ii ← 1``), ``U`` the upper Cholesky factor of ``H⁻¹``; columns (inputs) are processed in
  order, each pruned weight's error spread over the later inputs (the OBS update ``δ = −(w_j/U_jj) · U_j,j:``), with
  lazy updates of width ``blocksize``. The unstructured mask is chosen per block of ``blocksize`` inputs from
  ``w²/U_jj²`` (the lowest ``ceil(p · block size)`` over the block), the N:M mask every ``m`` inputs.

Patterns: :func:`parse_pattern` — ``"50%"`` or ``"0.5"`` (unstructured, fraction pruned; counts
``conventions.n_to_prune``) or ``"2:4"`` (``n`` kept of every ``m`` consecutive inputs, ``jaxprune.patterns.nm_mask``).
Ties: the earlier weight is kept (row-major order of the ``(in, out)`` kernel).
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from jaxprune import _compat, conventions, masks, patterns

Array = jax.Array
PyTree = Any
METHODS: dict[str, Callable] = {}
WANDA_GROUPS = ("output", "layer")  # Wanda's unstructured comparison: each output (the paper's) or the whole layer

__all__ = ["METHODS", "register_method", "Pattern", "parse_pattern", "Options", "DenseUse", "dense_layers",
           "gram_fn", "prune", "sparsegpt", "wanda_scores"]


# ----------------------------------------------------------------------------------------------- patterns/options
class Pattern(NamedTuple):
    """Unstructured (``n = m = 0``, ``sparsity`` pruned) or N:M (``n`` kept of every ``m``; ``sparsity = 1 − n/m``)."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{100 * self.sparsity:g}%"


def parse_pattern(text: str | float) -> Pattern:
    """``"50%"``, ``"0.5"`` → unstructured 50 %; ``"2:4"`` → N:M. A ValueError naming the form otherwise."""
    s = str(text).strip()
    nm = re.fullmatch(r"(\d+):(\d+)", s)
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if not 0 <= n <= m or m < 1:
            raise ValueError(f"pattern={s!r}: expected N:M with 0 <= N <= M and M >= 1 (N kept of every M)")
        return Pattern(1.0 - n / m, n, m)
    try:
        f = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        f = float("nan")
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"pattern={s!r}: expected a sparsity like 50% or 0.5 (in [0, 1]), or N:M like 2:4")
    return Pattern(f)


@dataclasses.dataclass(frozen=True)
class Options:
    """``damp``: SparseGPT's λ (fraction of mean(diag H) added to the diagonal); ``blocksize``: its lazy-update and
    mask-selection width (inputs; a multiple of ``m`` for N:M)."""

    damp: float = 0.01
    blocksize: int = 128
    batch_size: int = 16  # calibration windows per forward pass (memory)
    prune_readout: bool = False  # also prune the layers whose output is the model's output
    wanda_group: str = "output"  # Wanda's unstructured comparison group: "output" (the paper's) or "layer"

    def __post_init__(self):
        if not (math.isfinite(self.damp) and self.damp >= 0):
            raise ValueError(f"damp={self.damp!r}: expected a finite number >= 0")
        if self.wanda_group not in WANDA_GROUPS:
            raise ValueError(f"wanda_group={self.wanda_group!r}: expected one of {WANDA_GROUPS}")
        for name in ("blocksize", "batch_size"):
            if isinstance(getattr(self, name), bool) or int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected an integer >= 1")


def register_method(name: str, calibrated: bool = True) -> Callable[[Callable], Callable]:
    """Decorator: ``@register_method("mine")`` adds ``f(w: (in, out), H: (in, in) or None, pattern, options) ->
    (new w, keep (in, out) bool)`` to :data:`METHODS`; ``calibrated=False``: it ignores ``H`` (None is passed)."""

    def deco(fn: Callable) -> Callable:
        fn.calibrated = calibrated
        METHODS[name] = fn
        return fn

    return deco


# ----------------------------------------------------------------------------------------------- masks
def _lowest_out(scores: Array, k: int) -> Array:
    """Keep mask ``(scores' shape)`` with the ``k`` lowest scores (row-major; ties: the later goes first) removed."""
    flat = jnp.ravel(scores)
    return masks._prune_lowest(jnp.ones(flat.shape, bool), flat, jnp.int32(k)).reshape(scores.shape)


def _select(scores: Array, pattern: Pattern, per_output: bool) -> Array:
    """Keep mask of ``scores: (in, out)``: N:M along the inputs, else the lowest ``ceil(p · n)`` of the whole layer
    or (``per_output``) of each output column."""
    if pattern.is_nm:
        return patterns.nm_mask(scores, pattern.n, pattern.m, axis=-2)
    if per_output:
        k = conventions.n_to_prune(pattern.sparsity, scores.shape[0])
        return jax.vmap(lambda s: _lowest_out(s, k), in_axes=1, out_axes=1)(scores)
    return _lowest_out(scores, conventions.n_to_prune(pattern.sparsity, scores.size))


@register_method("magnitude", calibrated=False)
def magnitude(w: Array, gram: Array, pattern: Pattern, options: Options) -> tuple[Array, Array]:
    """``|w|``: the lowest of the layer (unstructured) or of each N:M group go; no calibration used."""
    keep = _select(jnp.abs(w), pattern, per_output=False)
    return w * keep, keep


def wanda_scores(w: Array, gram: Array) -> Array:
    """``|w_ij| · ‖X_i‖₂`` with ``‖X_i‖₂ = sqrt(H_ii)``: ``w: (in, out)``, ``gram: (in, in)`` → ``(in, out)``."""
    return jnp.abs(w) * jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))[:, None]


@register_method("wanda")
def wanda(w: Array, gram: Array, pattern: Pattern, options: Options) -> tuple[Array, Array]:
    """Wanda: :func:`wanda_scores` compared within each output (unstructured; ``options.wanda_group="layer"``: the
    whole layer, as magnitude) or each N:M group; no weight update."""
    keep = _select(wanda_scores(w, gram), pattern, per_output=options.wanda_group == "output")
    return w * keep, keep


# ----------------------------------------------------------------------------------------------- SparseGPT
def hinv_cholesky(gram: Array, damp: float) -> tuple[Array, Array]:
    """``(U, dead)``: the upper Cholesky factor of ``(H + λ·mean(diag H)·I)⁻¹`` (``H⁻¹ = UᵀU``) after inputs with
    ``H_ii = 0`` (``dead: (in,) bool``) get ``H_ii = 1``. ``gram: (in, in)``."""
    dead = jnp.diagonal(gram) == 0
    h = gram + jnp.diag(dead.astype(gram.dtype))
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    low = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((low, True), jnp.eye(h.shape[0], dtype=h.dtype))
    return jnp.linalg.cholesky(hinv).T, dead


def _block(w1: Array, u1: Array, keep1: Array, n: int, m: int) -> tuple[Array, Array, Array]:
    """One lazy block: ``w1: (out, b)`` columns (inputs) in order, ``u1: (b, b)`` its part of ``U``, ``keep1`` its
    mask (N:M: re-chosen every ``m`` columns from the updated weights). Returns the pruned block, the errors
    ``(out, b)`` (``(w − q)/U_jj``, to carry to later blocks) and the mask."""
    d = jnp.diagonal(u1)

    def column(j, carry):
        w1, err, keep1 = carry
        if m:  # N:M: at every m-th column choose the mask of the next m columns
            tmp = jax.lax.dynamic_slice_in_dim(w1, j, m, axis=1) ** 2 / jax.lax.dynamic_slice_in_dim(d, j, m) ** 2
            chosen = patterns.nm_mask(tmp.T, n, m, axis=-2).T
            keep1 = jnp.where(j % m == 0, jax.lax.dynamic_update_slice_in_dim(keep1, chosen, j, axis=1), keep1)
        w = w1[:, j]
        e = (w - w * keep1[:, j]) / d[j]
        w1 = w1 - e[:, None] * u1[j][None, :]  # U is upper triangular: columns < j are untouched
        return w1, err.at[:, j].set(e), keep1

    w1, err, keep1 = jax.lax.fori_loop(0, w1.shape[1], column, (w1, jnp.zeros_like(w1), keep1))
    return w1 * keep1, err, keep1


def sparsegpt(w: Array, gram: Array, pattern: Pattern, damp: float = 0.01, blocksize: int = 128
              ) -> tuple[Array, Array]:
    """SparseGPT on one layer: ``w: (in, out)`` kernel, ``gram: (in, in)`` = ``XᵀX`` of its input → ``(new w, keep)``.

    Blocks of ``blocksize`` inputs in order: the unstructured mask of a block is chosen at its start (the lowest
    ``ceil(p · size)`` of ``w²/U_jj²``), the N:M mask every ``m`` inputs; then each column is pruned and the error
    spread over the later columns, within the block at once and to later blocks after it (lazy updates)."""
    if pattern.is_nm and (w.shape[0] % pattern.m or blocksize % pattern.m):
        raise ValueError(f"pattern={pattern.name}: the input width {w.shape[0]} and blocksize={blocksize} must be "
                         f"multiples of m={pattern.m}")
    u, dead = hinv_cholesky(gram.astype(jnp.float32), damp)
    wt = jnp.where(dead[None, :], 0.0, w.T.astype(jnp.float32))  # (out, in): rows are outputs, as the paper
    keep = jnp.ones(wt.shape, bool)
    for i1 in range(0, wt.shape[1], blocksize):
        i2 = min(i1 + blocksize, wt.shape[1])
        u1 = u[i1:i2, i1:i2]
        keep1 = keep[:, i1:i2]
        if not pattern.is_nm:
            tmp = (wt[:, i1:i2] ** 2 / jnp.diagonal(u1)[None, :] ** 2).T  # (b, out): the kernel's orientation
            keep1 = _lowest_out(tmp, conventions.n_to_prune(pattern.sparsity, tmp.size)).T
        q1, err1, keep1 = _block(wt[:, i1:i2], u1, keep1, pattern.n, pattern.m)
        wt = wt.at[:, i1:i2].set(q1).at[:, i2:].add(-err1 @ u[i1:i2, i2:])
        keep = keep.at[:, i1:i2].set(keep1)
    return wt.T.astype(w.dtype), keep.T


@register_method("sparsegpt")
def _sparsegpt(w: Array, gram: Array, pattern: Pattern, options: Options) -> tuple[Array, Array]:
    return sparsegpt(w, gram, pattern, options.damp, options.blocksize)


# ----------------------------------------------------------------------------------------------- capture
class DenseUse(NamedTuple):
    """A parameter leaf used as the right operand of ``dot_general``: ``leaf`` its index in the flattened params,
    ``path`` its name, ``contract`` the kernel dims contracted (the inputs), ``readout`` whether its output reaches
    the model's output without another ``dot_general``."""

    leaf: int
    path: str
    shape: tuple
    contract: tuple
    readout: bool
    group: int  # the first layer (position in program order) that reads the same input value; inputs are shared


_CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
          "remat", "checkpoint")


def _sub_jaxpr(eqn) -> tuple[Any, Sequence] | None:
    """``(jaxpr, consts)`` of a call-like equation whose inner inputs are its inputs one to one, else None."""
    if eqn.primitive.name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        obj = eqn.params.get(key)
        if obj is not None and not callable(obj):
            return getattr(obj, "jaxpr", obj), getattr(obj, "consts", ())
    return None


class _Capture:
    """Evaluates a jaxpr, accumulating ``Xᵀ X`` of the left operand of every ``dot_general`` whose right operand is
    a parameter leaf (``grams[leaf]``) and tracking which such dots each value has last passed (for the readout)."""

    def __init__(self, wanted: frozenset | None = None):
        self.wanted = wanted  # the leaves whose Grams are accumulated (None: all)
        self.grams: dict[int, Array] = {}
        self.contract: dict[int, tuple] = {}
        self.source: dict[int, Any] = {}  # the input value a leaf's dot reads (a unique object if several)

    def run(self, jaxpr, consts, args, leaf_of: dict, lasts: list) -> tuple[list, list]:
        env, after = {}, {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v], after[v] = c, frozenset()
        for v, a, s in zip(jaxpr.invars, args, lasts):
            env[v], after[v] = a, s
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            ins_after = [frozenset() if isinstance(v, jcore.Literal) else after[v] for v in eqn.invars]
            sub = _sub_jaxpr(eqn)
            if sub is not None:
                inner_leaf = {iv: leaf_of[ov] for ov, iv in zip(eqn.invars, sub[0].invars)
                              if not isinstance(ov, jcore.Literal) and ov in leaf_of}
                outs, outs_after = self.run(sub[0], sub[1], ins, inner_leaf, ins_after)
            else:
                outs, outs_after = self._apply(eqn, ins, ins_after, leaf_of)
            for v, o, s in zip(eqn.outvars, outs, outs_after):
                env[v], after[v] = o, s
        return [read(v) for v in jaxpr.outvars], [frozenset() if isinstance(v, jcore.Literal) else after[v]
                                                   for v in jaxpr.outvars]

    def _apply(self, eqn, ins, ins_after, leaf_of) -> tuple[list, list]:
        subfuns, params = _compat.bind_params(eqn.primitive, eqn.params)
        outs = eqn.primitive.bind(*subfuns, *ins, **params)
        outs = list(outs) if eqn.primitive.multiple_results else [outs]
        if eqn.primitive.name != "dot_general":
            merged = frozenset().union(*ins_after)
            return outs, [merged] * len(outs)
        rhs = eqn.invars[1]
        if isinstance(rhs, jcore.Literal) or rhs not in leaf_of:
            return outs, [frozenset()]
        leaf = leaf_of[rhs]
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if lb or rb:
            raise ValueError(f"params: leaf {leaf} is the right operand of a batched dot_general; expected dense "
                             "layers (no batch dimensions)")
        x = jnp.moveaxis(ins[0], tuple(lc), tuple(range(-len(lc), 0))).reshape(-1, math.prod(
            ins[0].shape[d] for d in lc)).astype(jnp.float32)
        if self.wanted is None or leaf in self.wanted:
            g = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
            self.grams[leaf] = self.grams[leaf] + g if leaf in self.grams else g
        self.contract[leaf] = tuple(int(d) for d in rc)
        self.source[leaf] = object() if leaf in self.source else eqn.invars[0]
        return outs, [frozenset({leaf})]


def _flat(params: PyTree) -> tuple[list, Any, list[str]]:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    return ([leaf for _, leaf in leaves_with_path], treedef,
            [masks.path_str(path) for path, _ in leaves_with_path])


def _capture(apply: Callable, treedef, leaves: list, x: Array, wanted: frozenset | None = None
             ) -> tuple[dict, _Capture, frozenset]:
    """Grams (of the ``wanted`` leaves; None: all), the capture (contracted dims, input sources) and readout leaves
    of ``apply(params, x)`` (traceable: jit it)."""
    closed = jax.make_jaxpr(lambda ls, xx: apply(jax.tree_util.tree_unflatten(treedef, ls), xx))(leaves, x)
    jaxpr, consts = getattr(closed, "jaxpr", closed), getattr(closed, "consts", ())
    cap = _Capture(wanted)
    leaf_of = {v: i for i, v in enumerate(jaxpr.invars[:len(leaves)])}
    _, outs_after = cap.run(jaxpr, consts, list(leaves) + [x], leaf_of, [frozenset()] * len(jaxpr.invars))
    return cap.grams, cap, frozenset().union(*outs_after)


def gram_fn(apply: Callable, params: PyTree, wanted: Sequence[int] | None = None) -> Callable[[list, Array], dict]:
    """Jitted ``f(leaves, x) -> {leaf index: XᵀX (in, in) float32}`` of every dense layer of ``apply`` (leaves: the
    flattened params), or only of the ``wanted`` leaf indices: the program after their last use is then never run
    (XLA drops what no output needs)."""
    return _gram_fn_cached(apply, _flat(params)[1], None if wanted is None else frozenset(int(i) for i in wanted))


def dense_layers(apply: Callable, params: PyTree, x: Array) -> list[DenseUse]:
    """The dense layers of ``apply(params, x)`` in program order (first use), read from its jaxpr."""
    leaves, treedef, paths = _flat(params)
    grams, cap, readout = _capture(apply, treedef, leaves, x)
    order = list(grams)
    first = {}
    for pos, i in enumerate(order):
        first.setdefault(id(cap.source[i]), pos)
    return [DenseUse(i, paths[i], tuple(np.shape(leaves[i])), cap.contract[i], i in readout,
                     first[id(cap.source[i])]) for i in order]


# ----------------------------------------------------------------------------------------------- the whole model
def _as_matrix(w: Array, contract: tuple) -> tuple[Array, Callable[[Array], Array]]:
    """``w`` as ``(in, out)`` (contracted dims first, flattened) and the map back to ``w``'s shape."""
    perm = tuple(contract) + tuple(d for d in range(w.ndim) if d not in contract)
    t = jnp.transpose(w, perm)
    k = math.prod(t.shape[:len(contract)])
    inverse = tuple(np.argsort(perm))
    return t.reshape(k, -1), lambda a: jnp.transpose(a.reshape(t.shape), inverse)


def _grams(fn: Callable, leaves: list, calib: Array, batch_size: int) -> dict:
    total = None
    for i in range(0, calib.shape[0], batch_size):
        g = fn(leaves, calib[i:i + batch_size])
        total = g if total is None else {k: total[k] + g[k] for k in g}
    return total


def prune(apply: Callable, params: PyTree, calib: Array, method: str, pattern: str | Pattern,
          options: Options = Options()) -> tuple[PyTree, PyTree, list[dict]]:
    """Prune every dense layer of ``apply(params, x)`` (but the readout) with ``method``, sequentially in program
    order; ``calib: (n, ...)`` calibration inputs (e.g. ``(n, t)`` token ids). Returns ``(pruned params, keep mask
    tree (True elsewhere), per-layer report)``; the report gives each layer's path, density, seconds and, for
    calibrated methods, the relative output error ``tr(ΔᵀHΔ)/tr(WᵀHW)`` on its calibration input."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {sorted(METHODS)}")
    fn, pattern = METHODS[method], pattern if isinstance(pattern, Pattern) else parse_pattern(pattern)
    calib = jnp.asarray(calib)
    if calib.ndim < 1 or calib.shape[0] < 1:
        raise ValueError(f"calib: expected a batch of calibration inputs (n >= 1, ...), got shape {calib.shape}")
    leaves, treedef, _ = _flat(params)
    layers = [d for d in dense_layers(apply, params, calib[:1]) if options.prune_readout or not d.readout]
    keep = [jnp.ones(np.shape(x), bool) for x in leaves]
    report, grams, group = [], None, None
    for d in layers:
        t0 = time.perf_counter()
        if fn.calibrated and (grams is None or d.group != group):  # the Grams of this group only, on the pruned net
            wanted = frozenset(e.leaf for e in layers if e.group == d.group)
            grams, group = _grams(_gram_fn_cached(apply, treedef, wanted), leaves, calib, options.batch_size), d.group
        gram = grams[d.leaf] if fn.calibrated else None
        w, back = _as_matrix(leaves[d.leaf], d.contract)
        new, k = _jitted(method)(w, gram, pattern, options)
        leaves[d.leaf], keep[d.leaf] = back(new), back(k)
        row = {"path": d.path, "shape": list(d.shape), "density": float(jnp.mean(k))}
        if gram is not None:
            delta = (new - w).astype(jnp.float32)
            row["rel_error"] = float(jnp.sum(delta * (gram @ delta)) / jnp.sum(w * (gram @ w)))
        row["seconds"] = time.perf_counter() - t0
        report.append(row)
    return jax.tree_util.tree_unflatten(treedef, leaves), jax.tree_util.tree_unflatten(treedef, keep), report


_GRAM_FNS: dict = {}
_JITTED: dict = {}


def _jitted(method: str) -> Callable:
    """The registered method, jitted with the pattern and options static (one compile per layer shape)."""
    fn = METHODS[method]
    if _JITTED.get(method, (None,))[0] is not fn:
        _JITTED[method] = (fn, jax.jit(fn, static_argnums=(2, 3)))
    return _JITTED[method][1]


def _gram_fn_cached(apply: Callable, treedef, wanted: frozenset | None = None) -> Callable:
    """One jitted Gram function per (apply, params structure, wanted leaves): repeated prunes compile once."""
    key = (apply, treedef, wanted)
    if key not in _GRAM_FNS:
        _GRAM_FNS[key] = jax.jit(lambda leaves, x: _capture(apply, treedef, leaves, x, wanted)[0])
    return _GRAM_FNS[key]
