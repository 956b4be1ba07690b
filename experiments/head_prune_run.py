"""The head_prune experiment as functions (``experiments.head_prune`` is its command line, and its docstring
describes the outputs): the typed config :class:`HeadPruneSettings` (the flags are derived from it) and :func:`run`
(train or reuse every seed's network — or, with ``--task=lm``, restore the GPT of ``experiments.lm_prune`` — and
prune its heads and MLP units by every criterion and fraction; it takes a :class:`HeadPruneSettings` or its dict).
Importable without side effects.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import common, settings
from experiments.settings import setting
from jaxprune import (checkpoint, conventions, criteria, graph, lm, lm_criteria, models, plots, structured, train,
                      unit_criteria)

# the default --criteria; any name of the one table jaxprune.criteria.CRITERIA is accepted (``weight`` here is the
# --weight_norm of a head's weights, the entry l1 or l2; data-driven ones are those whose entry needs_data)
CRITERIA = ("lrp", "taylor", "grad", "weight", "random")
TASKS = ("classify", "lm")
COMPOSITES = ("attn_lrp", "cp_lrp")


@dataclasses.dataclass(frozen=True)
class HeadPruneSettings(common.TrainSettings):
    """Every flag of ``experiments.head_prune``, in flag order (:func:`experiments.settings.spec`): the shared
    training flags (:class:`experiments.common.TrainSettings`, with their shared defaults: the ViT recipe is in
    ``experiments/configs/head_prune_vit_mnist.cfg``), then head_prune's own."""

    criteria: tuple[str, ...] = setting(list(CRITERIA), f"unit criteria, any of {', '.join(CRITERIA)}")
    lrp_composite: str = setting("attn_lrp", "LRP composite of the lrp criterion (AttnLRP or CP-LRP)", COMPOSITES)
    weight_norm: str = setting("l2", "norm of the weight criterion (a head: its q/k/v weights and biases together)",
                               ("l1", "l2"))
    fractions: tuple[str, ...] = setting(["0.25", "0.5", "0.75"], "fractions of the heads AND of the MLP units "
                                                                  "removed in every layer, in (0, 1)")
    reference_examples: int = settings.row(common.REFERENCE_EXAMPLES)
    finetune_steps: str = settings.row(common.FINETUNE_STEPS)
    finetune_lr: float | None = settings.row(common.FINETUNE_LR)
    reference_sizes: tuple[str, ...] = setting(["1", "4", "16", "64", "256"], "reference set sizes of the "
                                               "few-samples check (data-driven criteria, one shot, no fine-tuning); "
                                               "empty: skip it")
    reference_fraction: float = setting(0.5, "fraction of heads and MLP units removed in the few-samples check, in "
                                             "(0, 1)")
    seeds: tuple[str, ...] = setting(["0", "1", "2"], "one trained network per seed (initialisation, data order, "
                                                      "reference draw, random criterion)")
    workdir: str = setting("runs/head_prune", "output directory (resumable)")
    task: str = setting("classify", "classify: train --model on --dataset (test accuracy); lm: the character GPT "
                                    "trained by experiments.lm_prune in --lm_workdir (validation loss, nats/char)",
                        TASKS)
    lm_workdir: str = setting("runs/lm_prune_shakespeare", "--task=lm: the experiments.lm_prune workdir whose dense/ "
                                                           "holds the trained GPT (reused by its run identity, never "
                                                           "retrained here)")


SPEC = settings.spec(HeadPruneSettings)
DEFAULTS = common.defaults(SPEC)
LM_FLAGS = ("task", "lm_workdir")  # part of the config only with --task=lm (image runs keep their run identity)
# --task=lm reads none of the shared training flags but --data_dir (the text's): they are refused when set and left
# out of an LM run's identity (--dataset/--model there name the GPT, from its record)
IMAGE_TRAINING = tuple(f.name for f in dataclasses.fields(common.TrainSettings) if f.name != "data_dir")
# may change between a run and its resumption: what is swept (cells are stored per criterion and fraction/size)
_VOLATILE = ("workdir", "data_dir", "seeds", "criteria", "fractions", "reference_sizes")
RANDOM_STREAM = 0x52414E44  # fold_in tag of the random criterion's key
FINETUNE_STREAM = 0x46544E45  # fold_in tag of the fine-tuning data order: the same for every criterion and fraction
# of a network, so criteria are compared on the same batches (paired per seed)


