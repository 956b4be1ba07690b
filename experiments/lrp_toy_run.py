"""The 2-D toy pruning experiment as functions (``experiments.lrp_toy`` is its command line, and its docstring
describes the outputs): the typed config :class:`LrpToySettings` (the flags are derived from it), :func:`run` (train,
score, prune and evaluate every dataset of one workdir) and :func:`report`. Importable without side effects.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from experiments import common, settings
from experiments.settings import setting
from jaxprune import (checkpoint, conventions, criteria, data, graph, lrp, models, plots, structured, train,
                      unit_criteria)


@dataclasses.dataclass(frozen=True)
class LrpToySettings:
    """Every flag of ``experiments.lrp_toy``, in flag order (:func:`experiments.settings.spec`). Its training flags
    are :class:`experiments.common.TrainSettings`' rows (one default and help each; the toy recipe, 2-1000-1000-1000
    with Adam 1e-3 for 30 epochs of batch 64, is in ``configs/lrp_toy_*.cfg``); ``--model`` keeps its own vocabulary
    (``mlp`` or a user model on 2-D inputs: no library image model applies), a documented exception."""

    datasets: tuple[str, ...] = setting(["moons", "circles", "spiral"], "toy datasets (moons, circles, spiral)")
    num_train: int = setting(0, "training points per dataset (0: 2000 moons/circles, 4000 spiral)")
    model: str = setting("mlp", "mlp (the ReLU net of --hidden, --dropout, --weight_init, --reference_bug), or "
                                "module.path:ClassName (a model of your own on 2-D inputs; see --model_kwargs)")
    model_kwargs: str = settings.row(common.MODEL_KWARGS)
    hidden: tuple[str, ...] = settings.row(common.train_row("hidden"))
    dropout: float = setting(0.5, "dropout rate after the first hidden layer")
    weight_init: str = settings.row(common.WEIGHT_INIT)
    reference_bug: bool = setting(False, "leave out the ReLU after the last hidden layer, as the reference network "
                                         "does")
    optimizer: str = settings.row(common.train_row("optimizer"))
    lr: float = settings.row(common.train_row("lr"))
    momentum: float = settings.row(common.train_row("momentum"))
    training_steps: str = settings.row(common.train_row("training_steps"))
    batch_size: int = settings.row(common.train_row("batch_size"))
    model_seed: int = setting(0, "seed for the training data, initialisation, data order and dropout")
    criteria: tuple[str, ...] = setting(list(criteria.YEOM), "pruning criteria (names of jaxprune.criteria.CRITERIA "
                                                             "with scores)")
    composite: str = setting("zplus", "LRP composite for the lrp criterion", tuple(lrp.composites.PRESETS))
    samples_per_class: tuple[str, ...] = setting(["1", "2", "5", "10", "20", "50", "100", "200"],
                                                 "reference samples per class")
    seeds: tuple[str, ...] = setting(["0:10"], "reference-sample seeds, one repetition each (e.g. 0,1,2 or 0:10; a "
                                               "single integer N is still read as the deprecated count 0..N-1 in "
                                               "this release)")
    n_prune: int = setting(1000, "hidden units removed (globally lowest scores)")
    noise: float = setting(0.3, "std of the Gaussian noise added to the held-out test inputs")
    plot_n: int = setting(5, "samples per class of the decision-boundary figure (the first seed; one of "
                             "--samples_per_class, 0: none)")
    workdir: str = setting("runs/lrp_toy", "output directory")


SPEC = settings.spec(LrpToySettings)
DEFAULTS = common.defaults(SPEC)
REFERENCE_SEED_OFFSET = 1_000  # reference samples of seed s come from generator seed 1000 + s (train uses 2·model_seed)


def _check(c: dict) -> None:
    for d in c["datasets"]:
        if d not in data.TOY_SIZES:
            raise ValueError(f"datasets: {d!r} is not a toy dataset; expected some of {tuple(data.TOY_SIZES)}")
    for k in c["criteria"]:  # criteria.scores scores them; a global ranking needs scores (no 'selection' kind)
        unit_criteria.get(k, ("model", "vectors"), "criteria")
    if not c["samples_per_class"]:
        raise ValueError("samples_per_class: expected at least one n")
    ns = common.int_list(c["samples_per_class"], "samples_per_class")
    if min(ns) < 1:
        raise ValueError(f"samples_per_class={','.join(map(str, ns))}: expected positive integers")
    common.check_range("noise", c["noise"], 0)
    if c["plot_n"] != 0 and c["plot_n"] not in ns:
        raise ValueError(f"plot_n={c['plot_n']}: expected one of samples_per_class ({','.join(map(str, ns))}) for "
                         "the decision-boundary figure, or 0 for none")
    common.width_list(c["hidden"], "hidden")  # before any training
    common.check_unused(c, common.training_unused(c, DEFAULTS, 1, 1))  # --momentum without a momentum optimizer
    if c["model"] != "mlp" and not common.is_user_model(c["model"]):
        raise ValueError(f"model={c['model']!r}: expected mlp or module.path:ClassName (a model of your own)")
    build_model(c, 2)  # a user model is imported and checked here (its output width is checked per dataset)
    if c["composite"] not in lrp.composites.PRESETS:
        raise ValueError(f"composite={c['composite']!r}: expected one of {sorted(lrp.composites.PRESETS)}")


def build_model(c: dict, num_classes: int, check: bool = False):
    """The ``--model``: the ReLU MLP of ``--hidden`` (dropout after the first layer), or a user model
    (:func:`experiments.common.build_user_model`; ``check``: it must give ``num_classes`` logits on 2-D inputs)."""
    if common.is_user_model(c["model"]):
        return common.build_user_model(c, num_classes, (1, 2) if check else None, DEFAULTS)
    if common.parse_model_kwargs(c["model_kwargs"]):
        raise ValueError(f"model_kwargs={c['model_kwargs']!r}: applies to --model=module.path:ClassName only")
    hidden = common.width_list(c["hidden"], "hidden")
    rates = (float(c["dropout"]),) + (0.0,) * (len(hidden) - 1)
    return models.MLP(hidden + (num_classes,), dropout=rates, weight_init=c["weight_init"],
                      no_relu_after=(len(hidden) - 1,) if c["reference_bug"] else ())


# What a dataset's trained network depends on (with the dataset's name): the training data, model and training.
TRAINING_SETTINGS = ("num_train", "model", "model_kwargs", "hidden", "dropout", "weight_init", "reference_bug",
                     "optimizer", "lr", "momentum", "training_steps", "batch_size", "model_seed")


def training_settings(c: dict, name: str) -> dict:
    return {"dataset": name, **common.settings_of(c, TRAINING_SETTINGS)}


def preflight(c: dict) -> None:
    """Refuse, before any training, a criterion the model cannot be scored or pruned with: per dataset, every
    criterion scores the untrained network on one reference sample per class and the lowest units are removed."""
    for name in c["datasets"]:
        k = int(data.make_toy(name, 8, 0).num_classes)
        ref = reference_samples(name, 1, k, 0)
        model = build_model(c, k, check=True)
        variables = models.init(model, jax.random.PRNGKey(0), ref.images.shape)
        widths = structured.widths(model, variables, x=(1, 2))
        total = sum(widths.values())
        if not widths:
            raise ValueError(f"model={c['model']!r}: no hidden layer units can be removed from")
        if c["n_prune"] >= total:
            raise ValueError(f"n_prune={c['n_prune']}: expected fewer than the {total} hidden units")
        for crit in c["criteria"]:
            try:
                sc = criteria.scores(crit, model, variables, ref.images, ref.labels, composite=c["composite"])
                _remove_lowest(model, variables, {l: sc[l] for l in widths}, c["n_prune"])
            except (ValueError, TypeError, KeyError, NotImplementedError) as e:
                raise ValueError(f"criteria={crit!r} with model={c['model']!r} on {name}: cannot score or prune "
                                 f"({type(e).__name__}: {e})") from None


def check_trained(c: dict, workdir: Path) -> None:
    """Refuse, before any training, a workdir holding a dataset's network trained with other settings."""
    for name in c["datasets"]:
        common.check_stored(Path(workdir) / name / "train.json", training_settings(c, name), "a trained network")


