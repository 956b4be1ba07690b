"""The merge experiment as functions (``experiments.merge`` is its command line, and its docstring describes the
outputs): the typed config :class:`MergeSettings` (the flags are derived from it) and :func:`run` (train or load
every seed's network, prune and merge it; it takes a :class:`MergeSettings` or its dict). Importable without side
effects.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import jax
import numpy as np
from absl import logging

from experiments import common, settings
from experiments.settings import setting
from jaxprune import checkpoint, conventions, merging, models, plots, runs, train, unit_criteria


@dataclasses.dataclass(frozen=True)
class MergeSettings(common.TrainSettings):
    """Every flag of ``experiments.merge``, in flag order (:func:`experiments.settings.spec`): the shared training
    flags (:class:`experiments.common.TrainSettings`), then merging's own."""

    seeds: tuple[str, ...] = setting(["0", "1", "2"], "one trained network per seed (initialisation and data order)")
    source_workdir: str = setting("", "load the trained networks instead of training: an experiments.imp workdir "
                                      "(level 0 of the seed's replica) or a seed_<s> folder of an experiments.merge "
                                      "workdir; '{seed}' is replaced by each seed")
    sparsity: tuple[str, ...] = setting(["0.5", "0.6", "0.7", "0.8"], "sparsities swept: fractions of units pruned "
                                                                     "in every merged layer, in [0, 1)")
    pruned_cfg: tuple[str, ...] = setting([], "instead of --sparsity, a VGG's target conv widths (e.g. the paper's "
                                              "pruned VGG-16 cfg); 'M' entries are ignored")
    layers: tuple[str, ...] = setting([], "layers to merge (default: every mergeable layer)")
    criteria: tuple[str, ...] = setting(["l1", "l2", "l2_gm"], "unit selection criteria "
                                                               "(jaxprune.unit_criteria.CRITERIA, weights only)")
    threshold: float | None = setting(None, "cosine threshold for merging (0: always merge, > 1: never); unset: the "
                                            "paper's settings, 0.45 without BatchNorm and 0.1 with it")
    lam: float = setting(merging.LAMBDA, "conv+BN: weight of the cosine distance against the BN offset mismatch")
    bn_scale: str = setting("exact", "conv+BN merge scale: the derived one or the authors' (inverted, raw variance)",
                            merging.BN_SCALES)
    scale: str = setting("norm", "merge scale: the paper's norm ratio, or the least-squares projection (cos × ratio)",
                         merging.SCALES)
    bn_recalibration_batches: int = settings.row(common.BN_RECALIBRATION)
    workdir: str = setting("runs/merge", "output directory (trained networks are reused on re-runs)")


SPEC = settings.spec(MergeSettings)
DEFAULTS = common.defaults(SPEC)
# Flag names of earlier releases (accepted with a deprecation warning until the next one).
RENAMED = (common.Renamed((("ratios", [], "fractions of units pruned in every merged layer"),), "sparsity",
                          lambda v: list(v["ratios"])),)


def _config(config: dict) -> dict:
    c = common.canonical_model_kwargs(common.with_defaults(config, DEFAULTS, RENAMED))
    c["seeds"] = list(common.seed_list(c["seeds"]))
    if c["threshold"] is not None and c["threshold"] < 0:  # an earlier release's "unset"
        warnings.warn(f"--threshold={c['threshold']:g}: a negative threshold for the paper's settings is deprecated "
                      "and will be refused in the next release; leave --threshold unset", FutureWarning, stacklevel=2)
        c["threshold"] = None
    if c["threshold"] is not None:
        common.check_range("threshold", c["threshold"], 0)
    common.check_range("lam", c["lam"], 0, 1)
    if not c["criteria"]:
        raise ValueError("criteria: expected at least one criterion")
    for crit in c["criteria"]:  # merging selects units from a layer's kernel (structured.select_units)
        unit_criteria.get(crit, ("vectors", "selection"), "criteria")
    if not c["pruned_cfg"]:
        common.fraction_list(c["sparsity"], "sparsity", upper_open=True)
    else:
        common.vgg_cfg(c["pruned_cfg"], "pruned_cfg")
    return c