def _config(config: dict) -> dict:
    """The checked config (keys = flag names) of a :class:`HeadPruneSettings` or its dict; every error names its
    flag."""
    c = common.canonical_model_kwargs(common.with_defaults(settings.as_config(config), DEFAULTS))
    c["seeds"] = list(common.seed_list(c["seeds"]))
    crits = [str(k) for k in c["criteria"]]
    accepted = tuple(dict.fromkeys(CRITERIA + unit_criteria.names()))
    bad = [k for k in crits if k not in accepted]
    if bad or not crits or len(set(crits)) != len(crits):
        raise ValueError(f"criteria={','.join(crits)}: expected distinct criteria among {', '.join(accepted)}")
    c["criteria"] = crits
    c["fractions"] = common.fraction_list(c["fractions"], "fractions", upper_open=True)
    if min(c["fractions"]) <= 0.0:
        raise ValueError(f"fractions={min(c['fractions'])!r}: expected fractions in (0, 1) (0 removes nothing)")
    common.check_range("reference_fraction", c["reference_fraction"], 0, 1, low_open=True, high_open=True)
    c["reference_sizes"] = list(common.int_list(c["reference_sizes"], "reference_sizes"))
    for name, values in (("reference_examples", [c["reference_examples"]]), ("reference_sizes", c["reference_sizes"])):
        if any(isinstance(v, bool) or v < 1 for v in values):
            raise ValueError(f"{name}={','.join(map(str, values))}: expected integers >= 1 (training examples)")
    if c["lrp_composite"] not in COMPOSITES:
        raise ValueError(f"lrp_composite={c['lrp_composite']!r}: expected one of {', '.join(COMPOSITES)}")
    if c["weight_norm"] not in ("l1", "l2"):
        raise ValueError(f"weight_norm={c['weight_norm']!r}: expected l1 or l2")
    common.check_finetune_lr(c["finetune_lr"])
    if c["task"] not in TASKS:
        raise ValueError(f"task={c['task']!r}: expected one of {', '.join(TASKS)}")
    if c["task"] == "classify":
        return {k: v for k, v in c.items() if k not in LM_FLAGS}
    why = ("with --task=lm (the GPT of --lm_workdir is restored, not trained; of the training flags only --data_dir "
           "is read)")
    common.check_unused(c, [(k, why) for k in IMAGE_TRAINING if common.changed(c, DEFAULTS, k)])
    if not str(c["finetune_steps"]).isdigit():
        raise ValueError(f"finetune_steps={c['finetune_steps']!r}: expected a number of steps with --task=lm (the "
                         "text has no epochs)")
    if c["finetune_lr"] is None and int(c["finetune_steps"]) > 0:
        raise ValueError("finetune_lr unset with --task=lm: the GPT's cosine schedule ends at 0, so fine-tuning at "
                         "its final learning rate would change no weight; set --finetune_lr (e.g. 0.0005)")
    return c


class Metric(NamedTuple):
    """What a cell measures: its results key, the factor and format it is shown with, its axis label."""

    key: str
    scale: float
    fmt: str
    label: str


ACCURACY = Metric("accuracy", 100.0, ".2f", "test accuracy (%)")
VAL_LOSS = Metric("val_loss", 1.0, ".4f", "validation loss (nats/char)")


def metric_of(c: dict) -> Metric:
    return VAL_LOSS if c.get("task") == "lm" else ACCURACY


class LMData(NamedTuple):
    """The language-model task: the training text ``(chars,) int32`` (device), the fixed validation windows
    ``(x, y): (n, context)``, the trained GPT's context, batch size and weight decay, and a per-run cache of
    compiled fine-tuning rounds (one per pruned shape)."""

    train_ids: object
    val: tuple
    context: int
    batch_size: int
    weight_decay: float
    chunks: dict


