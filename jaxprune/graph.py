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
the table cannot follow (a reduction over channels, a softmax). Operations nothing can follow are refused, by name,
where a function needs them (LRP through a product of two activations, say); building the graph never fails on them.

**Models.** A ``flax.linen.Module`` with ``{'params': …, ['batch_stats': …]}`` (applied as ``model.apply(variables,
x)``, with ``train=False`` when its ``__call__`` takes ``train``; inference mode must be its default otherwise), or an
NNX model as ``nnx.split`` gives it: ``(graphdef, state)`` (call ``model.eval()`` first when it has BatchNorm or
dropout). Smaller models (after removing units) are rebuilt through, in this order: the model's own
``with_widths(widths: dict[layer, int]) -> Module`` method; for NNX, nothing (the state's shapes are the model's);
for linen, integer (or tuple-of-integer) dataclass fields found to set a layer's width (each is perturbed once and
the parameter shapes compared). A model with none of these is refused with this contract in the message.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any

__all__ = ["Net", "Layer", "Graph", "net", "build", "run", "shrink", "silence", "rebuild", "count_macs", "uncounted", "param_roles",
           "UnsupportedError"]


class UnsupportedError(ValueError):
    """An operation of the model that the requested function cannot follow (named in the message)."""


# ----------------------------------------------------------------------------------------------- models
def _path_str(path: tuple) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue  # nnx.State leaves are Variables: ``…/kernel/value``
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def _is_nnx_graphdef(model: Any) -> bool:
    return type(model).__name__ in ("GraphDef", "NodeDef") and type(model).__module__.startswith("flax.nnx")


def _is_nnx_module(model: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, nnx.Module)


@dataclasses.dataclass(frozen=True, eq=False)
class Net:
    """A model and its variables as one pure function over a pytree of arrays.

    ``tree``: the variables (linen dict of collections, or an ``nnx.State``); ``paths[i]``: the ``"/"``-joined path
    of leaf ``i`` (the linen collection first, e.g. ``"params/fc1/kernel"``); ``prefix[i]``: how many leading path
    parts are not module names (1 for linen collections, 0 for NNX).
    """

    model: Any
    kind: str  # "linen" | "nnx"
    tree: PyTree
    treedef: Any
    paths: tuple[str, ...]
    prefix: int
    call_kwargs: tuple = ()

    @property
    def leaves(self) -> list[Array]:
        return jax.tree_util.tree_leaves(self.tree)

    def apply(self, leaves: Sequence[Array], x: Array) -> Array:
        tree = jax.tree_util.tree_unflatten(self.treedef, list(leaves))
        if self.kind == "linen":
            return self.model.apply(tree, x, **dict(self.call_kwargs))
        from flax import nnx

        return nnx.merge(self.model, tree)(x)

    def module_path(self, i: int) -> str:
        """Module path of leaf ``i`` (``"block1/conv_a"``) and its name (``"kernel"``)."""
        parts = self.paths[i].split("/")
        return "/".join(parts[self.prefix:-1])

    def with_leaves(self, leaves: Sequence[Array]) -> PyTree:
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))


def net(model: Any, variables: Any = None) -> Net:
    """Normalise ``(model, variables)``: a linen module with its variables dict, or NNX ``(graphdef, state)``
    (an ``nnx.Module`` is split here)."""
    if _is_nnx_module(model):
        from flax import nnx

        model, variables = nnx.split(model)
    if _is_nnx_graphdef(model):
        leaves, treedef = jax.tree_util.tree_flatten(variables)
        paths = tuple(_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables))
        return Net(model, "nnx", variables, treedef, paths, 0)
    import flax.linen as nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a flax.linen.Module or an NNX model (graphdef from nnx.split), got "
                        f"{type(model).__name__}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables: expected the model's variables {'params': ..., ['batch_stats': ...]}, got "
                         f"{type(variables).__name__}" + (f" with keys {sorted(variables)}"
                                                          if isinstance(variables, Mapping) else ""))
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats") or k not in ("intermediates",
                                                                                                    "representations")}
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    paths = tuple(_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables))
    return Net(model, "linen", variables, treedef, paths, 1, call_kwargs(model))


def call_kwargs(model: Any) -> tuple:
    """``(("train", False),)`` when a linen model's ``__call__`` takes ``train`` (inference mode), else ``()``."""
    try:
        sig = inspect.signature(type(model).__call__)
    except (TypeError, ValueError):  # pragma: no cover
        return ()
    return (("train", False),) if "train" in sig.parameters else ()


# ----------------------------------------------------------------------------------------------- flat program
@dataclasses.dataclass(frozen=True, eq=False)
class Eqn:
    """One equation of the flattened program: inputs are var ids (int) or literals (``("lit", value)``)."""

    prim: Any
    params: dict
    ins: tuple
    outs: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]  # output shapes
    dtypes: tuple

    @property
    def name(self) -> str:
        return self.prim.name

    def bind(self, *args):
        got = self.prim.get_bind_params(self.params)
        # jax < 0.7 returned (subfuns, params); newer versions return the params alone
        subfuns, params = got if isinstance(got, tuple) else ((), got)
        out = self.prim.bind(*subfuns, *args, **params)
        return out if self.prim.multiple_results else [out]


_INLINE = ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "remat2")


def _flatten(jaxpr, consts, ids: list, counter: list, eqns: list, const_vals: dict) -> list:
    """Append ``jaxpr``'s equations to ``eqns`` with its invars bound to ``ids``; returns its outvar ids."""
    from jax.extend import core as jcore

    env = dict(zip(jaxpr.invars, ids))
    for v, c in zip(jaxpr.constvars, consts):
        counter[0] += 1
        env[v] = counter[0]
        const_vals[counter[0]] = c

    def read(v):
        if isinstance(v, jcore.Literal):
            return ("lit", v.val)
        return env[v]

    for e in jaxpr.eqns:
        ins = [read(v) for v in e.invars]
        sub = e.params.get("jaxpr") if e.primitive.name in _INLINE else None
        if sub is not None and hasattr(sub, "jaxpr"):
            sub_ids = []
            for a in ins:
                if isinstance(a, tuple):  # a literal argument: give it an id with a constant value
                    counter[0] += 1
                    const_vals[counter[0]] = a[1]
                    a = counter[0]
                sub_ids.append(a)
            outs = _flatten(sub.jaxpr, sub.consts, sub_ids, counter, eqns, const_vals)
            for v, o in zip(e.outvars, outs):
                env[v] = o
            continue
        outs = []
        for v in e.outvars:
            counter[0] += 1
            env[v] = counter[0]
            outs.append(counter[0])
        eqns.append(Eqn(e.primitive, dict(e.params), tuple(ins), tuple(outs),
                        tuple(tuple(v.aval.shape) for v in e.outvars), tuple(v.aval.dtype for v in e.outvars)))
    return [read(v) for v in jaxpr.outvars]


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    eqns: tuple[Eqn, ...]
    leaf_ids: tuple[int, ...]
    x_id: int
    out_ids: tuple
    consts: dict
    shapes: dict  # var id -> shape


def _trace(n: Net, x: jax.ShapeDtypeStruct) -> Program:
    leaves = [_spec(a) for a in n.leaves]
    closed = jax.make_jaxpr(lambda ls, v: n.apply(ls, v))(leaves, x)
    jaxpr = closed.jaxpr
    counter = [0]
    ids = []
    for _ in jaxpr.invars:
        counter[0] += 1
        ids.append(counter[0])
    eqns: list[Eqn] = []
    consts: dict = {}
    outs = _flatten(jaxpr, closed.consts, ids, counter, eqns, consts)
    shapes = {i: tuple(v.aval.shape) for i, v in zip(ids, jaxpr.invars)}
    for e in eqns:
        shapes.update(zip(e.outs, e.shapes))
    for i, c in consts.items():
        shapes[i] = tuple(np.shape(c))
    return Program(tuple(eqns), tuple(ids[:-1]), ids[-1], tuple(outs), consts, shapes)


