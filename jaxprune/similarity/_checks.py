"""Input validation at the public boundary (outside jit) and the conv-map flattening helper.

Checks on *shapes* always run (shapes are static, also for tracers). Checks on *values* (NaN/Inf) need concrete
arrays: when a public function is called on tracers (inside the caller's ``jit``/``vmap``), value checks are
skipped and a non-finite input propagates into a NaN result, as any JAX computation would.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
CONV_MODES = ("flatten", "pixel")


def float_dtype() -> np.dtype:
    """The computation dtype: float32 by default, float64 when x64 is enabled (every input is cast to it)."""
    return jnp.dtype(jnp.result_type(float))


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


@jax.jit
def _all_finite(x: Array) -> Array:
    return jnp.all(jnp.isfinite(x))


def traced(*arrays) -> bool:
    """Whether any argument is a tracer (called inside the caller's ``jit``/``vmap``): its values were not checked."""
    return any(not _is_concrete(a) for a in arrays)


def nan_unless_finite(value: Array, *inputs: Array) -> Array:
    """``value`` where every entry of ``inputs`` is finite, NaN otherwise: inside ``jit`` a non-finite input cannot
    raise, and the scaling to largest magnitude 1 (``_linalg.unit_scale``) would turn it into plausible numbers."""
    ok = jnp.all(jnp.stack([_all_finite(a) for a in inputs]))
    return jnp.where(ok, value, jnp.nan)


def _as_float(x, name: str) -> Array:
    """``x`` as an array of the computation dtype, checked finite after the cast (a value beyond float32's range
    is caught too): on the host for host arrays, on the device for device arrays; on tracers only the cast."""
    dtype = float_dtype()
    if isinstance(x, jax.Array):
        out = x.astype(dtype)
        finite = (lambda: bool(_all_finite(out))) if _is_concrete(out) else (lambda: True)
    else:
        with np.errstate(over="ignore"):  # an overflow to inf is reported below
            host = np.asarray(x, dtype)  # numpy casts faster than jnp.asarray(x, dtype)
        out = jax.device_put(host)  # (a plain copy: several times faster than jnp.asarray here)
        finite = lambda: bool(np.isfinite(host).all())
    if not finite():
        bad = int(out.size - int(jnp.count_nonzero(jnp.isfinite(out))))
        raise ValueError(f"{name}: {bad} non-finite value(s) (NaN or Inf, or beyond {out.dtype}'s range); expected "
                         f"finite activations")
    return out


def activations(x, name: str = "x", *, min_n: int = 2) -> Array:
    """``x: (n, p)`` samples-first activations → a float array; errors name ``name`` and the expected form."""
    if not hasattr(x, "shape"):
        try:
            x = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - re-raised with the argument name
            raise TypeError(f"{name}: expected an array of shape (n, p), got {type(x).__name__}") from e
    if x.ndim != 2:
        hint = " (conv maps (n, h, w, c): use similarity.flatten_conv first)" if x.ndim == 4 else ""
        raise ValueError(f"{name}: expected a 2-D array (n samples, p features), got shape {tuple(x.shape)}{hint}")
    n, p = x.shape
    if n < min_n:
        raise ValueError(f"{name}: expected at least {min_n} samples (rows), got shape {tuple(x.shape)}")
    if p < 1:
        raise ValueError(f"{name}: expected at least one feature (column), got shape {tuple(x.shape)}")
    return _as_float(x, name)


def same_n(x: Array, y: Array, names: tuple[str, str] = ("x", "y")) -> None:
    if x.shape[-2] != y.shape[-2]:
        raise ValueError(f"{names[0]} has {x.shape[-2]} samples but {names[1]} has {y.shape[-2]}: both must hold "
                         f"the same inputs in the same order (samples first)")


def pair(x, y, *, min_n: int = 2) -> tuple[Array, Array]:
    x, y = activations(x, "x", min_n=min_n), activations(y, "y", min_n=min_n)
    same_n(x, y)
    return x, y


def gram(k, name: str = "k", *, min_n: int = 2) -> Array:
    """``k: (n, n)`` kernel (Gram) matrix → float array."""
    if not hasattr(k, "shape"):
        k = np.asarray(k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"{name}: expected a square (n, n) Gram matrix, got shape {tuple(k.shape)}")
    if k.shape[0] < min_n:
        raise ValueError(f"{name}: expected at least {min_n} samples, got shape {tuple(k.shape)}")
    if _is_concrete(k):
        a = np.asarray(k, np.float64)
        if np.isfinite(a).all() and not np.allclose(a, a.T, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(a).max()))):
            raise ValueError(f"{name}: expected a symmetric Gram matrix (k == k.T)")
    return _as_float(k, name)