class Task(NamedTuple):
    """One trained network and what pruning it needs: the data (device arrays), its groups and widths."""

    model: object
    variables: dict
    data: tuple  # (x, y, x_test, y_test)
    groups: tuple  # structured.unit_groups
    widths: dict  # structured.group_widths
    seed: int
    lm: LMData | None = None  # the language-model task; None: image classification

    @property
    def example(self):
        """One example's shape (float images) or its ``jax.ShapeDtypeStruct`` (integer token ids)."""
        shape = (1,) + tuple(self.data[0].shape[1:])
        return shape if self.lm is None else jax.ShapeDtypeStruct(shape, self.data[0].dtype)


def _evaluate(t: Task, model, variables: dict) -> float:
    """Test accuracy (classification) or validation loss in nats/char (language model)."""
    if t.lm is None:
        return common.accuracy(model, variables, *t.data[2:])
    return lm.evaluate(lm.flax_apply(model), variables["params"], *t.lm.val)


def _groups(model, variables, example, flag: str | None = None) -> tuple[tuple, dict]:
    """``(groups, widths)`` of the model: its attention heads (q/k/v together: the groups of several layers) and its
    prunable dense layers (1-tuples); a model without attention heads is refused (``flag``: its --model)."""
    groups = structured.unit_groups(model, variables, x=example)
    if not any(len(g) > 1 for g in groups):
        name = type(model).__name__ if flag is None else f"{flag!r} ({type(model).__name__})"
        raise ValueError(f"model={name} has no attention heads to remove (head_prune removes "
                         "attention heads and MLP units; expected an attention model, e.g. --model=vit: see "
                         "--flagfile=experiments/configs/head_prune_vit_mnist.cfg)")
    return groups, structured.group_widths(model, variables, groups, x=example)


def _n_keep(widths: dict, fraction: float) -> dict:
    """``{group: units kept}`` when ``ceil(fraction · width)`` units of every group are removed."""
    return {g: structured.n_keep_for(w, fraction) for g, w in widths.items()}


def _check_fractions(c: dict, widths: dict) -> None:
    """Refuse a fraction that would remove every unit of a group (e.g. 0.9 of 4 heads), naming the flag."""
    for name, fracs in (("fractions", c["fractions"]), ("reference_fraction", [c["reference_fraction"]])):
        for f in fracs:
            empty = [g for g, k in _n_keep(widths, f).items() if k < 1]
            if empty:
                raise ValueError(f"{name}={f:g}: would remove all {widths[empty[0]]} units of {empty[0]!r} "
                                 f"(ceil({f:g} · {widths[empty[0]]})); expected a smaller fraction")


def _source(c: dict, crit: str, t: Task, x_ref, y_ref):
    """What :func:`jaxprune.structured.select_groups` ranks by: a weight criterion's name or the data scores."""
    if crit == "weight":
        return c["weight_norm"]
    if not _data_driven(crit):  # by name: select_groups dispatches it through the criterion table
        return crit
    scores = criteria.scores if t.lm is None else lm_criteria.scores
    return scores(crit, t.model, t.variables, x_ref, y_ref, normalized=False, composite=c["lrp_composite"])


def _data_driven(crit: str) -> bool:
    """Whether ``crit`` scores on reference examples (its entry of :data:`jaxprune.criteria.CRITERIA` needs data)."""
    entry = criteria.CRITERIA.get(crit)
    return entry is not None and entry.needs_data


def _remove(t: Task, source, fraction: float) -> tuple:
    """The network with ``fraction`` of every group's units removed by ``source``: ``(model, variables)``."""
    key = jax.random.fold_in(jax.random.PRNGKey(t.seed), RANDOM_STREAM)  # one draw per network: nested fractions
    keep = structured.select_groups(t.model, t.variables, _n_keep(t.widths, fraction), source, key=key,
                                    x=t.example)
    return structured.remove_many(t.model, t.variables, keep, x=t.example)


@functools.lru_cache(maxsize=16)
def _finetuner(model, optim: train.OptimConfig) -> tuple:
    """``(tx, trainer)`` at a constant learning rate, one compile per pruned shape (criteria share it)."""
    tx = train.make_optimizer(optim, optim.lr)
    return tx, train.make_trainer(model, tx)