# ----------------------------------------------------------------------------------------------- classification
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
# LRP through pooling and reductions: sums are linear maps of their inputs, whose relevance is shared in proportion
# to the inputs ("prop"); max/min send it to the winner through their own VJP ("plain"); others are refused
_REDUCE_ROLES = {"reduce_window_sum": "prop", "reduce_sum": "prop", "cumsum": "prop", "reduce_window_max": "plain",
                 "reduce_window_min": "plain", "reduce_max": "plain", "reduce_min": "plain", "cummax": "plain",
                 "cummin": "plain"}


def _jaxpr_elementwise(jaxpr) -> bool:
    for e in jaxpr.eqns:
        sub = e.params.get("jaxpr") if e.primitive.name in _INLINE else None
        if sub is not None:
            if not _jaxpr_elementwise(sub.jaxpr):
                return False
        elif e.primitive.name not in ELEMENTWISE and e.primitive.name not in ("broadcast_in_dim",):
            return False
    return True


def _is_relu_jaxpr(jaxpr) -> bool:
    """``max(x, 0)`` (possibly inside ``jit``): a positively homogeneous activation."""
    eqns = list(jaxpr.eqns)
    while len(eqns) == 1 and eqns[0].primitive.name in _INLINE:
        eqns = list(eqns[0].params["jaxpr"].jaxpr.eqns)
    from jax.extend import core as jcore

    return (len(eqns) == 1 and eqns[0].primitive.name == "max"
            and any(isinstance(v, jcore.Literal) and float(np.asarray(v.val)) == 0.0 for v in eqns[0].invars))


def _inner(e: Eqn):
    for key in ("call_jaxpr", "fun_jaxpr", "jaxpr"):
        j = e.params.get(key)
        if j is not None and hasattr(j, "jaxpr"):
            return j.jaxpr
        if j is not None and hasattr(j, "eqns"):
            return j
    return None


