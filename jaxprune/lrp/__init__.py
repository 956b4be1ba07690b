"""Layer-wise relevance propagation for the library's models: rules as ``jax.custom_vjp`` layers, composites,
canonizers and :func:`relevance` (input and per-layer hidden relevance, batched, under jit and vmap)."""
from jaxprune.lrp import canonizers, composites, rules
from jaxprune.lrp.canonizers import fold_batchnorm
from jaxprune.lrp.composites import Composite
from jaxprune.lrp.relevance import Relevance, forward, hidden_layers, linear_layers, program, relevance
from jaxprune.lrp.rules import (ALPHA1_BETA0, ALPHA2_BETA1, AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, ZBox,
                                ZPlus)

__all__ = ["canonizers", "composites", "rules", "fold_batchnorm", "Composite", "Relevance", "forward",
           "hidden_layers", "linear_layers", "program", "relevance", "Rule", "Epsilon", "ZPlus", "AlphaBeta",
           "ALPHA2_BETA1", "ALPHA1_BETA0", "Gamma", "Flat", "WSquare", "ZBox"]
