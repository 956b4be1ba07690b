"""Mean CCA and SVCCA of every layer pair at once: the fast route of :func:`jaxprune.similarity.pairwise`.

Both metrics need, per layer, an orthonormal basis ``Q`` of the centred column space (SVCCA: of its leading
directions) and, per pair, the singular values of ``Q_xᵀ Q_y``. The single-pair functions (:mod:`.cca`) take ``Q``
from a thin SVD of each centred layer. Here a layer ``X̃ (n, p)``, ``p ≤ n``, takes CholeskyQR2 instead where float
arithmetic makes it as accurate, and the thin SVD otherwise:

* **condition** (one program, every layer): ``G = X̃ᵀX̃`` (upper block triangle only), ``G = R₁ᵀR₁`` and an
  estimate of ``κ(X̃) = κ(R₁)`` (power iterations, batched over layers of similar width). The rest of CholeskyQR2
  (Yamamoto et al. 2015, accurate for ``κ(X̃) ≲ eps^-½``): ``q = X̃ R₁⁻¹``, ``qᵀq = R₂ᵀR₂``; ``q R₂⁻¹`` is
  orthonormal to rounding and ``R = R₂R₁`` is the R factor of a backward-stable QR of ``X̃``. SVCCA runs it here,
  with the SVD ``R = U_R Σ V_Rᵀ`` — the singular values and left singular vectors of ``X̃`` (in the basis
  ``q R₂⁻¹``) as accurately as a thin SVD of ``X̃`` gives them, at ``p × p`` size — and the number ``k`` of leading
  directions holding ``keep_variance``. Mean CCA runs it in the all-pairs program instead, so its ``n × p`` bases
  never cross a program boundary (each crossing costs layout copies of the triangular solve's column-major
  output).
* **route** (host): the CholeskyQR2 route where the estimated ``κ(X̃) ≤ 0.1·eps^-½`` (and, for mean CCA, also
  ``≤ 0.1/epsilon``: no direction is near the rank cut-off, so none would be dropped); every other layer
  (rank-deficient, dead units, ``p > n``) takes the thin SVD with the rank truncation of :mod:`.cca`. SVCCA's widths
  ``k`` become static here (rounded up to a multiple of 32), so the products and SVDs below run on ``k`` columns.
* **all pairs** (one program): per layer a basis — mean CCA ``(q, R₂)`` with ``q R₂⁻¹`` orthonormal, SVCCA
  ``q R₂⁻¹ U_R`` (leading ``k`` columns); every cross product ``q_xᵀ q_y`` as **one** GEMM; per block
  ``M = R₂ₓ⁻ᵀ (q_xᵀ q_y) R₂ᵧ⁻¹`` (mean CCA; triangular solves) and its singular values (the canonical
  correlations).

``eps`` is the machine epsilon of the computation dtype. Results agree with the single-pair functions to rounding
(tested in float64 on full-rank, rank-deficient, dead-unit and ``p > n`` layers).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.lax import linalg as lax_linalg

from jaxprune.similarity import _linalg
from jaxprune.similarity._linalg import gram, solve_upper, upper_cholesky
from jaxprune.similarity.cca import _mean, basis, kept_directions, tolerance

Array = jax.Array
KINDS = ("mean_cca", "svcca")
_WIDTH_STEP = 32  # SVCCA widths are rounded up to a multiple of this, so nearby k share one compiled program


def _start_vector(p: int, size: int) -> np.ndarray:
    """``(size, 1)`` float64 start vector of the power iterations: fixed normal draws on the first ``p`` entries,
    zero on the padding (a host constant, so no random-number program is compiled)."""
    v = np.zeros((size, 1))
    v[:p, 0] = np.random.default_rng(0).normal(size=p)
    return v


def _kappa_estimate(r: Array, v0: Array | None = None, iters: int = 6) -> Array:
    """``r: (p, p)`` upper triangular → estimate of ``κ₂(r)`` by power iterations on ``rᵀr`` and on ``(rᵀr)⁻¹``
    (triangular solves) from the start vector ``v0: (p, 1)`` (default :func:`_start_vector`). It can only
    underestimate (by a small factor after ``iters`` steps); callers keep a safety margin. A non-finite ``r`` (a
    failed Cholesky) gives NaN."""
    if v0 is None:
        v0 = _start_vector(r.shape[0], r.shape[0])
    unit = lambda w: w / jnp.linalg.norm(w)

    def up(_, v):
        return unit(r.T @ (r @ v))

    def down(_, v):
        z = lax_linalg.triangular_solve(r, v, left_side=True, lower=False, transpose_a=True)
        return unit(lax_linalg.triangular_solve(r, z, left_side=True, lower=False))

    v0 = unit(jnp.asarray(v0, r.dtype))
    big = jax.lax.fori_loop(0, iters, up, v0)
    small = jax.lax.fori_loop(0, iters, down, v0)
    return jnp.linalg.norm(r @ big) / jnp.linalg.norm(r @ small)


def _buckets(widths: Sequence[int], slack: float = 0.25) -> list[list[int]]:
    """Indices of ``widths`` grouped for one batched κ estimate per group: widest first, each group padded to its
    widest member while the padded ``Σ size²`` (the estimates' cost) stays within ``1 + slack`` of the unpadded.
    Few groups keep the compiled program small: XLA:CPU's compile time grows with the number of ops."""
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    budget = slack * sum(w * w for w in widths)
    groups: list[list[int]] = []
    for i in order:
        extra = widths[groups[-1][0]] ** 2 - widths[i] ** 2 if groups else budget + 1
        if extra <= budget:
            groups[-1].append(i)
            budget -= extra
        else:
            groups.append([i])
    return groups


def _pad_identity(r: Array, size: int) -> Array:
    """``r: (p, p)`` → ``blockdiag(r, I) (size, size)``."""
    p = r.shape[0]
    if p == size:
        return r
    return jnp.pad(r, ((0, size - p),) * 2) + jnp.diag((jnp.arange(size) >= p).astype(r.dtype))


def _kappa_estimates(lapack: _linalg.Serial, rs: Sequence[Array]) -> list[Array]:
    """:func:`_kappa_estimate` of every ``rs[i]: (p_i, p_i)``, batched: each group of :func:`_buckets` is padded
    to ``blockdiag(r, I)`` and estimated in one vmapped call. The start vector is zero on the padding, so the
    iterations never leave the ``r`` block: each estimate is the unpadded one (to rounding)."""
    out: list[Array | None] = [None] * len(rs)
    for group in _buckets([r.shape[0] for r in rs]):
        size = rs[group[0]].shape[0]
        stack = jnp.stack([_pad_identity(rs[i], size) for i in group])
        v0 = np.stack([_start_vector(rs[i].shape[0], size) for i in group]).astype(stack.dtype)
        for i, k in zip(group, lapack(jax.vmap(_kappa_estimate), stack, v0)):
            out[i] = k
    return out


# ------------------------------------------------------------------------------------------------ condition
class Factor(NamedTuple):
    """One layer ``X (n, p)`` after :func:`_condition` (all fields None when ``p > n``). Mean CCA: only ``p × p``
    and scalar outputs, so no ``n × p`` array leaves that program (each would cost layout copies)."""

    r1: Array | None  # (p, p) upper triangular, R₁ᵀR₁ = X̃ᵀX̃
    kappa: Array | None  # () estimate of κ(X̃)
    q: Array | None  # SVCCA: (n, p) X̃ R₁⁻¹
    w: Array | None  # SVCCA: (p, p) R₂⁻¹ U_R (U_R: left singular vectors of R₂R₁, descending); q w = the left
    #                  singular vectors of X̃
    k: Array | None  # SVCCA: () leading directions kept (rank cut-off, then keep_variance)


def _cholesky_qr2(lapack: _linalg.Serial, xc: Array, r1: Array) -> tuple[Array, Array]:
    """Second half of CholeskyQR2 for ``xc: (n, p)`` given ``r1 = chol(xcᵀxc)``: ``(q = xc R₁⁻¹ (n, p), R₂ (p, p))``
    with ``qᵀq = R₂ᵀR₂``, so ``q R₂⁻¹`` is orthonormal to rounding."""
    q = lapack.op(functools.partial(solve_upper, right=True), r1, xc)
    return q, lapack(upper_cholesky, gram(q))


@functools.partial(jax.jit, static_argnames=("kind", "keep_variance", "epsilon"))
def _condition(layers: tuple[Array, ...], kind: str, keep_variance: float | None, epsilon: float | None
               ) -> tuple[Factor, ...]:
    lapack = _linalg.Serial()
    tall = [i for i, x in enumerate(layers) if x.shape[1] <= x.shape[0]]
    centred = {i: _linalg.centred(layers[i]) for i in tall}  # largest magnitude 1: Grams in float32's range
    r1s = {i: lapack(upper_cholesky, gram(centred[i])) for i in tall}
    kappas = dict(zip(tall, _kappa_estimates(lapack, [r1s[i] for i in tall])))
    out = []
    for i, x in enumerate(layers):
        n, p = x.shape
        if p > n:
            out.append(Factor(None, None, None, None, None))
            continue
        xc, r1, kappa = centred[i], r1s[i], kappas[i]
        q = w = k = None
        if kind == "svcca":  # its static widths need the exact k on the host: the rest of CholeskyQR2 here
            q, r2 = _cholesky_qr2(lapack, xc, r1)
            u, sv, _ = lapack(jnp.linalg.svd, r2 @ r1)
            w = lapack.op(solve_upper, r2, u)
            k = jnp.sum(kept_directions(sv, n, p, epsilon, keep_variance), dtype=jnp.int32)
        out.append(Factor(r1, kappa, q, w, k))
    return tuple(out)


def routes(kind: str, layers: Sequence[Array], factors: tuple[Factor, ...], epsilon: float | None
           ) -> tuple[tuple[bool, int], ...]:
    """Per layer ``(CholeskyQR2 route?, width)``, read on the host: the route where CholeskyQR2 is accurate (see
    the module docstring), the width ``p`` (mean CCA) or ``k`` rounded up to a multiple of 32 (SVCCA); the thin SVD
    at width ``min(n, p)`` otherwise."""
    out = []
    for x, f in zip(layers, factors):
        n, p = x.shape
        limit = 0.1 / float(jnp.finfo(x.dtype).eps) ** 0.5
        if kind == "mean_cca":
            tol = tolerance(epsilon, n, p, x.dtype)
            limit = min(limit, 0.1 / tol if tol > 0 else np.inf)
        if f.kappa is not None and float(f.kappa) <= limit:  # NaN (a failed Cholesky) is not
            out.append((True, p if kind == "mean_cca" else _round_width(int(f.k), p)))
        else:
            out.append((False, min(n, p)))
    return tuple(out)


def _basis(lapack: _linalg.Serial, x: Array, f: Factor, route: tuple[bool, int], kind: str,
           keep_variance: float | None, epsilon: float | None) -> tuple[Array, Array, Array | None]:
    """``(q (n, width), rank, r2)``: ``q r2⁻¹`` (or ``q`` when ``r2`` is None) has orthonormal columns spanning the
    kept directions (the first ``rank``; the others are zero)."""
    fast, width = route
    if not fast:
        b = lapack(basis, x, epsilon=epsilon, keep_variance=keep_variance)  # the single-pair functions' thin SVD
        return b.u[:, :width], b.rank, None
    if kind == "mean_cca":
        q, r2 = _cholesky_qr2(lapack, _linalg.centred(x), f.r1)
        return q, jnp.asarray(width, jnp.int32), r2
    mask = (jnp.arange(width) < f.k).astype(f.q.dtype)
    return f.q @ (f.w[:, :width] * mask), f.k, None  # the leading left singular vectors


# ---------------------------------------------------------------------------------------------------- all pairs
@functools.partial(jax.jit, static_argnames=("plan", "kind", "keep_variance", "truncate", "epsilon"))
def _all_pairs(layers: tuple[Array, ...], factors: tuple[Factor, ...], plan: tuple, kind: str,
               keep_variance: float | None, truncate: float | None, epsilon: float | None) -> Array:
    """``plan = (routes, num_x, same)`` → ``(Lx, Ly)`` means of the canonical correlations (``factors``:
    :func:`_condition` of the same ``layers``)."""
    route_of, num_x, same = plan
    lapack = _linalg.Serial()
    bases = [_basis(lapack, x, f, r, kind, keep_variance, epsilon) for x, f, r in zip(layers, factors, route_of)]
    bx, by = bases[:num_x], (bases[:num_x] if same else bases[num_x:])
    qx = jnp.concatenate([q for q, _, _ in bx], axis=1)
    qy = qx if same else jnp.concatenate([q for q, _, _ in by], axis=1)
    ox = np.cumsum([0] + [q.shape[1] for q, _, _ in bx])
    oy = np.cumsum([0] + [q.shape[1] for q, _, _ in by])
    cross = qx.T @ qy  # every cross product, one GEMM
    # M = R₂ₓ⁻ᵀ (q_xᵀ q_y) R₂ᵧ⁻¹: one triangular solve per block row, then one per block column.
    cross = jnp.concatenate([cross[ox[a]:ox[a + 1]] if r is None else
                             lapack.op(functools.partial(solve_upper, transpose=True), r, cross[ox[a]:ox[a + 1]])
                             for a, (_, _, r) in enumerate(bx)], axis=0)
    cross = jnp.concatenate([cross[:, oy[b]:oy[b + 1]] if r is None else
                             lapack.op(functools.partial(solve_upper, right=True), r, cross[:, oy[b]:oy[b + 1]])
                             for b, (_, _, r) in enumerate(by)], axis=1)
    values = functools.partial(jnp.linalg.svd, compute_uv=False)
    rows = []
    for a, (_, rank_x, _) in enumerate(bx):
        row = []
        for b, (_, rank_y, _) in enumerate(by):
            m = cross[ox[a]:ox[a + 1], oy[b]:oy[b + 1]]
            rho = jnp.clip(lapack(values, m if m.shape[0] >= m.shape[1] else m.T), 0.0, 1.0)  # tall: same values
            defined = jnp.minimum(rank_x, rank_y)
            row.append(_mean(jnp.where(jnp.arange(rho.shape[0]) < defined, rho, 0.0), defined, truncate))
        rows.append(jnp.stack(row))
    return jnp.stack(rows)


def _round_width(k: int, limit: int) -> int:
    return min(limit, -(-max(k, 1) // _WIDTH_STEP) * _WIDTH_STEP)


def all_pairs(kind: str, xs: Sequence[Array], ys: Sequence[Array] | None, *, keep_variance: float = 0.99,
              truncate: float | None = None, epsilon: float | None = None) -> Array:
    """``(Lx, Ly)`` mean CCA (``kind="mean_cca"``) or SVCCA of every ``xs[i]: (n, p_i)`` against every ``ys[j]``
    (``ys=None``: ``xs`` against itself). Inputs: validated, concrete float arrays of the computation dtype (the
    routes are chosen on the host)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    same = ys is None
    keep = keep_variance if kind == "svcca" else None
    layers = tuple(xs) if same else tuple(xs) + tuple(ys)
    factors = _condition(layers, kind, keep, epsilon)
    plan = (routes(kind, layers, factors, epsilon), len(xs), same)
    return _all_pairs(layers, factors, plan, kind, keep, truncate, epsilon)
