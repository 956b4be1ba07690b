"""What pruning does to a network, as small functions over pytrees: linear mode connectivity, mask overlap, and
layer similarity to the dense network.

* **Linear mode connectivity / instability** (Frankle et al. 2020): :func:`interpolation_curve` evaluates the
  networks on the straight line ``(1 − α)·a + α·b`` between two parameter pytrees (jitted: one program for all
  ``α``); :func:`barrier` is the largest error on the path minus the mean of the two end points' errors (0 for a
  network with itself; Frankle et al.'s *instability*).
* **Mask overlap**: :func:`overlap` — per prunable leaf and overall, the Jaccard index ``|A∩B| / |A∪B|`` and the
  kept fraction ``|A∩B| / |A|`` (the fraction of ``a``'s survivors that ``b`` keeps); :func:`expected_random_overlap`
  and :func:`random_overlap_like` — what uniformly random masks of the same sizes give (derivation below).
* **Similarity to the dense network**: :func:`similarity_to_dense` — every layer of one network against the same
  layer of another, through :func:`jaxprune.similarity.pairwise`.

Random-mask baselines. ``n`` weights; mask ``A`` keeps ``a`` of them, ``B`` keeps ``b``; ``I = |A∩B|``.

* *Independent masks* (``B`` uniform among the size-``b`` subsets, whatever ``A`` is — e.g. two seeds, or a
  control mask drawn like :func:`jaxprune.masks.random_like`): ``I`` is hypergeometric, ``E[I] = a·b/n = n·p·q``
  (``p = a/n``, ``q = b/n``), ``Var[I] = a·b·(n−a)·(n−b) / (n²·(n−1))``. (Independent Bernoulli masks of densities
  ``p``, ``q`` give the same mean ``n·p·q`` and variance ``n·p·q·(1 − p·q)``.) The expected kept fraction is
  ``E[I]/a = q``; the expected Jaccard ``E[I/(a+b−I)]`` is summed exactly over the hypergeometric pmf (within ±12
  standard deviations of the mean, where all but < 1e-30 of the mass lies).
* *Nested masks* (``B`` a uniformly random size-``b`` subset of ``A``, ``b ≤ a``: what any pruning of ``A``'s
  survivors gives, IMP's magnitude pruning included): ``I = b`` always, Jaccard ``= kept fraction = b/a``. So the
  overlap of consecutive IMP levels is *fixed* by the densities (IMP never revives a weight); the informative
  comparisons are per layer, and between independent runs.
* *Several leaves* (same per-leaf counts, leaves independent): ``E[I]`` and ``Var[I]`` add up; the overall expected
  Jaccard is the second-order delta-method value ``f(μ) + f''(μ)·σ²/2`` of ``f(I) = I/(S − I)``, ``S = Σ(a+b)``
  (relative error ``O(σ³/μ³)``, below 1e-6 for layers of a few hundred kept weights).

Conventions: masks are bool pytrees (:mod:`jaxprune.masks`); ``prunable`` is a tree of Python bools (``None``:
every leaf); an empty union gives Jaccard 1 and an empty ``A`` a kept fraction of 1 (the two empty sets are equal).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import masks, similarity

PyTree = Any
Array = jax.Array
ApplyFn = Callable[[PyTree, Array], Array]  # (params or variables, x (b, …)) -> logits (b, classes)

# label -> (jaxprune.similarity name, options): the names the analyses and experiments accept; the similarity
# registry's presets themselves (similarity.register_similarity / register_preset add to it)
SIMILARITY_METRICS: dict[str, tuple[str, dict]] = similarity.PRESETS
DEFAULT_METRICS = ("linear_cka", "pwcca", "nbs")
CCA_FAMILY = ("mean_cca", "svcca", "pwcca")
TOKEN_MODES = ("mean", "flatten")  # token representations (n, tokens, d): the default first


# ----------------------------------------------------------------------------------------------- interpolation
class InterpolationCurve(NamedTuple):
    """Evaluation along the straight path from ``a`` (``α = 0``) to ``b`` (``α = 1``); every field ``(n_points,)``."""

    alphas: Array
    accuracy: Array  # weighted fraction of correct predictions
    error: Array  # 1 − accuracy
    loss: Array  # weighted mean softmax cross-entropy


def make_batches(x: Array, y: Array, batch_size: int = 1000) -> tuple[Array, Array, Array]:
    """``(x (m, b, …), y (m, b), weight (m, b))`` from ``x (n, …)``, ``y (n,)``: ``m = ceil(n / b)`` batches of
    ``b = min(batch_size, n)``, the last zero-padded with weight 0 (so every example counts once)."""
    n = int(np.shape(x)[0])
    if n < 1 or np.shape(y)[:1] != (n,):
        raise ValueError(f"x, y: expected n >= 1 examples and labels (n,), got shapes {np.shape(x)}, {np.shape(y)}")
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1")
    b = min(int(batch_size), n)
    m = -(-n // b)
    pad = m * b - n
    x, y = jnp.asarray(x), jnp.asarray(y)
    w = jnp.concatenate([jnp.ones((n,), jnp.float32), jnp.zeros((pad,), jnp.float32)])
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    y = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)])
    return x.reshape((m, b) + x.shape[1:]), y.reshape(m, b), w.reshape(m, b)


def interpolate(params_a: PyTree, params_b: PyTree, alpha: Array | float) -> PyTree:
    """``(1 − α)·a + α·b`` leaf by leaf (exactly ``a`` at ``α = 0`` and ``b`` at ``α = 1``, in each leaf's dtype).
    Non-float leaves (step counts, …) are taken from ``a``. Trees of another structure, or a leaf of another
    shape, are a ValueError naming ``params_b`` and the leaf (never a broadcast)."""
    masks._check_structure("params_a", params_a, "params_b", params_b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params_a), jax.tree_util.tree_leaves(params_b)):
        if np.shape(x) != np.shape(y):
            raise ValueError(f"params_b: leaf {masks.path_str(path)!r} has shape {np.shape(y)}; expected "
                             f"{np.shape(x)}, the shape of that leaf of params_a")

    def mix(x, y):
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return x
        a = jnp.asarray(alpha, jnp.result_type(x))
        return (1 - a) * x + a * y

    return masks._map(mix, params_a, params_b, ("params_a", "params_b"))


def _check_batches(batches) -> tuple[Array, Array, Array]:
    if not isinstance(batches, (tuple, list)) or len(batches) not in (2, 3):
        raise ValueError("batches: expected (x (m, b, …), y (m, b)) or (x, y, weight (m, b)), stacked along a "
                         "leading batch axis (see make_batches)")
    x, y = batches[0], batches[1]
    w = batches[2] if len(batches) == 3 else jnp.ones(np.shape(y), jnp.float32)
    if np.ndim(y) != 2 or np.shape(x)[:2] != np.shape(y) or np.shape(w) != np.shape(y):
        raise ValueError(f"batches: expected x (m, b, …), y (m, b), weight (m, b); got shapes {np.shape(x)}, "
                         f"{np.shape(y)}, {np.shape(w)} (see make_batches)")
    return x, y, w


def _evaluate(apply_fn: ApplyFn, params: PyTree, x: Array, y: Array, w: Array) -> tuple[Array, Array, Array]:
    """``(sum of weighted losses, weighted correct count, total weight)`` over stacked batches (one ``lax.scan``)."""
    def body(acc, batch):
        xb, yb, wb = batch
        logits = apply_fn(params, xb)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        correct = (jnp.argmax(logits, -1) == yb).astype(jnp.float32)
        return (acc[0] + jnp.sum(loss * wb), acc[1] + jnp.sum(correct * wb), acc[2] + jnp.sum(wb)), None

    zero = jnp.zeros((), jnp.float32)
    (loss, correct, total), _ = jax.lax.scan(body, (zero, zero, zero), (x, y, w))
    return loss, correct, total


def _alphas(n_points: int) -> Array:
    """``i / (n − 1)`` for ``i = 0 … n − 1`` (exactly 0 and 1 at the ends)."""
    return jnp.arange(n_points, dtype=jnp.float32) / (n_points - 1)


_evaluate_jit = jax.jit(_evaluate, static_argnums=0)


def _point(apply_fn, params_a, params_b, x, y, w, alpha):
    loss, correct, total = _evaluate(apply_fn, interpolate(params_a, params_b, alpha), x, y, w)
    return correct / total, loss / total


@functools.partial(jax.jit, static_argnames=("apply_fn", "n_points"))
def _curve(apply_fn: ApplyFn, params_a: PyTree, params_b: PyTree, x, y, w, n_points: int) -> InterpolationCurve:
    alphas = _alphas(n_points)
    acc, loss = jax.lax.map(lambda a: _point(apply_fn, params_a, params_b, x, y, w, a), alphas)
    return InterpolationCurve(alphas, acc, 1.0 - acc, loss)


def interpolation_curve(apply_fn: ApplyFn, params_a: PyTree, params_b: PyTree, batches, n_points: int = 11, *,
                        recalibrate: Callable[[PyTree], PyTree] | None = None) -> InterpolationCurve:
    """Accuracy, error and loss at ``n_points`` equally spaced ``α ∈ [0, 1]`` on the path ``(1 − α)·a + α·b``.

    ``apply_fn(params, x) -> logits (b, classes)`` (e.g. ``models.apply_fn(model)`` with variables for
    ``params``; pass the same function object every time to reuse the compiled program). ``batches``: ``(x, y)`` or
    ``(x, y, weight)`` stacked ``(m, b, …)`` (:func:`make_batches`). The end points are the two networks themselves,
    so ``accuracy[0]`` and ``accuracy[-1]`` are their own accuracies on ``batches``. Jitted, and callable inside a
    caller's ``jit``. ``recalibrate(params) -> params`` (e.g. BatchNorm statistics re-estimated on training data,
    :func:`jaxprune.train.recalibrate_batchnorm`; interpolated running statistics do not describe the interpolated
    network) is applied to every interpolated point, in a Python loop over ``α`` (not jittable).
    """
    if not (isinstance(n_points, (int, np.integer)) and n_points >= 2):
        raise ValueError(f"n_points={n_points!r}: expected an integer >= 2 (the two end points included)")
    x, y, w = _check_batches(batches)
    ta, tb = jax.tree_util.tree_structure(params_a), jax.tree_util.tree_structure(params_b)
    if ta != tb:
        raise ValueError(f"params_b: expected the tree structure of params_a ({ta}), got {tb}")
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(params_a), jax.tree_util.tree_leaves(params_b)):
        if np.shape(u) != np.shape(v):
            raise ValueError(f"params_b: leaf {masks.path_str(path)!r} has shape {np.shape(v)}; expected "
                             f"{np.shape(u)}, as in params_a")
    if recalibrate is None:
        return _curve(apply_fn, params_a, params_b, x, y, w, int(n_points))
    alphas = _alphas(int(n_points))
    acc, loss = [], []
    for a in alphas:
        l, c, t = _evaluate_jit(apply_fn, recalibrate(interpolate(params_a, params_b, a)), x, y, w)
        acc.append(c / t)
        loss.append(l / t)
    acc = jnp.stack(acc)
    return InterpolationCurve(alphas, acc, 1.0 - acc, jnp.stack(loss))


def barrier(curve: InterpolationCurve | Array | Sequence[float], *, metric: str = "error") -> Array:
    """Largest value on the path minus the mean of the end points' values: ``max(e) − (e[0] + e[-1]) / 2``.

    ``curve``: an :class:`InterpolationCurve` (``metric`` picks ``"error"`` or ``"loss"``) or the values ``(n,)``
    themselves (then ``metric`` only names them in errors). ``≥ 0``; exactly 0 for a network with itself.
    Jittable; a concrete curve holding NaN or ±Inf is a ValueError naming ``curve`` (traced: the barrier is NaN)."""
    if metric not in ("error", "loss"):
        raise ValueError(f"metric={metric!r}: expected 'error' or 'loss'")
    values = getattr(curve, metric) if isinstance(curve, InterpolationCurve) else jnp.asarray(curve)
    if values.ndim != 1 or values.shape[0] < 2:
        raise ValueError(f"curve: expected values along the path (n,) with n >= 2, got shape {values.shape}")
    if not isinstance(values, jax.core.Tracer) and not np.isfinite(np.asarray(values)).all():  # host check
        raise ValueError(f"curve: the {metric} along the path holds NaN or ±Inf ({np.asarray(values).tolist()}); "
                         "expected finite values (did one of the networks diverge?)")
    return jnp.max(values) - (values[0] + values[-1]) / 2


# ----------------------------------------------------------------------------------------------- mask overlap
def _counts_overlap(inter, union, ka, kb, size) -> dict:
    """The overlap record from counts (jnp or Python numbers)."""
    return {"jaccard": jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0),
            "kept_fraction": jnp.where(ka > 0, inter / jnp.maximum(ka, 1), 1.0),
            "intersection": inter, "union": union, "kept_a": ka, "kept_b": kb, "size": size}


def _prunable_or_all(mask_a: PyTree, prunable: PyTree | None) -> PyTree:
    return jax.tree_util.tree_map(lambda _: True, mask_a) if prunable is None else prunable


def _check_masks(mask_a: PyTree, mask_b: PyTree, prunable: PyTree | None) -> PyTree:
    for path, m in jax.tree_util.tree_leaves_with_path(mask_a):
        dtype = getattr(m, "dtype", None) or np.asarray(m).dtype
        if dtype != bool:
            raise ValueError(f"mask_a: leaf {masks.path_str(path)!r} has dtype {dtype}; expected bool (True = kept)")
    prunable = _prunable_or_all(mask_a, prunable)
    masks.check_trees(mask_a, mask_b, prunable, params_name="mask_a")
    return prunable


def overlap(mask_a: PyTree, mask_b: PyTree, prunable: PyTree | None = None) -> dict:
    """Overlap of two masks: ``{"layers": {path: record}, "overall": record}`` over the prunable leaves.

    A record holds ``jaccard`` = ``|A∩B| / |A∪B|``, ``kept_fraction`` = ``|A∩B| / |A|`` (the fraction of ``a``'s
    survivors that ``b`` keeps: with ``a`` = the previous level's mask, how many of its survivors the next level
    kept), and the counts ``intersection``, ``union``, ``kept_a``, ``kept_b``, ``size`` (int32 scalars). Masks:
    bool trees of equal structure and shapes; ``prunable``: Python-bool tree (``None``: every leaf). Jittable (the
    result is a pytree of scalars; ``jax.tree_util.tree_map(float, …)`` makes plain numbers)."""
    prunable = _check_masks(mask_a, mask_b, prunable)
    layers, tot = {}, [0, 0, 0, 0, 0]
    for (path, a), b, p in zip(jax.tree_util.tree_leaves_with_path(mask_a), jax.tree_util.tree_leaves(mask_b),
                               jax.tree_util.tree_leaves(prunable)):
        if not p:
            continue
        a, b = jnp.asarray(a, bool), jnp.asarray(b, bool)
        c = [jnp.sum(a & b, dtype=jnp.int32), jnp.sum(a | b, dtype=jnp.int32), jnp.sum(a, dtype=jnp.int32),
             jnp.sum(b, dtype=jnp.int32), jnp.asarray(a.size, jnp.int32)]
        layers[masks.path_str(path)] = _counts_overlap(*c)
        tot = [t + v for t, v in zip(tot, c)]
    return {"layers": layers, "overall": _counts_overlap(*tot)}


def _as_count(v, name: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not float(v).is_integer():
        raise ValueError(f"{name}={v!r}: expected a whole number of weights")
    return int(v)


def _hypergeom_window(n: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Support points ``i`` of ``|A∩B|`` within ±12 std of the mean and their (normalised) probabilities."""
    from scipy.stats import hypergeom

    lo, hi = max(0, a + b - n), min(a, b)
    mean = a * b / n
    std = math.sqrt(a * b * (n - a) * (n - b) / (n * n * (n - 1))) if n > 1 else 0.0
    lo = max(lo, int(math.floor(mean - 12 * std)) - 2)
    hi = min(hi, int(math.ceil(mean + 12 * std)) + 2)
    i = np.arange(lo, hi + 1)
    pmf = np.exp(hypergeom.logpmf(i, n, a, b))
    return i, pmf / pmf.sum()


