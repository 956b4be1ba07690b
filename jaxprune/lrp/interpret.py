"""LRP for transformers and modern convnets (AttnLRP, Achtibat et al. ICML 2024; CP-LRP, Ali et al. ICML 2022):
every equation of the model's own flattened program (:mod:`jaxprune.graph.program`) through its rule.

Relevance is carried as the cotangent of one ``jax.vjp``; each rule is a ``jax.custom_vjp`` whose forward is the
model's exact computation. The plan (:func:`plan`) reads each equation's operands as *weights* (no dependence on
``x``), *active* values (carry relevance), *constants* (depend on ``x`` but are treated as constant: their gradient
is stopped) or *indices* (integer/boolean values such as token ids and masks) and picks a rule:

* ``dot_general`` / ``conv_general_dilated`` of an activation and a weight (dense, ``DenseGeneral``, grouped and
  depthwise convs): the composite's rule for that layer (ε, γ, …) with the bias add that follows folded in; the
  layer is named by its kernel's module path. With an x-dependent constant instead of a weight: the ε-rule.
* a product of two activations (``dot_general`` as in q·kᵀ and attention × v, ``mul`` as in gated MLPs): the
  uniform rule, ``R_a = a ⊙ ∂z/∂a ᵀ (R / 2z)`` and the same for ``b`` (half of the relevance to each factor).
* a sum of two activations (residual adds, ``x − mean``), a sum over axes (pooling, means): the ε/z-rule
  ``R_i = x_i ⊙ ∂z/∂x_i ᵀ (R / z)``.
* an elementwise function of one activation (GELU, SiLU, tanh, x·sigmoid(x), …: the connected elementwise
  equations on one source) passes relevance unchanged (identity rule) when it is nonlinear; an affine one (a bias
  or a scale) uses the z-rule, so a bias absorbs its share.
* normalisation (LayerNorm, RMSNorm, GroupNorm): a *statistic* is a value reduced over the channel (last) axis; a
  nonlinear function of statistics (``rsqrt(var + ε)``) and a statistic multiplying or dividing an activation are
  constants (LXT's identity rule on ``1/std``); the mean that is subtracted keeps the ε-rule, as in LXT.
* softmax, read from its form ``exp(u) / Σ_axis exp(u)``: ``attn_lrp`` applies AttnLRP's rule at its input
  ``x``: ``R_x = x ⊙ (R − s ⊙ Σ_axis R)`` (not conservative by design: the bias term of the Taylor expansion);
  ``cp_lrp`` treats the attention weights as constants (relevance goes to the values only).
* data movement and max-reductions keep their VJPs; integer inputs (token ids) start the relevance at the first
  float values computed from them (embedding lookups), and the input relevance per token is their sum over the
  trailing axes.

Anything else that an activation reaches is refused with :class:`jaxprune.graph.UnsupportedError` naming it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import graph
from jaxprune.graph import ops as gops
from jaxprune.graph.execute import BoundOp
from jaxprune.lrp import composites as C
from jaxprune.lrp import rules as R

Array = jax.Array

__all__ = ["PrimitiveComposite", "PRESETS", "register_composite", "get", "attn_lrp", "cp_lrp", "Plan", "plan",
           "relevance", "graph_relevance", "unit_relevance"]

SOFTMAX_RULES = ("attn_lrp", "cp_lrp")
_SUMS = frozenset({"add", "sub", "add_any"})
_ZRULE = frozenset({"reduce_sum", "reduce_window_sum", "cumsum"})
_PLAIN = (gops.MOVES - {"convert_element_type", "copy", "copy_p", "reduce_precision"}) | {
    "reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min", "cummax", "cummin", "gather",
    "dynamic_slice", "select_and_gather_add"}
_COPY = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"})


# ----------------------------------------------------------------------------------------------- composites
@dataclasses.dataclass(frozen=True)
class PrimitiveComposite:
    """Rules for every primitive: ``linear`` assigns the rule of each layer with a parameter kernel (a
    :class:`~jaxprune.lrp.composites.Composite`, by name or kind ``"dense"``/``"conv"``); ``softmax`` is
    ``"attn_lrp"`` or ``"cp_lrp"``; ``epsilon`` stabilises sums, products and x-dependent linear maps."""

    linear: C.Composite = C.Composite(R.Epsilon(1e-6))
    softmax: str = "attn_lrp"
    epsilon: float = 1e-9

    def __post_init__(self):
        if self.softmax not in SOFTMAX_RULES:
            raise ValueError(f"softmax={self.softmax!r}: expected one of {SOFTMAX_RULES}")
        if not isinstance(self.linear, C.Composite):
            raise TypeError(f"linear: expected a jaxprune.lrp.composites.Composite, got {self.linear!r}")
        R._check_params("PrimitiveComposite", epsilon=self.epsilon)
        if self.epsilon < 0:
            raise ValueError(f"epsilon={self.epsilon}: expected a non-negative stabiliser")


PRESETS: dict[str, Callable[..., PrimitiveComposite]] = {}


def register_composite(name: str) -> Callable:
    """``@register_composite("name")``: a factory ``(**options) -> PrimitiveComposite`` selectable by name."""
    def deco(f):
        PRESETS[name] = f
        return f
    return deco


def _linear(epsilon: float, gamma: float | None) -> C.Composite:
    if gamma is None:
        return C.Composite(R.Epsilon(epsilon))
    return C.Composite(R.Gamma(gamma, epsilon), kinds=(("output", R.Epsilon(epsilon)),))


@register_composite("attn_lrp")
def attn_lrp(epsilon: float = 1e-6, gamma: float | None = None) -> PrimitiveComposite:
    """AttnLRP: ε on linear layers (γ on all but the output layers when ``gamma`` is given), softmax rule."""
    return PrimitiveComposite(_linear(epsilon, gamma), "attn_lrp")


@register_composite("cp_lrp")
def cp_lrp(epsilon: float = 1e-6, gamma: float | None = None) -> PrimitiveComposite:
    """CP-LRP: as :func:`attn_lrp` with the attention weights treated as constants."""
    return PrimitiveComposite(_linear(epsilon, gamma), "cp_lrp")


def get(composite: Any) -> PrimitiveComposite:
    """A :class:`PrimitiveComposite` from itself or a registered name."""
    if isinstance(composite, PrimitiveComposite):
        return composite
    if isinstance(composite, str) and composite in PRESETS:
        return PRESETS[composite]()
    raise ValueError(f"composite={composite!r}: expected a PrimitiveComposite or one of {sorted(PRESETS)}")


# ----------------------------------------------------------------------------------------------- the plan
class Step(NamedTuple):
    """How the replay evaluates one equation: ``role`` and its role's data (see :func:`plan`)."""

    role: str
    act: tuple = ()  # positions of the operands that carry relevance
    data: Any = None


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """A program read for LRP (hashed by identity: a static ``jax.jit`` argument).

    ``layers[name] = (eqn, kind, roles, out var, unit axes)``: the linear layers with a parameter kernel;
    ``roots``: var ids where relevance starts for an integer input (embedding lookups), else ``()``."""

    program: graph.Program
    steps: tuple
    layers: dict
    roots: tuple
    float_input: bool


