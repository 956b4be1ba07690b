"""Reading the program into a :class:`~jaxprune.graph.model_graph.Graph`: each equation through its handler in the op
registry (:mod:`jaxprune.graph.ops`), then the layers' chains (bias, BatchNorm), producers, consumers and frozen
classes from the unit table."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxprune.graph import attention
from jaxprune.graph import convs, norms  # noqa: F401 (their handlers register into ops.OPS)
from jaxprune.graph.inputs import example_input
from jaxprune.graph.model_graph import OUTPUT, Graph, Layer
from jaxprune.graph.program import Net, Program, _spec, _trace, net
from jaxprune.graph.table import UnitTable


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


def _analyse(n: Net, prog: Program) -> Graph:
    t = UnitTable(n, prog)
    notes, near = [], []
    for e in prog.eqns:
        near.append(t.last_layer)
        kind, note = attention.handle(e, t)
        t.kinds.append(kind)
        notes.append(note)
    norms.resolve(t)
    uses: dict[int, list[int]] = {}
    for k, e in enumerate(prog.eqns):
        for a in e.ins:
            if isinstance(a, int):
                uses.setdefault(a, []).append(k)
    attention.finish(t, prog.out_ids)
    lay = _chains(t, uses)
    cls = t.uf.classes()
    frozen = {}
    for u, reason in t.frozen_units.items():
        frozen.setdefault(int(cls[u]), reason)
    for o in prog.out_ids:  # a layer whose units are model outputs: say so first
        if isinstance(o, int) and o in t.origin:
            for u in t.origin[o].tolist():
                frozen[int(cls[u])] = OUTPUT
    return Graph(net=n, program=prog, layers=_layers(t, lay, cls), kinds=tuple(t.kinds), notes=tuple(notes),
                 owner=np.asarray(t.owner, np.int64), index=np.asarray(t.index, np.int64), cls=cls, frozen=frozen,
                 slices=tuple((leaf, axis, ids) for (leaf, axis), ids in t.slices.items()),
                 unit_ids={l["name"]: l["ids"] for l in t.layers}, near=tuple(near), origins=t.origin,
                 refused=t.refused, uses=uses, norms=dict(t.norms),
                 normed={int(cls[u]): t.normed[u] for u in sorted(t.normed, reverse=True)})  # the first norm wins


def _chains(t: UnitTable, uses: dict) -> dict[str, dict]:
    """Each layer with its chain: the per-channel affine ops directly after it (single use), BatchNorm's form
    recognised (their kinds become ``"chain"``)."""
    prog = t.prog
    producer = {o: e for e in prog.eqns for o in e.outs}  # var id -> the equation computing it
    lay = {}
    for l in t.layers:
        chain, cur = [], l["var"]
        while True:
            us = uses.get(cur, [])
            if len(us) != 1 or t.kinds[us[0]] != "affine" or cur in prog.out_ids:
                break
            chain.append(us[0])
            cur = prog.eqns[us[0]].outs[0]
        for c in chain:
            t.kinds[c] = "chain"
        bias, bn = _chain_params(prog, chain, l["var"], t.sources, producer)
        lay[l["name"]] = dict(l, chain=tuple(chain), out=cur, bias=bias, batchnorm=bn)
    return lay


def _layers(t: UnitTable, lay: dict, cls: np.ndarray) -> dict[str, Layer]:
    """The :class:`Layer` records: producers and consumers through the coupling classes, chain leaves to zero."""
    names = [l["name"] for l in t.layers]
    owners_of_class: dict[int, set] = {}
    for u, o in enumerate(t.owner):
        owners_of_class.setdefault(int(cls[u]), set()).add(o)
    feeds = [set().union(*[owners_of_class[int(c)] for c in set(cls[l["in_ids"]].tolist())]) for l in lay.values()]
    label = lambda o: "input" if o == -1 else "constant" if o == -2 else names[o]
    result = {}
    for li, (name, l) in enumerate(lay.items()):
        in_names = tuple(label(o) for o in sorted(feeds[li], key=lambda o: (o < 0, o)))
        cons = tuple(names[j] for j, f in enumerate(feeds) if li in f)
        zero = []
        for c in l["chain"]:
            ce = t.prog.eqns[c]
            if ce.name in ("add", "sub", "mul"):
                for b in ce.ins:
                    if isinstance(b, int) and b not in t.origin:
                        zero.extend(sorted(t.sources.get(b, ())))
        bn = dict(l["batchnorm"]) if l["batchnorm"] else None
        if bn is not None:
            zero = [i for i in (bn["scale"], bn["bias"], bn["layer_bias"]) if i is not None]
        result[name] = Layer(name=name, kind=l["kind"], units=l["units"], eqn=l["eqn"], chain=l["chain"],
                             out=l["out"], kernel=l["kernel"], in_axis=l["in_axis"], out_axis=l["out_axis"],
                             bias=l["bias"], batchnorm=l["batchnorm"], inputs=in_names, consumers=cons,
                             positions=l["positions"], zero=tuple(dict.fromkeys(zero)),
                             unit_axis=l.get("unit_axis", -1))
    return result


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
        leaves_in = sources.get(w, frozenset()) if not isinstance(w, tuple) else frozenset()
        var, eps = _rsqrt_var_eps(w, producer, single_leaf)
        if var is not None:
            rest = set(leaves_in) - {var}
            scale = next(iter(rest)) if len(rest) == 1 else None
            beta = single_leaf(ops[2][1]) if len(ops) > 2 else None
            if mean is not None and len(rest) <= 1:
                bn = (("mean", mean), ("var", var), ("scale", scale), ("bias", beta), ("epsilon", eps),
                      ("layer_bias", pre_bias))
                return pre_bias, bn
    return None, None


def _rsqrt_var_eps(w, producer: dict, single_leaf) -> tuple[int | None, float | None]:
    """``(var leaf, eps)`` when ``w = rsqrt(var + eps) [* scale]``, found by walking ``w``'s producers."""
    var = eps = None
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
                lits = [a for a in producer[src].ins if isinstance(a, tuple)]
                others = [a for a in producer[src].ins if not isinstance(a, tuple)]
                if lits and others:
                    eps = float(np.asarray(lits[0][1]))
                    var = single_leaf(others[0])
        todo.extend(a for a in pe.ins if not isinstance(a, tuple))
    return var, eps