def train_model(c: dict, model, x: np.ndarray, y: np.ndarray, workdir: Path, name: str = "") -> tuple[dict, dict]:
    """Train (or restore from ``workdir/model``) the network of dataset ``name``; ``(variables, info)``.
    ``workdir/train.json`` (written last: the finished marker) records the :func:`training_settings`; a network
    trained with other settings is refused (:func:`experiments.common.check_stored`)."""
    key = jax.random.PRNGKey(c["model_seed"])
    init_key, data_key = jax.random.split(key)
    variables = models.init(model, init_key, x.shape)
    ckpt = workdir / "model"
    info_path = workdir / "train.json"
    settings = training_settings(c, name or workdir.name)
    if common.check_stored(info_path, settings, "a trained network"):
        hint = f"; delete {workdir} to retrain"
        info = checkpoint.read_record(info_path, hint=hint)
        return checkpoint.restore_recorded(ckpt, variables, info, "sha256", hint), info
    if ckpt.exists():  # a partial run (no finished marker): start over
        shutil.rmtree(ckpt)
    spe = train.steps_per_epoch(len(y), c["batch_size"])
    steps = train.parse_duration(c["training_steps"], spe, "training_steps")
    optim = common.optim_config(c, spe)
    tx = train.make_optimizer(optim, train.make_schedule(optim, steps))
    xs, ys = train.to_device(x, y)
    res = train.run(train.make_trainer(model, tx), train.create_state(variables, tx), xs, ys,
                    batch_size=c["batch_size"], num_steps=steps, data_key=data_key, loop="scan")
    variables = train.variables_of(res.state)
    with checkpoint.interrupts_deferred():
        sha = checkpoint.save(ckpt, variables)
        info = {"steps": steps, "seconds": res.seconds, "final_train_loss": res.train_loss, "settings": settings,
                "sha256": sha}
        checkpoint.write_record(info_path, info)
    return variables, info


