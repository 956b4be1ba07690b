"""LRP relevance of any Flax model, propagated through the model's own program (:mod:`jaxprune.graph`).

:func:`relevance` builds the model's graph for ``x``'s shape (cached), assigns a rule to every linear layer with a
composite (by path, role, kind) and replays the program with :func:`jaxprune.graph.run` in LRP mode: each layer's
bias/BatchNorm chain is folded into it and its VJP is the rule; activations pass relevance unchanged; residual
adds, sum/average pooling and means share it in proportion to their inputs; max pooling and reshapes keep their
VJPs. Zero *probes* added at every non-output layer's pre-activation make one ``jax.vjp`` call return the input
relevance and the relevance arriving at every hidden unit.

The jitted core takes the graph as a static argument through :class:`StaticGraph` (equal for graphs of one traced
program, without the variables' values) and the variables' leaves as ordinary arguments, so it is compiled once
per model, variable shapes and input shape, and works under ``jax.jit`` and ``jax.vmap``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import graph
from jaxprune.lrp import composites as C
from jaxprune.lrp import rules as R

Array = jax.Array

__all__ = ["Relevance", "StaticGraph", "static", "build_graph", "non_output_layers", "num_classes", "relevance",
           "PROPORTIONAL_EPSILON"]

PROPORTIONAL_EPSILON = 1e-9  # stabiliser of the proportional (z-rule) redistribution of pooling, means, adds


class Relevance(NamedTuple):
    """Output of :func:`relevance`."""

    input: Array  # (n, *x.shape[1:]) relevance of each input feature
    layers: dict[str, Array]  # layer -> (n, …, units) relevance at its units (pre-activation), forward order
    logits: Array  # (n, C)
    target: Array  # (n,) int32 the explained class


# ----------------------------------------------------------------------------------------------- graph plumbing
@dataclasses.dataclass(frozen=True, eq=False)
class StaticGraph:
    """A graph as a static ``jax.jit`` argument: equal (and hashed) by its traced program, which
    :func:`jaxprune.graph.build` shares between all graphs of one model, variable shapes and input shape. Holds
    the graph without its variables (``net=None``): jitted functions take the leaves as arguments. The program
    stays alive while a jit cache entry holds this object, so its ``id`` is never reused meanwhile."""

    graph: graph.Graph

    def __hash__(self) -> int:
        return hash(id(self.graph.program))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StaticGraph) and other.graph.program is self.graph.program


def static(g: graph.Graph) -> StaticGraph:
    """``g`` without its variables' values, as a static jit argument."""
    return StaticGraph(dataclasses.replace(g, net=None))


def non_output_layers(g: graph.Graph) -> tuple[str, ...]:
    """The linear layers whose units are not the model's outputs, in forward order (the prunable candidates the
    criteria score, and where :func:`relevance` reports hidden relevance)."""
    outs = set(g.output_layers())
    return tuple(n for n in g.layers if n not in outs)


