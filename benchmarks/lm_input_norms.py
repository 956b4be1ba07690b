"""How unequal are the input features of the trained character GPT's dense layers? (issue 33's diagnosis)

Wanda's gain over magnitude on LLMs comes from a few input features with far larger norms than the rest (outlier
features); this prints, for every pruned kernel of the ``experiments.lm_prune`` GPT, the spread of its input norms
``‖X_j‖₂`` over the first calibration draw (seed 0, the config's windows): max / median, 99th percentile / median
and the coefficient of variation. The readout is left out (lm_prune does not prune it).

    JAXPRUNE_DATA_DIR=../shared/data python benchmarks/lm_input_norms.py runs/lm_prune_shakespeare

The workdir must hold the trained GPT (``dense/``, trained by the config if absent).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import lm_prune
from jaxprune import calibrated, lm


def spreads(workdir: str) -> list[tuple[str, float, float, float]]:
    """``(kernel path, max/median, p99/median, std/mean)`` of ``‖X_j‖₂`` per pruned kernel, in program order."""
    c = dict(lm_prune.DEFAULTS)
    params, _ = lm_prune.dense_model(c, workdir)
    text, model, _ = lm_prune.build(c)
    calib = jnp.asarray(lm_prune._calibration(text, c, 0))
    apply = lm.flax_apply(model)
    grams = calibrated._grams(calibrated.gram_fn(apply, params), jax.tree_util.tree_leaves(params), calib, 16)
    rows = []
    for use in calibrated.dense_layers(apply, params, calib[:2]):
        if not use.readout:
            n = np.sqrt(np.diag(np.asarray(grams[use.leaf])))
            med = np.median(n)
            rows.append((use.path, float(n.max() / med), float(np.percentile(n, 99) / med), float(n.std() / n.mean())))
    return rows


if __name__ == "__main__":
    rows = spreads(sys.argv[1])
    for path, mx, p99, cv in rows:
        print(f"{path:40s} max/median {mx:5.2f}  p99/median {p99:5.2f}  cv {cv:.3f}")
    print(f"largest max/median {max(r[1] for r in rows):.2f}; median over kernels {np.median([r[1] for r in rows]):.2f}")
