"""The filter-pruning experiment as functions (``experiments.filter_prune`` is its command line, and its docstring
describes the rounds and the workdir): the typed config :class:`FilterPruneSettings` (the flags are derived from it)
and :func:`run` (train every seed's network, then prune → fine-tune it round by round; it takes a
:class:`FilterPruneSettings` or its dict). A finished round is read back by :func:`jaxprune.runs.load_round`, a
trained network by :func:`jaxprune.runs.load_trained`. Importable without side effects.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import common, settings
from experiments.settings import setting
from jaxprune import augment, checkpoint, conventions, criteria, models, plots, runs, structured, train, unit_criteria


@dataclasses.dataclass(frozen=True)
class FilterPruneSettings(common.TrainSettings):
    """Every flag of ``experiments.filter_prune``, in flag order (:func:`experiments.settings.spec`): the shared
    training flags (:class:`experiments.common.TrainSettings`), then filter pruning's own."""

    finetune_steps: str = settings.row(common.FINETUNE_STEPS)
    finetune_lr: float | None = settings.row(common.FINETUNE_LR)
    criterion: str = setting("l1", "filter score (a name of jaxprune.criteria.CRITERIA)", unit_criteria.Choices())
    reference_examples: int = settings.row(common.REFERENCE_EXAMPLES)
    prune_fraction: float = settings.row(common.PRUNE_FRACTION)
    max_pruned_fraction: float = setting(0.9, "no layer is pruned below (1 - this) of its original filters")
    max_rounds: int = setting(4, "number of prune → fine-tune rounds")
    layer_kind: str = setting("conv", "which layers are pruned", ("conv", "dense", "all"))
    prune_heads: bool = setting(False, "also remove attention heads: per attention, ceil(prune_fraction · current "
                                       "heads) a round, each head scored once across its query/key/value projections")
    bn_recalibration_batches: int = settings.row(common.BN_RECALIBRATION)
    seeds: tuple[str, ...] = setting(["0"], "one network per seed (initialisation, data order, random criterion); "
                                            "several give mean ± std")
    workdir: str = setting("runs/filter_prune", "output directory (resumable)")


SPEC = settings.spec(FilterPruneSettings)
DEFAULTS = common.defaults(SPEC)
# a finished run can be extended by more rounds or seeds (each seed_<s>/trained.json records its own seed)
_VOLATILE = ("workdir", "max_rounds", "seeds")
# Flag names of earlier releases (accepted with a deprecation warning until the next one).
RENAMED = (common.Renamed((("fraction", 0.2, "fraction of each layer's current filters removed per round"),),
                          "prune_fraction", lambda v: v["fraction"]),
           common.Renamed((("seed", 0, "initialisation, data order, random criterion"),), "seeds",
                          lambda v: [str(v["seed"])]))
# config.json of a run made before --prune_heads existed ran without it
_ADDED_LATER = {**common.ADDED_LATER, "prune_heads": False}
_ACCURACIES = ("accuracy_after_removal", "accuracy_before_finetune", "accuracy_after_finetune")


def _config(config: dict) -> dict:
    c = common.canonical_model_kwargs(common.with_defaults(config, DEFAULTS, RENAMED))
    c["seeds"] = list(common.seed_list(c["seeds"]))
    entry = unit_criteria.get(c["criterion"])  # the one criterion table (a ValueError naming the flag)
    if not 0.0 < float(c["prune_fraction"]) < 1.0:
        raise ValueError(f"prune_fraction={c['prune_fraction']}: expected a fraction of filters per round in (0, 1)")
    common.check_finetune_lr(c["finetune_lr"])
    if not 0.0 < float(c["max_pruned_fraction"]) < 1.0:
        raise ValueError(f"max_pruned_fraction={c['max_pruned_fraction']}: expected a value in (0, 1)")
    if not (isinstance(c["max_rounds"], int) and c["max_rounds"] >= 0):
        raise ValueError(f"max_rounds={c['max_rounds']!r}: expected an integer >= 0")
    if not isinstance(c["prune_heads"], bool):
        raise ValueError(f"prune_heads={c['prune_heads']!r}: expected true or false")
    if entry.needs_data and c["reference_examples"] < 1:
        raise ValueError(f"reference_examples={c['reference_examples']}: expected >= 1 for a data-driven criterion")
    return c


