"""Every layer of one network against every layer of another, in one call.

``pairwise("linear_cka", xs, ys)`` → ``(Lx, Ly)``. Each metric is a pair ``(prepare, compare)``: ``prepare``
factorises one layer (centring, SVD, Gram …) and runs **once per layer**; ``compare`` maps two prepared layers to a
scalar. Layers are grouped by shape; within a group ``prepare`` is ``vmap``-ed, and each (x-group, y-group) block is
one ``vmap(vmap(compare))`` inside one jitted program — the only Python loop is over the (few) distinct shapes,
never over pairs. Two metrics have faster routes: linear CKA forms every cross product in one GEMM
(:func:`cka.linear_cka_all_pairs`); mean CCA and SVCCA on concrete arrays go through :mod:`.cca_pairs` (two jitted
programs — per-layer Gram, Cholesky and condition estimate, then CholeskyQR2 bases and all pairs with one GEMM —
with each layer's route chosen on the host in between; under a caller's ``jit`` they take the SVD route above).

Stacks: a layer given as ``(s, n, p)`` is a stack of ``s`` networks (e.g. IMP levels). If ``xs`` is stacked and
``ys`` is not, the result is ``(s, Lx, Ly)`` (every level against the same reference); if both are stacked (same
``s``), entry ``[i]`` compares stack member ``i`` of both; ``ys=None`` compares ``xs`` with itself.

Inside a caller's ``jit`` (tracers: values unchecked) a layer, or stack member, holding NaN/Inf is zeroed before the
shared products and its pairs come out NaN; every other pair keeps its value.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.similarity import _checks, _linalg, cca_pairs
from jaxprune.similarity.cca import Metric, mean_cca_metric, pwcca_metric, svcca_metric
from jaxprune.similarity.cka import linear_cka_all_pairs, linear_cka_metric, rbf_cka_metric
from jaxprune.similarity.nbs import nbs_metric

Array = jax.Array

# name → (factory, {option: (default, validator)}); every metric is a similarity (larger = more similar).
_OPTIONS: dict[str, tuple[Callable[..., Metric], dict[str, tuple[Any, Callable]]]] = {
    "mean_cca": (mean_cca_metric, {
        "truncate": (None, lambda v: _checks.fraction(v, "truncate", allow_none=True)),
        "epsilon": (None, _checks.epsilon)}),
    "svcca": (svcca_metric, {
        "keep_variance": (0.99, lambda v: _checks.fraction(v, "keep_variance")),
        "truncate": (None, lambda v: _checks.fraction(v, "truncate", allow_none=True)),
        "epsilon": (None, _checks.epsilon)}),
    "pwcca": (pwcca_metric, {"svcca_compatible": (False, bool), "epsilon": (None, _checks.epsilon)}),
    "linear_cka": (linear_cka_metric, {"debiased": (False, bool)}),
    "rbf_cka": (rbf_cka_metric, {"threshold": (1.0, lambda v: _checks.positive(v, "threshold")),
                                     "debiased": (False, bool)}),
    "nbs": (nbs_metric, {}),
}
# The registered names (a live view: :func:`register_similarity` adds to it).
SIMILARITIES = _OPTIONS.keys()

# label → (similarity name, options): the names the per-level analyses and the experiments' ``--metrics`` accept
# (:data:`jaxprune.analysis.SIMILARITY_METRICS` is this dict). Every similarity is its own preset.
PRESETS: dict[str, tuple[str, dict]] = {
    "mean_cca": ("mean_cca", {}), "svcca": ("svcca", {}), "pwcca": ("pwcca", {}),
    "pwcca_svcca": ("pwcca", {"svcca_compatible": True}),  # google/svcca's compute_pwcca
    "linear_cka": ("linear_cka", {}), "linear_cka_debiased": ("linear_cka", {"debiased": True}),
    "rbf_cka": ("rbf_cka", {}), "nbs": ("nbs", {})}


def register_similarity(name: str, factory: Callable[..., Metric],
                        options: dict[str, tuple[Any, Callable]] | None = None) -> None:
    """Add a similarity: ``factory(**options) -> (prepare, compare)`` (``prepare`` maps one ``(n, p)`` layer to its
    features, ``compare`` two prepared layers to a scalar, larger = more similar); ``options``: ``{option: (default,
    validator)}``, the validator returning the checked value or raising a one-line ``ValueError``. Afterwards
    :func:`metric`, :func:`pairwise`, the per-level analyses and the experiments' ``--metrics`` know ``name``.
    Use a cached factory (``functools.lru_cache``) so equal options give the same functions (one compilation)."""
    if not isinstance(name, str) or not name or name in _OPTIONS or name in PRESETS:
        raise ValueError(f"name={name!r}: expected a new non-empty similarity name (taken: {sorted(PRESETS)})")
    if not callable(factory):
        raise TypeError(f"factory: expected a callable returning (prepare, compare), got {type(factory).__name__}")
    spec = dict(options or {})
    bad = [k for k, v in spec.items() if not (isinstance(v, tuple) and len(v) == 2 and callable(v[1]))]
    if bad:
        raise ValueError(f"options: {bad} must map to (default, validator) pairs")
    _OPTIONS[name] = (factory, spec)
    PRESETS[name] = (name, {})


def register_preset(label: str, name: str, **options) -> None:
    """Name a similarity with fixed options for the analyses and the experiments, e.g.
    ``register_preset("linear_cka_debiased", "linear_cka", debiased=True)`` (options validated now)."""
    if not isinstance(label, str) or not label or label in PRESETS:
        raise ValueError(f"label={label!r}: expected a new non-empty preset name (taken: {sorted(PRESETS)})")
    _checked_options(name, options)
    PRESETS[label] = (name, dict(options))


def _checked_options(name: str, options: dict) -> dict:
    """Every option of the named similarity, validated, defaults filled in."""
    if name not in _OPTIONS:
        raise ValueError(f"metric={name!r}: expected one of {tuple(_OPTIONS)}")
    spec = _OPTIONS[name][1]
    unknown = set(options) - set(spec)
    if unknown:
        raise ValueError(f"metric {name!r}: unknown option(s) {sorted(unknown)}; expected a subset of {sorted(spec)}")
    return {k: check(options.get(k, default)) for k, (default, check) in spec.items()}


def metric(name: str, **options) -> Metric:
    """The ``(prepare, compare)`` pair of a registered similarity, e.g. ``metric("rbf_cka", threshold=0.5)``."""
    options = _checked_options(name, options)
    return _OPTIONS[name][0](**options)


def _groups(layers: Sequence[Array]) -> list[tuple[tuple, np.ndarray]]:
    """``[(shape, layer indices)]`` in first-appearance order."""
    out: dict[tuple, list[int]] = {}
    for i, a in enumerate(layers):
        out.setdefault(tuple(a.shape), []).append(i)
    return [(k, np.asarray(v)) for k, v in out.items()]


def _prepare(prepare: Callable, group: Array, stacked: bool):
    """Prepared features of a group of equal-shape layers ``(g, …)``; leading axes ``(g,)`` or ``(g, s)``."""
    f = jax.vmap(prepare)
    return (jax.vmap(f) if stacked else f)(group)


def _block(compare: Callable, fx, fy, x_stacked: bool, y_stacked: bool) -> Array:
    """``(g, h)`` or ``(s, g, h)`` block of ``compare`` between two prepared groups."""
    grid = jax.vmap(jax.vmap(compare, in_axes=(None, 0)), in_axes=(0, None))
    if not (x_stacked or y_stacked):
        return grid(fx, fy)
    return jax.vmap(grid, in_axes=(1 if x_stacked else None, 1 if y_stacked else None))(fx, fy)


def _linear_cka(prepare: Callable, xs: tuple, ys: tuple, same: bool, debiased: bool) -> Array:
    """Linear CKA of all pairs with every cross product in one GEMM (:func:`cka.linear_cka_all_pairs`)."""
    lapack = _linalg.Serial()  # the factorisations (an SVD when p > n) one at a time
    px = [lapack(prepare, x) for x in xs]
    return linear_cka_all_pairs(px, px if same else [lapack(prepare, y) for y in ys], debiased)


def _finite(layers: tuple) -> tuple[tuple, Array]:
    """Layers with every non-finite one (or stack member) zeroed, so that nothing leaks into other pairs through
    shared products, and the flags ``(L,)`` (stacks: ``(s, L)``): all entries finite."""
    ok = [jnp.all(jnp.isfinite(a), axis=(-2, -1)) for a in layers]
    return tuple(jnp.where(f[..., None, None], a, 0.0) for f, a in zip(ok, layers)), jnp.stack(ok, axis=-1)


@functools.partial(jax.jit, static_argnames=("metric", "x_stacked", "y_stacked", "same", "guard"))
def _pairwise(metric: Metric, xs: tuple, ys: tuple, x_stacked: bool, y_stacked: bool, same: bool,
              guard: bool = False) -> Array:
    """The ``(Lx, Ly)`` (or ``(s, Lx, Ly)``) matrix; ``guard``: NaN for exactly the pairs with a non-finite layer
    (on tracers, whose values were not checked)."""
    if not guard:
        return _pairs(metric, xs, ys, x_stacked, y_stacked, same)
    xs, fx = _finite(xs)
    ys, fy = (xs, fx) if same else _finite(ys)
    out = _pairs(metric, xs, ys, x_stacked, y_stacked, same)
    return jnp.where(fx[..., :, None] & fy[..., None, :], out, jnp.nan)


def _pairs(metric: Metric, xs: tuple, ys: tuple, x_stacked: bool, y_stacked: bool, same: bool) -> Array:
    prepare, compare = metric
    linear = {linear_cka_metric(debiased=d): d for d in (False, True)}  # keyword calls, as metric() makes
    if not (x_stacked or y_stacked) and metric in linear:
        return _linear_cka(prepare, xs, ys, same, debiased=linear[metric])
    lapack = _linalg.Serial()  # groups and blocks run one after another; each is one batched call

    def prepared(layers, stacked):
        return [(idx, lapack(lambda g: _prepare(prepare, g, stacked), jnp.stack([layers[i] for i in idx])))
                for _, idx in _groups(layers)]

    gx = prepared(xs, x_stacked)
    gy = gx if same else prepared(ys, y_stacked)
    stack = xs[0].shape[0] if x_stacked else (ys[0].shape[0] if y_stacked else None)
    out = jnp.zeros(((stack,) if stack else ()) + (len(xs), len(ys)), xs[0].dtype)
    for ix, fx in gx:
        for iy, fy in gy:
            block = lapack(lambda a, b: _block(compare, a, b, x_stacked, y_stacked), fx, fy)
            out = out.at[..., ix[:, None], iy[None, :]].set(block)
    return out


def _subspace_pairs(kind: str, xs: list, ys: list | None, sx: int | None, sy: int | None, options: dict) -> Array:
    """Mean CCA / SVCCA through :func:`cca_pairs.all_pairs` (``ys=None``: ``xs`` against itself); stacks become
    extra layers (one stack: its members against the other side's layers; two stacks: member by member)."""
    run = lambda a, b: cca_pairs.all_pairs(kind, a, b, **options)
    if sx is not None and (ys is None or sy is not None):  # member i against member i (or itself)
        return jnp.stack([run([x[i] for x in xs], None if ys is None else [y[i] for y in ys]) for i in range(sx)])
    if sx is None and sy is None:
        return run(xs, ys)
    if sy is not None:  # only ys stacked: transpose the problem
        return jnp.swapaxes(_subspace_pairs(kind, ys, xs, sy, None, options), 1, 2)
    flat = [x[i] for i in range(sx) for x in xs]  # member-major: row i·Lx + l
    return run(flat, ys).reshape(sx, len(xs), -1)


def pairwise(metric_name: str | Metric, xs: Sequence[Array], ys: Sequence[Array] | None = None, **options
             ) -> Array:
    """Similarity of every layer in ``xs`` with every layer in ``ys`` → ``(Lx, Ly)`` (or ``(s, Lx, Ly)`` for stacks).

    xs: list of ``(n, p_i)`` activations (or ``(s, n, p_i)`` stacks); ys: list of ``(n, q_j)`` (or stacks), or
    ``None`` for ``xs`` against itself. ``metric_name``: one of :data:`SIMILARITIES` (options as in the single-pair
    functions, e.g. ``debiased=True``), or a custom ``(prepare, compare)`` pair. Conv maps must be flattened first
    (:func:`flatten_conv`).

    Compiled once per set of layer shapes and options; on CPU the first mean CCA / SVCCA call can spend seconds
    compiling (14 layers up to 1000 wide: ~10 s against ~2.5 s for a compiled call; BUILD-notes). JAX's persistent
    compilation cache keeps the programs across sessions (~4 s then):
    ``jax.config.update("jax_compilation_cache_dir", path)`` — a user setting; the library sets no global state.
    """
    m = metric(metric_name, **options) if isinstance(metric_name, str) else metric_name
    if not isinstance(metric_name, str) and options:
        raise ValueError("options: only for named metrics; bake them into a custom (prepare, compare) pair")
    xs, sx = _checks.layers(xs, "xs")
    same = ys is None
    ys, sy = (xs, sx) if same else _checks.layers(ys, "ys")
    if sx is not None and sy is not None and sx != sy:
        raise ValueError(f"xs and ys are stacks of different sizes ({sx} vs {sy}); expected the same s")
    _checks.same_n(xs[0], ys[0], ("xs", "ys"))
    if options.get("debiased") and xs[0].shape[-2] < 4:
        raise ValueError(f"xs: debiased=True needs at least 4 samples, got {xs[0].shape[-2]}")
    traced = _checks.traced(*xs, *ys)
    if metric_name in cca_pairs.KINDS and not traced:
        # the fast route chooses each layer's factorisation on the host; under a caller's jit, the SVD route
        return _subspace_pairs(metric_name, xs, None if same else ys, sx, None if same else sy,
                               _checked_options(metric_name, options))
    return _pairwise(m, tuple(xs), tuple(ys), sx is not None, sy is not None, same, guard=traced)
