"""Iterative magnitude pruning with rewinding, and its control branches, resumable level by level.

Level 0 trains the dense network. Level ``k ≥ 1`` prunes ``fraction`` of the remaining prunable weights of level
``k−1``'s trained network, then trains again from a start point chosen by ``rewind``:

* ``init``     — the original initial weights (Frankle & Carbin 2019), fresh optimizer, schedule from step 0;
* ``step``     — the dense run's state at step ``rewind_step`` (weights, optimizer state, schedule position;
  Frankle et al. 2020), trained on to the end;
* ``lr``       — learning-rate rewinding (Renda et al. 2020): keep the trained surviving weights, fresh optimizer
  and the *whole* schedule restarted from step 0 at every level;
* ``finetune`` — keep the trained weights and optimizer state, train again at a constant learning rate:
  ``finetune_lr``, by default the schedule's final one (refused when that is 0, as at the end of ``cosine``).

Control branches (``branch``), trained beside every pruned level from the same start point:
``random_mask`` (same per-layer densities, random positions) and ``reinit`` (the level's mask, fresh weights).

Layout of ``workdir`` (OpenLTH-style): ``config.json``; ``level_k/{checkpoint/, level.json}``; ``results.json``;
``metrics.csv``; plots. ``level.json`` is written last, so a level counts as finished only when its checkpoint is
complete; it records the checkpoint's sha256 (``checkpoint_sha256``), checked when the level is loaded (a
checkpoint without one is refused), and carries its own checksum and identity (level, seed;
:func:`jaxprune.checkpoint.write_record`), verified on every read. A level is written in ``level_k.partial/`` and
renamed to ``level_k/`` when whole, with SIGINT held back meanwhile: an interrupted level is complete or absent. Re-running resumes after the last finished level; every
random stream is derived from ``seed`` and the level, so a resumed run equals an uninterrupted one. ``levels`` may
be raised to extend a run, never lowered below the levels already finished.

Replicas (``Task.num_replicas = K > 1``): seeds ``seed, seed+1, …, seed+K-1`` run as one compiled program
(:mod:`jaxprune.replicas`), each with its own initialisation, data order, masks and branch keys — replica ``r`` is
the run with seed ``seed + r``. Inside :func:`run` every tree is stacked (a leading K axis on every leaf, K = 1
included; a single replica trains as the single run itself, :func:`_train_level`). Checkpoints of K > 1 hold the
stacked trees, those of K = 1 a single run's trees (:func:`checkpoint_form`, the one conversion); a level record of
K > 1 holds the mean over replicas under the usual keys, ``<key>_std`` (sample standard deviation) and the
per-replica records under ``replicas``, one of K = 1 a single run's record. ``Task.mesh``: train data-parallel
over that mesh (:mod:`jaxprune.distributed`).

IMP in your own loop: the pieces :func:`capture` (a rewind point, or a level's trained state),
:func:`prune_and_rewind` / :func:`start_level` (each ``rewind`` mode), :func:`random_mask_branch` and
:func:`reinit_branch` are pure functions of (params, optimizer state, mask, key) for any params pytree and any
optax optimizer wrapped in :func:`jaxprune.masks.masked`; :func:`run` is their orchestrator (checkpoints, level
records). A :class:`Task` takes a :class:`jaxprune.train.OptimConfig` or any optax ``GradientTransformation``
(``lr`` rewinding then re-``init``s it: its step count, hence its schedule, restarts), any ``loss(logits,
labels)``, models with or without a ``train`` argument, and batches from an iterator (``train_batches``) as well
as in-memory arrays; ``workdir=None`` runs in memory without checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxprune import augment as augmentation
from jaxprune import _validate, checkpoint, conventions, graph, masks, models, replicas, train

PyTree = Any
REWINDS = ("init", "step", "lr", "finetune")
BRANCHES = ("none", "random_mask", "reinit")


@dataclasses.dataclass(frozen=True)
class ImpConfig:
    levels: int = 3  # pruned levels after the dense level 0
    fraction: float = 0.2  # of the remaining prunable weights, per level
    scope: str = "global"
    rewind: str = "init"
    rewind_step: int = 0  # for rewind="step"
    branch: str = "none"
    exclude: tuple[str, ...] = ()  # regexes of param paths never pruned (e.g. the output layer)
    prune_biases: bool = False  # rank the biases of prunable layers with their weights
    prune_embeddings: bool = False  # also prune embedding tables (gathered by token ids)
    finetune_lr: float | None = None  # rewind="finetune": constant learning rate (None: the schedule's final one)

    def __post_init__(self):
        if self.levels < 0:
            raise ValueError(f"levels={self.levels}: expected >= 0")
        if not 0.0 < _validate.fraction(self.fraction, what="a fraction of the remaining weights") < 1.0:
            raise ValueError(f"fraction={self.fraction}: expected a fraction in (0, 1)")
        if self.scope not in masks.SCOPES:
            raise ValueError(f"scope={self.scope!r}: expected one of {masks.SCOPES}")
        if self.rewind not in REWINDS:
            raise ValueError(f"rewind={self.rewind!r}: expected one of {REWINDS}")
        if self.branch not in BRANCHES:
            raise ValueError(f"branch={self.branch!r}: expected one of {BRANCHES}")
        if self.rewind_step < 0:
            raise ValueError(f"rewind_step={self.rewind_step}: expected >= 0")
        if self.finetune_lr is not None:
            if self.rewind != "finetune":
                raise ValueError(f"finetune_lr={self.finetune_lr}: only used with rewind='finetune' "
                                 f"(got rewind={self.rewind!r})")
            if not (isinstance(self.finetune_lr, (int, float)) and self.finetune_lr > 0
                    and math.isfinite(self.finetune_lr)):
                raise ValueError(f"finetune_lr={self.finetune_lr!r}: expected a positive finite learning rate "
                                 "(or None: the schedule's final learning rate)")
        masks.compile_patterns(self.exclude)


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything a level's training needs: the model, data and the training recipe.

    Data: in-memory device arrays ``x_train, y_train`` (shuffled per epoch, ``batch_size`` examples a step), or
    ``train_batches(start_step)``: a callable returning an iterable of ``(x, y)`` batches for the steps
    ``start_step, start_step + 1, …`` (called once per training run: a level, a branch; step rewinding starts
    at ``rewind_step``), e.g. a generator or a tf.data / grain pipeline yielding numpy arrays. Test data:
    ``x_test, y_test`` or ``test_batches()`` (an iterable of ``(x, y)``).
    ``optim``: a :class:`jaxprune.train.OptimConfig` or any optax ``GradientTransformation`` (not wrapped in
    :func:`jaxprune.masks.masked`: IMP wraps it); with the latter ``rewind="finetune"`` needs ``finetune_optim``
    (the optimizer of the fine-tuning runs, with the same state structure, e.g. the same optimizer at a
    constant learning rate). ``loss(logits, labels) -> scalar``: the mean training loss of a batch (default
    softmax cross-entropy with integer labels); accuracy is ``argmax(logits) == labels``. Models whose
    ``__call__`` has no ``train`` argument are called without one. Iterator batches, custom losses and models
    without ``train`` need ``num_replicas=1`` (iterator batches also ``mesh=None``).
    """

    model: nn.Module
    x_train: jax.Array | None = None
    y_train: jax.Array | None = None
    x_test: jax.Array | None = None
    y_test: jax.Array | None = None
    optim: train.OptimConfig | optax.GradientTransformation | None = None
    num_steps: int | None = None
    batch_size: int | None = None  # in-memory training data only
    seed: int = 0
    loop: str = "auto"
    eval_every_epoch: bool = False  # iterator batches: every log_every (100) steps
    num_replicas: int = 1  # K seeds (seed, seed+1, …) trained as one vmapped program
    replica_layout: str = "vmap"  # see jaxprune.replicas.LAYOUTS
    mesh: Any = None  # jax.sharding.Mesh for data-parallel training (None: the default device)
    augment: str = "none"  # training-batch augmentation, a name of jaxprune.augment.NAMES
    loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None  # None: softmax cross-entropy
    train_batches: Callable[[int], Iterable] | None = None  # start step -> (x, y) batches from that step on
    test_batches: Callable[[], Iterable] | None = None  # -> (x, y) batches of the test set
    finetune_optim: optax.GradientTransformation | None = None  # rewind="finetune" with an optax optim

    def __post_init__(self):
        augmentation.by_name(self.augment)  # refuses unknown names
        if not (isinstance(self.num_replicas, int) and self.num_replicas >= 1):
            raise ValueError(f"num_replicas={self.num_replicas!r}: expected an integer >= 1")
        if self.replica_layout not in replicas.LAYOUTS:
            raise ValueError(f"replica_layout={self.replica_layout!r}: expected one of {replicas.LAYOUTS}")
        if not isinstance(self.optim, (train.OptimConfig, optax.GradientTransformation)):
            raise ValueError(f"optim={self.optim!r}: expected a jaxprune.train.OptimConfig or an optax "
                             "GradientTransformation (e.g. optax.adamw(1e-3))")
        if self.finetune_optim is not None and (isinstance(self.optim, train.OptimConfig) or not isinstance(
                self.finetune_optim, optax.GradientTransformation)):
            raise ValueError("finetune_optim: expected an optax GradientTransformation beside an optax optim (an "
                             "OptimConfig fine-tunes at ImpConfig.finetune_lr)")
        if not (isinstance(self.num_steps, (int, np.integer)) and self.num_steps >= 1):
            raise ValueError(f"num_steps={self.num_steps!r}: expected an integer >= 1 (training steps per level)")
        if self.train_batches is None:
            if self.x_train is None or self.y_train is None or self.batch_size is None:
                raise ValueError("expected training data: x_train, y_train and batch_size, or train_batches")
        else:
            if self.x_train is not None or self.y_train is not None:
                raise ValueError("train_batches and x_train/y_train: expected one source of training data")
            if self.num_replicas != 1 or self.mesh is not None:
                raise ValueError("train_batches: expected num_replicas=1 and mesh=None (replicas and data "
                                 "parallelism need in-memory arrays)")
        if self.test_batches is None and (self.x_test is None or self.y_test is None):
            raise ValueError("expected test data: x_test and y_test, or test_batches")
        _check_lengths(self)


