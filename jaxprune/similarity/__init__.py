"""Representation similarity: CCA family, CKA family, NBS, and all-layer-pairs evaluation.

Activations are samples-first, ``x: (n, p1)`` and ``y: (n, p2)`` for the same ``n`` inputs in the same order; conv
maps ``(n, h, w, c)`` are made 2-D explicitly with :func:`flatten_conv`. Every function returns a *similarity*
(1 = same representation up to the metric's invariances), works under ``jit``/``vmap``, runs in float32 by default
and in float64 when ``jax_enable_x64`` is on. Input errors (wrong ndim, n < 2, mismatched n, NaN/Inf) are raised
before tracing and name the argument; inside a caller's ``jit``/``vmap``, where values cannot be checked, a
non-finite input makes exactly the results that depend on it NaN (never a plausible similarity such as 0).

Every metric is invariant to isotropic scaling and is computed so in float32: each input is divided by its largest
magnitude before any product and norms are combined as products of square roots, so ``x`` and ``c·x`` give the same
value (to rounding; tested from 1e-6 to 1e6 and at 1e-20, 1e18, 1e30) wherever float32 can hold ``c·x``. One rule
for what cannot be computed: a non-finite input is an error naming the argument (NaN under a caller's ``jit``), and
a representation without variance (every sample the same: all-zero, constant, fully pruned) has no defined
similarity and gives NaN, on the host and under ``jit`` alike (only its own pairs in :func:`pairwise`).

=================  ====================================================  =========================================
function           definition                                            invariant to
=================  ====================================================  =========================================
cca, mean_cca      canonical correlations / their mean                   invertible linear maps, translation
svcca              SVD to ``keep_variance``, then mean CCA (Raghu 2017)   orthogonal maps, isotropic scaling
pwcca              projection-weighted mean CCA (Morcos 2018)            isotropic scaling, signed permutations;
                                                                         orthogonal maps of the larger layer only
linear_cka         centred kernel alignment, linear kernel (Kornblith)    orthogonal maps, isotropic scaling
rbf_cka            CKA with a Gaussian kernel, median bandwidth           orthogonal maps, isotropic scaling
nbs                normalised Bures similarity (Tang 2020)               orthogonal maps, isotropic scaling
=================  ====================================================  =========================================

**Adding a similarity**: ``register_similarity(name, factory, options)`` (one call; see its docstring), and one test
against a float64 reference of its formula plus its invariances (``tests/test_similarity_registry.py`` shows one).
``register_preset(label, name, **options)`` names fixed options for the analyses and the experiments' ``--metrics``.
"""
from jaxprune.similarity._checks import flatten_conv
from jaxprune.similarity.cca import cca, mean_cca, pwcca, svcca
from jaxprune.similarity.cka import (MinibatchCKA, center_gram, cka_from_grams, gram_linear, gram_rbf, linear_cka,
                                     minibatch_cka, minibatch_cka_init, minibatch_cka_result, minibatch_cka_update,
                                     rbf_cka)
from jaxprune.similarity.nbs import nbs, nbs_from_grams
from jaxprune.similarity.pairwise import PRESETS, SIMILARITIES, metric, pairwise, register_preset, register_similarity

__all__ = ["cca", "mean_cca", "svcca", "pwcca", "linear_cka", "rbf_cka", "cka_from_grams", "gram_linear", "gram_rbf",
           "center_gram", "MinibatchCKA", "minibatch_cka", "minibatch_cka_init", "minibatch_cka_update",
           "minibatch_cka_result", "nbs", "nbs_from_grams", "pairwise", "metric", "SIMILARITIES", "flatten_conv",
           "PRESETS", "register_similarity", "register_preset"]