def gram_pair(k, l, *, min_n: int = 2) -> tuple[Array, Array]:
    k, l = gram(k, "k", min_n=min_n), gram(l, "l", min_n=min_n)
    same_n(k, l, ("k", "l"))
    return k, l


def epsilon(value: float | None, name: str = "epsilon") -> float | None:
    if value is not None and not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{name}={value}: expected None (automatic) or a relative tolerance in [0, 1)")
    return None if value is None else float(value)


def fraction(value: float, name: str, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name}={value!r}: expected a fraction in (0, 1]")
    return float(value)


def positive(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or not float(value) > 0.0:
        raise ValueError(f"{name}={value!r}: expected a positive number")
    return float(value)


def flatten_conv(a, mode: str = "flatten") -> Array:
    """Conv maps ``(n, h, w, c)`` → 2-D activations; 2-D inputs pass through unchanged.

    * ``"flatten"``: ``(n, h·w·c)`` — every unit at every position is a feature; samples are the inputs (this is
      what CKA/NBS use, and what makes layers with different spatial sizes comparable);
    * ``"pixel"``: ``(n·h·w, c)`` — every spatial position of every input is a sample, channels are the features
      (svcca's recommendation for conv layers; only layers of equal ``n·h·w`` can be compared).
    """
    if mode not in CONV_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {CONV_MODES}")
    a = jnp.asarray(a)
    if a.ndim == 2:
        return a
    if a.ndim != 4:
        raise ValueError(f"a: expected conv maps (n, h, w, c) or activations (n, p), got shape {tuple(a.shape)}")
    n, h, w, c = a.shape
    return a.reshape(n, h * w * c) if mode == "flatten" else a.reshape(n * h * w, c)


def layers(xs: Sequence, name: str) -> tuple[list[Array], int | None]:
    """A non-empty sequence of ``(n, p_l)`` arrays, or of ``(s, n, p_l)`` stacks (same ``s``); returns the stack size."""
    if isinstance(xs, dict):
        raise TypeError(f"{name}: expected a sequence of arrays; for a dict pass list(d.values())")
    if not isinstance(xs, (list, tuple)) or not xs:
        raise ValueError(f"{name}: expected a non-empty list of (n, p) arrays (one per layer)")
    ndims = {getattr(x, "ndim", np.ndim(x)) for x in xs}
    if ndims == {3}:
        out = []
        for i, x in enumerate(xs):
            if not hasattr(x, "shape"):
                x = np.asarray(x)
            if x.shape[1] < 2:
                raise ValueError(f"{name}[{i}]: expected at least 2 samples, got shape {tuple(x.shape)}")
            out.append(_as_float(x, f"{name}[{i}]"))
        sizes = {x.shape[0] for x in out}
        if len(sizes) != 1:
            raise ValueError(f"{name}: stacked layers (s, n, p) must share the stack size s, got {sorted(sizes)}")
        stack = sizes.pop()
    elif ndims == {2}:
        out, stack = [activations(x, f"{name}[{i}]") for i, x in enumerate(xs)], None
    else:
        raise ValueError(f"{name}: expected every layer as (n, p), or every layer as a stack (s, n, p); got ndims "
                         f"{sorted(ndims)} (flatten conv maps with similarity.flatten_conv)")
    ns = {x.shape[-2] for x in out}
    if len(ns) != 1:
        raise ValueError(f"{name}: all layers must hold the same n samples, got {sorted(ns)}")
    return out, stack