def _check_lengths(task: Task) -> None:
    """Refuse in-memory data whose inputs and labels differ in length (``x_train: (n, …)``, ``y_train: (n,)``)."""
    for x, y, xn, yn in ((task.x_train, task.y_train, "x_train", "y_train"),
                         (task.x_test, task.y_test, "x_test", "y_test")):
        if x is None or y is None:
            continue
        n, m = np.shape(x)[0] if np.ndim(x) else 0, np.shape(y)[0] if np.ndim(y) else 0
        if np.ndim(y) != 1 or n != m:
            raise ValueError(f"{yn}: shape {tuple(np.shape(y))} for {n} examples of {xn}; expected one label per "
                             f"example ({yn}: ({n},))")


def _check_labels(task: Task, variables: dict) -> None:
    """With the default loss (cross-entropy over integer classes), refuse in-memory labels outside the model's
    ``[0, num_classes)`` (they train to a NaN loss), before any training; ``num_classes``: the logits' width."""
    if task.loss is not None or task.x_train is None:
        return
    x1 = jax.ShapeDtypeStruct((1,) + tuple(np.shape(task.x_train)[1:]), jnp.float32)
    kw = {"train": False} if graph.takes_train(task.model) else {}
    logits = jax.eval_shape(lambda v, x: task.model.apply(v, x, **kw), variables, x1)
    num_classes = int(logits.shape[-1])
    _validate.labels(task.y_train, num_classes, int(np.shape(task.x_train)[0]), "y_train", "x_train")
    if task.y_test is not None:
        _validate.labels(task.y_test, num_classes, int(np.shape(task.x_test)[0]), "y_test", "x_test")


