"""Dense building blocks of the similarity code: Gram matrices and triangular products that skip the redundant
half of their flops, and the serialisation of LAPACK-backed calls inside a traced program."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.lax import linalg as lax_linalg

Array = jax.Array
_LEAF = 256  # blocks of at most 2·_LEAF columns are multiplied whole


def after(x, token):
    """``x`` (a pytree of float arrays), made to depend on ``token`` (any pytree), values unchanged.

    Used to run the LAPACK factorisations of independent layers one after another inside one jitted program:
    jaxlib 0.10.2's CPU LAPACK kernels split a batched call over XLA's intra-op thread pool and block a pool
    thread while waiting, so as many concurrent SVD/eigh calls as the pool has threads (2 on a 2-core machine)
    deadlock the process. XLA:CPU runs independent ops concurrently by data dependencies (an
    ``optimization_barrier`` is dropped after scheduling), so the dependency is a real one: ``x + 0·t`` with a
    finite scalar ``t`` taken from ``token`` (exactly ``x``; XLA does not fold ``0·t`` for floats).
    Each call stays internally parallel.
    """
    if token is None:
        return x
    t = jnp.nan_to_num(jax.tree_util.tree_leaves(token)[0].ravel()[0].astype(jnp.float32), posinf=0.0, neginf=0.0)
    return jax.tree_util.tree_map(
        lambda a: a + (0.0 * t).astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, x)


class Serial:
    """Calls that run one after another inside a traced program: ``serial(fn, *args)`` is ``fn(*args)`` with the
    arguments made to depend (:func:`after`) on the previous call's result. Used for the LAPACK-backed calls
    (SVD, eigh, Cholesky, triangular solves) only, so at most one runs at a time while XLA's own ops (GEMMs,
    elementwise work) still overlap with them."""

    def __init__(self):
        self.token = None

    def __call__(self, fn, *args, **kwargs):
        out = fn(*after(args, self.token), **kwargs)
        self.token = out
        return out


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


def upper_matmul(x: Array, u: Array) -> Array:
    """``x (n, p) @ u (p, p)`` for upper-triangular ``u`` without multiplying its zero lower block triangle
    (≈ ``n·p²`` flops instead of ``2·n·p²``)."""
    p = u.shape[0]
    if p <= 2 * _LEAF:
        return x @ u
    h = p // 2
    left = upper_matmul(x[:, :h], u[:h, :h])
    return jnp.concatenate([left, x[:, :h] @ u[:h, h:] + upper_matmul(x[:, h:], u[h:, h:])], axis=1)


def upper_cholesky(g: Array) -> Array:
    """``g (p, p)`` symmetric positive definite → upper-triangular ``r`` with ``rᵀr = g`` (NaN where not PD)."""
    return jnp.linalg.cholesky(g).T


def upper_inverse(r: Array) -> Array:
    """``r⁻¹`` of an upper-triangular ``r (p, p)`` (upper triangular too)."""
    return lax_linalg.triangular_solve(r, jnp.eye(r.shape[0], dtype=r.dtype), left_side=True, lower=False)


def gram_sq_norm(x: Array) -> Array:
    """``‖xᵀx‖²_F`` for ``x: (n, p)`` from the upper block triangle of ``xᵀx`` only (≈ ``n·p²`` flops)."""
    p = x.shape[1]
    if p <= 2 * _LEAF:
        return jnp.sum(jnp.square(x.T @ x))
    h = p // 2
    a, b = x[:, :h], x[:, h:]
    return gram_sq_norm(a) + gram_sq_norm(b) + 2.0 * jnp.sum(jnp.square(a.T @ b))
