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
complete; it records the checkpoint's sha256 (``checkpoint_sha256``), checked when the level is loaded (files
written before the checksum existed load unchecked). Re-running resumes after the last finished level; every
random stream is derived from ``seed`` and the level, so a resumed run equals an uninterrupted one. ``levels`` may
be raised to extend a run, never lowered below the levels already finished.

Replicas (``Task.num_replicas = K > 1``): seeds ``seed, seed+1, …, seed+K-1`` run as one compiled program
(:mod:`jaxprune.replicas`), each with its own initialisation, data order, masks and branch keys — replica ``r`` is
the run with seed ``seed + r``. Checkpoints hold the stacked trees (a leading K axis on every leaf); a level record
holds the mean over replicas under the usual keys, ``<key>_std`` (sample standard deviation) and the per-replica
records under ``replicas``. ``Task.mesh``: train data-parallel over that mesh (:mod:`jaxprune.distributed`).
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxprune import augment as augmentation
from jaxprune import checkpoint, masks, models, replicas, train

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
    finetune_lr: float | None = None  # rewind="finetune": constant learning rate (None: the schedule's final one)

    def __post_init__(self):
        if self.levels < 0:
            raise ValueError(f"levels={self.levels}: expected >= 0")
        if not 0.0 < self.fraction < 1.0:
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
    """Everything a level's training needs: the model, data (device arrays) and the training recipe."""

    model: nn.Module
    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    optim: train.OptimConfig
    num_steps: int
    batch_size: int
    seed: int = 0
    loop: str = "auto"
    eval_every_epoch: bool = False
    num_replicas: int = 1  # K seeds (seed, seed+1, …) trained as one vmapped program
    replica_layout: str = "vmap"  # see jaxprune.replicas.LAYOUTS
    mesh: Any = None  # jax.sharding.Mesh for data-parallel training (None: the default device)
    augment: str = "none"  # training-batch augmentation, a name of jaxprune.augment.NAMES

    def __post_init__(self):
        augmentation.by_name(self.augment)  # refuses unknown names
        if not (isinstance(self.num_replicas, int) and self.num_replicas >= 1):
            raise ValueError(f"num_replicas={self.num_replicas!r}: expected an integer >= 1")
        if self.replica_layout not in replicas.LAYOUTS:
            raise ValueError(f"replica_layout={self.replica_layout!r}: expected one of {replicas.LAYOUTS}")


def expected_density(level: int, fraction: float) -> float:
    return (1.0 - fraction) ** level


class _Keys:
    """Every random stream, derived from the seed alone (resume-safe)."""

    def __init__(self, seed: int):
        root = jax.random.PRNGKey(seed)
        self.init, self.data, self.branch = jax.random.split(root, 3)

    def reinit(self, level: int) -> jax.Array:
        return jax.random.fold_in(self.branch, 2 * level)

    def random_mask(self, level: int) -> jax.Array:
        return jax.random.fold_in(self.branch, 2 * level + 1)


class _Rep:
    """Per-replica operations: plain calls for one replica (unstacked trees), vmap / host loops for K stacked."""

    def __init__(self, seed: int, num_replicas: int = 1):
        self.k = num_replicas
        self.seeds = [seed + r for r in range(num_replicas)]

    def seeded(self, fn: Callable[[int], PyTree]) -> PyTree:
        """``fn(seed)`` for each replica's seed, stacked when K > 1."""
        return fn(self.seeds[0]) if self.k == 1 else replicas.stack([fn(s) for s in self.seeds])

    def device(self, fn: Callable, *trees: PyTree) -> PyTree:
        """A jnp function of single-replica trees, applied per replica (``jax.vmap``)."""
        return fn(*trees) if self.k == 1 else jax.vmap(fn)(*trees)

    def host(self, fn: Callable, *trees: PyTree) -> PyTree:
        """A host-side (numpy) function of single-replica trees, looped over replicas and stacked."""
        return fn(*trees) if self.k == 1 else replicas.map_host(fn, *trees)

    def first(self, tree: PyTree) -> PyTree:
        return tree if self.k == 1 else replicas.index(tree, 0)


def _make_trainer(task: Task, tx: optax.GradientTransformation) -> train.Trainer:
    aug = augmentation.by_name(task.augment)
    if task.num_replicas == 1:
        return train.make_trainer(task.model, tx, task.mesh, aug)
    return replicas.make_trainer(task.model, tx, task.num_replicas, task.mesh, task.replica_layout, aug)