def _finetune(c: dict, model, variables: dict, t: Task, key) -> dict:
    """``variables`` after one fine-tuning round of ``--finetune_steps`` on the training set."""
    if t.lm is not None:
        return _finetune_lm(c, model, variables, t, key)
    x, y = t.data[:2]
    steps = common.finetune_steps(c, len(y))
    optim = common.finetune_optim(c, len(y))
    tx, trainer = _finetuner(model, optim)
    res = train.run(trainer, train.create_state(variables, tx), x, y, batch_size=c["batch_size"], num_steps=steps,
                    data_key=key, loop=c["loop"])
    return train.variables_of(res.state)


def _finetune_lm(c: dict, model, variables: dict, t: Task, key) -> dict:
    """The language model's round: ``--finetune_steps`` AdamW steps at the constant ``--finetune_lr`` (the GPT's
    weight decay, gradient clipping at 1) on random training windows of its batch size (``key``: their starts)."""
    steps, d = int(c["finetune_steps"]), t.lm
    cfg = lm.LMConfig(steps=steps, batch_size=d.batch_size, context=d.context, weight_decay=d.weight_decay)
    tx = cfg.finetune_optimizer(float(c["finetune_lr"]))
    if (model, steps) not in d.chunks:
        d.chunks[(model, steps)] = lm.make_chunk(lm.flax_apply(model), tx, d.train_ids, cfg)
    params = variables["params"]
    params, _, _ = d.chunks[(model, steps)](params, tx.init(params), key, jnp.int32(0), steps)
    return {"params": params}


def _cell_finetune_steps(c: dict, t: Task) -> int:
    return int(c["finetune_steps"]) if t.lm is not None else common.finetune_steps(c, len(t.data[1]))


def oneshot_cell(c: dict, t: Task, crit: str, fraction: float, ref: tuple) -> dict:
    """One criterion at one fraction on one network: accuracy after removal and after fine-tuning, the widths."""
    m = metric_of(c).key
    small, small_vars = _remove(t, _source(c, crit, t, *ref), fraction)
    cell = {m: _evaluate(t, small, small_vars),
            "widths": _n_keep(t.widths, fraction),  # = group_widths of the pruned network (a GPT with one head
            # left is not read as heads by the graph: dense + reshape to one head)
            "params": models.count_params(small_vars["params"])}
    if _cell_finetune_steps(c, t) > 0:
        key = jax.random.fold_in(jax.random.PRNGKey(t.seed), FINETUNE_STREAM)  # one data order for every cell
        t0 = time.perf_counter()
        cell[f"{m}_finetuned"] = _evaluate(t, small, _finetune(c, small, small_vars, t, key))
        if t.lm is not None:
            cell["finetune_seconds"] = time.perf_counter() - t0
    return cell


def reference_cell(c: dict, t: Task, crit: str, ref: tuple) -> dict:
    """One data-driven criterion on one reference set at ``--reference_fraction``: accuracy without fine-tuning."""
    small, small_vars = _remove(t, _source(c, crit, t, *ref), float(c["reference_fraction"]))
    return {metric_of(c).key: _evaluate(t, small, small_vars)}


def _reference_draw(seed: int, num_train: int, n: int) -> np.ndarray:
    """The first ``n`` of seed ``seed``'s permutation of the training set (sizes are nested)."""
    return np.random.default_rng(seed).permutation(num_train)[:n]