def _input_shape(task: Task) -> tuple:
    """The training inputs' shape: ``x_train``'s, else the first batch's of ``train_batches(0)``."""
    if task.x_train is not None:
        return tuple(task.x_train.shape)
    first = next(iter(task.train_batches(0)), None)
    if first is None:
        raise ValueError("train_batches(0) yielded no batch")
    return tuple(np.shape(first[0]))


def init_variables(task: Task, key: jax.Array) -> dict:
    """The model's variables ``{'params', ['batch_stats']}`` from ``key`` (:func:`jaxprune.models.init` for
    models with a ``train`` argument)."""
    _validate.key(key)
    shape = _input_shape(task)
    if graph.takes_train(task.model):
        return models.init(task.model, key, shape)
    x = jnp.zeros((1,) + shape[1:], jnp.float32)
    variables = task.model.init({"params": key, "dropout": key}, x)
    return {k: v for k, v in variables.items() if k in ("params", "batch_stats")}


def prunable_tree(task: Task, cfg: ImpConfig, params: Any) -> Any:
    """Bools over ``params``: the leaves IMP prunes — kernels by their role in the model's program (dense, conv and
    attention projections; embeddings with ``cfg.prune_embeddings``; :func:`jaxprune.graph.role_prunable`), minus
    ``cfg.exclude``, plus their biases with ``cfg.prune_biases``."""
    shape = _input_shape(task)
    dtype = task.x_train.dtype if task.x_train is not None else jnp.float32
    abstract = jax.eval_shape(lambda: init_variables(task, jax.random.PRNGKey(0)))
    x = jax.ShapeDtypeStruct((1,) + tuple(shape[1:]), dtype)
    predicate = graph.role_prunable(task.model, abstract, x, embeddings=cfg.prune_embeddings)
    return masks.prunable_leaves(params, predicate=predicate, exclude=cfg.exclude, biases=cfg.prune_biases)


class Keys:
    """Every random stream of :func:`run`, derived from the seed alone (resume-safe): ``init`` (the model's
    initial weights), ``data`` (data order, dropout, augmentation), ``reinit(level)`` and ``random_mask(level)``
    (the control branches)."""

    def __init__(self, seed: int):
        root = jax.random.PRNGKey(seed)
        self.init, self.data, self.branch = jax.random.split(root, 3)

    def reinit(self, level: int) -> jax.Array:
        return jax.random.fold_in(self.branch, 2 * level)

    def random_mask(self, level: int) -> jax.Array:
        return jax.random.fold_in(self.branch, 2 * level + 1)


_Keys = Keys  # the former private name


class _Rep:
    """Per-replica operations on stacked trees: a leading replica axis ``(K, …)`` on every leaf, K = 1 included
    (the one in-memory form of :func:`run`; :func:`checkpoint_form` converts at the checkpoint boundary)."""

    def __init__(self, seed: int, num_replicas: int = 1):
        self.k = num_replicas
        self.seeds = [seed + r for r in range(num_replicas)]

    def seeded(self, fn: Callable[[int], PyTree]) -> PyTree:
        """``fn(seed)`` for each replica's seed, stacked: leaves ``(K, …)``."""
        return replicas.stack([fn(s) for s in self.seeds])

    def device(self, fn: Callable, *trees: PyTree) -> PyTree:
        """A jnp function of single-replica trees, applied per replica (``jax.vmap``)."""
        return jax.vmap(fn)(*trees)

    def host(self, fn: Callable, *trees: PyTree) -> PyTree:
        """A host-side (numpy) function of single-replica trees, looped over replicas and stacked."""
        return replicas.map_host(fn, *trees)

    def first(self, tree: PyTree) -> PyTree:
        """Replica 0 of a stacked tree (for shapes and structure)."""
        return replicas.index(tree, 0)


# ------------------------------------------------------------------------------------------- pure pieces
# IMP as functions of (params, optimizer state, mask, key) for any params pytree and any optax optimizer ``tx``
# wrapped in ``masks.masked`` (the mask lives in its state, so one compiled step serves every level). States are
# ``train.TrainState(step, params, batch_stats, opt_state)`` (``batch_stats={}`` for models without BatchNorm);
# :func:`capture` builds one from a loop's variables. :func:`start_level`, :func:`reinit_branch` and
# :func:`fresh_state` are jnp-only (jit/vmap-able); :func:`prune_and_rewind` ranks with masks.magnitude_prune
# (jittable where that is), :func:`random_mask_branch` with masks.random_like (host-side).


