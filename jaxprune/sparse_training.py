"""Sparsity during training as optax transformations: gradual pruning, SET, RigL and static sparse training.

Each builder wraps an optax optimizer in :func:`jaxprune.masks.masked` and adds a mask-update rule; the result is
an ordinary ``optax.GradientTransformation`` usable in any loop (``tx.update(grads, state, params)``; ``params`` is
required). Its state is a :class:`SparseState` NamedTuple — the step counter, a PRNG key and the masked
optimizer's :class:`~jaxprune.masks.MaskedState` (mask + inner state) — so an orbax checkpoint of the optimizer
state resumes masks and schedules exactly. Mask updates run under ``lax.cond``: one compiled step serves every
step. The returned updates set every pruned weight to exactly 0 (``update = -w``), so after ``apply_updates`` the
params carry the mask; call :func:`apply_mask` once after ``init`` so the first forward pass is sparse too::

    prunable = masks.prunable_leaves(params, exclude=("dense_2",))
    tx = sparse_training.dynamic(optax.sgd(0.1), prunable, sparse_training.Dynamic("rigl", 0.9, end_step=3000), key)
    opt_state = tx.init(params)
    params = sparse_training.apply_mask(params, opt_state)
    ...  # any loop: updates, opt_state = tx.update(grads, opt_state, params); params = optax.apply_updates(...)
    sparse_training.report(opt_state, prunable)["density"]  # ≈ 0.1 (exact ceil counts per layer)

* **Gradual** (:class:`Gradual`; Zhu & Gupta 2017): at steps ``t = t0 + kΔt`` (``k = 0..n``, ``t0 + nΔt`` the
  end step) every prunable leaf is pruned to ``s_k = s_f + (s_i − s_f)(1 − k/n)^power`` (power 3 in the paper) by
  a score (default ``|w|``; any ``score_fn(params, grads)``), under any registered pattern
  (``jaxprune.patterns``: unstructured, ``n:m``, blocks) with uniform or ERK layer sparsities. Pruned weights stay
  pruned (their score is ``-inf``); the gradient step is taken with the new mask.
* **SET / RigL** (:class:`Dynamic`; Mocanu et al. 2018, Evci et al. 2020): the mask starts random at the layer
  sparsities; at steps ``t = kΔT``, ``0 < t < end_step``, each layer drops the ``ceil(f_t · active)`` active
  weights of smallest ``|w|`` and grows as many among the rest (the just-dropped included): at random (SET) or by
  the largest dense-gradient magnitude (RigL), ``f_t = f_0/2 · (1 + cos(π t / end_step))``. Grown weights start
  at exactly 0 with their optimizer moments reset; every layer keeps its number of weights exactly. On a
  mask-update step no gradient step is taken (RigL's Algorithm 1). **Static**: the random initial mask, never
  updated.
* **Counts** are ``conventions.n_to_prune`` (``ceil``, float64) per leaf, computed on the host for every update
  of the schedule when the step is traced (shapes are static) and looked up by the update index, so the densities
  equal the closed form at every step; ties follow the house rule (earlier kept; ``jaxprune.patterns``).
* **Layer sparsities** (:data:`DISTRIBUTIONS`): ``"uniform"`` (every prunable leaf at ``s``) or ``"erk"``
  (Erdős–Rényi-kernel: density ``ε · Σ shape / Π shape``, ``ε`` such that the prunable weights keep ``1 − s``
  overall; a layer whose density would exceed 1 is made dense and ``ε`` solved again for the rest).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import conventions, masks, patterns

PyTree = Any
Array = jax.Array
METHODS = ("static", "set", "rigl")
DISTRIBUTIONS: dict[str, Callable[[dict, float], dict]] = {}

__all__ = ["SparseState", "Gradual", "Dynamic", "DISTRIBUTIONS", "register_distribution", "layer_sparsities",
           "erk_densities", "gradual", "dynamic", "apply_mask", "mask_of", "report"]


class SparseState(NamedTuple):
    step: Array  # () int32: optimizer steps taken; the schedules read it
    key: Array  # (2,) uint32: the random initial mask's and SET's growth stream (fold_in(key, step))
    masked: masks.MaskedState  # the mask and the wrapped optimizer's state


# ----------------------------------------------------------------------------------------- layer sparsities
def register_distribution(name: str):
    """Decorator: ``@register_distribution("erk")`` on ``fn(shapes: {path: shape}, sparsity) -> {path: sparsity}``."""

    def deco(fn):
        DISTRIBUTIONS[name] = fn
        return fn

    return deco


@register_distribution("uniform")
def _uniform(shapes: dict, sparsity: float) -> dict:
    return {path: float(sparsity) for path in shapes}


def erk_densities(shapes: Mapping[str, tuple], sparsity: float) -> dict[str, float]:
    """Erdős–Rényi-kernel densities ``{path: density}`` (Evci et al. 2020): ``ε · Σ shape / Π shape`` for every
    leaf, ``ε`` solving ``Σ density_l N_l = (1 − sparsity) Σ N_l``; leaves whose density would exceed 1 are dense
    (the largest ratio first) and ``ε`` is solved again for the others."""
    n = {p: math.prod(s) for p, s in shapes.items()}
    raw = {p: sum(s) / math.prod(s) for p, s in shapes.items()}
    dense: set[str] = set()
    target = (1.0 - float(sparsity)) * sum(n.values())
    while True:
        rest = [p for p in shapes if p not in dense]
        if not rest:
            return {p: 1.0 for p in shapes}
        eps = (target - sum(n[p] for p in dense)) / sum(raw[p] * n[p] for p in rest)
        top = max(raw[p] for p in rest)
        if eps * top <= 1.0:
            return {p: (1.0 if p in dense else eps * raw[p]) for p in shapes}
        dense |= {p for p in rest if raw[p] == top}


@register_distribution("erk")
def _erk(shapes: dict, sparsity: float) -> dict:
    return {p: min(max(1.0 - d, 0.0), 1.0) for p, d in erk_densities(shapes, sparsity).items()}


def layer_sparsities(params: PyTree, prunable: PyTree, sparsity: float, distribution: str = "uniform") -> dict:
    """``{path: sparsity}`` of every prunable leaf under ``distribution`` for an overall ``sparsity`` in [0, 1]."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution={distribution!r}: expected one of {sorted(DISTRIBUTIONS)}")
    conventions.n_to_prune(sparsity, 0)  # validates the fraction (ValueError naming it)
    return DISTRIBUTIONS[distribution](_shapes(params, prunable), sparsity)


