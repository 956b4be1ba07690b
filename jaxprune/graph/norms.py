"""Normalisations over channels (LayerNorm, RMSNorm, GroupNorm — any norm written with the same operations), read
from the program, not from class names.

A **statistic** is a ``reduce_sum`` of an activation over its channel axis (with or without spatial axes, never the
batch axis) whose result — through elementwise operations, broadcasts and reshapes, possibly with parameters (``·
scale``) — only comes back onto the *same* activation in elementwise operations (``x - mean``, ``(x - mean) ·
rsqrt(var + eps) · scale``). Statistics are not activations (kind ``"statistic"``): the activation keeps its units
through the norm, and the norm's per-channel scale and bias follow them. A GroupNorm reshapes the channels into
``(groups, size)`` first (a *split*, which couples nothing) and reduces over the size axis: each group's channels
become one coupled class, so whole groups are removed; the rebuilt model must normalise in the kept groups
(:func:`regrouped`). A statistic over all channels (LayerNorm, RMSNorm, ``GroupNorm(1)``) leaves its channels
removable one by one — removal changes the statistic, as in a smaller model written with the sliced parameters —
but masking cannot equal removal there (zeros still count in the mean), so :func:`jaxprune.graph.silence` refuses
those units naming the norm (``Graph.normed``). A reduction over channels used any other way (a feature, a gate, an
output) mixes the channels: its units are frozen as before.

A norm is named by the module path of the parameters its statistic meets (``"blocks_0/norm"``: the scale), else
``"the normalisation after layer 'X'"``. The plan (which reductions are statistics) is read from the whole program
once, before the handlers run: a handler sees only the equations before it.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Sequence

import numpy as np

from jaxprune.graph import ops
from jaxprune.graph.model_graph import Graph
from jaxprune.graph.program import Eqn, Program
from jaxprune.graph.table import UnitTable

STAT_OPS = ops.ELEMENTWISE | {"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "convert_element_type"}


@dataclasses.dataclass(frozen=True)
class Stat:
    """A statistic: ``groups: (G, size)`` unit ids normalised together (None: statistics of different channels
    combined; ``units``: all of them), ``roots``: the reductions it comes from, ``near``: the layer before."""

    groups: np.ndarray | None
    roots: frozenset
    near: str | None
    units: np.ndarray

    def merge(self, others: Sequence["Stat"]) -> "Stat":
        same = all(o.groups is not None and self.groups is not None and np.array_equal(o.groups, self.groups)
                   for o in others)
        return Stat(self.groups if same else None, self.roots.union(*[o.roots for o in others]), self.near,
                    np.unique(np.concatenate([self.units, *[o.units for o in others]])))


@dataclasses.dataclass(frozen=True)
class Plan:
    """``reduces``: eqn index of a statistic's reduction → eqn index of its GroupNorm split (or None);
    ``splits``: eqn index of a split reshape → its groups; ``applies``: eqn indices where a statistic meets the
    activation it normalises."""

    reduces: dict
    splits: dict
    applies: frozenset


_PLANS: "weakref.WeakKeyDictionary[Program, Plan]" = weakref.WeakKeyDictionary()


def plan(prog: Program) -> Plan:
    """Which reductions over channels are statistics of a norm (see the module docstring), read once per program."""
    if prog in _PLANS:
        return _PLANS[prog]
    dep = _input_dependent(prog)
    splits, split_of = _splits(prog, dep)
    cands = {}
    for k, e in enumerate(prog.eqns):
        axes = _channel_reduce_axes(prog, e, dep)
        if axes is not None:
            sp = split_of.get(e.ins[0])
            cands[k] = sp if sp is not None and len(prog.shapes[e.ins[0]]) - 2 not in axes else None
    good, applies = _closure(prog, dep, cands)
    splits = {k: g for k, g in splits.items() if all(r in good for r, sp in cands.items() if sp == k)}
    p = Plan({k: (cands[k] if cands[k] in splits else None) for k in good}, splits, frozenset(applies))
    _PLANS[prog] = p
    return p


def _input_dependent(prog: Program) -> set:
    dep = {prog.x_id}
    for e in prog.eqns:
        if any(isinstance(a, int) and a in dep for a in e.ins):
            dep.update(e.outs)
    return dep


def _channel_reduce_axes(prog: Program, e: Eqn, dep: set) -> set | None:
    """The axes of a ``reduce_sum`` of an activation over its last axis and not its batch axis, else None."""
    if e.name != "reduce_sum" or not (isinstance(e.ins[0], int) and e.ins[0] in dep):
        return None
    nd = len(prog.shapes[e.ins[0]])
    axes = {int(a) for a in e.params.get("axes", ())}
    return axes if nd >= 2 and nd - 1 in axes and 0 not in axes else None


def _splits(prog: Program, dep: set) -> tuple[dict, dict]:
    """GroupNorm's reshapes ``(…, C) → (…, G, C/G)`` whose values (through one-operand elementwise ops) only reach
    reductions over the size axis: ``({eqn: G}, {var: split eqn})``."""
    uses: dict = {}
    for k, e in enumerate(prog.eqns):
        for a in e.ins:
            if isinstance(a, int):
                uses.setdefault(a, []).append(k)
    splits, split_of = {}, {}
    for k, e in enumerate(prog.eqns):
        if e.name != "reshape" or not (isinstance(e.ins[0], int) and e.ins[0] in dep):
            continue
        ishape, oshape = prog.shapes[e.ins[0]], e.shapes[0]
        if len(oshape) != len(ishape) + 1 or tuple(oshape[:-2]) != tuple(ishape[:-1]) or oshape[-2] < 2:
            continue
        todo, seen, ok = [e.outs[0]], set(), True
        while todo and ok:
            v = todo.pop()
            seen.add(v)
            ok = v not in prog.out_ids
            for j in uses.get(v, []):
                u = prog.eqns[j]
                axes = _channel_reduce_axes(prog, u, dep)
                if axes is not None:
                    ok &= len(oshape) - 2 not in axes
                elif u.name in ops.ELEMENTWISE and len(u.outs) == 1 and \
                        sum(isinstance(a, int) and a in dep for a in u.ins) == 1:
                    todo.extend(o for o in u.outs if o not in seen)
                else:
                    ok = False
        if ok:
            splits[k] = int(oshape[-2])
            split_of.update({v: k for v in seen})
    return splits, split_of


def _closure(prog: Program, dep: set, cands: dict) -> tuple[set, dict]:
    """The candidate reductions whose statistics only come back onto activations elementwise, and those eqns."""
    roots: dict = {}
    bad, applies = set(), {}
    for k, e in enumerate(prog.eqns):
        if k in cands:
            roots[e.outs[0]] = frozenset({k})
            continue
        r = frozenset().union(*[roots[a] for a in e.ins if isinstance(a, int) and a in roots])
        if not r:
            continue
        acts = {a for a in e.ins if isinstance(a, int) and a in dep and a not in roots}
        if not acts and e.name in STAT_OPS:
            roots.update({o: r for o in e.outs})
        elif len(acts) == 1 and e.name in ops.ELEMENTWISE and len(e.outs) == 1 and \
                tuple(prog.shapes[next(iter(acts))]) == tuple(e.shapes[0]):
            applies[k] = r
        else:
            bad |= r
    bad |= frozenset().union(*[roots[o] for o in prog.out_ids if isinstance(o, int) and o in roots])
    groups = set(roots.values()) | set(applies.values())
    while True:  # roots whose statistics were combined with a bad one are bad too
        more = frozenset().union(*[r for r in groups if r & bad]) - bad
        if not more:
            break
        bad |= more
    good = set(cands) - bad
    return good, {k: r for k, r in applies.items() if r <= good}


# ----------------------------------------------------------------------------------------------- handlers
@ops.register_op("reshape")
def _reshape(e: Eqn, t: UnitTable) -> ops.Verdict:
    """GroupNorm's split of the channels into groups couples nothing (its values only feed the statistics);
    every other reshape is :func:`jaxprune.graph.ops._reshape`."""
    k = len(t.kinds)
    if k not in plan(t.prog).splits:
        return ops._reshape(e, t)
    ids = t.new_units(int(e.shapes[0][-1]), -2)
    t.freeze(ids, "they are a norm's channel groups")  # read by the statistics alone (see plan)
    t.origin[e.outs[0]] = ids
    return "move", ""


@ops.register_op("reduce_sum")
def _reduce_sum(e: Eqn, t: UnitTable) -> ops.Verdict:
    """A norm's statistic (not an activation: its units are recorded, see :class:`Stat`), else a plain reduction."""
    p = plan(t.prog)
    k = len(t.kinds)
    if k not in p.reduces:
        return ops._reduce(e, t)
    split = p.reduces[k]
    if split is None:
        groups = np.asarray(t.origin[e.ins[0]])[None, :]
    else:
        src = t.prog.eqns[split].ins[0]
        groups = np.asarray(t.origin[src]).reshape(p.splits[split], -1)
    t.stats[e.outs[0]] = Stat(groups, frozenset({k}), t.last_layer, groups.ravel())
    t.sources[e.outs[0]] = frozenset()
    return "statistic", ""


