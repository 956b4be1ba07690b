"""Dense building blocks of the similarity code: Gram matrices that skip the redundant half of their flops,
triangular solves, and the serialisation of LAPACK-backed calls inside a traced program (jaxlib <= 0.11.0 only)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.lax import linalg as lax_linalg

from jaxprune import _compat

Array = jax.Array
_LEAF = 256  # blocks of at most 2·_LEAF columns are multiplied whole


# The only switch of the workaround below: jaxlib <= 0.11.0 deadlocks on concurrent LAPACK calls (see after); the
# version gate and the release that removes it are in jaxprune._compat.
_SERIALISE = _compat.SERIALISE_LAPACK


def after(x, token, *, smallest_only: bool = False):
    """``x`` (a pytree of arrays), made to depend on ``token`` (any pytree), values unchanged.

    Used to run the LAPACK factorisations of independent layers one after another inside one jitted program:
    jaxlib 0.10.2's (and 0.11.0's) CPU LAPACK kernels split a batched call over XLA's intra-op thread pool and
    block a pool thread while waiting, so as many concurrent SVD/eigh calls as the pool has threads (2 on a 2-core
    machine) deadlock the process. XLA:CPU runs independent ops concurrently by data dependencies (an
    ``optimization_barrier`` is dropped after scheduling), so the dependency is a real one: ``a + 0·t`` with a
    finite scalar ``t`` taken from ``token`` (exactly ``a``; XLA does not fold ``0·t`` for floats), on every
    floating leaf ``a`` — or, with ``smallest_only``, on the smallest one only, which suffices when the consumer is
    one op reading every leaf (it cannot start before all its operands exist) and spares copying the large ones.
    Each call stays internally parallel. On jaxlib >= 0.11.1 (no such deadlock) ``x`` is returned as is.
    """
    if not _SERIALISE or token is None:
        return x
    leaves, tree = jax.tree_util.tree_flatten(x)
    floating = [i for i, a in enumerate(leaves) if jnp.issubdtype(a.dtype, jnp.floating)]
    if not floating:
        return x
    t = jnp.nan_to_num(jax.tree_util.tree_leaves(token)[0].ravel()[0].astype(jnp.float32), posinf=0.0, neginf=0.0)
    for i in [min(floating, key=lambda j: leaves[j].size)] if smallest_only else floating:
        leaves[i] = leaves[i] + (0.0 * t).astype(leaves[i].dtype)
    return jax.tree_util.tree_unflatten(tree, leaves)


class Serial:
    """Calls that run one after another inside a traced program: ``serial(fn, *args)`` is ``fn(*args)`` with the
    arguments made to depend (:func:`after`) on the previous call's result. Used for the LAPACK-backed calls
    (SVD, eigh, Cholesky, triangular solves) only, so at most one runs at a time while XLA's own ops (GEMMs,
    elementwise work) still overlap with them. ``serial.op(fn, *args)``: the same for an ``fn`` that is a single
    op reading all its arguments (one triangular solve, say): only the smallest argument carries the dependency.
    On jaxlib >= 0.11.1 both are plain calls (:func:`after` passes its arguments through)."""

    def __init__(self):
        self.token = None

    def __call__(self, fn, *args, **kwargs):
        return self._run(fn, args, kwargs, smallest_only=False)

    def op(self, fn, *args, **kwargs):
        return self._run(fn, args, kwargs, smallest_only=True)

    def _run(self, fn, args, kwargs, smallest_only: bool):
        out = fn(*after(args, self.token, smallest_only=smallest_only), **kwargs)
        self.token = out
        return out


def unit_scale(x: Array) -> Array:
    """``x`` (any shape) divided by its largest magnitude, so every entry is in ``[-1, 1]`` (an all-zero ``x`` is
    returned as is). Every similarity here is invariant to isotropic scaling, so this changes a result by rounding
    only, and the products and sums of squares that follow neither overflow nor underflow float32 whatever the
    scale of the input (``‖XᵀX‖²_F`` of ReLU activations of a few thousand overflows, of 1e-10 underflows)."""
    m = jnp.max(jnp.abs(x))
    return x / jnp.where(m > 0, m, 1.0)


def scaled_centred(x: Array) -> tuple[Array, Array, Array]:
    """``x: (n, p)`` → ``(xc, xs, mean)``: ``xs = x / c`` for one ``c > 0``, ``mean (p,)`` its column means and
    ``xc = xs - mean`` with largest magnitude 1 (all zero when every column is constant). Scaled before centring
    (a sum of huge values overflows) and after (what is left may be far smaller); a constant column is exactly
    zero in ``xc`` (its computed mean can differ from the constant by rounding, noise the rescaling would blow up
    into a plausible-looking unit)."""
    safe = lambda m: jnp.where(m > 0, m, 1.0)
    hi, lo = jnp.max(x, axis=0), jnp.min(x, axis=0)  # (p,): every scale below is read from these, no extra pass
    m1 = safe(jnp.maximum(jnp.max(hi), -jnp.min(lo)))
    x = x / m1
    mean = jnp.mean(x, axis=0)
    varies = hi > lo
    # largest |x/m1 - mean| per column, exactly: division and subtraction round monotonically
    m2 = safe(jnp.max(jnp.where(varies, jnp.maximum(hi / m1 - mean, mean - lo / m1), 0.0)))
    return jnp.where(varies, x - mean, 0.0) / m2, x / m2, mean / m2


def centred(x: Array) -> Array:
    """``x: (n, p)`` → centred columns with largest magnitude 1 (:func:`scaled_centred`)."""
    return scaled_centred(x)[0]


def gram(x: Array) -> Array:
    """``x: (n, p)`` → ``xᵀx (p, p)`` computing only the upper block triangle (≈ ``n·p²`` flops instead of
    ``2·n·p²``): columns split in halves ``[a b]``, ``aᵀa`` and ``bᵀb`` recursively, one product ``aᵀb``."""
    p = x.shape[1]
    if p <= 2 * _LEAF:
        return x.T @ x
    h = p // 2
    a, b = x[:, :h], x[:, h:]
    ab = a.T @ b
    return jnp.block([[gram(a), ab], [ab.T, gram(b)]])


def upper_cholesky(g: Array) -> Array:
    """``g (p, p)`` symmetric positive definite → upper-triangular ``r`` with ``rᵀr = g`` (NaN where not PD)."""
    return jnp.linalg.cholesky(g).T


def solve_upper(r: Array, b: Array, *, right: bool = False, transpose: bool = False) -> Array:
    """Triangular solve with an upper-triangular ``r (p, p)``: ``r⁻¹ b`` (``b: (p, m)``), ``r⁻ᵀ b``
    (``transpose=True``) or, with ``right=True``, ``b r⁻¹`` (``b: (m, p)``). A BLAS ``trsm`` on CPU: ``m·p²`` flops
    (half a GEMM's) at the BLAS library's rate — for ``X̃ R⁻¹`` with ``n ≫ p`` markedly faster than inverting
    ``r`` and multiplying with XLA's dot. LAPACK-class: serialise it (:class:`Serial`).

    Posed on the transposes (``(b r⁻¹)ᵀ = r⁻ᵀ bᵀ`` …, with ``rᵀ`` as the lower factor): the BLAS call takes
    column-major operands, and a row-major ``b`` is ``bᵀ`` in column-major order, so the operand ``b`` (an
    ``n × p`` layer, say) needs no transposed copy. XLA's layout assignment may still relayout the result (twice
    when it is returned from a jitted program, seen in the compiled HLO): keep such results inside the program."""
    # b r⁻¹ = (L⁻¹ bᵀ)ᵀ, r⁻ᵀ b = (bᵀ L⁻ᵀ)ᵀ, r⁻¹ b = (bᵀ L⁻¹)ᵀ with L = rᵀ lower triangular.
    return lax_linalg.triangular_solve(r.T, b.T, left_side=right, lower=True, transpose_a=transpose).T


def gram_sq_norm(x: Array) -> Array:
    """``‖xᵀx‖²_F`` for ``x: (n, p)`` from the upper block triangle of ``xᵀx`` only (≈ ``n·p²`` flops)."""
    p = x.shape[1]
    if p <= 2 * _LEAF:
        return jnp.sum(jnp.square(x.T @ x))
    h = p // 2
    a, b = x[:, :h], x[:, h:]
    return gram_sq_norm(a) + gram_sq_norm(b) + 2.0 * jnp.sum(jnp.square(a.T @ b))
