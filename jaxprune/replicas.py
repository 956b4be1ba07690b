"""K replicas (seeds) of one training run as a single compiled program.

A stacked tree has a leading replica axis on every leaf: ``(K, …)``. :func:`make_trainer` returns a
:class:`jaxprune.train.Trainer` with ``replicas=K`` whose step maps the single-run step over that axis, so
``train.run`` trains K states, each with its own data order (``data_key: (K, 2)``), dropout key, initial weights
and — because the mask lives in the optimizer state — its own pruning mask. The data set is shared (not copied).

Two layouts of the K replicas inside the program (``layout``):

* ``"vmap"``     — ``jax.vmap``: every matmul becomes one ``dot_general`` with a batch dimension;
* ``"unrolled"`` — the single-run step written out K times in one jitted function: K plain GEMMs per layer that
  XLA schedules freely (an earlier jaxlib ran batched ``dot_general`` slower than plain GEMMs on XLA:CPU; the current
  one does not: see the notes).

Replica ``r`` starts from the single run of seed ``r`` (same initial weights, same data order). Under ``"unrolled"``
it stays bit-identical to that run; under ``"vmap"`` a convolution is lowered as one batched op that rounds
differently, so conv nets agree with separate runs only up to float32 rounding amplified by training (LeNet5:
weights 0.01 apart after 200 steps; ``python -m benchmarks.replicas --agreement``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxprune import train

PyTree = Any
LAYOUTS = ("vmap", "unrolled")


def stack(trees: Sequence[PyTree]) -> PyTree:
    """``[tree_0, …, tree_{K-1}]`` → one tree with leaves ``(K, …)``."""
    if not trees:
        raise ValueError("trees: expected at least one tree to stack")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of :func:`stack`."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    k = int(leaves[0].shape[0])
    return [treedef.unflatten([leaf[r] for leaf in leaves]) for r in range(k)]


def index(tree: PyTree, r: int) -> PyTree:
    """Replica ``r`` of a stacked tree."""
    return jax.tree_util.tree_map(lambda x: x[r], tree)


def num_replicas(tree: PyTree) -> int:
    return int(jax.tree_util.tree_leaves(tree)[0].shape[0])


def map_host(fn: Callable, *trees: PyTree) -> PyTree:
    """``stack([fn(*(t[r] for t in trees)) for r])``: for host-side per-replica work (mask ranking, reports)."""
    return stack([fn(*(index(t, r) for t in trees)) for r in range(num_replicas(trees[0]))])


def _unrolled(fn: Callable, in_axes: tuple) -> Callable:
    """Like ``jax.vmap(fn, in_axes)`` (axes 0 or None) but written out as a Python loop inside the trace."""

    def call(*args):
        k = next(num_replicas(a) for a, ax in zip(args, in_axes) if ax == 0)
        outs = [fn(*(index(a, r) if ax == 0 else a for a, ax in zip(args, in_axes))) for r in range(k)]
        return stack(outs)

    return call


def make_trainer(model: nn.Module, tx: optax.GradientTransformation, num_replicas: int, mesh=None,
                 layout: str = "vmap", augment=None, loss=None, train_arg: bool = True) -> train.Trainer:
    """A trainer for stacked states ``(K, …)``: ``step(state, x_all, y_all, idx (K, b), key (K, 2))``,
    ``scan(…, idx (K, s, b), key (K, 2))``, ``evaluate(variables (K, …), x, y, weight) -> ((K,), (K,))``.
    ``augment``, ``loss``, ``train_arg``: as in :func:`jaxprune.train.make_trainer` (each replica augments with its
    own key)."""
    if not (isinstance(num_replicas, int) and num_replicas >= 1):
        raise ValueError(f"num_replicas={num_replicas!r}: expected an integer >= 1")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    step, _, evaluate = train.step_functions(model, tx, mesh, augment, loss=loss, train_arg=train_arg)
    batched = jax.vmap if layout == "vmap" else _unrolled
    rstep = batched(step, in_axes=(0, None, None, 0, 0))

    def scan(state, x_all, y_all, idx, key):  # idx: (K, s, b) -> scan over s of the K-replica step
        state, (loss, correct) = jax.lax.scan(lambda s, i: rstep(s, x_all, y_all, i, key), state,
                                              jnp.swapaxes(idx, 0, 1))
        return state, (loss.T, correct.T)  # (K, s)

    revaluate = batched(evaluate, in_axes=(0, None, None, None))
    return train.Trainer(jax.jit(rstep), jax.jit(scan), jax.jit(revaluate), mesh=mesh, replicas=num_replicas)