def _shapes(params: PyTree, prunable: PyTree) -> dict[str, tuple]:
    masks.check_trees(params, prunable=prunable)
    return {masks.path_str(path): tuple(np.shape(x)) for (path, x), p in
            zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(prunable)) if p}


# ----------------------------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class Gradual:
    """Zhu & Gupta's schedule: ``initial_sparsity → final_sparsity`` at ``begin_step, begin_step + frequency, …,
    end_step`` (``end_step − begin_step`` a multiple of ``frequency``); ``pattern`` / ``options`` as in
    :func:`jaxprune.patterns.prune` (for ``"n:m"`` the final sparsity must be ``1 − n/m``, uniform layers)."""

    final_sparsity: float
    begin_step: int
    end_step: int
    frequency: int
    initial_sparsity: float = 0.0
    power: int = 3
    pattern: str = "unstructured"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    distribution: str = "uniform"

    def __post_init__(self):
        for name in ("initial_sparsity", "final_sparsity"):
            if not 0 <= getattr(self, name) <= 1:  # also refuses NaN
                _bad(name, getattr(self, name), "a fraction in [0, 1]")
        if not (isinstance(self.frequency, int) and self.frequency >= 1):
            _bad("frequency", self.frequency, "an int >= 1 (steps between mask updates)")
        if not (0 <= self.begin_step <= self.end_step and (self.end_step - self.begin_step) % self.frequency == 0):
            _bad("end_step", self.end_step, f"begin_step={self.begin_step} + a multiple of frequency="
                 f"{self.frequency} (0 <= begin_step <= end_step)")
        if self.initial_sparsity > self.final_sparsity:
            _bad("initial_sparsity", self.initial_sparsity, f"<= final_sparsity={self.final_sparsity}")
        if not (isinstance(self.power, int) and self.power >= 1):
            _bad("power", self.power, "an int >= 1 (3: Zhu & Gupta)")
        patterns.get(self.pattern)
        if self.distribution not in DISTRIBUTIONS:
            _bad("distribution", self.distribution, f"one of {sorted(DISTRIBUTIONS)}")

    @property
    def updates(self) -> int:
        """``n + 1``: the number of mask updates."""
        return (self.end_step - self.begin_step) // self.frequency + 1

    def sparsity(self, k: int) -> float:
        """``s_k`` (float64) after the ``k``-th update, ``k = 0..n``."""
        n = self.updates - 1
        frac = 0.0 if n == 0 else 1.0 - k / n  # a single update (begin = end) prunes to the final sparsity
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * frac ** self.power


