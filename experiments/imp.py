"""Iterative magnitude pruning with rewinding: ``python -m experiments.imp --flagfile=experiments/configs/X.cfg``.

Writes to ``--workdir``: ``config.json``, ``level_k/`` (orbax checkpoint + ``level.json``), ``results.json``,
``metrics.csv``, ``accuracy_vs_density.png``, ``layer_densities.png``. Re-running the same command resumes after
the last finished level; a finished run is reported and skipped.

``--analyses=similarity,overlap,instability`` (any subset; default none) analyses every finished level and writes
``analysis.json`` (one record per level), ``analysis_timing.json`` and ``analysis_*.png`` (see
:func:`run_analyses`); like the levels, a finished level's analysis is not recomputed, unless its settings or the
checkpoints it was computed from changed.

Importable without side effects: :func:`train_and_evaluate` takes a config dict (keys = flag names, defaults in
``DEFAULTS``); :func:`load_levels` reads a finished workdir back for analysis (similarity, LRP, …).

``--seeds=s,s+1,…,s+K-1`` (or ``--seeds=s:s+K``) trains the K seeds as one vmapped program (replicas);
``results.json`` then holds the mean over replicas under the usual keys, ``<key>_std`` (ddof = 1) and the
per-replica records under ``replicas``. Training is
data-parallel over all devices (``--batch_size`` must be a multiple of the device count); for several hosts see
:mod:`jaxprune.distributed` (``--coordinator_address``, ``--num_processes``, ``--process_id``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, logging

from experiments import common
from jaxprune import analysis, checkpoint, conventions, distributed, imp, masks, models, plots, replicas, train
from jaxprune import augment as augmentation

SPEC = [
    ("dataset", "digits", "digits (embedded), mnist, fashion_mnist, moons, circles, spiral, or a TFDS name"),
    ("data_dir", "", "data directory (default: $JAXPRUNE_DATA_DIR, else ~/tensorflow_datasets)"),
    ("normalize", "none", "input scaling: [0,1] as loaded, train mean/std, or [-1,1]", common.NORMALIZATIONS),
    ("max_train_examples", 0, "keep only the first N training examples (0: all)"),
    ("max_test_examples", 0, "keep only the first N test examples (0: all)"),
    ("model", "lenet300", "mlp, lenet300, lenet5, conv2, conv4, conv6, vgg11, vgg16, resnet20, resnet56, or "
                          "module.path:ClassName (a model of your own; see --model_kwargs)"),
    common.MODEL_KWARGS,
    ("hidden", ["300", "100"], "hidden widths for --model=mlp"),
    ("use_bias", True, "dense layers with biases (mlp/lenet300)"),
    common.WEIGHT_INIT,
    common.POOL,
    common.PADDING,
    ("optimizer", "sgd", "optimizer", train.OPTIMIZERS),
    ("lr", 0.1, "base learning rate"),
    ("momentum", 0.9, "momentum for momentum/nesterov"),
    ("weight_decay", 0.0, "L2 weight decay (decoupled for adamw)"),
    ("clip_grad_norm", 0.0, "clip the gradients' global L2 norm to this before each step (0: off)"),
    ("schedule", "constant", "learning-rate schedule", train.SCHEDULES),
    ("milestones", [], "step-schedule milestones, in steps ('500') or epochs ('80ep')"),
    ("gamma", 0.1, "step-schedule factor"),
    ("warmup", "0", "linear warm-up length, steps or epochs ('1ep')"),
    ("training_steps", "16ep", "training length per level, steps ('2000') or epochs ('16ep')"),
    ("batch_size", 128, "training batch size"),
    common.AUGMENT,
    ("levels", 3, "pruned levels after the dense level 0"),
    ("prune_fraction", 0.2, "fraction of the remaining prunable weights removed per level"),
    ("scope", "global", "rank magnitudes across all layers or per layer", masks.SCOPES),
    ("prune_output", False, "also prune the output layer's kernel"),
    ("prune_biases", False, "also prune the biases of the pruned layers, ranked with their weights"),
    ("prune_embeddings", False, "also prune embedding tables (weights are chosen by their role in the model: the "
                                "kernels of dense, conv and attention projections)"),
    ("exclude", [], "regexes of parameter paths never pruned, re.search-ed against paths like 'dense_0/kernel' "
                    "('^dense_' prunes only the convolutions)"),
    ("rewind", "init", "where each pruned level starts training", imp.REWINDS),
    ("rewind_step", "0", "for --rewind=step: steps ('500') or epochs ('1ep') into the dense run"),
    ("finetune_lr", None, "for --rewind=finetune: the constant learning rate (unset: the schedule's final one, "
                          "refused when 0 as at the end of --schedule=cosine)"),
    ("branch", "none", "control branch trained beside every pruned level", imp.BRANCHES),
    ("seeds", ["0"], "seeds for initialisation, data order, dropout and control branches; several consecutive "
                     "ones (0,1,2,3 or 0:4) train as replicas of one vmapped program"),
    ("workdir", "runs/imp", "output directory (resumable)"),
    ("loop", "auto", "epoch as lax.scan or a Python loop of jitted steps", ("auto", "scan", "python")),
    ("eval_every_epoch", False, "evaluate on the test set after every epoch"),
    ("replica_layout", "vmap", "how replicas share the program (see jaxprune.replicas)", replicas.LAYOUTS),
    *common.DISTRIBUTED_FLAGS,
]
# May change between a run and its resumption (they do not change results).
VOLATILE = ("workdir", "levels", "eval_every_epoch", "replica_layout", "coordinator_address", "num_processes",
            "process_id", "distributed")
ANALYSES = ("similarity", "overlap", "instability")
ANALYSIS_SPEC = [
    ("analyses", [], "analyses of every level, any of similarity, overlap, instability (-> analysis.json)"),
    ("analysis_examples", 1000, "similarity: the first N test inputs (all of them when the test set is smaller)"),
    ("analysis_metrics", list(analysis.DEFAULT_METRICS),
     f"similarity: metrics, any of {', '.join(analysis.SIMILARITY_METRICS)}"),
    ("instability_points", 11, "instability: points on the linear path between the two copies, ends included"),
]
SPEC = [*SPEC, *ANALYSIS_SPEC]
ANALYSIS_FLAGS = tuple(row[0] for row in ANALYSIS_SPEC)  # not IMP settings: never in config.json
DEFAULTS = common.defaults(SPEC)
# older config.json files ran with these values
ADDED_LATER = {**common.ADDED_LATER, "exclude": [], "clip_grad_norm": 0.0, "prune_biases": False, "finetune_lr": None,
                "prune_embeddings": False}
# Flag names of earlier releases (accepted with a deprecation warning until the next one): --seed=S
# --num_replicas=K is --seeds=S,…,S+K-1.
RENAMED = (common.Renamed((("seed", 0, "seed for initialisation, data order, dropout and control branches"),
                           ("num_replicas", 1, "train seeds seed, seed+1, … seed+K-1 as one vmapped program")),
                          "seeds", lambda v: [v["seed"] + r for r in range(int(v["num_replicas"]))],
                          inverse=lambda seeds: {"seed": common.seed_list(seeds)[0],
                                                 "num_replicas": len(common.seed_list(seeds))}),)


def seeds_of(c: dict) -> tuple[int, int]:
    """``(first seed, number of replicas)`` of ``--seeds``: one seed, or consecutive ones (replicas)."""
    seeds = common.seed_list(c["seeds"])
    if list(seeds) != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"seeds={','.join(map(str, seeds))}: several seeds train as replicas of one program, which "
                         f"takes consecutive seeds (e.g. --seeds={seeds[0]}:{seeds[0] + len(seeds)}); run other "
                         "seeds in their own --workdir")
    return seeds[0], len(seeds)


def canonical(config: dict) -> dict:
    """A config in its stored form: old flag names mapped (:data:`RENAMED`), ``model_kwargs`` canonical, ``seeds``
    as integers."""
    c = common.canonical_model_kwargs(common.with_defaults(config, DEFAULTS, RENAMED))
    return {**c, "seeds": list(common.seed_list(c["seeds"]))}


def stored_config(workdir: Path, name: str = "workdir") -> dict:
    """The IMP settings ``workdir/config.json`` records, in the current flag names (``name``: the flag that gave
    ``workdir``, for errors)."""
    record = common.read_run_config(workdir, "experiments.imp", name)
    if record is None:
        raise FileNotFoundError(f"{name}={workdir}: no config.json; expected an experiments.imp output directory")
    config = common.migrate_record(record, RENAMED)
    return {k: v for k, v in config.items() if k in DEFAULTS}


@dataclasses.dataclass(frozen=True)
class Built:
    model: object
    task: imp.Task
    imp: imp.ImpConfig
    meta: dict


def build(config: dict, strict: bool = True) -> Built:
    """Data, model, optimizer and IMP settings from a config dict (missing keys take ``DEFAULTS``); ``strict``
    refuses flags that do nothing with the chosen settings (:func:`unused`; off to read a stored run back)."""
    c = canonical(config)
    common.check_range("prune_fraction", c["prune_fraction"], 0, 1, low_open=True, high_open=True)
    seed, num_replicas = seeds_of(c)
    tr, te = common.load_data(c["dataset"], c["data_dir"], c["normalize"], c["max_train_examples"],
                              c["max_test_examples"], seed)
    model = common.build_model(c, tr.num_classes, input_shape=tr.images.shape, defaults=DEFAULTS,
                               use_bias=c["use_bias"], pool=c["pool"], padding=c["padding"])
    if not 1 <= c["batch_size"] <= len(tr.labels):
        raise ValueError(f"batch_size={c['batch_size']}: expected 1..{len(tr.labels)} (the training set size)")
    spe = train.steps_per_epoch(len(tr.labels), c["batch_size"])
    duration = lambda name, value: train.parse_duration(value, spe, name)
    num_steps = duration("training_steps", c["training_steps"])
    if num_steps < 1:
        raise ValueError(f"training_steps={c['training_steps']!r}: expected at least one step")
    if strict:
        common.check_unused(c, unused(c, num_steps, spe))
    optim = train.OptimConfig(
        optimizer=c["optimizer"], lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"],
        schedule=c["schedule"], milestones=tuple(duration("milestones", m) for m in c["milestones"]),
        gamma=c["gamma"], warmup_steps=duration("warmup", c["warmup"]), clip_grad_norm=c["clip_grad_norm"])
    mesh = distributed.data_mesh()
    distributed.check_divisible(c["batch_size"], mesh)
    exclude = tuple(c["exclude"]) + (() if c["prune_output"] else tuple(
        f"^{re.escape(layer)}/" for layer in common.output_layers(model, tr.images.shape)))
    cfg = imp.ImpConfig(levels=c["levels"], fraction=c["prune_fraction"], scope=c["scope"], rewind=c["rewind"],
                        rewind_step=duration("rewind_step", c["rewind_step"]), branch=c["branch"], exclude=exclude,
                        prune_biases=c["prune_biases"], finetune_lr=c["finetune_lr"],
                        prune_embeddings=c["prune_embeddings"])
    task = imp.Task(model, *train.to_device(tr.images, tr.labels, te.images, te.labels), optim=optim,
                    num_steps=num_steps, batch_size=c["batch_size"], seed=seed, loop=c["loop"],
                    eval_every_epoch=c["eval_every_epoch"], num_replicas=num_replicas,
                    replica_layout=c["replica_layout"], mesh=mesh, augment=c["augment"])
    meta = {"steps_per_epoch": spe, "training_steps": num_steps, "imp": dataclasses.asdict(cfg),
            "optim": dataclasses.asdict(optim), "num_train": len(tr.labels), "num_test": len(te.labels),
            "num_params": models.count_params(models.init(model, jax.random.PRNGKey(0), tr.images.shape)["params"])}
    return Built(model, task, cfg, meta)


def unused(c: dict, num_steps: int, spe: int) -> list[tuple[str, str]]:
    """``(flag, why)`` for each changed flag of ``c`` that does nothing (:func:`experiments.common.training_unused`,
    ``--rewind_step`` without ``--rewind=step``, an analysis's flags without that analysis)."""
    out = common.training_unused(c, DEFAULTS, num_steps, spe)
    if common.changed(c, DEFAULTS, "rewind_step") and c["rewind"] != "step":
        out.append(("rewind_step", f"with --rewind={c['rewind']} (only --rewind=step rewinds to a step)"))
    raw = c["analyses"].split(",") if isinstance(c["analyses"], str) else list(c["analyses"])
    names = {str(n).strip() for n in raw}
    for flag, needs in (("analysis_examples", "similarity"), ("analysis_metrics", "similarity"),
                        ("instability_points", "instability")):
        if common.changed(c, DEFAULTS, flag) and needs not in names:
            out.append((flag, f"without --analyses={needs} (only that analysis uses it)"))
    return out


def train_and_evaluate(config: dict, workdir: str | Path) -> dict:
    """Run (or resume) IMP as described by ``config``; returns the ``results.json`` dict."""
    workdir = Path(workdir)
    b = build(config)
    record = {**canonical(config), "workdir": str(workdir)}
    settings = analysis_settings(record, b)  # refused before anything is written
    analyzer = _Analyzer(b, workdir, settings) if settings else None

    def write(levels: list[dict]) -> dict:
        results = {"config": record, "derived": b.meta, "environment": common.environment(),
                   "finished": len(levels) == b.imp.levels + 1,
                   "levels": [_without_history(r) for r in levels]}
        checkpoint.write_record(workdir / "results.json", results)
        rows = [{**r, "branch_test_accuracy": r.get("branch", {}).get("test_accuracy", "")} for r in levels]
        common.write_csv(workdir / "metrics.csv", rows, ["level", "density", "test_accuracy", "test_loss",
                                                          "train_loss", "train_accuracy", "steps", "seconds",
                                                          "branch_test_accuracy"])
        title = f"{record['model']} on {record['dataset']}, rewind={record['rewind']}"
        plots.accuracy_vs_density(levels, workdir / "accuracy_vs_density.png", title)
        plots.layer_densities(levels, workdir / "layer_densities.png", title)
        if analyzer is not None:
            analyzer.update(levels, title)
        return results

    imp_record = {k: v for k, v in record.items() if k not in ANALYSIS_FLAGS}  # analyses may change on a resume
    with checkpoint.workdir_lock(workdir):
        levels = imp.run(b.task, b.imp, workdir, on_level=write,
                         before_start=lambda wd: _check_run_config(wd, imp_record))
        return write(levels)


def _check_run_config(workdir: Path, record: dict) -> None:
    """Record the run's settings in ``workdir/config.json`` or refuse a workdir of other settings (a config.json
    that is not an IMP run's settings object named first, :func:`experiments.common.read_run_config`)."""
    common.read_run_config(workdir, "experiments.imp")
    checkpoint.check_run_config(workdir, record, VOLATILE, ADDED_LATER,
                                migrate=lambda r: common.migrate_record(r, RENAMED))


def _without_history(rec: dict) -> dict:
    out = {k: v for k, v in rec.items() if k != "history"}
    if "replicas" in out:
        out["replicas"] = [_without_history(r) for r in out["replicas"]]
    return out


def trained_seeds(workdir: str | Path, name: str = "workdir") -> list[int]:
    """The seeds of an IMP workdir in replica order: replica ``r`` trained seed ``trained_seeds(workdir)[r]``
    (``name``: the flag that gave ``workdir``, for errors)."""
    return list(stored_config(Path(workdir), name)["seeds"])


def replica_record(record: dict, r: int) -> dict:
    """Replica ``r``'s part of a level record (a single-replica record is its own replica 0)."""
    return record["replicas"][r] if "replicas" in record else record


def load_levels(workdir: str | Path, replica: int | None = None) -> tuple[Built, list[dict], list[dict]]:
    """Read an IMP workdir back: ``(built, variables per finished level, level records)``.

    ``variables[k]`` is ``{'params': …, ['batch_stats': …]}`` of level ``k``'s trained network (pruned weights
    are exactly zero). Data are loaded as the run saw them (``built.task.x_test`` etc.). For a run with
    ``num_replicas > 1`` the variables are stacked (leading replica axis) and the records summarise the replicas,
    unless ``replica`` picks one: then its variables and its records (:func:`replica_record`).
    """
    workdir = Path(workdir)
    b = build(stored_config(workdir), strict=False)
    variables, records = [], []
    for k in imp.finished_levels(workdir):
        tree = imp.load_level(workdir, k, b.task)
        state = tree["state"]
        if replica is not None and b.task.num_replicas > 1:
            if not 0 <= replica < b.task.num_replicas:
                raise ValueError(f"replica={replica}: expected 0 <= replica < {b.task.num_replicas}")
            state = replicas.index(state, replica)
        variables.append(train.variables_of(state))
        rec = imp.read_level(workdir, k, b.task.seed)
        records.append(rec if replica is None else replica_record(rec, replica))
    if not variables:
        raise FileNotFoundError(f"workdir={workdir}: no finished level yet")
    return b, variables, records


# ----------------------------------------------------------------------------------------------- analyses
INSTABILITY_STREAM = 0x494E5354  # fold_in tag of the instability copies' data order ("INST")
_BN_RECALIBRATION = {"batch_size": 256, "num_batches": 20}


def instability_data_key(seed: int, level: int) -> jax.Array:
    """Data-order key of level ``level``'s second copy (seed = the replica's seed):
    ``fold_in(fold_in(PRNGKey(seed), INSTABILITY_STREAM), level)``, a stream apart from the run's own keys."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), INSTABILITY_STREAM), level)


def analysis_settings(config: dict, b: Built) -> dict[str, dict]:
    """Settings of every requested analysis (an analysis record is reused only when they agree); flag errors name
    the flag. ``{}`` when ``--analyses`` is empty."""
    raw = config["analyses"]
    raw = raw.split(",") if isinstance(raw, str) else list(raw)
    names = [str(n).strip() for n in raw if str(n).strip()]
    bad = [n for n in names if n not in ANALYSES]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"analyses={','.join(names)}: expected a comma-separated subset of {','.join(ANALYSES)} "
                         f"(each once){'; unknown: ' + ', '.join(bad) if bad else ''}")
    if not names:
        return {}
    out: dict[str, dict] = {}
    num_test = int(b.task.x_test.shape[0])
    if "similarity" in names:
        n = config["analysis_examples"]
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 4:
            raise ValueError(f"analysis_examples={n!r}: expected an integer >= 4 (the first N test inputs; 1000 "
                             "or more for stable estimates)")
        raw = config["analysis_metrics"]
        metrics = [str(m).strip() for m in (raw.split(",") if isinstance(raw, str) else raw) if str(m).strip()]
        unknown = [m for m in metrics if m not in analysis.SIMILARITY_METRICS]
        if unknown or not metrics or len(set(metrics)) != len(metrics):
            raise ValueError(f"analysis_metrics={','.join(metrics)}: expected a non-empty comma-separated subset of "
                             f"{','.join(analysis.SIMILARITY_METRICS)} (each once)")
        if n > num_test:
            logging.warning("analysis_examples=%d: the test set holds %d; using all of them", n, num_test)
        out["similarity"] = {"metrics": metrics, "examples": int(min(n, num_test)),
                             "inputs": "the first examples of the test set", "cca_conv": "pixel",
                             "other_conv": "flatten"}
    if "overlap" in names:
        out["overlap"] = {"previous": "consecutive levels, per replica",
                          "between_replicas": "every pair of replicas" if b.task.num_replicas > 1 else "none",
                          "random": "uniform masks with the same per-layer kept counts (hypergeometric)",
                          "random_nested": "uniform subsets of the previous level's mask, same counts"}
    if "instability" in names:
        p = config["instability_points"]
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 2:
            raise ValueError(f"instability_points={p!r}: expected an integer >= 2 (the two end points included)")
        shapes = jax.eval_shape(lambda: models.init(b.model, jax.random.PRNGKey(0), b.task.x_train.shape))
        bn = (f"recalibrated on {_BN_RECALIBRATION['num_batches']} batches of {_BN_RECALIBRATION['batch_size']} "
              "training examples at every point") if shapes.get("batch_stats") else "none"
        out["instability"] = {"points": int(p), "eval_examples": num_test, "eval": "test set",
                              "copy_a": "the level's own trained network",
                              "copy_b": "trained from the level's start point and mask, data order from "
                                        "instability_data_key(seed, level)",
                              "batchnorm": bn}
    return {n: out[n] for n in ANALYSES if n in out}


def _replica(tree: Any, r: int, k: int) -> Any:
    return tree if k == 1 else replicas.index(tree, r)


def _plain(tree: Any) -> Any:
    """JSON-ready: arrays → floats/ints/lists."""
    def conv(x):
        a = np.asarray(x)
        if a.ndim:
            return a.tolist()
        return int(a) if np.issubdtype(a.dtype, np.integer) else float(a)
    return jax.tree_util.tree_map(conv, tree)


def _mean(records: list) -> Any:
    """Leaf-wise mean of equal-structure records (None where any replica has None; lists element-wise)."""
    first = records[0]
    if isinstance(first, dict):
        return {key: _mean([r[key] for r in records]) for key in first}
    if first is None or any(r is None for r in records):
        return None
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple, dict)):
        return [_mean([r[i] for r in records]) for i in range(len(first))]
    if isinstance(first, (list, tuple)) or isinstance(first, (int, float)):
        if isinstance(first, (int, float)) and len({json.dumps(r) for r in records}) == 1:
            return first  # equal across replicas (counts of exact pruning): kept as they are
        return np.mean(np.asarray(records, np.float64), axis=0).tolist()
    return first


@functools.lru_cache(maxsize=16)
def _apply_fn(model):
    """One eval-mode apply function per model, so the interpolation program is compiled once."""
    return lambda variables, x: model.apply(variables, x, train=False)


class _Analyzer:
    """The analyses of one IMP workdir: reads finished levels back from their checkpoints, computes what
    ``analysis.json`` lacks (or holds for other settings or checkpoints), writes it and the plots."""

    def __init__(self, b: Built, workdir: Path, settings: dict[str, dict]):
        self.b, self.task, self.cfg = b, b.task, b.imp
        self.workdir = Path(workdir)
        self.settings = json.loads(json.dumps(settings))  # compared as stored
        self.k = b.task.num_replicas
        self.seeds = [b.task.seed + r for r in range(self.k)]
        self._cache: dict[int, dict] = {}
        self._trainers: dict[str, tuple] = {}
        self._prunable = None
        self._batches = None

    # --- inputs
    def level(self, k: int) -> dict:
        if k not in self._cache:
            self._cache[k] = imp.load_level(self.workdir, k, self.task)
        return self._cache[k]

    def prunable(self):
        if self._prunable is None:
            params = _replica(self.level(0)["state"].params, 0, self.k)
            self._prunable = imp.prunable_tree(self.task, self.cfg, params)
        return self._prunable

    def trainer(self, rewind: str) -> tuple[train.Trainer, optax.GradientTransformation]:
        """The trainer and optimizer a level trained with (``finetune``: the constant learning rate)."""
        kind = "finetune" if rewind == "finetune" else "main"
        if kind not in self._trainers:
            task = self.task
            schedule = train.make_schedule(task.optim, task.num_steps)
            if kind == "finetune":
                lr = float(schedule(task.num_steps)) if self.cfg.finetune_lr is None else self.cfg.finetune_lr
                schedule = optax.constant_schedule(lr)
            tx = masks.masked(train.make_optimizer(task.optim, schedule))
            aug = augmentation.by_name(task.augment)
            if self.k == 1:
                tr = train.make_trainer(task.model, tx, task.mesh, aug)
            else:
                tr = replicas.make_trainer(task.model, tx, self.k, task.mesh, task.replica_layout, aug)
            self._trainers[kind] = (tr, tx)
        return self._trainers[kind]

    def start(self, level: int) -> tuple[train.TrainState, train.Trainer]:
        """Level ``level``'s start point (stacked for replicas) and the trainer it trained with. Level 0 starts
        from its rewind point: the initial state, or for ``rewind=step`` the dense run's state at step k."""
        ck = self.level(level)
        if level == 0:
            return ck["rewind_point"], self.trainer("init")[0]
        trainer, tx = self.trainer(self.cfg.rewind)
        fn = lambda m, p, rp: imp.start_level(tx, self.cfg.rewind, m, p, rp)
        args = (ck["mask"], self.level(level - 1)["state"], ck["rewind_point"])
        return (fn(*args) if self.k == 1 else jax.vmap(fn)(*args)), trainer

    def train_copy(self, level: int, data_key: jax.Array | None = None) -> train.RunResult:
        """Train a copy of level ``level`` from its start point (data order: ``data_key``, default
        :func:`instability_data_key` of each replica's seed)."""
        start, trainer = self.start(level)
        if data_key is None:
            keys = [instability_data_key(s, level) for s in self.seeds]
            data_key = keys[0] if self.k == 1 else jnp.stack(keys)
        task = self.task
        return train.run(trainer, start, task.x_train, task.y_train, batch_size=task.batch_size,
                         num_steps=task.num_steps, data_key=data_key, loop=task.loop,
                         log_prefix=f"[level {level} instability copy] ")

    # --- the analyses of one level
    def similarity(self, level: int) -> dict:
        s = self.settings["similarity"]
        x = self.task.x_test[: s["examples"]]
        v0, vk = train.variables_of(self.level(0)["state"]), train.variables_of(self.level(level)["state"])
        per = []
        for r in range(self.k):
            dense = common.representations(self.task.model, _replica(v0, r, self.k), x)
            reps = common.representations(self.task.model, _replica(vk, r, self.k), x)
            bad = [n for n in dense if not (np.isfinite(np.asarray(dense[n])).all()
                                            and np.isfinite(np.asarray(reps[n])).all())]
            ok = {n: reps[n] for n in reps if n not in bad}
            vals = analysis.similarity_to_dense(ok, {n: dense[n] for n in ok}, s["metrics"],
                                                cca_conv=s["cca_conv"]) if ok else {m: {} for m in s["metrics"]}
            if bad:
                logging.warning("[level %d] similarity: non-finite representations in %s (diverged?)", level, bad)
            per.append({m: {n: vals[m].get(n) for n in dense} for m in s["metrics"]})
        out: dict = {"metrics": _mean(per)}
        if self.k > 1:
            out["replicas"] = per
        return out

    def _pair(self, a, b, nested: bool) -> dict:
        rec = {"observed": _plain(analysis.overlap(a, b, self.prunable())),
               "random": analysis.random_overlap_like(a, b, self.prunable())}
        if nested:
            rec["random_nested"] = analysis.random_overlap_like(a, b, self.prunable(), nested=True)
        return rec

    def overlap(self, level: int) -> dict:
        mk = self.level(level)["mask"]
        out: dict = {"previous": None, "between_replicas": None}
        if level > 0:
            mp = self.level(level - 1)["mask"]
            per = [self._pair(_replica(mp, r, self.k), _replica(mk, r, self.k), nested=True) for r in range(self.k)]
            out["previous"] = per[0] if self.k == 1 else {**_mean(per), "replicas": per}
        if self.k > 1:
            pairs = [[r, q] for r in range(self.k) for q in range(r + 1, self.k)]
            per = [self._pair(replicas.index(mk, r), replicas.index(mk, q), nested=False) for r, q in pairs]
            out["between_replicas"] = {**_mean(per), "pairs": pairs, "per_pair": per}
        return out

    def instability(self, level: int) -> dict:
        s = self.settings["instability"]
        task = self.task
        if self._batches is None:
            self._batches = analysis.make_batches(task.x_test, task.y_test, 1000)
        res = self.train_copy(level)
        va, vb = train.variables_of(self.level(level)["state"]), train.variables_of(res.state)
        recal = None
        if va.get("batch_stats"):
            recal = lambda v: train.recalibrate_batchnorm(task.model, v, task.x_train, **_BN_RECALIBRATION)
        per = []
        for r in range(self.k):
            c = analysis.interpolation_curve(_apply_fn(task.model), _replica(va, r, self.k), _replica(vb, r, self.k),
                                             self._batches, s["points"], recalibrate=recal)
            per.append({"barrier": float(analysis.barrier(c)), "loss_barrier": float(analysis.barrier(c, metric="loss")),
                        "accuracy_a": float(c.accuracy[0]), "accuracy_b": float(c.accuracy[-1]),
                        **_plain({"alphas": c.alphas, "error": c.error, "loss": c.loss})})
        if self.k == 1:
            return per[0]
        out = _mean(per)
        out["barrier_std"] = conventions.summary([p["barrier"] for p in per])["std"]
        return {**out, "replicas": per}

    # --- bookkeeping
    @staticmethod
    def _sources(name: str, records: list[dict], k: int) -> dict:
        """The checkpoints (sha256 of ``level_j``) an analysis of level ``k`` reads."""
        levels = {"similarity": [0, k], "overlap": [k - 1, k], "instability": [k - 1, k]}[name]
        return {f"level_{j}": records[j].get("checkpoint_sha256") for j in sorted(set(levels)) if j >= 0}

    @staticmethod
    def _ordered(rec: dict, entry: dict) -> dict:
        """A level's record with stable keys: level, density, then the analyses in :data:`ANALYSES` order."""
        return {"level": rec["level"], "density": rec["density"], **{n: entry[n] for n in ANALYSES if n in entry}}

    def update(self, records: list[dict], title: str = "") -> dict:
        """Analyse every finished level that lacks a valid record; returns the ``analysis.json`` dict."""
        path, tpath = self.workdir / "analysis.json", self.workdir / "analysis_timing.json"
        old, timing_old = _read_derived(path), _read_derived(tpath)
        entries = {e["level"]: e for e in old.get("levels", [])}
        timing = {t["level"]: t for t in timing_old.get("levels", [])}
        levels = [r["level"] for r in records]

        def write():
            doc = {"format": 1, "levels": [entries[k] for k in levels if k in entries]}
            checkpoint.write_record(path, doc)
            checkpoint.write_record(tpath, {"levels": [timing[k] for k in levels if k in timing]})
            return doc

        for rec in records:
            k = rec["level"]
            for j in [j for j in self._cache if j not in (0, k - 1, k)]:  # level k reads only these
                del self._cache[j]
            entry = entries.get(k, {})  # analyses not asked for now are kept as they are
            for name in self.settings:
                want = {"settings": self.settings[name], "checkpoints": self._sources(name, records, k)}
                have = entry.get(name)
                if have is not None and all(have.get(key) == want[key] for key in want):
                    continue  # finished before, with these settings, on these checkpoints
                if have is not None:
                    logging.warning("[level %d] %s: recomputing (recorded with other settings or checkpoints)", k, name)
                t0 = time.perf_counter()
                entry = {**entry, name: {**want, **getattr(self, name)(k)}}
                t = timing.setdefault(k, {"level": k})
                t.update({"train_seconds": rec.get("seconds"), "level_wall_seconds": rec.get("wall_seconds"),
                          f"{name}_seconds": time.perf_counter() - t0})
                entries[k] = self._ordered(rec, entry)
                write()  # a kill keeps every finished analysis
            entries[k] = self._ordered(rec, entry)
        self._cache.clear()
        doc = write()
        plot_analyses(doc, self.workdir, title)
        return doc


def run_analyses(workdir: str | Path, analyses: list[str] | tuple[str, ...], **options) -> dict:
    """Analyse a finished (or partly finished) IMP workdir without training further: ``analyses`` ⊆ :data:`ANALYSES`,
    ``options``: the other analysis flags (``analysis_examples``, ``analysis_metrics``, ``instability_points``).
    Writes and returns ``analysis.json`` (as ``--analyses`` does after each level).

    Each level record holds ``level``, ``density`` and one entry per analysis with its ``settings`` and the
    ``checkpoints`` (sha256 per level read) it was computed from:

    * ``similarity``: ``metrics[metric][layer]`` — the level's layer vs the dense (level 0) layer on the first
      ``examples`` test inputs (replicas: mean; per replica under ``replicas``, each against its own dense net);
    * ``overlap``: ``previous`` (vs the previous level's mask; ``None`` at level 0) and ``between_replicas``
      (``None`` for one replica), each ``{"observed", "random"[, "random_nested"]}`` with ``{"layers": {path: …},
      "overall": …}`` of ``jaccard``, ``kept_fraction`` and counts (:func:`jaxprune.analysis.overlap`);
    * ``instability``: ``alphas``, ``error``, ``loss`` along the path from the level's network (α = 0) to a copy
      trained from the same start point and mask with another data order (α = 1), ``barrier`` (error),
      ``loss_barrier``, ``accuracy_a``, ``accuracy_b``.
    """
    workdir = Path(workdir)
    config = stored_config(workdir)
    b = build(config, strict=False)
    c = {**DEFAULTS, **options, "analyses": list(analyses)}
    settings = analysis_settings(c, b)
    records = [imp.read_level(workdir, k, b.task.seed) for k in imp.finished_levels(workdir)]
    if not records:
        raise FileNotFoundError(f"workdir={workdir}: no finished level yet")
    with checkpoint.workdir_lock(workdir):
        return _Analyzer(b, workdir, settings).update(records, f"{config['model']} on {config['dataset']}, "
                                                              f"rewind={config['rewind']}")


def _read_derived(path: Path) -> dict:
    """A derived record (``analysis.json``, its timing), verified; absent or failing its check: none (recomputed)."""
    if not path.exists():
        return {"levels": []}
    try:
        return checkpoint.read_record(path)
    except ValueError as e:
        logging.warning("%s; recomputing it", e)
        return {"levels": []}


def plot_analyses(doc: dict, workdir: str | Path, title: str = "") -> list[Path]:
    """The plots of an ``analysis.json`` dict, written to ``workdir`` (``analysis_*.png``); returns their paths."""
    workdir = Path(workdir)
    levels, out = doc["levels"], []

    def series(name: str):
        rows = [lv for lv in levels if name in lv]
        return rows, [lv["density"] for lv in rows]

    rows, d = series("similarity")
    if rows:
        for m in rows[-1]["similarity"]["settings"]["metrics"]:
            use = [lv for lv in rows if m in lv["similarity"]["metrics"]]
            layers = list(use[0]["similarity"]["metrics"][m])
            per_layer = {n: [lv["similarity"]["metrics"][m].get(n) for lv in use] for n in layers}
            p = workdir / f"analysis_similarity_{m}.png"
            plots.similarity_vs_density([lv["density"] for lv in use], per_layer, p, metric=m,
                                        title=f"{title}\nevery layer vs the dense layer")
            out.append(p)
    rows, d = series("instability")
    if rows:
        ins = [lv["instability"] for lv in rows]
        std = [i.get("barrier_std", 0.0) for i in ins] if "barrier_std" in ins[0] else None
        p = workdir / "analysis_instability_barrier.png"
        plots.barrier_vs_density({"error barrier": (d, [i["barrier"] for i in ins], std)}, p,
                                 title=f"{title}\ninstability: two copies from each level's start point")
        out.append(p)
        p = workdir / "analysis_instability_paths.png"
        plots.interpolation_paths(ins[0]["alphas"], {f"level {lv['level']} (d={lv['density']:.3f})":
                                                     lv["instability"]["error"] for lv in rows}, p,
                                  title=f"{title}\ntest error on the linear path")
        out.append(p)
    rows, d = series("overlap")
    if rows:
        for key, label, stat in (("previous", "vs the previous level", "kept_fraction"),
                                 ("between_replicas", "between replicas", "jaccard")):
            use = [lv for lv in rows if lv["overlap"][key] is not None]
            if not use:
                continue
            ov = [lv["overlap"][key] for lv in use]
            names = list(ov[0]["observed"]["layers"])
            obs = {n: [o["observed"]["layers"][n][stat] for o in ov] for n in names}
            exp = {n: [o["random"]["layers"][n][stat] for o in ov] for n in names}
            obs["overall"] = [o["observed"]["overall"][stat] for o in ov]
            exp["overall"] = [o["random"]["overall"][stat] for o in ov]
            p = workdir / f"analysis_overlap_{key}.png"
            plots.overlap_vs_density([lv["density"] for lv in use], obs, exp, p,
                                     ylabel=stat.replace("_", " "), title=f"{title}\nmask overlap {label}")
            out.append(p)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_orbax()
    config = common.config_from_flags(SPEC, RENAMED)
    distributed.initialize(config["coordinator_address"], config["num_processes"], config["process_id"],
                           auto=config["distributed"])
    results = common.run_tolerating_flagfile(train_and_evaluate, config, SPEC, common.flagfile_only(SPEC))
    print(f"results: {Path(config['workdir']) / 'results.json'}")
    for r in results["levels"]:
        std = lambda x: f" ± {x['test_accuracy_std']:.4f}" if "test_accuracy_std" in x else ""
        br = f"  {r['branch']['name']} {r['branch']['test_accuracy']:.4f}{std(r['branch'])}" if "branch" in r else ""
        print(f"level {r['level']:2d}  density {r['density']:.4f}  test accuracy {r['test_accuracy']:.4f}{std(r)}{br}")
    if config["analyses"]:
        doc = checkpoint.read_record(Path(config["workdir"]) / "analysis.json")
        print(f"analysis: {Path(config['workdir']) / 'analysis.json'}")
        for lv in doc["levels"]:
            print(f"level {lv['level']:2d}  density {lv['density']:.4f}  " + _summary_line(lv))
    logging.info("done")


def _summary_line(lv: dict) -> str:
    parts = []
    if "instability" in lv:
        parts.append(f"barrier {100 * lv['instability']['barrier']:.2f} pp")
    if "overlap" in lv and lv["overlap"]["between_replicas"] is not None:
        o = lv["overlap"]["between_replicas"]
        parts.append(f"replica Jaccard {o['observed']['overall']['jaccard']:.3f} "
                     f"(random {o['random']['overall']['jaccard']:.3f})")
    if "similarity" in lv:
        m = lv["similarity"]["settings"]["metrics"][0]
        vals = lv["similarity"]["metrics"][m]
        parts.append(f"{m} " + " ".join(f"{n}={v:.3f}" for n, v in vals.items() if v is not None))
    return "  ".join(parts)


if __name__ == "__main__":
    common.define_flags(SPEC, RENAMED)
    common.run_main(main)
