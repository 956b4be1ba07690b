"""Centred kernel alignment (Kornblith et al. 2019): linear, RBF, debiased, from Gram matrices, and the streaming
minibatch estimator of Nguyen et al. 2021. All are *similarities* (1 for identical representations).

``CKA(K, L) = ⟨HKH, HLH⟩_F / (‖HKH‖_F ‖HLH‖_F)``, ``H = I - 11ᵀ/n`` (both kernels centred on both sides).
``debiased=True`` replaces the biased HSIC by the unbiased estimator HSIC₁ of Song et al. 2012, computed through
U-centring (diagonal zeroed; needs n ≥ 4); debiased CKA can be slightly negative for unrelated representations.

Linear CKA never forms an n × n matrix when ``p ≤ n``: with centred ``X`` (n, p), ``CKA = ‖XᵀY‖²_F / (‖XᵀX‖_F
‖YᵀY‖_F)`` and HSIC₁ needs only ``‖XᵀY‖_F``, the row norms and their sums. For ``p > n`` a factor ``F`` with
``FFᵀ = XXᵀ`` (thin SVD, n columns) is used instead, so the cost is ``O(n · min(n, p1) · min(n, p2))``.
Inside ``jit``/``vmap`` (tracers) only shapes are checked; non-finite input gives NaN.

Scale: activations (and kernels given to :func:`cka_from_grams`) are divided by their largest magnitude before any
product (centred ones again after centring), norms are combined as ``sqrt(a)·sqrt(b)``, and the minibatch sums
carry a per-layer scale; every value is the same, to float32 rounding, for ``x`` and ``c·x`` at any ``c`` float32
can hold the data at. A representation without variance (every sample the same) gives NaN: CKA is 0/0 there.
"""
from __future__ import annotations

import functools
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.similarity import _checks, _linalg
from jaxprune.similarity.cca import Metric, evaluate

Array = jax.Array


def gram_linear(x: Array) -> Array:
    """``x: (n, p)`` → ``(n, n)`` linear kernel ``x xᵀ``."""
    return x @ x.T


def _sq_distances(x: Array) -> Array:
    sq = jnp.sum(x * x, axis=1)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)


def gram_rbf(x: Array, threshold: float = 1.0) -> Array:
    """``x: (n, p)`` → ``(n, n)`` Gaussian kernel ``exp(-‖x_i - x_j‖² / (2σ²))``, ``σ = threshold ·`` the median
    distance between distinct samples (Kornblith et al.'s code takes the median over all n² entries, zero diagonal
    included, which gives a slightly smaller σ for small n)."""
    d2 = _sq_distances(_linalg.centred(x))  # σ is relative: centring and scaling x first change nothing
    n = x.shape[0]
    iu = jnp.triu_indices(n, 1)
    med = jnp.median(d2[iu])
    return jnp.exp(-d2 / (2.0 * threshold**2 * jnp.maximum(med, jnp.finfo(x.dtype).tiny)))


def center_gram(k: Array, unbiased: bool = False) -> Array:
    """``HKH`` (``unbiased=False``), or the U-centred matrix (zero diagonal) whose inner products give HSIC₁."""
    if not unbiased:
        k = k - jnp.mean(k, axis=0, keepdims=True)
        return k - jnp.mean(k, axis=1, keepdims=True)
    n = k.shape[0]
    k = k * (1.0 - jnp.eye(n, dtype=k.dtype))
    row = jnp.sum(k, axis=0) / (n - 2)
    row = row - jnp.sum(row) / (2.0 * (n - 1))
    return (k - row[:, None] - row[None, :]) * (1.0 - jnp.eye(n, dtype=k.dtype))


def _cosine(kc: Array, lc: Array) -> Array:
    return _ratio(jnp.sum(kc * lc), jnp.sum(kc * kc), jnp.sum(lc * lc))


def _centre_kernel(k: Array, unbiased: bool) -> Array:
    """:func:`center_gram`, exactly zero for a constant kernel (off the diagonal, when ``unbiased``): the kernel of
    a representation without variance, whose centring in float leaves rounding noise that a ratio of such terms
    would turn into a plausible-looking similarity instead of 0/0."""
    off = ~jnp.eye(k.shape[0], dtype=bool) if unbiased else jnp.ones(k.shape, bool)
    constant = jnp.max(jnp.where(off, k, -jnp.inf)) == jnp.min(jnp.where(off, k, jnp.inf))  # False for NaN
    return jnp.where(constant, 0.0, center_gram(k, unbiased))


