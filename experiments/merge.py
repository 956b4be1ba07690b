"""Neuron merging vs. pruning without fine-tuning: ``python -m experiments.merge --flagfile=experiments/configs/X.cfg``.

For every seed: train the network (or, with ``--source_workdir``, load level 0 of that seed in an ``experiments.imp``
workdir),
then for every criterion and sparsity (or the single ``--pruned_cfg``) evaluate the original, the pruned and
the merged network on the test set — no data is used by pruning or merging, and nothing is retrained.

Writes to ``--workdir``: ``seed_<s>/`` (trained checkpoint + ``trained.json``, which records the training
settings: a rerun reuses the network when they agree and refuses, before any training, naming each differing
setting, when they do not — see the run-identity rule in :mod:`experiments.common`; the evaluation is recomputed
on every run),
``results.json`` (config, per-seed runs with per-layer merge reports, mean/std summary), ``metrics.csv`` and
``accuracy_vs_sparsity.png``.

Importable without side effects: :func:`run` takes a :class:`MergeSettings` or a config dict (keys = flag names,
defaults in ``DEFAULTS``). It lives in :mod:`experiments.merge_run`; this module is the command line.
"""
from __future__ import annotations

from experiments import common
from experiments.merge_run import (  # noqa: F401 (the experiment's API, importable from here as before)
    DEFAULTS, RENAMED, SOURCE_SETTINGS, SPEC, MergeSettings, _check_source, _config, _load_source, evaluate_seed,
    report, run, summarize)


if __name__ == "__main__":
    common.launch(SPEC, run, report, RENAMED)
