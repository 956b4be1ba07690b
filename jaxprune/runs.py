"""Experiment workdirs read back (IMP levels, filter-pruning rounds, trained networks), and the per-level analyses
of an IMP workdir (``analysis.json``), as library code.

An IMP workdir (:func:`jaxprune.imp.run`; ``experiments.imp`` writes one per run) holds ``level_k/`` checkpoints and
records. Given the :class:`jaxprune.imp.Task` and :class:`jaxprune.imp.ImpConfig` it was trained with:

* :func:`load_levels` — ``(variables per finished level, level records)``, all replicas stacked or one picked;
* :class:`Analyzer` — the analyses of every finished level (``similarity``, ``overlap``, ``instability``;
  :data:`ANALYSES`), each recorded with its ``settings`` and the sha256 of the checkpoints it read, so a level's
  analysis is computed once and recomputed only when either changes (:meth:`Analyzer.update`). The instability
  copies train with the level's own optimizer, schedule and loss: those of :func:`jaxprune.imp.run`'s setup
  (``task.loss``, ``finetune_lr`` included), not a re-derivation;
* :func:`analysis_settings` — the settings record of each requested analysis (checked: errors name the option);
* :func:`plot_analyses` — the ``analysis_*.png`` plots of an ``analysis.json`` dict;
* :func:`representations` — a model's named representations ``{name: (n, …)}``, read from the model itself.

A network trained once per seed (``experiments.common.train_network``, used by merge, filter_prune and sparse_train)
is a folder of ``checkpoint/`` and ``trained.json`` (its record, written last, with the checkpoint's ``sha256``):

* :func:`load_trained` — ``(variables, record)`` given a template tree, the checkpoint verified.

A filter-pruning seed folder (``experiments.filter_prune``: ``seed_<s>/round_<r>/``, each a checkpoint and
``round.json``, written last, with the round's ``widths``, ``heads`` and ``checkpoint_sha256``):

* :func:`finished_rounds` — the rounds whose ``round.json`` exists;
* :func:`load_round` — ``(shrunk model, variables, round record)`` of one round, given the unpruned model: the
  shapes follow from the recorded widths, the values are the checkpoint's (verified).

Replicas: the analyses read every tree stacked (a leading replica axis; one replica is a stack of one) and compute
each replica on its own slice; ``analysis.json`` keeps its layout (for one replica the per-replica record itself).
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxprune import analysis, checkpoint, conventions, graph, imp, models, plots, replicas, structured, train

ANALYSES = ("similarity", "overlap", "instability")
INSTABILITY_STREAM = 0x494E5354  # fold_in tag of the instability copies' data order ("INST")
BN_RECALIBRATION = {"batch_size": 256, "num_batches": 20}


# ----------------------------------------------------------------------------------------------- reading
def replica_record(record: dict, r: int) -> dict:
    """Replica ``r``'s part of a level record (a single-replica record is its own replica 0)."""
    return record["replicas"][r] if "replicas" in record else record


def load_levels(workdir: str | Path, task: imp.Task, replica: int | None = None) -> tuple[list[dict], list[dict]]:
    """``(variables, records)`` of every finished level of the IMP workdir ``workdir`` trained on ``task``.

    ``variables[k]``: ``{'params': …, ['batch_stats': …]}`` of level ``k``'s trained network (pruned weights exactly
    zero), stacked (leading replica axis) for ``task.num_replicas > 1`` with records summarising the replicas,
    unless ``replica`` picks one: then its variables and records (:func:`replica_record`)."""
    workdir = Path(workdir)
    k = task.num_replicas
    if replica is not None and k > 1 and not 0 <= replica < k:
        raise ValueError(f"replica={replica}: expected 0 <= replica < {k}")
    variables, records = [], []
    for level in imp.finished_levels(workdir):
        state = imp.load_level(workdir, level, task)["state"]
        if replica is not None and k > 1:
            state = replicas.index(state, replica)
        variables.append(train.variables_of(state))
        rec = imp.read_level(workdir, level, task.seed)
        records.append(rec if replica is None else replica_record(rec, replica))
    if not variables:
        raise FileNotFoundError(f"workdir={workdir}: no finished level yet")
    return variables, records