@dataclasses.dataclass(frozen=True)
class Dynamic:
    """Sparse training at a fixed ``sparsity``: ``method`` ``"static"``, ``"set"`` or ``"rigl"``; masks updated
    every ``interval`` steps before ``end_step`` (RigL: 75 % of training), dropping a cosine-decayed fraction
    starting at ``drop_fraction`` (0.3 in RigL) of each layer's active weights."""

    method: str
    sparsity: float
    distribution: str = "erk"
    interval: int = 100
    end_step: int = 0
    drop_fraction: float = 0.3

    def __post_init__(self):
        if self.method not in METHODS:
            _bad("method", self.method, f"one of {METHODS}")
        if not 0 <= self.sparsity < 1:
            _bad("sparsity", self.sparsity, "a fraction in [0, 1)")
        if self.distribution not in DISTRIBUTIONS:
            _bad("distribution", self.distribution, f"one of {sorted(DISTRIBUTIONS)}")
        if not (isinstance(self.interval, int) and self.interval >= 1):
            _bad("interval", self.interval, "an int >= 1 (steps between mask updates)")
        if self.method != "static" and not (isinstance(self.end_step, int) and self.end_step > self.interval):
            _bad("end_step", self.end_step, f"an int > interval={self.interval} (no mask update from then on)")
        if not 0 <= self.drop_fraction <= 1:
            _bad("drop_fraction", self.drop_fraction, "a fraction in [0, 1]")

    @property
    def updates(self) -> int:
        """Mask updates: at ``t = kΔT`` for ``k = 1..updates``, ``t < end_step``."""
        return 0 if self.method == "static" else (self.end_step - 1) // self.interval

    def fraction(self, step: int) -> float:
        """The drop fraction at ``step``: ``f_0/2 · (1 + cos(π step / end_step))``."""
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * step / self.end_step))


def _bad(name: str, value: Any, expected: str):
    raise ValueError(f"{name}={value!r}: expected {expected}")


# ----------------------------------------------------------------------------------------------- count tables
def _gradual_table(params: PyTree, prunable: PyTree, config: Gradual) -> np.ndarray:
    """``(updates, prunable leaves) int32``: units each leaf has pruned after update ``k`` (float64 on the host)."""
    shapes = _shapes(params, prunable)
    opts = dict(config.options)
    if config.pattern == "n:m":
        want = 1 - opts.get("n", 0) / opts.get("m", 1)
        if abs(config.final_sparsity - want) > 1e-9 or config.distribution != "uniform":
            raise ValueError(f"final_sparsity={config.final_sparsity}: gradual pruning into n:m={opts.get('n')}:"
                             f"{opts.get('m')} needs final_sparsity = 1 - n/m = {want} and distribution='uniform'")
    rows = []
    for k in range(config.updates):
        sp = DISTRIBUTIONS[config.distribution](shapes, config.sparsity(k))
        row = []
        for path, shape in shapes.items():
            try:
                row.append(patterns.pruned_count(config.pattern, sp[path], shape, **opts))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}: {e}") from None
        rows.append(row)
    return np.asarray(rows, np.int32).reshape(config.updates, len(shapes))


def _initial_counts(params: PyTree, prunable: PyTree, config: Dynamic) -> np.ndarray:
    """``(prunable leaves,) int64``: weights each leaf has pruned throughout."""
    shapes = _shapes(params, prunable)
    sp = DISTRIBUTIONS[config.distribution](shapes, config.sparsity)
    return np.asarray([conventions.n_to_prune(sp[p], math.prod(s)) for p, s in shapes.items()], np.int64)


