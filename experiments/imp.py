"""Iterative magnitude pruning with rewinding: ``python -m experiments.imp --flagfile=experiments/configs/X.cfg``.

Writes to ``--workdir``: ``config.json``, ``level_k/`` (orbax checkpoint + ``level.json``), ``results.json``,
``metrics.csv``, ``accuracy_vs_density.png``, ``layer_densities.png``. Re-running the same command resumes after
the last finished level; a finished run is reported and skipped.

Importable without side effects: :func:`train_and_evaluate` takes a config dict (keys = flag names, defaults in
``DEFAULTS``); :func:`load_levels` reads a finished workdir back for analysis (similarity, LRP, …).

``--num_replicas=K`` trains seeds ``seed … seed+K-1`` as one vmapped program; ``results.json`` then holds the mean
over replicas under the usual keys, ``<key>_std`` and the per-replica records under ``replicas``. Training is
data-parallel over all devices (``--batch_size`` must be a multiple of the device count); for several hosts see
:mod:`jaxprune.distributed` (``--coordinator_address``, ``--num_processes``, ``--process_id``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from absl import app, logging

from experiments import common
from jaxprune import checkpoint, distributed, imp, masks, models, plots, replicas, train

SPEC = [
    ("dataset", "digits", "digits (embedded), mnist, fashion_mnist, moons, circles, spiral, or a TFDS name"),
    ("data_dir", "", "data directory (default: $JAXPRUNE_DATA_DIR, else ~/tensorflow_datasets)"),
    ("normalize", "none", "input scaling: [0,1] as loaded, train mean/std, or [-1,1]", common.NORMALIZATIONS),
    ("max_train_examples", 0, "keep only the first N training examples (0: all)"),
    ("max_test_examples", 0, "keep only the first N test examples (0: all)"),
    ("model", "lenet300", "mlp, lenet300, lenet5, conv2, conv4, conv6, vgg11, vgg16, resnet20, resnet56"),
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
    ("exclude", [], "regexes of parameter paths never pruned, re.search-ed against paths like 'dense_0/kernel' "
                    "('^dense_' prunes only the convolutions)"),
    ("rewind", "init", "where each pruned level starts training", imp.REWINDS),
    ("rewind_step", "0", "for --rewind=step: steps ('500') or epochs ('1ep') into the dense run"),
    ("finetune_lr", None, "for --rewind=finetune: the constant learning rate (unset: the schedule's final one, "
                          "refused when 0 as at the end of --schedule=cosine)"),
    ("branch", "none", "control branch trained beside every pruned level", imp.BRANCHES),
    ("seed", 0, "seed for initialisation, data order, dropout and control branches"),
    ("workdir", "runs/imp", "output directory (resumable)"),
    ("loop", "auto", "epoch as lax.scan or a Python loop of jitted steps", ("auto", "scan", "python")),
    ("eval_every_epoch", False, "evaluate on the test set after every epoch"),
    ("num_replicas", 1, "train seeds seed, seed+1, … seed+K-1 as one vmapped program"),
    ("replica_layout", "vmap", "how replicas share the program (see jaxprune.replicas)", replicas.LAYOUTS),
    *distributed.FLAGS,
]
DEFAULTS = common.defaults(SPEC)
# older config.json files ran with these values
ADDED_LATER = {**common.ADDED_LATER, "exclude": [], "clip_grad_norm": 0.0, "prune_biases": False, "finetune_lr": None}


@dataclasses.dataclass(frozen=True)
class Built:
    model: object
    task: imp.Task
    imp: imp.ImpConfig
    meta: dict


def build(config: dict) -> Built:
    """Data, model, optimizer and IMP settings from a config dict (missing keys take ``DEFAULTS``)."""
    c = common.with_defaults(config, DEFAULTS)
    tr, te = common.load_data(c["dataset"], c["data_dir"], c["normalize"], c["max_train_examples"],
                              c["max_test_examples"], c["seed"])
    model = models.build(c["model"], tr.num_classes, hidden=common.int_list(c["hidden"], "hidden"),
                         use_bias=c["use_bias"], weight_init=c["weight_init"], pool=c["pool"], padding=c["padding"])
    if not 1 <= c["batch_size"] <= len(tr.labels):
        raise ValueError(f"batch_size={c['batch_size']}: expected 1..{len(tr.labels)} (the training set size)")
    spe = train.steps_per_epoch(len(tr.labels), c["batch_size"])
    duration = lambda name, value: train.parse_duration(value, spe, name)
    num_steps = duration("training_steps", c["training_steps"])
    if num_steps < 1:
        raise ValueError(f"training_steps={c['training_steps']!r}: expected at least one step")
    optim = train.OptimConfig(
        optimizer=c["optimizer"], lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"],
        schedule=c["schedule"], milestones=tuple(duration("milestones", m) for m in c["milestones"]),
        gamma=c["gamma"], warmup_steps=duration("warmup", c["warmup"]), clip_grad_norm=c["clip_grad_norm"])
    mesh = distributed.data_mesh()
    distributed.check_divisible(c["batch_size"], mesh)
    exclude = tuple(c["exclude"]) + (() if c["prune_output"] else (f"^{model.output_layer}/",))
    cfg = imp.ImpConfig(levels=c["levels"], fraction=c["prune_fraction"], scope=c["scope"], rewind=c["rewind"],
                        rewind_step=duration("rewind_step", c["rewind_step"]), branch=c["branch"], exclude=exclude,
                        prune_biases=c["prune_biases"], finetune_lr=c["finetune_lr"])
    task = imp.Task(model, *train.to_device(tr.images, tr.labels, te.images, te.labels), optim=optim,
                    num_steps=num_steps, batch_size=c["batch_size"], seed=c["seed"], loop=c["loop"],
                    eval_every_epoch=c["eval_every_epoch"], num_replicas=c["num_replicas"],
                    replica_layout=c["replica_layout"], mesh=mesh, augment=c["augment"])
    meta = {"steps_per_epoch": spe, "training_steps": num_steps, "imp": dataclasses.asdict(cfg),
            "optim": dataclasses.asdict(optim), "num_train": len(tr.labels), "num_test": len(te.labels),
            "num_params": models.count_params(models.init(model, jax.random.PRNGKey(0), tr.images.shape)["params"])}
    return Built(model, task, cfg, meta)


def train_and_evaluate(config: dict, workdir: str | Path) -> dict:
    """Run (or resume) IMP as described by ``config``; returns the ``results.json`` dict."""
    workdir = Path(workdir)
    b = build(config)
    record = {**DEFAULTS, **config, "workdir": str(workdir)}

    def write(levels: list[dict]) -> dict:
        results = {"config": record, "derived": b.meta, "environment": common.environment(),
                   "finished": len(levels) == b.imp.levels + 1,
                   "levels": [_without_history(r) for r in levels]}
        checkpoint.write_json(workdir / "results.json", results)
        rows = [{**r, "branch_test_accuracy": r.get("branch", {}).get("test_accuracy", "")} for r in levels]
        common.write_csv(workdir / "metrics.csv", rows, ["level", "density", "test_accuracy", "test_loss",
                                                          "train_loss", "train_accuracy", "steps", "seconds",
                                                          "branch_test_accuracy"])
        title = f"{record['model']} on {record['dataset']}, rewind={record['rewind']}"
        plots.accuracy_vs_density(levels, workdir / "accuracy_vs_density.png", title)
        plots.layer_densities(levels, workdir / "layer_densities.png", title)
        return results

    levels = imp.run(b.task, b.imp, workdir, config_record=record, on_level=write, added_later=ADDED_LATER)
    return write(levels)


def _without_history(rec: dict) -> dict:
    out = {k: v for k, v in rec.items() if k != "history"}
    if "replicas" in out:
        out["replicas"] = [_without_history(r) for r in out["replicas"]]
    return out


def load_levels(workdir: str | Path, replica: int | None = None) -> tuple[Built, list[dict], list[dict]]:
    """Read an IMP workdir back: ``(built, variables per finished level, level records)``.

    ``variables[k]`` is ``{'params': …, ['batch_stats': …]}`` of level ``k``'s trained network (pruned weights
    are exactly zero). Data are loaded as the run saw them (``built.task.x_test`` etc.). For a run with
    ``num_replicas > 1`` the variables are stacked (leading replica axis) unless ``replica`` picks one.
    """
    workdir = Path(workdir)
    if not (workdir / "config.json").exists():
        raise FileNotFoundError(f"workdir={workdir}: no config.json; expected an experiments.imp output directory")
    config = checkpoint.read_json(workdir / "config.json")
    b = build({k: v for k, v in config.items() if k in DEFAULTS})
    variables, records = [], []
    for k in imp.finished_levels(workdir):
        tree = imp.load_level(workdir, k, b.task)
        state = tree["state"]
        if replica is not None and b.task.num_replicas > 1:
            if not 0 <= replica < b.task.num_replicas:
                raise ValueError(f"replica={replica}: expected 0 <= replica < {b.task.num_replicas}")
            state = replicas.index(state, replica)
        variables.append(train.variables_of(state))
        records.append(imp.read_level(workdir, k))
    if not variables:
        raise FileNotFoundError(f"workdir={workdir}: no finished level yet")
    return b, variables, records


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_orbax()
    config = common.config_from_flags(SPEC)
    distributed.initialize(config["coordinator_address"], config["num_processes"], config["process_id"],
                           auto=config["distributed"])
    results = train_and_evaluate(config, config["workdir"])
    print(f"results: {Path(config['workdir']) / 'results.json'}")
    for r in results["levels"]:
        std = lambda x: f" ± {x['test_accuracy_std']:.4f}" if "test_accuracy_std" in x else ""
        br = f"  {r['branch']['name']} {r['branch']['test_accuracy']:.4f}{std(r['branch'])}" if "branch" in r else ""
        print(f"level {r['level']:2d}  density {r['density']:.4f}  test accuracy {r['test_accuracy']:.4f}{std(r)}{br}")
    logging.info("done")


if __name__ == "__main__":
    common.define_flags(SPEC)
    app.run(common.guarded(main))