def _centred_unit_gram(k: Array, unbiased: bool) -> Array:
    """:func:`_centre_kernel` of ``k`` scaled to largest magnitude 1 (CKA and NBS are invariant to scaling a
    kernel)."""
    return _centre_kernel(_linalg.unit_scale(k), unbiased)


# ------------------------------------------------------------------------------ metrics as (prepare, compare)
class _Linear(NamedTuple):
    f: Array  # (n, k) centred factor with f fᵀ = X Xᵀ (X centred)
    d: Array  # (n,) squared row norms = diag(X Xᵀ)
    self_: Array  # () ‖XᵀX‖²_F (biased) or n(n-3)·HSIC₁(X, X) (debiased)


def _linear_factor(x: Array) -> Array:
    xc = _linalg.centred(x)  # largest magnitude 1: the sums of 4th powers below stay in float32's range
    n, p = x.shape
    if p <= n:
        return xc
    u, s, _ = jnp.linalg.svd(xc, full_matrices=False)  # (n, n) factor: same Gram, fewer columns
    return u * s


def _hsic_from(cross: Array, dxdy: Array, sdx: Array, sdy: Array, n: int, debiased: bool) -> Array:
    """HSIC from its pieces (broadcasts, so all layer pairs at once): ``cross = ‖FxᵀFy‖²_F``, ``dxdy = dx·dy``,
    ``sdx, sdy`` the sums of the squared row norms."""
    if not debiased:
        return cross
    return cross - dxdy + sdx * sdy / ((n - 1) * (n - 2)) - 2.0 * dxdy / (n - 2)


def _hsic(fx: Array, fy: Array, dx: Array, dy: Array, debiased: bool) -> Array:
    """``n(n-3)·HSIC₁`` (debiased) or ``‖XᵀY‖²_F = tr(KHLH)`` (biased) from centred factors."""
    return _hsic_from(jnp.sum((fx.T @ fy) ** 2), dx @ dy, jnp.sum(dx), jnp.sum(dy), fx.shape[0], debiased)


def linear_cka_all_pairs(px: Sequence[_Linear], py: Sequence[_Linear], debiased: bool) -> Array:
    """``(Lx, Ly)`` linear CKA of prepared layers with every cross product in **one** GEMM: the factors of all
    layers side by side, ``[F_1 … F_Lx]ᵀ[G_1 … G_Ly]``, then squared entries summed per block."""
    fx = jnp.concatenate([a.f for a in px], axis=1)
    fy = jnp.concatenate([b.f for b in py], axis=1)
    # Block sums as products with one-hot layer indicators (a scatter-add here is several times slower on CPU).
    ind_x = jnp.asarray(np.repeat(np.eye(len(px)), [a.f.shape[1] for a in px], axis=0), fx.dtype)  # (Σk_x, Lx)
    ind_y = jnp.asarray(np.repeat(np.eye(len(py)), [b.f.shape[1] for b in py], axis=0), fy.dtype)  # (Σk_y, Ly)
    cross = ind_x.T @ jnp.square(fx.T @ fy) @ ind_y  # (Lx, Ly): Σ over each block of (FᵢᵀGⱼ)²
    dx, dy = jnp.stack([a.d for a in px]), jnp.stack([b.d for b in py])
    hsic = _hsic_from(cross, dx @ dy.T, jnp.sum(dx, 1)[:, None], jnp.sum(dy, 1)[None, :], fx.shape[0], debiased)
    return _ratio(hsic, jnp.stack([a.self_ for a in px])[:, None], jnp.stack([b.self_ for b in py])[None, :])


def _ratio(num: Array, a: Array, b: Array) -> Array:
    """``num / sqrt(a·b)`` as ``num / (sqrt(a)·sqrt(b))`` (no overflow of ``a·b``); NaN where ``a`` or ``b`` is not
    positive (a representation without variance: CKA is 0/0 there)."""
    den = jnp.sqrt(jnp.maximum(a, 0.0)) * jnp.sqrt(jnp.maximum(b, 0.0))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