def _spec(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(tuple(np.shape(x)), jnp.result_type(x))


def _failing_module(model: Any, variables: Any, spec: jax.ShapeDtypeStruct) -> tuple[str, tuple | None] | None:
    """``(module path, its kernel's shape or None)`` of the innermost linen module in which the forward pass on
    ``spec`` fails; None for NNX models (no interceptor) or when the failure is outside any submodule."""
    import flax.linen as nn

    try:
        n = graph.net(model, variables)
    except (TypeError, ValueError):
        return None
    if n.kind != "linen":
        return None
    stack: list[str] = []
    failed: list[str] = []

    def interceptor(f, args, kwargs, context):
        if context.method_name != "__call__":
            return f(*args, **kwargs)
        stack.append("/".join(context.module.path))
        try:
            return f(*args, **kwargs)
        except Exception:
            if not failed:
                failed.append(stack[-1])
            raise
        finally:
            stack.pop()

    try:
        with nn.intercept_methods(interceptor):
            jax.eval_shape(lambda ls, v: n.apply(ls, v), n.leaves, spec)
    except Exception:  # the failure we are locating
        pass
    if not failed or not failed[0]:
        return None
    path = failed[0]
    kernel = next((np.shape(a) for i, a in enumerate(n.leaves) if n.module_path(i) == path and np.ndim(a) >= 2),
                  None)
    return path, (tuple(kernel) if kernel is not None else None)


def build_graph(model: Any, variables: Any, x: Any, *, name: str = "x") -> graph.Graph:
    """:func:`jaxprune.graph.build` with errors that name the argument: ``name`` (``x: shape … does not match the
    model's input``, with the linen layer the forward pass fails in and its kernel shape) or ``variables`` (a
    collection the model needs is missing, e.g. ``batch_stats``). ``x``: an array or ``jax.ShapeDtypeStruct``."""
    spec = _spec(x)
    try:
        return graph.build(model, variables, spec)
    except ValueError as e:
        if not str(e).startswith("x:"):
            raise
        cause = e.__cause__ if e.__cause__ is not None else e
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        import flax.errors

        if isinstance(cause, flax.errors.ScopeCollectionNotFound):
            raise ValueError(f"variables: the model needs a collection the variables lack (pass the full "
                             f"variables, e.g. {{'params': ..., 'batch_stats': ...}}): {msg}") from cause
        where = _failing_module(model, variables, spec)
        at = ""
        if where is not None:
            path, kernel = where
            at = f" (the forward pass fails in layer {path!r}" + (f", kernel {kernel}" if kernel else "") + ")"
        raise ValueError(f"{name}: shape {tuple(spec.shape)} does not match the model's input{at}; the forward "
                         f"pass fails with: {msg}") from cause


# ----------------------------------------------------------------------------------------------- checks
def _check_x(x: Any) -> Array:
    """A float batch ``(n, …)``; a concrete ``x`` must be finite (NaN or ±Inf would only come back as NaN
    relevance). Under ``jax.jit`` / ``jax.vmap`` (a traced ``x``) the value check is skipped."""
    x = jnp.asarray(x)
    if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x: expected a float batch (n, …) like the model's inputs, got shape {x.shape} "
                         f"dtype {x.dtype}")
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.isfinite(x).all()):  # one bool leaves the device
        host = np.asarray(x)
        bad = ~np.isfinite(host)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"x: expected finite values, got {int(bad.sum())} NaN/Inf entries (first at index "
                         f"{first}: {host[first]}); LRP of a non-finite input is NaN")
    return x


def num_classes(g: graph.Graph) -> int:
    """Classes of a model returning logits ``(n, C)``; a ValueError naming ``model`` for any other output."""
    prog = g.program
    outs = [o for o in prog.out_ids]
    shape = prog.shapes.get(outs[0]) if len(outs) == 1 and isinstance(outs[0], int) else None
    if shape is None or len(shape) != 2:
        got = [prog.shapes.get(o) if isinstance(o, int) else "a constant" for o in outs]
        raise ValueError(f"model: expected it to return logits (n, classes), got outputs of shapes {got}")
    return int(shape[-1])


def _check_target(g: graph.Graph, n: int, target: Any) -> Array:
    """``(n,)`` int32 class indices (-1: the predicted class) from None, an int or ``(n,)`` ints."""
    if target is None:
        return jnp.full((n,), -1, jnp.int32)
    t = jnp.asarray(target)
    if t.ndim == 0:
        t = jnp.full((n,), t)
    if t.shape != (n,) or not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"target: expected None, an int, or int class indices of shape ({n},), got shape "
                         f"{t.shape} dtype {t.dtype}")
    classes = num_classes(g)
    if not isinstance(t, jax.core.Tracer) and (np.any(np.asarray(t) < 0) or np.any(np.asarray(t) >= classes)):
        raise ValueError(f"target: class indices must lie in [0, {classes})")
    return t.astype(jnp.int32)


def _check_rules(g: graph.Graph, rules: tuple[tuple[str, R.Rule], ...]) -> None:
    """ZBox bounds must broadcast against their layer's input: a float, or one value per input channel."""
    for name, rule in rules:
        if isinstance(rule, R.ZBox):
            layer = g.layers[name]
            c = int(np.shape(g.net.leaves[layer.kernel])[layer.in_axis])
            for bound in ("low", "high"):
                value = getattr(rule, bound)
                if np.shape(value) not in ((), (1,), (c,)):
                    raise ValueError(f"composite: ZBox {bound}={value!r} on layer {name!r}: expected a float or {c} "
                                     f"per-channel values (the last axis of the input to {name!r})")


