"""Attention heads and MLP units of a ViT pruned by LRP, Taylor, gradient, weight and random:
``python -m experiments.head_prune --flagfile=experiments/configs/head_prune_vit_mnist.cfg``.

Per seed of ``--seeds``: train the ``--model`` (default :class:`jaxprune.models.ViT`) once (or reuse the network
trained earlier in ``--workdir`` with the same settings: the run-identity rule of :mod:`experiments.common`). Its
pruning groups are read from its graph (:func:`jaxprune.structured.unit_groups`): the q/k/v projections of each
attention (one unit = one head) and each MLP hidden layer (one unit = one hidden unit). Then, for every criterion
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

``results.json``: ``config``, ``environment``, ``groups`` (the pruning groups, each a list of layers),
``original_widths`` (``{group's first layer: units}``), ``dense`` (test accuracy summary), ``oneshot``
(``{criterion: {fraction: {"accuracy", "accuracy_finetuned", "widths", "params"}}}``), ``reference``
(``{criterion: {size: {"accuracy"}}}``), ``reference_fraction``, ``per_seed``, ``finished``; every accuracy is
``{"mean", "std" (ddof = 1), "n", "values" (per seed)}`` (:func:`jaxprune.conventions.summary`).
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from absl import logging

from experiments import common
from jaxprune import checkpoint, conventions, criteria, graph, models, plots, structured, train, unit_criteria

# the default --criteria; any name of the one table jaxprune.criteria.CRITERIA is accepted (``weight`` here is the
# --weight_norm of a head's weights, the entry l1 or l2; data-driven ones are those whose entry needs_data)
CRITERIA = ("lrp", "taylor", "grad", "weight", "random")
COMPOSITES = ("attn_lrp", "cp_lrp")
_TRAINING = {"dataset": "mnist", "model": "vit", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
             "schedule": "cosine", "milestones": [], "training_steps": "1000", "batch_size": 128}
SPEC = [(row[0], _TRAINING.get(row[0], row[1]), *row[2:]) for row in common.TRAIN_SPEC] + [
    ("criteria", list(CRITERIA), f"unit criteria, any of {', '.join(CRITERIA)}"),
    ("lrp_composite", "attn_lrp", "LRP composite of the lrp criterion (AttnLRP or CP-LRP)", COMPOSITES),
    ("weight_norm", "l2", "norm of the weight criterion (a head: its q/k/v weights and biases together)",
     ("l1", "l2")),
    ("fractions", ["0.25", "0.5", "0.75"], "fractions of the heads AND of the MLP units removed in every layer, "
                                           "in (0, 1)"),
    ("reference_examples", 256, "training examples the data-driven criteria (lrp, taylor, grad) are computed on"),
    ("finetune_steps", "100", "one fine-tuning round after each removal, steps ('100') or epochs ('1ep'); 0: none"),
    ("finetune_lr", 3e-4, "constant learning rate of the fine-tuning round (the training --optimizer)"),
    ("reference_sizes", ["1", "4", "16", "64", "256"], "reference set sizes of the few-samples check (data-driven "
                                                       "criteria, one shot, no fine-tuning); empty: skip it"),
    ("reference_fraction", 0.5, "fraction of heads and MLP units removed in the few-samples check, in (0, 1)"),
    ("seeds", ["0", "1", "2"], "one trained network per seed (initialisation, data order, reference draw, random "
                               "criterion)"),
    ("workdir", "runs/head_prune", "output directory (resumable)"),
]
DEFAULTS = common.defaults(SPEC)
# may change between a run and its resumption: what is swept (cells are stored per criterion and fraction/size)
_VOLATILE = ("workdir", "data_dir", "seeds", "criteria", "fractions", "reference_sizes")
RANDOM_STREAM = 0x52414E44  # fold_in tag of the random criterion's key
FINETUNE_STREAM = 0x46544E45  # fold_in tag of the fine-tuning data order: the same for every criterion and fraction
# of a network, so criteria are compared on the same batches (paired per seed)


def _config(config: dict) -> dict:
    """The checked config (keys = flag names); every error names its flag."""
    c = common.canonical_model_kwargs(common.with_defaults(config, DEFAULTS))
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
    common.check_range("finetune_lr", c["finetune_lr"], 0, low_open=True)
    return c


class Task(NamedTuple):
    """One trained network and what pruning it needs: the data (device arrays), its groups and widths."""

    model: object
    variables: dict
    data: tuple  # (x, y, x_test, y_test)
    groups: tuple  # structured.unit_groups
    widths: dict  # structured.group_widths
    seed: int

    @property
    def example(self) -> tuple:
        return (1,) + tuple(self.data[0].shape[1:])


def _groups(model, variables, example) -> tuple[tuple, dict]:
    """``(groups, widths)`` of the model: its attention heads (q/k/v together) and its prunable dense layers."""
    groups = structured.unit_groups(model, variables, x=example)
    if not groups:
        raise ValueError(f"model: {type(model).__name__} has no attention heads or hidden units to remove")
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
    return criteria.scores(crit, t.model, t.variables, x_ref, y_ref, normalized=False, composite=c["lrp_composite"])


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
    x, y = t.data[:2]
    steps = _finetune_steps(c, len(y))
    optim = train.OptimConfig(optimizer=c["optimizer"], lr=float(c["finetune_lr"]), momentum=c["momentum"],
                              weight_decay=c["weight_decay"])
    tx, trainer = _finetuner(model, optim)
    res = train.run(trainer, train.create_state(variables, tx), x, y, batch_size=c["batch_size"], num_steps=steps,
                    data_key=key, loop=c["loop"])
    return train.variables_of(res.state)


def _finetune_steps(c: dict, num_train: int) -> int:
    return train.parse_duration(c["finetune_steps"], train.steps_per_epoch(num_train, c["batch_size"]),
                                "finetune_steps")


def oneshot_cell(c: dict, t: Task, crit: str, fraction: float, ref: tuple) -> dict:
    """One criterion at one fraction on one network: accuracy after removal and after fine-tuning, the widths."""
    x_test, y_test = t.data[2:]
    small, small_vars = _remove(t, _source(c, crit, t, *ref), fraction)
    cell = {"accuracy": common.accuracy(small, small_vars, x_test, y_test),
            "widths": structured.group_widths(small, small_vars, t.groups, x=t.example),
            "params": models.count_params(small_vars["params"])}
    if _finetune_steps(c, len(t.data[1])) > 0:
        key = jax.random.fold_in(jax.random.PRNGKey(t.seed), FINETUNE_STREAM)  # one data order for every cell
        cell["accuracy_finetuned"] = common.accuracy(small, _finetune(c, small, small_vars, t, key), x_test, y_test)
    return cell


def reference_cell(c: dict, t: Task, crit: str, ref: tuple) -> dict:
    """One data-driven criterion on one reference set at ``--reference_fraction``: accuracy without fine-tuning."""
    small, small_vars = _remove(t, _source(c, crit, t, *ref), float(c["reference_fraction"]))
    return {"accuracy": common.accuracy(small, small_vars, *t.data[2:])}


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
            logging.info("seed %d %s %s: %s", t.seed, table, name, {k: v for k, v in cell.items() if "acc" in k})
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
    _check_fractions(c, _groups(model, shapes, example)[1])
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
    tr, te = common.load_data(c["dataset"], c["data_dir"], c["normalize"], c["max_train_examples"],
                              c["max_test_examples"])
    largest = max([c["reference_examples"], *c["reference_sizes"]])
    if largest > len(tr.labels):
        raise ValueError(f"reference_examples/reference_sizes={largest}: expected at most the {len(tr.labels)} "
                         "training examples")
    model = common.build_model(c, tr.num_classes, input_shape=tr.images.shape, defaults=DEFAULTS)
    _finetune_steps(c, len(tr.labels))
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


def _summary(values) -> dict:
    return {**conventions.summary(values), "values": [float(v) for v in values]}


def summarize(c: dict, per_seed: dict) -> dict:
    """``{"oneshot": {crit: {fraction: …}}, "reference": {crit: {size: …}}}`` over seeds (mean, std ddof = 1)."""
    runs = list(per_seed.values())
    out: dict = {"oneshot": {}, "reference": {}}
    for crit in c["criteria"]:
        for f in c["fractions"]:
            cells = [r["oneshot"][f"{crit}@{f:g}"] for r in runs]
            entry = {k: _summary([x[k] for x in cells]) for k in ("accuracy", "accuracy_finetuned") if k in cells[0]}
            out["oneshot"].setdefault(crit, {})[f"{f:g}"] = {**entry, "widths": cells[0]["widths"],
                                                               "params": cells[0]["params"]}
        for n in c["reference_sizes"] if _data_driven(crit) else ():
            out["reference"].setdefault(crit, {})[str(n)] = {
                "accuracy": _summary([r["reference"][f"{crit}@{n}"]["accuracy"] for r in runs])}
    return out


def write_results(c: dict, workdir: Path, t: Task, per_seed: dict) -> dict:
    """``results.json``, ``results.csv`` and the three plots of the finished seeds."""
    dense = _summary([r["dense_accuracy"] for r in per_seed.values()])
    results = {"config": {**c, "workdir": str(workdir)}, "environment": common.environment(),
               "groups": [list(g) for g in t.groups], "original_widths": t.widths, "dense": {"accuracy": dense},
               **summarize(c, per_seed), "reference_fraction": float(c["reference_fraction"]),
               "per_seed": {str(s): r for s, r in per_seed.items()}, "finished": True}
    checkpoint.write_record(workdir / "results.json", results)
    common.write_csv(workdir / "results.csv", csv_rows(results), CSV_COLUMNS)
    plot(results, workdir)
    return results


CSV_COLUMNS = ("sweep", "criterion", "fraction", "reference_examples", "accuracy_mean", "accuracy_std",
               "finetuned_mean", "finetuned_std", "num_seeds")


def csv_rows(results: dict) -> list[dict]:
    """One row per criterion × fraction (``sweep=fraction``) and per criterion × reference size (``reference``)."""
    c = results["config"]
    rows = []
    for crit, by_f in results["oneshot"].items():
        for f, e in by_f.items():
            ft = e.get("accuracy_finetuned", {})
            rows.append({"sweep": "fraction", "criterion": crit, "fraction": f, "reference_examples":
                         c["reference_examples"] if _data_driven(crit) else "", "accuracy_mean":
                         e["accuracy"]["mean"], "accuracy_std": e["accuracy"]["std"], "finetuned_mean":
                         ft.get("mean", ""), "finetuned_std": ft.get("std", ""), "num_seeds": e["accuracy"]["n"]})
    for crit, by_n in results["reference"].items():
        for n, e in by_n.items():
            rows.append({"sweep": "reference", "criterion": crit, "fraction": results["reference_fraction"],
                         "reference_examples": n, "accuracy_mean": e["accuracy"]["mean"],
                         "accuracy_std": e["accuracy"]["std"], "num_seeds": e["accuracy"]["n"]})
    return rows


def plot(results: dict, workdir: Path) -> None:
    """Accuracy vs fraction pruned (one curve per criterion, ± std; fraction 0 = the unpruned network), without and
    with fine-tuning, and accuracy vs reference-set size (log x; the data-free criteria as flat lines)."""
    c, dense = results["config"], results["dense"]["accuracy"]
    what = f"{c['model']}/{c['dataset']}, {dense['n']} seed(s)"
    fracs = [0.0] + [float(f) for f in next(iter(results["oneshot"].values()))]
    for key, name, tail in (("accuracy", "accuracy_vs_fraction.png", "no fine-tuning"),
                            ("accuracy_finetuned", "accuracy_vs_fraction_finetuned.png", "after fine-tuning")):
        by = {crit: list(e.values()) for crit, e in results["oneshot"].items() if key in next(iter(e.values()))}
        if by:
            plots.curves(fracs, {k: [100 * dense["mean"]] + [100 * e[key]["mean"] for e in v] for k, v in by.items()},
                         workdir / name, xlabel="fraction of heads and MLP units removed per layer",
                         ylabel="test accuracy (%)", title=f"{what}: {tail}",
                         errors={k: [100 * dense["std"]] + [100 * e[key]["std"] for e in v] for k, v in by.items()})
    if results["reference"]:
        sizes = [int(n) for n in next(iter(results["reference"].values()))]
        ref = {k: [100 * e["accuracy"]["mean"] for e in v.values()] for k, v in results["reference"].items()}
        err = {k: [100 * e["accuracy"]["std"] for e in v.values()] for k, v in results["reference"].items()}
        rf = f"{results['reference_fraction']:g}"  # the data-free criteria at that fraction, when they ran at it
        flat = {f"{k} (no data)": [100 * e[rf]["accuracy"]["mean"]] * len(sizes)
                for k, e in results["oneshot"].items() if not _data_driven(k) and rf in e}
        plots.curves(sizes, {**ref, **flat}, workdir / "accuracy_vs_reference.png", xlabel="reference examples",
                     ylabel="test accuracy (%)", errors=err, logx=True,
                     title=f"{what}: {rf} removed, one shot, unpruned {100 * dense['mean']:.1f} %")


def format_table(results: dict) -> str:
    """Markdown: accuracy (%) per criterion × fraction, ``mean ± std`` without / with fine-tuning."""
    fr = list(next(iter(results["oneshot"].values())))
    d = results["dense"]["accuracy"]
    pm = lambda e: f"{100 * e['mean']:.2f} ± {100 * e['std']:.2f}"
    lines = [f"unpruned: {pm(d)} ({d['n']} seeds); cells: one shot / after fine-tuning",
             "| criterion | " + " | ".join(f"{f} removed" for f in fr) + " |", "|---" * (len(fr) + 1) + "|"]
    for crit, by_f in results["oneshot"].items():
        lines.append(f"| {crit} | " + " | ".join(
            pm(e["accuracy"]) + (f" / {pm(e['accuracy_finetuned'])}" if "accuracy_finetuned" in e else "")
            for e in by_f.values()) + " |")
    if results["reference"]:
        sizes = list(next(iter(results["reference"].values())))
        lines += ["", f"one shot at {results['reference_fraction']:g} removed, by reference examples",
                  "| criterion | " + " | ".join(sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
        lines += [f"| {crit} | " + " | ".join(pm(e["accuracy"]) for e in by_n.values()) + " |"
                  for crit, by_n in results["reference"].items()]
    return "\n".join(lines)


def report(results: dict, config: dict) -> str:
    return format_table(results)


if __name__ == "__main__":
    common.launch(SPEC, run, report)