def capture(params: PyTree, opt_state: PyTree, step: int | jax.Array = 0,
            batch_stats: PyTree | None = None) -> train.TrainState:
    """A training state for the pieces below: the rewind point (the state at step ``k``: 0 for ``rewind="init"``,
    ``rewind_step`` for ``"step"``), or a level's trained state. The arrays are copied, so a train step that
    donates its input buffers cannot invalidate the point."""
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
    return train.TrainState(jnp.asarray(step, jnp.int32), copy(params), copy({} if batch_stats is None else
                                                                             batch_stats), copy(opt_state))


def fresh_state(tx: optax.GradientTransformation, params: PyTree, mask: PyTree,
                batch_stats: PyTree | None = None) -> train.TrainState:
    """``params`` (masked) with a fresh ``tx.init`` holding ``mask``, at step 0: the optimizer's step counts,
    hence its schedule (and ``optax.inject_hyperparams`` values), start over."""
    st = train.create_state({"params": params, "batch_stats": {} if batch_stats is None else batch_stats}, tx)
    return st._replace(params=masks.apply_mask(st.params, mask), opt_state=masks.with_mask(tx, st.opt_state, mask))


def _masked_state(tx, st: train.TrainState, mask: PyTree, step: int | None = None) -> train.TrainState:
    return train.TrainState(st.step if step is None else jnp.asarray(step, jnp.int32),
                            masks.apply_mask(st.params, mask), st.batch_stats, masks.with_mask(tx, st.opt_state, mask))


def start_level(tx: optax.GradientTransformation, rewind: str, mask: PyTree, trained: train.TrainState,
                point: train.TrainState) -> train.TrainState:
    """Where a pruned level with ``mask`` starts training, from the previous level's ``trained`` state and the
    rewind ``point`` (:func:`capture`):

    * ``init`` / ``step`` — ``point``'s weights, optimizer state and step (pruned entries zeroed);
    * ``lr``       — ``trained``'s surviving weights, a fresh ``tx.init`` at step 0 (the whole schedule again);
    * ``finetune`` — ``trained``'s weights and optimizer state, step 0 (``tx``: the fine-tuning optimizer).

    Train it to the level's end (``num_steps``); ``step`` levels run ``num_steps - k`` steps."""
    if rewind not in REWINDS:
        raise ValueError(f"rewind={rewind!r}: expected one of {REWINDS}")
    if rewind in ("init", "step"):
        return _masked_state(tx, point, mask)
    if rewind == "lr":
        return fresh_state(tx, trained.params, mask, trained.batch_stats)
    return _masked_state(tx, trained, mask, step=0)


def prune_and_rewind(tx: optax.GradientTransformation, rewind: str, trained: train.TrainState,
                     point: train.TrainState, mask: PyTree, prunable: PyTree, fraction: float,
                     scope: str = "global") -> tuple[train.TrainState, PyTree]:
    """One IMP level: prune ``fraction`` of the remaining prunable weights of ``trained`` by magnitude
    (:func:`jaxprune.masks.magnitude_prune`), then :func:`start_level`. Returns ``(start, new_mask)``."""
    new = masks.magnitude_prune(trained.params, mask, prunable, fraction, scope)
    return start_level(tx, rewind, new, trained, point), new


def random_mask_branch(key: jax.Array, tx: optax.GradientTransformation, rewind: str, mask: PyTree,
                       prunable: PyTree, trained: train.TrainState,
                       point: train.TrainState) -> tuple[train.TrainState, PyTree]:
    """The random-mask control: the level's per-layer densities at random positions
    (:func:`jaxprune.masks.random_like`), from the level's start point. Returns ``(start, branch_mask)``."""
    _validate.key(key)
    bmask = masks.random_like(key, mask, prunable)
    return start_level(tx, rewind, bmask, trained, point), bmask


def reinit_branch(tx: optax.GradientTransformation, rewind: str, mask: PyTree, point: train.TrainState,
                  params: PyTree, batch_stats: PyTree | None = None) -> train.TrainState:
    """The reinit control: the level's ``mask`` on fresh weights ``params`` (e.g. the model initialised from
    another key), a fresh optimizer; under ``rewind="step"`` at ``point``'s step and schedule position (fresh
    moments, ``point``'s step counts), as the main branch."""
    fresh = fresh_state(tx, params, mask, batch_stats)
    if rewind == "step":
        return fresh._replace(step=point.step, opt_state=_fresh_moments_at(tx, fresh.opt_state, point.opt_state))
    return fresh


def _fresh_moments_at(tx: optax.GradientTransformation, fresh: masks.MaskedState,
                      at: masks.MaskedState) -> masks.MaskedState:
    """``fresh``'s parameter-shaped leaves (zero moments) with ``at``'s other leaves (step counts, i.e. the
    schedule position): a fresh optimizer that starts where ``at`` stands in the schedule."""
    inner = masks._inner_of(tx)
    is_param = optax.tree_utils.tree_map_params(inner, lambda _: True, fresh.inner,
                                                transform_non_params=lambda _: False)
    return fresh._replace(inner=jax.tree_util.tree_map(lambda p, f, a: f if p else a, is_param, fresh.inner, at.inner))


# ------------------------------------------------------------------------------------------- orchestration
def _make_trainer(task: Task, tx: optax.GradientTransformation) -> train.Trainer:
    """The trainer of the task's replicas (:func:`jaxprune.replicas.make_trainer`); one replica trains with the
    single-run trainer (see :func:`_train_level`)."""
    aug, train_arg = augmentation.by_name(task.augment), graph.takes_train(task.model)
    if task.num_replicas == 1:
        return train.make_trainer(task.model, tx, task.mesh, aug, loss=task.loss, train_arg=train_arg)
    return replicas.make_trainer(task.model, tx, task.num_replicas, task.mesh, task.replica_layout, aug,
                                 loss=task.loss, train_arg=train_arg)


