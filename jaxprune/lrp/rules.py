"""LRP rules as layer functions whose backward pass is the rule (Montavon et al. 2019, "Layer-wise relevance
propagation: an overview").

A linear layer ``z = op(x, w) + b`` (``op`` a dense product or a convolution, linear in both arguments) is wrapped
with :func:`linear`, a ``jax.custom_vjp`` whose forward is the exact layer and whose backward maps the relevance
``r`` of the outputs to the relevance of the inputs. Writing ``c_ij`` for the contribution of input ``i`` to
output ``j`` and ``z_j = Σ_i c_ij (+ bias)``, every rule here is

    R_i = Σ_j c_ij / z_j · R_j

with a rule-specific ``c`` (identity, positive part, γ-boosted, flat, squared weights, box-bounded). The sum over
``j`` is the transposed linear map, i.e. the VJP of ``op`` with respect to its input, so dense and convolutional
layers share one implementation. Parameters get zero cotangents (relevance is about inputs).

Rules are frozen dataclasses (hashable, so they are static under ``jit``):

* :class:`Epsilon` — ``c = x w``, ``z = Σ c + b + ε·sign(z)`` (sign(0) = +1); ε = 0 is LRP-0 (gradient × input).
* :class:`ZPlus` — ``c = (x w)⁺``, bias ignored; conservative wherever ``z > 0``.
* :class:`AlphaBeta` — ``α (x w)⁺ / z⁺ − β (x w)⁻ / z⁻`` with ``α − β = 1``; presets :data:`ALPHA2_BETA1`,
  :data:`ALPHA1_BETA0` (= z⁺). Bias ignored.
* :class:`Gamma` — ``c = x w + γ (x w)⁺``, bias ``b + γ b⁺``, ε-stabilised.
* :class:`Flat` — ``c = 1`` for every connection (uniform over the receptive field).
* :class:`WSquare` — ``c = w²``.
* :class:`ZBox` — ``c = x w − l w⁺ − h w⁻`` for inputs bounded by ``l ≤ x ≤ h`` (the first layer).

``(x w)⁺`` means ``x⁺ w⁺ + x⁻ w⁻`` (the positive part of each product), so the rules also hold for signed inputs.
Everything between linear layers (activations, pooling, residual adds) is handled where the model's graph is
replayed (:func:`jaxprune.graph.run`): weight-free linear maps share relevance in proportion to their inputs, max
pooling keeps its gradient (everything to the winner), activations pass relevance unchanged.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune.graph import safe_divide, stabilize  # the z-rule's division, shared with the graph replay

Array = jax.Array
Op = Callable[[Array, Array], Array]

__all__ = ["DenseOp", "ConvOp", "Rule", "Epsilon", "ZPlus", "AlphaBeta", "Gamma", "Flat",
           "WSquare", "ZBox", "ALPHA2_BETA1", "ALPHA1_BETA0", "linear", "apply_linear",
           "stabilize", "safe_divide"]


# ----------------------------------------------------------------------------------------------- linear maps
@dataclasses.dataclass(frozen=True)
class DenseOp:
    """``x: (n, d_in) @ w: (d_in, d_out)``."""

    def __call__(self, x: Array, w: Array) -> Array:
        return x @ w


@dataclasses.dataclass(frozen=True)
class ConvOp:
    """NHWC convolution with an HWIO kernel, as ``flax.linen.Conv`` computes it."""

    padding: str | tuple = "SAME"
    strides: tuple[int, int] = (1, 1)

    def __call__(self, x: Array, w: Array) -> Array:
        return lax.conv_general_dilated(x, w, self.strides, self.padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# ----------------------------------------------------------------------------------------------- helpers
def _back(op: Op, w: Array, s: Array, x_like: Array) -> Array:
    """``Σ_j w_ij s_j``: the transpose of the linear map ``u ↦ op(u, w)`` applied to ``s``."""
    return jax.vjp(lambda u: op(u, w), x_like)[1](s)[0]


def _check_params(rule: str, **values) -> None:
    """A ValueError naming ``rule`` and the parameter unless every value is a finite number (or tuple of them).
    Called first by every parameterised rule's ``__post_init__``: NaN fails every comparison, so range checks
    alone let it by."""
    for name, v in values.items():
        try:
            a = np.asarray(v, np.float64)
        except (TypeError, ValueError):
            a = np.array(np.nan)
        if a.dtype == object or not np.all(np.isfinite(a)):
            raise ValueError(f"{rule}: {name}={v!r}: expected a finite number (or a tuple of finite numbers)")


def _pos(a: Array) -> Array:
    return jnp.maximum(a, 0)


def _neg(a: Array) -> Array:
    return jnp.minimum(a, 0)


# ----------------------------------------------------------------------------------------------- rules
class Rule:
    """A rule maps output relevance ``r`` of ``z = op(x, w) + b`` to input relevance ``(same shape as x)``."""

    def backward(self, op: Op, x: Array, w: Array, b: Array, r: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-ε: ``R_i = Σ_j x_i w_ij / (z_j + ε sign z_j) R_j``; the bias absorbs its share."""

    epsilon: float = 1e-6

    def __post_init__(self):
        _check_params("Epsilon", epsilon=self.epsilon)
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon={self.epsilon}: expected a non-negative stabiliser")

    def backward(self, op, x, w, b, r):
        s = safe_divide(r, stabilize(op(x, w) + b, self.epsilon))
        return x * _back(op, w, s, x)