class _Setup:
    """Optimizers and compiled trainers for a task, built once and shared by all levels.

    ``finetune_lr``: the constant learning rate of ``rewind="finetune"`` (None: the schedule's final one)."""

    def __init__(self, task: Task, keys: _Keys | None = None, finetune_lr: float | None = None):
        self.task = task
        self.rep = _Rep(task.seed, task.num_replicas)
        self.schedule = train.make_schedule(task.optim, task.num_steps)
        self.tx = masks.masked(train.make_optimizer(task.optim, self.schedule))
        self.finetune_lr = float(self.schedule(task.num_steps) if finetune_lr is None else finetune_lr)
        self.tx_finetune = masks.masked(train.make_optimizer(task.optim,
                                                             optax.constant_schedule(self.finetune_lr)))
        self.trainer = _make_trainer(task, self.tx)
        self._trainer_ft = None
        self.init_variables = self.rep.seeded(lambda s: models.init(task.model, _Keys(s).init, task.x_train.shape))

    def trainer_for(self, rewind: str) -> tuple[train.Trainer, optax.GradientTransformation]:
        if rewind == "finetune":
            if self._trainer_ft is None:
                self._trainer_ft = _make_trainer(self.task, self.tx_finetune)
            return self._trainer_ft, self.tx_finetune
        return self.trainer, self.tx

    def fresh(self, variables: dict, mask: PyTree, tx: optax.GradientTransformation) -> train.TrainState:
        st = train.create_state(variables, tx)
        return st._replace(params=masks.apply_mask(st.params, mask), opt_state=masks.with_mask(tx, st.opt_state, mask))


def _fresh_moments_at(tx: optax.GradientTransformation, fresh: masks.MaskedState,
                      at: masks.MaskedState) -> masks.MaskedState:
    """``fresh``'s parameter-shaped leaves (zero moments) with ``at``'s other leaves (step counts, i.e. the
    schedule position): a fresh optimizer that starts where ``at`` stands in the schedule."""
    inner = masks._inner_of(tx)
    is_param = optax.tree_utils.tree_map_params(inner, lambda _: True, fresh.inner,
                                                transform_non_params=lambda _: False)
    return fresh._replace(inner=jax.tree_util.tree_map(lambda p, f, a: f if p else a, is_param, fresh.inner, at.inner))


def _masked_state(tx, st: train.TrainState, mask: PyTree, step: int | None = None) -> train.TrainState:
    return train.TrainState(st.step if step is None else jnp.asarray(step, jnp.int32),
                            masks.apply_mask(st.params, mask), st.batch_stats, masks.with_mask(tx, st.opt_state, mask))


def _train_level(setup: _Setup, start: train.TrainState, rewind: str, label: str,
                 snapshot_step: int | None = None) -> tuple[train.RunResult, dict]:
    task = setup.task
    trainer, _ = setup.trainer_for(rewind)
    eval_fn = None
    if task.eval_every_epoch:
        eval_fn = lambda s: {f"test_{k}": v for k, v in train.evaluate(trainer, train.variables_of(s),
                                                                       task.x_test, task.y_test).items()}
    res = train.run(trainer, start, task.x_train, task.y_train, batch_size=task.batch_size,
                    num_steps=task.num_steps, data_key=setup.rep.seeded(lambda s: _Keys(s).data), loop=task.loop,
                    snapshot_step=snapshot_step, log_prefix=label, eval_fn=eval_fn)
    ev = train.evaluate(trainer, train.variables_of(res.state), task.x_test, task.y_test)
    return res, ev


def _start_state(setup: _Setup, cfg: ImpConfig, mask: PyTree, prev: train.TrainState,
                 rewind_point: train.TrainState, init_vars: dict | None = None) -> train.TrainState:
    """Start point of a pruned level (``init_vars`` replaces the weights for the reinit branch)."""
    _, tx = setup.trainer_for(cfg.rewind)
    if init_vars is not None:
        fresh = setup.fresh(init_vars, mask, tx)
        if cfg.rewind == "step":  # fresh weights and moments, the schedule at step k as in the main branch
            return fresh._replace(step=rewind_point.step,
                                  opt_state=_fresh_moments_at(tx, fresh.opt_state, rewind_point.opt_state))
        return fresh
    if cfg.rewind in ("init", "step"):
        return _masked_state(tx, rewind_point, mask)
    if cfg.rewind == "lr":
        return setup.fresh({"params": prev.params, "batch_stats": prev.batch_stats}, mask, tx)
    # finetune: trained weights and optimizer moments, the final learning rate, a full run of steps.
    return _masked_state(tx, prev, mask, step=0)


def _level_record(level: int, mask: PyTree, prunable: PyTree, res: train.RunResult, ev: dict) -> dict:
    if isinstance(ev["accuracy"], list):  # K stacked replicas
        k = len(ev["accuracy"])
        return _summary(level, [_level_record(level, replicas.index(mask, r), prunable, _pick_result(res, r),
                                              {m: v[r] for m, v in ev.items()}) for r in range(k)])
    rep = masks.density_report(mask, prunable)
    return {"level": level, "density": rep["density"], "kept_weights": rep["kept"], "prunable_weights": rep["total"],
            "test_accuracy": ev["accuracy"], "test_loss": ev["loss"], "train_loss": res.train_loss,
            "train_accuracy": res.train_accuracy, "steps": int(res.state.step), "seconds": res.seconds,
            "layer_densities": rep["layers"], "history": res.history}