def _base_tx(task: Task) -> tuple[optax.GradientTransformation, optax.Schedule | None]:
    """The task's masked optimizer and (for an OptimConfig) its schedule."""
    if isinstance(task.optim, train.OptimConfig):
        schedule = train.make_schedule(task.optim, task.num_steps)
        return masks.masked(train.make_optimizer(task.optim, schedule)), schedule
    return masks.masked(task.optim), None


class _Setup:
    """Optimizers and compiled trainers for a task, built once and shared by all levels.

    ``finetune_lr``: the constant learning rate of ``rewind="finetune"`` (None: the schedule's final one); with an
    optax optimizer the fine-tuning optimizer is ``task.finetune_optim`` (``finetune_lr`` is None)."""

    def __init__(self, task: Task, keys: Keys | None = None, finetune_lr: float | None = None):
        self.task = task
        self.rep = _Rep(task.seed, task.num_replicas)
        self.tx, self.schedule = _base_tx(task)
        if self.schedule is not None:
            self.finetune_lr = float(self.schedule(task.num_steps) if finetune_lr is None else finetune_lr)
            self.tx_finetune = masks.masked(train.make_optimizer(task.optim,
                                                                 optax.constant_schedule(self.finetune_lr)))
        else:
            self.finetune_lr = None
            self.tx_finetune = None if task.finetune_optim is None else masks.masked(task.finetune_optim)
        self.trainer = _make_trainer(task, self.tx)
        self._trainer_ft = None
        self.init_variables = self.rep.seeded(lambda s: init_variables(task, Keys(s).init))

    def trainer_for(self, rewind: str) -> tuple[train.Trainer, optax.GradientTransformation]:
        if rewind == "finetune":
            if self.tx_finetune is None:
                raise ValueError("rewind='finetune' with an optax optimizer: set Task.finetune_optim (the "
                                 "fine-tuning optimizer, e.g. the same optimizer at a constant learning rate)")
            if self._trainer_ft is None:
                self._trainer_ft = _make_trainer(self.task, self.tx_finetune)
            return self._trainer_ft, self.tx_finetune
        return self.trainer, self.tx

    def fresh(self, variables: dict, mask: PyTree, tx: optax.GradientTransformation) -> train.TrainState:
        return fresh_state(tx, variables["params"], mask, variables.get("batch_stats", {}))


def _evaluate(task: Task, trainer: train.Trainer, state: train.TrainState) -> dict:
    if task.test_batches is not None:
        return train.evaluate_batches(trainer, train.variables_of(state), task.test_batches())
    return train.evaluate(trainer, train.variables_of(state), task.x_test, task.y_test)


def _train_level(setup: _Setup, start: train.TrainState, rewind: str, label: str,
                 snapshot_step: int | None = None) -> tuple[train.RunResult, dict]:
    """Train the stacked ``start`` to the level's end; the run's result (stacked state and snapshot) and its
    evaluation.

    The module's one K = 1 path: a single replica trains as the single run itself, unstacked here and stacked
    back (with :func:`_make_trainer`'s single-run trainer). One replica inside ``vmap`` or an unrolled loop is the
    same arithmetic, but XLA fuses it differently and the last bits of e.g. adam's updates move (BUILD-notes,
    "Replicas always stacked"), so the records of K = 1 runs would change."""
    task = setup.task
    trainer, _ = setup.trainer_for(rewind)
    one = task.num_replicas == 1
    eval_fn = None
    if task.eval_every_epoch:
        eval_fn = lambda s: {f"test_{k}": v for k, v in _evaluate(task, trainer, s).items()}
    data_key = setup.rep.seeded(lambda s: Keys(s).data)
    start, data_key = (replicas.index(start, 0), data_key[0]) if one else (start, data_key)
    if task.train_batches is not None:
        res = train.run_batches(trainer, start, task.train_batches(int(start.step)), num_steps=task.num_steps,
                                data_key=data_key, snapshot_step=snapshot_step, log_prefix=label, eval_fn=eval_fn)
    else:
        res = train.run(trainer, start, task.x_train, task.y_train, batch_size=task.batch_size,
                        num_steps=task.num_steps, data_key=data_key, loop=task.loop,
                        snapshot_step=snapshot_step, log_prefix=label, eval_fn=eval_fn)
    ev = _evaluate(task, trainer, res.state)
    if one:  # back to the stacked form; metrics stay floats (a single replica's, read by _pick)
        restack = lambda t: None if t is None else replicas.stack([t])
        res = dataclasses.replace(res, state=restack(res.state), snapshot=restack(res.snapshot))
    return res, ev


def _start_state(setup: _Setup, cfg: ImpConfig, mask: PyTree, prev: train.TrainState,
                 rewind_point: train.TrainState, init_vars: dict | None = None) -> train.TrainState:
    """Start point of a pruned level (``init_vars`` replaces the weights for the reinit branch)."""
    _, tx = setup.trainer_for(cfg.rewind)
    if init_vars is not None:
        return reinit_branch(tx, cfg.rewind, mask, rewind_point, init_vars["params"], init_vars.get("batch_stats", {}))
    return start_level(tx, cfg.rewind, mask, prev, rewind_point)


