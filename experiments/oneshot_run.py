"""The one-shot pruning experiment as functions (``experiments.oneshot`` is its command line): the typed config
:class:`OneshotSettings` (the flags are derived from it), :func:`weight_pruned` / :func:`unit_pruned`,
:func:`run_seed`, :func:`summarize` and :func:`run` (run or finish one workdir). Importable without side effects;
``experiments.oneshot``'s docstring describes the workdir and the flags.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from absl import logging

from experiments import common, settings
from experiments.settings import setting
from jaxprune import augment, checkpoint, conventions, criteria, masks, models, plots, structured, train, unit_criteria

METHODS = ("weight", "unit")
_ON_KERNELS = ("vectors", "selection")  # criteria kinds scored from a layer's kernel (unit_criteria)


@dataclasses.dataclass(frozen=True)
class OneshotSettings(common.TrainSettings):
    """Every flag of ``experiments.oneshot``, in flag order (:func:`experiments.settings.spec`): the shared training
    flags (:class:`experiments.common.TrainSettings`, never redeclared here; the published recipe is
    ``configs/oneshot_mnist.cfg``), then one-shot pruning's own."""

    use_bias: bool = settings.row(common.USE_BIAS)
    sparsity: tuple[str, ...] = setting(["0", "0.25", "0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "0.97", "0.99"],
                                        "sparsities swept: fractions of each pruned layer's weights (or units) "
                                        "removed, in [0, 1]")
    methods: tuple[str, ...] = setting(["weight", "unit"], "pruning methods to evaluate: weight, unit")
    scope: str = settings.row(common.SCOPE)
    unit_criterion: str = setting("l2", "unit score for unit pruning", unit_criteria.Choices(_ON_KERNELS))
    seeds: tuple[str, ...] = setting(["0"], "seeds (initialisation and data order); several give mean ± std")
    workdir: str = setting("runs/oneshot", "output directory (finished seeds are skipped on rerun)")


SPEC = settings.spec(OneshotSettings)
DEFAULTS = common.defaults(SPEC)
# Settings a seed's record (seed_<s>.json) made before oneshot took all of common.TrainSettings (issue 30) ran with.
ADDED_LATER = {**common.ADDED_LATER, "vgg_cfg": [], "weight_decay": 0.0, "schedule": "constant", "milestones": [],
               "gamma": 0.1}
# Flag names of earlier releases (accepted with a deprecation warning until the next one).
RENAMED = (common.Renamed((("sparsities", [], "sparsities in percent"),), "sparsity",
                          lambda v: [f"{float(p) / 100:g}" for p in v["sparsities"]], "fractions, not percent"),)


def _key(k: float) -> str:
    return f"{k:g}"


def weight_pruned(params: dict, output_layer: str | Sequence[str], sparsity: float, scope: str) -> dict:
    """Zero the ``ceil(sparsity·n)`` smallest-|w| weights of the kernels of every layer but the output layer(s)
    (a module path or several, e.g. :func:`experiments.common.output_layers`)."""
    outputs = (output_layer,) if isinstance(output_layer, str) else tuple(output_layer)
    prunable = masks.prunable_leaves(params, exclude=tuple(f"^{re.escape(layer)}/" for layer in outputs))
    mask = masks.magnitude_prune(params, masks.ones_like(params), prunable, sparsity, scope)
    return masks.apply_mask(params, mask)


def unit_pruned(model, variables: dict, sparsity: float, scope: str, criterion: str = "l2",
                key: jax.Array | None = None, *, x=None) -> dict:
    """Zero ``ceil(sparsity·n)`` units of every shrinkable layer (layerwise) or of all of them ranked together by
    score (``scope='global'``; score-based criteria only). Shapes are unchanged. ``x``: an example input (or its
    shape) the model's graph is traced on (default: inferred from the variables)."""
    return _unit_prune(model, variables, sparsity, scope, criterion, key, x=x)


def _unit_prune(model, variables: dict, sparsity: float, scope: str, criterion: str = "l2",
                key: jax.Array | None = None, *, x=None) -> dict:
    layers = structured.prunable_layers(model, variables=variables, x=x)
    keys = {layer: None if key is None else jax.random.fold_in(key, i) for i, layer in enumerate(layers)}
    keep: dict[str, np.ndarray] = {}
    if scope == "layerwise":
        for layer in layers:
            p = structured.layer_params(variables, layer)
            n_keep = structured.n_keep_for(int(p["kernel"].shape[-1]), sparsity)
            keep[layer] = np.asarray(structured.select_units(p["kernel"], n_keep, criterion, key=keys[layer]))
    else:
        _check_global(criterion)
        scores = [np.asarray(structured.unit_scores(structured.layer_params(variables, layer)["kernel"], criterion,
                                                    key=keys[layer]), np.float64) for layer in layers]
        n_remove = conventions.n_to_prune(sparsity, sum(s.size for s in scores))
        keep = {k: np.asarray(v) for k, v in criteria.global_keep(dict(zip(layers, scores)), n_remove,
                                                                  min_keep=0).items()}
    for layer, k in keep.items():
        variables = structured.mask_units(model, variables, layer, k, x=x)
    return variables


def _check_global(criterion: str) -> None:
    """A criterion that selects units directly (``kmeans``) has no score to rank units of all layers together."""
    if unit_criteria.get(criterion, _ON_KERNELS, "unit_criterion").kind == "selection":
        raise ValueError(f"unit_criterion={criterion!r} has no per-unit score to rank globally; use "
                         "--scope=layerwise")


def _build(c: dict):
    bad = [m for m in c["methods"] if m not in METHODS]
    if bad or not c["methods"]:
        raise ValueError(f"methods={c['methods']}: expected a non-empty subset of {METHODS}")
    sparsities = common.fraction_list(c["sparsity"], "sparsity")
    seeds = common.seed_list(c["seeds"])
    tr, te = common.load_data(c["dataset"], c["data_dir"], c["normalize"], c["max_train_examples"],
                              c["max_test_examples"])
    model = common.build_model(c, tr.num_classes, input_shape=tr.images.shape, defaults=DEFAULTS,
                               use_bias=c["use_bias"])
    if not 1 <= c["batch_size"] <= len(tr.labels):
        raise ValueError(f"batch_size={c['batch_size']}: expected 1..{len(tr.labels)} (the training set size)")
    if "unit" in c["methods"]:
        unit_criteria.get(c["unit_criterion"], _ON_KERNELS, "unit_criterion")
        if c["scope"] == "global":
            _check_global(c["unit_criterion"])
    _preflight(c, model, tr.images.shape, max(sparsities))
    spe = train.steps_per_epoch(len(tr.labels), c["batch_size"])
    num_steps = train.parse_duration(c["training_steps"], spe, "training_steps")
    if num_steps < 1:
        raise ValueError(f"training_steps={c['training_steps']!r}: expected at least one step")
    common.check_unused(c, common.training_unused(c, DEFAULTS, num_steps, spe))  # --momentum, --hidden, ...
    return tr, te, model, sparsities, seeds, num_steps


def _preflight(c: dict, model, input_shape, sparsity: float) -> None:
    """Refuse, before any training, a method the model cannot be pruned with: each is applied once to the
    untrained network at the highest sparsity."""
    example = (1,) + tuple(input_shape[1:])
    variables = models.init(model, jax.random.PRNGKey(0), input_shape)
    try:
        if "weight" in c["methods"]:
            weight_pruned(variables["params"], common.output_layers(model, example, variables), sparsity, c["scope"])
        if "unit" in c["methods"]:
            _unit_prune(model, variables, sparsity, c["scope"], c["unit_criterion"], jax.random.PRNGKey(0),
                        x=example)
    except (TypeError, KeyError, NotImplementedError, ValueError) as e:
        raise ValueError(f"methods={','.join(c['methods'])} with model={c['model']!r} (scope={c['scope']!r}, "
                         f"unit_criterion={c['unit_criterion']!r}) cannot prune ({type(e).__name__}: {e})") from None


def run_seed(c: dict, seed: int, tr, te, model, sparsities: list[float], num_steps: int) -> dict:
    """Train one network and evaluate every (method, sparsity); accuracies are fractions."""
    key = jax.random.PRNGKey(seed)
    init_key, data_key, prune_key = jax.random.split(key, 3)
    x, y, xt, yt = train.to_device(tr.images, tr.labels, te.images, te.labels)
    variables = models.init(model, init_key, x.shape)
    optim = common.optim_config(c, train.steps_per_epoch(len(tr.labels), c["batch_size"]))
    tx = train.make_optimizer(optim, train.make_schedule(optim, num_steps))
    trainer = train.make_trainer(model, tx, augment=augment.by_name(c["augment"]))
    result = train.run(trainer, train.create_state(variables, tx), x, y, batch_size=c["batch_size"],
                       num_steps=num_steps, data_key=data_key, loop=c["loop"], log_prefix=f"seed {seed}: ")
    trained = train.variables_of(result.state)
    dense = train.evaluate(trainer, trained, xt, yt)["accuracy"]
    example = (1,) + tuple(x.shape[1:])
    outputs = common.output_layers(model, example, trained)  # never weight-pruned (unit pruning: not prunable)
    out = {"seed": seed, "dense_accuracy": dense, "train_loss": result.train_loss,
           "train_seconds": result.seconds, "accuracy": {}}
    for method in c["methods"]:
        accs = {}
        for s in sparsities:
            if method == "weight":
                v = {**trained, "params": weight_pruned(trained["params"], outputs, s, c["scope"])}
            else:
                v = unit_pruned(model, trained, s, c["scope"], c["unit_criterion"], prune_key, x=example)
            accs[_key(s)] = train.evaluate(trainer, v, xt, yt)["accuracy"]
            logging.info("seed %d %s sparsity %.2f: accuracy %.4f", seed, method, s, accs[_key(s)])
        out["accuracy"][method] = accs
    return out


def summarize(per_seed: list[dict], methods, sparsities) -> dict:
    """Mean and std over seeds (:func:`jaxprune.conventions.summary`, ddof = 1) of the dense and pruned
    accuracies."""
    dense = conventions.summary([r["dense_accuracy"] for r in per_seed])
    acc = {m: {_key(s): conventions.summary([r["accuracy"][m][_key(s)] for r in per_seed]) for s in sparsities}
           for m in methods}
    return {"dense_accuracy": dense,
            "accuracy": {m: {k: v["mean"] for k, v in d.items()} for m, d in acc.items()},
            "accuracy_std": {m: {k: v["std"] for k, v in d.items()} for m, d in acc.items()}}


@common.locked
def run(config: OneshotSettings | dict, workdir: str | Path) -> dict:
    """Run (or finish) the sweep for every seed (``config``: an :class:`OneshotSettings` or its dict, missing keys
    the defaults); returns the ``results.json`` dict."""
    c = common.canonical_model_kwargs(common.with_defaults(settings.as_config(config), DEFAULTS, RENAMED))
    workdir = Path(workdir)
    tr, te, model, sparsities, seeds, num_steps = _build(c)  # refused before anything is written
    workdir.mkdir(parents=True, exist_ok=True)
    record = {**c, "workdir": str(workdir)}
    # Run identity (experiments.common): seed_<s>.json, an evaluation table, records the settings that produced it
    # (all but the seeds, the workdir and the methods/sparsities, which may grow); one made with other settings,
    # or lacking a method or sparsity asked for now, is recomputed — the network retrained, never reused.
    same = {k: v for k, v in record.items() if k not in ("seeds", "workdir", "methods", "sparsity")}
    per_seed = []
    for seed in seeds:
        path = workdir / f"seed_{seed}.json"
        if path.exists():
            try:
                done = checkpoint.read_record(path, expect={"seed": seed})
            except checkpoint.RecordError as e:  # a derived table: recomputed
                logging.warning("%s; retraining and recomputing it", e)
                done = {}
            have = set(done.get("accuracy", {})) >= set(c["methods"]) and all(
                set(map(_key, sparsities)) <= set(done["accuracy"][m]) for m in c["methods"])
            current, diff = common.stored_matches(done, same, ADDED_LATER, legacy="config")  # "config": older name
            if current and have:
                logging.info("seed %d: finished earlier, skipped", seed)
                per_seed.append(done)
                continue
            why = (f"recorded with other settings ({checkpoint.format_settings_diff(diff)})" if diff else
                   "lacks methods or sparsities asked for now" if current else "recorded without settings")
            logging.warning("seed %d: %s; retraining and recomputing it", seed, why)
        r = run_seed(c, seed, tr, te, model, sparsities, num_steps)
        r["settings"] = checkpoint.as_stored(same)
        r = checkpoint.write_record(path, r, {"seed": seed})
        r.pop(checkpoint.RECORD_SHA)
        per_seed.append(r)
    results = {"config": record, "environment": common.environment(), "sparsities": sparsities,
               "training_steps": num_steps, "num_train": len(tr.labels), "num_test": len(te.labels),
               **summarize(per_seed, c["methods"], sparsities),
               "per_seed": [{k: v for k, v in r.items() if k not in ("config", "settings")} for r in per_seed]}
    checkpoint.write_record(workdir / "results.json", results)
    pct = [100 * s for s in sparsities]
    plots.curves(pct, {m: [100 * results["accuracy"][m][_key(s)] for s in sparsities] for m in c["methods"]},
                 workdir / "accuracy_vs_sparsity.png", xlabel="sparsity (%)", ylabel="test accuracy (%)",
                 title=f"{c['model']} on {c['dataset']}, {c['scope']}, {len(seeds)} seed(s)",
                 errors={m: [100 * results["accuracy_std"][m][_key(s)] for s in sparsities] for m in c["methods"]})
    return results


def format_table(results: dict) -> str:
    """Markdown table: sparsity × method, mean ± std accuracy in percent."""
    methods = list(results["accuracy"])
    d = results["dense_accuracy"]
    lines = [f"dense: {100 * d['mean']:.2f} ± {100 * d['std']:.2f} %", "",
             "| sparsity % | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for s in results["sparsities"]:
        k = _key(s)
        cells = [f"{100 * results['accuracy'][m][k]:.2f} ± {100 * results['accuracy_std'][m][k]:.2f}"
                 for m in methods]
        lines.append(f"| {100 * s:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict, config: dict) -> str:
    return format_table(results)
