"""Attention heads and MLP units of a ViT (or of a character-level GPT) pruned by LRP, Taylor, gradient, weight
and random: ``python -m experiments.head_prune --flagfile=experiments/configs/head_prune_vit_mnist.cfg``.

Per seed of ``--seeds``: train the ``--model`` (an attention model, e.g. ``vit``: the shared training defaults of
:class:`experiments.common.TrainSettings` train LeNet-300-100, which has no heads and is refused; the flagfile holds
the ViT recipe) once (or reuse the network trained earlier in ``--workdir`` with the same settings: the run-identity
rule of :mod:`experiments.common`). Its pruning groups are read from its graph
(:func:`jaxprune.structured.unit_groups`): the q/k/v projections of each attention (one unit = one head) and each
MLP hidden layer (one unit = one hidden unit). Then, for every criterion
of ``--criteria`` and every fraction ``f`` of ``--fractions``, ``ceil(f · width)`` units of EVERY group are
removed at once (:func:`jaxprune.structured.select_groups` → :func:`jaxprune.structured.remove_many`), all
chosen on the unpruned network; the test accuracy is measured without fine-tuning and after one fine-tuning round
of ``--finetune_steps`` steps (the training optimizer at the constant ``--finetune_lr``; the same batches for
every criterion and fraction of a network).

Criteria (:data:`CRITERIA`): ``lrp`` (relevance at each unit's output, :func:`jaxprune.criteria.lrp_scores` with
``--lrp_composite``), ``taylor`` (``|mean z·∂L/∂z|``) and ``grad`` (``|mean ∂L/∂z|``), each on
``--reference_examples`` training examples, a head scoring the sum over its q, k and v projections; ``weight``
(``--weight_norm`` of a head's q/k/v weights and biases concatenated, or of a unit's incoming weights) and
``random`` (seeded per network). The few-reference-samples check repeats the one-shot sweep of the data-driven
criteria at ``--reference_fraction`` for every size of ``--reference_sizes`` (the first examples of the same
per-seed draw), without fine-tuning.

Writes to ``--workdir``: ``config.json`` (the run identity: every flag but the lists swept and the seeds, which a
rerun may extend), per seed ``seed_<s>/trained/`` (checkpoint + ``trained.json``) and ``seed_<s>/cells.json`` (the
finished cells, written after each: a rerun resumes after the last one); ``results.json`` (keys below),
``results.csv``, ``accuracy_vs_fraction.png``, ``accuracy_vs_fraction_finetuned.png`` and
``accuracy_vs_reference.png``.

``--task=lm`` (``python -m experiments.head_prune --flagfile=experiments/configs/head_prune_gpt_shakespeare.cfg``):
the network is the character-level GPT that :mod:`experiments.lm_prune` trained in ``--lm_workdir`` (restored by
its run identity, ``dense/trained.json``; never trained here, refused when absent), the same for every seed; a
seed draws the ``max(--reference_examples, --reference_sizes)`` random training windows the data-driven criteria
read (nested), the random criterion and the fine-tuning batches. The criteria score at the true next characters
(:mod:`jaxprune.lm_criteria`: the summed next-token NLL for taylor/grad, LRP started at every position's true
next-character logit); a fine-tuning round is ``--finetune_steps`` AdamW steps at the constant ``--finetune_lr``
on random windows of the GPT's batch size (its weight decay, clipping 1); each cell measures the validation loss
(nats/char) on the GPT's fixed validation windows. Every accuracy key below is then ``val_loss`` (plots
``val_loss_vs_*.png``). The config (run identity) holds the flags the LM task reads and ``lm_settings`` (the GPT's),
with ``dataset``/``model`` naming the GPT; the other training flags are not read (refused when set) and not stored.

``results.json``: ``config``, ``environment``, ``groups`` (the pruning groups, each a list of layers),
``original_widths`` (``{group's first layer: units}``), ``dense`` (test accuracy summary), ``oneshot``
(``{criterion: {fraction: {"accuracy", "accuracy_finetuned", "widths", "params"}}}``), ``reference``
(``{criterion: {size: {"accuracy"}}}``), ``reference_fraction``, ``per_seed``, ``finished``; every accuracy is
``{"mean", "std" (ddof = 1), "n", "values" (per seed)}`` (:func:`jaxprune.conventions.summary`).

Importable without side effects: :func:`run` takes a :class:`HeadPruneSettings` or a config dict (keys = flag names,
defaults in ``DEFAULTS``). It lives in :mod:`experiments.head_prune_run`; this module is the command line.
"""
from __future__ import annotations

from experiments import common
from experiments.head_prune_run import (  # noqa: F401 (the experiment's API, importable from here as before)
    ACCURACY, COMPOSITES, CRITERIA, CSV_COLUMNS, DEFAULTS, FINETUNE_STREAM, IMAGE_TRAINING, LM_FLAGS,
    LM_REFERENCE_STREAM, RANDOM_STREAM, SPEC, TASKS, VAL_LOSS, HeadPruneSettings, LMData, Metric, Task, _VOLATILE,
    _config, _data_driven, _groups, _remove, check_lm_run_config, csv_columns, csv_rows, format_table, lm_identity,
    metric_of, oneshot_cell, plot, reference_cell, report, run, summarize, write_results)


if __name__ == "__main__":
    common.launch(SPEC, run, report)