def _imp_source_replica(path: str, seed: int) -> int:
    """Index of ``seed`` among the seeds of the ``experiments.imp`` run in ``path``: merge seed ``s`` reads the
    network the IMP run trained with seed ``s`` (ValueError naming ``source_workdir`` if it trained no such seed)."""
    from experiments import imp as imp_experiment

    run_seeds = imp_experiment.trained_seeds(path, "source_workdir")
    if seed not in run_seeds:
        raise ValueError(f"source_workdir: {path} is an experiments.imp run of seeds {run_seeds}, which trained no "
                         f"network for seed {seed} of --seeds; pass --seeds among {run_seeds}, or a source_workdir "
                         "with '{seed}' in it")
    return run_seeds.index(seed)


def _load_source(c: dict, path: str, seed: int = 0) -> tuple[object, dict, object, object, object, dict]:
    """``(model, variables, x_train, x_test, y_test, record)`` of the network trained elsewhere for ``seed``."""
    from experiments import imp as imp_experiment

    if (Path(path) / "trained.json").exists():  # a seed folder of an earlier experiments.merge run
        _check_source(c, Path(path) / "trained.json")
        tr, te = common.load_data(c["dataset"], c["data_dir"], c["normalize"], c["max_train_examples"],
                                  c["max_test_examples"], 0)
        model = common.build_model(c, te.num_classes, input_shape=te.images.shape, defaults=DEFAULTS)
        x_train, x_test, y_test = train.to_device(tr.images, te.images, te.labels)
        template = models.init(model, jax.random.PRNGKey(0), x_test.shape)
        hint = f"; retrain it (delete {path} and run experiments.merge there again)"
        variables, rec = runs.load_trained(path, template, hint=hint)
        return model, variables, x_train, x_test, y_test, {"source_workdir": path, **rec}
    built, variables, records = imp_experiment.load_levels(path, replica=_imp_source_replica(path, seed))
    return (built.model, variables[0], built.task.x_train, built.task.x_test, built.task.y_test,
            {"source_workdir": path, "seed": seed, "level_0": records[0]})


# What the network of a merge seed folder must share with this run's flags: the data and model they build.
SOURCE_SETTINGS = ("dataset", "normalize", "max_train_examples", "max_test_examples", "model", "model_kwargs",
                   "hidden", "vgg_cfg", "weight_init")


def _check_source(c: dict, path: Path) -> None:
    """A merge seed folder given as ``--source_workdir`` is read with this run's data and model flags: refuse one
    trained on other data or another model (naming each differing setting), or one recorded without settings."""
    rec = checkpoint.read_record(path, hint=f"; retrain it (delete {path.parent} and run experiments.merge there)")
    if "settings" not in rec:
        raise ValueError(f"source_workdir: {path} records no settings (written by an older version), so its "
                         "data and model cannot be checked against this run's flags; retrain it, or load an "
                         "experiments.imp workdir")
    diff = checkpoint.settings_diff({k: v for k, v in rec["settings"].items() if k in SOURCE_SETTINGS},
                                    common.settings_of(c, SOURCE_SETTINGS), common.ADDED_LATER)
    if diff:
        raise ValueError(f"source_workdir: {path} was trained on other data or another model than this run's flags "
                         f"give ({checkpoint.format_settings_diff(diff)}); pass the flags it was trained with")


def _preflight(c: dict, model, variables) -> None:
    """Refuse, before any training, settings that cannot work with the model: every pruning level and criterion
    is merged once on the untrained ``variables`` (merging is data-free and cheap)."""
    if not merging.mergeable_layers(model, variables=variables):
        raise ValueError(f"model={c['model']!r}: {type(model).__name__} has no layer neuron merging applies to")
    threshold = c["threshold"]
    for label, _, widths in _settings(c, model, variables)[:1]:
        for crit in c["criteria"]:
            try:
                merging.merge(model, variables, widths, mode="merge", criterion=crit, threshold=threshold,
                              lam=c["lam"], bn_scale=c["bn_scale"], scale=c["scale"], key=jax.random.PRNGKey(0))
            except (ValueError, TypeError, KeyError, NotImplementedError) as e:
                raise ValueError(f"criteria={crit!r} with model={c['model']!r} (setting {label}) cannot be merged "
                                 f"({type(e).__name__}: {e})") from None


