"""Canonizers: pure parameter transforms that make a network LRP-friendly without changing its function.

:func:`fold_batchnorm` merges every BatchNorm into the convolution (or dense layer) before it, pairing names as
the library's models do (``conv_i``/``bn_i``, ``X_conv``/``X_bn``) at every nesting level. The input variables
are not modified; "undoing" the canonizer is simply using the original variables again.
"""
from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp

__all__ = ["fold_batchnorm", "batchnorm_pairs"]

Variables = dict[str, Any]


def batchnorm_pairs(params: dict) -> list[tuple[str, str]]:
    """``[(linear_name, bn_name), …]`` for the BatchNorms directly in ``params`` (one nesting level)."""
    pairs = []
    for name in params:
        m = re.fullmatch(r"bn_(\d+)", name) or re.fullmatch(r"(.*)_bn", name)
        if m is None:
            continue
        lin = f"conv_{m.group(1)}" if name.startswith("bn_") else f"{m.group(1)}_conv"
        if name.startswith("bn_") and lin not in params:
            lin = f"dense_{m.group(1)}"
        if lin not in params:
            raise ValueError(f"params: BatchNorm {name!r} has no preceding layer {lin!r} to fold into")
        pairs.append((lin, name))
    return pairs


def _fold(params: dict, stats: dict, epsilon: float) -> dict:
    out = {k: v for k, v in params.items()}
    for lin, bn in batchnorm_pairs(params):
        if bn not in stats:
            raise ValueError(f"variables: BatchNorm {bn!r} has no batch_stats (mean/var); pass the full variables")
        kernel = params[lin]["kernel"]
        g = params[bn]["scale"] / jnp.sqrt(stats[bn]["var"] + epsilon)  # (c,)
        bias = params[lin].get("bias", jnp.zeros_like(g))
        out[lin] = {"kernel": kernel * g, "bias": (bias - stats[bn]["mean"]) * g + params[bn]["bias"]}
        del out[bn]
    for k, v in params.items():
        if isinstance(v, dict) and k in out and "kernel" not in v and "scale" not in v:
            out[k] = _fold(v, stats.get(k, {}), epsilon)
    return out


def fold_batchnorm(variables: Variables, epsilon: float = 1e-5) -> Variables:
    """``{'params': …, 'batch_stats': …}`` → ``{'params': …}`` with each BatchNorm folded into its layer.

    ``y = scale (conv(x) + b − mean) / sqrt(var + ε) + bias`` becomes a conv with kernel ``w · g`` and bias
    ``(b − mean) g + bias``, ``g = scale / sqrt(var + ε)`` (per output channel). ``epsilon``: the BatchNorm's
    (the library's models use 1e-5).
    """
    if not isinstance(variables, dict) or "params" not in variables:
        raise ValueError("variables: expected a dict {'params': ..., 'batch_stats': ...}")
    return {"params": _fold(variables["params"], variables.get("batch_stats", {}), epsilon)}
