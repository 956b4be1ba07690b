"""The sparse-training experiment as functions (``experiments.sparse_train`` is its command line, and its docstring
describes the outputs): the typed config :class:`SparseTrainSettings` (the flags are derived from it), the parsed
:class:`Config` and :func:`train_and_evaluate` (dense and sparse runs of one workdir; it takes a
:class:`SparseTrainSettings` or its dict). Importable without side effects.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping

import jax
from absl import logging

from experiments import common, settings
from experiments.settings import setting
from jaxprune import augment, checkpoint, conventions, masks, models, patterns, plots, sparse_training, train

METHODS = ("gradual", "rigl", "set", "static")


@dataclasses.dataclass(frozen=True)
class SparseTrainSettings(common.TrainSettings):
    """Every flag of ``experiments.sparse_train``, in flag order (:func:`experiments.settings.spec`): the shared
    training flags (:class:`experiments.common.TrainSettings`), then sparse training's own."""

    prune_output: bool = settings.row(common.PRUNE_OUTPUT)
    exclude: tuple[str, ...] = settings.row(common.EXCLUDE)
    methods: tuple[str, ...] = setting(list(METHODS), f"any of {', '.join(METHODS)}")
    sparsity: tuple[str, ...] = setting(["0.9", "0.95", "0.98"], "target sparsities swept (fractions of the prunable "
                                                                 "weights removed)")
    pattern: str = setting("unstructured", "gradual pruning's pattern (rigl/set/static: unstructured only)",
                           tuple(patterns.PATTERNS))
    nm: str = setting("2:4", "n:m for --pattern=n:m (groups along the kernels' input axis); --sparsity must be "
                             "1 - n/m")
    block: tuple[str, ...] = setting([], "block shape for --pattern=block, one int per kernel dimension, e.g. 4,4")
    gradual_distribution: str = setting("uniform", "gradual pruning's layer sparsities",
                                        tuple(sparse_training.DISTRIBUTIONS))
    dst_distribution: str = setting("erk", "rigl/set/static layer sparsities", tuple(sparse_training.DISTRIBUTIONS))
    prune_begin: str = setting("1ep", "gradual: first pruning step (steps or epochs, 'ep')")
    prune_end: str = setting("10ep", "gradual: last pruning step (rounded down to begin + a multiple of the "
                                     "frequency)")
    prune_frequency: str = setting("100", "gradual: steps between pruning steps")
    update_interval: str = setting("100", "rigl/set: steps between mask updates")
    update_end: str = setting("12ep", "rigl/set: no mask update from this step on (RigL: 75 % of training)")
    drop_fraction: float = setting(0.3, "rigl/set: fraction of each layer's weights rewired at step 0 (cosine "
                                        "decay)")
    sparse_steps_multiplier: float = setting(
        1.0, "sparse runs train k × --training_steps with every duration of their schedule (milestones, "
             "prune_begin/end, update_end) stretched by k; the dense network trains 1× (RigL's 2×/5×). k != 1 is "
             "named in the method's key and folder: rigl_2x")
    validation_examples: int = setting(
        0, "hold out the last N training examples: every network trains on the rest and is evaluated on them "
           "(results say val_accuracy), for tuning without the test set (0: the test set)")
    seeds: tuple[str, ...] = setting(["0"], "seeds (network init, data order, random masks): s1,s2,… or s:e")
    imp_results: str = setting("", "an experiments.imp results.json of the same network, drawn beside (empty: none)")
    workdir: str = setting("runs/sparse_train", "output directory")


SPEC = settings.spec(SparseTrainSettings)
DEFAULTS = common.defaults(SPEC)
# may change on a rerun (the multiplier is in each sparse run's settings and folder name, not the dense networks')
_VOLATILE = ("data_dir", "workdir", "seeds", "methods", "sparsity", "imp_results", "sparse_steps_multiplier")
# flags added after workdirs were first written, with the value older config.json / run.json files were made with
ADDED_LATER = {**common.ADDED_LATER, "sparse_steps_multiplier": 1.0, "validation_examples": 0}
STRETCHED = ("training_steps", "prune_begin", "prune_end", "update_end")  # scaled by --sparse_steps_multiplier


