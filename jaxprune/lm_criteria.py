"""Unit scores of a language model: the criteria of :mod:`jaxprune.criteria` for any Flax model that maps token ids
``x: (n, t) int -> logits (n, t, vocab)``, explained at the true next tokens ``y: (n, t) int`` (``y[:, i]`` follows
``x[:, i]``).

* ``grad`` / ``taylor``: ``|mean ∂L/∂z|`` and ``|mean z·∂L/∂z|`` over examples and positions, with the objective
  ``L = Σ_{examples, positions} CE(logits[:, i], y[:, i])``: the negative log-likelihood of the true next tokens,
  summed over positions (each window's loss is its ``t`` next-token predictions).
* ``lrp``: relevance started at the true next-token logit of EVERY position, each logit its own relevance (LXT
  and the AttnLRP paper start at the explained token's logit: ``logit.backward(logit)``; a language model
  predicts at every position, and LRP is linear in the started relevance, so this is the sum of the ``t``
  per-position explanations). It flows back to the embedding output (the first float values computed from the
  ids; ids carry none) under the AttnLRP or CP-LRP rules (:mod:`jaxprune.lrp.interpret`). A unit scores the
  relevance at its output summed over examples and positions (a head: over its channels, by
  :func:`jaxprune.structured.select_groups`).
* ``weight`` and every other data-free entry of the one table :data:`jaxprune.criteria.CRITERIA`: as
  :func:`jaxprune.criteria.scores` (no data).

Scores are ``{layer: (units,) float32}`` for every non-output linear layer, as :func:`jaxprune.criteria.scores`
gives them, normalised per layer by Yeom et al.'s norms unless ``normalized=False``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import criteria, unit_criteria
from jaxprune.lrp import interpret
from jaxprune.lrp.relevance import build_graph, non_output_layers

Array = jax.Array

__all__ = ["LM_SCORES", "scores", "grad", "taylor", "lrp_scores", "check_batch"]

def check_batch(model: Any, variables: Any, x: Any, y: Any):
    """``(graph, x, y)`` for token ids ``x: (n, t) int`` in ``[0, vocabulary)`` and next tokens ``y: (n, t) int``
    in ``[0, vocab)`` of a model returning ``(n, t, vocab)``; each ValueError names its argument."""
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[0] < 1 or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"x: expected integer token ids (n, t) with n >= 1, got shape {x.shape} dtype {x.dtype}")
    g = build_graph(model, variables, jax.ShapeDtypeStruct(x.shape, x.dtype))
    criteria._check_ids(g, x)
    out = g.program.shapes.get(g.program.out_ids[0]) if len(g.program.out_ids) == 1 else None
    if out is None or tuple(out[:2]) != x.shape or len(out) != 3:
        raise ValueError(f"model: expected a language model returning logits (n, t, vocab) = ({x.shape[0]}, "
                         f"{x.shape[1]}, vocab), got outputs of shape {out}")
    y = np.asarray(y)
    if y.shape != x.shape or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y: expected int next tokens of shape {x.shape}, got shape {y.shape} dtype {y.dtype}")
    if y.min() < 0 or y.max() >= out[2]:
        raise ValueError(f"y: next tokens must lie in [0, {out[2]}), got range [{y.min()}, {y.max()}]")
    return g, x, jnp.asarray(y, jnp.int32)


def grad(model: Any, variables: Any, x: Any, y: Any, *, norm: str | None = "l2") -> criteria.Scores:
    """``|mean ∂L/∂z|`` at each non-output layer's pre-activation ``z: (n, t, units)``; ``L`` the summed
    next-token cross-entropy (module docstring)."""
    return criteria.graph_gradient_scores(0, *check_batch(model, variables, x, y), norm)


def taylor(model: Any, variables: Any, x: Any, y: Any, *, norm: str | None = "l2") -> criteria.Scores:
    """``|mean z · ∂L/∂z|`` over examples and positions; ``L`` as in :func:`grad`."""
    return criteria.graph_gradient_scores(1, *check_batch(model, variables, x, y), norm)


def lrp_scores(model: Any, variables: Any, x: Any, y: Any, *, composite: Any = "attn_lrp",
               norm: str | None = "l1") -> criteria.Scores:
    """Relevance at each non-output layer's output summed over examples and positions, started at the true
    next-token logit of every position (module docstring). ``composite``: ``"attn_lrp"``, ``"cp_lrp"`` or a
    :class:`jaxprune.lrp.PrimitiveComposite`."""
    comp = interpret.get(composite)
    g, x, y = check_batch(model, variables, x, y)
    layers = non_output_layers(g)
    rel = interpret.graph_relevance(g, comp, x, lambda: y, layers)
    raw = {k: criteria._unit_sum(rel.layers[k], g.layers[k].unit_axis) for k in layers}
    return criteria._normalize_layers("lrp", raw, layers, norm)


def scores(criterion: str, model: Any, variables: Any, x: Any, y: Any = None, *, normalized: bool = True,
           composite: Any = "attn_lrp") -> criteria.Scores:
    """Scores of ``criterion`` (a name of the one table :data:`jaxprune.criteria.CRITERIA` that scores) on token
    ids ``x: (n, t)`` and next tokens ``y: (n, t)``: ``grad``, ``taylor`` and ``lrp`` (:data:`LM_SCORES`) on the
    language model's objective; a data-free entry (``weight``, ``l1``, …) as :func:`jaxprune.criteria.scores`
    (it reads only ``x``'s shape); the entry's per-layer norm unless ``normalized=False``."""
    entry = unit_criteria.get(criterion, ("model", "vectors"))
    if criterion not in LM_SCORES:
        if entry.needs_data:
            raise ValueError(f"criterion={criterion!r}: a data-driven criterion on a language model must be one of "
                             f"{tuple(LM_SCORES)} (its objective is the next-token likelihood)")
        return criteria.scores(criterion, model, variables, x, normalized=normalized)
    if y is None:
        raise ValueError(f"criterion={criterion!r} needs the next tokens y (n, t) of the token ids x (n, t)")
    norm = entry.norm if normalized else "none"
    if criterion == "lrp":
        return lrp_scores(model, variables, x, y, composite=composite, norm=norm)
    return LM_SCORES[criterion](model, variables, x, y, norm=norm)


LM_SCORES: dict[str, Callable[..., criteria.Scores]] = {"grad": grad, "taylor": taylor, "lrp": lrp_scores}