class _Reader:
    """The per-variable facts :func:`plan` collects: class, elementwise source, statistic, nonlinearity."""

    def __init__(self, prog: graph.Program, float_input: bool, cp: bool):
        self.prog, self.cp = prog, cp
        self.cls: dict = {i: "weight" for i in (*prog.leaf_ids, *prog.consts)}
        self.cls[prog.x_id] = "active" if float_input else "index"
        self.src = {prog.x_id: prog.x_id}
        self.stat: dict = {prog.x_id: False}
        self.nl: dict = {prog.x_id: False}
        self.steps: list[Step] = []
        self.producer = {o: k for k, e in enumerate(prog.eqns) for o in e.outs}
        self.uses = _uses(prog)

    def kind(self, a) -> str:
        return "weight" if isinstance(a, tuple) else self.cls[a]

    def set(self, e: graph.Eqn, cls: str, src=None, stat: bool = False, nl: bool = False) -> None:
        for o in e.outs:
            self.cls[o] = cls
            if cls == "active":
                self.src[o] = o if src is None else src
                self.stat[o], self.nl[o] = stat, nl


def _reduces_channels(e: graph.Eqn, prog: graph.Program) -> bool:
    nd = len(prog.shapes[e.ins[0]]) if isinstance(e.ins[0], int) else 0
    return nd > 0 and nd - 1 in tuple(int(a) for a in e.params.get("axes", ()))