@dataclasses.dataclass(frozen=True)
class Config:
    """The experiment's own settings, parsed and checked once (the training flags stay in ``train``)."""

    train: Mapping[str, Any]  # the TRAIN_SPEC flags, as common's helpers take them
    methods: tuple[str, ...]
    sparsities: tuple[float, ...]
    seeds: tuple[int, ...]
    pattern: str
    options: Mapping[str, Any]
    exclude: tuple[str, ...]
    prune_output: bool
    multiplier: float = 1.0  # sparse runs' length, in dense runs' (--sparse_steps_multiplier)
    validation: int = 0  # held-out training examples evaluated instead of the test set

    @property
    def metric(self) -> str:
        """The accuracy's key in records and results: ``val_accuracy`` on held-out training examples."""
        return "val_accuracy" if self.validation else "test_accuracy"

    def key(self, method: str) -> str:
        """A method's key in ``results.json`` and its folder: ``rigl``, or ``rigl_2x`` when trained 2× longer."""
        return method if self.multiplier == 1 else f"{method}_{self.multiplier:g}x"

    @classmethod
    def parse(cls, c: Mapping[str, Any]) -> "Config":
        methods = tuple(str(m) for m in c["methods"])
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise ValueError(f"methods={list(methods)}: expected one or more of {METHODS}")
        sparsities = tuple(common.fraction_list(c["sparsity"], "sparsity", upper_open=True))
        options = _pattern_options(c)
        if c["pattern"] != "unstructured" and set(methods) - {"gradual"}:
            raise ValueError(f"pattern={c['pattern']!r}: rigl/set/static train unstructured masks; expected "
                             f"--methods=gradual, got {list(methods)}")
        if c["pattern"] == "n:m":
            want = 1 - options["n"] / options["m"]
            if len(sparsities) != 1 or abs(sparsities[0] - want) > 1e-9:
                raise ValueError(f"sparsity={list(sparsities)}: --pattern=n:m with --nm={c['nm']} expects "
                                 f"--sparsity={want}")
            sparsities = (want,)
        k, n_val = c["sparse_steps_multiplier"], c["validation_examples"]
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 1 <= k <= 100:
            raise ValueError(f"sparse_steps_multiplier={k!r}: expected a number in [1, 100] (sparse runs train k × "
                             "the dense steps)")
        if isinstance(n_val, bool) or not isinstance(n_val, int) or n_val < 0:
            raise ValueError(f"validation_examples={n_val!r}: expected an integer >= 0 (held-out training examples)")
        return cls(c, methods, sparsities, common.seed_list(c["seeds"]), c["pattern"], options,
                   tuple(c["exclude"]), bool(c["prune_output"]), float(k), n_val)


def _pattern_options(c: Mapping[str, Any]) -> dict:
    if c["pattern"] == "n:m":
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(c["nm"]))
        if not m or not 0 < int(m[1]) < int(m[2]):
            raise ValueError(f"nm={c['nm']!r}: expected 'n:m' with 0 < n < m, e.g. 2:4")
        return {"n": int(m[1]), "m": int(m[2])}
    if c["pattern"] == "block":
        return {"block": common.int_list(c["block"], "block")}
    return {}


def _steps(c: Mapping[str, Any], key: str, spe: int) -> int:
    return train.parse_duration(c[key], spe, key)


def stretched(cfg: Config, spe: int) -> dict:
    """The training flags of a sparse run: every duration of :data:`STRETCHED` and the milestones, in steps,
    × ``--sparse_steps_multiplier`` (rounded); intervals between mask updates unchanged."""
    c, k = dict(cfg.train), cfg.multiplier
    if k == 1:
        return c
    out = {key: str(round(k * _steps(c, key, spe))) for key in STRETCHED}
    out["milestones"] = [str(round(k * train.parse_duration(m, spe, "milestones"))) for m in c["milestones"]]
    return {**c, **out}


def method_config(cfg: Config, method: str, sparsity: float, spe: int, steps: int):
    """The :mod:`jaxprune.sparse_training` config of one run (``spe``: steps per epoch; ``steps``: its length)."""
    c = stretched(cfg, spe)
    if method == "gradual":
        begin, end, freq = (_steps(c, k, spe) for k in ("prune_begin", "prune_end", "prune_frequency"))
        if not 0 <= begin <= end < steps or freq < 1:
            raise ValueError(f"prune_begin={c['prune_begin']!r}, prune_end={c['prune_end']!r}: expected 0 <= begin "
                             f"<= end < training_steps ({steps} steps) and prune_frequency >= 1")
        end = begin + (end - begin) // freq * freq
        return sparse_training.Gradual(sparsity, begin, end, freq, pattern=cfg.pattern, options=cfg.options,
                                       distribution=c["gradual_distribution"])
    interval, end = _steps(c, "update_interval", spe), _steps(c, "update_end", spe)
    if method != "static" and not interval < end <= steps:
        raise ValueError(f"update_end={c['update_end']!r}: expected update_interval ({interval} steps) < "
                         f"update_end <= training_steps ({steps} steps)")
    return sparse_training.Dynamic(method, sparsity, c["dst_distribution"], interval, end, float(c["drop_fraction"]))


def run_settings(cfg: Config, method: str, sparsity: float, seed: int) -> dict:
    """What one sparse run depends on: the training settings, its method's and the pattern's."""
    keys = [row[0] for row in SPEC if row[0] not in _VOLATILE]
    return {**common.settings_of(dict(cfg.train), keys), "method": method, "sparsity": sparsity, "seed": int(seed),
            "sparse_steps_multiplier": cfg.multiplier}