def round_widths(current: dict[str, int], original: dict[str, int], fraction: float,
                 max_pruned_fraction: float) -> dict[str, int]:
    """Widths after one round: ``ceil(fraction · width)`` fewer per layer, floored at
    ``ceil((1 − max_pruned_fraction) · original)`` and at 1."""
    out = {}
    for layer, w in current.items():
        floor = max(1, math.ceil((1.0 - max_pruned_fraction) * original[layer] - 1e-9))
        out[layer] = max(floor, min(w, structured.n_keep_for(w, fraction)))
    return out


class Pruned(NamedTuple):
    """What a run prunes: ``layers`` shrunk alone (:func:`jaxprune.structured.prunable_layers` of
    ``--layer_kind``) and, with ``--prune_heads``, ``heads``: the attention-head groups (the query/key/value
    projections of one attention, :func:`jaxprune.structured.unit_groups`), each named by its first layer."""

    layers: tuple[str, ...]
    heads: tuple[tuple[str, ...], ...] = ()

    def widths(self, model, variables, x) -> dict[str, int]:
        """``{layer: units}`` of the layers, then ``{group's first layer: heads}`` of the head groups."""
        all_widths = structured.widths(model, variables, x=x)
        out = {layer: all_widths[layer] for layer in self.layers}
        if self.heads:
            out.update(structured.group_widths(model, variables, self.heads, x=x))
        return out

    def head_counts(self, model, variables, x) -> dict[str, int]:
        """``{group's first layer: heads}`` (empty without ``--prune_heads``)."""
        return structured.group_widths(model, variables, self.heads, x=x) if self.heads else {}


def _pruned(c: dict, model, example) -> Pruned:
    """The layers and head groups ``c`` prunes in ``model``; a ValueError naming the flag when there are none."""
    layers = structured.prunable_layers(model, c["layer_kind"], x=example)
    heads: tuple = ()
    if c["prune_heads"]:
        alone = {(layer,) for layer in layers}
        heads = tuple(g for g in structured.unit_groups(model, x=example, kind=c["layer_kind"]) if g not in alone)
        if not heads:
            raise ValueError(f"prune_heads=True: {type(model).__name__} has no attention heads (no coupled "
                             "query/key/value projections in its graph); use --prune_heads=false")
    if not layers and not heads:
        raise ValueError(f"layer_kind={c['layer_kind']!r}: {type(model).__name__} has no such prunable layer")
    return Pruned(tuple(layers), heads)


def _keep(c: dict, model, variables, target: dict[str, int], ref: tuple, key) -> dict[str, jax.Array]:
    """Kept unit indices per layer under the configured criterion (``target``: :meth:`Pruned.widths` after the
    round; with ``--prune_heads`` every layer of a head group gets its kept heads). ``ref``: ``(x, y)`` of the
    data-driven criteria."""
    x_ref, y_ref = ref
    example = (1,) + tuple(x_ref.shape[1:])
    select = structured.select_groups if c["prune_heads"] else structured.select_layers
    if not criteria.CRITERIA[c["criterion"]].needs_data:  # weights only: select_layers/select_groups dispatch it
        return select(model, variables, target, c["criterion"], key=key, x=example)
    scores = criteria.scores(c["criterion"], model, variables, x_ref, y_ref, normalized=False, key=key)
    missing = [layer for layer in target if layer not in scores]
    if missing:
        raise ValueError(f"criterion={c['criterion']!r} gives no scores for layers {missing} of "
                         f"{type(model).__name__} (it covers {sorted(scores)})")
    return select(model, variables, target, scores if c["prune_heads"] else {k: scores[k] for k in target},
                  x=example)


def _preflight(c: dict, model, pruned: Pruned, x_train, y_train) -> None:
    """Refuse, before any training, a criterion that cannot score the pruned layers of the model: the first
    round's selection is made once on the untrained network (data-driven criteria on a few training examples)."""
    example = (1,) + tuple(x_train.shape[1:])
    variables = models.init(model, jax.random.PRNGKey(0), x_train.shape)
    widths = pruned.widths(model, variables, example)
    target = round_widths(widths, widths, float(c["prune_fraction"]), float(c["max_pruned_fraction"]))
    n = min(int(c["reference_examples"]), 8, len(y_train))
    try:
        _keep(c, model, variables, target, (jnp.asarray(x_train[:n]), jnp.asarray(y_train[:n])),
              jax.random.PRNGKey(0))
    except (TypeError, KeyError, NotImplementedError, ValueError) as e:
        raise ValueError(f"criterion={c['criterion']!r} with model={c['model']!r} (layer_kind={c['layer_kind']!r}"
                         f"{', prune_heads=True' if c['prune_heads'] else ''}) cannot select filters "
                         f"({type(e).__name__}: {e})") from None


