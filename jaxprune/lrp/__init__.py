"""Layer-wise relevance propagation for any Flax model (linen, or NNX through ``nnx.split``), read from the model's
own program (:mod:`jaxprune.graph`): rules as ``jax.custom_vjp`` layers, composites (rules by layer path, role and
kind), a graph-derived BatchNorm canonizer and :func:`relevance` (input and per-layer relevance, batched, under jit
and vmap); :mod:`~jaxprune.lrp.interpret` for transformers and modern convnets (AttnLRP / CP-LRP rules on every
primitive of the program, :func:`unit_relevance` per channel of any linear layer)."""
from jaxprune.lrp import canonizers, composites, interpret, rules
from jaxprune.lrp.canonizers import fold_batchnorm
from jaxprune.lrp.composites import Composite
from jaxprune.lrp.interpret import PrimitiveComposite, unit_relevance
from jaxprune.lrp.relevance import Relevance, non_output_layers, relevance
from jaxprune.lrp.rules import (ALPHA1_BETA0, ALPHA2_BETA1, AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, ZBox,
                                ZPlus)

__all__ = ["canonizers", "composites", "interpret", "rules", "PrimitiveComposite", "unit_relevance",
           "fold_batchnorm", "Composite", "Relevance", "non_output_layers",
           "relevance", "Rule", "Epsilon", "ZPlus", "AlphaBeta", "ALPHA2_BETA1", "ALPHA1_BETA0", "Gamma", "Flat",
           "WSquare", "ZBox"]