def _level_record(level: int, mask: PyTree, prunable: PyTree, res: train.RunResult, ev: dict) -> dict:
    """A level's record from its stacked run: one replica's record as it is (K = 1: the record of a single
    run), K > 1 summarised (:func:`_summary`)."""
    reps = [_replica_record(level, replicas.index(mask, r), prunable, _pick_result(res, r),
                            {m: _pick(v, r) for m, v in ev.items()}) for r in range(replicas.num_replicas(mask))]
    return reps[0] if len(reps) == 1 else _summary(level, reps)


def _replica_record(level: int, mask: PyTree, prunable: PyTree, res: train.RunResult, ev: dict) -> dict:
    rep = masks.density_report(mask, prunable)
    return {"level": level, "density": rep["density"], "kept_weights": rep["kept"], "prunable_weights": rep["total"],
            "test_accuracy": ev["accuracy"], "test_loss": ev["loss"], "train_loss": res.train_loss,
            "train_accuracy": res.train_accuracy, "steps": int(res.state.step), "seconds": res.seconds,
            "layer_densities": rep["layers"], "history": res.history}


def _pick(value: Any, r: int) -> Any:
    """Replica ``r``'s value of a metric: per-replica metrics of K > 1 are lists (:func:`jaxprune.train.run`);
    shared ones (a history entry's epoch and step) and a single replica's are scalars."""
    return value[r] if isinstance(value, list) else value


def _pick_result(res: train.RunResult, r: int) -> train.RunResult:
    """Replica ``r`` of a run's result (stacked state)."""
    return dataclasses.replace(res, state=replicas.index(res.state, r), train_loss=_pick(res.train_loss, r),
                               train_accuracy=_pick(res.train_accuracy, r), snapshot=None,
                               history=[{k: _pick(v, r) for k, v in h.items()} for h in res.history])


SUMMARY_KEYS = ("density", "test_accuracy", "test_loss", "train_loss", "train_accuracy")


def _summary(level: int, reps: list[dict]) -> dict:
    """One level over K replicas: means under the usual keys, ``<key>_std`` (ddof = 1,
    :func:`jaxprune.conventions.summary`), per-replica records."""
    out: dict = {"level": level, "num_replicas": len(reps)}
    for key in SUMMARY_KEYS:
        s = conventions.summary([r[key] for r in reps])
        out[key], out[f"{key}_std"] = s["mean"], s["std"]
    for key in ("kept_weights", "prunable_weights", "steps"):  # equal across replicas (exact pruning counts)
        vals = [r[key] for r in reps]
        out[key] = vals[0] if len(set(vals)) == 1 else float(np.mean(vals))
    out["seconds"] = reps[0]["seconds"]  # the replicas train together
    out["layer_densities"] = {n: float(np.mean([r["layer_densities"][n] for r in reps]))
                              for n in reps[0]["layer_densities"]}
    out["replicas"] = reps
    return out


def _ckpt_tree(state: train.TrainState, mask: PyTree, rewind_point: train.TrainState, level: int, seed: int,
               num_replicas: int = 1):
    """A level's checkpoint tree in memory (stacked: leaves ``(K, …)``, K = 1 included)."""
    rep = _Rep(seed, num_replicas)
    return {"state": state, "mask": mask, "rewind_point": rewind_point,
            "level": rep.seeded(lambda s: jnp.asarray(level, jnp.int32)), "rng": rep.seeded(jax.random.PRNGKey)}


def checkpoint_form(tree: PyTree, num_replicas: int, *, to_disk: bool) -> PyTree:
    """The one conversion between a level's tree in memory and in its checkpoint (``to_disk=False``: back).

    In memory (inside :func:`run`) every leaf is stacked, ``(K, …)``, K = 1 included. On disk — and as
    :func:`load_level` and ``run``'s ``on_checkpoint`` hand it out — K > 1 is stacked the same way and K = 1 is
    stored unstacked, ``(…)``: the format of every workdir written so far, kept so that old workdirs resume and
    old readers work. K > 1: ``tree`` itself."""
    if num_replicas > 1:
        return tree
    if to_disk:
        return replicas.index(tree, 0)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], tree)


def finished_levels(workdir: Path) -> list[int]:
    """The levels ``0..k`` finished in ``workdir`` (a ``level_j/level.json`` each), consecutive from 0."""
    done = []
    k = 0
    while (workdir / f"level_{k}" / "level.json").exists():
        done.append(k)
        k += 1
    return done


def _template(task: Task, seed: int) -> PyTree:
    """The restore template of a level's checkpoint, in the disk form (:func:`checkpoint_form`)."""
    tx, _ = _base_tx(task)
    st = _Rep(seed, task.num_replicas).seeded(lambda s: train.create_state(init_variables(task, Keys(s).init), tx))
    tree = _ckpt_tree(st, masks.ones_like(st.params), st, 0, seed, task.num_replicas)
    return checkpoint_form(tree, task.num_replicas, to_disk=True)


def _redo_hint(d: Path) -> str:
    return f"; delete {d} to train that level again (later levels are then retrained too)"


def read_level(workdir: str | Path, level: int, seed: int | None = None) -> dict:
    """The record (``level.json``) of a finished level, verified: a corrupt or edited file, or one that records
    another level (or, given ``seed``, another seed) than its folder's, is a ValueError naming it."""
    d = Path(workdir) / f"level_{level}"
    expect = {"level": level} if seed is None else {"level": level, "seed": seed}
    return checkpoint.read_record(d / "level.json", expect=expect, hint=_redo_hint(d))