def _drop_table(params: PyTree, prunable: PyTree, config: Dynamic) -> np.ndarray:
    """``(updates + 1, prunable leaves) int32``: row ``k`` the weights each leaf drops (and grows) at ``t = kΔT``
    (row 0 unused): ``ceil(f_t · active)``."""
    sizes = np.asarray([math.prod(s) for s in _shapes(params, prunable).values()], np.int64)
    active = sizes - _initial_counts(params, prunable, config)
    rows = [np.zeros_like(active)] + [conventions.n_to_prune(config.fraction(k * config.interval), active)
                                      for k in range(1, config.updates + 1)]
    return np.asarray(rows, np.int32).reshape(config.updates + 1, len(sizes))


# ----------------------------------------------------------------------------------------------- helpers
def _need(params: PyTree | None) -> PyTree:
    if params is None:
        raise ValueError("params: sparse training needs them; call tx.update(grads, state, params)")
    return params


def _prunable_list(prunable: PyTree) -> list[bool]:
    return [bool(p) for p in jax.tree_util.tree_leaves(prunable)]


def _zero_pruned(updates: PyTree, params: PyTree, mask: PyTree, prunable: PyTree) -> PyTree:
    """``updates`` with ``-w`` wherever ``mask`` prunes a prunable weight: the step leaves it at exactly 0."""
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    out = [jnp.where(m, u, -p) if pr else u for u, p, m, pr in
           zip(leaves, jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(mask), _prunable_list(prunable))]
    return treedef.unflatten(out)


def apply_mask(params: PyTree, state: SparseState) -> PyTree:
    """``params`` with the weights the state's mask prunes set to 0 (call once after ``tx.init``)."""
    return masks.apply_mask(params, mask_of(state))


def mask_of(state: SparseState) -> PyTree:
    """The current mask (bool tree like the params)."""
    if not isinstance(state, SparseState):
        raise TypeError(f"state: expected a jaxprune.sparse_training.SparseState, got {type(state).__name__}")
    return state.masked.mask


def report(state: SparseState, prunable: PyTree, pattern: str = "unstructured",
           options: Mapping | None = None) -> dict:
    """:func:`jaxprune.patterns.report` of the state's mask (densities, the pattern, conformity per leaf)."""
    return patterns.report(mask_of(state), prunable, pattern, dict(options or {}))


# ----------------------------------------------------------------------------------------------- gradual
def gradual(inner: optax.GradientTransformation, prunable: PyTree, config: Gradual,
            score_fn: Callable[[PyTree, PyTree], PyTree] | None = None) -> optax.GradientTransformation:
    """``inner`` (any optax optimizer), masked, with Zhu & Gupta's gradual pruning (:class:`Gradual`);
    ``score_fn(params, grads) -> scores`` (default ``|w|``): the lowest go. ``prunable``: bool tree as in
    ``jaxprune.masks``."""
    if not isinstance(config, Gradual):
        raise TypeError(f"config: expected a sparse_training.Gradual, got {type(config).__name__}")
    tx = masks.masked(inner)
    score_fn = score_fn or (lambda params, grads: jax.tree_util.tree_map(jnp.abs, params))
    opts = dict(config.options)

    def init(params):
        _gradual_table(params, prunable, config)  # refuses leaves the pattern cannot tile, before any step
        return SparseState(jnp.zeros((), jnp.int32), jax.random.PRNGKey(0), tx.init(params))

    def update(grads, state, params=None):
        params = _need(params)
        table = jnp.asarray(_gradual_table(params, prunable, config))
        t = state.step - config.begin_step
        do = (t >= 0) & (t % config.frequency == 0) & (state.step <= config.end_step)
        k = jnp.clip(t // config.frequency, 0, config.updates - 1)

        def prune(ms):
            scores = score_fn(params, grads)
            new = patterns.prune_counts(scores, ms.mask, prunable, table[k], config.pattern, opts)
            return masks.with_mask(tx, ms, new)

        ms = jax.lax.cond(do, prune, lambda ms: ms, state.masked)
        updates, ms = tx.update(grads, ms, params)
        return _zero_pruned(updates, params, ms.mask, prunable), SparseState(state.step + 1, state.key, ms)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------------------------- SET / RigL
INIT_STREAM, GROW_STREAM = 0x494E4954, 0x47524F57  # fold_in tags: the initial mask's and SET's growth keys


def _random_scores(key: Array, tree: PyTree) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef.unflatten([jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(x))
                              for i, x in enumerate(leaves)])


