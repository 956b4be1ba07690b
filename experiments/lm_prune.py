"""One-shot calibrated pruning of a character-level GPT: magnitude, Wanda and SparseGPT at 50 %, 2:4 and 4:8.

Train a small GPT (:class:`jaxprune.models.GPT`) on the characters of a text corpus (default Shakespeare, the first
90 % for training), or reuse the one trained earlier in ``--workdir`` with the same settings (run identity:
``dense/trained.json`` records them; other settings are refused). Then prune every dense kernel but the readout
once, layer by layer, each calibrated on ``--calib_windows`` random training windows passed through the
already-pruned network (:mod:`jaxprune.calibrated`), for every calibration seed of ``--seeds``, and evaluate the
validation loss (nats per character) on ``--val_windows`` fixed windows. Usage::

    python -m experiments.lm_prune --flagfile=experiments/configs/lm_prune_shakespeare.cfg

Writes to ``--workdir``: ``dense/`` (the trained params and ``trained.json``), ``results.json``
(``{"dense": {"val_loss"}, "methods": {method: {pattern: {"val_loss", "val_loss_std", "density"}}}, "details",
"training", "config", "environment", "seeds"}``: losses in nats/char, means and sample stds over the calibration
seeds; magnitude reads no calibration data, so it is pruned once, std 0; density over the pruned kernels; Wanda
with ``--wanda_group=layer`` is keyed ``wanda_layer``),
``val_loss.png`` and ``samples.txt`` (generated text per method and pattern).

Importable without side effects: :func:`run` takes an :class:`LmPruneSettings` or a config dict (keys = flag names,
defaults in ``DEFAULTS``), :func:`dense_model` trains or reloads the GPT (``experiments.head_prune`` reads it); they
live in :mod:`experiments.lm_prune_run`, and this module is the command line.
"""
from __future__ import annotations

from experiments import common
from experiments.lm_prune_run import (  # noqa: F401 (the experiment's API, importable from here as before)
    DEFAULTS, MODEL_KEYS, SPEC, TRAIN_KEYS, VAL_EVERY_CHUNKS, LmPruneSettings, Trained, build, dense_model, prune_one,
    report, run, _calibration, _label, _plot, _sample, _summarize)


if __name__ == "__main__":
    common.launch(SPEC, run, report)
