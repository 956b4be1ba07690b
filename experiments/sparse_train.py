"""Sparsity during training: ``python -m experiments.sparse_train --flagfile=experiments/configs/X.cfg``.

Trains the dense network and, for every ``--methods`` × ``--sparsity`` × ``--seeds``, a network made sparse
during training by :mod:`jaxprune.sparse_training`: ``gradual`` (Zhu & Gupta's schedule from ``--prune_begin`` to
``--prune_end`` every ``--prune_frequency`` steps, by magnitude, ``--pattern`` unstructured / ``n:m`` / ``block``),
``rigl``, ``set`` (mask updates every ``--update_interval`` steps until ``--update_end``, cosine-decayed
``--drop_fraction``) and ``static`` (a fixed random mask), the layers' densities ``--gradual_distribution`` /
``--dst_distribution`` (uniform or ERK). The output layer stays dense unless ``--prune_output``; densities are
fractions of the prunable weights kept. Same initialisation, data order and optimizer as the dense network.
``--sparse_steps_multiplier=k`` trains the sparse runs k × the dense steps with their whole schedule stretched
(RigL's 2×/5×), keyed ``rigl_2x``; ``--validation_examples=N`` holds out the last N training examples and
evaluates every network on them (``val_accuracy``), so settings are tuned without the test set.

Writes to ``--workdir``: ``config.json`` (the run identity), ``dense/seed_<s>/`` (a trained network, as every
experiment's), ``<method>/<sparsity>/seed_<s>/run.json`` (one finished run, with the settings that produced it:
reused on a rerun, refused if they differ), ``results.json`` and ``accuracy_vs_density.png`` (beside the IMP
curve of ``--imp_results``, an ``experiments.imp`` results.json of the same network, when given).

``results.json``: ``{"dense": {"test_accuracy", "test_accuracy_std", "num_seeds"}, "methods": {method: {"0.9":
{"test_accuracy", "test_accuracy_std", "density", "density_std", "num_seeds", "steps", "per_seed"}}}, "metric",
"sparse_steps_multiplier", "pattern", "config", "environment"}`` — fractions; mean and sample std (ddof = 1,
``jaxprune.conventions.summary``) over the seeds; ``val_accuracy`` instead of ``test_accuracy`` (``"metric"``)
with ``--validation_examples``.

Importable without side effects: :func:`train_and_evaluate` takes a :class:`SparseTrainSettings` or a config dict
(keys = flag names; defaults in ``DEFAULTS``) and a workdir. It lives in :mod:`experiments.sparse_train_run`; this
module is the command line.
"""
from __future__ import annotations

from experiments import common
from experiments.sparse_train_run import (  # noqa: F401 (the experiment's API, importable from here as before)
    ADDED_LATER, DEFAULTS, METHODS, SPEC, STRETCHED, Config, SparseTrainSettings, format_table, method_config, report,
    run_settings, stretched, train_and_evaluate, train_sparse)


if __name__ == "__main__":
    common.launch(SPEC, train_and_evaluate, report)