def _prunable(cfg: Config, model, params, input_shape) -> Any:
    exclude = cfg.exclude + (() if cfg.prune_output else tuple(
        f"^{re.escape(layer)}/" for layer in common.output_layers(model, input_shape)))
    return masks.prunable_leaves(params, exclude=exclude)


def train_sparse(cfg: Config, model, data: tuple, method: str, sparsity: float, seed: int) -> dict:
    """One sparse run from the dense network's initialisation and data order: its record."""
    x, y, xt, yt = data
    spe = train.steps_per_epoch(len(y), cfg.train["batch_size"])
    c = stretched(cfg, spe)
    steps = train.parse_duration(c["training_steps"], spe, "training_steps")
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    template = models.init(model, init_key, x.shape)
    prunable = _prunable(cfg, model, template["params"], x.shape)
    optim = common.optim_config(c, spe)
    inner = train.make_optimizer(optim, train.make_schedule(optim, steps))
    sc = method_config(cfg, method, sparsity, spe, steps)
    if method == "gradual":
        tx = sparse_training.gradual(inner, prunable, sc)
    else:
        tx = sparse_training.dynamic(inner, prunable, sc, jax.random.fold_in(init_key, 0x4D41534B))
    state = train.create_state(template, tx)
    state = state._replace(params=sparse_training.apply_mask(state.params, state.opt_state))
    res = train.run(train.make_trainer(model, tx, augment=augment.by_name(c["augment"])), state, x, y,
                    batch_size=c["batch_size"], num_steps=steps, data_key=data_key, loop=c["loop"],
                    log_prefix=f"[{method} {sparsity} seed {seed}] ")
    rep = sparse_training.report(res.state.opt_state, prunable, cfg.pattern, cfg.options)
    return {cfg.metric: common.accuracy(model, train.variables_of(res.state), xt, yt),
            "density": rep["density"], "kept": rep["kept"], "total": rep["total"], "pattern": rep["pattern"],
            "conforms": all(rep["conforms"].values()), "layer_densities": rep["layers"],
            "train_loss": res.train_loss, "seconds": res.seconds, "steps": steps}


def _summary(records: list[dict], keys: tuple[str, ...]) -> dict:
    out: dict[str, Any] = {}
    for key in keys:
        s = conventions.summary([r[key] for r in records])
        out[key], out[f"{key}_std"] = s["mean"], s["std"]
    return {**out, "num_seeds": len(records)}


def train_and_evaluate(config: SparseTrainSettings | Mapping[str, Any], workdir: str | Path) -> dict:
    """Dense and sparse runs of every method × sparsity × seed (reusing finished ones; ``config``: a
    :class:`SparseTrainSettings` or its dict, missing keys taking ``DEFAULTS``); the ``results.json`` dict."""
    c = common.with_defaults(settings.as_config(config), DEFAULTS)
    cfg = Config.parse(c)
    workdir = Path(workdir)
    tr, te = common.load_data(c["dataset"], c["data_dir"], c["normalize"], c["max_train_examples"],
                              c["max_test_examples"])
    tr, te, c_dense = _held_out(cfg, tr, te)
    model = common.build_model(c, tr.num_classes, input_shape=tr.images.shape, defaults=DEFAULTS)
    for method in cfg.methods:  # refuse bad schedules and patterns the leaves cannot tile before any training
        _preflight(cfg, model, tr.images.shape, method)
    runs = {(m, s, seed): workdir / cfg.key(m) / str(s) / f"seed_{seed}" for m in cfg.methods
            for s in cfg.sparsities for seed in cfg.seeds}
    common.check_trained(c_dense, cfg.seeds, lambda s: workdir / "dense" / f"seed_{s}")
    for (m, s, seed), d in runs.items():
        common.check_stored(d / "run.json", run_settings(cfg, m, s, seed), f"the {m} run at sparsity {s}",
                            added_later=ADDED_LATER)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.check_run_config(workdir, c, _VOLATILE, added_later=ADDED_LATER)
    data = train.to_device(tr.images, tr.labels, te.images, te.labels)
    dense = []
    for seed in cfg.seeds:
        variables, _ = common.train_network(c_dense, model, data[0], data[1], seed,
                                            workdir / "dense" / f"seed_{seed}")
        dense.append({cfg.metric: common.accuracy(model, variables, data[2], data[3])})
    records: dict[tuple, dict] = {}
    for (m, s, seed), d in runs.items():
        if not common.check_stored(d / "run.json", run_settings(cfg, m, s, seed), f"the {m} run",
                                   added_later=ADDED_LATER):
            rec = {**train_sparse(cfg, model, data, m, s, seed), "settings": run_settings(cfg, m, s, seed)}
            d.mkdir(parents=True, exist_ok=True)
            checkpoint.write_record(d / "run.json", rec)  # with its checksum: a changed record is refused
            logging.info("%s at sparsity %s, seed %d: accuracy %.4f, density %.4f", m, s, seed,
                         rec[cfg.metric], rec["density"])
        records[(m, s, seed)] = checkpoint.read_record(d / "run.json", hint=f"; delete {d} to train it again")
    return _write(cfg, workdir, dense, records)


