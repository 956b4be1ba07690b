"""A functional forward over the params pytree of the library's models, and LRP relevance through it.

:func:`program` turns a model (``MLP``, ``LeNet5``, ``ConvNet``, ``VGG``) into a tuple of steps using the fixed
layer names of :mod:`jaxprune.models`. :func:`forward` runs those steps with an optional rule per linear layer and
optional additive *probes* (zeros) at the hidden representations: the VJP with respect to a probe is the
relevance (or gradient) arriving there, so one ``jax.vjp`` call returns the input relevance and the relevance of
every hidden unit.

Marker steps name two places per hidden layer: ``("pre", name)`` right after the linear layer (and its
BatchNorm), before the ReLU, and ``("post", name)`` where :func:`jaxprune.models.representations` sows the
same name (after the ReLU, or after pooling for ``pool_j`` and ``gap``).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import models
from jaxprune.lrp import canonizers
from jaxprune.lrp import composites as C
from jaxprune.lrp import rules as R

Array = jax.Array
Step = tuple
Program = tuple[Step, ...]

__all__ = ["Relevance", "program", "linear_layers", "hidden_layers", "forward", "relevance", "split_variables",
           "canonical_params",
           "PROPORTIONAL_EPSILON"]

PROPORTIONAL_EPSILON = 1e-9  # stabiliser of average pooling's proportional rule


# ----------------------------------------------------------------------------------------------- programs
def _hidden(name: str, relu: bool = True) -> list[Step]:
    return [("pre", name)] + ([("relu",)] if relu else []) + [("post", name)]


def _conv_stack(cfg, batch_norm: bool) -> list[Step]:
    steps, i, j = [], 0, 0
    for v in cfg:
        if v == "M":
            steps += [("pool", "max"), ("post", f"pool_{j}")]
            j += 1
            continue
        steps.append(("conv", f"conv_{i}", "SAME"))
        if batch_norm:
            steps.append(("bn", f"bn_{i}"))
        steps += _hidden(f"conv_{i}")
        i += 1
    return steps


def _dense_head(widths: int, start: int = 0) -> list[Step]:
    steps: list[Step] = [("flatten",)]
    for j in range(widths):
        steps.append(("dense", f"dense_{start + j}"))
        if j < widths - 1:
            steps += _hidden(f"dense_{start + j}")
    return steps


def program(model: nn.Module) -> Program:
    """The model's forward as steps: ``("dense"|"conv", name[, padding])``, ``("bn", name)``, ``("relu",)``,
    ``("pool", "max"|"avg")``, ``("gap",)``, ``("flatten",)``, ``("pre"|"post", name)``."""
    if isinstance(model, models.MLP):
        steps: list[Step] = [("flatten",)]
        last = len(model.features) - 1
        for i in range(len(model.features)):
            steps.append(("dense", f"dense_{i}"))
            if i < last:
                steps += _hidden(f"dense_{i}", relu=i not in tuple(model.no_relu_after))
        return tuple(steps)
    if isinstance(model, models.LeNet5):
        steps = []
        for i, pad in enumerate((model.padding.upper(), "VALID")):
            steps += [("conv", f"conv_{i}", pad), *_hidden(f"conv_{i}"), ("pool", model.pool), ("post", f"pool_{i}")]
        return tuple(steps + _dense_head(3))
    if isinstance(model, models.ConvNet):
        if model.depth not in models.CONV_CFGS:
            raise ValueError(f"model.depth={model.depth}: expected one of {tuple(models.CONV_CFGS)}")
        dense = len(tuple(getattr(model, "hidden", (256, 256)))) + 1
        return tuple(_conv_stack(models.CONV_CFGS[model.depth], batch_norm=False) + _dense_head(dense))
    if isinstance(model, models.VGG):
        return tuple(_conv_stack(model.cfg, batch_norm=True) + [("gap",), ("post", "gap"), ("dense", "dense_0")])
    raise TypeError(f"model: LRP supports jaxprune.models.MLP, LeNet5, ConvNet and VGG; got {type(model).__name__}")


def linear_layers(prog: Program) -> tuple[tuple[str, str], ...]:
    """``((name, kind), …)`` of the dense/conv layers in forward order."""
    return tuple((s[1], s[0]) for s in prog if s[0] in ("dense", "conv"))


def hidden_layers(prog: Program) -> tuple[str, ...]:
    """Names of the linear layers whose units can be pruned (all but the output layer)."""
    return tuple(s[1] for s in prog if s[0] == "pre")


# ----------------------------------------------------------------------------------------------- forward
def _batchnorm(x: Array, p: dict, s: dict, eps: float = 1e-5) -> Array:
    return (x - s["mean"]) / jnp.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def forward(prog: Program, params: dict, x: Array, *, batch_stats: dict | None = None,
            rules: dict[str, R.Rule] | None = None, probes: dict[str, Array] | None = None,
            where: str = "post") -> tuple[Array, dict[str, Array]]:
    """Logits and the values at the ``where`` markers (``"pre"`` or ``"post"``): ``((n, C), {name: (n, …)})``.

    ``rules``: a rule per linear layer name turns the pass into an LRP pass (ReLU and average pooling switch to
    their relevance backward too); ``None`` is the ordinary network. ``probes[name]`` is added at the marker.
    """
    lrp = rules is not None
    seen: dict[str, Array] = {}
    for step in prog:
        kind = step[0]
        if kind == "flatten":
            x = x.reshape((x.shape[0], -1))
        elif kind in ("dense", "conv"):
            name = step[1]
            op = R.DenseOp() if kind == "dense" else R.ConvOp(step[2])
            p = params[name]
            x = R.apply_linear(rules.get(name) if lrp else None, op, x, p["kernel"], p.get("bias"))
        elif kind == "bn":
            if step[1] in params:  # absent once canonized
                if lrp:
                    raise ValueError(f"params: BatchNorm {step[1]!r} must be folded before LRP "
                                     "(jaxprune.lrp.canonizers.fold_batchnorm)")
                x = _batchnorm(x, params[step[1]], (batch_stats or {})[step[1]])
        elif kind == "relu":
            x = R.relu(x) if lrp else jax.nn.relu(x)
        elif kind == "pool":
            if step[1] == "max":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))  # VJP: everything to the winner
            else:
                x = R.proportional(R.AvgPoolOp(), PROPORTIONAL_EPSILON, x) if lrp else R.AvgPoolOp()(x)
        elif kind == "gap":
            x = R.proportional(R.MeanOp(), PROPORTIONAL_EPSILON, x) if lrp else R.MeanOp()(x)
        elif kind == where:
            if probes is not None:
                x = x + probes[step[1]]
            seen[step[1]] = x
    return x, seen


# ----------------------------------------------------------------------------------------------- relevance
class Relevance(NamedTuple):
    """Output of :func:`relevance`."""

    input: Array  # (n, *x.shape[1:]) relevance of each input feature
    layers: dict[str, Array]  # name -> (n, …) relevance at each hidden representation (post-activation/pooling)
    logits: Array  # (n, C)
    target: Array  # (n,) int32 the explained class


def split_variables(variables: Any) -> tuple[dict, dict]:
    """``(params, batch_stats)`` from ``{'params': …, ['batch_stats': …]}`` or a bare params dict."""
    if not isinstance(variables, dict):
        raise TypeError(f"variables: expected a dict of params or {{'params': ...}}, got {type(variables).__name__}")
    if "params" in variables:
        return variables["params"], variables.get("batch_stats", {})
    return variables, {}


def canonical_params(variables: Any) -> dict:
    """Bare params with every BatchNorm folded into its layer (unchanged if there is none)."""
    params, stats = split_variables(variables)
    if canonizers.batchnorm_pairs(params):
        return canonizers.fold_batchnorm({"params": params, "batch_stats": stats})["params"]
    return params


def _core(prog: Program, rules: tuple, params: dict, x: Array, target: Array) -> Relevance:
    rule_map = dict(rules)
    shapes = jax.eval_shape(lambda v: forward(prog, params, v, rules=None)[1], x)
    zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    logits, vjp = jax.vjp(lambda v, p: forward(prog, params, v, rules=rule_map, probes=p)[0], x, zeros)
    t = jnp.where(target < 0, jnp.argmax(logits, -1), target).astype(jnp.int32)
    r_x, r_layers = vjp(jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype) * logits)
    return Relevance(r_x, r_layers, logits, t)


_core_jit = jax.jit(_core, static_argnums=(0, 1))


@functools.lru_cache(maxsize=256)
def _forward_error(prog: Program, tree: Any, leaves: tuple, x: jax.ShapeDtypeStruct) -> str | None:
    """Why the forward pass fails on abstract ``params``/``x`` (first line of the error), or None (cached)."""
    try:
        jax.eval_shape(lambda p, v: forward(prog, p, v)[0], jax.tree_util.tree_unflatten(tree, leaves), x)
    except (TypeError, ValueError) as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def _check_forward(prog: Program, params: dict, x: Array, name: str = "x") -> None:
    """A ValueError naming ``name`` (and what the first layer reads) unless the model's forward pass accepts
    ``x``'s shape — instead of a deep JAX shape error from inside the jitted pass. Works on tracers."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    spec = tuple(jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in leaves)
    err = _forward_error(prog, tree, spec, jax.ShapeDtypeStruct(x.shape, x.dtype))
    if err is not None:
        first, kind = linear_layers(prog)[0]
        k = params[first]["kernel"]
        reads = (f"NHWC input with {k.shape[-2]} channels" if kind == "conv" else
                 f"{k.shape[0]} features per example after flattening")
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not match the model's input (first layer {first!r}: "
                         f"kernel {tuple(k.shape)}, {reads}); the forward pass fails with: {err}")