def load_trained(folder: str | Path, template: Any, *, seed: int | None = None,
                 hint: str | None = None) -> tuple[Any, dict]:
    """``(variables, record)`` of the network trained into ``folder`` (``trained.json`` + ``checkpoint/``).

    ``template``: a tree of the variables' structure, shapes and dtypes (``models.init`` of the model). The
    checkpoint must match the ``sha256`` its record holds (a changed checkpoint, or a record without one, is a
    ValueError naming the file; a changed ``trained.json`` a :class:`jaxprune.checkpoint.RecordError`). ``seed``:
    the record must be that seed's. ``hint``: appended to the errors (default: delete ``folder`` to retrain)."""
    folder = Path(folder)
    hint = f"; delete {folder} to train it again" if hint is None else hint
    expect = None if seed is None else {"seed": int(seed)}
    record = checkpoint.read_record(folder / "trained.json", expect=expect, hint=hint)
    return checkpoint.restore_recorded(folder / "checkpoint", template, record, "sha256", hint=hint), record


def round_hint(folder: str | Path) -> str:
    """What to do about a damaged ``round_<r>/`` folder (appended to the errors of :func:`load_round`)."""
    return f"; delete {folder} to redo that round (later rounds are then redone too)"


def finished_rounds(seed_dir: str | Path) -> list[int]:
    """The rounds ``r`` of a filter-pruning seed folder whose ``round_<r>/round.json`` (written last) exists,
    ascending (an interrupted round, with no ``round.json``, is not listed)."""
    folders = Path(seed_dir).glob("round_*")
    return sorted(int(d.name[6:]) for d in folders if d.name[6:].isdigit() and (d / "round.json").is_file())


def _folder_seed(seed_dir: Path) -> int:
    """``s`` of a ``seed_<s>`` folder; a ValueError naming ``seed_dir`` otherwise."""
    if not (seed_dir.name.startswith("seed_") and seed_dir.name[5:].lstrip("-").isdigit()):
        raise ValueError(f"seed_dir={seed_dir}: expected a seed_<s> folder of a filter_prune workdir")
    return int(seed_dir.name[5:])


def shrunk_template(model: Any, record: Mapping, input_shape: tuple) -> tuple[Any, Any]:
    """``(model, variables)`` of the widths a round record holds (``widths``: ``{layer: units}``, and ``heads``:
    ``{group's first layer: heads}``), shrunk from ``model`` (unpruned, or any of its rounds: only the widths
    count). Only the shapes matter: the values are the untrained ``models.init``'s (which heads are kept: l1's)."""
    template = models.init(model, jax.random.PRNGKey(0), input_shape)
    example = (1,) + tuple(input_shape[1:])
    current = structured.widths(model, template, x=example)
    keep = {layer: jnp.arange(w) for layer, w in record["widths"].items() if w != current[layer]}
    heads = record.get("heads", {})
    if heads:
        now = structured.group_widths(model, template, [(first,) for first in heads], x=example)
        shrink = {first: n for first, n in heads.items() if n != now[first]}
        if shrink:
            keep.update(structured.select_groups(model, template, shrink, "l1", x=example))
    return structured.remove_many(model, template, keep, x=example)


def load_round(seed_dir: str | Path, r: int, model: Any, input_shape: tuple) -> tuple[Any, Any, dict]:
    """``(shrunk model, variables, record)`` of round ``r`` of a filter-pruning seed folder ``seed_<s>/``.

    ``model``: the unpruned network (or any of its rounds'); ``input_shape``: ``(n, …)`` of its inputs. The record
    is ``round_<r>/round.json`` as stored (``seed`` and ``checkpoint_sha256`` included); the variables are the
    checkpoint's, verified against that sha256 (a record without one is refused: never restored unverified). A
    missing, changed or foreign round is an error naming the file."""
    seed_dir = Path(seed_dir)
    d = seed_dir / f"round_{r}"
    seed = _folder_seed(seed_dir)
    if not (d / "round.json").is_file():
        raise FileNotFoundError(f"round={r}: {d / 'round.json'} does not exist (finished rounds of {seed_dir}: "
                                f"{finished_rounds(seed_dir)})")
    record = checkpoint.read_record(d / "round.json", expect={"round": r, "seed": seed}, hint=round_hint(d))
    model, template = shrunk_template(model, record, input_shape)
    return model, checkpoint.restore_recorded(d / "checkpoint", template, record, hint=round_hint(d)), record