@functools.lru_cache(maxsize=None)
def linear_cka_metric(debiased: bool = False) -> Metric:
    def prepare(x: Array) -> _Linear:
        f = _linear_factor(x)
        d = jnp.sum(f * f, axis=1)
        sd = jnp.sum(d)
        return _Linear(f, d, _hsic_from(_linalg.gram_sq_norm(f), d @ d, sd, sd, f.shape[0], debiased))

    def compare(a: _Linear, b: _Linear) -> Array:
        return _ratio(_hsic(a.f, b.f, a.d, b.d, debiased), a.self_, b.self_)

    return prepare, compare


@functools.lru_cache(maxsize=None)
def gram_cka_metric(debiased: bool = False) -> Metric:
    """Prepare = a Gram matrix → its centred (or U-centred) version; compare = cosine of centred Grams."""
    return functools.partial(_centred_unit_gram, unbiased=debiased), _cosine


@functools.lru_cache(maxsize=None)
def rbf_cka_metric(threshold: float = 1.0, debiased: bool = False) -> Metric:
    def prepare(x: Array) -> Array:
        return _centre_kernel(gram_rbf(x, threshold), debiased)

    return prepare, _cosine


# ----------------------------------------------------------------------------------------------- public API
def _min_n(debiased: bool) -> int:
    return 4 if debiased else 2


def linear_cka(x: Array, y: Array, *, debiased: bool = False) -> Array:
    """Linear CKA similarity of ``x: (n, p1)`` and ``y: (n, p2)`` (n ≥ 4 when ``debiased``)."""
    x, y = _checks.pair(x, y, min_n=_min_n(debiased))
    return evaluate(linear_cka_metric(debiased=bool(debiased)), x, y)


def rbf_cka(x: Array, y: Array, threshold: float = 1.0, *, debiased: bool = False) -> Array:
    """RBF-kernel CKA similarity; bandwidth ``σ = threshold ×`` median pairwise distance (per layer)."""
    x, y = _checks.pair(x, y, min_n=_min_n(debiased))
    return evaluate(rbf_cka_metric(_checks.positive(threshold, "threshold"), bool(debiased)), x, y)


def cka_from_grams(k: Array, l: Array, *, debiased: bool = False) -> Array:
    """CKA similarity of two ``(n, n)`` Gram matrices of the same inputs (any kernel); centred here."""
    k, l = _checks.gram_pair(k, l, min_n=_min_n(debiased))
    return evaluate(gram_cka_metric(bool(debiased)), k, l)


# ------------------------------------------------------------------------------------ streaming minibatch CKA
class MinibatchCKA(NamedTuple):
    """Running sums of per-batch HSIC₁ (Nguyen et al. 2021) for every layer pair, each layer's activations divided
    by its ``scale``: the largest magnitude seen so far (sums rescaled when it grows, like a streaming logsumexp),
    so the sums stay in float32's range at any activation scale; the ratios are unchanged (HSIC is homogeneous)."""

    xy: Array  # (Lx, Ly)
    xx: Array  # (Lx,)
    yy: Array  # (Ly,)
    batches: Array  # () number of batches seen
    x_scale: Array  # (Lx,) largest |activation| of each x layer so far (0 before the first batch)
    y_scale: Array  # (Ly,)


def minibatch_cka_init(num_x: int, num_y: int | None = None, dtype=None) -> MinibatchCKA:
    """Empty accumulator for ``num_x`` layers against ``num_y`` layers (``None``: the same network)."""
    num_y = num_x if num_y is None else num_y
    dtype = dtype or _checks.float_dtype()
    return MinibatchCKA(jnp.zeros((num_x, num_y), dtype), jnp.zeros((num_x,), dtype), jnp.zeros((num_y,), dtype),
                        jnp.zeros((), jnp.int32), jnp.zeros((num_x,), dtype), jnp.zeros((num_y,), dtype))


def _ugrams(xs: Sequence[Array], scale: Array, dtype) -> tuple[Array, Array, Array]:
    """One batch's per-layer U-centred linear Grams of ``xs[l] / new_scale[l]``, stacked ``(L, b, b)``;
    ``new_scale = max(scale, largest |xs[l]|)`` ``(L,)`` and ``shrink = scale / new_scale`` ``(L,)`` (1 where both
    are 0), the factor each layer's earlier sums need (to the power of their degree in that layer)."""
    xs = [x.reshape(x.shape[0], -1).astype(dtype) for x in xs]
    new = jnp.maximum(scale, jnp.stack([jnp.max(jnp.abs(x)) for x in xs]))
    safe = jnp.where(new > 0, new, 1.0)
    grams = jnp.stack([_centre_kernel(gram_linear(x / safe[i]), True) for i, x in enumerate(xs)])
    return grams, new, jnp.where(new > 0, scale / safe, 1.0)