def _cells(c: dict, t: Task, path: Path) -> dict:
    """Every cell of one network, resumed from ``path`` (``cells.json``, written after each finished cell)."""
    hint = f"; delete {path} to recompute this seed's cells"
    stored = checkpoint.read_record(path, {"seed": t.seed}, hint) if path.exists() else {}
    done = {"oneshot": dict(stored.get("oneshot", {})), "reference": dict(stored.get("reference", {}))}
    x, y = t.data[:2]
    idx = _reference_draw(t.seed, len(y), max([c["reference_examples"], *c["reference_sizes"]]))
    for crit in c["criteria"]:
        for table, name, fraction, size in _cell_list(c, crit):
            if name in done[table]:
                continue
            t0 = time.perf_counter()
            ref = (x[idx[:size]], y[idx[:size]])
            cell = (oneshot_cell(c, t, crit, fraction, ref) if table == "oneshot" else reference_cell(c, t, crit, ref))
            done[table][name] = {**cell, "seconds": time.perf_counter() - t0}
            with checkpoint.interrupts_deferred():
                checkpoint.write_record(path, done, {"seed": t.seed})
            logging.info("seed %d %s %s: %s", t.seed, table, name, {k: v for k, v in cell.items() if metric_of(c).key in k})
    return done


def _cell_list(c: dict, crit: str) -> list[tuple[str, str, float, int]]:
    """``(table, cell name, fraction, reference examples)`` of one criterion's cells in a seed's ``cells.json``."""
    cells = [("oneshot", f"{crit}@{f:g}", f, c["reference_examples"]) for f in c["fractions"]]
    return cells + [("reference", f"{crit}@{n}", float(c["reference_fraction"]), n)
                    for n in c["reference_sizes"] if _data_driven(crit)]


def _pending(c: dict, workdir: Path) -> list[str]:
    """The criteria with a cell not yet finished for some seed (a finished criterion needs no preflight)."""
    done = []
    for s in c["seeds"]:
        path = workdir / f"seed_{s}" / "cells.json"
        done.append(checkpoint.read_record(path, {"seed": s}, f"; delete {path}") if path.exists() else {})
    return [crit for crit in c["criteria"]
            if any(cell[1] not in d.get(cell[0], {}) for d in done for cell in _cell_list(c, crit))]


def _preflight(c: dict, model, x, y, pending: list[str]) -> None:
    """Refuse, before any training, a model without groups, a fraction that empties a group, or a criterion that
    cannot score the model: every ``pending`` criterion selects at the largest fraction on an untrained network."""
    example = (1,) + tuple(x.shape[1:])
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.PRNGKey(0), x.shape))  # the graph needs no values
    _check_fractions(c, _groups(model, shapes, example, c["model"])[1])
    if not pending:
        return
    variables = models.init(model, jax.random.PRNGKey(0), x.shape)
    t = Task(model, variables, (x, y, x, y), *_groups(model, variables, example), 0)
    n = min(int(c["reference_examples"]), 4, len(y))
    for crit in pending:
        try:
            _remove(t, _source(c, crit, t, x[:n], y[:n]), max(c["fractions"]))
        except (TypeError, KeyError, NotImplementedError, ValueError, graph.UnsupportedError) as e:
            raise ValueError(f"criteria={crit!r} with model={c['model']!r}: cannot score or remove its heads and "
                             f"units ({type(e).__name__}: {str(e).splitlines()[0]})") from None


@common.locked
def run(config: dict, workdir: str | Path) -> dict:
    """Train (or reuse) one network per seed, prune it by every criterion and fraction; the ``results.json`` dict."""
    c = _config(config)
    workdir = Path(workdir)
    if c.get("task") == "lm":
        return _run_lm(c, workdir)
    tr, te = common.load_data(c["dataset"], c["data_dir"], c["normalize"], c["max_train_examples"],
                              c["max_test_examples"])
    largest = max([c["reference_examples"], *c["reference_sizes"]])
    if largest > len(tr.labels):
        raise ValueError(f"reference_examples/reference_sizes={largest}: expected at most the {len(tr.labels)} "
                         "training examples")
    model = common.build_model(c, tr.num_classes, input_shape=tr.images.shape, defaults=DEFAULTS)
    if common.finetune_steps(c, len(tr.labels)) > 0:  # an unset --finetune_lr after a schedule ending at 0: now
        common.finetune_optim(c, len(tr.labels))
    common.check_training_unused(c, DEFAULTS, len(tr.labels))
    common.check_trained(c, c["seeds"], lambda s: workdir / f"seed_{s}" / "trained")
    _preflight(c, model, tr.images, tr.labels, _pending(c, workdir))
    workdir.mkdir(parents=True, exist_ok=True)  # a refused flag or model leaves no workdir
    checkpoint.check_run_config(workdir, c, _VOLATILE)
    data = train.to_device(tr.images, tr.labels, te.images, te.labels)
    per_seed = {}
    for seed in c["seeds"]:
        d = workdir / f"seed_{seed}"
        variables, rec = common.train_network(c, model, data[0], data[1], seed, d / "trained")
        t = Task(model, variables, tuple(data), *_groups(model, variables, (1,) + tuple(tr.images.shape[1:])), seed)
        dense = common.accuracy(model, variables, data[2], data[3])
        logging.info("seed %d: trained (%.0f s), test accuracy %.4f", seed, rec["seconds"], dense)
        per_seed[seed] = {"dense_accuracy": dense, "training": rec, **_cells(c, t, d / "cells.json")}
    return write_results(c, workdir, t, per_seed)