def _pick_result(res: train.RunResult, r: int) -> train.RunResult:
    """Replica ``r`` of a stacked run's result."""
    pick = lambda v: v[r] if isinstance(v, list) else v
    return dataclasses.replace(res, state=replicas.index(res.state, r), train_loss=pick(res.train_loss),
                               train_accuracy=pick(res.train_accuracy), snapshot=None,
                               history=[{k: pick(v) for k, v in h.items()} for h in res.history])


SUMMARY_KEYS = ("density", "test_accuracy", "test_loss", "train_loss", "train_accuracy")


def _summary(level: int, reps: list[dict]) -> dict:
    """One level over K replicas: means under the usual keys, ``<key>_std`` (ddof=1), per-replica records."""
    out: dict = {"level": level, "num_replicas": len(reps)}
    for key in SUMMARY_KEYS:
        vals = np.asarray([r[key] for r in reps], np.float64)
        out[key], out[f"{key}_std"] = float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
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
    rep = _Rep(seed, num_replicas)
    return {"state": state, "mask": mask, "rewind_point": rewind_point,
            "level": rep.seeded(lambda s: jnp.asarray(level, jnp.int32)), "rng": rep.seeded(jax.random.PRNGKey)}


def finished_levels(workdir: Path) -> list[int]:
    done = []
    k = 0
    while (workdir / f"level_{k}" / "level.json").exists():
        done.append(k)
        k += 1
    return done


def _template(task: Task, seed: int) -> PyTree:
    tx = masks.masked(train.make_optimizer(task.optim, train.make_schedule(task.optim, task.num_steps)))
    init = lambda s: models.init(task.model, _Keys(s).init, task.x_train.shape)
    st = _Rep(seed, task.num_replicas).seeded(lambda s: train.create_state(init(s), tx))
    return _ckpt_tree(st, masks.ones_like(st.params), st, 0, seed, task.num_replicas)


def _redo_hint(d: Path) -> str:
    return f"; delete {d} to train that level again (later levels are then retrained too)"


def read_level(workdir: str | Path, level: int) -> dict:
    """The record (``level.json``) of a finished level; a corrupt file is a ValueError naming it."""
    d = Path(workdir) / f"level_{level}"
    return checkpoint.read_json(d / "level.json", hint=_redo_hint(d))


def load_level(workdir: str | Path, level: int, task: Task) -> dict:
    """The checkpoint of a finished level: ``{"state", "mask", "rewind_point", "level", "rng"}`` (stacked trees,
    a leading replica axis on every leaf, when ``task.num_replicas > 1``). Checked against the sha256 in
    ``level.json`` where one is recorded."""
    path = Path(workdir) / f"level_{level}"
    if not (path / "level.json").exists():
        raise FileNotFoundError(f"level {level} of {workdir} is not finished (no {path / 'level.json'})")
    sha = read_level(workdir, level).get("checkpoint_sha256")
    return checkpoint.restore(path / "checkpoint", _template(task, task.seed), sha256=sha, hint=_redo_hint(path))


