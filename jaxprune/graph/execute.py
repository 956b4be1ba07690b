"""Replaying the program: plain, with probes (gradients at pre-activations) or as an LRP pass."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxprune.graph.model_graph import Graph, Layer
from jaxprune.graph.program import Eqn, Program, UnsupportedError

Array = jax.Array
PyTree = Any


# LRP through each kind of equation: linear layers take their rule; activations pass relevance through ("pass");
# sums, residual adds and per-channel affine maps share it in proportion to their inputs ("prop"); data movement,
# max/min pooling and weight computations keep their VJPs ("plain"); anything else is refused ("unsupported")
_KIND_ROLES = {"linear": "rule", "weight": "plain", "move": "plain", "activation": "pass", "affine": "prop",
               "affine_spatial": "prop", "chain": "prop"}
# a depthwise or grouped convolution is linear in its activation (z-rule); a norm's statistic (mean, variance) has no rule in
# the classic composites (its VJP is no LRP rule): refused by name, pointing to lrp.interpret's attn_lrp / cp_lrp
_KIND_ROLES.update(depthwise="prop", grouped="prop", statistic="unsupported")
_REDUCE_ROLES = {"reduce_window_sum": "prop", "reduce_sum": "prop", "cumsum": "prop", "reduce_window_max": "plain",
                 "reduce_window_min": "plain", "reduce_max": "plain", "reduce_min": "plain", "cummax": "plain",
                 "cummin": "plain"}


def lrp_role(kind: str, prim: str) -> str:
    """How an LRP pass treats an equation of ``kind`` (``Graph.kinds``) and primitive name ``prim``."""
    if kind in ("pool", "reduce"):
        return _REDUCE_ROLES.get(prim, "unsupported")
    if kind == "merge":
        return "prop" if prim in ("add", "sub", "add_any") else "unsupported"
    return _KIND_ROLES.get(kind, "unsupported")


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
    if lrp:
        _check_lrp(g)
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
                outs = _lrp_step(g, k, [_read(env, prog, a) for a in e.ins], lrp_epsilon)
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


def _check_lrp(g: Graph) -> None:
    """Refuse an LRP pass before it starts, naming the first equation LRP cannot propagate through, then any
    attention-head layer (units on a non-channel axis) — not a shape error inside a half-run pass."""
    for k, e in enumerate(g.program.eqns):
        if g.kinds[k] not in ("linear", "chain") and lrp_role(g.kinds[k], e.name) == "unsupported":
            raise _refusal(g, k)
    for name, l in g.layers.items():
        kernel = g.program.shapes[g.program.leaf_ids[l.kernel]]
        if l.unit_axis != -1 or len(kernel) > 2 and l.kind == "dense":
            raise UnsupportedError(f"model: LRP cannot propagate through the attention projection {name!r} (kind "
                                   f"{l.kind!r}, kernel {kernel}); supported: linear layers with 2-D dense or conv "
                                   "kernels")


def _refusal(g: Graph, k: int) -> UnsupportedError:
    where = f" after layer {g.near[k]!r}" if g.near[k] else " before the first layer"
    return UnsupportedError(f"model: LRP cannot propagate through {g.notes[k] or g.program.eqns[k].name}{where}; "
                            "supported: linear layers, BatchNorm, elementwise activations, pooling, reshapes, "
                            "concatenation and residual adds")


def _lrp_step(g: Graph, k: int, args: list, lrp_epsilon: float) -> list:
    """Equation ``k`` (not a layer) of an LRP pass on its argument values, by its role (:func:`lrp_role`)."""
    e = g.program.eqns[k]
    role = lrp_role(g.kinds[k], e.name)
    is_act = [isinstance(a, int) and a in g.origins for a in e.ins]
    if g.kinds[k] == "weight" or role == "plain":
        return e.bind(*args)
    if role == "pass":
        return [_passthrough(e, args, is_act)]
    if role == "prop":
        return [_proportional(e, args, is_act, lrp_epsilon)]
    raise _refusal(g, k)


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