def _softmax_of(rd: _Reader, k: int, num: int, den: int) -> tuple | None:
    """``(source, axes)`` when equation ``k`` divides ``num = exp(u)`` by ``Σ_axes num`` (moved back): a softmax
    whose input is ``num``'s elementwise source."""
    prog = rd.prog
    v = den
    while v in rd.producer and prog.eqns[rd.producer[v]].name in ("broadcast_in_dim", "reshape", "expand_dims"):
        v = prog.eqns[rd.producer[v]].ins[0]
    red = prog.eqns[rd.producer[v]] if v in rd.producer else None
    if red is None or red.name != "reduce_sum" or red.ins[0] != num or num not in rd.producer:
        return None
    if prog.eqns[rd.producer[num]].name != "exp":
        return None
    return rd.src[num], tuple(int(a) for a in red.params["axes"])


def _classify(rd: _Reader, k: int, e: graph.Eqn) -> Step:
    """The step of equation ``k`` (whose inputs depend on ``x``), updating ``rd``'s facts of its outputs."""
    kinds = [rd.kind(a) for a in e.ins]
    act = tuple(i for i, c in enumerate(kinds) if c == "active")
    if not all(jnp.issubdtype(d, jnp.floating) for d in e.dtypes):
        rd.set(e, "index")
        return Step("index")
    if not act:
        root = all(c in ("weight", "index") for c in kinds)
        rd.set(e, "active" if root else "const")
        return Step("root" if root else "const")
    if e.name == "stop_gradient":
        rd.set(e, "const")
        return Step("const")
    if e.name in gops.LINEAR:
        return _classify_linear(rd, k, e, act, kinds)
    if e.name in ("mul", "div") and len({rd.src[e.ins[i]] for i in act}) == 2:
        stats = [i for i in act if rd.stat[e.ins[i]]]
        if len(stats) == 2:
            rd.set(e, "const")
            return Step("const")
        if len(stats) == 1:  # a statistic scaling an activation: a normalising factor, held constant
            act = tuple(i for i in act if i not in stats)
            soft = _softmax_of(rd, k, e.ins[0], e.ins[1]) if e.name == "div" and act == (0,) else None
            if soft is not None:
                rd.set(e, "const" if rd.cp else "active")
                return Step("softmax", act, soft)
        elif e.name == "div":
            raise graph.UnsupportedError(f"model: LRP cannot propagate through a division of two activations "
                                         f"(equation {k}, div)")
        else:
            rd.set(e, "active")
            return Step("product", act)
    if _is_bias(rd, e, act):
        rd.set(e, "active")
        return Step("bias", act)
    if e.name in _SUMS and len({rd.src[e.ins[i]] for i in act}) == 2:
        rd.set(e, "active", stat=all(rd.stat[e.ins[i]] for i in act))
        return Step("zrule", act)
    if e.name in gops.ELEMENTWISE or (e.name in gops.CUSTOM and gops.jaxpr_elementwise(gops.inner_jaxpr(e))):
        return _classify_elementwise(rd, k, e, act)
    if e.name in _ZRULE or e.name in _PLAIN:
        stat = any(rd.stat[e.ins[i]] for i in act) or (e.name.startswith("reduce_") and _reduces_channels(e, rd.prog))
        rd.set(e, "active", stat=stat)
        return Step("zrule" if e.name in _ZRULE else "plain", act)
    raise graph.UnsupportedError(f"model: LRP cannot propagate through {e.name} (equation {k}); supported: linear "
                                 "layers, products and sums of activations, elementwise functions, normalisation, "
                                 "softmax, reductions and data movement")


def _is_bias(rd: _Reader, e: graph.Eqn, act: tuple) -> bool:
    """``e`` adds a weight to the output of a linear layer read by nothing else: the layer's bias."""
    if e.name not in ("add", "add_any") or len(act) != 1 or len(e.ins) != 2:
        return False
    a = e.ins[act[0]]
    j = rd.producer.get(a)
    return (j is not None and rd.steps[j].role == "linear" and len(rd.uses.get(a, [])) == 1 and
            a not in rd.prog.out_ids and rd.kind(e.ins[1 - act[0]]) == "weight" and
            rd.prog.shapes[a] == e.shapes[0])


