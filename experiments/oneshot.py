"""One-shot weight vs unit pruning without retraining.

Train a network once per seed (``configs/oneshot_mnist.cfg``: the bias-free MLP 784-1000-1000-500-200-10 on MNIST,
inputs in [-1, 1], Adam 1e-3, 3 epochs, batch 100, layerwise ranking; the bare training defaults are
:class:`experiments.common.TrainSettings`'), then evaluate the test accuracy at each sparsity ``k`` for

* **weight** pruning: zero the ``ceil(k·n)`` smallest-|w| weights of every hidden kernel (layerwise), or of all
  hidden kernels ranked together (``--scope=global``);
* **unit** pruning: silence the ``ceil(k·n)`` output units with the smallest L2 norm in every shrinkable layer
  (layerwise), or ranked across layers (``--scope=global``), with :func:`jaxprune.structured.mask_units`: their
  kernel columns / conv filters, bias and following BatchNorm scale/offset are zeroed, and so are the input rows of
  the layers reading them (a unit whose activation does not map 0 to 0 sends nothing on), so the accuracy is that
  of the network with those units removed; ``--unit_criterion`` picks another weight criterion (kind ``vectors``
  or ``selection`` of :data:`jaxprune.unit_criteria.CRITERIA`).

The output layer is never pruned and nothing is retrained. Usage::

    python -m experiments.oneshot --flagfile=experiments/configs/oneshot_mnist.cfg --seeds=0,1,2

Writes to ``--workdir``: ``seed_{s}.json`` per finished seed (a rerun skips them), ``results.json`` (the full
config, dense accuracy and, per method, a map sparsity → accuracy as mean/std/per-seed fractions) and
``accuracy_vs_sparsity.png``.

Importable without side effects: :func:`run` takes an :class:`OneshotSettings` or a config dict (keys = flag names,
defaults in ``DEFAULTS``); it lives in :mod:`experiments.oneshot_run`, and this module is the command line.
"""
from __future__ import annotations

from experiments import common
from experiments.oneshot_run import (  # noqa: F401 (the experiment's API, importable from here as before)
    DEFAULTS, METHODS, RENAMED, SPEC, OneshotSettings, format_table, report, run, run_seed, summarize,
    unit_pruned, weight_pruned, _check_global, _key)


if __name__ == "__main__":
    common.launch(SPEC, run, report, RENAMED)