LM_REFERENCE_STREAM = 0x4C4D5246  # fold_in tag of a seed's reference windows (language model)


def _trained_gpt(c: dict) -> tuple:
    """``(model, params, text, record)`` of the GPT trained by :mod:`experiments.lm_prune` in ``--lm_workdir``,
    restored by its run identity (its ``dense/trained.json`` settings); a missing one is refused, not trained."""
    from experiments import lm_prune

    dense = Path(c["lm_workdir"]) / "dense" / "trained.json"
    if not dense.exists():
        raise ValueError(f"lm_workdir={c['lm_workdir']!r}: no trained GPT (expected {dense}); train one with "
                         f"python -m experiments.lm_prune --workdir={c['lm_workdir']}")
    lc = common.with_defaults({**checkpoint.read_json(dense)["settings"], "data_dir": c["data_dir"]},
                              lm_prune.DEFAULTS)
    text, model, _ = lm_prune.build(lc)
    params, rec = lm_prune.dense_model(lc, c["lm_workdir"])
    return model, params, text, rec


def lm_identity(c: dict, gpt_settings: dict) -> dict:
    """The config of an LM run (its ``config.json`` less the volatile keys, and ``results.json``'s ``config``): the
    settings the LM task reads, the GPT's ``lm_settings``, and ``dataset``/``model`` naming the GPT; none of the
    image-training flags (:data:`IMAGE_TRAINING`)."""
    return {**_without_image_training(c), "lm_settings": gpt_settings, "dataset": gpt_settings["dataset"],
            "model": "gpt"}


def check_lm_run_config(workdir: Path, c: dict, gpt_settings: dict) -> dict:
    """The LM run's config (:func:`lm_identity`), recorded in ``workdir/config.json`` or checked against the one
    there (:func:`jaxprune.checkpoint.check_run_config`); one written by an earlier release, which also holds the
    unread image-training flags, is compared without them."""
    c = lm_identity(c, gpt_settings)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    checkpoint.check_run_config(workdir, c, _VOLATILE, migrate=_without_image_training)
    return c


def _without_image_training(record: dict) -> dict:
    """``record`` less the image-training flags, ``dataset`` and ``model`` (the GPT's names) kept: a ``config.json``
    of an LM run written before 2026-12-06 holds them all, unread, and is still the same run."""
    return {k: v for k, v in record.items() if k not in IMAGE_TRAINING or k in ("dataset", "model")}