@jax.jit
def _update(state: MinibatchCKA, xs: tuple, ys: tuple | None) -> MinibatchCKA:
    dtype = state.xy.dtype
    kx, sx, rx = _ugrams(xs, state.x_scale, dtype)
    ky, sy, ry = (kx, sx, rx) if ys is None else _ugrams(ys, state.y_scale, dtype)
    b = kx.shape[1]
    scale = 1.0 / (b * (b - 3))
    xy = jnp.einsum("aij,bij->ab", kx, ky) * scale
    xx = jnp.einsum("aij,aij->a", kx, kx) * scale
    yy = xx if ys is None else jnp.einsum("aij,aij->a", ky, ky) * scale
    rx2, ry2 = rx * rx, ry * ry  # HSIC(K_l, L_m) has degree 2 in each layer's activations
    return MinibatchCKA(state.xy * rx2[:, None] * ry2[None, :] + xy, state.xx * rx2 * rx2 + xx,
                        state.yy * ry2 * ry2 + yy, state.batches + 1, sx, sy)


def minibatch_cka_update(state: MinibatchCKA, xs: Sequence[Array], ys: Sequence[Array] | None = None
                         ) -> MinibatchCKA:
    """Add one batch: ``xs[l]: (b, …)`` activations of layer ``l`` (trailing dims flattened), ``ys`` likewise for
    the other network (``None``: ``xs`` against itself). Every layer must hold the same ``b ≥ 4`` inputs."""
    def check(layers, name, count):
        if not isinstance(layers, (list, tuple)) or len(layers) != count:
            raise ValueError(f"{name}: expected a list of {count} arrays (one per layer), got "
                             f"{type(layers).__name__} of length {len(layers) if hasattr(layers, '__len__') else '?'}")
        out = []
        for i, a in enumerate(layers):
            a = jnp.asarray(a) if not isinstance(a, jax.core.Tracer) else a
            out.append(_checks.activations(a.reshape(a.shape[0], -1) if a.ndim > 2 else a, f"{name}[{i}]", min_n=4))
        if len({a.shape[0] for a in out}) != 1:
            raise ValueError(f"{name}: all layers must hold the same batch of inputs, got sizes "
                             f"{[a.shape[0] for a in out]}")
        return tuple(out)

    xs = check(xs, "xs", state.xx.shape[0])
    ys = None if ys is None else check(ys, "ys", state.yy.shape[0])
    if ys is not None:
        _checks.same_n(xs[0], ys[0], ("xs", "ys"))
    return _update(state, xs, ys)


def minibatch_cka_result(state: MinibatchCKA) -> Array:
    """``(Lx, Ly)`` minibatch CKA: ``Σ_b HSIC₁(K_b, L_b) / sqrt(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b))`` (NaN
    in the rows/columns of a layer without variance)."""
    if int(state.batches) == 0:
        raise ValueError("state: no batch added yet (call minibatch_cka_update first)")
    if not all(bool(jnp.all(jnp.isfinite(a))) for a in state[:3] + state[4:]):  # the sums and the scales
        raise ValueError("state: non-finite HSIC sums (a batch with NaN/Inf activations was added inside jit, "
                         "where its values could not be checked)")
    return _ratio(state.xy, state.xx[:, None], state.yy[None, :])


def minibatch_cka(batches: Iterable[tuple[Sequence[Array], Sequence[Array] | None]]) -> Array:
    """Minibatch CKA over an iterable of ``(xs, ys)`` batches (``ys=None``: one network against itself)."""
    state = None
    for xs, ys in batches:
        if state is None:
            state = minibatch_cka_init(len(xs), None if ys is None else len(ys))
        state = minibatch_cka_update(state, xs, ys)
    if state is None:
        raise ValueError("batches: empty; expected at least one (xs, ys) batch")
    return minibatch_cka_result(state)