def load_level(workdir: str | Path, level: int, task: Task) -> dict:
    """The checkpoint of a finished level: ``{"state", "mask", "rewind_point", "level", "rng"}`` as stored
    (:func:`checkpoint_form`: stacked trees, a leading replica axis on every leaf, when ``task.num_replicas > 1``;
    a single run's trees otherwise). Checked against the sha256 in ``level.json``."""
    path = Path(workdir) / f"level_{level}"
    if not (path / "level.json").exists():
        raise FileNotFoundError(f"level {level} of {workdir} is not finished (no {path / 'level.json'})")
    rec = read_level(workdir, level, task.seed)
    return checkpoint.restore_recorded(path / "checkpoint", _template(task, task.seed), rec, hint=_redo_hint(path))


class _Carry(NamedTuple):
    """What one level hands the next (stacked trees): its trained state, its mask and the rewind point."""

    prev: train.TrainState | None  # None before level 0
    mask: PyTree
    rewind_point: train.TrainState


def run(task: Task, cfg: ImpConfig, workdir: str | Path | None, *,
        on_level: Callable[[list[dict]], None] | None = None,
        before_start: Callable[[Path], None] | None = None,
        on_checkpoint: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Run (or resume) IMP in ``workdir``; returns one record per level (see module docstring).

    ``workdir=None``: in memory, nothing written and nothing resumed. ``before_start(workdir)``: called once the
    settings are known to be valid and before anything is written — where a caller checks its own run identity
    (``experiments.imp`` stores its flags with :func:`jaxprune.checkpoint.check_run_config`), so a refused or
    corrected run leaves nothing behind. ``on_level(records)`` is called after each finished level (results files, plots);
    ``on_checkpoint(level, tree)`` with the level's checkpoint tree (as :func:`load_level` returns it), also when
    ``workdir`` is None.

    Steps: :func:`_validated_setup` (every refusal before anything is written), :func:`_resume` (finished levels'
    records and where to go on), then per level :func:`_one_level` (prune, train, branch) and :func:`_keep_level`
    (checkpoint and record).
    """
    workdir = None if workdir is None else Path(workdir)
    setup = _validated_setup(task, cfg)
    prunable = prunable_tree(task, cfg, setup.rep.first(setup.init_variables)["params"])
    # Settings are recorded only once they are known to be valid, so a corrected rerun is not refused; the
    # workdir is created only then, so a refused run leaves nothing behind.
    if workdir is not None:
        if before_start is not None:
            before_start(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    records, carry = _resume(setup, cfg, workdir)
    for level in range(len(records), cfg.levels + 1):
        t0 = time.perf_counter()
        rec, carry = _one_level(setup, cfg, prunable, level, carry)
        rec["wall_seconds"] = time.perf_counter() - t0
        rec = _keep_level(setup, workdir, level, rec, carry, on_checkpoint)
        logging.info("[level %d] density %.4f test accuracy %.4f", level, rec["density"], rec["test_accuracy"])
        records.append(rec)
        if on_level is not None:
            on_level(records)
    return records


def _validated_setup(task: Task, cfg: ImpConfig) -> _Setup:
    """The run's :class:`_Setup`, after refusing settings of ``cfg`` that do not fit ``task`` (all before any
    training or writing)."""
    if cfg.rewind == "step" and cfg.rewind_step >= task.num_steps:
        raise ValueError(f"rewind_step={cfg.rewind_step}: expected a step before the end of training "
                         f"(0 <= rewind_step < {task.num_steps}, the training length in steps)")
    optax_optim = not isinstance(task.optim, train.OptimConfig)
    if optax_optim and cfg.finetune_lr is not None:
        raise ValueError(f"finetune_lr={cfg.finetune_lr}: with an optax optimizer set Task.finetune_optim instead "
                         "(the fine-tuning optimizer itself)")
    if optax_optim and cfg.rewind == "finetune" and task.finetune_optim is None:
        raise ValueError("rewind='finetune' with an optax optimizer: set Task.finetune_optim (the fine-tuning "
                         "optimizer, e.g. the same optimizer at a constant learning rate)")
    setup = _Setup(task, Keys(task.seed), cfg.finetune_lr)
    if cfg.rewind == "finetune" and not optax_optim and setup.finetune_lr <= 0:
        raise ValueError(f"--rewind=finetune trains at the final learning rate of --schedule={task.optim.schedule}, "
                         f"which is {setup.finetune_lr}: no weight would change. Set --finetune_lr (ImpConfig."
                         "finetune_lr) to a positive learning rate")
    first = setup.rep.first(setup.init_variables)
    if cfg.rewind == "finetune" and optax_optim:  # fine-tuning continues the trained optimizer state
        shapes = jax.eval_shape(lambda v: (setup.tx.init(v["params"]), setup.tx_finetune.init(v["params"])), first)
        if jax.tree_util.tree_structure(shapes[0]) != jax.tree_util.tree_structure(shapes[1]):
            raise ValueError("Task.finetune_optim: its state has another structure than optim's, so fine-tuning "
                             "cannot continue the trained optimizer state; expected the same optimizer with another "
                             "learning rate (e.g. optax.adamw(optax.constant_schedule(1e-4)) beside "
                             "optax.adamw(schedule))")
    _check_labels(task, first)
    return setup


def _resume(setup: _Setup, cfg: ImpConfig, workdir: Path | None) -> tuple[list[dict], _Carry | None]:
    """The records of the levels already finished in ``workdir`` and where the next level starts: the last
    finished level's checkpoint, or the initial state (``carry`` None: the run is complete)."""
    task = setup.task
    done = [] if workdir is None else finished_levels(workdir)
    if len(done) > cfg.levels + 1:  # lowering would drop finished levels from the results
        raise ValueError(f"levels={cfg.levels}: {workdir} already holds {len(done)} finished levels (0..{done[-1]}, "
                         f"i.e. --levels={done[-1]}); --levels may be raised to extend a run, not lowered below "
                         f"{done[-1]} (use a new --workdir for a shorter run)")
    records = [read_level(workdir, k, task.seed) for k in done]
    if done:
        logging.info("resuming %s: levels %s already finished", workdir, done)
    if len(done) == cfg.levels + 1:
        logging.info("run in %s is complete (%d levels); nothing to do", workdir, len(done))
        return records, None
    if done:
        ck = checkpoint_form(load_level(workdir, done[-1], task), task.num_replicas, to_disk=False)
        return records, _Carry(ck["state"], ck["mask"], ck["rewind_point"])
    dense_mask = masks.ones_like(setup.init_variables["params"])
    init_state = setup.rep.device(lambda v, m: setup.fresh(v, m, setup.tx), setup.init_variables, dense_mask)
    return records, _Carry(None, dense_mask, init_state)