# ----------------------------------------------------------------------------------------------- relevance
def _core(sg: StaticGraph, rules: tuple, layers: tuple[str, ...], leaves: list, x: Array,
          target: Array) -> Relevance:
    g = sg.graph
    rule_map = {name: functools.partial(R.apply_linear, rule) for name, rule in rules}
    shapes = jax.eval_shape(lambda v: graph.run(g, leaves, v)[1], x)
    zeros = {k: jnp.zeros(shapes[k].shape, shapes[k].dtype) for k in layers}

    def f(v, p):
        return graph.run(g, leaves, v, rules=rule_map, probes=p, lrp_epsilon=PROPORTIONAL_EPSILON)[0]

    logits, vjp = jax.vjp(f, x, zeros)
    t = jnp.where(target < 0, jnp.argmax(logits, -1), target).astype(jnp.int32)
    r_x, r_layers = vjp(jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype) * logits)
    return Relevance(r_x, r_layers, logits, t)


_core_jit = jax.jit(_core, static_argnums=(0, 1, 2))


def relevance(model: Any, variables: Any, x: Any, *, composite: C.Composite | R.Rule | str,
              target: Any = None) -> Relevance:
    """LRP of ``model`` at ``x: (n, …)`` for class ``target: (n,) int`` (default: the predicted class).

    ``model``/``variables``: a ``flax.linen.Module`` with ``{'params': …, ['batch_stats': …]}``, or an NNX model
    as ``nnx.split`` gives it (``(graphdef, state)``; an ``nnx.Module`` with ``variables=None`` is split here).
    The model must return logits ``(n, C)``; the output relevance is the target logit (all other logits zero).
    BatchNorm and biases are folded into their layer inside the pass (the variables are not changed).
    ``composite``: a :class:`~jaxprune.lrp.composites.Composite`, one rule for every layer, or a preset name.
    A :class:`~jaxprune.lrp.interpret.PrimitiveComposite` or one of its presets (``"attn_lrp"``, ``"cp_lrp"``)
    runs :func:`jaxprune.lrp.interpret.relevance` instead: transformers and modern convnets (LayerNorm,
    attention, gated MLPs, depthwise convs), with ``layers`` at every linear layer's output (bias added).

    Returns :class:`Relevance`: ``input`` like ``x``; ``layers[name]: (n, …, units)`` the relevance arriving at
    each non-output linear layer's pre-activation (ReLU passes relevance through, so it is also the relevance of
    the activation). Jitted; works under ``jax.jit`` and ``jax.vmap`` (map over a per-sample batch of one). A
    concrete ``x`` holding NaN or ±Inf is a ValueError naming ``x``; under ``jax.jit`` / ``jax.vmap`` that value
    check (like the target's class range) is skipped and a non-finite ``x`` gives NaN relevance. An operation LRP
    cannot follow (a product of two activations, a softmax inside the net) raises
    :class:`jaxprune.graph.UnsupportedError` naming it and the layer before it.
    """
    from jaxprune.lrp import interpret

    if isinstance(composite, interpret.PrimitiveComposite) or (isinstance(composite, str) and
                                                               composite in interpret.PRESETS):
        return interpret.relevance(model, variables, x, composite=composite, target=target)
    comp = C.get(composite)
    x = _check_x(x)
    g = build_graph(model, variables, x)
    num_classes(g)
    rules = comp.assign(g)
    _check_rules(g, rules)
    t = _check_target(g, x.shape[0], target)
    layers = non_output_layers(g)
    try:
        rel = _core_jit(static(g), rules, layers, list(g.net.leaves), x, t)
    except graph.UnsupportedError as err:
        raise graph.UnsupportedError(f"{err}; the composites 'attn_lrp' and 'cp_lrp' (jaxprune.lrp.interpret) "
                                     "follow products of activations, normalisation and softmax") from err
    return rel._replace(layers={k: rel.layers[k] for k in layers})