def _measure(model, variables, x_test, y_test, input_shape) -> dict:
    flops = structured.count_flops(model, variables, input_shape)
    return {"widths": structured.widths(model, variables, x=(1,) + tuple(input_shape[1:])),
            "params": models.count_params(variables["params"]),
            "flops": flops["flops"], "accuracy": common.accuracy(model, variables, x_test, y_test)}


@common.locked
def run(config: FilterPruneSettings | dict, workdir: str | Path) -> dict:
    """Train, then prune → fine-tune for the configured rounds, for every seed (``config``: a
    :class:`FilterPruneSettings` or its dict, missing keys taking ``DEFAULTS``); returns the ``results.json`` dict."""
    c = _config(settings.as_config(config))
    workdir = Path(workdir)
    tr, te = common.load_data(c["dataset"], c["data_dir"], c["normalize"], c["max_train_examples"],
                              c["max_test_examples"])
    model = common.build_model(c, tr.num_classes, input_shape=tr.images.shape, defaults=DEFAULTS)
    pruned = _pruned(c, model, (1,) + tuple(tr.images.shape[1:]))
    if common.finetune_steps(c, len(tr.labels)) > 0:  # an unset --finetune_lr after a schedule ending at 0: now
        common.finetune_optim(c, len(tr.labels))
    common.check_training_unused(c, DEFAULTS, len(tr.labels))
    _preflight(c, model, pruned, tr.images, tr.labels)
    workdir.mkdir(parents=True, exist_ok=True)  # a refused model or flag leaves no workdir
    # Run identity (experiments.common): config.json records the settings of the rounds (all but max_rounds and
    # the seeds), seed_<s>/trained/trained.json those of each trained network; a trained.json of an older version
    # without settings is vouched for by config.json, checked here first.
    stored_seed = _stored_seed(workdir)
    checkpoint.check_run_config(workdir, c, _VOLATILE, added_later=_ADDED_LATER,
                                migrate=lambda r: common.migrate_record(r, RENAMED))
    _adopt_single_seed_layout(workdir, stored_seed)
    data = train.to_device(tr.images, tr.labels, te.images, te.labels)
    per_seed: dict[int, dict] = {}
    for seed in c["seeds"]:
        per_seed[seed] = _run_seed(c, seed, model, pruned, data, workdir / f"seed_{seed}")
    return _write(workdir, {**c, "workdir": str(workdir)}, per_seed, f"{len(per_seed)} seed(s)")


def _stored_seed(workdir: Path) -> int | None:
    """The seed of an earlier release's single-seed workdir (``config.json`` with ``seed``), else None."""
    record = common.read_run_config(workdir, "experiments.filter_prune")
    if record is None:
        return None
    seed = record.get("seed")
    return None if seed is None else int(seed)


def _adopt_single_seed_layout(workdir: Path, seed: int | None) -> None:
    """Move an earlier release's ``trained/`` and ``round_<r>/`` (one seed, at the top) into ``seed_<seed>/``."""
    old = [d for d in [workdir / "trained", *sorted(workdir.glob("round_*"))] if d.is_dir()]
    if seed is None or not old:
        return
    dest = workdir / f"seed_{seed}"
    if dest.exists():
        raise ValueError(f"workdir={workdir}: holds both an earlier release's single-seed layout (trained/ at the top) "
                         f"and {dest.name}/; move or delete one of them")
    dest.mkdir()
    for d in old:
        d.rename(dest / d.name)
    logging.info("workdir %s: moved the earlier release's trained/ and round_<r>/ into %s/", workdir, dest.name)


def _last_round(workdir: Path) -> int:
    """The highest ``r`` of the ``round_<r>/`` folders in ``workdir`` (0: none)."""
    return max((int(d.name[6:]) for d in workdir.glob("round_*") if d.name[6:].isdigit()), default=0)