def expected_random_overlap(size: int, kept_a: int, kept_b: int, *, nested: bool = False) -> dict[str, float]:
    """What two uniformly random masks keeping ``kept_a`` and ``kept_b`` of ``size`` weights overlap, on average.

    ``nested=False``: independent masks (``E[I] = a·b/n``, hypergeometric; the module docstring has the
    formulas); ``nested=True``: ``B`` a random subset of ``A`` (needs ``kept_b <= kept_a``; ``I = b``). Returns
    ``{"intersection": E[I], "intersection_std": std[I], "jaccard": E[I/|A∪B|], "kept_fraction": E[I]/a}`` (floats;
    the empty-set conventions of :func:`overlap`)."""
    n, a, b = _as_count(size, "size"), _as_count(kept_a, "kept_a"), _as_count(kept_b, "kept_b")
    if n < 1:
        raise ValueError(f"size={size!r}: expected >= 1 weights")
    for name, v in (("kept_a", a), ("kept_b", b)):
        if not 0 <= v <= n:
            raise ValueError(f"{name}={v}: expected 0 <= {name} <= size ({n})")
    if nested:
        if b > a:
            raise ValueError(f"kept_b={b}: a nested mask keeps a subset of A's {a} survivors; expected kept_b <= "
                             f"kept_a")
        frac = b / a if a else 1.0
        return {"intersection": float(b), "intersection_std": 0.0, "jaccard": frac, "kept_fraction": frac}
    mean = a * b / n
    var = a * b * (n - a) * (n - b) / (n * n * (n - 1)) if n > 1 else 0.0
    if a + b == 0:
        jac = 1.0
    else:
        i, pmf = _hypergeom_window(n, a, b)
        jac = float(np.sum(pmf * i / (a + b - i)))
    return {"intersection": mean, "intersection_std": math.sqrt(var), "jaccard": jac,
            "kept_fraction": mean / a if a else 1.0}


