"""Filter pruning with fine-tuning: ``python -m experiments.filter_prune --flagfile=experiments/configs/X.cfg``.

Train a network (or reload it from the workdir), then run exactly ``--max_rounds`` rounds (fewer only when the
``--max_pruned_fraction`` floor stops them) of

1. score every filter (unit) of every prunable layer of ``--layer_kind`` with ``--criterion``, any name of the one
   criterion table :data:`jaxprune.criteria.CRITERIA`: a weight criterion (``l1``, ``l2``, ``random``, ``kmeans``,
   ``l2_gm``, ``weight``) or a data-driven one (``grad``, ``taylor``, ``lrp``, on ``--reference_examples`` training
   examples);
2. physically remove ``ceil(prune_fraction · current width)`` filters per layer (never going below
   ``ceil((1 − max_pruned_fraction) · original width)``, nor below one filter) — the pytree shrinks, the following
   BatchNorm and the next layer follow (:func:`jaxprune.structured.remove_many`);
   With ``--prune_heads`` the attention heads are pruned too (:func:`jaxprune.structured.unit_groups`): per
   attention ``ceil(prune_fraction · current heads)`` heads go (same floor), each head scored once across its
   query/key/value projections (weight criteria on the head's weights and biases of the three projections
   together, data-driven ones summed over them: :func:`jaxprune.structured.select_groups`); the output
   projection's rows follow. Off by default (the run identity of earlier workdirs is unchanged).
3. optionally re-estimate the BatchNorm statistics (``--bn_recalibration_batches``; the downstream statistics are
   stale once channels are gone), then fine-tune for ``--finetune_steps`` at the constant ``--finetune_lr`` (a
   fresh optimizer: the shapes changed).

Per round: widths (and ``heads``: ``{attention's query projection: heads}``), parameter count, FLOPs
(:func:`jaxprune.structured.count_flops`, attention's products included), test accuracy before and after
fine-tuning. :func:`plot_criteria` draws several workdirs' accuracy against FLOPs on one figure. One network per seed of
``--seeds``; writes to ``--workdir``: ``config.json`` (the run identity: every flag but the seeds and the round
count), per seed ``seed_<s>/`` with ``trained/`` (round 0), ``round_<r>/`` (checkpoint + ``round.json``, written
last: a crash never loses a finished round, and a rerun resumes after the last one), ``results.json``,
``rounds.csv`` and ``accuracy_vs_params.png``; and the same three files at the top, over seeds: accuracies as the
mean under the usual keys, ``<key>_std`` (ddof = 1, :func:`jaxprune.conventions.summary`) and ``num_seeds``.
A workdir of an earlier release (one seed, ``trained/`` at the top) is moved into ``seed_<s>/`` on the first rerun.

The training flags and their defaults are the shared ones (:class:`experiments.common.TrainSettings`); a run's
recipe (data, model, optimizer, schedule, length) is in its config file (``experiments/configs/filter_prune_*.cfg``),
which every documented run passes. A finished round is read back by :func:`jaxprune.runs.load_round`
(:func:`jaxprune.runs.finished_rounds` lists them), a seed's trained network by :func:`jaxprune.runs.load_trained`.

Importable without side effects: :func:`run` takes a :class:`FilterPruneSettings` or a config dict (keys = flag
names, defaults in ``DEFAULTS``). It lives in :mod:`experiments.filter_prune_run`; this module is the command line.
"""
from __future__ import annotations

from experiments import common
from experiments.filter_prune_run import (  # noqa: F401 (the experiment's API, importable from here as before)
    DEFAULTS, RENAMED, SPEC, FilterPruneSettings, Pruned, _VOLATILE, _config, _keep, format_table, plot_criteria,
    report, round_widths, run, summarize_rounds)


if __name__ == "__main__":
    common.launch(SPEC, run, report, RENAMED)
