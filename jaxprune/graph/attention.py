"""Attention heads as prunable units, read from the program (no class names): the head axis of an activation is
followed next to its channel axis.

A **head projection** is a ``dot_general`` of an activation (contracting its last axis) with a parameter kernel
of two free axes: ``DenseGeneral``'s ``(d, heads, head_dim)``, an einsum ``btd,dhk->bthk``. It is a layer of kind
``"heads"`` whose units are the heads (the kernel's first free axis); its output ``(…, heads, head_dim)`` carries
them on axis ``-2`` (``UnitTable.heads[var] = (axis, head ids)``), its ``head_dim`` channels are frozen. Heads are
then followed through elementwise ops (a per-head bias or scale is recorded as a slice of its leaf), broadcasts,
transposes, reductions over other axes, reshapes (split into kv groups ``H → (G, r)``: the query heads of a group
are coupled; merged ``(G, r) → H`` as ``jnp.repeat`` does; merged into the channel axis: each channel carries its
head) and ``dot_general`` of two activations whose batch dimensions hold the heads on both sides (``q·kᵀ``,
``weights·v``: the heads of both operands are coupled, so q/k/v heads form one unit and a key/value head its query
group). A **head output** is a ``dot_general`` contracting the head axis (and the last axis) with a parameter
kernel of one free axis: ``DenseGeneral(axis=(-2, -1))``'s ``(heads, head_dim, d)``; its rows along the head axis
are the heads' slices. Anything else that touches a head axis freezes those heads with a reason naming the op.

Every equation goes through :func:`handle`: the op registry's handler (:mod:`jaxprune.graph.ops`; ``dot_general``
is registered here), then the head rule of :data:`HEAD_RULES` for its primitive.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from jaxprune.graph import ops
from jaxprune.graph.program import Eqn
from jaxprune.graph.table import UnitTable

Verdict = ops.Verdict
HEAD_RULES: dict[str, Callable[[Eqn, UnitTable, Verdict], Verdict | None]] = {}


def head_rule(*names: str) -> Callable:
    """``@head_rule("prim", …)``: ``rule(e, t, verdict) -> verdict | None`` carries heads through those ops."""
    return lambda f: HEAD_RULES.update(dict.fromkeys(names, f)) or f


def handle(e: Eqn, t: UnitTable) -> Verdict:
    """The registry's verdict on ``e``, with the heads of its activation operands carried to its outputs."""
    if e.name == "reshape" and t.acts(e) and t.acts(e)[0] not in t.heads and _splits_heads(e, t):
        return _split_channels(e, t)
    verdict = ops.handle(e, t)
    if not any(a in t.heads for a in t.acts(e)):  # a norm's statistic (graph.norms) is no activation: no head rule
        return verdict
    rule = HEAD_RULES.get(e.name)
    if rule is None or (verdict[0] == "opaque" and e.name in ops.CUSTOM):
        _freeze_heads(e, t, f"{e.name}" + (f" ({verdict[1]})" if verdict[1] else ""))
        return verdict
    return rule(e, t, verdict) or verdict


def finish(t: UnitTable, out_ids: tuple) -> None:
    """Heads reaching the model's outputs cannot be removed."""
    for o in out_ids:
        if isinstance(o, int) and o in t.heads:
            t.freeze(t.heads[o][1], "they are attention heads reaching the model's output")


def _freeze_heads(e: Eqn, t: UnitTable, what: str, which: list | None = None) -> None:
    where = f" after layer {t.last_layer!r}" if t.last_layer else ""
    for a in which if which is not None else [a for a in e.ins if isinstance(a, int) and a in t.heads]:
        t.freeze(t.heads[a][1], f"their attention heads are mixed by {what}{where}")


def _set(t: UnitTable, out: int, axis: int, ids: np.ndarray) -> None:
    t.heads[out] = (int(axis), np.asarray(ids))