def _one_level(setup: _Setup, cfg: ImpConfig, prunable: PyTree, level: int, carry: _Carry) -> tuple[dict, _Carry]:
    """Level ``level``: prune ``carry``'s trained state (level > 0), train from the rewind point (and the control
    branch beside it); its record and what it hands the next level."""
    rep, label = setup.rep, f"[level {level}] "
    if level == 0:  # the dense run from the initial state, which is the rewind point unless rewind="step"
        snap = cfg.rewind_step if cfg.rewind == "step" else None
        res, ev = _train_level(setup, carry.rewind_point, "init", label, snapshot_step=snap)
        mask, point = carry.mask, res.snapshot if cfg.rewind == "step" else carry.rewind_point
    else:
        mask = rep.host(lambda p, m: masks.magnitude_prune(p, m, prunable, cfg.fraction, cfg.scope),
                        carry.prev.params, carry.mask)
        point = carry.rewind_point
        start = rep.device(lambda m, p, rp: _start_state(setup, cfg, m, p, rp), mask, carry.prev, point)
        res, ev = _train_level(setup, start, cfg.rewind, label)
    rec = _level_record(level, mask, prunable, res, ev)
    if level > 0 and cfg.branch != "none":
        rec["branch"] = _run_branch(setup, cfg, level, prunable, _Carry(carry.prev, mask, point))
    return rec, _Carry(res.state, mask, point)


def _keep_level(setup: _Setup, workdir: Path | None, level: int, rec: dict, carry: _Carry,
                on_checkpoint: Callable[[int, dict], None] | None) -> dict:
    """Level ``level``'s checkpoint (:func:`checkpoint_form`) and record, written to ``workdir`` (when given) and
    handed to ``on_checkpoint``; returns the record as stored."""
    task = setup.task
    tree = _ckpt_tree(carry.prev, carry.mask, carry.rewind_point, level, task.seed, task.num_replicas)
    tree = checkpoint_form(tree, task.num_replicas, to_disk=True)
    if workdir is not None:
        rec = _save_level(workdir / f"level_{level}", tree, rec, task.seed)
    if on_checkpoint is not None:
        on_checkpoint(level, tree)
    return rec


def _run_branch(setup: _Setup, cfg: ImpConfig, level: int, prunable: PyTree, at: _Carry) -> dict:
    """The control branch of level ``level`` (``at``: the previous level's trained state, the level's mask and
    the rewind point): its record, without history."""
    label = f"[level {level} {cfg.branch}] "
    rep = setup.rep
    if cfg.branch == "random_mask":
        bkeys = rep.seeded(lambda s: Keys(s).random_mask(level))
        bmask = rep.host(lambda k, m: masks.random_like(k, m, prunable), bkeys, at.mask)
        start = rep.device(lambda m, p, rp: _start_state(setup, cfg, m, p, rp), bmask, at.prev, at.rewind_point)
    else:
        bmask = at.mask
        fresh = rep.seeded(lambda s: init_variables(setup.task, Keys(s).reinit(level)))
        start = rep.device(lambda m, p, rp, iv: _start_state(setup, cfg, m, p, rp, init_vars=iv),
                           bmask, at.prev, at.rewind_point, fresh)
    res, ev = _train_level(setup, start, cfg.rewind, label)
    rec = _level_record(level, bmask, prunable, res, ev)
    for r in [rec, *rec.get("replicas", ())]:
        r.pop("history", None)
    return {"name": cfg.branch, **rec}


def _save_level(d: Path, tree: PyTree, rec: dict, seed: int) -> dict:
    """Write level ``d`` whole or not at all: checkpoint and record go to ``<d>.partial/``, renamed to ``d`` when
    complete, with SIGINT held back meanwhile; returns the record as stored (with its identity, level and seed)."""
    part = d.with_name(d.name + ".partial")
    with checkpoint.interrupts_deferred():
        for old in (part, d):
            if old.exists():  # a partial level from a crash (or an older version's): start it over
                shutil.rmtree(old)
        part.mkdir(parents=True)
        rec = {**rec, "checkpoint_sha256": checkpoint.save(part / "checkpoint", tree)}  # checked by load_level
        stored = checkpoint.write_record(part / "level.json", rec, {"level": rec["level"], "seed": seed})
        os.replace(part, d)
    stored.pop(checkpoint.RECORD_SHA)
    return stored