def random_overlap_like(mask_a: PyTree, mask_b: PyTree, prunable: PyTree | None = None, *,
                        nested: bool = False) -> dict:
    """:func:`expected_random_overlap` for random masks with the per-leaf kept counts of ``mask_a`` and ``mask_b``:
    ``{"layers": {path: record}, "overall": record}`` (the layout of :func:`overlap`; host-side floats). Overall:
    the sums over independent leaves and the delta-method Jaccard (module docstring)."""
    prunable = _check_masks(mask_a, mask_b, prunable)
    layers = {}
    mean = var = 0.0
    ka = kb = 0
    for (path, a), b, p in zip(jax.tree_util.tree_leaves_with_path(mask_a), jax.tree_util.tree_leaves(mask_b),
                               jax.tree_util.tree_leaves(prunable)):
        if not p:
            continue
        n, na, nb = int(np.size(a)), int(np.sum(np.asarray(a))), int(np.sum(np.asarray(b)))
        rec = expected_random_overlap(n, na, nb, nested=nested)
        layers[masks.path_str(path)] = rec
        mean += rec["intersection"]
        var += rec["intersection_std"] ** 2
        ka, kb = ka + na, kb + nb
    s = ka + kb
    if nested:
        jac = kb / ka if ka else 1.0
    elif s == 0:
        jac = 1.0
    else:  # E[I/(S-I)] ≈ f(μ) + f''(μ)·σ²/2, f''(I) = 2S/(S-I)³
        jac = mean / (s - mean) + s / (s - mean) ** 3 * var
    return {"layers": layers, "overall": {"intersection": mean, "intersection_std": math.sqrt(var), "jaccard": jac,
                                          "kept_fraction": mean / ka if ka else 1.0}}


