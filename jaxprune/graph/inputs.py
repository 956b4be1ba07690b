"""Example inputs: the shape a model accepts, inferred from its variables when not given."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.graph.program import _spec, net

Array = jax.Array
PyTree = Any

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