@functools.partial(jax.jit, static_argnames="model")
def _logits(model, variables: dict, x: jax.Array) -> jax.Array:
    return model.apply(variables, x, **dict(graph.call_kwargs(model)))


def logits(model, variables: dict, x: np.ndarray) -> np.ndarray:
    """The model's own eval-mode forward, ``model.apply(variables, x[, train=False])``: ``(n, d) -> (n, C)``, jitted
    once per (model, input shape); every pruned network is a new model, compiled once (faster than a forward in
    numpy for these widths)."""
    return np.asarray(_logits(model, variables, jax.numpy.asarray(x, jax.numpy.float32)))


def accuracy(model, variables, x, y) -> float:
    return float(np.mean(np.argmax(logits(model, variables, x), -1) == y))


def reference_samples(name: str, per_class: int, num_classes: int, seed: int) -> data.Dataset:
    """``per_class`` fresh samples of each class (``per_class · C`` in all, balanced by construction)."""
    return data.make_toy(name, per_class * num_classes, REFERENCE_SEED_OFFSET + seed)


def prune(model, variables, scores: dict, n_prune: int):
    """Physically remove the ``n_prune`` globally lowest-scoring units: ``(model, variables, keep)``."""
    return _remove_lowest(model, variables, scores, n_prune)


def _remove_lowest(model, variables, scores: dict, n_prune: int):
    keep = criteria.global_keep(scores, n_prune)
    host = jax.tree_util.tree_map(np.asarray, variables)  # numpy leaves: slicing needs no compile per shape
    small, small_vars = structured.remove_many(model, host, keep, x=(1, 2))  # the toy inputs are 2-D
    return small, small_vars, keep


def _pruned_ids(keep: dict, widths: dict) -> frozenset:
    out, start = set(), 0
    for name, k in keep.items():
        out |= {start + i for i in sorted(set(range(widths[name])) - set(np.asarray(k).tolist()))}
        start += widths[name]
    return frozenset(out)