def representations(model, variables: dict, x) -> dict:
    """Named representations in forward order, ``{name: (n, …)}``: what the model records in its
    ``representations`` collection (the library's models: every layer's activation, then ``logits``;
    :func:`jaxprune.models.representations`), or for a model that records none (a user model) the output of
    every linear layer (after its bias / BatchNorm, before its activation; output layers give the logits), named
    by the layer's module path, read from the model's graph."""
    kwargs = dict(graph.call_kwargs(model))  # train=False where __call__ takes it, as models.representations
    _, state = model.apply(variables, x, mutable=["representations"], **kwargs)
    named = state.get("representations", {}).get("named")
    if named:
        return dict(named)
    g = graph.build(model, variables, x)
    _, z = graph.run(g, g.net.leaves, x)
    return {name: z[name] for name in g.layers if name in z}


def read_derived(path: Path) -> dict:
    """A derived record (``analysis.json``, its timing), verified; absent or failing its check: none (recomputed)."""
    if not path.exists():
        return {"levels": []}
    try:
        return checkpoint.read_record(path)
    except ValueError as e:
        logging.warning("%s; recomputing it", e)
        return {"levels": []}


# ----------------------------------------------------------------------------------------------- settings
def instability_data_key(seed: int, level: int) -> jax.Array:
    """Data-order key of level ``level``'s second copy (seed = the replica's seed):
    ``fold_in(fold_in(PRNGKey(seed), INSTABILITY_STREAM), level)``, a stream apart from the run's own keys."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), INSTABILITY_STREAM), level)


def _names(raw: Any) -> list[str]:
    """A comma-separated string or a list → stripped non-empty names."""
    return [str(n).strip() for n in (raw.split(",") if isinstance(raw, str) else list(raw)) if str(n).strip()]


def _similarity_settings(config: Mapping, num_test: int) -> dict:
    n = config["analysis_examples"]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 4:
        raise ValueError(f"analysis_examples={n!r}: expected an integer >= 4 (the first N test inputs; 1000 "
                         "or more for stable estimates)")
    metrics = _names(config["analysis_metrics"])
    unknown = [m for m in metrics if m not in analysis.SIMILARITY_METRICS]
    if unknown or not metrics or len(set(metrics)) != len(metrics):
        raise ValueError(f"analysis_metrics={','.join(metrics)}: expected a non-empty comma-separated subset of "
                         f"{','.join(analysis.SIMILARITY_METRICS)} (each once)")
    if n > num_test:
        logging.warning("analysis_examples=%d: the test set holds %d; using all of them", n, num_test)
    return {"metrics": metrics, "examples": int(min(n, num_test)), "inputs": "the first examples of the test set",
            "cca_conv": "pixel", "other_conv": "flatten"}


def _instability_settings(config: Mapping, task: imp.Task, num_test: int) -> dict:
    p = config["instability_points"]
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 2:
        raise ValueError(f"instability_points={p!r}: expected an integer >= 2 (the two end points included)")
    shapes = jax.eval_shape(lambda: imp.init_variables(task, jax.random.PRNGKey(0)))
    bn = (f"recalibrated on {BN_RECALIBRATION['num_batches']} batches of {BN_RECALIBRATION['batch_size']} "
          "training examples at every point") if shapes.get("batch_stats") else "none"
    return {"points": int(p), "eval_examples": num_test, "eval": "test set",
            "copy_a": "the level's own trained network",
            "copy_b": "trained from the level's start point and mask, data order from "
                      "instability_data_key(seed, level)",
            "batchnorm": bn}


def analysis_settings(config: Mapping, task: imp.Task) -> dict[str, dict]:
    """Settings of every analysis ``config["analyses"]`` asks for (an analysis record is reused only when they
    agree), from the options ``analysis_examples``, ``analysis_metrics``, ``instability_points``; errors name the
    option. ``{}`` when no analysis is asked for."""
    names = _names(config["analyses"])
    bad = [n for n in names if n not in ANALYSES]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"analyses={','.join(names)}: expected a comma-separated subset of {','.join(ANALYSES)} "
                         f"(each once){'; unknown: ' + ', '.join(bad) if bad else ''}")
    num_test = int(task.x_test.shape[0])
    out: dict[str, dict] = {}
    if "similarity" in names:
        out["similarity"] = _similarity_settings(config, num_test)
    if "overlap" in names:
        out["overlap"] = {"previous": "consecutive levels, per replica",
                          "between_replicas": "every pair of replicas" if task.num_replicas > 1 else "none",
                          "random": "uniform masks with the same per-layer kept counts (hypergeometric)",
                          "random_nested": "uniform subsets of the previous level's mask, same counts"}
    if "instability" in names:
        out["instability"] = _instability_settings(config, task, num_test)
    return {n: out[n] for n in ANALYSES if n in out}


# ----------------------------------------------------------------------------------------------- records
def plain(tree: Any) -> Any:
    """JSON-ready: arrays → floats/ints/lists."""
    def conv(x):
        a = np.asarray(x)
        if a.ndim:
            return a.tolist()
        return int(a) if np.issubdtype(a.dtype, np.integer) else float(a)
    return jax.tree_util.tree_map(conv, tree)


def mean_record(records: list) -> Any:
    """Leaf-wise mean of equal-structure records (None where any replica has None; lists element-wise)."""
    first = records[0]
    if isinstance(first, dict):
        return {key: mean_record([r[key] for r in records]) for key in first}
    if first is None or any(r is None for r in records):
        return None
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple, dict)):
        return [mean_record([r[i] for r in records]) for i in range(len(first))]
    if isinstance(first, (list, tuple)) or isinstance(first, (int, float)):
        if isinstance(first, (int, float)) and len({json.dumps(r) for r in records}) == 1:
            return first  # equal across replicas (counts of exact pruning): kept as they are
        return np.mean(np.asarray(records, np.float64), axis=0).tolist()
    return first


def _over_replicas(per: list[dict]) -> dict:
    """One replica: its record; several: the mean record with the per-replica ones under ``replicas``."""
    return per[0] if len(per) == 1 else {**mean_record(per), "replicas": per}


@functools.lru_cache(maxsize=16)
def _apply_fn(model):
    """One eval-mode apply function per model (``train=False`` where ``__call__`` takes it, as imp's trainers
    decide), so the interpolation program is compiled once."""
    kwargs = {"train": False} if graph.takes_train(model) else {}
    return lambda variables, x: model.apply(variables, x, **kwargs)


def _stacked_form(tree: Any, k: int) -> Any:
    """``tree`` as :func:`jaxprune.imp.load_level` hands it out (one replica unstacked) with a leading replica axis."""
    return imp.checkpoint_form(tree, k, to_disk=False)


# ----------------------------------------------------------------------------------------------- analyses
class Analyzer:
    """The analyses of one IMP workdir trained on ``task`` with ``cfg``: reads finished levels back from their
    checkpoints, computes what ``analysis.json`` lacks (or holds for other settings or checkpoints), writes it and
    the plots. ``settings``: :func:`analysis_settings`."""

    def __init__(self, task: imp.Task, cfg: imp.ImpConfig, workdir: str | Path, settings: Mapping[str, dict]):
        self.task, self.cfg = task, cfg
        self.workdir = Path(workdir)
        self.settings = json.loads(json.dumps(settings))  # compared as stored
        self.k = task.num_replicas
        self.seeds = [task.seed + r for r in range(self.k)]
        self._cache: dict[int, dict] = {}
        self._setup = None
        self._prunable = None
        self._batches = None

    # --- inputs
    def level(self, k: int) -> dict:
        """Level ``k``'s checkpoint as :func:`jaxprune.imp.load_level` returns it (cached)."""
        if k not in self._cache:
            self._cache[k] = imp.load_level(self.workdir, k, self.task)
        return self._cache[k]

    def stacked(self, k: int, name: str) -> Any:
        """Level ``k``'s ``name`` (``"mask"``, or ``"variables"`` of its trained state) with a replica axis."""
        tree = self.level(k)["mask"] if name == "mask" else train.variables_of(self.level(k)["state"])
        return _stacked_form(tree, self.k)

    def prunable(self):
        if self._prunable is None:
            params = replicas.index(_stacked_form(self.level(0)["state"].params, self.k), 0)
            self._prunable = imp.prunable_tree(self.task, self.cfg, params)
        return self._prunable

    def setup(self) -> imp._Setup:
        """:func:`jaxprune.imp.run`'s own optimizers and trainers for this task (built once)."""
        if self._setup is None:
            self._setup = imp._Setup(self.task, None, self.cfg.finetune_lr)
        return self._setup

    def start(self, level: int) -> tuple[train.TrainState, train.Trainer]:
        """Level ``level``'s start point, stacked (one replica: a stack of one, as :func:`jaxprune.imp.run` holds
        it), and the trainer it trained with. Level 0 starts from its rewind point: the initial state, or for
        ``rewind=step`` the dense run's state at step k."""
        ck, setup = self.level(level), self.setup()
        if level == 0:
            return _stacked_form(ck["rewind_point"], self.k), setup.trainer_for("init")[0]
        trainer, tx = setup.trainer_for(self.cfg.rewind)
        fn = lambda m, p, rp: imp.start_level(tx, self.cfg.rewind, m, p, rp)
        trees = [_stacked_form(t, self.k) for t in (ck["mask"], self.level(level - 1)["state"], ck["rewind_point"])]
        return setup.rep.device(fn, *trees), trainer

    def train_copy(self, level: int, data_key: jax.Array | None = None) -> train.RunResult:
        """Train a copy of level ``level`` from its start point (data order: ``data_key``, one key for one
        replica and ``(K, …)`` stacked for several; default :func:`instability_data_key` of each replica's seed).
        One replica trains as the single run, like :func:`jaxprune.imp.run` trains it (its result unstacked)."""
        start, trainer = self.start(level)
        if data_key is None:
            data_key = replicas.stack([instability_data_key(s, level) for s in self.seeds])
            data_key = data_key[0] if self.k == 1 else data_key
        if self.k == 1:
            start = replicas.index(start, 0)
        task = self.task
        return train.run(trainer, start, task.x_train, task.y_train, batch_size=task.batch_size,
                         num_steps=task.num_steps, data_key=data_key, loop=task.loop,
                         log_prefix=f"[level {level} instability copy] ")

    # --- the analyses of one level
    def similarity(self, level: int) -> dict:
        s = self.settings["similarity"]
        x = self.task.x_test[: s["examples"]]
        v0, vk = self.stacked(0, "variables"), self.stacked(level, "variables")
        per = [self._similarity_of(replicas.index(v0, r), replicas.index(vk, r), x, level) for r in range(self.k)]
        out: dict = {"metrics": mean_record(per)}
        if self.k > 1:
            out["replicas"] = per
        return out

    def _similarity_of(self, v0: dict, vk: dict, x, level: int) -> dict:
        """One replica's ``{metric: {layer: value or None}}``, its level-``level`` network against its dense one."""
        s = self.settings["similarity"]
        dense, reps = representations(self.task.model, v0, x), representations(self.task.model, vk, x)
        bad = [n for n in dense if not (np.isfinite(np.asarray(dense[n])).all()
                                        and np.isfinite(np.asarray(reps[n])).all())]
        ok = {n: reps[n] for n in reps if n not in bad}
        vals = analysis.similarity_to_dense(ok, {n: dense[n] for n in ok}, s["metrics"],
                                            cca_conv=s["cca_conv"]) if ok else {m: {} for m in s["metrics"]}
        if bad:
            logging.warning("[level %d] similarity: non-finite representations in %s (diverged?)", level, bad)
        return {m: {n: vals[m].get(n) for n in dense} for m in s["metrics"]}

    def _pair(self, a, b, nested: bool) -> dict:
        rec = {"observed": plain(analysis.overlap(a, b, self.prunable())),
               "random": analysis.random_overlap_like(a, b, self.prunable())}
        if nested:
            rec["random_nested"] = analysis.random_overlap_like(a, b, self.prunable(), nested=True)
        return rec

    def overlap(self, level: int) -> dict:
        mk = self.stacked(level, "mask")
        out: dict = {"previous": None, "between_replicas": None}
        if level > 0:
            mp = self.stacked(level - 1, "mask")
            per = [self._pair(replicas.index(mp, r), replicas.index(mk, r), nested=True) for r in range(self.k)]
            out["previous"] = _over_replicas(per)
        if self.k > 1:
            pairs = [[r, q] for r in range(self.k) for q in range(r + 1, self.k)]
            per = [self._pair(replicas.index(mk, r), replicas.index(mk, q), nested=False) for r, q in pairs]
            out["between_replicas"] = {**mean_record(per), "pairs": pairs, "per_pair": per}
        return out

    def instability(self, level: int) -> dict:
        s, task = self.settings["instability"], self.task
        if self._batches is None:
            self._batches = analysis.make_batches(task.x_test, task.y_test, 1000)
        copy = train.variables_of(self.train_copy(level).state)
        va, vb = self.stacked(level, "variables"), _stacked_form(copy, self.k)
        recal = None
        if va.get("batch_stats"):
            recal = lambda v: train.recalibrate_batchnorm(task.model, v, task.x_train, **BN_RECALIBRATION)
        per = []
        for r in range(self.k):
            c = analysis.interpolation_curve(_apply_fn(task.model), replicas.index(va, r), replicas.index(vb, r),
                                             self._batches, s["points"], recalibrate=recal)
            per.append({"barrier": float(analysis.barrier(c)), "loss_barrier": float(analysis.barrier(c, metric="loss")),
                        "accuracy_a": float(c.accuracy[0]), "accuracy_b": float(c.accuracy[-1]),
                        **plain({"alphas": c.alphas, "error": c.error, "loss": c.loss})})
        if self.k == 1:
            return per[0]
        out = mean_record(per)
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

    def _analyse_level(self, rec: dict, records: list[dict], entry: dict, timing: dict, save) -> dict:
        """Level ``rec``'s entry with every analysis that is missing or stale computed (``save(entry)`` after
        each, so a kill keeps every finished analysis); ``timing``: the timing records by level, updated."""
        k = rec["level"]
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
            save(entry)
        return entry

    def update(self, records: list[dict], title: str = "") -> dict:
        """Analyse every finished level (``records``: their level records) that lacks a valid record; writes and
        returns the ``analysis.json`` dict."""
        path, tpath = self.workdir / "analysis.json", self.workdir / "analysis_timing.json"
        entries = {e["level"]: e for e in read_derived(path).get("levels", [])}
        timing = {t["level"]: t for t in read_derived(tpath).get("levels", [])}
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

            def save(entry, rec=rec):
                entries[rec["level"]] = self._ordered(rec, entry)
                write()

            entry = self._analyse_level(rec, records, entries.get(k, {}), timing, save)  # others kept as they are
            entries[k] = self._ordered(rec, entry)
        self._cache.clear()
        doc = write()
        plot_analyses(doc, self.workdir, title)
        return doc