def _held_out(cfg: Config, tr, te) -> tuple:
    """``(train, evaluation set, the dense networks' config)``: with ``--validation_examples=N`` the last N
    training examples are the evaluation set and the networks train on the first ones (their run identity says so:
    ``max_train_examples``); else the test set. Normalisation statistics stay those of the whole training split."""
    n = cfg.validation
    if not n:
        return tr, te, dict(cfg.train)
    if n >= len(tr.labels):
        raise ValueError(f"validation_examples={n}: expected fewer than the {len(tr.labels)} training examples")
    cut = len(tr.labels) - n
    held = tr._replace(images=tr.images[cut:], labels=tr.labels[cut:])
    return tr._replace(images=tr.images[:cut], labels=tr.labels[:cut]), held, {**cfg.train, "max_train_examples": cut}


def _preflight(cfg: Config, model, input_shape: tuple, method: str) -> None:
    spe = train.steps_per_epoch(input_shape[0], cfg.train["batch_size"])
    steps = train.parse_duration(stretched(cfg, spe)["training_steps"], spe, "training_steps")
    params = jax.eval_shape(lambda: models.init(model, jax.random.PRNGKey(0), input_shape))["params"]
    prunable = _prunable(cfg, model, params, input_shape)
    for s in cfg.sparsities:
        sc = method_config(cfg, method, s, spe, steps)
        if method == "gradual":
            sparse_training._gradual_table(params, prunable, sc)


def _write(cfg: Config, workdir: Path, dense: list[dict], records: dict[tuple, dict]) -> dict:
    methods: dict[str, dict] = {}
    for m in cfg.methods:
        methods[cfg.key(m)] = {}
        for s in cfg.sparsities:
            per = [records[(m, s, seed)] for seed in cfg.seeds]
            methods[cfg.key(m)][str(s)] = {**_summary(per, (cfg.metric, "density")),
                                           "conforms": all(r["conforms"] for r in per), "steps": per[0]["steps"],
                                           "per_seed": {str(seed): {k: r[k] for k in (cfg.metric, "density")}
                                                        for seed, r in zip(cfg.seeds, per)}}
    results = {"dense": _summary(dense, (cfg.metric,)), "methods": methods, "metric": cfg.metric,
               "sparse_steps_multiplier": cfg.multiplier,
               "pattern": patterns.describe(cfg.pattern, cfg.options), "config": dict(cfg.train),
               "environment": common.environment()}
    checkpoint.write_json(workdir / "results.json", results)
    _plot(results, workdir / "accuracy_vs_density.png", cfg.train.get("imp_results", ""))
    return results


def _plot(results: dict, path: Path, imp_results: str) -> None:
    series, metric = {}, results["metric"]
    for m, by_s in results["methods"].items():
        rows = list(by_s.values())
        series[m] = ([r["density"] for r in rows], [r[metric] for r in rows], [r[f"{metric}_std"] for r in rows])
    if imp_results:
        levels = checkpoint.read_json(imp_results, hint=f" (--imp_results={imp_results})")["levels"]
        series["IMP (rewind to init)"] = ([r["density"] for r in levels], [r["test_accuracy"] for r in levels],
                                          [r.get("test_accuracy_std", 0.0) for r in levels])
    c = results["config"]
    plots.methods_vs_density(series, path, dense=results["dense"][metric],
                             title=f"{c['model']} on {c['dataset']}: sparse training ({results['pattern']})")


def format_table(results: dict) -> str:
    """Markdown: one row per method, one column per sparsity, ``mean ± std`` test accuracy (%)."""
    sparsities = list(next(iter(results["methods"].values())))
    d, metric = results["dense"], results["metric"]
    lines = [f"{metric}, dense: {100 * d[metric]:.2f} ± {100 * d[f'{metric}_std']:.2f} % "
             f"({d['num_seeds']} seeds); pattern {results['pattern']}",
             "| method | " + " | ".join(f"sparsity {s} (density)" for s in sparsities) + " |",
             "|---|" + "---|" * len(sparsities)]
    for m, by_s in results["methods"].items():
        cells = [f"{100 * r[metric]:.2f} ± {100 * r[f'{metric}_std']:.2f} ({r['density']:.4f})"
                 for r in by_s.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict, config: dict) -> str:
    return format_table(results)
