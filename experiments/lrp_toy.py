"""Yeom et al.'s 2-D toy pruning experiment: ``python -m experiments.lrp_toy --flagfile=experiments/configs/X.cfg``.

A ReLU MLP (the configs': 2-1000-1000-1000-C, dropout 0.5 after the first layer, Adam 1e-3 for 30 epochs of
batch 64; the bare training defaults are :class:`experiments.common.TrainSettings`') is trained once per dataset;
then, for every number ``n`` of reference samples per class and every seed, ``n·C`` fresh samples are drawn, each
criterion (weight, grad, taylor, lrp; :mod:`jaxprune.criteria`) scores the hidden units on them, the ``n_prune``
globally lowest-scoring units are physically removed (:func:`jaxprune.structured.remove_many`) and the network is
evaluated, without fine-tuning, on the training set and on a held-out set with extra Gaussian input noise.
``--model=module.path:ClassName`` (with ``--model_kwargs``) runs the same on a model of your own (2-D inputs,
C logits; see :func:`experiments.common.build_user_model`). Networks are evaluated by their own ``apply``.

Writes to ``--workdir``: ``<dataset>/model`` and ``<dataset>/train.json`` (the trained net and its record, with
the settings it was trained with: reused on a rerun when they agree, refused before any training, naming each
differing setting, when they do not — the run-identity rule of :mod:`experiments.common`), ``results.json``,
``<dataset>_accuracy_vs_n.png`` (train and noisy test), ``<dataset>_boundaries.png``.

Importable without side effects: :func:`run` takes an :class:`LrpToySettings` or a config dict (keys = flag names,
defaults in ``DEFAULTS``). It lives in :mod:`experiments.lrp_toy_run`; this module is the command line.
"""
from __future__ import annotations

from experiments import common
from experiments.lrp_toy_run import (  # noqa: F401 (the experiment's API, importable from here as before)
    DEFAULTS, REFERENCE_SEED_OFFSET, SPEC, TRAINING_SETTINGS, LrpToySettings, _check, _grid, _mean_std, _overlap,
    _predict_grid, _pruned_ids, _remove_lowest, accuracy, build_model, check_trained, logits, preflight, prune,
    reference_samples, report, run, run_dataset, sample_seeds, summary, train_model, training_settings)


if __name__ == "__main__":
    common.launch(SPEC, run, report)