# ----------------------------------------------------------------------------------------------- projections
@ops.register_op("dot_general")
def _dot_general(e: Eqn, t: UnitTable) -> Verdict:
    """A head projection or head output (see the module docstring); any other product: the registry's handler."""
    x, w = e.ins[0], e.ins[1]
    if isinstance(x, int) and x in t.origin and not (isinstance(w, int) and w in t.origin):
        leaf, perm = ops.kernel_view(w, t.leaf_of, t.prog)
        (lc, rc), (lb, _) = e.params["dimension_numbers"]
        nd = len(t.shapes[x])
        if leaf is not None and perm is None and not lb and nd - 1 in lc and (
                np.ndim(t.n.leaves[leaf]) > 2 or len(lc) > 1):
            head = t.heads.get(x)
            if len(lc) == 1 and np.ndim(t.n.leaves[leaf]) == 3 and head is None:
                return _projection(e, t, leaf, int(rc[0]))
            if head is not None and head[0] in lc and head[0] != nd - 1 and len(lc) == 2 and \
                    np.ndim(t.n.leaves[leaf]) == 3:
                return _head_output(e, t, leaf, tuple(int(a) for a in lc), tuple(int(a) for a in rc))
    return ops._linear(e, t)


def _projection(e: Eqn, t: UnitTable, leaf: int, in_axis: int) -> Verdict:
    """``x (…, d) · K (d, heads, head_dim)`` (any axis order of K): units = heads, on the output's axis -2."""
    head_axis, dh_axis = [i for i in range(3) if i != in_axis]
    out_nd = len(e.shapes[0])
    ops._add_layer(e, t, leaf, "heads", in_axis, head_axis, int(np.prod(e.shapes[0][1:-2])))
    t.layers[-1]["unit_axis"] = -2
    ids = t.layers[-1]["ids"]
    dh = t.new_units(int(np.shape(t.n.leaves[leaf])[dh_axis]), -2)
    t.freeze(dh, "they are channels within attention heads (head_dim); remove whole heads")
    t.add_slice(leaf, dh_axis, dh)
    t.origin[e.outs[0]] = dh
    _set(t, e.outs[0], out_nd - 2, ids)
    return "linear", ""


def _head_output(e: Eqn, t: UnitTable, leaf: int, lc: tuple, rc: tuple) -> Verdict:
    """``y (…, heads, head_dim) · O (heads, head_dim, d)``: a dense layer whose input rows are the heads."""
    x = e.ins[0]
    nd = len(t.shapes[x])
    head_axis, head_ids = t.heads[x]
    out_axis = next(i for i in range(3) if i not in rc)
    ops._add_layer(e, t, leaf, "dense", rc[lc.index(nd - 1)], out_axis, int(np.prod(e.shapes[0][1:-1])))
    in_axis = rc[lc.index(head_axis)]
    t.layers[-1].update(in_axis=in_axis, in_ids=np.asarray(head_ids))
    t.add_slice(leaf, in_axis, head_ids)
    return "linear", ""


def _splits_heads(e: Eqn, t: UnitTable) -> bool:
    """True when ``e`` unflattens the channel axis ``(…, c) -> (…, heads, head_dim)`` and the head axis reaches,
    through elementwise ops and transposes, a batch axis of a product of two activations (dense + reshape)."""
    ishape, oshape = tuple(t.shapes[t.acts(e)[0]]), tuple(e.shapes[0])
    if len(oshape) != len(ishape) + 1 or oshape[:-2] != ishape[:-1] or oshape[-2] < 2:
        return False
    acts = _activations(t)
    front = {e.outs[0]: len(oshape) - 2}
    for e2 in t.prog.eqns[len(t.kinds) + 1:]:
        for i, a in enumerate(e2.ins):
            if not (isinstance(a, int) and a in front):
                continue
            ax = front[a]
            if e2.name == "dot_general":
                (_, _), batch = e2.params["dimension_numbers"]
                other = e2.ins[1 - i]
                if i < 2 and ax in batch[i] and isinstance(other, int) and other in acts:
                    return True
            elif e2.name == "transpose":
                front[e2.outs[0]] = tuple(e2.params["permutation"]).index(ax)
            elif e2.name in ops.ELEMENTWISE and len(e2.shapes[0]) == len(t.shapes[a]):
                front[e2.outs[0]] = ax
    return False


