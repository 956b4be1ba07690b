"""Normalised Bures similarity (Tang et al. 2020): ``NBS(K, L) = Tr[(K^½ L K^½)^½] / sqrt(Tr K · Tr L)`` on centred
kernels ``K = HK₀H``, ``L = HL₀H``. A *similarity* in [0, 1], 1 iff ``L = cK``.

:func:`nbs_from_grams` follows the definition with two symmetric eigendecompositions (``K = VΛVᵀ``,
``K^½ = V√ΛVᵀ``, then the eigenvalues ``μ`` of ``K^½ L K^½`` give ``Σ√μ``). Eigenvalues at most
``epsilon · λ_max`` (default ``n · eps`` of the dtype) are set to zero before the square root: rounding leaves the
n - rank zero eigenvalues of a low-rank kernel at ±1e-7·λ_max in float32, and their square roots (~3e-4 each)
would otherwise add up to a visible bias.

:func:`nbs` is the linear-kernel case from activations: with centred ``X``, ``Y``,
``NBS = ‖XᵀY‖_* / (‖X‖_F ‖Y‖_F)`` (nuclear norm), evaluated on ``(n, min(n, p))`` factors — no n × n matrix when
``p ≤ n``. Inside ``jit``/``vmap`` only shapes are checked; non-finite input gives NaN.

Scale: activations and kernels are divided by their largest magnitude first and the traces combined as
``sqrt(Tr K)·sqrt(Tr L)``, so ``x`` and ``c·x`` give the same value (to rounding) at any ``c`` float32 can hold
the data at; a representation without variance gives NaN (0/0).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxprune.similarity import _checks
from jaxprune.similarity.cca import Metric, evaluate
from jaxprune.similarity.cka import _centred_unit_gram, _linear_factor, _ratio

Array = jax.Array


def _clip(w: Array, epsilon: float | None) -> Array:
    tol = (w.shape[0] * float(jnp.finfo(w.dtype).eps) if epsilon is None else epsilon) * jnp.max(w)
    return jnp.where(w > tol, w, 0.0)


def _psd_sqrt(k: Array, epsilon: float | None) -> Array:
    w, v = jnp.linalg.eigh(k)
    return (v * jnp.sqrt(_clip(w, epsilon))) @ v.T


def _bures(kc: Array, lc: Array, epsilon: float | None) -> Array:
    ks = _psd_sqrt(kc, epsilon)
    m = ks @ lc @ ks
    mu = _clip(jnp.linalg.eigvalsh(0.5 * (m + m.T)), epsilon)
    return _ratio(jnp.sum(jnp.sqrt(mu)), jnp.trace(kc), jnp.trace(lc))


@functools.lru_cache(maxsize=None)
def nbs_grams_metric(epsilon: float | None = None) -> Metric:
    def compare(kc: Array, lc: Array) -> Array:
        return _bures(kc, lc, epsilon)

    return functools.partial(_centred_unit_gram, unbiased=False), compare


class _Factor(NamedTuple):
    f: Array  # (n, min(n, p)) centred factor, f fᵀ = X Xᵀ
    sq_norm: Array  # () ‖f‖²_F = Tr K


def _factor(x: Array) -> _Factor:
    f = _linear_factor(x)  # largest magnitude 1 (scale-invariant)
    return _Factor(f, jnp.sum(f * f))


def _nbs_linear(a: _Factor, b: _Factor) -> Array:
    return _ratio(jnp.sum(jnp.linalg.svd(a.f.T @ b.f, compute_uv=False)), a.sq_norm, b.sq_norm)


@functools.lru_cache(maxsize=None)
def nbs_metric() -> Metric:
    return _factor, _nbs_linear


def nbs_from_grams(k: Array, l: Array, *, epsilon: float | None = None) -> Array:
    """NBS similarity of two ``(n, n)`` Gram matrices of the same inputs (any PSD kernel); centred here."""
    k, l = _checks.gram_pair(k, l)
    return evaluate(nbs_grams_metric(_checks.epsilon(epsilon)), k, l)


def nbs(x: Array, y: Array) -> Array:
    """NBS similarity of ``x: (n, p1)`` and ``y: (n, p2)`` with linear kernels."""
    x, y = _checks.pair(x, y)
    return evaluate(nbs_metric(), x, y)
