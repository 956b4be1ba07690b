"""The graph's result types: :class:`Layer` (a linear layer) and :class:`Graph` (layers + unit table)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from jaxprune.graph.program import Net, Program

Array = jax.Array
PyTree = Any

OUTPUT = "it is an output layer: its units are (or are coupled to) the model's outputs"


@dataclasses.dataclass(frozen=True)
class Layer:
    """A linear layer of the graph.

    ``name``: module path (``"block1/conv_a"``); ``kind``: ``"dense"``, ``"conv"`` or ``"heads"`` (an attention
    projection ``(d, heads, head_dim)`` whose units are its heads, on axis ``unit_axis`` of its output); ``units``:
    its outputs;
    ``kernel``: index of its kernel leaf (``Net.paths``), ``in_axis``/``out_axis`` of that kernel; ``bias``: index
    of a bias leaf in its chain or None; ``batchnorm``: ``{'mean', 'var', 'scale', 'bias'}`` leaf indices and
    ``'epsilon'`` when its chain has BatchNorm's inference form; ``inputs``/``consumers``: producer/consumer layer
    names (``"input"`` for the model input); ``activation``: what follows the chain on the way to the consumers
    (``"relu"``, another primitive's name, or ``None``).
    """

    name: str
    kind: str
    units: int
    eqn: int
    chain: tuple[int, ...]
    out: int  # var id of the chain's output (the pre-activation)
    kernel: int
    in_axis: int
    out_axis: int
    bias: int | None
    batchnorm: tuple | None  # (("mean", i), ("var", i), ("scale", i), ("bias", i), ("epsilon", eps))
    inputs: tuple[str, ...]
    consumers: tuple[str, ...]
    positions: int  # output positions per example (h·w for a conv, 1 for dense)
    zero: tuple[int, ...] = ()  # chain leaves zeroed (with the kernel column) to silence a unit
    unit_axis: int = -1  # the axis of the layer's output holding its units (-2: attention heads, kind "heads")

    @property
    def bn(self) -> dict | None:
        return None if self.batchnorm is None else dict(self.batchnorm)


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """Layers in forward order and the unit table (see the module docstring)."""

    net: Net
    program: Program
    layers: dict  # name -> Layer, forward order
    kinds: tuple  # per eqn: "linear", "chain", "activation", "affine", "merge", "move", "pool", "reduce", "weight",
    #                "opaque", "depthwise", "grouped" (jaxprune.graph.convs), "statistic" (jaxprune.graph.norms)
    notes: tuple  # per eqn: why opaque or unsupported (or "")
    owner: np.ndarray  # unit id -> producer index (-1 input, -2 constant/opaque, k: k-th layer)
    index: np.ndarray  # unit id -> index within its producer
    cls: np.ndarray  # unit id -> coupling class representative
    frozen: dict  # class id -> reason its units cannot be removed
    slices: tuple  # ((leaf index, axis, unit ids (size,)), ...): every leaf axis indexed by units
    unit_ids: dict  # layer name -> (units,) unit ids
    near: tuple  # per eqn: the last layer before it (for messages)
    origins: dict  # activation var id -> (last dim,) unit ids
    refused: dict  # module path -> why its linear-looking operation is not a supported layer
    uses: dict  # var id -> indices of the equations reading it
    normed: dict = dataclasses.field(default_factory=dict)  # class id -> the norm mixing it with all its channels
    norms: dict = dataclasses.field(default_factory=dict)  # norm name -> (groups, size) unit ids it normalises

    # ------------------------------------------------------------------ queries
    def layer(self, name: str) -> Layer:
        if name not in self.layers:
            why = f" ({self.refused[name]})" if name in self.refused else ""
            raise ValueError(f"layer={name!r}: not a supported linear layer of the model{why}; its layers are "
                             f"{list(self.layers)}")
        return self.layers[name]

    def output_layers(self) -> tuple[str, ...]:
        outs = set()
        for o in self.program.out_ids:
            if isinstance(o, int) and o in self.origins:
                outs |= {self._owner_name(u) for u in self.origins[o]}
        return tuple(n for n in self.layers if n in outs)

    def input_layers(self) -> tuple[str, ...]:
        return tuple(n for n, l in self.layers.items() if "input" in l.inputs)

    def _owner_name(self, u: int) -> str:
        o = int(self.owner[u])
        return "input" if o == -1 else "constant" if o == -2 else list(self.layers)[o]

    def coupled(self, name: str) -> tuple[str, ...]:
        """Other layers whose units are coupled to ``name``'s (through residual adds, shared channels)."""
        ids = self.unit_ids[self.layer(name).name]
        classes = set(self.cls[ids].tolist())
        members = np.flatnonzero(np.isin(self.cls, list(classes)))
        return tuple(n for n in self.layers if n != name and
                     np.isin(self.unit_ids[n], members).any())

    def why_not_prunable(self, name: str) -> str | None:
        """None when ``name``'s units can be removed alone; else the reason."""
        ids = self.unit_ids[self.layer(name).name]
        reasons = [self.frozen[int(c)] for c in self.cls[ids] if int(c) in self.frozen]
        if reasons:
            return OUTPUT if OUTPUT in reasons else reasons[0]
        others = self.coupled(name)
        if others:
            return (f"its units are coupled to layers {list(others)} (a residual add, a shared channel, attention "
                    "heads, a grouped convolution's channel group or a gated product): remove units from all of them alike, in one call (remove_many with "
                    "the same kept units; structured.keep_coupled extends one layer's kept units to the others)")
        return None

    def prunable(self) -> tuple[str, ...]:
        return tuple(n for n in self.layers if self.why_not_prunable(n) is None)

    def coupled_groups(self) -> tuple[tuple[str, ...], ...]:
        """Groups of ≥ 2 layers that can only shrink together (every unit class unfrozen)."""
        groups, seen = [], set()
        for n in self.layers:
            if n in seen:
                continue
            others = self.coupled(n)
            if not others:
                continue
            g = (n,) + others
            seen |= set(g)
            ids = np.concatenate([self.unit_ids[m] for m in g])
            if not any(int(c) in self.frozen for c in self.cls[ids]):
                groups.append(tuple(m for m in self.layers if m in g))
        return tuple(groups)

    # ------------------------------------------------------------------ removal
    def removed_units(self, keep: Mapping[str, Any]) -> np.ndarray:
        """``keep: {layer: kept indices}`` → boolean ``(n_units_total,)`` of removed unit ids; refuses frozen units
        and removals that leave part of a coupled class behind (naming the layers)."""
        removed = np.zeros(self.owner.shape, bool)
        for name, k in keep.items():
            layer = self.layer(name)
            ids = self.unit_ids[name]
            on = np.zeros(layer.units, bool)
            on[np.asarray(k, np.int64)] = True
            removed[ids[~on]] = True
        classes = np.unique(self.cls[removed])
        for c in classes:
            c = int(c)
            if c in self.frozen:
                who = sorted({self._owner_name(int(m)) for m in np.flatnonzero(self.cls == c) if removed[m]})
                raise ValueError(f"layer={who[0] if len(who) == 1 else who!r}: cannot remove units "
                                 f"({self.frozen[c]}); layers that can shrink alone: {list(self.prunable())}")
            members = np.flatnonzero(self.cls == c)
            if not removed[members].all():
                missing = [m for m in members if not removed[m]]
                names = sorted({self._owner_name(int(m)) for m in members})
                left = [f"{self._owner_name(int(m))}[{int(self.index[m])}]" for m in missing]
                raise ValueError(f"keep: units of {sorted({self._owner_name(int(m)) for m in members if removed[m]})} "
                                 f"are coupled to units {left} (a residual add, a shared channel, a norm's channel "
                                 f"group, a grouped convolution's channel group, attention heads or a gated product "
                                 f"join {names}); remove the coupled units of every one of these layers alike, in one "
                                 "call (remove_many)")
        return removed