def _positive_part(op: Op, x: Array, w: Array, s: Array | None = None):
    """``Σ_i (x_i w_ij)⁺`` and, given ``s``, the input relevance ``Σ_j (x_i w_ij)⁺ s_j``."""
    xp, xn, wp, wn = _pos(x), _neg(x), _pos(w), _neg(w)
    if s is None:
        return op(xp, wp) + op(xn, wn)
    return xp * _back(op, wp, s, x) + xn * _back(op, wn, s, x)


def _negative_part(op: Op, x: Array, w: Array, s: Array | None = None):
    """``Σ_i (x_i w_ij)⁻`` and, given ``s``, the input relevance ``Σ_j (x_i w_ij)⁻ s_j``."""
    xp, xn, wp, wn = _pos(x), _neg(x), _pos(w), _neg(w)
    if s is None:
        return op(xp, wn) + op(xn, wp)
    return xp * _back(op, wn, s, x) + xn * _back(op, wp, s, x)


@dataclasses.dataclass(frozen=True)
class ZPlus(Rule):
    """LRP-z⁺, biases ignored. ``sign_aware=True`` (default, as zennit): only positive contributions,
    ``R_i = Σ_j (x_i w_ij)⁺ / Σ_i (x_i w_ij)⁺ R_j``. ``sign_aware=False``: the formula as written for ReLU inputs
    (Montavon et al. 2017/2019), ``R_i = Σ_j x_i w⁺_ij / Σ_i x_i w⁺_ij R_j``, applied literally to any input, as
    Yeom et al.'s toy code does. The two agree for ``x ≥ 0``; on a layer fed by an un-rectified layer the literal
    form gives negative relevance to units with negative output (and its denominators can change sign).
    """

    sign_aware: bool = True

    def backward(self, op, x, w, b, r):
        if self.sign_aware:
            return _positive_part(op, x, w, safe_divide(r, _positive_part(op, x, w)))
        wp = _pos(w)
        return x * _back(op, wp, safe_divide(r, op(x, wp)), x)