def _run_lm(c: dict, workdir: Path) -> dict:
    """:func:`run` for ``--task=lm``: one trained GPT; per seed its reference windows, random criterion and
    fine-tuning batches (seed-derived keys); validation loss instead of accuracy."""
    model, params, text, rec = _trained_gpt(c)
    s = rec["settings"]
    variables, ctx = {"params": params}, int(s["context"])
    example = jax.ShapeDtypeStruct((1, ctx), jnp.int32)
    groups, widths = _groups(model, variables, example)
    _check_fractions(c, widths)
    c = check_lm_run_config(workdir, c, s)
    ids = jnp.asarray(text.train, jnp.int32)
    d = LMData(ids, lm.fixed_windows(text.val, int(rec["val_windows"]), ctx), ctx, int(s["batch_size"]),
               float(s["weight_decay"]), {})
    largest = max([c["reference_examples"], *c["reference_sizes"]])
    dense = _evaluate(Task(model, variables, (np.zeros((1, ctx), np.int32),), groups, widths, 0, d), model, variables)
    logging.info("GPT of %s: validation loss %.4f nats/char (trained: %.4f)", c["lm_workdir"], dense, rec["val_loss"])
    per_seed = {}
    for seed in c["seeds"]:
        key = jax.random.fold_in(jax.random.PRNGKey(seed), LM_REFERENCE_STREAM)
        xr, yr = (np.asarray(a) for a in lm.random_windows(ids, key, largest, ctx))
        t = Task(model, variables, (xr, yr), groups, widths, seed, d)
        per_seed[seed] = {"dense_val_loss": dense, "training": {k: rec[k] for k in ("seconds", "val_loss")},
                          **_cells(c, t, workdir / f"seed_{seed}" / "cells.json")}
    return write_results(c, workdir, t, per_seed)


def _summary(values) -> dict:
    return {**conventions.summary(values), "values": [float(v) for v in values]}


def summarize(c: dict, per_seed: dict) -> dict:
    """``{"oneshot": {crit: {fraction: …}}, "reference": {crit: {size: …}}}`` over seeds (mean, std ddof = 1)."""
    runs, m = list(per_seed.values()), metric_of(c).key
    out: dict = {"oneshot": {}, "reference": {}}
    for crit in c["criteria"]:
        for f in c["fractions"]:
            cells = [r["oneshot"][f"{crit}@{f:g}"] for r in runs]
            entry = {k: _summary([x[k] for x in cells]) for k in (m, f"{m}_finetuned") if k in cells[0]}
            out["oneshot"].setdefault(crit, {})[f"{f:g}"] = {**entry, "widths": cells[0]["widths"],
                                                               "params": cells[0]["params"]}
        for n in c["reference_sizes"] if _data_driven(crit) else ():
            out["reference"].setdefault(crit, {})[str(n)] = {
                m: _summary([r["reference"][f"{crit}@{n}"][m] for r in runs])}
    return out


def write_results(c: dict, workdir: Path, t: Task, per_seed: dict) -> dict:
    """``results.json``, ``results.csv`` and the three plots of the finished seeds."""
    m = metric_of(c).key
    dense = _summary([r[f"dense_{m}"] for r in per_seed.values()])
    results = {"config": {**c, "workdir": str(workdir)}, "environment": common.environment(),
               "groups": [list(g) for g in t.groups], "original_widths": t.widths, "dense": {m: dense},
               **summarize(c, per_seed), "reference_fraction": float(c["reference_fraction"]),
               "per_seed": {str(s): r for s, r in per_seed.items()}, "finished": True}
    checkpoint.write_record(workdir / "results.json", results)
    common.write_csv(workdir / "results.csv", csv_rows(results), csv_columns(metric_of(c)))
    plot(results, workdir)
    return results


def csv_columns(metric: Metric = ACCURACY) -> tuple[str, ...]:
    return ("sweep", "criterion", "fraction", "reference_examples", f"{metric.key}_mean", f"{metric.key}_std",
            "finetuned_mean", "finetuned_std", "num_seeds")


CSV_COLUMNS = csv_columns()


def csv_rows(results: dict) -> list[dict]:
    """One row per criterion × fraction (``sweep=fraction``) and per criterion × reference size (``reference``)."""
    c = results["config"]
    m = metric_of(c).key
    rows = []
    for crit, by_f in results["oneshot"].items():
        for f, e in by_f.items():
            ft = e.get(f"{m}_finetuned", {})
            rows.append({"sweep": "fraction", "criterion": crit, "fraction": f, "reference_examples":
                         c["reference_examples"] if _data_driven(crit) else "", f"{m}_mean":
                         e[m]["mean"], f"{m}_std": e[m]["std"], "finetuned_mean":
                         ft.get("mean", ""), "finetuned_std": ft.get("std", ""), "num_seeds": e[m]["n"]})
    for crit, by_n in results["reference"].items():
        for n, e in by_n.items():
            rows.append({"sweep": "reference", "criterion": crit, "fraction": results["reference_fraction"],
                         "reference_examples": n, f"{m}_mean": e[m]["mean"],
                         f"{m}_std": e[m]["std"], "num_seeds": e[m]["n"]})
    return rows


