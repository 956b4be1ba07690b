"""Data-driven unit (neuron / filter) importance for structured pruning (Yeom et al. 2021, "Pruning by explaining").

Every criterion returns ``dict[layer name -> (n_units,) float32]`` for the hidden linear layers (``dense_i``,
``conv_i``; not the output layer); higher means more important (kept). These plug into
``jaxprune.structured.select_by_scores`` per layer, or into :func:`global_keep` for one ranking across layers.

* ``weight``: L1 norm of a unit's incoming weights (Li et al. 2017); normalised by the layer's L1 norm.
* ``grad``: ``|mean ∂L/∂z|`` over samples (and positions) at the pre-activation ``z`` (Sun et al. 2017); layer L2.
* ``taylor``: ``|mean z · ∂L/∂z|`` (Molchanov et al. 2017); layer L2.
* ``lrp``: relevance summed over samples (and positions) at the unit's output; layer L1.

``L`` is the per-sample cross-entropy at the given labels; LRP explains the label's logit.
BatchNorm models are canonized first (so ``z`` is the BatchNorm output, the input to the ReLU).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import lrp, structured
from jaxprune.lrp import composites as C
from jaxprune.lrp.relevance import (_check_forward, canonical_params, forward, hidden_layers, linear_layers,
                                     program, split_variables)

Array = jax.Array
Scores = dict[str, Array]

__all__ = ["CRITERIA", "NORMS", "scores", "weight", "grad", "taylor", "lrp_scores", "normalize", "global_keep"]

CRITERIA = ("weight", "grad", "taylor", "lrp")
NORMS = {"weight": "l1", "grad": "l2", "taylor": "l2", "lrp": "l1"}  # Yeom et al.'s per-layer normalisations


def normalize(values: Array, norm: str, *, name: str = "values") -> Array:
    """``v / ‖v‖₁`` (``"l1"``), ``v / ‖v‖₂`` (``"l2"``) or ``v`` (``"none"``) for ``values: (n_units,)``; an
    all-zero layer stays zero.

    NaN or infinite values raise a ValueError naming ``name`` (a layer's scores), whatever ``norm``: normalising
    would hide them (a NaN norm turned the whole layer into zeros). Under ``jit`` (traced values) they propagate
    as NaN instead, which :func:`jaxprune.structured.select_by_scores` and :func:`global_keep` refuse.
    """
    if norm not in ("l1", "l2", "none"):
        raise ValueError(f"norm={norm!r}: expected 'l1', 'l2' or 'none'")
    if not isinstance(values, jax.core.Tracer):
        structured._check_scores(values, name)
    if norm == "none":
        return values
    size = jnp.sum(jnp.abs(values)) if norm == "l1" else jnp.sqrt(jnp.sum(values * values))
    return jnp.where(size == 0, 0.0, values / jnp.where(size == 0, 1.0, size))


def _normalize_layers(criterion: str, raw: Scores, layers, norm: str | None) -> Scores:
    return {k: normalize(raw[k], norm or "none", name=f"{criterion} scores of layer {k!r}") for k in layers}


def _unit_mean(a: Array) -> Array:
    """``(n, …, units) -> (units,)`` mean over samples and positions."""
    return jnp.mean(a.reshape(-1, a.shape[-1]), axis=0)


def _check_batch(prog, params: dict, x: Any, y: Any) -> tuple[Array, Array]:
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x: expected a non-empty float reference batch (n, …), got shape {x.shape} dtype {x.dtype}")
    _check_forward(prog, params, x)
    classes = _classes(prog, params)
    y = np.asarray(y)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y: expected int labels of shape ({x.shape[0]},), got shape {y.shape} dtype {y.dtype}")
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"y: labels must lie in [0, {classes})")
    return x, jnp.asarray(y, jnp.int32)


def _classes(prog, params) -> int:
    return int(params[linear_layers(prog)[-1][0]]["kernel"].shape[-1])


def weight(model: nn.Module, variables: Any, *, norm: str | None = "l1") -> Scores:
    """Incoming-weight L1 norm per unit: dense kernel ``(in, out)`` → ``(out,)``, conv ``(kh, kw, cin, cout)``."""
    params, _ = split_variables(variables)
    layers = hidden_layers(program(model))
    raw = {k: jnp.sum(jnp.abs(structured.unit_vectors(params[k]["kernel"])), axis=1) for k in layers}
    return _normalize_layers("weight", raw, layers, norm)


@jax.jit
def _ce(logits: Array, y: Array) -> Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _pre_activation_grads(prog, params: dict, x: Array, y: Array) -> tuple[dict, dict]:
    shapes = jax.eval_shape(lambda v: forward(prog, params, v, where="pre")[1], x)
    zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}

    def loss(p):
        logits, z = forward(prog, params, x, probes=p, where="pre")
        return jnp.sum(_ce(logits, y)), z

    g, z = jax.grad(loss, has_aux=True)(zeros)
    return z, g


_pre_activation_grads_jit = jax.jit(_pre_activation_grads, static_argnums=0)


@jax.jit
def _grad_taylor(z: dict, g: dict) -> tuple[dict, dict]:
    return ({k: jnp.abs(_unit_mean(g[k])) for k in g}, {k: jnp.abs(_unit_mean(z[k] * g[k])) for k in g})


def _gradient_scores(which: int, model, variables, x, y, norm) -> Scores:
    prog = program(model)
    params = canonical_params(variables)
    x, y = _check_batch(prog, params, x, y)
    z, g = _pre_activation_grads_jit(prog, params, x, y)
    raw = _grad_taylor(z, g)
    criterion, layers = ("grad", "taylor")[which], hidden_layers(prog)
    if which == 0:  # a NaN pre-activation gets a zero ReLU gradient: only z·∂L/∂z shows it (Taylor: below)
        for k in layers:
            structured._check_scores(raw[1][k], f"{criterion} scores of layer {k!r} (z·∂L/∂z)")
    return _normalize_layers(criterion, raw[which], layers, norm)


def grad(model: nn.Module, variables: Any, x: Any, y: Any, *, norm: str | None = "l2") -> Scores:
    """``|mean ∂L/∂z|`` at each hidden layer's pre-activation, over the reference batch ``x: (n, …)``, ``y: (n,)``."""
    return _gradient_scores(0, model, variables, x, y, norm)


def taylor(model: nn.Module, variables: Any, x: Any, y: Any, *, norm: str | None = "l2") -> Scores:
    """``|mean z · ∂L/∂z|`` (first-order Taylor estimate of the loss change when the unit is removed)."""
    return _gradient_scores(1, model, variables, x, y, norm)


def lrp_scores(model: nn.Module, variables: Any, x: Any, y: Any = None, *,
               composite: C.Composite | lrp.Rule | str = "zplus", norm: str | None = "l1") -> Scores:
    """Relevance summed over the reference batch at each hidden unit (ReLU output; relevance is the same at the
    pre-activation, as ReLU passes it through). ``y=None`` explains the predicted classes."""
    prog = program(model)
    if y is not None:
        _check_batch(prog, canonical_params(variables), x, y)
    rel = lrp.relevance(model, variables, x, composite=composite, target=y)
    layers = hidden_layers(prog)
    raw = {k: jnp.sum(rel.layers[k].reshape(-1, rel.layers[k].shape[-1]), axis=0) for k in layers}
    return _normalize_layers("lrp", raw, layers, norm)


def scores(criterion: str, model: nn.Module, variables: Any, x: Any = None, y: Any = None, *,
           normalized: bool = True, composite: C.Composite | lrp.Rule | str = "zplus") -> Scores:
    """Scores of ``criterion`` (one of :data:`CRITERIA`), with Yeom et al.'s normalisation unless
    ``normalized=False``. ``x, y``: the reference batch (unused by ``weight``)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}: expected one of {CRITERIA}")
    norm = NORMS[criterion] if normalized else "none"
    if criterion == "weight":
        return weight(model, variables, norm=norm)
    if x is None or (y is None and criterion != "lrp"):
        raise ValueError(f"criterion={criterion!r} needs a reference batch: pass x (n, …) and labels y (n,)")
    if criterion == "lrp":
        return lrp_scores(model, variables, x, y, composite=composite, norm=norm)
    return (grad if criterion == "grad" else taylor)(model, variables, x, y, norm=norm)


def global_keep(scores: Scores, n_remove: int, *, min_keep: int = 1) -> dict[str, Array]:
    """Remove the ``n_remove`` globally lowest-scoring units; ``{layer: kept indices (k,) int32, ascending}``.

    Ties go to the lower index within a layer and to the earlier layer across layers (both are kept first).
    Every layer keeps at least ``min_keep`` units (its best ones), so the network stays connected.
    ``scores[layer]`` must be 1-D and finite (a ValueError naming the layer otherwise).
    """
    names = list(scores)
    scores = {k: structured._check_scores(scores[k], f"scores[{k!r}]") for k in names}  # NaN would sort largest
    sizes = [int(scores[k].size) for k in names]
    total = sum(sizes)
    if not 0 <= n_remove <= total - min_keep * len(names):
        raise ValueError(f"n_remove={n_remove}: expected 0..{total - min_keep * len(names)} "
                         f"({total} units, keeping >= {min_keep} per layer)")
    vals = np.concatenate([scores[k] for k in names])
    layer = np.concatenate([np.full(s, i) for i, s in enumerate(sizes)])
    index = np.concatenate([np.arange(s) for s in sizes])
    rank_in_layer = np.concatenate([np.argsort(np.argsort(-scores[k], kind="stable"),
                                               kind="stable") for k in names])
    protected = rank_in_layer < min_keep
    # Order of removal: lowest score first; among ties the higher index / later layer goes first.
    order = np.lexsort((-index, -layer, vals))
    order = order[~protected[order]][:n_remove]
    removed = np.zeros(total, bool)
    removed[order] = True
    out, start = {}, 0
    for k, s in zip(names, sizes):
        out[k] = jnp.asarray(np.flatnonzero(~removed[start:start + s]), jnp.int32)
        start += s
    return out