def _settings(c: dict, model, variables) -> list[tuple[str, float | None, dict[str, int]]]:
    """``(label, sparsity, widths)`` for every pruning level of the sweep."""
    if c["pruned_cfg"]:
        return [("cfg", None, merging.widths_from_cfg(model, common.vgg_cfg(c["pruned_cfg"], "pruned_cfg")))]
    layers = list(c["layers"]) or None
    return [(f"{float(r):g}", float(r), merging.widths_for_ratio(model, variables, float(r), layers))
            for r in c["sparsity"]]


def evaluate_seed(c: dict, model, variables, x_test, y_test, x_train=None) -> dict:
    """Original, prune and merge accuracies for every criterion × pruning level.

    With ``bn_recalibration_batches > 0`` (BatchNorm models; ``x_train`` needed) ``test_accuracy`` is measured
    after re-estimating the statistics, and ``test_accuracy_stale_bn`` keeps the data-free one."""
    threshold = c["threshold"]
    original = common.accuracy(model, variables, x_test, y_test)
    n_orig = models.count_params(variables["params"])
    runs = []
    for label, ratio, widths in _settings(c, model, variables):
        for crit in c["criteria"]:
            for mode in merging.MODES:
                t0 = time.perf_counter()
                out = merging.merge(model, variables, widths, mode=mode, criterion=crit, threshold=threshold,
                                    lam=c["lam"], bn_scale=c["bn_scale"], scale=c["scale"],
                                    key=jax.random.PRNGKey(0))
                seconds = time.perf_counter() - t0
                acc = common.accuracy(out.model, out.variables, x_test, y_test)
                extra = {}
                if c["bn_recalibration_batches"] > 0 and out.variables.get("batch_stats"):
                    fresh = train.recalibrate_batchnorm(out.model, out.variables, x_train,
                                                        batch_size=c["batch_size"],
                                                        num_batches=c["bn_recalibration_batches"])
                    extra, acc = {"test_accuracy_stale_bn": acc}, common.accuracy(out.model, fresh, x_test, y_test)
                n_params = models.count_params(out.variables["params"])
                runs.append({"setting": label, "sparsity": ratio, "criterion": crit, "mode": mode,
                             "test_accuracy": acc, **extra, "num_params": n_params,
                             "param_fraction": n_params / n_orig,
                             "widths": widths, "merge_seconds": seconds, "layers": out.report})
                logging.info("%s %s %s: %.4f (original %.4f)", label, crit, mode, acc, original)
    return {"original": {"test_accuracy": original, "num_params": n_orig}, "runs": runs}


def summarize(per_seed: list[dict]) -> dict:
    """``{criterion: {setting: {original|prune|merge|gain: {mean, std, n}}}}`` over seeds
    (:func:`jaxprune.conventions.summary`: std with ddof = 1)."""
    out: dict = {}
    orig = np.array([s["original"]["test_accuracy"] for s in per_seed])
    runs0 = per_seed[0]["runs"]
    for crit in dict.fromkeys(r["criterion"] for r in runs0):
        for setting in dict.fromkeys(r["setting"] for r in runs0):
            acc = {m: np.array([next(r["test_accuracy"] for r in s["runs"] if r["criterion"] == crit
                                     and r["setting"] == setting and r["mode"] == m) for s in per_seed])
                   for m in merging.MODES}
            cell = {"original": orig, **acc, "gain": acc["merge"] - acc["prune"]}
            out.setdefault(crit, {})[setting] = {k: conventions.summary(v) for k, v in cell.items()}
    return out