@dataclasses.dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-αβ: ``R_i = Σ_j (α (x_i w_ij)⁺ / z⁺_j − β (x_i w_ij)⁻ / z⁻_j) R_j``, ``α − β = 1``, biases ignored."""

    alpha: float = 2.0
    beta: float = 1.0

    def __post_init__(self):
        _check_params("AlphaBeta", alpha=self.alpha, beta=self.beta)
        if self.beta < 0 or abs(self.alpha - self.beta - 1.0) > 1e-9:
            raise ValueError(f"alpha={self.alpha}, beta={self.beta}: expected beta >= 0 and alpha - beta = 1")

    def backward(self, op, x, w, b, r):
        pos = _positive_part(op, x, w, self.alpha * safe_divide(r, _positive_part(op, x, w)))
        if self.beta == 0:
            return pos
        return pos - _negative_part(op, x, w, self.beta * safe_divide(r, _negative_part(op, x, w)))


ALPHA2_BETA1 = AlphaBeta(2.0, 1.0)
ALPHA1_BETA0 = AlphaBeta(1.0, 0.0)


@dataclasses.dataclass(frozen=True)
class Gamma(Rule):
    """LRP-γ: ``c_ij = x_i w_ij + γ (x_i w_ij)⁺``, bias ``b + γ b⁺``, denominator ε-stabilised."""

    gamma: float = 0.25
    epsilon: float = 1e-6

    def __post_init__(self):
        _check_params("Gamma", gamma=self.gamma, epsilon=self.epsilon)
        if not (self.gamma >= 0 and self.epsilon >= 0):
            raise ValueError(f"gamma={self.gamma}, epsilon={self.epsilon}: expected non-negative values")

    def backward(self, op, x, w, b, r):
        z = op(x, w) + self.gamma * _positive_part(op, x, w) + b + self.gamma * _pos(b)
        s = safe_divide(r, stabilize(z, self.epsilon))
        return x * _back(op, w, s, x) + self.gamma * _positive_part(op, x, w, s)


@dataclasses.dataclass(frozen=True)
class Flat(Rule):
    """Flat: every connected input gets an equal share, whatever ``x`` and ``w``."""

    def backward(self, op, x, w, b, r):
        ones_x, ones_w = jnp.ones_like(x), jnp.ones_like(w)
        return _back(op, ones_w, safe_divide(r, op(ones_x, ones_w)), x)


@dataclasses.dataclass(frozen=True)
class WSquare(Rule):
    """w²: shares in proportion to squared weights, whatever ``x``."""

    def backward(self, op, x, w, b, r):
        w2 = w * w
        return _back(op, w2, safe_divide(r, op(jnp.ones_like(x), w2)), x)


@dataclasses.dataclass(frozen=True)
class ZBox(Rule):
    """z^B for inputs in a box ``low ≤ x ≤ high``: ``c_ij = x_i w_ij − l_i w⁺_ij − h_i w⁻_ij`` (biases ignored).

    ``low``/``high``: a float, or one float per input channel (last axis of ``x``).
    """

    low: float | tuple[float, ...] = 0.0
    high: float | tuple[float, ...] = 1.0

    def __post_init__(self):
        _check_params("ZBox", low=self.low, high=self.high)
        lo, hi = np.asarray(self.low, np.float64), np.asarray(self.high, np.float64)
        try:
            ordered = bool(np.all(lo <= hi))
        except ValueError:  # per-channel tuples of different lengths
            ordered = False
        if lo.ndim > 1 or hi.ndim > 1 or 0 in (lo.size, hi.size) or not ordered:
            raise ValueError(f"low={self.low}, high={self.high}: expected floats (or per-channel tuples of one "
                             "length) with low <= high")

    def backward(self, op, x, w, b, r):
        lo = jnp.broadcast_to(jnp.asarray(self.low, x.dtype), x.shape)
        hi = jnp.broadcast_to(jnp.asarray(self.high, x.dtype), x.shape)
        wp, wn = _pos(w), _neg(w)
        s = safe_divide(r, op(x, w) - op(lo, wp) - op(hi, wn))
        return x * _back(op, w, s, x) - lo * _back(op, wp, s, x) - hi * _back(op, wn, s, x)


# ----------------------------------------------------------------------------------------------- custom VJPs
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def linear(rule: Rule, op: Op, x: Array, w: Array, b: Array) -> Array:
    """``op(x, w) + b`` whose VJP is ``rule`` (cotangent in = output relevance, out = input relevance)."""
    return op(x, w) + b


def _linear_fwd(rule, op, x, w, b):
    return op(x, w) + b, (x, w, b)


def _linear_bwd(rule, op, res, r):
    x, w, b = res
    return rule.backward(op, x, w, b, r), jnp.zeros_like(w), jnp.zeros_like(b)


linear.defvjp(_linear_fwd, _linear_bwd)


def apply_linear(rule: Rule | None, op: Op, x: Array, w: Array, b: Array | None) -> Array:
    """The layer under ``rule``; ``rule=None`` is the plain layer (ordinary gradients)."""
    b = jnp.zeros((w.shape[-1],), x.dtype) if b is None else b
    return op(x, w) + b if rule is None else linear(rule, op, x, w, b)
