"""The library's conventions, each defined once: how many units or weights a fraction removes, which of equal scores
goes first, how a spread over seeds is reported, and BatchNorm's epsilon.

Every module and experiment that needs one of these reads it from here (``docs/design.md``, "Conventions").

* **Counts.** Pruning a fraction ``f`` of ``n`` removes ``ceil(f · n)``: at least the fraction asked for, in
  float64, with a ``1e-9`` slack so that ``0.2 · 265`` is 53 and ``0.7 · 300`` is 210, not 211
  (:func:`n_to_prune`). Weight masks, unit removal, neuron merging's widths and the experiments' sweeps all use it.
* **Ties.** Among equal scores the *earlier* one is kept and the later one pruned first: for units the lower index
  (and, in a global ranking, the earlier layer; ``jaxprune.structured.select_by_scores``,
  ``jaxprune.criteria.global_keep``), for weights the earlier position in the parameters' flattening order (leaf
  order, then row-major; both backends of ``jaxprune.masks``).
* **Spread over seeds.** ``± std`` is the sample standard deviation (``ddof = 1``) of the per-seed values; one seed
  gives a std of 0.0 (no spread to estimate) and ``n = 1`` says so (:func:`summary`).
* **BatchNorm epsilon.** :data:`BN_EPSILON` (flax's default, 1e-5) in every BatchNorm of ``jaxprune.models``;
  structure-reading code (merging, LRP canonizers) reads each model's own epsilon from its graph instead.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxprune import _validate

__all__ = ["BN_EPSILON", "STD_DDOF", "n_to_prune", "summary"]

BN_EPSILON = 1e-5
STD_DDOF = 1
_SLACK = 1e-9  # absorbs float error in fraction · n (0.7 · 300 = 210.00000000000003)


def n_to_prune(fraction: float, n: int | np.ndarray) -> int | np.ndarray:
    """``ceil(fraction · n)`` (int, or int64 array for an array ``n``): the units or weights a fraction removes.

    ``fraction`` in [0, 1] (ValueError naming it otherwise); ``n >= 0``."""
    f = _validate.fraction(fraction, what="a fraction to remove")
    counts = np.ceil(f * np.asarray(n, np.float64) - _SLACK).astype(np.int64)
    counts = np.maximum(counts, 0)
    return int(counts) if np.ndim(counts) == 0 else counts


def summary(values: Sequence[float]) -> dict:
    """``{"mean", "std", "n"}`` of per-seed values: the sample std (``ddof = 1``; 0.0 for a single value)."""
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("values: expected at least one per-seed value")
    std = float(v.std(ddof=STD_DDOF)) if v.size > STD_DDOF else 0.0
    return {"mean": float(v.mean()), "std": std, "n": int(v.size)}
