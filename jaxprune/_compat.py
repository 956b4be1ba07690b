"""Every dependency-version workaround of the library, in one place: what it covers, the versions that need it,
and the release of jaxprune that removes it.

Supported (pyproject.toml): jax/jaxlib 0.10.2 … 0.12.x (0.10.2 for Python 3.11), flax 0.12.8 … 0.12.x.

==========================  ===================================================  ==================================
shim                        needed for                                           removed
==========================  ===================================================  ==================================
:data:`SERIALISE_LAPACK`    jaxlib <= 0.11.0: concurrent CPU LAPACK calls        when the minimum jaxlib is 0.11.1
                            deadlock (:mod:`jaxprune.similarity._linalg`)        (Python 3.11 / jax 0.10.2 dropped)
:func:`bind_params`         jax < 0.7: ``Primitive.get_bind_params`` returned    jaxprune 0.2.0 (every supported
                            ``(subfuns, params)``; later releases the params     jax returns the params alone:
                            alone (graph replay, calibrated pruning)             checked on 0.10.2 and 0.12.1)
:func:`variable_value`      flax before ``nnx.Variable.get_value``: ``.value``   jaxprune 0.2.0 (flax 0.12.8 has
                            (deprecated since, with a warning)                   ``get_value``)
==========================  ===================================================  ==================================

Kept elsewhere, because a name must live where it is looked up: ``jaxprune.imp._Keys`` (the former private name of
:class:`jaxprune.imp.Keys`; removed in jaxprune 0.2.0). Experiment-flag renames (``--seed`` → ``--seeds``, …) are
the experiments' own: ``experiments/common.py`` (``Renamed``, a FutureWarning per old flag).

Layer 0: imports no other jaxprune module.
"""
from __future__ import annotations

import re
from typing import Any

import jaxlib


def version_tuple(version: str) -> tuple[int, int, int]:
    """``"0.10.2"`` → ``(0, 10, 2)``; ``"0.12.0.dev20250101"`` → ``(0, 12, 0)`` (missing parts are 0)."""
    parts = [int(re.match(r"\d*", v).group() or 0) for v in version.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


# jaxlib <= 0.11.0 deadlocks on concurrent LAPACK calls (0.10.2 and 0.11.0 hang; 0.11.1, 0.11.2 and 0.12.0.1 do
# not): the similarity code then runs its factorisations one after another (jaxprune.similarity._linalg.after).
SERIALISE_LAPACK: bool = version_tuple(jaxlib.__version__) < (0, 11, 1)


def bind_params(primitive: Any, params: dict) -> tuple[tuple, dict]:
    """``(subfuns, params)`` to re-bind ``primitive`` from an equation's ``params``:
    ``primitive.bind(*subfuns, *args, **params)``. jax < 0.7 returned the pair from ``get_bind_params``; later
    releases return the params alone (no sub-functions)."""
    got = primitive.get_bind_params(params)
    return got if isinstance(got, tuple) else ((), got)


def variable_value(variable: Any) -> Any:
    """The value of a flax ``nnx.Variable``: ``get_value()``, or ``.value`` on a flax without it."""
    get = getattr(variable, "get_value", None)
    return get() if get is not None else variable.value