def _classify_elementwise(rd: _Reader, k: int, e: graph.Eqn, act: tuple) -> Step:
    srcs = {rd.src[e.ins[i]] for i in act}
    same = all(rd.prog.shapes[e.ins[i]] == e.shapes[0] for i in act)
    affine = e.name in _SUMS | _COPY | {"neg"} or (e.name == "mul" and len(act) == 1) or (
        e.name == "div" and act == (0,))
    stat = all(rd.stat[e.ins[i]] for i in act)
    if len(srcs) == 1 and same:
        nl = not affine or any(rd.nl[e.ins[i]] for i in act)
        if stat and nl:  # a nonlinear function of statistics (rsqrt(var + eps)): a normalising factor
            rd.set(e, "const")
            return Step("const")
        rd.set(e, "active", src=srcs.pop(), stat=stat, nl=nl)
        return Step("member", act)
    if affine and len(act) == 1:  # an activation broadcast by an affine map
        rd.set(e, "active", stat=stat)
        return Step("zrule", act)
    raise graph.UnsupportedError(f"model: LRP cannot propagate through {e.name} of several activations "
                                 f"(equation {k}); supported: sums and products of two activations")


def _classify_linear(rd: _Reader, k: int, e: graph.Eqn, act: tuple, kinds: list) -> Step:
    if len(act) == 2:
        if e.name != "dot_general":
            raise graph.UnsupportedError(f"model: LRP cannot propagate through {e.name} of two activations "
                                         f"(equation {k})")
        rd.set(e, "active")
        return Step("product", act)
    other = 1 - act[0]
    rd.set(e, "active")
    if kinds[other] == "const":
        return Step("zrule", act)  # a map linear in the activation, with x-dependent weights: the ε-rule
    return Step("linear", act)


def _region(rd: _Reader, steps: list, v: int) -> tuple[int, ...]:
    """The elementwise equations computing ``v`` from its source, in program order."""
    s, todo, found = rd.src[v], [v], set()
    while todo:
        u = todo.pop()
        if u == s or u not in rd.producer:
            continue
        j = rd.producer[u]
        if steps[j].role != "member" or j in found:
            continue
        found.add(j)
        todo.extend(a for a in rd.prog.eqns[j].ins if isinstance(a, int) and rd.src.get(a) == s)
    return tuple(sorted(found))


def _uses(prog: graph.Program) -> dict:
    uses: dict = {}
    for k, e in enumerate(prog.eqns):
        for a in e.ins:
            if isinstance(a, int):
                uses.setdefault(a, []).append(k)
    return uses


def _layers(rd: _Reader, steps: list, uses: dict, n: graph.Net) -> dict:
    """Name each linear step by its kernel's module path and fold the bias add that follows it."""
    prog = rd.prog
    leaf_of = {v: i for i, v in enumerate(prog.leaf_ids)}
    layers: dict = {}
    for k, st in enumerate(steps):
        if st.role != "linear":
            continue
        e = prog.eqns[k]
        w = e.ins[1 - st.act[0]]
        while isinstance(w, int) and w in rd.producer and prog.eqns[rd.producer[w]].name in _COPY:
            w = prog.eqns[rd.producer[w]].ins[0]  # a kernel cast to the activation's dtype
        leaf, _ = gops.kernel_view(w, leaf_of, prog)
        name = (n.module_path(leaf) or n.paths[leaf]) if leaf is not None else f"{e.name}@{k}"
        name = name if name not in layers else f"{name}#{sum(1 for m in layers if m.split('#')[0] == name) + 1}"
        out, bias = e.outs[0], None
        us = uses.get(out, [])
        if len(us) == 1 and steps[us[0]].role == "bias":
            b = prog.eqns[us[0]]
            bias, out = b.ins[1 - steps[us[0]].act[0]], b.outs[0]
            steps[us[0]] = Step("skip")
        roles = tuple(r for r, on in (("input", e.ins[st.act[0]] in (prog.x_id, *rd.roots)),
                                      ("output", out in prog.out_ids)) if on)
        units = 1
        if e.name == "dot_general" and st.act == (0,):
            (_, rc), (_, rb) = e.params["dimension_numbers"]
            units = len(np.shape(w) if isinstance(w, tuple) else prog.shapes[w]) - len(rc) - len(rb)
        steps[k] = Step("linear", st.act, (name, bias, out))
        layers[name] = (k, "dense" if e.name == "dot_general" else "conv", roles, out, units)
    return layers


