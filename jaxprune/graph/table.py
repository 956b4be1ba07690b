"""The unit table the op handlers fill while the program is read (:class:`UnitTable`).

Every channel is a *unit* id; ``origin[var]`` holds, per position of an activation's last axis, the unit it carries.
Units are joined into coupling classes (a union-find), frozen with a reason (the model's input or output, a mixing
operation), and the parameter axes they index are recorded as *slices* (what removing a unit cuts)."""
from __future__ import annotations

from typing import Any

import numpy as np

from jaxprune.graph.program import Eqn, Net, Program, _last


class _UF:
    def __init__(self):
        self.parent: list[int] = []

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def classes(self) -> np.ndarray:
        return np.asarray([self.find(i) for i in range(len(self.parent))], np.int64)


class UnitTable:
    """Units, their owners (``-1`` input, ``-2`` constant/opaque, ``k``: the k-th layer), coupling classes, frozen
    units, activation origins, weight sources and leaf slices of one program (``n``: the model, ``prog``: its
    program). Op handlers read and write it; :func:`jaxprune.graph.analyse.analyse` turns it into a Graph."""

    def __init__(self, n: Net, prog: Program):
        self.n, self.prog, self.shapes = n, prog, prog.shapes
        self.leaf_of = {vid: i for i, vid in enumerate(prog.leaf_ids)}
        self.uf = _UF()
        self.owner: list[int] = []
        self.index: list[int] = []
        self.frozen_units: dict[int, str] = {}
        self.origin: dict[int, np.ndarray] = {}  # activation var -> (last dim,) unit ids
        self.heads: dict[int, tuple[int, np.ndarray]] = {}  # activation var -> (head axis, head unit ids)
        self.sources: dict[int, frozenset] = {vid: frozenset({i}) for vid, i in self.leaf_of.items()}
        self.sources.update({vid: frozenset() for vid in prog.consts})
        self.layers: list[dict] = []
        self.slices: dict[tuple[int, int], np.ndarray] = {}
        self.last_layer: str | None = None
        self.refused: dict[str, str] = {}
        self.kinds: list[str] = []  # per equation read so far (the next one's index is len(kinds))
        # normalisations (jaxprune.graph.norms): statistics over channels (var -> Stat; not activations), units a
        # norm's statistic mixes (unit -> norm name), each norm's channel groups (name -> (groups, size) unit ids)
        self.stats: dict[int, Any] = {}
        self.normed: dict[int, str] = {}
        self.norms: dict[str, np.ndarray] = {}
        x_units = self.new_units(_last(self.shapes[prog.x_id]), -1)
        self.origin[prog.x_id] = x_units
        self.freeze(x_units, "they are coupled to the model's input channels")

    # ------------------------------------------------------------------ units
    def new_units(self, count: int, who: int) -> np.ndarray:
        ids = self.uf.add(count)
        self.owner.extend([who] * count)
        self.index.extend(range(count))
        return ids

    def freeze(self, ids: Any, reason: str) -> None:
        for u in np.asarray(ids).ravel().tolist():
            self.frozen_units.setdefault(int(u), reason)

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        """Couple units ``a[i]`` and ``b[i]`` (same length)."""
        for u, v in zip(np.asarray(a).tolist(), np.asarray(b).tolist()):
            self.uf.union(u, v)

    def acts(self, e: Eqn) -> list[int]:
        """The activation operands of ``e`` (var ids carrying units)."""
        return [a for a in e.ins if isinstance(a, int) and a in self.origin]

    def opaque(self, e: Eqn, note: str, act_in: list | None = None) -> tuple[str, str]:
        """An operation nothing can follow: its activation inputs' units and its outputs' (new) units are frozen."""
        for a in self.acts(e) if act_in is None else act_in:
            self.freeze(self.origin[a], f"their channels are mixed by {note}")
        for o, shp in zip(e.outs, e.shapes):
            ids = self.new_units(_last(shp), -2)
            self.freeze(ids, f"they come from {note}")
            self.origin[o] = ids
        return "opaque", note

    def weights_only(self, e: Eqn) -> tuple[str, str]:
        """A computation on parameters and constants alone (BatchNorm's ``rsqrt(var + eps)``): its sources. With a
        norm's statistic among its inputs (``rsqrt(var(x) + eps) · scale``) its outputs are that statistic."""
        src = frozenset().union(*[self.sources.get(a, frozenset()) for a in e.ins if isinstance(a, int)])
        for o in e.outs:
            self.sources[o] = src
        stats = [self.stats[a] for a in e.ins if isinstance(a, int) and a in self.stats]
        if not stats:
            return "weight", ""
        for o in e.outs:
            self.stats[o] = stats[0].merge(stats[1:])
        return "statistic", ""

    # ------------------------------------------------------------------ parameter slices
    def add_slice(self, leaf: int, axis: int, ids: np.ndarray) -> None:
        """Record that ``leaf``'s ``axis`` is indexed by units ``ids`` (a second reading couples them)."""
        key = (leaf, axis % max(len(np.shape(self.n.leaves[leaf])), 1))
        if key not in self.slices:
            self.slices[key] = np.asarray(ids)
        elif self.slices[key].shape != np.shape(ids):
            self.freeze(np.concatenate([self.slices[key], ids]), f"parameter {self.n.paths[leaf]!r} is read with "
                                                                 "different channel layouts")
        else:
            self.unite(self.slices[key], ids)

    def per_channel_followers(self, w: Any, c: int, ids: np.ndarray) -> None:
        """Record the leaves of a weight operand ``w`` indexed by the channel axis (``c`` channels, units ``ids``)."""
        if isinstance(w, tuple) or w not in self.sources:
            return
        if _last(self.shapes.get(w, ())) != c or c == 1:
            return
        for leaf in self.sources[w]:
            ls = np.shape(self.n.leaves[leaf])
            if len(ls) and ls[-1] == c:
                self.add_slice(leaf, len(ls) - 1, ids)
            else:
                self.freeze(ids, f"the per-channel operand computed from parameter {self.n.paths[leaf]!r} (shape "
                                 f"{ls}) does not index its last axis by channel")

    def per_channel_only(self, w: Any) -> bool:
        """True when operand ``w`` is a scalar or varies along the channel axis only."""
        if isinstance(w, tuple):
            return np.ndim(w[1]) == 0 or int(np.prod(np.shape(w[1]))) == 1
        return all(int(d) == 1 for d in self.shapes.get(w, ())[:-1])