class _Seed(NamedTuple):
    """One seed's fixed inputs to its rounds."""

    c: dict
    seed: int
    pruned: Pruned
    data: tuple  # (x, y, x_test, y_test) on the device
    ref: tuple  # (x, y): the reference examples of the data-driven criteria
    original: dict[str, int]  # Pruned.widths of the trained network
    ft_steps: int


def _run_seed(c: dict, seed: int, model, pruned: Pruned, data, workdir: Path) -> dict:
    """One seed's train → prune → fine-tune rounds in ``workdir`` (``seed_<s>/``); its ``results.json`` dict."""
    x, y, xt, yt = data
    example = (1,) + tuple(x.shape[1:])
    variables, trained = common.train_network(c, model, x, y, seed, workdir / "trained", legacy_ok=True)
    ref = np.random.default_rng(seed).permutation(len(y))[:c["reference_examples"]]
    s = _Seed(c, seed, pruned, data, (x[ref], y[ref]), pruned.widths(model, variables, example),
              common.finetune_steps(c, len(y)))
    first = _measure(model, variables, xt, yt, x.shape)
    heads = pruned.head_counts(model, variables, example)
    rounds = [{"round": 0, **first, **({"heads": heads} if heads else {}), "accuracy_before_finetune":
               first["accuracy"], "accuracy_after_finetune": first["accuracy"], "train": trained}]
    meta = {"layers": list(pruned.layers), "original_widths": {k: s.original[k] for k in pruned.layers},
            "finetune_steps": s.ft_steps}
    if pruned.heads:
        meta.update(head_groups=[list(g) for g in pruned.heads], original_heads=heads)

    def write(finished: bool) -> dict:
        return _write(workdir, {**c, "seed": seed, "workdir": str(workdir)}, {seed: {**meta, "rounds": rounds}},
                      f"seed {seed}", finished)

    for r in range(1, c["max_rounds"] + 1):
        d = workdir / f"round_{r}"
        if r in runs.finished_rounds(workdir):
            model, variables, rec = runs.load_round(workdir, r, model, x.shape)
            rec.pop("seed", None)  # identity of the file; the round records in memory hold no seed
            rec.pop("checkpoint_sha256", None)
            logging.info("seed %d round %d: finished earlier, resumed", seed, r)
            rounds.append(rec)
            continue
        for later in [d, *(workdir / f"round_{j}" for j in range(r + 1, _last_round(workdir) + 1))]:
            if later.exists():  # an interrupted round (no marker), or rounds made from the one redone now
                shutil.rmtree(later)
        done = _prune_round(s, r, model, variables, rounds[0])
        if done is None:
            logging.info("seed %d round %d: every layer is at its floor (max_pruned_fraction=%g); stopping", seed, r,
                         c["max_pruned_fraction"])
            return write(True)
        model, variables, rec = done
        with checkpoint.interrupts_deferred():
            d.mkdir(parents=True)
            sha = checkpoint.save(d / "checkpoint", variables)
            checkpoint.write_record(d / "round.json", {**rec, "checkpoint_sha256": sha}, {"round": r, "seed": seed})
        logging.info("seed %d round %d: params %d (%.1f %%), accuracy %.4f -> %.4f", seed, r, rec["params"],
                     100 * rec["params_fraction"], rec["accuracy_before_finetune"], rec["accuracy_after_finetune"])
        rounds.append(rec)
        write(False)
    return write(True)


def _removed_fraction(now: dict[str, int], original: dict[str, int], keys) -> float:
    """``1 − Σ now / Σ original`` over ``keys`` (0 when there are none)."""
    keys = list(keys)
    return 1.0 - sum(now[k] for k in keys) / sum(original[k] for k in keys) if keys else 0.0