def plan(program: graph.Program, net: graph.Net, float_input: bool, cp: bool) -> Plan:
    """Read ``program`` for LRP: a :class:`Step` per equation (``cp``: CP-LRP's constant attention weights)."""
    rd = _Reader(program, float_input, cp)
    rd.roots = ()
    steps = rd.steps
    for k, e in enumerate(program.eqns):
        if all(rd.kind(a) == "weight" for a in e.ins):
            rd.set(e, "weight")
            steps.append(Step("weight"))
            continue
        st = _classify(rd, k, e)
        steps.append(st)
        if st.role == "root":
            rd.roots += tuple(e.outs)
    uses = rd.uses
    layers = _layers(rd, steps, uses, net)
    for k, st in enumerate(steps):
        if st.role == "softmax":
            src, axes = st.data
            steps[k] = Step("softmax", st.act, (src, axes, _region(rd, steps, program.eqns[k].ins[0])))
    final = list(steps)
    for k, st in enumerate(steps):
        if st.role != "member":
            continue
        v = program.eqns[k].outs[0]
        s = rd.src[v]
        inside = all(steps[j].role == "member" and rd.src.get(program.eqns[j].outs[0]) == s
                     for j in uses.get(v, []))
        if inside and v not in program.out_ids:
            final[k] = Step("skip")
        else:
            final[k] = Step("region", st.act, (s, _region(rd, steps, v), not rd.nl[v]))
    return Plan(program, tuple(final), layers, rd.roots, float_input)


# ----------------------------------------------------------------------------------------------- rules
def _zrule(fn: Callable, acts: tuple, epsilon: float) -> Array:
    """``fn(*acts)``, linear in ``acts``, whose VJP is the ε/z-rule ``R_i = a_i ⊙ ∂z/∂a_i ᵀ (R / stab(z))``."""
    @jax.custom_vjp
    def f(*a):
        return fn(*a)

    def bwd(a, r):
        s = graph.safe_divide(r, graph.stabilize(fn(*a), epsilon))
        return tuple(x * g for x, g in zip(a, jax.vjp(fn, *a)[1](s)))

    f.defvjp(lambda *a: (fn(*a), a), bwd)
    return f(*acts)


def _uniform(fn: Callable, a: Array, b: Array, epsilon: float) -> Array:
    """A product ``fn(a, b)`` of two activations whose VJP is the uniform rule: half of ``R`` to each factor."""
    @jax.custom_vjp
    def f(a, b):
        return fn(a, b)

    def bwd(res, r):
        a, b = res
        s = graph.safe_divide(r, 2 * graph.stabilize(fn(a, b), epsilon))
        ga, gb = jax.vjp(fn, a, b)[1](s)
        return a * ga, b * gb

    f.defvjp(lambda a, b: (fn(a, b), (a, b)), bwd)
    return f(a, b)


def _identity(fn: Callable, a: Array) -> Array:
    """``fn(a)`` (elementwise, same shape) whose VJP passes relevance unchanged."""
    @jax.custom_vjp
    def f(a):
        return fn(a)

    f.defvjp(lambda a: (fn(a), a), lambda a, r: (r.astype(a.dtype),))
    return f(a)


def _softmax_rule(fn: Callable, x: Array, axes: tuple) -> Array:
    """``s = fn(x)`` (a softmax over ``axes``) whose VJP is AttnLRP's ``R_x = x ⊙ (R − s ⊙ Σ_axes R)`` (masked
    inputs at ``-inf`` or the dtype's minimum count as 0)."""
    @jax.custom_vjp
    def f(x):
        return fn(x)

    def bwd(x, r):
        s = fn(x)
        x0 = jnp.where(x <= jnp.finfo(x.dtype).min / 2, 0, x)
        return (x0 * (r - s * jnp.sum(r, axis=axes, keepdims=True)),)

    f.defvjp(lambda x: (fn(x), x), bwd)
    return f(x)