# ----------------------------------------------------------------------------------------------- similarity
def _metric_spec(name: str, metrics: Mapping[str, tuple] | None) -> tuple[Any, dict]:
    table = SIMILARITY_METRICS if metrics is None else metrics
    if name not in table:
        raise ValueError(f"metrics: {name!r} is not a similarity; expected names of {sorted(table)}")
    sim, opts = table[name]
    return sim, dict(opts)


def token_samples(a: Array, tokens: str = "mean") -> Array:
    """Token representations ``a: (n, t, d)`` as 2-D activations: ``tokens="mean"`` (the default) → ``(n, d)``,
    the mean over the tokens; ``"flatten"`` → ``(n·t, d)``, every token of every input a sample. Activations
    ``(n, p)`` and conv maps ``(n, h, w, c)`` pass through unchanged (conv maps keep their own handling)."""
    if tokens not in TOKEN_MODES:
        raise ValueError(f"tokens={tokens!r}: expected one of {TOKEN_MODES} (token representations (n, tokens, d): "
                         "'mean' over the tokens, or 'flatten' to n·tokens samples)")
    a = jnp.asarray(a)
    if a.ndim != 3:
        return a
    return a.mean(axis=1) if tokens == "mean" else a.reshape(-1, a.shape[-1])


def similarity_to_dense(reps: Mapping[str, Array], dense_reps: Mapping[str, Array],
                        metrics: Sequence[str] | Mapping[str, tuple] = DEFAULT_METRICS, *,
                        layers: Sequence[str] | None = None, cca_conv: str = "pixel",
                        tokens: str = "mean") -> dict[str, dict[str, float]]:
    """Each layer of a network against the same layer of a reference (the dense network): ``{metric: {layer: s}}``.

    ``reps``, ``dense_reps``: ``{layer: (n, p), token representations (n, t, d) or conv maps (n, h, w, c)}`` of
    the same ``n`` inputs (:func:`jaxprune.models.representations`). Token representations follow ``tokens``
    (:func:`token_samples`: ``"mean"``, the default, compares the ``(n, d)`` means over tokens; ``"flatten"`` the
    ``(n·t, d)`` tokens as samples). ``metrics``: names of :data:`SIMILARITY_METRICS` (those of
    ``experiments.similarity``), or ``{label: (jaxprune.similarity name or (prepare, compare) pair, options)}``.
    ``layers``: which (default: every layer of ``dense_reps``, in order). Conv maps are flattened to ``(n, h·w·c)``,
    except for the CCA family with ``cca_conv="pixel"`` (``(n·h·w, c)``: every position a sample, svcca's choice).
    Every pair is one call of :func:`jaxprune.similarity.pairwise` with the one layer on each side (only the
    diagonal of the layer × layer matrix is needed), so each layer is factorised once per metric."""
    if cca_conv not in ("pixel", "flatten"):
        raise ValueError(f"cca_conv={cca_conv!r}: expected 'pixel' or 'flatten'")
    token_samples(jnp.zeros((1, 1)), tokens)  # the option checked before any work
    table = dict(metrics) if isinstance(metrics, Mapping) else None
    names = list(metrics)
    if not names:
        raise ValueError("metrics: expected at least one similarity")
    layers = list(dense_reps) if layers is None else list(layers)
    for name, r in (("reps", reps), ("dense_reps", dense_reps)):
        missing = [l for l in layers if l not in r]
        if missing:
            raise ValueError(f"{name}: no layer(s) {missing}; it holds {list(r)}")
    out: dict[str, dict[str, float]] = {}
    for m in names:
        sim, opts = _metric_spec(m, table)
        mode = lambda a: "pixel" if (cca_conv == "pixel" and sim in CCA_FAMILY and np.ndim(a) == 4) else "flatten"
        out[m] = {}
        for l in layers:
            x, y = reps[l], dense_reps[l]
            if np.shape(x) != np.shape(y):
                raise ValueError(f"reps: layer {l!r} has shape {np.shape(x)}; expected {np.shape(y)}, its shape in "
                                 "dense_reps (the same inputs through the same architecture)")
            x, y = token_samples(x, tokens), token_samples(y, tokens)
            fx, fy = similarity.flatten_conv(x, mode(x)), similarity.flatten_conv(y, mode(y))
            out[m][l] = float(similarity.pairwise(sim, [fx], [fy], **opts)[0, 0])
    return out
