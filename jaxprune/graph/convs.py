"""Grouped convolutions in the op registry: depthwise convolutions follow their input's channels, other groupings
are refused by name.

A ``conv_general_dilated`` with ``feature_group_count == 1`` is a linear layer (:func:`jaxprune.graph.ops._linear`).
With ``feature_group_count == C_in`` (a **depthwise** convolution, channel multiplier ``m = C_out / C_in ≥ 1``,
any stride or dilation) output channel ``o`` reads input channel ``o // m`` alone, so it carries that channel's
unit: input channel ``c`` and its ``m`` output channels are one unit, and removing it cuts the producer's kernel
column (bias, BatchNorm), the depthwise kernel's ``m`` output channels (its bias and BatchNorm entries follow as
per-channel operands) and the consumers' input rows. The depthwise convolution is not a layer of its own (kind
``"depthwise"``): its MACs are counted under its module path (:func:`jaxprune.graph.count_macs`), and the rebuilt
model's ``feature_group_count`` must follow the new channel count (:func:`depthwise_groups` says what it must be; a
model that does not follow fails the rebuild's shape check, never silently). With ``1 < feature_group_count < C_in``
(a **grouped** convolution) its input and output channels are frozen with a reason naming the layer and the group
count (removal would need the same count per group)."""
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
    """Ungrouped: a layer. Depthwise: its outputs carry their input channel's unit. Grouped: refused by name."""
    groups = int(e.params.get("feature_group_count", 1))
    found = _depthwise_kernel(e, t) if groups > 1 else None
    if found is None:
        return ops._linear(e, t)
    leaf, out_axis = found
    a = e.ins[0]
    cin, cout = int(t.shapes[a][-1]), int(e.shapes[0][-1])
    name = t.n.module_path(leaf) or t.n.paths[leaf]
    if groups != cin:
        why = (f"the grouped convolution {name!r} (feature_group_count={groups} of {cin} input channels: its "
               "channels can only be removed in equal counts per group, which the graph does not do)")
        t.refused[name] = why
        return t.opaque(e, why)
    t.refused[name] = (f"a depthwise convolution (feature_group_count={groups}, its input channels): its output "
                       "channels carry its input's units; remove them at the layer that produces its input")
    ids = np.repeat(t.origin[a], cout // cin)  # output o reads input o // m
    t.add_slice(leaf, out_axis, ids)
    t.origin[e.outs[0]] = ids
    return "depthwise", ""


def depthwise_groups(g: Graph, leaves: Sequence) -> dict[str, int]:
    """``{module path: feature_group_count}`` of every depthwise convolution for the variables' ``leaves`` (e.g.
    shrunk by :func:`jaxprune.graph.shrink`): its kernel's output features over its channel multiplier — what a
    rebuilt model must set for the smaller input."""
    out = {}
    leaf_of = {vid: i for i, vid in enumerate(g.program.leaf_ids)}
    for k, e in enumerate(g.program.eqns):
        if g.kinds[k] != "depthwise":
            continue
        leaf, _ = ops.kernel_view(e.ins[1], leaf_of, g.program)
        axis = int(e.params["dimension_numbers"].rhs_spec[0])
        m = int(np.shape(g.net.leaves[leaf])[axis]) // int(e.params["feature_group_count"])
        out[g.net.module_path(leaf) or g.net.paths[leaf]] = int(np.shape(leaves[leaf])[axis]) // m
    return out