def resolve(t: UnitTable) -> None:
    """After every equation is read: where a statistic meets the activation it was computed from, couple each
    GroupNorm group, mark the units of a norm over all channels (``t.normed``) and name the norm (``t.norms``);
    where it meets other channels, freeze them."""
    found: dict = {}  # roots -> [Stat, parameter leaves it meets]
    for k in sorted(plan(t.prog).applies):
        e = t.prog.eqns[k]
        stats = [t.stats[a] for a in e.ins if isinstance(a, int) and a in t.stats]
        acts = t.acts(e)
        if not stats or len(acts) != 1:  # not as planned: freeze what it touches, never guess
            units = [t.origin[a] for a in acts] + [st.units for st in stats]
            t.freeze(np.concatenate(units) if units else [], f"{e.name} mixes them with a statistic over channels")
            continue
        s = stats[0].merge(stats[1:])
        ids = t.origin[acts[0]]
        if s.groups is None or not np.array_equal(ids, s.groups.ravel()):
            why = f"they are normalised by statistics of other channels (after layer {s.near!r})"
            t.freeze(np.concatenate([ids, s.units]), why)  # the statistic mixes its own channels into others
            continue
        srcs = frozenset().union(*[t.sources.get(a, frozenset()) for a in e.ins if isinstance(a, int)
                                   and a in t.stats])
        same = [r for r in found if r & s.roots]  # one norm: its mean and variance reductions
        roots = s.roots.union(*same)
        found[roots] = [s, srcs.union(*[found.pop(r)[1] for r in same])]
    for _, (s, srcs) in sorted(found.items(), key=lambda kv: min(kv[0])):
        paths = sorted(t.n.module_path(i) or t.n.paths[i] for i in srcs)
        name = paths[0] if paths else f"the normalisation after layer {s.near!r}"
        t.norms[name] = s.groups
        if s.groups.shape[0] == 1:  # one statistic over all channels: each stays removable, none maskable
            for u in s.groups.ravel().tolist():
                t.normed.setdefault(int(u), name)
        else:  # a GroupNorm: each group is one coupled class
            for row in s.groups:
                t.unite(np.repeat(row[:1], row.size), row)