def analyse(workdir: str | Path, task: imp.Task, cfg: imp.ImpConfig, settings: Mapping[str, dict],
            title: str = "") -> dict:
    """Analyse a finished (or partly finished) IMP workdir without training further (``settings``:
    :func:`analysis_settings`); writes and returns ``analysis.json``, holding the workdir's lock.

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
    records = [imp.read_level(workdir, k, task.seed) for k in imp.finished_levels(workdir)]
    if not records:
        raise FileNotFoundError(f"workdir={workdir}: no finished level yet")
    with checkpoint.workdir_lock(workdir):
        return Analyzer(task, cfg, workdir, settings).update(records, title)


# ----------------------------------------------------------------------------------------------- plots
def _similarity_plots(rows: list[dict], workdir: Path, title: str) -> list[Path]:
    out = []
    for m in rows[-1]["similarity"]["settings"]["metrics"]:
        use = [lv for lv in rows if m in lv["similarity"]["metrics"]]
        layers = list(use[0]["similarity"]["metrics"][m])
        per_layer = {n: [lv["similarity"]["metrics"][m].get(n) for lv in use] for n in layers}
        p = workdir / f"analysis_similarity_{m}.png"
        plots.similarity_vs_density([lv["density"] for lv in use], per_layer, p, metric=m,
                                    title=f"{title}\nevery layer vs the dense layer")
        out.append(p)
    return out


def _instability_plots(rows: list[dict], workdir: Path, title: str) -> list[Path]:
    ins, d = [lv["instability"] for lv in rows], [lv["density"] for lv in rows]
    std = [i.get("barrier_std", 0.0) for i in ins] if "barrier_std" in ins[0] else None
    p, q = workdir / "analysis_instability_barrier.png", workdir / "analysis_instability_paths.png"
    plots.barrier_vs_density({"error barrier": (d, [i["barrier"] for i in ins], std)}, p,
                             title=f"{title}\ninstability: two copies from each level's start point")
    plots.interpolation_paths(ins[0]["alphas"], {f"level {lv['level']} (d={lv['density']:.3f})":
                                                 lv["instability"]["error"] for lv in rows}, q,
                              title=f"{title}\ntest error on the linear path")
    return [p, q]


def _overlap_plots(rows: list[dict], workdir: Path, title: str) -> list[Path]:
    out = []
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


_PLOTS = {"similarity": _similarity_plots, "instability": _instability_plots, "overlap": _overlap_plots}


def plot_analyses(doc: dict, workdir: str | Path, title: str = "") -> list[Path]:
    """The plots of an ``analysis.json`` dict, written to ``workdir`` (``analysis_*.png``); returns their paths."""
    out = []
    for name, fn in _PLOTS.items():  # this order: the files as they were always written
        rows = [lv for lv in doc["levels"] if name in lv]
        if rows:
            out += fn(rows, Path(workdir), title)
    return out