def _prune_round(s: _Seed, r: int, model, variables, base: dict) -> tuple | None:
    """Round ``r``: score, remove, (recalibrate BatchNorm,) fine-tune; ``(model, variables, round record)``, or
    None when every layer and head group is at its floor. ``base``: round 0's record."""
    c, (x, y, xt, yt) = s.c, s.data
    example = (1,) + tuple(x.shape[1:])
    widths = s.pruned.widths(model, variables, example)
    target = round_widths(widths, s.original, float(c["prune_fraction"]), float(c["max_pruned_fraction"]))
    if target == widths:
        return None
    key = jax.random.fold_in(jax.random.PRNGKey(s.seed), r)
    if s.pruned.heads:  # select only what shrinks: a weight score of a one-head attention fails in unit_params
        target = {k: n for k, n in target.items() if n != widths[k]}
    keep = _keep(c, model, variables, target, s.ref, key)
    model, variables = structured.remove_many(model, variables, keep, x=example)
    before = _measure(model, variables, xt, yt, x.shape)
    removed_acc = before["accuracy"]
    if c["bn_recalibration_batches"] > 0:
        variables = train.recalibrate_batchnorm(model, variables, x, batch_size=c["batch_size"],
                                                num_batches=c["bn_recalibration_batches"],
                                                key=jax.random.fold_in(key, 2))
        before["accuracy"] = common.accuracy(model, variables, xt, yt)
    optim = common.finetune_optim(c, len(y))
    tx = train.make_optimizer(optim, optim.lr)
    res = train.run(train.make_trainer(model, tx, augment=augment.by_name(c["augment"])),
                    train.create_state(variables, tx), x, y,
                    batch_size=c["batch_size"], num_steps=s.ft_steps, data_key=jax.random.fold_in(key, 1),
                    loop=c["loop"], log_prefix=f"[seed {s.seed} round {r}] ")
    variables = train.variables_of(res.state)
    rec = {"round": r, "widths": before["widths"], "params": before["params"], "flops": before["flops"],
           "params_fraction": before["params"] / base["params"], "flops_fraction": before["flops"] / base["flops"],
           "pruned_filter_fraction": _removed_fraction(before["widths"], s.original, s.pruned.layers),
           "accuracy_after_removal": removed_acc, "accuracy_before_finetune": before["accuracy"],
           "accuracy_after_finetune": common.accuracy(model, variables, xt, yt), "finetune_seconds": res.seconds}
    if s.pruned.heads:
        rec["heads"] = s.pruned.head_counts(model, variables, example)
        rec["pruned_head_fraction"] = _removed_fraction(rec["heads"], s.original, rec["heads"])
    return model, variables, rec


def summarize_rounds(per_seed: dict[int, list[dict]]) -> list[dict]:
    """Round records over seeds: the rounds every seed finished; widths/params/FLOPs of the first seed (the same
    for every seed: the counts are exact), accuracies as mean, ``<key>_std`` (ddof = 1) and ``num_seeds``."""
    runs = list(per_seed.values())
    out = []
    for i in range(min(len(r) for r in runs)):
        per_run = ("train", "finetune_seconds") if len(runs) > 1 else ()  # one seed's own, not a summary's
        rec = {k: v for k, v in runs[0][i].items() if k not in per_run}
        for key in ("accuracy", *_ACCURACIES):
            vals = [r[i][key] for r in runs if key in r[i]]
            if len(vals) == len(runs):
                s = conventions.summary(vals)
                rec[key], rec[f"{key}_std"] = s["mean"], s["std"]
        rec["num_seeds"] = len(runs)
        out.append(rec)
    return out


def _write(workdir: Path, config: dict, per_seed: dict[int, dict], label: str, finished: bool = True) -> dict:
    """``results.json``, ``rounds.csv`` and ``accuracy_vs_params.png`` of one seed or (at the top) of all seeds."""
    first = next(iter(per_seed.values()))
    rounds = summarize_rounds({s: r["rounds"] for s, r in per_seed.items()})
    results = {"config": config, "environment": common.environment(), "layers": first["layers"],
               "original_widths": first["original_widths"], "finetune_steps": first["finetune_steps"],
               "rounds": rounds, "finished": finished and all(r.get("finished", True) for r in per_seed.values())}
    if "head_groups" in first:
        results.update(head_groups=first["head_groups"], original_heads=first["original_heads"])
    if len(per_seed) > 1 or "seed" not in config:
        results["per_seed"] = {str(s): r for s, r in per_seed.items()}
    checkpoint.write_record(workdir / "results.json", results)
    base = rounds[0]
    columns = ["round", "params", "flops", "pruned_filter_fraction", "accuracy_before_finetune",
               "accuracy_before_finetune_std", "accuracy_after_finetune", "accuracy_after_finetune_std"]
    if "head_groups" in first:  # heads and the pruned layers' units left, as totals
        columns[1:1] = ["heads_left", "units_left"]
        rounds_csv = [{**r, **_left(r, first["layers"])} for r in rounds]
    else:
        rounds_csv = rounds
    common.write_csv(workdir / "rounds.csv", [{"pruned_filter_fraction": 0.0, **r} for r in rounds_csv], columns)
    frac = [r["params"] / base["params"] for r in rounds]
    pct = lambda key: [100 * r[key] for r in rounds]
    plots.curves([100 * f for f in frac],
                 {"before fine-tuning": pct("accuracy_before_finetune"),
                  "after fine-tuning": pct("accuracy_after_finetune")},
                 workdir / "accuracy_vs_params.png", xlabel="parameters left (%)", ylabel="test accuracy (%)",
                 title=f"{config['model']} on {config['dataset']}: {config['criterion']} filter pruning, {label}",
                 errors={"before fine-tuning": pct("accuracy_before_finetune_std"),
                         "after fine-tuning": pct("accuracy_after_finetune_std")})
    return results