def regrouped(g: Graph, removed: np.ndarray, new_model: Any, new_variables: Any, x: Any) -> Any:
    """``new_model`` (rebuilt after removing units) once it normalises the kept channels in the groups the shrunk
    model must: a GroupNorm's group count must follow the removed groups. When it does not, a linen integer field
    equal to that norm's old group count is set to the kept count if that makes the check pass; else a one-line
    error names the norm. ``removed``: boolean ``(n_units,)`` of :meth:`Graph.removed_units`."""
    want = {n: gr[~removed[gr].any(axis=1)].shape for n, gr in g.norms.items() if gr.shape[0] > 1}
    if not want:
        return new_model
    from jaxprune.graph.analyse import build

    def mismatch(m) -> tuple | None:
        got = {n: np.shape(a) for n, a in build(m, new_variables, x).norms.items()}
        return next(((n, got.get(n, (0, 0)), w) for n, w in want.items() if got.get(n) != w), None)

    bad = mismatch(new_model)
    if bad is None:
        return new_model
    old = g.norms[bad[0]].shape[0]
    for f in dataclasses.fields(new_model) if g.net.kind == "linen" else ():
        v = getattr(new_model, f.name)
        if f.name not in ("parent", "name") and type(v) is int and v == old:
            try:
                cand = new_model.clone(**{f.name: bad[2][0]})
                if mismatch(cand) is None:
                    return cand
            except Exception:  # the field sets something else: not the group count
                continue
    name, got, kept = bad
    raise ValueError(f"model: the rebuilt model normalises {name!r} in {got[0]} groups of {got[1]} channels, the "
                     f"shrunk variables keep {kept[0]} groups of {kept[1]}: its number of groups must follow the "
                     "removed groups (set it in the model's with_widths hook or an integer field, or give the norm a "
                     "group size instead)")
