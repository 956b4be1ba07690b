"""Composites: which rule each linear layer uses, chosen by layer path, role or kind (as zennit's composites).

Layers are those of the model's graph (:mod:`jaxprune.graph`), named by module path (``"block1/conv_a"``).
Lookup order for a layer: an exact ``names`` entry, then its role (``"input"``: a layer reading the model input,
``graph.input_layers()``; ``"output"``: a layer producing the model's outputs, ``graph.output_layers()``; a layer
with both roles takes the ``"input"`` rule), then its kind (``"dense"`` or ``"conv"``), then ``default``.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from jaxprune import graph
from jaxprune.lrp import rules as R

LayerInfo = tuple[str, str, tuple[str, ...]]  # (name, kind, roles)

__all__ = ["Composite", "layer_info",
           "epsilon_all", "zplus_all", "epsilon_plus", "epsilon_alpha2_beta1", "epsilon_gamma_box",
           "epsilon_plus_flat", "PRESETS", "get"]

KINDS = ("dense", "conv", "input", "output")


@dataclasses.dataclass(frozen=True)
class Composite:
    """``default`` rule plus overrides ``kinds`` (``(("conv", ZPlus()), …)``) and ``names`` (``(("dense_0", …),)``)."""

    default: R.Rule = R.Epsilon()
    kinds: tuple[tuple[str, R.Rule], ...] = ()
    names: tuple[tuple[str, R.Rule], ...] = ()

    def __post_init__(self):
        for k, rule in self.kinds:
            if k not in KINDS:
                raise ValueError(f"kinds: unknown layer kind {k!r}; expected one of {KINDS}")
        for k, rule in (*self.kinds, *self.names, ("default", self.default)):
            if not isinstance(rule, R.Rule):
                raise TypeError(f"composite rule for {k!r}: expected a jaxprune.lrp.rules.Rule, got {rule!r}")

    @classmethod
    def of(cls, default: R.Rule = R.Epsilon(), *, kinds: Mapping[str, R.Rule] | None = None,
           names: Mapping[str, R.Rule] | None = None) -> "Composite":
        """Build from dicts: ``Composite.of(Epsilon(), kinds={"conv": ZPlus()}, names={"dense_0": Flat()})``."""
        return cls(default, tuple((kinds or {}).items()), tuple((names or {}).items()))

    def rule_for(self, name: str, kind: str, roles: Sequence[str] = ()) -> R.Rule:
        """The rule of layer ``name`` of ``kind`` with ``roles`` (a subset of ``("input", "output")``)."""
        by_name, by_kind = dict(self.names), dict(self.kinds)
        if name in by_name:
            return by_name[name]
        for role in ("input", "output"):
            if role in roles and role in by_kind:
                return by_kind[role]
        return by_kind.get(kind, self.default)

    def assign(self, layers: "graph.Graph | Sequence[LayerInfo]") -> tuple[tuple[str, R.Rule], ...]:
        """Rules for the linear layers of a graph (or ``((name, kind, roles), …)`` as :func:`layer_info` gives
        them), in forward order: ``((name, rule), …)``. A ``names`` entry matching no layer is a ValueError
        naming it and listing the model's layers."""
        if isinstance(layers, graph.Graph):
            layers = layer_info(layers)
        known = [n for n, _, _ in layers]
        unknown = [n for n, _ in self.names if n not in known]
        if unknown:
            raise ValueError(f"composite names {unknown} match no linear layer; the model has {known}")
        return tuple((n, self.rule_for(n, k, roles)) for n, k, roles in layers)


def layer_info(g: graph.Graph) -> tuple[LayerInfo, ...]:
    """``((name, kind, roles), …)`` of ``g``'s linear layers in forward order; ``roles`` holds ``"input"`` for a
    layer reading the model input and ``"output"`` for one producing the model's outputs."""
    ins, outs = set(g.input_layers()), set(g.output_layers())
    return tuple((n, l.kind, tuple(r for r, s in (("input", ins), ("output", outs)) if n in s))
                 for n, l in g.layers.items())


def epsilon_all(epsilon: float = 1e-6) -> Composite:
    """LRP-ε everywhere (ε → 0: gradient × input on ReLU nets)."""
    return Composite(R.Epsilon(epsilon))


def zplus_all(sign_aware: bool = True) -> Composite:
    """LRP-z⁺ everywhere; ``sign_aware=False`` is the literal form Yeom et al.'s toy code runs (see ``ZPlus``)."""
    return Composite(R.ZPlus(sign_aware))


def epsilon_plus(epsilon: float = 0.25) -> Composite:
    """ε for dense layers, z⁺ for convolutions (zennit's EpsilonPlus)."""
    return Composite(R.Epsilon(epsilon), kinds=(("conv", R.ZPlus()),))


def epsilon_alpha2_beta1(epsilon: float = 0.25) -> Composite:
    """ε for dense layers, α2β1 for convolutions (Yeom et al.'s image-model setting)."""
    return Composite(R.Epsilon(epsilon), kinds=(("conv", R.ALPHA2_BETA1),))


def epsilon_plus_flat(epsilon: float = 0.25) -> Composite:
    """flat for the first layer, z⁺ for convolutions, ε for dense layers."""
    return Composite(R.Epsilon(epsilon), kinds=(("input", R.Flat()), ("conv", R.ZPlus())))


def epsilon_gamma_box(low: float | tuple = 0.0, high: float | tuple = 1.0, *, epsilon: float = 0.25,
                      gamma: float = 0.25) -> Composite:
    """z^B (box ``[low, high]``) for the first layer, γ for convolutions, ε for dense layers."""
    return Composite(R.Epsilon(epsilon), kinds=(("input", R.ZBox(low, high)), ("conv", R.Gamma(gamma))))


PRESETS = {
    "epsilon": epsilon_all,
    "zplus": zplus_all,
    "zplus_literal": lambda: zplus_all(sign_aware=False),
    "epsilon_plus": epsilon_plus,
    "epsilon_alpha2_beta1": epsilon_alpha2_beta1,
    "epsilon_plus_flat": epsilon_plus_flat,
    "epsilon_gamma_box": epsilon_gamma_box,
    "alpha2_beta1": lambda: Composite(R.ALPHA2_BETA1),
    "alpha1_beta0": lambda: Composite(R.ALPHA1_BETA0),
}


def get(composite: "Composite | R.Rule | str") -> Composite:
    """A composite from a preset name, a single rule (used everywhere) or a composite."""
    if isinstance(composite, Composite):
        return composite
    if isinstance(composite, R.Rule):
        return Composite(composite)
    if isinstance(composite, str) and composite in PRESETS:
        return PRESETS[composite]()
    raise ValueError(f"composite={composite!r}: expected a Composite, a Rule, or one of {sorted(PRESETS)}")