# ----------------------------------------------------------------------------------------------- the replay
def _read(env: dict, a):
    return a[1] if isinstance(a, tuple) else env[a]


def _with(e: graph.Eqn, env: dict, act: tuple, stop: bool = True) -> Callable:
    """``fn(*active values) -> e's output``, the other operands read from ``env`` (gradient stopped)."""
    def fn(*vals):
        args = [_read(env, a) for a in e.ins]
        args = [jax.lax.stop_gradient(v) if stop and i not in act and isinstance(e.ins[i], int) else v
                for i, v in enumerate(args)]
        for i, v in zip(act, vals):
            args[i] = v
        return e.bind(*args)[0]
    return fn


def _region_fn(p: Plan, env: dict, src: int, eqns: tuple, out: int) -> Callable:
    prog = p.program

    def fn(v):
        local = {src: v}
        for j in eqns:
            e = prog.eqns[j]
            args = [local[a] if isinstance(a, int) and a in local else jax.lax.stop_gradient(_read(env, a))
                    for a in e.ins]
            local.update(zip(e.outs, e.bind(*args)))
        return local[out]
    return fn


def _step(p: Plan, comp: PrimitiveComposite, rules: dict, k: int, env: dict) -> dict:
    """Evaluate equation ``k`` by its step: ``{var id: value}``."""
    e, st = p.program.eqns[k], p.steps[k]
    acts = tuple(env[e.ins[i]] for i in st.act) if st.role in ("zrule", "product") else ()
    if st.role in ("index", "root", "plain"):
        return dict(zip(e.outs, e.bind(*[_read(env, a) for a in e.ins])))
    if st.role == "const":
        return dict(zip(e.outs, [jax.lax.stop_gradient(v) for v in e.bind(*[_read(env, a) for a in e.ins])]))
    if st.role == "zrule":
        return {e.outs[0]: _zrule(_with(e, env, st.act), acts, comp.epsilon)}
    if st.role == "product":
        return {e.outs[0]: _uniform(_with(e, env, st.act), *acts, comp.epsilon)}
    if st.role == "region":
        src, eqns, affine = st.data
        fn = _region_fn(p, env, src, eqns, e.outs[0])
        val = _zrule(fn, (env[src],), comp.epsilon) if affine else _identity(fn, env[src])
        return {e.outs[0]: val}
    if st.role == "softmax":
        src, axes, eqns = st.data
        num = _region_fn(p, env, src, eqns, e.ins[0])
        fn = lambda v: (lambda n: n / jnp.sum(n, axis=axes, keepdims=True))(num(v))
        if comp.softmax == "cp_lrp":
            return {e.outs[0]: jax.lax.stop_gradient(fn(env[src]))}
        return {e.outs[0]: _softmax_rule(fn, env[src], axes)}
    if st.role == "linear":
        return {st.data[2]: _linear_step(e, env, st, rules[st.data[0]])}
    raise AssertionError(st.role)  # pragma: no cover - every role is handled above


def _linear_step(e: graph.Eqn, env: dict, st: Step, rule: R.Rule) -> Array:
    """A layer with a parameter kernel under ``rule``, its bias folded in."""
    name, bias, out = st.data
    a = st.act[0]
    x, w = env[e.ins[a]], _read(env, e.ins[1 - a])
    op = BoundOp(e.prim, tuple(sorted(e.params.items())))
    if a == 1:
        op = _Swapped(op)
    z_shape = e.shapes[0]
    b = jnp.zeros((1,) * len(z_shape), x.dtype) if bias is None else _read(env, bias)
    return R.linear(rule, op, x, w, b)


@dataclasses.dataclass(frozen=True)
class _Swapped:
    """``op(x, w)`` of a primitive whose activation is its second operand."""

    op: BoundOp

    def __call__(self, x: Array, w: Array) -> Array:
        return self.op(w, x)