def sample_seeds(value: Any) -> list[int]:
    """``--seeds`` → reference-sample seeds. One plain integer ``N >= 1`` (``--seeds=10``) is, in this release, the
    old count (seeds 0..N-1) with a FutureWarning; ``0:N`` is its new spelling (``--seeds=0`` was never a valid
    count, so it is seed 0)."""
    one = value if isinstance(value, (int, np.integer, str)) else value[0] if len(value) == 1 else None
    old_form = (isinstance(one, (int, np.integer, str)) and not isinstance(one, bool)
                and str(one).strip().isdigit() and int(str(one).strip()) >= 1
                and not (isinstance(value, (list, tuple)) and isinstance(one, (int, np.integer))))
    if old_form:
        n = int(str(one).strip())
        warnings.warn(f"--seeds={n} as a count of seeds is deprecated: it means seeds 0..{n - 1} in this release and "
                      f"the single seed {n} in the next; write --seeds=0:{n} (or --seeds={n}:{n + 1} for seed {n})",
                      FutureWarning, stacklevel=2)
        return list(range(n))
    return list(common.seed_list(value))


def _mean_std(v) -> dict:
    return {**conventions.summary(v), "values": [float(a) for a in v]}


def _overlap(sets: list[frozenset]) -> dict:
    """Mean ± std over seed pairs of ``|A ∩ B| / |A|`` (all sets have the same size)."""
    vals = [len(a & b) / max(len(a), 1) for a, b in itertools.combinations(sets, 2)]
    return _mean_std(vals) if vals else {"mean": 1.0, "std": 0.0, "n": 0, "values": []}


def _grid(x: np.ndarray, steps: int = 150):
    lo, hi = x.min(0) - 0.3, x.max(0) + 0.3
    xx, yy = np.meshgrid(np.linspace(lo[0], hi[0], steps), np.linspace(lo[1], hi[1], steps))
    return xx, yy, np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32)


def _predict_grid(model, variables, grid, shape) -> np.ndarray:
    return np.argmax(logits(model, variables, grid), -1).reshape(shape)


def run_dataset(c: dict, name: str, workdir: Path) -> dict:
    n_train = c["num_train"] or data.TOY_SIZES[name]
    tr = data.load(name, "train", seed=c["model_seed"], num_examples=n_train)
    te = data.load(name, "test", seed=c["model_seed"], num_examples=n_train)
    rng = np.random.RandomState(c["model_seed"] + 12_345)
    noisy = (te.images + rng.normal(0.0, c["noise"], te.images.shape)).astype(np.float32)
    k = tr.num_classes
    model = build_model(c, k, check=True)
    variables, info = train_model(c, model, tr.images, tr.labels, workdir / name, name)
    widths = structured.widths(model, variables, x=(1, 2))  # the layers units can be removed from: every hidden
    hidden = list(widths)  # layer (output layers are never among them)
    if c["n_prune"] >= sum(widths[l] for l in hidden):
        total = sum(widths[l] for l in hidden)
        raise ValueError(f"n_prune={c['n_prune']}: expected fewer than the {total} hidden units")
    before = {"train_accuracy": accuracy(model, variables, tr.images, tr.labels),
              "noisy_test_accuracy": accuracy(model, variables, noisy, te.labels)}
    logging.info("%s: trained in %.0fs, train acc %.4f, noisy test acc %.4f", name, info["seconds"],
                 before["train_accuracy"], before["noisy_test_accuracy"])
    xx, yy, grid = _grid(tr.images)
    panels = [("unpruned", _predict_grid(model, variables, grid, xx.shape))]
    out: dict = {crit: {} for crit in c["criteria"]}
    t0 = time.perf_counter()
    for n in common.int_list(c["samples_per_class"], "samples_per_class"):
        rows = {crit: {"train": [], "noisy": [], "sets": [], "per_layer": []} for crit in c["criteria"]}
        for s in c["seeds"]:
            ref = reference_samples(name, n, k, s)
            for crit in c["criteria"]:
                sc = criteria.scores(crit, model, variables, ref.images, ref.labels, composite=c["composite"])
                small, small_vars, keep = prune(model, variables, {l: sc[l] for l in hidden}, c["n_prune"])
                r = rows[crit]
                r["train"].append(accuracy(small, small_vars, tr.images, tr.labels))
                r["noisy"].append(accuracy(small, small_vars, noisy, te.labels))
                r["sets"].append(_pruned_ids(keep, widths))
                r["per_layer"].append([widths[l] - int(keep[l].shape[0]) for l in hidden])
                if n == c["plot_n"] and s == c["seeds"][0]:
                    panels.append((f"{crit} ({r['train'][-1]:.3f})", _predict_grid(small, small_vars, grid, xx.shape)))
        for crit, r in rows.items():
            out[crit][str(n)] = {
                "train_accuracy": _mean_std(r["train"]), "noisy_test_accuracy": _mean_std(r["noisy"]),
                "overlap": _overlap(r["sets"]),
                "pruned_per_layer": dict(zip(hidden, np.mean(r["per_layer"], 0).tolist()))}
        logging.info("%s n=%d: %s (%.0fs)", name, n, "  ".join(
            f"{crit} {out[crit][str(n)]['train_accuracy']['mean']:.3f}" for crit in c["criteria"]),
            time.perf_counter() - t0)
    ns = common.int_list(c["samples_per_class"], "samples_per_class")
    for split, key in (("train", "train_accuracy"), ("noisy test", "noisy_test_accuracy")):
        ys = {crit: [out[crit][str(n)][key]["mean"] for n in ns] for crit in c["criteria"]}
        ys["unpruned"] = [before[key]] * len(ns)
        errs = {crit: [out[crit][str(n)][key]["std"] for n in ns] for crit in c["criteria"]}
        plots.curves(ns, ys, workdir / f"{name}_{key}_vs_n.png", xlabel="reference samples per class",
                     ylabel=f"{split} accuracy after pruning", logx=True, errors=errs,
                     title=f"{name}: {c['n_prune']} of {sum(widths[l] for l in hidden)} hidden units removed")
    if len(panels) > 1:
        plots.decision_boundaries(panels, xx, yy, tr.images, tr.labels, workdir / f"{name}_boundaries.png",
                                  title=f"{name}: n={c['plot_n']} per class, seed {c['seeds'][0]}", num_classes=k)
    return {"num_classes": k, "num_train": int(len(tr.labels)), "num_test": int(len(te.labels)),
            "hidden_units": int(sum(widths[l] for l in hidden)), "training": info, "before": before,
            "criteria": out, "seconds": time.perf_counter() - t0}