def run(task: Task, cfg: ImpConfig, workdir: str | Path, *, config_record: dict | None = None,
        on_level: Callable[[list[dict]], None] | None = None, added_later: dict | None = None) -> list[dict]:
    """Run (or resume) IMP in ``workdir``; returns one record per level (see module docstring).

    ``config_record``: the full settings, stored in ``config.json``; a workdir holding a run with other settings is
    refused. ``added_later``: the caller's settings that older ``config.json`` files lack, with the values those
    runs used. ``on_level(records)`` is called after each finished level (results files, plots).
    """
    workdir = Path(workdir)
    if cfg.rewind == "step" and cfg.rewind_step >= task.num_steps:
        raise ValueError(f"rewind_step={cfg.rewind_step}: expected a step before the end of training "
                         f"(0 <= rewind_step < {task.num_steps}, the training length in steps)")
    keys = _Keys(task.seed)
    setup = _Setup(task, keys, cfg.finetune_lr)
    if cfg.rewind == "finetune" and setup.finetune_lr <= 0:
        raise ValueError(f"--rewind=finetune trains at the final learning rate of --schedule={task.optim.schedule}, "
                         f"which is {setup.finetune_lr}: no weight would change. Set --finetune_lr (ImpConfig."
                         "finetune_lr) to a positive learning rate")
    rep = setup.rep
    prunable = masks.prunable_leaves(rep.first(setup.init_variables)["params"], exclude=cfg.exclude,
                                     biases=cfg.prune_biases)
    # Settings are recorded only once they are known to be valid, so a corrected rerun is not refused; the
    # workdir is created only then, so a refused run leaves nothing behind.
    if config_record is not None:
        checkpoint.check_run_config(workdir, config_record, _VOLATILE, {**_ADDED_LATER, **(added_later or {})})
    workdir.mkdir(parents=True, exist_ok=True)
    dense_mask = masks.ones_like(setup.init_variables["params"])
    init_state = rep.device(lambda v, m: setup.fresh(v, m, setup.tx), setup.init_variables, dense_mask)

    done = finished_levels(workdir)
    if len(done) > cfg.levels + 1:  # lowering would drop finished levels from the results
        raise ValueError(f"levels={cfg.levels}: {workdir} already holds {len(done)} finished levels (0..{done[-1]}, "
                         f"i.e. --levels={done[-1]}); --levels may be raised to extend a run, not lowered below "
                         f"{done[-1]} (use a new --workdir for a shorter run)")
    records = [read_level(workdir, k) for k in done]
    if done:
        logging.info("resuming %s: levels %s already finished", workdir, done)
    if len(done) == cfg.levels + 1:
        logging.info("run in %s is complete (%d levels); nothing to do", workdir, len(done))
        return records

    if done:
        ck = load_level(workdir, done[-1], task)
        prev, mask, rewind_point = ck["state"], ck["mask"], ck["rewind_point"]
    else:
        prev, mask, rewind_point = None, dense_mask, init_state

    for level in range(len(done), cfg.levels + 1):
        t0 = time.perf_counter()
        label = f"[level {level}] "
        if level == 0:
            snap = cfg.rewind_step if cfg.rewind == "step" else None
            res, ev = _train_level(setup, init_state, "init", label, snapshot_step=snap)
            if cfg.rewind == "step":
                rewind_point = res.snapshot
        else:
            mask = rep.host(lambda p, m: masks.magnitude_prune(p, m, prunable, cfg.fraction, cfg.scope),
                            prev.params, mask)
            start = rep.device(lambda m, p, rp: _start_state(setup, cfg, m, p, rp), mask, prev, rewind_point)
            res, ev = _train_level(setup, start, cfg.rewind, label)
        rec = _level_record(level, mask, prunable, res, ev)
        if level > 0 and cfg.branch != "none":
            rec["branch"] = _run_branch(setup, cfg, keys, level, mask, prunable, prev, rewind_point)
        rec["wall_seconds"] = time.perf_counter() - t0
        _save_level(workdir / f"level_{level}",
                    _ckpt_tree(res.state, mask, rewind_point, level, task.seed, task.num_replicas), rec)
        logging.info("%sdensity %.4f test accuracy %.4f", label, rec["density"], rec["test_accuracy"])
        records.append(rec)
        prev = res.state
        if on_level is not None:
            on_level(records)
    return records


def _run_branch(setup: _Setup, cfg: ImpConfig, keys: _Keys, level: int, mask, prunable, prev, rewind_point) -> dict:
    label = f"[level {level} {cfg.branch}] "
    rep = setup.rep
    if cfg.branch == "random_mask":
        bkeys = rep.seeded(lambda s: _Keys(s).random_mask(level))
        bmask = rep.host(lambda k, m: masks.random_like(k, m, prunable), bkeys, mask)
        start = rep.device(lambda m, p, rp: _start_state(setup, cfg, m, p, rp), bmask, prev, rewind_point)
    else:
        bmask = mask
        fresh = rep.seeded(lambda s: models.init(setup.task.model, _Keys(s).reinit(level), setup.task.x_train.shape))
        start = rep.device(lambda m, p, rp, iv: _start_state(setup, cfg, m, p, rp, init_vars=iv),
                           bmask, prev, rewind_point, fresh)
    res, ev = _train_level(setup, start, cfg.rewind, label)
    rec = _level_record(level, bmask, prunable, res, ev)
    for r in [rec, *rec.get("replicas", ())]:
        r.pop("history", None)
    return {"name": cfg.branch, **rec}


def _save_level(d: Path, tree: PyTree, rec: dict) -> None:
    if d.exists():  # a partial level from a crash: start it over
        shutil.rmtree(d)
    d.mkdir(parents=True)
    rec["checkpoint_sha256"] = checkpoint.save(d / "checkpoint", tree)  # checked by load_level
    checkpoint.write_json(d / "level.json", rec)  # the "finished" marker, written last


# May change between a run and its resumption (they do not change results).
_VOLATILE = ("workdir", "levels", "eval_every_epoch", "replica_layout", "coordinator_address", "num_processes",
             "process_id", "distributed")
# Settings added after workdirs were first written: a config.json without them ran with these values.
_ADDED_LATER = {"num_replicas": 1}