def forward(p: Plan, comp: PrimitiveComposite, rules: dict, leaves: list, x: Array,
            probes: dict) -> tuple[Any, dict]:
    """Replay the program under the rules: ``(outputs, {layer: output})``; ``probes[name]`` (zeros) is added to
    layer ``name``'s output (or, for a name ``"root:<var>"``, to an embedding lookup's)."""
    prog = p.program
    env: dict = dict(prog.consts)
    env.update(zip(prog.leaf_ids, leaves))
    env[prog.x_id] = x
    at = {l[3]: name for name, l in p.layers.items()}
    at.update({v: f"root:{v}" for v in p.roots})
    seen: dict = {}
    for k, e in enumerate(prog.eqns):  # weights first: a bias is reshaped after its layer's product
        if p.steps[k].role == "weight":
            env.update(zip(e.outs, e.bind(*[_read(env, a) for a in e.ins])))
    for k, st in enumerate(p.steps):
        if st.role in ("weight", "skip"):
            continue
        for v, val in _step(p, comp, rules, k, env).items():
            if v in at:
                val = val + probes[at[v]] if at[v] in probes else val
                seen[at[v]] = val
            env[v] = val
    out = [_read(env, o) for o in prog.out_ids]
    return (out[0] if len(out) == 1 else out), seen


# ----------------------------------------------------------------------------------------------- entry points
_PLANS: dict = {}


def _plan_for(g: graph.Graph, float_input: bool, cp: bool) -> Plan:
    key = (id(g.program), float_input, cp)
    hit = _PLANS.get(key)
    if hit is None or hit.program is not g.program:
        if len(_PLANS) > 64:
            _PLANS.clear()
        hit = _PLANS[key] = plan(g.program, g.net, float_input, cp)
    return hit


def _input_relevance(p: Plan, x: Array, r_probes: dict) -> Array:
    """An integer input's relevance: each embedding lookup's relevance summed over its trailing axes."""
    total = jnp.zeros(x.shape, r_probes[f"root:{p.roots[0]}"].dtype) if p.roots else jnp.zeros(x.shape)
    for v in p.roots:
        r = r_probes[f"root:{v}"]
        if r.shape[:x.ndim] != x.shape:
            raise graph.UnsupportedError(f"model: an embedding lookup of shape {r.shape} does not start with the "
                                         f"input's shape {x.shape}; its relevance cannot be given per input")
        total = total + r.sum(axis=tuple(range(x.ndim, r.ndim)))
    return total


def _rules(p: Plan, comp: PrimitiveComposite) -> dict:
    """``{layer: rule}`` by the composite's lookup (name, role, kind)."""
    return {n: comp.linear.rule_for(n, kind, roles) for n, (_, kind, roles, _, _) in p.layers.items()}


def _core(p: Plan, comp: PrimitiveComposite, layers: tuple, leaves: list, x: Array, target: Array):
    from jaxprune.lrp.relevance import Relevance

    rule_map = _rules(p, comp)
    names = layers + tuple(f"root:{v}" for v in p.roots)
    shapes = {**{n: p.program.shapes[p.layers[n][3]] for n in layers},
              **{f"root:{v}": p.program.shapes[v] for v in p.roots}}
    zeros = {n: jnp.zeros(shapes[n], x.dtype if p.float_input else jnp.float32) for n in names}

    def f(v, pr):
        return forward(p, comp, rule_map, leaves, v, pr)[0]

    if p.float_input:
        logits, vjp = jax.vjp(f, x, zeros)
    else:
        logits, vjp = jax.vjp(lambda pr: f(x, pr), zeros)
    t = jnp.where(target < 0, jnp.argmax(logits, -1), target).astype(jnp.int32)
    cts = vjp(jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype) * logits)
    r_x, r_pr = cts if p.float_input else (None, cts[0])
    if not p.float_input:
        r_x = _input_relevance(p, x, r_pr)
    return Relevance(r_x, {n: r_pr[n] for n in layers}, logits, t)


_core_jit = jax.jit(_core, static_argnums=(0, 1, 2))


def _check_input(x: Any) -> Array:
    """A float batch (checked as :func:`jaxprune.lrp.relevance` does) or an integer batch of token ids."""
    from jaxprune.lrp.relevance import _check_x

    a = jnp.asarray(x)
    if a.ndim >= 2 and jnp.issubdtype(a.dtype, jnp.integer):
        return a
    return _check_x(x)