def summary(results: dict, n: int) -> list[dict]:
    """Rows ``{dataset, criterion, train_mean, train_std, noisy_mean, noisy_std}`` at ``n`` samples per class."""
    rows = []
    for name, d in results["datasets"].items():
        for crit, per_n in d["criteria"].items():
            if str(n) in per_n:
                e = per_n[str(n)]
                rows.append({"dataset": name, "criterion": crit, "train_mean": e["train_accuracy"]["mean"],
                             "train_std": e["train_accuracy"]["std"], "noisy_mean": e["noisy_test_accuracy"]["mean"],
                             "noisy_std": e["noisy_test_accuracy"]["std"], "overlap": e["overlap"]["mean"]})
    return rows


@common.locked
def run(config: LrpToySettings | dict, workdir: str | Path) -> dict:
    """Run the experiment described by ``config``: an :class:`LrpToySettings` or its dict (keys = flag names, missing
    ones from ``DEFAULTS``)."""
    c = common.canonical_model_kwargs(common.with_defaults(settings.as_config(config), DEFAULTS))
    c["seeds"] = sample_seeds(c["seeds"])
    _check(c)
    workdir = Path(workdir)
    check_trained(c, workdir)  # before any training
    preflight(c)
    record = {**c, "workdir": str(workdir)}
    results = {"config": record, "environment": common.environment(), "datasets": {}}
    for name in c["datasets"]:
        results["datasets"][name] = run_dataset(c, name, workdir)
        checkpoint.write_record(workdir / "results.json", results)
    return results


def report(results: dict, config: dict) -> str:
    n = config["plot_n"]
    seeds = results["config"]["seeds"]
    lines = [f"accuracy after pruning at n={n} per class, mean ± std (ddof = 1) over {len(seeds)} seeds"]
    for r in summary(results, n):
        lines.append(f"{r['dataset']:8s} {r['criterion']:7s} train {r['train_mean']:.4f} ± {r['train_std']:.4f}  "
                     f"noisy test {r['noisy_mean']:.4f} ± {r['noisy_std']:.4f}  overlap {r['overlap']:.3f}")
    return "\n".join(lines)
