"""Grouped convolutions in the op registry: depthwise and grouped convolutions follow their input's channels.

A ``conv_general_dilated`` with ``feature_group_count == 1`` is a linear layer (:func:`jaxprune.graph.ops._linear`).
With ``feature_group_count == C_in`` (a **depthwise** convolution, channel multiplier ``m = C_out / C_in ≥ 1``,
any stride or dilation) output channel ``o`` reads input channel ``o // m`` alone, so it carries that channel's
unit: input channel ``c`` and its ``m`` output channels are one unit, and removing it cuts the producer's kernel
column (bias, BatchNorm), the depthwise kernel's ``m`` output channels (its bias and BatchNorm entries follow as
per-channel operands) and the consumers' input rows. The depthwise convolution is not a layer of its own (kind
``"depthwise"``): its MACs are counted under its module path (:func:`jaxprune.graph.count_macs`).
With ``1 < feature_group_count = G < C_in`` (a **grouped** convolution, kind ``"grouped"``) group ``g`` reads
input channels ``[g·k, (g+1)·k)`` and writes outputs ``[g·m, (g+1)·m)`` (``k = C_in / G``, ``m = C_out / G``): a
group's ``k`` input units are coupled into one class (removed whole at the producer, like a GroupNorm group) and its
``m`` outputs carry it; removing group ``g`` cuts its input channels, its kernel's ``m`` output channels and what
reads them, and ``G`` drops by one. A rebuilt model's conv fields follow (:func:`conv_sizes`: input and output
channels and ``feature_group_count``; :mod:`jaxprune.graph.surgery` sets them on linen submodules by interception
and on NNX modules, checked by building the module abstractly); a model whose fields do not follow fails the
rebuild's shape check, never silently."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxprune.graph import ops
from jaxprune.graph.model_graph import Graph
from jaxprune.graph.program import Eqn
from jaxprune.graph.table import UnitTable


def _depthwise_kernel(e: Eqn, t: UnitTable) -> tuple[int, int] | None:
    """``(kernel leaf, its output-feature axis)`` of a channel-last grouped convolution of an activation with a kernel
    stored as one parameter (not transposed), else None (the plain conv handler says why it is not a layer)."""
    a, w = e.ins[0], e.ins[1]
    if not (isinstance(a, int) and a in t.origin) or isinstance(w, tuple) or w in t.origin:
        return None
    leaf, perm = ops.kernel_view(w, t.leaf_of, t.prog)
    dn, nd = e.params["dimension_numbers"], len(t.shapes[a])
    if leaf is None or perm is not None or e.params.get("batch_group_count", 1) != 1 or \
            dn.lhs_spec[1] != nd - 1 or dn.out_spec[1] != nd - 1:
        return None
    return leaf, int(dn.rhs_spec[0])


@ops.register_op("conv_general_dilated")
def _conv(e: Eqn, t: UnitTable) -> ops.Verdict:
    """Ungrouped: a layer. Depthwise: its outputs carry their input channel's unit. Grouped: whole groups."""
    groups = int(e.params.get("feature_group_count", 1))
    found = _depthwise_kernel(e, t) if groups > 1 else None
    if found is None:
        return ops._linear(e, t)
    leaf, out_axis = found
    a = e.ins[0]
    cin, cout = int(t.shapes[a][-1]), int(e.shapes[0][-1])
    name = t.n.module_path(leaf) or t.n.paths[leaf]
    if groups != cin:
        return _grouped(e, t, leaf, out_axis, name)
    t.refused[name] = (f"a depthwise convolution (feature_group_count={groups}, its input channels): its output "
                       "channels carry its input's units; remove them at the layer that produces its input")
    ids = np.repeat(t.origin[a], cout // cin)  # output o reads input o // m
    t.add_slice(leaf, out_axis, ids)
    t.origin[e.outs[0]] = ids
    return "depthwise", ""


def _grouped(e: Eqn, t: UnitTable, leaf: int, out_axis: int, name: str) -> ops.Verdict:
    """``1 < G < C_in`` groups: group ``g`` reads input channels ``[g·k, (g+1)·k)`` (``k = C_in / G``) and writes
    output channels ``[g·m, (g+1)·m)`` (``m = C_out / G``). A group's ``k`` input units are coupled (one class, removed
    whole at their producer) and its ``m`` outputs carry that class; the kernel's ``(…, k, C_out)`` input axis is
    not indexed by channel (every group keeps ``k``), its output axis is."""
    a, groups = e.ins[0], int(e.params["feature_group_count"])
    cin, cout = int(t.shapes[a][-1]), int(e.shapes[0][-1])
    k, m = cin // groups, cout // groups
    ins = t.origin[a].reshape(groups, k)
    for col in range(1, k):
        t.unite(ins[:, 0], ins[:, col])
    t.refused[name] = (f"a grouped convolution (feature_group_count={groups} of {cin} input channels): its channels "
                       "come in whole groups; remove a group's input channels at the layer that produces its input")
    ids = np.repeat(ins[:, 0], m)
    t.add_slice(leaf, out_axis, ids)
    t.origin[e.outs[0]] = ids
    return "grouped", ""


def _grouped_convs(g: Graph, leaves: Sequence) -> list[tuple[str, int, int, int, int]]:
    """``(module path, C_in, G, C_out, new C_out)`` of every depthwise or grouped convolution for ``leaves``."""
    out = []
    leaf_of = {vid: i for i, vid in enumerate(g.program.leaf_ids)}
    for k, e in enumerate(g.program.eqns):
        if g.kinds[k] not in ("depthwise", "grouped"):
            continue
        leaf, _ = ops.kernel_view(e.ins[1], leaf_of, g.program)
        axis = int(e.params["dimension_numbers"].rhs_spec[0])
        out.append((g.net.module_path(leaf) or g.net.paths[leaf], int(g.program.shapes[e.ins[0]][-1]),
                    int(e.params["feature_group_count"]), int(np.shape(g.net.leaves[leaf])[axis]),
                    int(np.shape(leaves[leaf])[axis])))
    return out


def depthwise_groups(g: Graph, leaves: Sequence) -> dict[str, int]:
    """``{module path: feature_group_count}`` of every depthwise (or grouped) convolution for the variables'
    ``leaves`` (e.g. shrunk by :func:`jaxprune.graph.shrink`): its kernel's output features over its channels per
    group — what a rebuilt model must set for the smaller input."""
    return {path: new_cout // (cout // groups) for path, _, groups, cout, new_cout in _grouped_convs(g, leaves)}


def conv_sizes(g: Graph, leaves: Sequence) -> dict[str, dict[int, int]]:
    """``{module path: {old size: new size}}`` of every depthwise or grouped convolution for the variables'
    ``leaves`` (e.g. shrunk by :func:`jaxprune.graph.shrink`): its input channels, output channels and
    ``feature_group_count`` (whole groups go, each keeping its ``k`` inputs and ``m`` outputs), the sizes a rebuilt
    module's fields must hold (one old size never needs two new ones: equal old sizes have equal ``k``/``m``)."""
    out = {}
    for path, cin, groups, cout, new_cout in _grouped_convs(g, leaves):
        new_groups = new_cout // (cout // groups)
        out[path] = {cin: new_groups * (cin // groups), cout: new_cout, groups: new_groups}
    return out