@dataclasses.dataclass(frozen=True)
class Layer:
    """A linear layer of the graph.

    ``name``: module path (``"block1/conv_a"``); ``kind``: ``"dense"`` or ``"conv"``; ``units``: its outputs;
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
    #                "opaque"
    roles: tuple  # per eqn: the LRP treatment ("rule", "skip", "pass", "prop", "plain", "unsupported")
    notes: tuple  # per eqn: why unsupported (or "")
    owner: np.ndarray  # unit id -> producer index (-1 input, -2 constant/opaque, k: k-th layer)
    index: np.ndarray  # unit id -> index within its producer
    cls: np.ndarray  # unit id -> coupling class representative
    frozen: dict  # class id -> reason its units cannot be removed
    slices: tuple  # ((leaf index, axis, unit ids (size,)), ...): every leaf axis indexed by units
    unit_ids: dict  # layer name -> (units,) unit ids
    near: tuple  # per eqn: the last layer before it (for messages)
    homogeneous: dict  # layer name -> True when every path to its consumers is positively homogeneous
    origins: dict  # activation var id -> (last dim,) unit ids
    refused: dict  # module path -> why its linear-looking operation is not a supported layer

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
            return (f"its units are coupled to layers {list(others)} (a residual add or a shared channel): remove "
                    "units from all of them alike, in one call (remove_many with the same kept units)")
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
                left = sorted({self._owner_name(int(m)) for m in missing})
                raise ValueError(f"keep: units of {sorted({self._owner_name(int(m)) for m in members if removed[m]})} "
                                 f"are coupled to units of {left} (a residual add or a shared channel joins "
                                 f"{names}); remove the coupled units of every one of these layers alike, in one "
                                 "call (remove_many)")
        return removed


# ----------------------------------------------------------------------------------------------- analysis
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


def _last(shape) -> int:
    return int(shape[-1]) if len(shape) else 1


def _spec(a: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(a.shape), a.dtype) if hasattr(a, "shape") and hasattr(a, "dtype") else \
        jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))


def build(model: Any, variables: Any, x: Any) -> Graph:
    """The graph of ``model`` for inputs shaped like ``x`` (an array or ``jax.ShapeDtypeStruct`` ``(n, …)``)."""
    n = net(model, variables)
    spec = example_input(model, variables, x)
    return _build_cached(n.model, n.kind, n.treedef, tuple((tuple(s.shape), str(s.dtype))
                                                            for s in map(_spec, n.leaves)), n.paths, n.call_kwargs,
                         spec, n)


def _build_cached(model, kind, treedef, leaf_specs, paths, call_kwargs, spec, n: Net) -> Graph:
    key = (id(model) if kind == "nnx" else model, kind, treedef, leaf_specs, paths, call_kwargs,
           (spec.shape, str(spec.dtype)))
    try:
        hit = _CACHE.get(key)
    except TypeError:  # an unhashable model field
        hit, key = None, None
    if hit is not None and (kind != "nnx" or hit.net.model is model):
        return dataclasses.replace(hit, net=n) if hit.net is not n else hit
    try:
        prog = _trace(n, spec)
    except Exception as e:  # the model's own error, with what we called
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"x: the model does not run on inputs of shape {spec.shape} {spec.dtype} "
                         f"(apply(variables, x) fails with: {msg})") from e
    g = _analyse(n, prog)
    if key is not None:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = g
    return g


_CACHE: dict = {}


OUTPUT = "it is an output layer: its units are (or are coupled to) the model's outputs"


def _analyse(n: Net, prog: Program) -> Graph:
    leaf_of = {vid: i for i, vid in enumerate(prog.leaf_ids)}
    shapes = prog.shapes
    uf = _UF()
    owner: list[int] = []
    index: list[int] = []

    def new_units(count: int, who: int) -> np.ndarray:
        ids = uf.add(count)
        owner.extend([who] * count)
        index.extend(range(count))
        return ids

    frozen_units: dict[int, str] = {}

    def freeze(ids, reason: str) -> None:
        for u in np.asarray(ids).ravel().tolist():
            frozen_units.setdefault(int(u), reason)

    origin: dict[int, np.ndarray] = {}  # activation var -> (last dim,) unit ids
    sources: dict[int, frozenset] = {}  # weight var -> leaf indices it is computed from
    for vid, i in leaf_of.items():
        sources[vid] = frozenset({i})
    for vid in prog.consts:
        sources[vid] = frozenset()
    x_units = new_units(_last(shapes[prog.x_id]), -1)
    origin[prog.x_id] = x_units
    freeze(x_units, "they are coupled to the model's input channels")

    kinds, roles, notes, near = [], [], [], []
    layers: list[dict] = []
    slices: dict[tuple[int, int], np.ndarray] = {}
    uses: dict[int, list[int]] = {}
    for k, e in enumerate(prog.eqns):
        for a in e.ins:
            if isinstance(a, int):
                uses.setdefault(a, []).append(k)

    def add_slice(leaf: int, axis: int, ids: np.ndarray) -> None:
        key = (leaf, axis % max(len(np.shape(n.leaves[leaf])), 1))
        if key in slices:
            old = slices[key]
            if old.shape != ids.shape:
                freeze(np.concatenate([old, ids]), f"parameter {n.paths[leaf]!r} is read with different channel "
                                                   "layouts")
                return
            for a, b in zip(old.tolist(), ids.tolist()):
                uf.union(a, b)
        else:
            slices[key] = np.asarray(ids)

    def per_channel_followers(w, c: int, ids: np.ndarray) -> bool:
        """Record the leaves of a weight operand indexed by the channel axis; False if one cannot be sliced."""
        if isinstance(w, tuple) or w not in sources:
            return True
        shp = shapes.get(w, ())
        if _last(shp) != c or c == 1:
            return True
        ok = True
        for leaf in sources[w]:
            ls = np.shape(n.leaves[leaf])
            if len(ls) and ls[-1] == c:
                add_slice(leaf, len(ls) - 1, ids)
            else:
                ok = False
                freeze(ids, f"the per-channel operand computed from parameter {n.paths[leaf]!r} (shape {ls}) does "
                            "not index its last axis by channel")
        return ok

    def is_per_channel_only(w) -> bool:
        if isinstance(w, tuple):
            return np.ndim(w[1]) == 0 or int(np.prod(np.shape(w[1]))) == 1
        shp = shapes.get(w, ())
        return all(int(d) == 1 for d in shp[:-1])

    last_layer = [None]
    refused: dict[str, str] = {}
    for k, e in enumerate(prog.eqns):
        near.append(last_layer[0])
        act_in = [a for a in e.ins if isinstance(a, int) and a in origin]
        kind, role, note = "weight", "plain", ""
        if not act_in:
            src = frozenset().union(*[sources.get(a, frozenset()) for a in e.ins if isinstance(a, int)])
            for o in e.outs:
                sources[o] = src
        elif e.name in LINEAR:
            kind, role, note = _linear(e, k, prog, origin, sources, leaf_of, n, layers, new_units, add_slice,
                                       last_layer, freeze, shapes)
            w = e.ins[1] if len(e.ins) > 1 else None
            if kind != "linear" and isinstance(w, int) and w in leaf_of:
                refused[n.module_path(leaf_of[w]) or n.paths[leaf_of[w]]] = note
        elif len(e.outs) == 1 and (e.name in ELEMENTWISE or e.name in ("custom_jvp_call", "custom_vjp_call",
                                                                         "custom_vjp_call_jaxpr")):
            inner = _inner(e) if e.name.startswith("custom") else None
            if inner is not None and not _jaxpr_elementwise(inner):
                kind, role = "opaque", "unsupported"
                note = f"{e.name}[{e.params.get('name', '')}] is not elementwise"
                _opaque(e, act_in, origin, new_units, freeze, note, shapes)
            else:
                out_shape = tuple(e.shapes[0])
                pos = [i for i, b in enumerate(e.ins) if isinstance(b, int) and b in origin]
                distinct = list(dict.fromkeys(e.ins[i] for i in pos))
                if len(distinct) >= 2:
                    kind = "merge"
                    full = [a for a in distinct if tuple(shapes[a]) == out_shape]
                    base = origin[full[0]] if full else origin[distinct[0]]
                    for a in distinct:
                        if _last(shapes[a]) == base.size:
                            for u, v in zip(base.tolist(), origin[a].tolist()):
                                uf.union(u, v)
                        else:
                            freeze(origin[a], f"{e.name} broadcasts its channels over another activation's")
                    origin[e.outs[0]] = base
                    role = "prop" if e.name in ("add", "sub", "add_any") else "unsupported"
                    note = "" if role == "prop" else f"{e.name} of two activations (a product or gate)"
                else:
                    a = distinct[0]
                    ids = origin[a]
                    if tuple(shapes[a]) != out_shape:
                        kind, role, note = "opaque", "unsupported", f"{e.name} broadcasts an activation"
                        _opaque(e, act_in, origin, new_units, freeze, note, shapes)
                    else:
                        others = [b for i, b in enumerate(e.ins) if i not in pos]
                        for b in others:
                            per_channel_followers(b, ids.size, ids)
                        if len(pos) > 1:  # x + x, x * x: a function of one activation
                            kind, role = ("affine", "prop") if e.name in ("add", "sub", "add_any") else (
                                "activation", "pass")
                        elif e.name in AFFINE and not (e.name == "div" and pos[0] != 0):
                            kind, role = "affine", "prop"
                            if not all(is_per_channel_only(b) for b in others):
                                kind = "affine_spatial"
                        elif e.name == "convert_element_type":
                            kind, role = "move", "plain"
                        else:
                            kind, role = "activation", "pass"
                        origin[e.outs[0]] = ids
        elif e.name in MOVES or e.name in POOLS or e.name in REDUCTIONS:
            kind, role, note = _move(e, act_in, origin, new_units, freeze, uf, shapes)
        else:
            kind, role = "opaque", "unsupported"
            note = f"{e.name} is not an operation the graph can follow"
            _opaque(e, act_in, origin, new_units, freeze, note, shapes)
        kinds.append(kind)
        roles.append(role)
        notes.append(note)

    # chains: per-channel affine ops directly after each layer (single use), BatchNorm form recognised
    names = [l["name"] for l in layers]
    lay: dict[str, Layer] = {}
    out_units = set()
    for o in prog.out_ids:
        if isinstance(o, int) and o in origin:
            out_units |= set(origin[o].tolist())
    producer = {o: e for e in prog.eqns for o in e.outs}  # var id -> the equation computing it
    for li, l in enumerate(layers):
        chain, cur = [], l["var"]
        while True:
            us = uses.get(cur, [])
            if len(us) != 1 or kinds[us[0]] != "affine" or cur in prog.out_ids:
                break
            chain.append(us[0])
            cur = prog.eqns[us[0]].outs[0]
        for c in chain:
            kinds[c] = "chain"
        bias, bn = _chain_params(prog, chain, l["var"], sources, producer)
        lay[l["name"]] = dict(l, chain=tuple(chain), out=cur, bias=bias, batchnorm=bn)
    # consumers / producers
    uid_owner = np.asarray(owner, np.int64)
    cls = uf.classes()
    frozen = {}
    for u, reason in frozen_units.items():
        frozen.setdefault(int(cls[u]), reason)
    # a layer whose units are model outputs: say so first
    for u in out_units:
        frozen[int(cls[u])] = OUTPUT
    idx_arr = np.asarray(index, np.int64)
    unit_ids = {l["name"]: l["ids"] for l in layers}
    owners_of_class: dict[int, set] = {}
    for u, o in enumerate(uid_owner.tolist()):
        owners_of_class.setdefault(int(cls[u]), set()).add(o)
    feeds = []
    for l in lay.values():
        got = set()
        for c in set(cls[l["in_ids"]].tolist()):
            got |= owners_of_class[int(c)]
        feeds.append(got)
    label = lambda o: "input" if o == -1 else "constant" if o == -2 else names[o]
    result = {}
    for li, (name, l) in enumerate(lay.items()):
        in_names = tuple(label(o) for o in sorted(feeds[li], key=lambda o: (o < 0, o)))
        cons = tuple(names[j] for j, f in enumerate(feeds) if li in f)
        zero = []
        for c in l["chain"]:
            ce = prog.eqns[c]
            if ce.name in ("add", "sub", "mul"):
                for b in ce.ins:
                    if isinstance(b, int) and b not in origin:
                        zero.extend(sorted(sources.get(b, ())))
        bn = dict(l["batchnorm"]) if l["batchnorm"] else None
        if bn is not None:
            zero = [i for i in (bn["scale"], bn["bias"], bn["layer_bias"]) if i is not None]
        result[name] = Layer(name=name, kind=l["kind"], units=l["units"], eqn=l["eqn"], chain=l["chain"],
                             out=l["out"], kernel=l["kernel"], in_axis=l["in_axis"], out_axis=l["out_axis"],
                             bias=l["bias"], batchnorm=l["batchnorm"], inputs=in_names, consumers=cons,
                             positions=l["positions"], zero=tuple(dict.fromkeys(zero)))
    homogeneous = {name: _homogeneous(prog, kinds, l.out, uses) for name, l in result.items()}
    g = Graph(net=n, program=prog, layers=result, kinds=tuple(kinds), roles=tuple(roles), notes=tuple(notes),
              owner=uid_owner, index=idx_arr, cls=cls, frozen=frozen,
              slices=tuple((leaf, axis, ids) for (leaf, axis), ids in slices.items()), unit_ids=unit_ids,
              near=tuple(near), homogeneous=homogeneous, origins=origin, refused=refused)
    return g


def _homogeneous(prog: Program, kinds, start: int, uses) -> bool:
    """True when every path from ``start`` to the next linear layers passes only positively homogeneous ops
    (ReLU, max/average pooling, data movement): ``f(s·v) = s·f(v)`` for ``s > 0``, as neuron merging needs."""
    todo, seen = [start], set()
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        for k in uses.get(v, []):
            e = prog.eqns[k]
            kind = kinds[k]
            if kind == "linear":
                continue
            if kind == "activation":
                inner = _inner(e)
                relu = (e.name == "max" and any(isinstance(a, tuple) and float(np.asarray(a[1])) == 0.0
                                                 for a in e.ins)) or (inner is not None and _is_relu_jaxpr(inner))
                if not relu:
                    return False
            elif kind in ("move", "pool") or (kind == "affine" and e.name in ("mul", "div") and all(
                    isinstance(a, tuple) for a in e.ins if a is not v)):
                pass
            elif kind == "reduce" and e.name == "reduce_sum":
                pass
            else:
                return False
            todo.extend(e.outs)
    return True


def _chain_params(prog: Program, chain: list[int], start: int, sources,
                  producer: dict) -> tuple[int | None, tuple | None]:
    """The bias leaf of a ``[add bias]`` chain, and BatchNorm's leaves when the chain is ``sub mean, mul
    rsqrt(var + eps)·scale, add bias`` (flax's inference form), found from the equations themselves."""
    eqns = [prog.eqns[c] for c in chain]
    if not eqns:
        return None, None

    def operand(e, cur):
        return next(a for a in e.ins if a != cur)

    def single_leaf(w):
        if isinstance(w, tuple):
            return None
        s = sources.get(w, frozenset())
        return next(iter(s)) if len(s) == 1 else None

    cur = start
    ops = []
    for e in eqns:
        ops.append((e.name, operand(e, cur)))
        cur = e.outs[0]
    bias = None
    if len(ops) == 1 and ops[0][0] == "add":
        bias = single_leaf(ops[0][1])
        return bias, None
    names = [o[0] for o in ops]
    if names in (["sub", "mul", "add"], ["sub", "mul"], ["add", "sub", "mul", "add"], ["add", "sub", "mul"]):
        pre_bias = None
        if names[0] == "add":
            pre_bias = single_leaf(ops[0][1])
            ops = ops[1:]
        mean = single_leaf(ops[0][1])
        w = ops[1][1]
        # w = rsqrt(var + eps) [* scale]; walk the producers
        leaves_in = sources.get(w, frozenset()) if not isinstance(w, tuple) else frozenset()
        var = eps = scale = None
        seen, todo = set(), [w]
        while todo:
            v = todo.pop()
            if isinstance(v, tuple) or v in seen or v not in producer:
                continue
            seen.add(v)
            pe = producer[v]
            if pe.name == "rsqrt":
                src = pe.ins[0]
                if not isinstance(src, tuple) and src in producer and producer[src].name == "add":
                    ae = producer[src]
                    lits = [a for a in ae.ins if isinstance(a, tuple)]
                    others = [a for a in ae.ins if not isinstance(a, tuple)]
                    if lits and others:
                        eps = float(np.asarray(lits[0][1]))
                        var = single_leaf(others[0])
            todo.extend(a for a in pe.ins if not isinstance(a, tuple))
        if var is not None:
            rest = set(leaves_in) - {var}
            scale = next(iter(rest)) if len(rest) == 1 else None
            beta = single_leaf(ops[2][1]) if len(ops) > 2 else None
            if mean is not None and len(rest) <= 1:
                bn = (("mean", mean), ("var", var), ("scale", scale), ("bias", beta), ("epsilon", eps),
                      ("layer_bias", pre_bias))
                return pre_bias, bn
    return None, None


def _linear(e: Eqn, k: int, prog: Program, origin, sources, leaf_of, n: Net, layers, new_units, add_slice,
            last_layer, freeze, shapes):
    a, w = e.ins[0], e.ins[1]
    lead = lambda why: ("opaque", "unsupported", why)
    if not (isinstance(a, int) and a in origin) or isinstance(w, tuple) or w in origin:
        note = f"{e.name} of two activations (attention-like products are not linear layers)" if (
            isinstance(w, int) and w in origin) else f"{e.name} with the activation as its second operand"
        _opaque(e, [v for v in e.ins if isinstance(v, int) and v in origin], origin, new_units, freeze, note, shapes)
        return lead(note)
    src = sources.get(w, frozenset())
    leaf, perm = _kernel_view(w, leaf_of, prog)
    if leaf is not None:
        pass
    elif w in prog.consts or not src:
        # a linear map with constant weights (e.g. a fixed filter): weight-free, proportional LRP
        note = f"{e.name} with constant weights"
        _opaque(e, [a], origin, new_units, freeze, note, shapes)
        return "opaque", "unsupported", note
    else:
        note = (f"{e.name} reads a kernel computed from parameters {[n.paths[i] for i in sorted(src)]}; supported: "
                "a kernel stored as one parameter")
        _opaque(e, [a], origin, new_units, freeze, note, shapes)
        return "opaque", "unsupported", note
    kshape = np.shape(n.leaves[leaf])
    xshape = shapes[a]
    if e.name == "dot_general":
        (lc, rc), (lb, rb) = e.params["dimension_numbers"]
        if lb or rb or tuple(lc) != (len(xshape) - 1,) or tuple(rc) not in ((0,), (1,)) or len(kshape) != 2 or \
                (perm is None and tuple(rc) != (0,)):
            note = (f"dot_general with dimension numbers {e.params['dimension_numbers']} (a dense layer contracts "
                    "the activation's last axis with one axis of a 2-D kernel)")
            _opaque(e, [a], origin, new_units, freeze, note, shapes)
            return lead(note)
        in_axis = (perm or (0, 1))[int(rc[0])]  # the kernel leaf's axes (a transposed view: a tied weight)
        kind, out_axis, positions = "dense", 1 - in_axis, int(np.prod(e.shapes[0][1:-1])) if len(e.shapes[0]) > 2 else 1
    elif perm is not None:
        note = "conv_general_dilated with a transposed kernel"
        _opaque(e, [a], origin, new_units, freeze, note, shapes)
        return lead(note)
    else:
        dn = e.params["dimension_numbers"]
        lhs, rhs, out = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        nd = len(xshape)
        if lhs[1] != nd - 1 or out[1] != nd - 1 or e.params.get("feature_group_count", 1) != 1 or \
                e.params.get("batch_group_count", 1) != 1:
            note = (f"conv_general_dilated with feature_group_count={e.params.get('feature_group_count')} and "
                    f"dimension numbers {dn} (supported: channel-last, feature_group_count=1)")
            _opaque(e, [a], origin, new_units, freeze, note, shapes)
            return lead(note)
        kind, in_axis, out_axis = "conv", int(rhs[1]), int(rhs[0])
        positions = int(np.prod(e.shapes[0][1:-1]))
    name = n.module_path(leaf) or n.paths[leaf]
    uses = sum(1 for l in layers if l["kernel"] == leaf)
    name = name if not uses else f"{name}#{uses + 1}"  # a kernel used again (tied weights): its own layer name
    li = len(layers)
    units = int(kshape[out_axis])
    ids = new_units(units, li)
    add_slice(leaf, out_axis, ids)
    add_slice(leaf, in_axis, origin[a])
    layers.append(dict(name=name, kind=kind, units=units, eqn=k, var=e.outs[0], kernel=leaf, in_axis=in_axis,
                       out_axis=out_axis, ids=ids, in_ids=np.asarray(origin[a]), positions=positions))
    origin[e.outs[0]] = ids
    last_layer[0] = name
    return "linear", "rule", ""


def _kernel_view(w, leaf_of: dict, prog: Program) -> tuple[int | None, tuple | None]:
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


def _opaque(e: Eqn, act_in, origin, new_units, freeze, note: str, shapes) -> None:
    for a in act_in:
        freeze(origin[a], f"their channels are mixed by {note}")
    for o, shp in zip(e.outs, e.shapes):
        ids = new_units(_last(shp), -2)
        freeze(ids, f"they come from {note}")
        origin[o] = ids


def _move(e: Eqn, act_in, origin, new_units, freeze, uf, shapes):
    """Data movement, pooling and reductions: how the channel axis (last) is carried."""
    name = e.name
    a = act_in[0]
    ids = origin[a]
    ishape, oshape = tuple(shapes[a]), tuple(e.shapes[0])
    nd = len(ishape)

    def opaque(why):
        _opaque(e, act_in, origin, new_units, freeze, why, shapes)
        return "opaque", "unsupported", why

    if name in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
        origin[e.outs[0]] = ids
        return "move", "plain", ""
    if name == "reshape":
        c, c2 = _last(ishape), _last(oshape)
        if not oshape:
            return opaque("reshape to a scalar")
        if c2 % c == 0:
            origin[e.outs[0]] = np.tile(ids, c2 // c)
        elif c % c2 == 0:
            grid = ids.reshape(-1, c2)
            for row in grid[1:]:
                for u, v in zip(grid[0].tolist(), row.tolist()):
                    uf.union(u, v)
            origin[e.outs[0]] = grid[0]
        else:
            return opaque(f"reshape {ishape} -> {oshape} (mixes the channel axis)")
        return "move", "plain", ""
    if name in ("squeeze", "expand_dims"):
        if _last(oshape) != _last(ishape):
            return opaque(f"{name} that moves the channel axis")
        origin[e.outs[0]] = ids
        return "move", "plain", ""
    if name == "broadcast_in_dim":
        dims = tuple(e.params["broadcast_dimensions"])
        if nd and dims and dims[-1] == len(oshape) - 1 and oshape[-1] == ishape[-1]:
            origin[e.outs[0]] = ids
            return "move", "plain", ""
        return opaque(f"broadcast_in_dim {ishape} -> {oshape} (of an activation)")
    if name == "transpose":
        perm = tuple(e.params["permutation"])
        if perm and perm[-1] == nd - 1:
            origin[e.outs[0]] = ids
            return "move", "plain", ""
        return opaque(f"transpose {perm} (moves the channel axis; channel-last layouts are supported)")
    if name == "concatenate":
        dim = int(e.params["dimension"])
        if dim == nd - 1:
            parts = []
            for b, shp in zip(e.ins, [shapes.get(b, ()) if isinstance(b, int) else np.shape(b[1]) for b in e.ins]):
                if isinstance(b, int) and b in origin:
                    parts.append(origin[b])
                else:
                    const = new_units(_last(shp), -2)
                    freeze(const, "they are constant channels of a concatenation")
                    parts.append(const)
            origin[e.outs[0]] = np.concatenate(parts)
            return "move", "plain", ""
        for b in act_in[1:]:
            for u, v in zip(ids.tolist(), origin[b].tolist()):
                uf.union(u, v)
        origin[e.outs[0]] = ids
        return "move", "plain", ""
    if name in ("slice", "dynamic_slice", "pad", "rev"):
        if name == "slice":
            s, lim = e.params["start_indices"][-1], e.params["limit_indices"][-1]
            st = (e.params.get("strides") or (1,) * nd)[-1]
            origin[e.outs[0]] = ids[s:lim:st]
        elif name == "dynamic_slice":
            if oshape[-1] != ishape[-1]:
                return opaque("dynamic_slice of the channel axis")
            origin[e.outs[0]] = ids
        elif name == "pad":
            lo, hi, interior = e.params["padding_config"][-1]
            if (lo, hi, interior) == (0, 0, 0):
                origin[e.outs[0]] = ids
            else:
                return opaque("pad of the channel axis")
        else:
            if nd - 1 in tuple(e.params["dimensions"]):
                origin[e.outs[0]] = ids[::-1]
            else:
                origin[e.outs[0]] = ids
        return "move", "plain", ""
    if name in POOLS or name in REDUCTIONS:
        if name.startswith("cum"):
            over_channels = int(e.params.get("axis", 0)) == nd - 1
        elif name in POOLS:
            wd = tuple(e.params.get("window_dimensions", ()))
            ws = tuple(e.params.get("window_strides", ()))
            over_channels = not wd or wd[-1] != 1 or ws[-1] != 1
        else:
            over_channels = nd - 1 in tuple(int(x) for x in e.params.get("axes", ())) or not oshape
        if over_channels:
            return opaque(f"{name} over the channel axis")
        origin[e.outs[0]] = ids
        role = _REDUCE_ROLES.get(name, "unsupported")
        return ("pool" if name in POOLS else "reduce"), role, "" if role != "unsupported" else name
    return opaque(f"{name}")


# ----------------------------------------------------------------------------------------------- execution
def _read(env: dict, prog: Program, a):
    if isinstance(a, tuple):
        return a[1]
    return env[a]


def run(g: Graph, leaves: Sequence[Array], x: Array, *, rules: Mapping[str, Any] | None = None,
        probes: Mapping[str, Array] | None = None, lrp_epsilon: float = 1e-9) -> tuple[Array, dict[str, Array]]:
    """Replay the model's program on ``leaves`` (the variables' leaves, ``Net.paths`` order) and ``x``.

    Returns ``(output, {layer: pre-activation z})`` where ``z`` is each layer's chain output (after bias and
    BatchNorm), with ``probes[layer]`` (zeros of ``z``'s shape) added there when given — the VJP with respect to a
    probe is the gradient (or, with ``rules``, the relevance) arriving at the layer's units.

    ``rules``: ``{layer: f(op, x, w, b) -> z}`` (e.g. a :class:`jaxprune.lrp.rules.Rule` through
    ``functools.partial(rules.apply_linear, rule)``: the layer's value, its VJP the rule) turns the pass into an LRP
    pass: each layer's chain (bias, BatchNorm) is folded into it and its VJP becomes the rule; activations pass
    relevance unchanged; residual adds, sums and pooling sums, and per-channel affine maps not folded into a layer
    share relevance in proportion to their inputs (``lrp_epsilon`` stabilises the division); max pooling, reshapes
    and concatenations keep their VJPs (they move relevance without changing it). An operation LRP cannot follow
    raises :class:`UnsupportedError` naming it and the layer before it.
    """
    prog = g.program
    lrp = rules is not None
    env: dict = dict(prog.consts)
    for vid, leaf in zip(prog.leaf_ids, leaves):
        env[vid] = leaf
    env[prog.x_id] = x
    seen: dict[str, Array] = {}
    at = {l.out: name for name, l in g.layers.items()}
    by_eqn = {l.eqn: name for name, l in g.layers.items()}
    chain_end = {l.chain[-1]: name for name, l in g.layers.items() if l.chain} if lrp else {}
    in_chain = {c for l in g.layers.values() for c in l.chain} if lrp else set()
    for k, e in enumerate(prog.eqns):
        if lrp:
            if k in in_chain and k not in chain_end:
                continue
            if k in by_eqn and g.layers[by_eqn[k]].chain:
                continue  # computed, folded, at the end of its chain
            if k in chain_end or k in by_eqn:
                name = chain_end.get(k, by_eqn.get(k))
                z = _lrp_layer(g, g.layers[name], env, rules.get(name))
                outs = [z]
                e = prog.eqns[k]
            else:
                role = g.roles[k]
                args = [_read(env, prog, a) for a in e.ins]
                if g.kinds[k] == "weight" or role == "plain":
                    outs = e.bind(*args)
                elif role == "pass":
                    outs = [_passthrough(e, args, [isinstance(a, int) and a in g.origins for a in e.ins])]
                elif role == "prop":
                    outs = [_proportional(e, args, [isinstance(a, int) and a in g.origins for a in e.ins],
                                          lrp_epsilon)]
                else:
                    where = f" after layer {g.near[k]!r}" if g.near[k] else " before the first layer"
                    raise UnsupportedError(f"model: LRP cannot propagate through {g.notes[k] or e.name}{where}; "
                                           "supported: linear layers, BatchNorm, elementwise activations, pooling, "
                                           "reshapes, concatenation and residual adds")
        else:
            outs = e.bind(*[_read(env, prog, a) for a in e.ins])
        for o, val in zip(e.outs, outs):
            if o in at:
                if probes is not None and at[o] in probes:
                    val = val + probes[at[o]]
                seen[at[o]] = val
            env[o] = val
    out = [_read(env, prog, o) for o in prog.out_ids]
    return (out[0] if len(out) == 1 else out), seen


def _chain_fn(g: Graph, layer: Layer, env: dict) -> Callable[[Array], Array]:
    prog = g.program

    def f(u):
        cur_var, cur = prog.eqns[layer.eqn].outs[0], u
        for c in layer.chain:
            e = prog.eqns[c]
            cur = e.bind(*[cur if a == cur_var else _read(env, prog, a) for a in e.ins])[0]
            cur_var = e.outs[0]
        return cur

    return f


def folded(g: Graph, layer: Layer, env_or_leaves) -> tuple[Array, Array]:
    """``(kernel · a, b)``: the layer with its chain ``z = a ⊙ op(x, W) + b`` folded in (``a, b: (units,)``)."""
    prog = g.program
    env = env_or_leaves
    e = prog.eqns[layer.eqn]
    w = _read(env, prog, e.ins[1])
    if not layer.chain:
        return w, jnp.zeros((layer.units,), w.dtype)
    shape = e.shapes[0]
    f = _chain_fn(g, layer, env)
    zero = jnp.zeros(shape, e.dtypes[0])
    b_full, a_full = jax.jvp(f, (zero,), (jnp.ones_like(zero),))
    a = a_full.reshape(-1, shape[-1])[0]
    b = b_full.reshape(-1, shape[-1])[0]
    bshape = [1] * w.ndim
    bshape[_operand_out_axis(e, layer)] = layer.units
    return w * a.reshape(bshape).astype(w.dtype), b


def _operand_out_axis(e: Eqn, layer: Layer) -> int:
    """The units' axis of the kernel *operand* (a tied ``kernel.T`` has it where the leaf has its input axis)."""
    if e.name == "dot_general":
        return 1 - int(e.params["dimension_numbers"][0][1][0])
    return layer.out_axis


@dataclasses.dataclass(frozen=True)
class BoundOp:
    """``op(x, w)``: the model's own linear primitive with its parameters (dense product or convolution)."""

    prim: Any
    params: tuple

    def __call__(self, x: Array, w: Array) -> Array:
        return self.prim.bind(x, w, **dict(self.params))


def _lrp_layer(g: Graph, layer: Layer, env: dict, rule) -> Array:
    prog = g.program
    e = prog.eqns[layer.eqn]
    x = _read(env, prog, e.ins[0])
    w, b = folded(g, layer, env)
    op = BoundOp(e.prim, tuple(sorted(e.params.items())))
    if rule is None:
        return op(x, w) + b
    return rule(op, x, w, b)


def _passthrough(e: Eqn, args: list, is_act: list) -> Array:
    """An elementwise activation whose VJP passes relevance through unchanged."""
    pos = [j for j, f in enumerate(is_act) if f]
    i = pos[0]

    @jax.custom_vjp
    def f(v):
        return e.bind(*[v if j in pos else a for j, a in enumerate(args)])[0]

    f.defvjp(lambda v: (f(v), None), lambda _, r: (r,))
    return f(args[i])


def stabilize(z: Array, epsilon: float) -> Array:
    """``z + ε·sign(z)`` with sign(0) = +1, so the result is never smaller in magnitude than ``ε``."""
    return z + epsilon * jnp.where(z >= 0, 1.0, -1.0).astype(z.dtype)


def safe_divide(r: Array, z: Array) -> Array:
    """``r / z`` where ``z ≠ 0``, else 0 (an output no input contributes to passes nothing back)."""
    nz = z != 0
    return jnp.where(nz, r / jnp.where(nz, z, 1.0), 0.0)


def _proportional(e: Eqn, args: list, is_act: list, epsilon: float) -> Array:
    """The z-rule on a map linear in its activation operands: ``R_i = x_i · (∂z/∂x_i)ᵀ (R / stab(z))``."""
    pos = [i for i, f in enumerate(is_act) if f]

    def fn(*acts):
        full = list(args)
        for i, v in zip(pos, acts):
            full[i] = v
        return e.bind(*full)[0]

    @jax.custom_vjp
    def f(*acts):
        return fn(*acts)

    def fwd(*acts):
        return fn(*acts), acts

    def bwd(acts, r):
        z = fn(*acts)
        s = safe_divide(r, stabilize(z, epsilon))
        grads = jax.vjp(fn, *acts)[1](s)
        return tuple(a * gr for a, gr in zip(acts, grads))

    f.defvjp(fwd, bwd)
    return f(*[args[i] for i in pos])


# ----------------------------------------------------------------------------------------------- surgery
def shrink(g: Graph, keep: Mapping[str, Any]) -> list[Array]:
    """The variables' leaves with every unit not kept removed: ``keep: {layer: kept indices}`` (others untouched).

    Every leaf axis indexed by the removed units shrinks: kernels (their output and the consumers' input axes,
    through flattening, pooling and concatenation), biases, BatchNorm parameters and statistics."""
    removed = g.removed_units(keep)
    leaves = list(g.net.leaves)
    for leaf, axis, ids in g.slices:
        on = ~removed[ids]
        if on.all():
            continue
        leaves[leaf] = jnp.take(leaves[leaf], jnp.asarray(np.flatnonzero(on)), axis=axis)
    return leaves


def silence(g: Graph, keep: Mapping[str, Any]) -> list[Array]:
    """Same shapes, the units not kept silenced: their kernel columns and the chain's per-channel offsets and
    scales (bias; BatchNorm's scale and bias) zeroed, so their pre-activation is exactly 0, and the input rows of
    every layer reading them zeroed, so whatever the activation makes of 0 reaches no consumer (the network then
    computes what the shrunk one does). An empty ``keep`` for a layer silences all of it."""
    removed = g.removed_units(keep)
    leaves = list(g.net.leaves)
    by_leaf: dict[int, list] = {}
    for leaf, axis, ids in g.slices:
        by_leaf.setdefault(leaf, []).append((axis, ids))
    targets = []
    for name in keep:
        l = g.layers[name]
        targets.append((l.kernel, l.out_axis))
        targets += [(leaf, axis) for leaf in l.zero for axis, _ in by_leaf.get(leaf, [])]
    # the consumers' input rows: a silenced unit still sends act(0) (sigmoid: 0.5; ReLU → BatchNorm: BN(0) ≠ 0)
    targets += [(l.kernel, l.in_axis) for l in g.layers.values() if l.in_axis in dict(by_leaf.get(l.kernel, []))]
    for leaf, axis in dict.fromkeys(targets):
        ids = dict(by_leaf[leaf])[axis]
        off = removed[ids]
        if not off.any():
            continue
        shape = [1] * len(np.shape(leaves[leaf]))
        shape[axis] = ids.size
        leaves[leaf] = jnp.where(jnp.asarray(~off).reshape(shape), leaves[leaf], jnp.zeros_like(leaves[leaf]))
    return leaves


def rebuild(g: Graph, leaves: Sequence[Array], widths: Mapping[str, int], x: Any) -> tuple[Any, PyTree]:
    """``(smaller model, its variables)`` for shrunk ``leaves`` whose layers now have ``widths`` units.

    Uses the model's ``with_widths`` hook, NNX's parameters-only shrinking, or linen integer width fields (see the
    module docstring); checks that the rebuilt model's variable shapes are the shrunk ones."""
    n = g.net
    tree = n.with_leaves(leaves)
    model = n.model
    if hasattr(model, "with_widths"):
        new_model = model.with_widths(dict(widths))
    elif n.kind == "nnx":
        return model, tree
    else:
        new_model = _rebuild_by_fields(g, model, widths, x)
    spec = jax.ShapeDtypeStruct(tuple(np.shape(x)), jnp.result_type(x) if not isinstance(
        x, jax.ShapeDtypeStruct) else x.dtype)
    try:
        shapes = jax.eval_shape(lambda: new_model.init(jax.random.PRNGKey(0), jnp.zeros(spec.shape, spec.dtype),
                                                       **dict(n.call_kwargs)))
    except Exception as e:
        raise ValueError(f"model: the rebuilt model ({type(new_model).__name__} with widths {dict(widths)}) does "
                         f"not initialise: {str(e).splitlines()[0]}") from e
    want = {p: tuple(np.shape(a)) for p, a in zip(n.paths, leaves)}
    got = {_path_str(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(shapes)
           if _path_str(p).split("/")[0] in {q.split("/")[0] for q in n.paths}}
    bad = {p: (got.get(p), s) for p, s in want.items() if got.get(p) != s}
    if bad:
        p, (g_, w_) = next(iter(bad.items()))
        raise ValueError(f"model: the rebuilt model's variable {p!r} has shape {g_}, the shrunk variables {w_}: its "
                         "with_widths hook (or width field) does not set the widths it was given")
    return new_model, tree


def _rebuild_by_fields(g: Graph, model, widths: Mapping[str, int], x) -> Any:
    fields = _discover_fields(g, model, x)
    updates: dict[str, Any] = {}
    for layer, w in widths.items():
        if layer not in fields:
            raise ValueError(
                f"model: cannot rebuild {type(model).__name__} with layer {layer!r} of width {w}: the model has no "
                "`with_widths(widths: dict[str, int]) -> Module` method and no integer (or tuple-of-integer) field "
                "that sets this layer's width. Contract for user models: give the model such a method, or a width "
                "field per layer (e.g. `hidden: Sequence[int]`); NNX models need neither (pass nnx.split's "
                "(graphdef, state))")
        field, idx, group = fields[layer]
        others = [m for m in group if m != layer]
        for m in others:
            if widths.get(m, g.layers[m].units) != w and m not in widths:
                raise ValueError(f"model: layer {layer!r} shares its width field {field!r} with {others}; shrink "
                                 "them to the same width together")
        cur = updates.get(field, getattr(model, field))
        if idx is None:
            updates[field] = int(w)
        else:
            seq = list(cur)
            seq[idx] = int(w)
            updates[field] = type(cur)(seq) if isinstance(cur, tuple) else seq
    return model.clone(**updates)


_FIELD_CACHE: dict = {}


def _discover_fields(g: Graph, model, x) -> dict:
    """``{layer: (field, index, layers sharing it)}`` found by perturbing each integer width field by one."""
    key = (model, tuple(np.shape(x)))
    try:
        if key in _FIELD_CACHE:
            return _FIELD_CACHE[key]
    except TypeError:
        key = None
    n = g.net
    spec = jnp.zeros(tuple(np.shape(x)), jnp.float32)
    kernel_paths = {name: n.paths[l.kernel] for name, l in g.layers.items()}

    def units(m) -> dict:
        try:
            shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), spec, **dict(n.call_kwargs)))
        except Exception:
            return {}
        flat = {_path_str(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(shapes)}
        return {name: flat.get(p, (None,))[g.layers[name].out_axis] if p in flat else None
                for name, p in kernel_paths.items()}

    base = {name: l.units for name, l in g.layers.items()}
    found: dict = {}
    for f in dataclasses.fields(model):
        if f.name in ("parent", "name"):
            continue
        v = getattr(model, f.name)
        cands = []
        if isinstance(v, int) and not isinstance(v, bool):
            cands.append((None, v + 1))
        elif isinstance(v, (tuple, list)) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            for i in range(len(v)):
                seq = list(v)
                seq[i] += 1
                cands.append((i, type(v)(seq)))
        for idx, new in cands:
            try:
                got = units(model.clone(**{f.name: new}))
            except Exception:
                continue
            changed = [name for name in base if got.get(name) is not None and got[name] == base[name] + 1]
            rest_same = all(got.get(name) in (base[name], base[name] + 1) for name in base)
            if changed and rest_same:
                for name in changed:
                    found.setdefault(name, (f.name, idx, tuple(changed)))
    if key is not None:
        _FIELD_CACHE[key] = found
    return found


# ----------------------------------------------------------------------------------------------- roles
def param_roles(g: Graph) -> dict[str, str]:
    """``{Net.paths[i]: role}`` of every parameter, read from the program: ``"kernel"`` (an operand of a
    ``dot_general`` or convolution of an activation — dense, conv, ``DenseGeneral`` and attention projections, a
    tied ``kernel.T``, whatever its shape), ``"embedding"`` (a table ``gather``-ed by activation indices; wins over a
    tied readout's ``"kernel"``), ``"other"`` (biases of any shape, norms' scales, statistics, position embeddings,
    class tokens). A parameter passed into control flow or a custom call with activations, whose use cannot be read,
    is a ``"kernel"`` when it is a floating array of ``ndim >= 2`` (the ``ndim`` rule it replaces), else ``"other"``."""
    prog, leaves = g.program, g.net.leaves
    src = {vid: frozenset({i}) for i, vid in enumerate(prog.leaf_ids)}
    roles: dict[int, str] = {}
    for e in prog.eqns:
        act = [isinstance(a, int) and a in g.origins for a in e.ins]
        weights = [src.get(a, frozenset()) for a, f in zip(e.ins, act) if not f and isinstance(a, int)]
        if not any(act):
            for o in e.outs:
                src[o] = frozenset().union(*weights)
            continue
        if e.name in ("gather", "dynamic_slice") and not act[0]:
            role = "embedding"
        elif e.name in LINEAR:
            role = "kernel"
        elif _inner(e) is not None or "branches" in e.params or "body_jaxpr" in e.params:
            role = "opaque"
        else:
            continue
        for leaf in frozenset().union(*weights):
            if role == "opaque":
                x = leaves[leaf]
                role_here = "kernel" if len(x.shape) >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else "other"
                roles.setdefault(leaf, role_here)
            elif roles.get(leaf) != "embedding":
                roles[leaf] = role
    return {p: roles.get(i, "other") for i, p in enumerate(g.net.paths)}


# ----------------------------------------------------------------------------------------------- cost
def count_macs(g: Graph) -> dict[str, int]:
    """Multiply-accumulates per example of every ``dot_general`` and convolution of the program.

    A linear layer is keyed by its name (kernel size × output positions); every other product is keyed
    ``"<op> after <layer>"`` (numbered from ``#2`` when repeated): attention's activation × activation products
    (``q·kᵀ``, ``attn·v``), ``DenseGeneral``/einsum projections, grouped and depthwise convolutions (``out_elems ·
    kh·kw·cin/groups``). Products of weights alone (a kernel computed from parameters) count once per call.
    Operations whose inner programs hold products the count cannot read (control flow, custom calls) are listed by
    :func:`uncounted`, never dropped silently."""
    out = {}
    for name, l in g.layers.items():
        out[name] = int(l.positions) * int(np.prod(np.shape(g.net.leaves[l.kernel])))
    batch = int(g.program.shapes[g.program.x_id][0]) if g.program.shapes[g.program.x_id] else 1
    layer_eqns = {l.eqn for l in g.layers.values()}
    for k, e in enumerate(g.program.eqns):
        if e.name not in LINEAR or k in layer_eqns:
            continue
        macs = _eqn_macs(e, g.program.shapes)
        per_example = g.kinds[k] != "weight"
        key = _product_name(g, k, e) if per_example else f"{e.name} of weights"
        key = next(f"{key}#{i}" if i > 1 else key for i in range(1, len(out) + 2)
                   if (f"{key}#{i}" if i > 1 else key) not in out)
        out[key] = int(macs // max(batch, 1)) if per_example else int(macs)
    return out


def _product_name(g: Graph, k: int, e: Eqn) -> str:
    """The module path of a parameter operand (``"enc/attn/query"``), else ``"<op> after <layer>"``."""
    leaf_of = {vid: i for i, vid in enumerate(g.program.leaf_ids)}
    for a in e.ins:
        leaf, _ = _kernel_view(a, leaf_of, g.program)
        if leaf is not None:
            return g.net.module_path(leaf) or g.net.paths[leaf]
    return f"{e.name} after {g.near[k]}" if g.near[k] else f"{e.name} before the first layer"


def _eqn_macs(e: Eqn, shapes: dict) -> int:
    """MACs of one ``dot_general`` (``out_elems · contracted size``) or convolution (``out_elems · kernel size /
    output features``, i.e. ``kh·kw·cin/groups``)."""
    def shape(a):
        return tuple(np.shape(a[1])) if isinstance(a, tuple) else tuple(shapes[a])

    out = int(np.prod(e.shapes[0]))
    if e.name == "dot_general":
        (lc, _), _ = e.params["dimension_numbers"]
        lhs = shape(e.ins[0])
        return out * int(np.prod([lhs[i] for i in lc]))
    rhs = shape(e.ins[1])
    out_feature_axis = e.params["dimension_numbers"].rhs_spec[0]
    return out * int(np.prod(rhs)) // int(rhs[out_feature_axis])


def uncounted(g: Graph) -> tuple[str, ...]:
    """Operations whose inner programs contain products :func:`count_macs` does not count (``scan``, ``while``,
    ``cond``, custom calls around a matmul), each named with the layer before it; empty when every product counts."""
    found = []
    for k, e in enumerate(g.program.eqns):
        inner = [j for j in (_inner(e),) if j is not None] + [b.jaxpr for b in e.params.get("branches", ())]
        inner += [j.jaxpr for key in ("body_jaxpr", "cond_jaxpr") for j in [e.params.get(key)] if j is not None]
        if any(_has_product(j) for j in inner):
            where = f"after layer {g.near[k]!r}" if g.near[k] else "before the first layer"
            found.append(f"{e.name} {where}")
    return tuple(found)


def _has_product(jaxpr) -> bool:
    for e in jaxpr.eqns:
        if e.primitive.name in LINEAR:
            return True
        subs = [v for v in e.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr")]
        subs += [b for b in e.params.get("branches", ())]
        if any(_has_product(getattr(v, "jaxpr", v)) for v in subs):
            return True
    return False


# ----------------------------------------------------------------------------------------------- example inputs
_SIDES = (28, 32) + tuple(s for s in range(1, 65) if s not in (28, 32)) + (96, 112, 128, 192, 224, 256)


def example_input(model: Any, variables: Any, x: Any = None) -> jax.ShapeDtypeStruct:
    """``x`` as a ``ShapeDtypeStruct`` (an array, a shape tuple or a struct), or, when ``None``, an input shape the
    model accepts, inferred from its variables: ``(1, d)`` for each dense kernel's input size ``d``, then
    ``(1, s, …, s, c)`` for each conv kernel's input channels ``c`` and square sides ``s`` (28, 32, then 1–64,
    96 … 256) — the first that ``apply`` runs on (shape-only traces). Pass ``x`` (or its shape) whenever the model's input size matters (FLOPs, or a
    model whose layer sizes depend on the image size beyond these sides)."""
    if x is not None:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in x):
            return jax.ShapeDtypeStruct(tuple(int(d) for d in x), jnp.float32)
        return jax.ShapeDtypeStruct(tuple(np.shape(x)), jnp.result_type(x))
    n = net(model, variables)
    key = (n.model if n.kind == "linen" else id(n.model), n.treedef,
           tuple(_spec(a).shape for a in n.leaves))
    try:
        if key in _INPUT_CACHE:
            return _INPUT_CACHE[key]
    except TypeError:
        key = None
    cands = []
    for a in n.leaves:
        shp = np.shape(a)
        if len(shp) == 2:
            cands.append((1, int(shp[0])))
        elif len(shp) >= 3:  # a channel-last conv kernel (*window, c_in, c_out): square inputs of each side
            cands += [(1, *(s,) * (len(shp) - 2), int(shp[-2])) for s in _SIDES]
    specs = [_spec(a) for a in n.leaves]
    first = None
    for c in dict.fromkeys(cands):
        spec = jax.ShapeDtypeStruct(c, jnp.float32)
        try:
            jax.eval_shape(lambda ls, v: n.apply(ls, v), specs, spec)
        except Exception as e:
            first = first or (c, (str(e).strip().splitlines() or [type(e).__name__])[0])
            continue
        if key is not None:
            _INPUT_CACHE[key] = spec
        return spec
    tried = f" (the model does not run on {first[0]}: {first[1]})" if first else ""
    raise ValueError("x: could not infer an input shape the model accepts from its variables" + tried + "; pass x "
                     "(an example input (n, …) or its shape)")


_INPUT_CACHE: dict = {}