def _activations(t: UnitTable) -> set:
    """The program's variables that depend on the model's input (computed once per table)."""
    if getattr(t, "_acts", None) is None:
        acts = {t.prog.x_id}
        for e in t.prog.eqns:
            if any(isinstance(a, int) and a in acts for a in e.ins):
                acts.update(e.outs)
        t._acts = acts
    return t._acts


def _split_channels(e: Eqn, t: UnitTable) -> Verdict:
    """A layer's channels ``(heads·head_dim)`` split into heads: a head's channels are coupled (one unit)."""
    grid = np.asarray(t.origin[t.acts(e)[0]]).reshape(e.shapes[0][-2], -1)
    for col in grid.T[1:]:
        t.unite(grid[:, 0], col)
    dh = t.new_units(grid.shape[1], -2)
    t.freeze(dh, "they are channels within attention heads (head_dim); remove whole heads")
    t.origin[e.outs[0]] = dh
    _set(t, e.outs[0], len(e.shapes[0]) - 2, grid[:, 0])
    return "move", ""


# ----------------------------------------------------------------------------------------------- head rules
@head_rule("dot_general")
def _product(e: Eqn, t: UnitTable, verdict: Verdict) -> None:
    """Heads on batch dimensions are coupled across the two operands; on free ones they move; contracted into a
    layer they are consumed (its input slice), contracted otherwise they are mixed."""
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    operands = [(e.ins[0], tuple(lc), tuple(lb)), (e.ins[1], tuple(rc), tuple(rb))]
    placed: dict[int, np.ndarray] = {}
    free_start = len(lb)
    for side, (a, contract, batch) in enumerate(operands):
        nd = np.ndim(a[1]) if isinstance(a, tuple) else len(t.shapes[a])
        free = [i for i in range(nd) if i not in contract and i not in batch]
        if isinstance(a, int) and a in t.heads:
            ax, ids = t.heads[a]
            if ax in batch:
                pos = batch.index(ax)
                other, other_batch = operands[1 - side][0], operands[1 - side][2]
                if not (isinstance(other, int) and other in t.heads and t.heads[other][0] == other_batch[pos]):
                    _freeze_heads(e, t, f"{e.name} with an operand whose batch axis holds no heads", [a])
                    continue
                if pos in placed:
                    t.unite(placed[pos], ids)
                placed.setdefault(pos, ids)
            elif ax in free:
                placed[free_start + free.index(ax)] = ids
            elif verdict[0] != "linear":
                _freeze_heads(e, t, f"{e.name} contracting the head axis", [a])
        free_start += len(free)
    if len(placed) > 1:
        _freeze_heads(e, t, f"{e.name} with heads on two output axes")
    elif placed:
        _set(t, e.outs[0], *next(iter(placed.items())))


@head_rule(*ops.ELEMENTWISE, *ops.CUSTOM)
def _elementwise(e: Eqn, t: UnitTable, verdict: Verdict) -> Verdict | None:
    """Same head axis on every head operand (coupled); a per-head parameter operand is recorded as its slice."""
    if len(e.outs) != 1:
        return _freeze_heads(e, t, e.name)
    nd = len(e.shapes[0])
    carriers = list(dict.fromkeys(a for a in e.ins if isinstance(a, int) and a in t.heads))
    full = [a for a in carriers if tuple(t.shapes[a]) == tuple(e.shapes[0])]
    ax, ids = t.heads[(full or carriers)[0]]
    for a in carriers:
        if t.heads[a][0] != ax or len(t.shapes[a]) != nd:
            return _freeze_heads(e, t, f"{e.name} of operands with different head axes")
        if t.shapes[a][ax] == ids.size:
            t.unite(ids, t.heads[a][1])
    for a in t.acts(e):
        if a not in t.heads and len(t.shapes[a]) == nd and t.shapes[a][ax] != 1:
            return _freeze_heads(e, t, f"{e.name} with an activation that holds no heads")
    per_head = True
    for b in e.ins:
        if isinstance(b, int) and b not in t.origin and len(t.shapes.get(b, ())) == nd:
            shape = t.shapes[b]
            per_head &= all(s == 1 for i, s in enumerate(shape) if i not in (ax, nd - 1))
            if shape[ax] != 1 and not _weight_slices(t, b, ax, nd, ids):
                return _freeze_heads(e, t, f"{e.name} with a parameter not indexed by head")
    _set(t, e.outs[0], ax, ids)
    return ("affine", "") if verdict[0] == "affine_spatial" and per_head else None