def _check_rules(rules: tuple[tuple[str, R.Rule], ...], params: dict) -> None:
    """ZBox bounds must broadcast against their layer's input: a float, or one value per input channel."""
    for name, rule in rules:
        if isinstance(rule, R.ZBox):
            c = int(params[name]["kernel"].shape[-2])  # dense (in, out): in; conv HWIO: input channels
            for bound in ("low", "high"):
                value = getattr(rule, bound)
                if np.shape(value) not in ((), (1,), (c,)):
                    raise ValueError(f"composite: ZBox {bound}={value!r} on layer {name!r}: expected a float or {c} "
                                     f"per-channel values (the last axis of the input to {name!r})")


def _check_inputs(prog: Program, params: dict, x: Any, target: Any) -> tuple[Array, Array]:
    """Shape/dtype of ``x`` and ``target``, the target's class range, and that a concrete ``x`` is finite (NaN or
    ±Inf would only come back as NaN relevance). The value checks need concrete arrays: under ``jax.jit`` /
    ``jax.vmap`` (a traced ``x`` or ``target``) they are skipped and a non-finite ``x`` gives NaN relevance."""
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
    _check_forward(prog, params, x)
    n = x.shape[0]
    if target is None:
        return x, jnp.full((n,), -1, jnp.int32)
    t = jnp.asarray(target)
    if t.ndim == 0:
        t = jnp.full((n,), t)
    if t.shape != (n,) or not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"target: expected None, an int, or int class indices of shape ({n},), got shape "
                         f"{t.shape} dtype {t.dtype}")
    out_name = linear_layers(prog)[-1][0]
    classes = params[out_name]["kernel"].shape[-1]
    if not isinstance(t, jax.core.Tracer) and (np.any(np.asarray(t) < 0) or np.any(np.asarray(t) >= classes)):
        raise ValueError(f"target: class indices must lie in [0, {classes})")
    return x, t.astype(jnp.int32)


def relevance(model: nn.Module, variables: Any, x: Any, *, composite: C.Composite | R.Rule | str,
              target: Any = None) -> Relevance:
    """LRP of ``model`` at ``x: (n, …)`` for class ``target: (n,) int`` (default: the predicted class).

    The output relevance is the target logit (all other logits zero). ``variables``: ``{'params': …,
    ['batch_stats': …]}`` or bare params; BatchNorm is folded into the preceding layer first. ``composite``:
    a :class:`~jaxprune.lrp.composites.Composite`, one rule for every layer, or a preset name. Jitted; works
    under ``jax.jit`` and ``jax.vmap`` (map over a per-sample batch of one). A concrete ``x`` holding NaN or
    ±Inf is a ValueError naming ``x``; under ``jax.jit`` / ``jax.vmap`` that value check (like the target's
    class range) is skipped and a non-finite ``x`` gives NaN relevance.
    """
    prog = program(model)
    comp = C.get(composite)
    rules = comp.assign(linear_layers(prog))
    params = canonical_params(variables)
    x, t = _check_inputs(prog, params, x, target)
    _check_rules(rules, params)
    return _core_jit(prog, rules, params, x, t)
