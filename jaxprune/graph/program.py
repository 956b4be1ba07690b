"""The model as one pure function (:class:`Net`) and its flattened program (:class:`Program`): ``jit``
calls inlined, ``custom_jvp``/``custom_vjp`` calls kept whole unless they combine values along an axis (a softmax)."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _compat

Array = jax.Array
PyTree = Any


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


def takes_train(model: Any) -> bool:
    """Whether a linen model's (or model class's) ``__call__`` accepts ``train=``: a parameter of that name, or
    ``**kwargs`` (an ``nn.Sequential`` instance: its first layer's answer, the one layer it forwards keywords to).
    The one answer the library and the experiments use (graph tracing, IMP's trainer, the user-model adapter of
    ``experiments.common``); an unreadable signature answers False (``train`` is then never passed)."""
    if isinstance(model, nn.Sequential):  # it forwards its keyword arguments to its first layer only
        first = model.layers[0] if model.layers else None
        return isinstance(first, nn.Module) and takes_train(first)
    cls = model if isinstance(model, type) else type(model)
    try:
        params = inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return "train" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def call_kwargs(model: Any) -> tuple:
    """``(("train", False),)`` when a linen model's ``__call__`` takes ``train`` (:func:`takes_train`: inference
    mode), else ``()``."""
    return (("train", False),) if takes_train(model) else ()


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
        subfuns, params = _compat.bind_params(self.prim, self.params)
        out = self.prim.bind(*subfuns, *args, **params)
        return out if self.prim.multiple_results else [out]


_INLINE = ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "remat2")
CUSTOM = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")
# primitives that combine values along an axis: a custom call holding one is read through (see _custom_inner)
_MIXING = ("reduce_", "argmax", "argmin", "cum", "dot_general", "conv_general_dilated", "sort", "top_k")


def call_jaxpr(params: dict):
    """The program a call-like equation runs (``custom_jvp``/``custom_vjp``, ``pjit``), from its ``params``: a
    closed jaxpr (``.jaxpr``, ``.consts``), an open one, or None."""
    for key in ("call_jaxpr", "fun_jaxpr", "jaxpr"):
        j = params.get(key)
        if j is not None and (hasattr(j, "jaxpr") or hasattr(j, "eqns")):
            return j
    return None


def _mixes(jaxpr) -> bool:
    """Whether ``jaxpr`` (or a call inside it) combines values along an axis (a reduction, a product, a sort)."""
    for e in jaxpr.eqns:
        if e.primitive.name.startswith(_MIXING):
            return True
        sub = call_jaxpr(e.params)
        if sub is not None and _mixes(getattr(sub, "jaxpr", sub)):
            return True
    return False


def _custom_inner(e):
    """The inner closed jaxpr of a ``custom_jvp``/``custom_vjp`` call that combines values along an axis — from
    jax 0.12.1 on, ``jax.nn.softmax`` is one — so that it is inlined like a ``jit`` call and the graph and the
    LRP replay read its operations (the replay then differentiates the primal operations, the same function);
    None for the rest: elementwise custom calls (``jax.nn.relu``) stay whole, as one activation."""
    if e.primitive.name not in CUSTOM:
        return None
    inner = call_jaxpr(e.params)
    if inner is None or not hasattr(inner, "jaxpr") or len(inner.jaxpr.invars) != len(e.invars):
        return None
    return inner if _mixes(inner.jaxpr) else None


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
        sub = e.params.get("jaxpr") if e.primitive.name in _INLINE else _custom_inner(e)
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


def _last(shape) -> int:
    return int(shape[-1]) if len(shape) else 1


def _spec(a: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(a.shape), a.dtype) if hasattr(a, "shape") and hasattr(a, "dtype") else \
        jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))