def _rewire(w: Array, grow_score: Array, m: Array, k: Array) -> tuple[Array, Array]:
    """One leaf: drop the ``k`` active weights of smallest ``|w|``, grow the ``k`` highest ``grow_score`` among the
    rest (the just-dropped included); ``(new mask, grown)``, ``sum(new) == sum(m)``."""
    n = w.size
    active = jnp.sum(m, dtype=jnp.int32)
    unstructured = patterns.PATTERNS["unstructured"]
    kept = m & unstructured.select(jnp.where(m, jnp.abs(w), -jnp.inf), n - active + k)
    grown = unstructured.select(jnp.where(kept, -jnp.inf, grow_score), n - k) & ~kept
    return kept | grown, grown


def _raw_key(key: Array) -> Array:
    """A ``(2,) uint32`` key (a typed ``jax.random.key`` is unwrapped), as orbax stores it."""
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return jnp.asarray(key)


def dynamic(inner: optax.GradientTransformation, prunable: PyTree, config: Dynamic,
            key: Array) -> optax.GradientTransformation:
    """``inner`` (any optax optimizer), masked, with static, SET or RigL sparse training (:class:`Dynamic`);
    ``key`` draws the initial random mask (exact counts per layer) and SET's growth."""
    if not isinstance(config, Dynamic):
        raise TypeError(f"config: expected a sparse_training.Dynamic, got {type(config).__name__}")
    tx = masks.masked(inner)
    unstructured = patterns.PATTERNS["unstructured"]

    def init(params):
        ms = tx.init(params)
        counts = iter(_initial_counts(params, prunable, config))
        scores = _random_scores(jax.random.fold_in(key, INIT_STREAM), params)
        mask = jax.tree_util.tree_map(lambda s, m, p: unstructured.select(s, next(counts)) if p else m,
                                      scores, ms.mask, prunable)
        return SparseState(jnp.zeros((), jnp.int32), _raw_key(key), masks.with_mask(tx, ms, mask))

    def descend(grads, state, params):
        updates, ms = tx.update(grads, state.masked, params)
        return _zero_pruned(updates, params, ms.mask, prunable), ms

    def rewire(grads, state, params):
        table = jnp.asarray(_drop_table(params, prunable, config))
        counts = iter(table[jnp.clip(state.step // config.interval, 0, config.updates)])
        if config.method == "rigl":
            grow = jax.tree_util.tree_map(jnp.abs, grads)
        else:
            grow = _random_scores(jax.random.fold_in(jax.random.fold_in(state.key, GROW_STREAM), state.step), params)
        pairs = jax.tree_util.tree_map(lambda w, g, m, p: _rewire(w, g, m, next(counts)) if p else (m, m & False),
                                       params, grow, state.masked.mask, prunable)
        is_pair = lambda x: isinstance(x, tuple)
        new = jax.tree_util.tree_map(lambda x: x[0], pairs, is_leaf=is_pair)
        grown = jax.tree_util.tree_map(lambda x: x[1], pairs, is_leaf=is_pair)
        settled = jax.tree_util.tree_map(lambda a, g: a & ~g, new, grown)  # keep value and moments
        ms = masks.with_mask(tx, state.masked, settled)._replace(mask=new)
        updates = jax.tree_util.tree_map(lambda p, s: jnp.where(s, jnp.zeros_like(p), -p), params, settled)
        return updates, ms

    def update(grads, state, params=None):
        params = _need(params)
        if config.method == "static":
            updates, ms = descend(grads, state, params)
        else:
            t = state.step
            do = (t > 0) & (t % config.interval == 0) & (t < config.end_step)
            updates, ms = jax.lax.cond(do, rewire, descend, grads, state, params)
        return updates, SparseState(state.step + 1, state.key, ms)

    return optax.GradientTransformation(init, update)
