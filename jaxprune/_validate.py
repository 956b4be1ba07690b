"""Checks of public arguments shared across the library, each giving one line that names the argument and the
expected form (``key=0: expected a jax.random key …``) instead of a deep JAX traceback or a plausible wrong number.

They run outside ``jit`` on concrete values, and on traced values where the check is about dtype and shape only
(:func:`key`), so a jitted caller keeps working.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

__all__ = ["key", "optional_key", "fraction", "widths", "labels"]

KEY_FORM = "jax.random.PRNGKey(seed) or jax.random.key(seed)"


def _describe(value: Any) -> str:
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"an array of shape {tuple(shape)} and dtype {dtype}"
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def key(value: Any, name: str = "key", *, batch: int | None = None) -> Any:
    """``value`` unchanged when it is a JAX PRNG key (a typed key of shape ``()``, or a raw ``uint32`` key of shape
    ``(2,)`` / ``(4,)``; with ``batch=K``: K of them stacked on a leading axis); else a TypeError naming ``name``.
    Works on traced values (checks dtype and shape only)."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    lead = () if batch is None else (int(batch),)
    ok = False
    if shape is not None and dtype is not None:
        shape = tuple(shape)
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            ok = shape == lead
        else:
            ok = np.dtype(dtype) == np.uint32 and shape[:-1] == lead and len(shape) == len(lead) + 1 \
                and shape[-1] in (2, 4)
    if not ok:
        what = KEY_FORM if batch is None else f"{batch} keys stacked on a leading axis (jax.random.split(key, {batch}))"
        raise TypeError(f"{name}={_describe(value)}: expected a jax.random key, {what}")
    return value


def optional_key(value: Any, name: str = "key") -> Any:
    """:func:`key`, or ``None``."""
    return None if value is None else key(value, name)


def fraction(value: Any, name: str = "fraction", *, what: str = "a fraction") -> float:
    """``value`` as a float in [0, 1] (a Python or numpy real number, not a bool, string or ``None``; NaN refused);
    else a ValueError naming ``name``. A traced value is refused: the counts it sets must be concrete."""
    if isinstance(value, jax.core.Tracer):
        raise ValueError(f"{name}: a traced value; expected a Python float in [0, 1] (under jit, close over it)")
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok and isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        ok = np.issubdtype(np.asarray(value).dtype, np.number) and not np.issubdtype(np.asarray(value).dtype, np.bool_)
    f = float(value) if ok else math.nan
    if not 0.0 <= f <= 1.0:  # also NaN
        raise ValueError(f"{name}={value!r}: expected {what} in [0, 1] (a float, e.g. 0.2)")
    return f


def widths(value: Any, name: str = "hidden", *, allow_empty: bool = True) -> tuple[int, ...]:
    """Layer widths as a tuple of integers >= 1 (``(300, 100)``); a zero, negative or non-integer width is refused
    naming ``name``."""
    try:
        items = tuple(value)
    except TypeError:
        items = (value,)
    bad = [w for w in items if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)) or w < 1]
    if bad:
        raise ValueError(f"{name}={','.join(map(str, items))}: expected layer widths as integers >= 1 (e.g. 300,100); "
                         f"got {bad[0]!r}")
    if not items and not allow_empty:
        raise ValueError(f"{name}: expected at least one layer width >= 1 (e.g. 300,100)")
    return tuple(int(w) for w in items)


def labels(y: Any, num_classes: int, n: int, name: str = "y", x_name: str = "x") -> None:
    """Refuse training labels that a ``num_classes``-way classifier cannot learn: ``y`` not ``(n,)`` integers (one
    per example of ``x_name``), or labels outside ``[0, num_classes)`` (they train to a NaN loss)."""
    shape, dtype = getattr(y, "shape", None), getattr(y, "dtype", None)
    if shape is None or len(shape) != 1 or not np.issubdtype(np.dtype(dtype), np.integer):
        raise ValueError(f"{name}: expected integer class labels of shape ({n},), got {_describe(y)}")
    if shape[0] != n:
        raise ValueError(f"{name}: {shape[0]} labels for {n} examples of {x_name}; expected one label per example "
                         f"({name}: ({n},))")
    if n:
        lo, hi = int(np.min(np.asarray(y))), int(np.max(np.asarray(y)))
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: label {bad} is outside [0, {num_classes}); the model has {num_classes} "
                             "outputs (classes), so labels must be 0 … num_classes - 1")
