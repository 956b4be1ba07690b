"""The op registry: how each primitive carries channels (units) from its inputs to its outputs.

:data:`OPS` maps a primitive's name to its handler ``handler(e: Eqn, t: UnitTable) -> (kind, note)``: it sets
``t.origin[out]`` — the unit ids along each output's last axis — from its inputs' (``t.origin[in]``), couples units
(``t.unite``), records the parameter axes they index (``t.add_slice``) or gives up with ``t.opaque(e, why)``, which
freezes every unit it touches. ``kind`` is one of ``linear`` (a layer), ``activation``, ``affine`` (per-channel),
``affine_spatial``, ``merge`` (two activations: a residual add, a product), ``move``, ``pool``, ``reduce``,
``opaque``; equations on parameters alone are ``weight`` and never reach a handler. An unregistered primitive is
``opaque`` with its name in the reason.

**Adding an op**: one handler, registered with ``@register_op("name", …)`` (≤ 25 lines: read ``t.origin`` of the
activation operand, write the outputs'), and one test on a small model written in the test that uses the op
(e.g. ``remove_units`` == ``mask_units`` through it, or its refusal naming it).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from jaxprune.graph.program import _INLINE, CUSTOM, Eqn, _last, call_jaxpr
from jaxprune.graph.table import UnitTable

Verdict = tuple[str, str]  # (kind, note)
OPS: dict[str, Callable[[Eqn, UnitTable], Verdict]] = {}

ELEMENTWISE = frozenset({
    "max", "min", "add", "sub", "mul", "div", "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic",
    "abs", "sign", "sqrt", "rsqrt", "cbrt", "integer_pow", "pow", "square", "erf", "erfc", "erf_inv", "select_n",
    "ge", "gt", "le", "lt", "eq", "ne", "and", "or", "not", "convert_element_type", "clamp", "sin", "cos", "tan",
    "copy", "copy_p", "is_finite", "round", "floor", "ceil", "atan2", "nextafter", "add_any", "stop_gradient",
    "reduce_precision", "sinh", "cosh", "asinh", "acosh", "atanh", "asin", "acos", "atan", "rem", "max_p"})
AFFINE = frozenset({"add", "sub", "mul", "div", "neg", "add_any"})
MOVES = frozenset({"reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose", "concatenate", "slice",
                   "pad", "rev", "convert_element_type", "copy", "copy_p", "reduce_precision", "dynamic_slice"})
POOLS = frozenset({"reduce_window_max", "reduce_window_min", "reduce_window_sum", "reduce_window", "cumsum",
                   "cummax", "cumprod", "cummin", "cumlogsumexp"})
REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin", "reduce_and",
                        "reduce_or"})
LINEAR = frozenset({"dot_general", "conv_general_dilated"})


def register_op(*names: str) -> Callable:
    """``@register_op("prim", …)``: the decorated ``handler(e, t) -> (kind, note)`` handles those primitives."""
    def deco(f):
        for name in names:
            OPS[name] = f
        return f
    return deco


def handle(e: Eqn, t: UnitTable) -> Verdict:
    """Classify equation ``e`` and update the table: parameters-only, a registered handler, or opaque."""
    if not t.acts(e):
        return t.weights_only(e)
    h = OPS.get(e.name)
    if h is None:
        return t.opaque(e, f"{e.name} is not an operation the graph can follow")
    return h(e, t)


# ----------------------------------------------------------------------------------------------- helpers
def inner_jaxpr(e):
    """The inner (open) jaxpr of a call-like equation (custom_jvp/vjp, pjit), or None."""
    j = call_jaxpr(e.params)
    return getattr(j, "jaxpr", j)


def jaxpr_elementwise(jaxpr) -> bool:
    for e in jaxpr.eqns:
        sub = e.params.get("jaxpr") if e.primitive.name in _INLINE else None
        if sub is not None:
            if not jaxpr_elementwise(sub.jaxpr):
                return False
        elif e.primitive.name not in ELEMENTWISE and e.primitive.name not in ("broadcast_in_dim",):
            return False
    return True


def kernel_view(w, leaf_of: dict, prog) -> tuple[int | None, tuple | None]:
    """``(leaf, None)`` when ``w`` is a parameter leaf, ``(leaf, perm)`` when it is a 2-D leaf transposed (a tied
    weight read as ``kernel.T``; ``perm[j]``: the leaf axis of ``w``'s axis ``j``), else ``(None, None)``."""
    if isinstance(w, tuple):
        return None, None
    if w in leaf_of:
        return leaf_of[w], None
    e = next((e for e in prog.eqns if w in e.outs), None)
    if e is None or e.name != "transpose" or isinstance(e.ins[0], tuple) or e.ins[0] not in leaf_of:
        return None, None
    return leaf_of[e.ins[0]], tuple(int(p) for p in e.params["permutation"])


def _same(e: Eqn, t: UnitTable, ids: np.ndarray, kind: str = "move") -> Verdict:
    t.origin[e.outs[0]] = ids
    return kind, ""


def _io(e: Eqn, t: UnitTable) -> tuple[np.ndarray, tuple, tuple]:
    a = t.acts(e)[0]
    return t.origin[a], tuple(t.shapes[a]), tuple(e.shapes[0])


# ----------------------------------------------------------------------------------------------- elementwise
@register_op(*CUSTOM)
def _custom_call(e: Eqn, t: UnitTable) -> Verdict:
    """``jax.nn.relu`` and friends: followed as one elementwise op when their inner program is elementwise."""
    inner = inner_jaxpr(e)
    if inner is not None and not jaxpr_elementwise(inner):
        return t.opaque(e, f"{e.name}[{e.params.get('name', '')}] is not elementwise")
    return _elementwise(e, t)


@register_op(*ELEMENTWISE)
def _elementwise(e: Eqn, t: UnitTable) -> Verdict:
    """One activation operand: an activation or a per-channel affine map; two: a merge (residual add, product)."""
    if len(e.outs) != 1:
        return t.opaque(e, f"{e.name} is not an operation the graph can follow")
    pos = [i for i, b in enumerate(e.ins) if isinstance(b, int) and b in t.origin]
    distinct = list(dict.fromkeys(e.ins[i] for i in pos))
    if len(distinct) >= 2:
        return _merge(e, t, distinct)
    a = distinct[0]
    if tuple(t.shapes[a]) != tuple(e.shapes[0]):
        return t.opaque(e, f"{e.name} broadcasts an activation")
    others = [b for i, b in enumerate(e.ins) if i not in pos]
    for b in others:
        t.per_channel_followers(b, t.origin[a].size, t.origin[a])
    t.origin[e.outs[0]] = t.origin[a]
    if len(pos) > 1:  # x + x, x * x: a function of one activation
        return ("affine" if e.name in ("add", "sub", "add_any") else "activation"), ""
    if e.name in AFFINE and not (e.name == "div" and pos[0] != 0):
        return ("affine" if all(t.per_channel_only(b) for b in others) else "affine_spatial"), ""
    return ("move" if e.name == "convert_element_type" else "activation"), ""


def _merge(e: Eqn, t: UnitTable, distinct: list) -> Verdict:
    """Two activations combined elementwise: the channels they share are coupled."""
    full = [a for a in distinct if tuple(t.shapes[a]) == tuple(e.shapes[0])]
    base = t.origin[full[0]] if full else t.origin[distinct[0]]
    for a in distinct:
        if _last(t.shapes[a]) == base.size:
            t.unite(base, t.origin[a])
        else:
            t.freeze(t.origin[a], f"{e.name} broadcasts its channels over another activation's")
    t.origin[e.outs[0]] = base
    return "merge", "" if e.name in ("add", "sub", "add_any") else f"{e.name} of two activations (a product or gate)"


# ----------------------------------------------------------------------------------------------- movement
@register_op(*(MOVES - ELEMENTWISE - {"reshape", "broadcast_in_dim", "transpose", "concatenate", "slice", "pad",
                                      "rev", "dynamic_slice"}))
def _squeeze(e: Eqn, t: UnitTable) -> Verdict:
    ids, ishape, oshape = _io(e, t)
    if _last(oshape) != _last(ishape):
        return t.opaque(e, f"{e.name} that moves the channel axis")
    return _same(e, t, ids)


@register_op("reshape")
def _reshape(e: Eqn, t: UnitTable) -> Verdict:
    """A flatten tiles the units; an unflatten of the channel axis couples the units it folds together."""
    ids, ishape, oshape = _io(e, t)
    c, c2 = _last(ishape), _last(oshape)
    if not oshape:
        return t.opaque(e, "reshape to a scalar")
    if c2 % c == 0:
        return _same(e, t, np.tile(ids, c2 // c))
    if c % c2 == 0:
        grid = ids.reshape(-1, c2)
        for row in grid[1:]:
            t.unite(grid[0], row)
        return _same(e, t, grid[0])
    return t.opaque(e, f"reshape {ishape} -> {oshape} (mixes the channel axis)")


@register_op("broadcast_in_dim")
def _broadcast(e: Eqn, t: UnitTable) -> Verdict:
    ids, ishape, oshape = _io(e, t)
    dims = tuple(e.params["broadcast_dimensions"])
    if ishape and dims and dims[-1] == len(oshape) - 1 and oshape[-1] == ishape[-1]:
        return _same(e, t, ids)
    return t.opaque(e, f"broadcast_in_dim {ishape} -> {oshape} (of an activation)")


@register_op("transpose")
def _transpose(e: Eqn, t: UnitTable) -> Verdict:
    ids, ishape, _ = _io(e, t)
    perm = tuple(e.params["permutation"])
    if perm and perm[-1] == len(ishape) - 1:
        return _same(e, t, ids)
    return t.opaque(e, f"transpose {perm} (moves the channel axis; channel-last layouts are supported)")


@register_op("concatenate")
def _concatenate(e: Eqn, t: UnitTable) -> Verdict:
    """Along channels the units are joined (constant parts frozen); along another axis they are coupled."""
    ids, ishape, _ = _io(e, t)
    if int(e.params["dimension"]) != len(ishape) - 1:
        for b in t.acts(e)[1:]:
            t.unite(ids, t.origin[b])
        return _same(e, t, ids)
    parts = []
    for b in e.ins:
        if isinstance(b, int) and b in t.origin:
            parts.append(t.origin[b])
        else:
            const = t.new_units(_last(t.shapes.get(b, ()) if isinstance(b, int) else np.shape(b[1])), -2)
            t.freeze(const, "they are constant channels of a concatenation")
            parts.append(const)
    return _same(e, t, np.concatenate(parts))


@register_op("slice", "pad", "rev")
def _slice_pad_rev(e: Eqn, t: UnitTable) -> Verdict:
    ids, ishape, _ = _io(e, t)
    nd = len(ishape)
    if e.name == "slice":
        st = (e.params.get("strides") or (1,) * nd)[-1]
        return _same(e, t, ids[e.params["start_indices"][-1]:e.params["limit_indices"][-1]:st])
    if e.name == "pad":
        if tuple(e.params["padding_config"][-1]) != (0, 0, 0):
            return t.opaque(e, "pad of the channel axis")
        return _same(e, t, ids)
    return _same(e, t, ids[::-1] if nd - 1 in tuple(e.params["dimensions"]) else ids)


# ----------------------------------------------------------------------------------------------- indexing
@register_op("dynamic_slice")
def _dynamic_slice(e: Eqn, t: UnitTable) -> Verdict:
    ids, ishape, oshape = _io(e, t)
    if oshape[-1] != ishape[-1]:
        return t.opaque(e, "dynamic_slice of the channel axis")
    return _same(e, t, ids)


# ----------------------------------------------------------------------------------------------- reductions, pooling
@register_op(*POOLS, *REDUCTIONS)
def _reduce(e: Eqn, t: UnitTable) -> Verdict:
    """Pooling and reductions over positions keep the channels; over the channel axis they mix them."""
    ids, ishape, oshape = _io(e, t)
    nd = len(ishape)
    if e.name.startswith("cum"):
        over_channels = int(e.params.get("axis", 0)) == nd - 1
    elif e.name in POOLS:
        wd, ws = tuple(e.params.get("window_dimensions", ())), tuple(e.params.get("window_strides", ()))
        over_channels = not wd or wd[-1] != 1 or ws[-1] != 1
    else:
        over_channels = nd - 1 in tuple(int(x) for x in e.params.get("axes", ())) or not oshape
    if over_channels:
        return t.opaque(e, f"{e.name} over the channel axis")
    return _same(e, t, ids, "pool" if e.name in POOLS else "reduce")


# ----------------------------------------------------------------------------------------------- control flow
@register_op("scan", "while", "cond")
def _control_flow(e: Eqn, t: UnitTable) -> Verdict:
    return t.opaque(e, f"{e.name} (control flow: the graph does not read inside loops and branches)")


# ----------------------------------------------------------------------------------------------- linear layers
@register_op(*LINEAR)
def _linear(e: Eqn, t: UnitTable) -> Verdict:
    """A layer: a dense product or convolution of an activation with a kernel stored as one parameter."""
    a, w = e.ins[0], e.ins[1]
    if not (isinstance(a, int) and a in t.origin) or isinstance(w, tuple) or w in t.origin:
        note = f"{e.name} of two activations (attention-like products are not linear layers)" if (
            isinstance(w, int) and w in t.origin) else f"{e.name} with the activation as its second operand"
        return t.opaque(e, note)
    leaf, perm = kernel_view(w, t.leaf_of, t.prog)
    if leaf is None:
        src = t.sources.get(w, frozenset())
        note = f"{e.name} with constant weights" if (w in t.prog.consts or not src) else (
            f"{e.name} reads a kernel computed from parameters {[t.n.paths[i] for i in sorted(src)]}; supported: a "
            "kernel stored as one parameter")
        return t.opaque(e, note, [a])
    axes = _dense_axes(e, t, leaf, perm) if e.name == "dot_general" else _conv_axes(e, t, perm)
    if isinstance(axes, str):
        t.refused[t.n.module_path(leaf) or t.n.paths[leaf]] = axes
        return t.opaque(e, axes, [a])
    _add_layer(e, t, leaf, *axes)
    return "linear", ""


def _dense_axes(e: Eqn, t: UnitTable, leaf: int, perm) -> tuple | str:
    """``(kind, in_axis, out_axis, positions)`` of a dense layer (a tied ``kernel.T`` too), or why it is not one."""
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    kshape, xshape = np.shape(t.n.leaves[leaf]), t.shapes[e.ins[0]]
    if lb or rb or tuple(lc) != (len(xshape) - 1,) or tuple(rc) not in ((0,), (1,)) or len(kshape) != 2 or (
            perm is None and tuple(rc) != (0,)):
        return (f"dot_general with dimension numbers {e.params['dimension_numbers']} (a dense layer contracts the "
                "activation's last axis with one axis of a 2-D kernel)")
    in_axis = (perm or (0, 1))[int(rc[0])]  # the kernel leaf's axes (a transposed view: a tied weight)
    return "dense", in_axis, 1 - in_axis, int(np.prod(e.shapes[0][1:-1])) if len(e.shapes[0]) > 2 else 1


def _conv_axes(e: Eqn, t: UnitTable, perm) -> tuple | str:
    """``(kind, in_axis, out_axis, positions)`` of a channel-last, ungrouped convolution, or why it is not one."""
    dn = e.params["dimension_numbers"]
    nd = len(t.shapes[e.ins[0]])
    if perm is not None:
        return "conv_general_dilated with a transposed kernel"
    if dn.lhs_spec[1] != nd - 1 or dn.out_spec[1] != nd - 1 or e.params.get("feature_group_count", 1) != 1 or \
            e.params.get("batch_group_count", 1) != 1:
        return (f"conv_general_dilated with feature_group_count={e.params.get('feature_group_count')} and "
                f"dimension numbers {dn} (supported: channel-last, feature_group_count=1)")
    return "conv", int(dn.rhs_spec[1]), int(dn.rhs_spec[0]), int(np.prod(e.shapes[0][1:-1]))


def _add_layer(e: Eqn, t: UnitTable, leaf: int, kind: str, in_axis: int, out_axis: int, positions: int) -> None:
    """New units for the layer's outputs; its kernel's axes recorded as slices of its and its input's units."""
    name = t.n.module_path(leaf) or t.n.paths[leaf]
    uses = sum(1 for l in t.layers if l["kernel"] == leaf)
    name = name if not uses else f"{name}#{uses + 1}"  # a kernel used again (tied weights): its own layer name
    a = e.ins[0]
    units = int(np.shape(t.n.leaves[leaf])[out_axis])
    ids = t.new_units(units, len(t.layers))
    t.add_slice(leaf, out_axis, ids)
    t.add_slice(leaf, in_axis, t.origin[a])
    t.layers.append(dict(name=name, kind=kind, units=units, eqn=len(t.kinds), var=e.outs[0], kernel=leaf,
                         in_axis=in_axis, out_axis=out_axis, ids=ids, in_ids=np.asarray(t.origin[a]),
                         positions=positions))
    t.origin[e.outs[0]] = ids
    t.last_layer = name