def _write(workdir: Path, c: dict, per_seed: list[dict], meta: dict, finished: bool) -> dict:
    summary = summarize(per_seed)
    results = {"config": c, "derived": meta, "environment": common.environment(), "finished": finished,
               "seeds": per_seed, "summary": summary}
    checkpoint.write_record(workdir / "results.json", results)
    rows = [{"seed": s["seed"], **{k: r[k] for k in ("setting", "criterion", "mode", "test_accuracy",
                                                       "num_params", "merge_seconds")},
             "original_accuracy": s["original"]["test_accuracy"]} for s in per_seed for r in s["runs"]]
    common.write_csv(workdir / "metrics.csv", rows, ["seed", "setting", "criterion", "mode", "test_accuracy",
                                                     "original_accuracy", "num_params", "merge_seconds"])
    settings = list(next(iter(summary.values())))
    x = [float(s) if s != "cfg" else 0.0 for s in settings]
    ys, errs = {}, {}
    first = next(iter(summary.values()))
    ys["original"] = [100 * first[s]["original"]["mean"] for s in settings]
    for crit, cells in summary.items():
        for m in merging.MODES:
            ys[f"{m} {crit}"] = [100 * cells[s][m]["mean"] for s in settings]
            errs[f"{m} {crit}"] = [100 * cells[s][m]["std"] for s in settings]
    plots.curves(x, ys, workdir / "accuracy_vs_sparsity.png", xlabel="fraction of units pruned per layer",
                 ylabel="test accuracy (%)", errors=errs,
                 title=f"{c['model']} / {c['dataset']}, no fine-tuning ({len(per_seed)} seed(s))")
    return results


@common.locked
def run(config: MergeSettings | dict, workdir: str | Path) -> dict:
    """Train (or load) every seed's network, prune and merge it (``config``: a :class:`MergeSettings` or its dict,
    missing keys taking ``DEFAULTS``); returns the ``results.json`` dict."""
    c = _config(settings.as_config(config))
    workdir = Path(workdir)
    c["workdir"] = str(workdir)
    seeds = c["seeds"]
    data = None
    per_seed: list[dict] = []
    meta: dict = {}
    if not c["source_workdir"]:  # everything a rerun cannot reuse is refused before any training
        tr, te = common.load_data(c["dataset"], c["data_dir"], c["normalize"], c["max_train_examples"],
                                  c["max_test_examples"], 0)
        data = (*train.to_device(tr.images, tr.labels, te.images, te.labels), tr.num_classes)
        meta.update(num_train=len(tr.labels), num_test=len(te.labels))
        model = common.build_model(c, tr.num_classes, input_shape=tr.images.shape, defaults=DEFAULTS)
        if not 1 <= c["batch_size"] <= len(tr.labels):
            raise ValueError(f"batch_size={c['batch_size']}: expected 1..{len(tr.labels)} (training set size)")
        common.check_training_unused(c, DEFAULTS, len(tr.labels))
        common.check_trained(c, seeds, lambda s: workdir / f"seed_{s}")
        _preflight(c, model, models.init(model, jax.random.PRNGKey(0), tr.images.shape))
    else:
        for seed in seeds:  # a merge seed folder trained on other data or another model, or an IMP run without
            folder = c["source_workdir"].replace("{seed}", str(seed))  # this seed: refused up front
            if (Path(folder) / "trained.json").exists():
                _check_source(c, Path(folder) / "trained.json")
            else:
                _imp_source_replica(folder, seed)
    workdir.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        if c["source_workdir"]:
            model, variables, x_train, x_test, y_test, trained = _load_source(
                c, c["source_workdir"].replace("{seed}", str(seed)), seed)
        else:
            x_train, y_train, x_test, y_test, _ = data
            variables, trained = common.train_network(c, model, x_train, y_train, seed, workdir / f"seed_{seed}")
        res = evaluate_seed(c, model, variables, x_test, y_test, x_train)
        per_seed.append({"seed": seed, "trained": trained, **res})
        meta["mergeable_layers"] = list(merging.mergeable_layers(model, variables=variables))
        _write(workdir, c, per_seed, meta, finished=False)
    return _write(workdir, c, per_seed, meta, finished=True)


def report(results: dict, config: dict) -> str:
    lines = []
    for crit, cells in results["summary"].items():
        for setting, cell in cells.items():
            lines.append(f"{crit:6s} {setting:>4s}  original {100 * cell['original']['mean']:.2f}  "
                         f"prune {100 * cell['prune']['mean']:.2f}±{100 * cell['prune']['std']:.2f}  "
                         f"merge {100 * cell['merge']['mean']:.2f}±{100 * cell['merge']['std']:.2f}  "
                         f"gain {100 * cell['gain']['mean']:+.2f}")
    return "\n".join(lines)