def relevance(model: Any, variables: Any, x: Any, *, composite: Any = "attn_lrp", target: Any = None,
              layers: tuple[str, ...] | None = None):
    """LRP of ``model`` at ``x: (n, …)`` (float features, or integer token ids ``(n, t)``) for class ``target``
    under a :class:`PrimitiveComposite` (or a name in :data:`PRESETS`). Returns
    :class:`jaxprune.lrp.Relevance`: ``input`` like ``x`` (per token for integer inputs), ``layers[name]`` the
    relevance at the output of each linear layer in ``layers`` (default: all with a parameter kernel; the output
    of a layer with its bias added), ``logits`` and ``target``. Jitted per model, input shape and composite."""
    from jaxprune.lrp.relevance import _check_target, build_graph, num_classes

    comp = get(composite)
    x = _check_input(x)
    g = build_graph(model, variables, jax.ShapeDtypeStruct(x.shape, x.dtype))
    num_classes(g)
    return graph_relevance(g, comp, x, lambda: _check_target(g, x.shape[0], target), layers)


def graph_relevance(g: graph.Graph, comp: PrimitiveComposite, x: Array, target: Callable[[], Array],
                    layers: tuple[str, ...] | None = None):
    """:func:`relevance` of graph ``g`` at a checked ``x``; ``target()`` gives the checked target indices, called
    after the layers and rules are checked: ``(n,)`` classes for logits ``(n, C)``, or any shape the logits
    without their last axis have (``(n, t)`` next tokens of a language model: relevance starts at every
    position's target logit). -1 explains the predicted index."""
    p = _plan_for(g, bool(jnp.issubdtype(x.dtype, jnp.floating)), comp.softmax == "cp_lrp")
    names = tuple(p.layers) if layers is None else tuple(layers)
    unknown = [n for n in names if n not in p.layers]
    if unknown:
        raise ValueError(f"layers: {unknown} are not linear layers of the model; its layers are {list(p.layers)}")
    _check_rules(p, comp)
    return _core_jit(p, comp, names, list(g.net.leaves), x, target())


def _check_rules(p: Plan, comp: PrimitiveComposite) -> None:
    """Every ``names`` entry of the composite names a layer; a ZBox's bounds fit its layer's input channels."""
    unknown = [n for n, _ in comp.linear.names if n not in p.layers]
    if unknown:
        raise ValueError(f"composite names {unknown} match no linear layer; the model has {list(p.layers)}")
    for name, rule in _rules(p, comp).items():
        e = p.program.eqns[p.layers[name][0]]
        a = e.ins[p.steps[p.layers[name][0]].act[0]]
        c = p.program.shapes[a][-1] if isinstance(a, int) else 1
        for bound in ("low", "high") if isinstance(rule, R.ZBox) else ():
            if np.shape(getattr(rule, bound)) not in ((), (1,), (c,)):
                raise ValueError(f"composite: ZBox {bound}={getattr(rule, bound)!r} on layer {name!r}: expected a "
                                 f"float or {c} per-channel values")


def unit_relevance(model: Any, variables: Any, x: Any, *, layer: str, composite: Any = "attn_lrp",
                   target: Any = None) -> Array:
    """Relevance of each output unit (channel) of linear layer ``layer`` (its kernel's module path):
    ``(n, *units)``, summed over every other axis (tokens, positions), where ``units`` are the kernel's output
    axes (``(features,)`` for a dense or conv layer, ``(heads, head_dim)`` for a multi-head projection).
    The score a relevance-based pruning criterion ranks units or heads by."""
    rel = relevance(model, variables, x, composite=composite, target=target, layers=(layer,))
    r = rel.layers[layer]
    g_units = _units(model, variables, x, layer)
    return r.sum(axis=tuple(range(1, r.ndim - g_units)))


def _units(model: Any, variables: Any, x: Any, layer: str) -> int:
    from jaxprune.lrp.relevance import build_graph

    x = jnp.asarray(x)
    g = build_graph(model, variables, jax.ShapeDtypeStruct(x.shape, x.dtype))
    p = _plan_for(g, bool(jnp.issubdtype(x.dtype, jnp.floating)), False)
    return p.layers[layer][4]
