"""CCA family: canonical correlations, mean CCA, SVCCA (Raghu et al. 2017), PWCCA (Morcos et al. 2018).

All are *similarities* in [0, 1] between ``x: (n, p1)`` and ``y: (n, p2)`` (samples first, same inputs).

Numerics. Each side is centred and factorised once by a thin SVD, ``x - mean = U S Vᵀ``; the canonical
correlations are the singular values of ``U_xᵀ U_y`` (cosines of the principal angles between the two centred
column spaces). No covariance matrix is formed or inverted, so the condition number is not squared and float32
works (float64 under x64).

Rank deficiency (n ≤ p, constant or linearly dependent neurons). Directions whose singular value is at most
``epsilon · s_max`` are dropped (their column of ``U`` is zeroed); ``epsilon=None`` uses ``max(n, p) · eps``
of the dtype (numpy's ``matrix_rank`` rule). Only ``m = min(rank_x, rank_y)`` canonical correlations are then
defined: :func:`cca` reports them first and pads with zeros to length ``min(p1, p2)``; means are over the ``m``
defined ones (= ``min(p1, p2)`` at full rank). A layer with no variance at all (``m = 0``) gives NaN: no
correlation is defined (google/svcca returns 0 there, a plausible-looking similarity).

Scale. Each layer is divided by its largest magnitude before centring and its centred values again by theirs
(:func:`_linalg.scaled_centred`), so the SVD's sums of squares neither overflow nor underflow float32: the
results are the same, to rounding, for ``x`` and ``c·x`` at any ``c`` float32 can hold the data at.
With n ≤ max(p1, p2) CCA is degenerate (all correlations → 1): reduce first (:func:`svcca`) or use CKA.

Inside ``jit``/``vmap`` (tracers), shape checks still run but NaN/Inf checks cannot: non-finite input gives NaN.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune.similarity import _checks, _linalg

Array = jax.Array


class Basis(NamedTuple):
    """A centred, rank-truncated factorisation ``x/c - mean = u · diag(s) · vt`` of one layer ``x: (n, p)``, for
    the ``c > 0`` that makes the largest centred magnitude 1 (:func:`_linalg.scaled_centred`)."""

    u: Array  # (n, k) orthonormal columns, k = min(n, p); columns beyond the kept rank are zero
    s: Array  # (k,) singular values, descending; zero beyond the kept rank
    vt: Array  # (k, p)
    rank: Array  # () int32, number of kept directions
    mean: Array  # (p,) neuron means
    x: Array | None = None  # (n, p) the uncentred activations x/c (only kept for svcca-compatible PWCCA)


def tolerance(epsilon: float | None, n: int, p: int, dtype) -> float:
    """Relative singular-value cut-off: ``epsilon`` or ``max(n, p) · eps(dtype)``."""
    return max(n, p) * float(jnp.finfo(dtype).eps) if epsilon is None else epsilon


def kept_directions(s: Array, n: int, p: int, epsilon: float | None, keep_variance: float | None) -> Array:
    """``s``: descending singular values of a centred ``(n, p)`` layer → bool mask of the directions kept: above
    the rank cut-off ``tolerance · s_max`` and, with ``keep_variance``, the smallest number of leading ones whose
    variance fraction reaches it (SVCCA's SVD step)."""
    keep = s > tolerance(epsilon, n, p, s.dtype) * s[0]
    if keep_variance is None:
        return keep
    var = jnp.where(keep, s * s, 0.0)
    frac = jnp.cumsum(var) / jnp.maximum(jnp.sum(var), jnp.finfo(s.dtype).tiny)
    return keep & jnp.concatenate([jnp.ones((1,), bool), frac[:-1] < keep_variance])


def basis(x: Array, epsilon: float | None = None, keep_variance: float | None = None,
          keep_raw: bool = False) -> Basis:
    """``x: (n, p)`` → :class:`Basis`. ``keep_variance``: also keep only the smallest number of leading directions
    whose variance fraction reaches it (SVCCA's SVD step)."""
    n, p = x.shape
    xc, x, mean = _linalg.scaled_centred(x)  # every field describes x / c (CCA is scale-invariant)
    u, s, vt = jnp.linalg.svd(xc, full_matrices=False)
    keep = kept_directions(s, n, p, epsilon, keep_variance)
    return Basis(u * keep, s * keep, vt * keep[:, None], jnp.sum(keep, dtype=jnp.int32), mean,
                 x if keep_raw else None)


def _correlations(bx: Basis, by: Basis) -> tuple[Array, Array]:
    """Canonical correlations (descending, zero beyond ``m``) and ``m = min(rank_x, rank_y)``."""
    rho = jnp.clip(jnp.linalg.svd(bx.u.T @ by.u, compute_uv=False), 0.0, 1.0)
    m = jnp.minimum(bx.rank, by.rank)
    return jnp.where(jnp.arange(rho.shape[0]) < m, rho, 0.0), m


def _mean(rho: Array, m: Array, truncate: float | None) -> Array:
    """Mean of the ``m`` defined correlations (NaN when ``m = 0``: a layer without variance); ``truncate=t``:
    svcca's rule — mean of the first ``i`` values, ``i`` the first index whose preceding mass reaches ``t`` of the
    total (all of them if none does)."""
    if truncate is None:
        return jnp.where(m > 0, jnp.sum(rho) / jnp.maximum(m, 1), jnp.nan)
    total = jnp.sum(rho)
    before = jnp.cumsum(rho) - rho  # mass of the values before index i
    i = jnp.sum(before < truncate * total)
    mean = jnp.where(total > 0, jnp.sum(jnp.where(jnp.arange(rho.shape[0]) < i, rho, 0.0)) / jnp.maximum(i, 1), 0.0)
    return jnp.where(m > 0, mean, jnp.nan)


# --------------------------------------------------------------------------- metrics as (prepare, compare) pairs
# ``prepare`` maps one layer to its factorisation (done once per layer), ``compare`` maps two prepared layers to a
# scalar. Single-pair functions and ``pairwise`` share them. Factories are cached so the same settings give the
# same function objects (stable jit cache keys).
Metric = tuple[Callable, Callable]


@functools.lru_cache(maxsize=None)
def mean_cca_metric(truncate: float | None = None, epsilon: float | None = None) -> Metric:
    def compare(bx: Basis, by: Basis) -> Array:
        return _mean(*_correlations(bx, by), truncate)

    return functools.partial(basis, epsilon=epsilon), compare


@functools.lru_cache(maxsize=None)
def svcca_metric(keep_variance: float = 0.99, truncate: float | None = None, epsilon: float | None = None) -> Metric:
    return functools.partial(basis, epsilon=epsilon, keep_variance=keep_variance), mean_cca_metric(truncate)[1]


def _pwcca_weights(bx: Basis, a: Array, svcca_compatible: bool) -> Array:
    """Weights of the canonical directions of side x (``a``: their coordinates in ``bx.u``)."""
    if not svcca_compatible:
        # Morcos et al.: α_i ∝ Σ_j |⟨h_i, x_j⟩|, h_i = U a_i the canonical variates, x_j the centred neurons.
        proj = a.T @ (bx.s[:, None] * bx.vt)
    else:
        # google/svcca pwcca.py: directions U S a_i (not whitened) plus the neuron means, orthonormalised by QR in
        # order, projected on the *uncentred* activations. Adding the means after the rotation makes that result
        # depend on the arbitrary sign LAPACK gives each singular vector; we fix it: the largest-magnitude entry of
        # each direction in neuron coordinates (vtᵀ a_i, svcca's ``u`` column) is positive.
        w = bx.vt.T @ a
        a = a * jnp.sign(w[jnp.argmax(jnp.abs(w), axis=0), jnp.arange(w.shape[1])])
        d = bx.u @ (bx.s[:, None] * a) + bx.mean[: a.shape[1]][None, :]
        q, _ = jnp.linalg.qr(d)
        proj = q.T @ bx.x
    alpha = jnp.sum(jnp.abs(proj), axis=1)
    return alpha / jnp.maximum(jnp.sum(alpha), jnp.finfo(alpha.dtype).tiny)


@functools.lru_cache(maxsize=None)
def pwcca_metric(svcca_compatible: bool = False, epsilon: float | None = None) -> Metric:
    def compare(bx: Basis, by: Basis) -> Array:
        if bx.vt.shape[-1] > by.vt.shape[-1]:  # weights come from the smaller layer (static shapes)
            bx, by = by, bx
        a, rho, _ = jnp.linalg.svd(bx.u.T @ by.u, full_matrices=False)
        m = jnp.minimum(bx.rank, by.rank)
        rho = jnp.where(jnp.arange(rho.shape[0]) < m, jnp.clip(rho, 0.0, 1.0), 0.0)
        return jnp.where(m > 0, jnp.sum(_pwcca_weights(bx, a, svcca_compatible) * rho), jnp.nan)

    return functools.partial(basis, epsilon=epsilon, keep_raw=svcca_compatible), compare


@functools.partial(jax.jit, static_argnames=("metric", "guard"))
def _evaluate(metric: Metric, x: Array, y: Array, guard: bool) -> Array:
    prepare, compare = metric
    fx = prepare(x)
    out = compare(fx, prepare(_linalg.after(y, fx)))  # one factorisation at a time (see _linalg.after)
    return _checks.nan_unless_finite(out, x, y) if guard else out


def evaluate(metric: Metric, x: Array, y: Array) -> Array:
    """``compare(prepare(x), prepare(y))`` in one jitted call (shapes already validated). On tracers (values not
    checked) a non-finite ``x`` or ``y`` gives NaN."""
    return _evaluate(metric, x, y, _checks.traced(x, y))


# ----------------------------------------------------------------------------------------------- public API
@functools.lru_cache(maxsize=None)
def _cca_metric(epsilon: float | None) -> Metric:
    def compare(bx: Basis, by: Basis) -> Array:  # all min(p1, p2) correlations (n < p: fewer from the SVD)
        rho, m = _correlations(bx, by)
        rho = jnp.pad(rho, (0, min(bx.vt.shape[-1], by.vt.shape[-1]) - rho.shape[0]))
        return jnp.where(m > 0, rho, jnp.nan)

    return functools.partial(basis, epsilon=epsilon), compare


def cca(x: Array, y: Array, *, epsilon: float | None = None) -> Array:
    """Canonical correlations of ``x: (n, p1)`` and ``y: (n, p2)`` → ``(min(p1, p2),)`` descending in [0, 1]
    (zeros beyond ``min(rank_x, rank_y)``; all NaN when a layer has no variance)."""
    x, y = _checks.pair(x, y)
    return evaluate(_cca_metric(_checks.epsilon(epsilon)), x, y)


def mean_cca(x: Array, y: Array, *, truncate: float | None = None, epsilon: float | None = None) -> Array:
    """Mean canonical correlation (similarity). ``truncate=0.98`` reproduces svcca's ``get_cca_similarity(...)
    ["mean"]``: only the leading correlations holding 98 % of the total are averaged."""
    x, y = _checks.pair(x, y)
    return evaluate(mean_cca_metric(_checks.fraction(truncate, "truncate", allow_none=True),
                                    _checks.epsilon(epsilon)), x, y)


def svcca(x: Array, y: Array, keep_variance: float = 0.99, *, truncate: float | None = None,
          epsilon: float | None = None) -> Array:
    """SVCCA similarity: each side reduced by SVD to the smallest ``k`` leading directions holding
    ``keep_variance`` of its variance, then the mean of the ``min(k_x, k_y)`` canonical correlations."""
    x, y = _checks.pair(x, y)
    return evaluate(svcca_metric(_checks.fraction(keep_variance, "keep_variance"),
                                 _checks.fraction(truncate, "truncate", allow_none=True), _checks.epsilon(epsilon)),
                    x, y)


def pwcca(x: Array, y: Array, *, svcca_compatible: bool = False, epsilon: float | None = None) -> Array:
    """Projection-weighted CCA similarity (Morcos et al. 2018): ``Σ_i α_i ρ_i`` with ``α_i ∝ Σ_j |⟨h_i, x_j⟩|``,
    ``h_i`` the canonical variates of the layer with fewer neurons (``x`` on ties) and ``x_j`` its centred neurons.

    ``svcca_compatible=True`` reproduces google/svcca's ``compute_pwcca`` (BUILD-notes.md): directions
    ``U S a_i`` + neuron means orthonormalised by QR, weights from the uncentred activations. Where that code's
    second branch (``p1 > p2``) indexes the wrong layer, we apply its first-branch recipe to ``y``.
    """
    x, y = _checks.pair(x, y)
    return evaluate(pwcca_metric(bool(svcca_compatible), _checks.epsilon(epsilon)), x, y)