def plot(results: dict, workdir: Path) -> None:
    """Accuracy (validation loss) vs fraction pruned (one curve per criterion, ± std; fraction 0 = the unpruned
    network), without and with fine-tuning, and vs reference-set size (log x; the data-free criteria as flat
    lines)."""
    c, m = results["config"], metric_of(results["config"])
    dense, k = results["dense"][m.key], m.scale
    what = f"{c['model']}/{c['dataset']}, {dense['n']} seed(s)"
    fracs = [0.0] + [float(f) for f in next(iter(results["oneshot"].values()))]
    for key, tail in ((m.key, "no fine-tuning"), (f"{m.key}_finetuned", "after fine-tuning")):
        by = {crit: list(e.values()) for crit, e in results["oneshot"].items() if key in next(iter(e.values()))}
        if by:
            plots.curves(fracs, {n: [k * dense["mean"]] + [k * e[key]["mean"] for e in v] for n, v in by.items()},
                         workdir / f"{m.key}_vs_fraction{key[len(m.key):]}.png",
                         xlabel="fraction of heads and MLP units removed per layer", ylabel=m.label,
                         title=f"{what}: {tail}",
                         errors={n: [k * dense["std"]] + [k * e[key]["std"] for e in v] for n, v in by.items()})
    if results["reference"]:
        sizes = [int(n) for n in next(iter(results["reference"].values()))]
        ref = {n: [k * e[m.key]["mean"] for e in v.values()] for n, v in results["reference"].items()}
        err = {n: [k * e[m.key]["std"] for e in v.values()] for n, v in results["reference"].items()}
        rf = f"{results['reference_fraction']:g}"  # the data-free criteria at that fraction, when they ran at it
        flat = {f"{n} (no data)": [k * e[rf][m.key]["mean"]] * len(sizes)
                for n, e in results["oneshot"].items() if not _data_driven(n) and rf in e}
        unpruned = f"{100 * dense['mean']:.1f} %" if m == ACCURACY else f"{dense['mean']:.3f} nats/char"
        plots.curves(sizes, {**ref, **flat}, workdir / f"{m.key}_vs_reference.png", xlabel="reference examples",
                     ylabel=m.label, errors=err, logx=True,
                     title=f"{what}: {rf} removed, one shot, unpruned {unpruned}")


def format_table(results: dict) -> str:
    """Markdown: accuracy (%) or validation loss (nats/char) per criterion × fraction, ``mean ± std`` without /
    with fine-tuning."""
    m = metric_of(results["config"])
    fr = list(next(iter(results["oneshot"].values())))
    d = results["dense"][m.key]
    pm = lambda e: f"{m.scale * e['mean']:{m.fmt}} ± {m.scale * e['std']:{m.fmt}}"
    lines = [f"unpruned: {pm(d)} ({d['n']} seeds); cells: one shot / after fine-tuning",
             "| criterion | " + " | ".join(f"{f} removed" for f in fr) + " |", "|---" * (len(fr) + 1) + "|"]
    for crit, by_f in results["oneshot"].items():
        lines.append(f"| {crit} | " + " | ".join(
            pm(e[m.key]) + (f" / {pm(e[m.key + '_finetuned'])}" if m.key + "_finetuned" in e else "")
            for e in by_f.values()) + " |")
    if results["reference"]:
        sizes = list(next(iter(results["reference"].values())))
        lines += ["", f"one shot at {results['reference_fraction']:g} removed, by reference examples",
                  "| criterion | " + " | ".join(sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
        lines += [f"| {crit} | " + " | ".join(pm(e[m.key]) for e in by_n.values()) + " |"
                  for crit, by_n in results["reference"].items()]
    return "\n".join(lines)


def report(results: dict, config: dict) -> str:
    return format_table(results)


if __name__ == "__main__":
    common.launch(SPEC, run, report)