def _left(r: dict, layers) -> dict[str, int]:
    """``{'heads_left': Σ heads, 'units_left': Σ units of the pruned layers}`` of a round record."""
    return {"heads_left": sum(r["heads"].values()), "units_left": sum(r["widths"][k] for k in layers)}


def format_table(results: dict) -> str:
    """Markdown table, one row per round; accuracies as ``mean ± std`` (ddof = 1) when several seeds ran. With
    ``--prune_heads``: the heads and the pruned layers' units left instead of the pruned filter fraction."""
    base = results["rounds"][0]
    heads = "head_groups" in results
    first = "heads left | units left" if heads else "filters pruned %"
    lines = [f"| round | {first} | params | params % | MFLOPs | acc. after removal % | acc. before FT % "
             "| acc. after FT % |", "|---|---|" + "---|" * (7 if heads else 6)]

    def acc(r: dict, key: str) -> str:
        if key not in r:  # records from before accuracy_after_removal was kept
            key = "accuracy_before_finetune"
        spread = f" ± {100 * r[key + '_std']:.2f}" if r.get("num_seeds", 1) > 1 else ""
        return f"{100 * r[key]:.2f}{spread}"

    for r in results["rounds"]:
        pruned = ("{heads_left} | {units_left}".format(**_left(r, results["layers"])) if heads
                  else f"{100 * r.get('pruned_filter_fraction', 0.0):.1f}")
        lines.append(f"| {r['round']} | {pruned} | {r['params']} | "
                     f"{100 * r['params'] / base['params']:.1f} | {r['flops'] / 1e6:.2f} | "
                     f"{acc(r, 'accuracy_after_removal')} | {acc(r, 'accuracy_before_finetune')} | "
                     f"{acc(r, 'accuracy_after_finetune')} |")
    return "\n".join(lines)


def plot_criteria(results: Mapping[str, dict], path: str | Path, title: str = "") -> None:
    """Test accuracy (mean ± std over seeds) before and after fine-tuning against MFLOPs, two curves per entry of
    ``results: {label (e.g. the criterion): results.json dict}``. The runs must share their rounds' FLOPs (the
    counts follow from the widths alone: same model and fractions); a ValueError names the labels otherwise."""
    flops = {label: [r["flops"] for r in res["rounds"]] for label, res in results.items()}
    if len({tuple(f) for f in flops.values()}) != 1:
        raise ValueError(f"results: the runs' rounds have different FLOPs ({flops}); expected one model pruned by "
                         "the same fractions")
    curves, errors = {}, {}
    for label, res in results.items():
        for key, when in (("accuracy_before_finetune", "before"), ("accuracy_after_finetune", "after")):
            name = f"{label}, {when} fine-tuning"
            curves[name] = [100 * r[key] for r in res["rounds"]]
            errors[name] = [100 * r.get(f"{key}_std", 0.0) for r in res["rounds"]]
    plots.curves([f / 1e6 for f in next(iter(flops.values()))], curves, path, xlabel="MFLOPs per example",
                 ylabel="test accuracy (%)", title=title, errors=errors)


def report(results: dict, config: dict) -> str:
    return format_table(results)


if __name__ == "__main__":
    common.launch(SPEC, run, report, RENAMED)