def _weight_slices(t: UnitTable, b: int, ax: int, nd: int, ids: np.ndarray) -> bool:
    """Record the head axis of the parameter leaves behind operand ``b`` (right-aligned); False if one has none."""
    for leaf in t.sources.get(b, frozenset()):
        ls = np.shape(t.n.leaves[leaf])
        la = ax - (nd - len(ls))
        if la < 0 or ls[la] != ids.size:
            return False
        t.add_slice(leaf, la, ids)
    return True


@head_rule("broadcast_in_dim")
def _broadcast(e: Eqn, t: UnitTable, verdict: Verdict) -> None:
    a = t.acts(e)[0]
    ax, ids = t.heads[a]
    _set(t, e.outs[0], tuple(e.params["broadcast_dimensions"])[ax], ids)


@head_rule("transpose")
def _transpose(e: Eqn, t: UnitTable, verdict: Verdict) -> None:
    ax, ids = t.heads[t.acts(e)[0]]
    _set(t, e.outs[0], tuple(e.params["permutation"]).index(ax), ids)


@head_rule("squeeze", *ops.REDUCTIONS)
def _drop_axes(e: Eqn, t: UnitTable, verdict: Verdict) -> None:
    ax, ids = t.heads[t.acts(e)[0]]
    gone = tuple(int(d) for d in e.params.get("dimensions", e.params.get("axes", ())))
    if ax in gone:
        return _freeze_heads(e, t, f"{e.name} over the head axis")
    _set(t, e.outs[0], ax - sum(d < ax for d in gone), ids)


@head_rule("reshape")
def _reshape(e: Eqn, t: UnitTable, verdict: Verdict) -> None:
    """Kept, split into groups (coupled), merged with neighbours (repeated per position) or into the channels."""
    a = t.acts(e)[0]
    ishape, oshape = tuple(t.shapes[a]), tuple(e.shapes[0])
    ax, ids = t.heads[a]
    pre = int(np.prod(ishape[:ax]))
    j = next((j for j in range(len(oshape)) if int(np.prod(oshape[:j])) == pre), None)
    s = next((s for s in range(ax, -1, -1) if int(np.prod(ishape[:s])) == int(np.prod(oshape[:j or 0]))), None)
    if j is None or j == len(oshape) or s is None:
        return _freeze_heads(e, t, f"reshape {ishape} -> {oshape}")
    if oshape[j] == ids.size and s == ax:
        return _set(t, e.outs[0], j, ids)
    if s == ax and ids.size % oshape[j] == 0 and any(  # H -> (G, r): the r query heads of a group are coupled
            int(np.prod(oshape[j:k])) == ids.size for k in range(j + 1, len(oshape) + 1)):
        grid = ids.reshape(oshape[j], -1)
        for col in grid.T[1:]:
            t.unite(grid[:, 0], col)
        return _set(t, e.outs[0], j, grid[:, 0])
    m = next((m for m in range(ax + 1, len(ishape) + 1) if int(np.prod(ishape[s:m])) == oshape[j]), None)
    if m is None:
        return _freeze_heads(e, t, f"reshape {ishape} -> {oshape}")
    block = [1] * (m - s)
    block[ax - s] = -1
    per_pos = np.broadcast_to(ids.reshape(block), ishape[s:m]).ravel()
    if j == len(oshape) - 1:  # merged into the channel axis: each channel carries its head
        t.origin[e.outs[0]] = per_pos
    else:
        _set(t, e.outs[0], j, per_pos)
