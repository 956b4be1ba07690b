"""The network's graph of linear layers, read from the model itself (its jaxpr), for any Flax model.

:func:`build` traces ``apply(variables, x)`` with :func:`jax.make_jaxpr` (no class names, no layer-name patterns)
and classifies every equation of the flattened program (``jit`` calls are inlined; ``custom_jvp``/``custom_vjp``
calls such as ``jax.nn.relu`` are kept whole):

* a **linear layer** is a ``dot_general`` (dense: contracts the activation's last axis with axis 0 of a 2-D kernel)
  or a ``conv_general_dilated`` (channel-last activations, ``feature_group_count == 1``) whose kernel is a variable
  leaf; its identifier is the module path of that leaf, joined with ``"/"`` (``"block1/conv_a"``);
* its **chain**: the per-channel affine operations that directly follow it (bias, BatchNorm in inference form, a
  scale) — folded into the layer for LRP, shrunk with it;
* **activations** (elementwise, one activation operand: ReLU, tanh, a PReLU slope), **data movement** (reshape /
  flatten, transpose keeping the channel axis last, concatenation, slicing, padding), **pooling** (``reduce_window``
  max/sum over spatial axes, global means), **residual adds** (an elementwise op of two activations: their channels
  are *coupled*), and weight-only computations (BatchNorm's ``rsqrt(var + eps)``).

Channels are tracked through the program as *units*: every linear layer's outputs are units, and every activation's
last axis carries, per position, the unit it holds (a flatten tiles them, a concatenation joins them, a residual add
unites the units it adds). From that one table follow the producers and consumers of every layer, the variable
slices that remove a unit (its kernel column, bias, BatchNorm entries, the consumers' input rows — any leaf whose
axis is indexed by the unit), the coupled layers (a removal must take every unit of a coupled class) and the layers
that cannot shrink: units reaching the model's output or coupled to its input, and channels mixed by an operation
the table cannot follow (a reduction over channels that is not a norm's statistic, a softmax). Operations nothing
can follow are refused, by name, where a function needs them (LRP through a product of two activations, say);
building the graph never fails on them.

**Attention heads** (:mod:`~jaxprune.graph.attention`): a projection ``x · K (d, heads, head_dim)``
(``DenseGeneral``, an einsum, ``nnx.MultiHeadAttention``) is a layer of kind ``"heads"`` whose units are its heads,
and a dense layer whose ``heads·head_dim`` channels are reshaped into heads has each head's channels coupled; the
head axis is followed to the products of two activations (``q·kᵀ``, ``weights·v``), where the heads of both
operands are coupled (a key/value head with its query group under grouped-query attention), and to the output
projection, whose input rows are the heads'. Removing heads (``remove_many`` on the coupled q/k/v layers;
:func:`jaxprune.structured.keep_coupled`) shrinks every head axis and equals masking them. A gated MLP's product of
two activations (SwiGLU) couples the units of its two layers.

**Models.** A ``flax.linen.Module`` with ``{'params': …, ['batch_stats': …]}`` (applied as ``model.apply(variables,
x)``, with ``train=False`` when its ``__call__`` takes ``train``; inference mode must be its default otherwise), or an
NNX model as ``nnx.split`` gives it: ``(graphdef, state)`` (call ``model.eval()`` first when it has BatchNorm or
dropout). Smaller models (after removing units) are rebuilt through, in this order: the model's own
``with_widths(widths: dict[layer, int]) -> Module`` method; for NNX, the shrunk state with the modules' width attributes set to the new shapes (``in_features``,
``LinearGeneral``'s tuples, ``nnx.MultiHeadAttention``'s ``num_heads``/``qkv_features``);
for linen, integer (or tuple-of-integer) dataclass fields found to set a layer's width (each is perturbed once and
the parameter shapes compared), then, for the layers no field sets (widths written inline, ``nn.Dense(48)``),
interception of the submodules' calls (:mod:`~jaxprune.graph.surgery`): the returned model is a subclass of the
model's class that sets the width fields of the submodules at the shrunk layers' module paths. A layer none of these
reaches (a width written into a ``self.param`` shape) is refused with this contract in the message.

**Inside** (one module per concern): :mod:`~jaxprune.graph.program` (the model as a pure function and its flattened
program), :mod:`~jaxprune.graph.ops` (the op registry: one handler per primitive family), :mod:`~jaxprune.graph.table`
(the unit table the handlers fill), :mod:`~jaxprune.graph.analyse` (:func:`build`), :mod:`~jaxprune.graph.execute`
(:func:`run`, the replay with probes or LRP rules), :mod:`~jaxprune.graph.attention` (heads),
:mod:`~jaxprune.graph.surgery` (:func:`shrink`,
:func:`silence`, :func:`rebuild`), :mod:`~jaxprune.graph.cost` (:func:`count_macs`, :func:`uncounted`,
:func:`param_roles`), :mod:`~jaxprune.graph.inputs` (:func:`example_input`), :mod:`~jaxprune.graph.convs`
(depthwise convolutions follow their input's units; grouped ones couple each group's input
channels, removed in whole groups), :mod:`~jaxprune.graph.norms`
(LayerNorm, RMSNorm, GroupNorm: a reduction over channels broadcast back onto the same activation is a statistic,
not a mixer; GroupNorm groups are coupled, LayerNorm/RMSNorm channels removable but not maskable).

**Adding a graph op** (a primitive the graph refuses today): write one handler ``handler(e, t) -> (kind, note)``
registered with ``@ops.register_op("primitive_name")`` in :mod:`jaxprune.graph.ops` (≤ 25 lines: map the activation
operand's units ``t.origin[in]`` to the outputs' ``t.origin[out]``, couple units with ``t.unite``, record the
parameter axes they index with ``t.add_slice``, or give up with ``t.opaque(e, why)``), and one test on a small model
written in the test that uses the op (``remove_units`` == ``mask_units`` through it, or its refusal naming it).
"""
from __future__ import annotations

from jaxprune.graph.analyse import build
from jaxprune.graph.convs import depthwise_groups
from jaxprune.graph.norms import regrouped
from jaxprune.graph.cost import count_macs, param_roles, role_prunable, uncounted
from jaxprune.graph.execute import BoundOp, folded, lrp_role, run, safe_divide, stabilize
from jaxprune.graph.inputs import example_input
from jaxprune.graph.model_graph import OUTPUT, Graph, Layer
from jaxprune.graph.ops import OPS, register_op
from jaxprune.graph.program import (Eqn, Net, Program, UnsupportedError, _is_nnx_graphdef, _is_nnx_module,
                                    _path_str, call_kwargs, net, takes_train)
from jaxprune.graph.surgery import rebuild, shrink, silence

__all__ = ["Net", "Layer", "Graph", "net", "build", "run", "shrink", "silence", "rebuild", "count_macs", "uncounted",
           "param_roles", "role_prunable", "UnsupportedError", "OPS", "register_op", "depthwise_groups",
           "regrouped"]
