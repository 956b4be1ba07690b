"""The IMP experiment as functions (``experiments.imp`` is its command line): the typed config :class:`ImpSettings`
(the flags are derived from it), :func:`build` (data, model, optimizer, IMP settings), :func:`train_and_evaluate`
(run or resume one workdir) and the readers of a finished workdir (:func:`load_levels`, :func:`run_analyses`; the
library code behind them is :mod:`jaxprune.runs`). Importable without side effects; ``experiments.imp``'s
docstring describes the workdir and the flags.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax

from experiments import common, settings
from experiments.settings import setting
from jaxprune import analysis, checkpoint, distributed, imp, models, plots, replicas, runs, train
from jaxprune.runs import ANALYSES, instability_data_key, plot_analyses, replica_record  # noqa: F401 (their home)


@dataclasses.dataclass(frozen=True)
class ImpSettings(common.TrainSettings):
    """Every flag of ``experiments.imp``, in flag order (:func:`experiments.settings.spec`): the shared training
    flags (:class:`experiments.common.TrainSettings`, never redeclared here), IMP's model and optimizer extras, the
    IMP settings, then the per-level analyses (:data:`ANALYSIS_FLAGS`: not IMP settings, never in ``config.json``)."""

    use_bias: bool = settings.row(common.USE_BIAS)
    pool: str = settings.row(common.POOL)
    padding: str = settings.row(common.PADDING)
    clip_grad_norm: float = setting(0.0, "clip the gradients' global L2 norm to this before each step (0: off)")
    warmup: str = setting('0', "linear warm-up length, steps or epochs ('1ep')")
    levels: int = setting(3, 'pruned levels after the dense level 0')
    prune_fraction: float = settings.row(common.PRUNE_FRACTION)
    scope: str = settings.row(common.SCOPE)
    prune_output: bool = settings.row(common.PRUNE_OUTPUT)
    prune_biases: bool = setting(False, 'also prune the biases of the pruned layers, ranked with their weights')
    prune_embeddings: bool = setting(False, 'also prune embedding tables (weights are chosen by their '
                                            'role in the model: the kernels of dense, conv and '
                                            'attention projections)')
    exclude: tuple[str, ...] = settings.row(common.EXCLUDE)
    rewind: str = setting('init', 'where each pruned level starts training', imp.REWINDS)
    rewind_step: str = setting('0', "for --rewind=step: steps ('500') or epochs ('1ep') into the dense run")
    finetune_lr: float | None = settings.row(common.FINETUNE_LR)
    branch: str = setting('none', 'control branch trained beside every pruned level', imp.BRANCHES)
    seeds: tuple[str, ...] = setting(['0'], 'seeds for initialisation, data order, dropout and '
                                            'control branches; several consecutive ones (0,1,2,3 or '
                                            '0:4) train as replicas of one vmapped program')
    workdir: str = setting('runs/imp', 'output directory (resumable)')
    eval_every_epoch: bool = setting(False, 'evaluate on the test set after every epoch')
    replica_layout: str = setting('vmap', 'how replicas share the program (see jaxprune.replicas)', replicas.LAYOUTS)
    coordinator_address: str = settings.row(common.DISTRIBUTED_FLAGS[0])
    num_processes: int = settings.row(common.DISTRIBUTED_FLAGS[1])
    process_id: int = settings.row(common.DISTRIBUTED_FLAGS[2])
    distributed: bool = settings.row(common.DISTRIBUTED_FLAGS[3])
    analyses: tuple[str, ...] = setting([], 'analyses of every level, any of similarity, overlap, '
                                            'instability (-> analysis.json)')
    analysis_examples: int = setting(1000, 'similarity: the first N test inputs (all of them when the '
                                           'test set is smaller)')
    analysis_metrics: tuple[str, ...] = setting(list(analysis.DEFAULT_METRICS), "similarity: metrics, any of "
                                                f"{', '.join(analysis.SIMILARITY_METRICS)}")
    instability_points: int = setting(11, 'instability: points on the linear path between the two '
                                          'copies, ends included')


SPEC = settings.spec(ImpSettings)
ANALYSIS_FLAGS = ("analyses", "analysis_examples", "analysis_metrics", "instability_points")
# May change between a run and its resumption (they do not change results).
VOLATILE = ("workdir", "levels", "eval_every_epoch", "replica_layout", "coordinator_address", "num_processes",
            "process_id", "distributed")
DEFAULTS = common.defaults(SPEC)
# older config.json files ran with these values
ADDED_LATER = {**common.ADDED_LATER, "exclude": [], "clip_grad_norm": 0.0, "prune_biases": False, "finetune_lr": None,
                "prune_embeddings": False, "vgg_cfg": []}  # vgg_cfg: from common.TrainSettings (issue 30)
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


def build(config: ImpSettings | dict, strict: bool = True) -> Built:
    """Data, model, optimizer and IMP settings from a config dict (missing keys take ``DEFAULTS``); ``strict``
    refuses flags that do nothing with the chosen settings (:func:`unused`; off to read a stored run back)."""
    c = canonical(settings.as_config(config))
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
    optim = common.optim_config(c, spe)
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


def train_and_evaluate(config: ImpSettings | dict, workdir: str | Path) -> dict:
    """Run (or resume) IMP as described by ``config`` (an :class:`ImpSettings` or its dict, missing keys taking
    ``DEFAULTS``); returns the ``results.json`` dict."""
    config, workdir = settings.as_config(config), Path(workdir)
    b = build(config)
    record = {**canonical(config), "workdir": str(workdir)}
    chosen = analysis_settings(record, b)  # refused before anything is written
    analyzer = runs.Analyzer(b.task, b.imp, workdir, chosen) if chosen else None

    def write(levels: list[dict]) -> dict:
        results = {"config": record, "derived": b.meta, "environment": common.environment(),
                   "finished": len(levels) == b.imp.levels + 1,
                   "levels": [_without_history(r) for r in levels]}
        checkpoint.write_record(workdir / "results.json", results)
        rows = [{**r, "branch_test_accuracy": r.get("branch", {}).get("test_accuracy", "")} for r in levels]
        common.write_csv(workdir / "metrics.csv", rows, ["level", "density", "test_accuracy", "test_loss",
                                                          "train_loss", "train_accuracy", "steps", "seconds",
                                                          "branch_test_accuracy"])
        title = _title(record)
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


def _title(c: dict) -> str:
    return f"{c['model']} on {c['dataset']}, rewind={c['rewind']}"


def _without_history(rec: dict) -> dict:
    out = {k: v for k, v in rec.items() if k != "history"}
    if "replicas" in out:
        out["replicas"] = [_without_history(r) for r in out["replicas"]]
    return out


def trained_seeds(workdir: str | Path, name: str = "workdir") -> list[int]:
    """The seeds of an IMP workdir in replica order: replica ``r`` trained seed ``trained_seeds(workdir)[r]``
    (``name``: the flag that gave ``workdir``, for errors)."""
    return list(stored_config(Path(workdir), name)["seeds"])


def load_levels(workdir: str | Path, replica: int | None = None) -> tuple[Built, list[dict], list[dict]]:
    """Read an IMP workdir back: ``(built, variables per finished level, level records)``, data loaded as the run
    saw them (``built.task.x_test`` etc.); :func:`jaxprune.runs.load_levels` with the run's stored settings."""
    b = build(stored_config(Path(workdir)), strict=False)
    return (b, *runs.load_levels(workdir, b.task, replica))


def analysis_settings(config: dict, b: Built) -> dict[str, dict]:
    """:func:`jaxprune.runs.analysis_settings` of the run ``b``."""
    return runs.analysis_settings(config, b.task)


def run_analyses(workdir: str | Path, analyses: list[str] | tuple[str, ...], **options) -> dict:
    """Analyse a finished (or partly finished) IMP workdir without training further: ``analyses`` ⊆ :data:`ANALYSES`,
    ``options``: the other analysis flags (``analysis_examples``, ``analysis_metrics``, ``instability_points``).
    Writes and returns ``analysis.json`` (as ``--analyses`` does after each level); :func:`jaxprune.runs.analyse`
    describes its records."""
    config = stored_config(Path(workdir))
    b = build(config, strict=False)
    chosen = analysis_settings({**DEFAULTS, **options, "analyses": list(analyses)}, b)
    return runs.analyse(workdir, b.task, b.imp, chosen, _title(config))
