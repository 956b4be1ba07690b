"""Pieces shared by the experiment mains: data preparation, result files, environment record."""
from __future__ import annotations

import csv
import functools
import logging as pylogging
import platform
import shutil
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import optax

from jaxprune import augment, checkpoint, data, models, train

NORMALIZATIONS = ("none", "standardize", "unit")


def load_data(dataset: str, data_dir: str | None, normalize: str = "none", max_train: int = 0,
              max_test: int = 0, seed: int = 0) -> tuple[data.Dataset, data.Dataset]:
    """Train and test splits, normalised with the *train* statistics; ``max_*`` > 0 keeps the first examples."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}: expected one of {NORMALIZATIONS}")
    for name, value in (("max_train_examples", max_train), ("max_test_examples", max_test)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}={value!r}: expected an integer >= 0 (the first N examples; 0: all)")
    tr = data.load(dataset, "train", data_dir or None, seed=seed)
    te = data.load(dataset, "test", data_dir or None, seed=seed)
    if max_train:
        tr = tr._replace(images=tr.images[:max_train], labels=tr.labels[:max_train])
    if max_test:
        te = te._replace(images=te.images[:max_test], labels=te.labels[:max_test])
    if normalize == "standardize":
        mean, std = float(tr.images.mean()), float(tr.images.std())
        tr = tr._replace(images=data.standardize(tr.images, mean, std))
        te = te._replace(images=data.standardize(te.images, mean, std))
    elif normalize == "unit":
        tr = tr._replace(images=data.scale_to_unit_range(tr.images))
        te = te._replace(images=data.scale_to_unit_range(te.images))
    return tr, te


def environment() -> dict:
    """Which software and hardware produced a result."""
    import flax
    import optax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "machine": platform.machine()}


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    tmp.replace(path)


def int_list(values: Sequence[str] | str, name: str = "") -> tuple[int, ...]:
    """``"300,100"`` or ``["300", "100"]`` → ``(300, 100)``; ``name``: the flag the values came from, for errors."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        where = f"{name}=" if name else ""
        raise ValueError(f"{where}{','.join(map(str, values))!r}: expected comma-separated integers "
                         "(e.g. 300,100)") from None


# ----------------------------------------------------------------------------------------------- flags
# Experiment modules define their flags only when run as ``__main__`` (``define_flags(SPEC)``), so tests can import
# any number of them into one process. A spec row: (name, default, help) or (name, default, help, enum values).
# A default of None makes an optional number (a float flag that is None unless given).
FlagSpec = Sequence[tuple]


def defaults(spec: FlagSpec) -> dict[str, Any]:
    """The config dict an experiment runs with when no flag is given."""
    return {row[0]: row[1] for row in spec}


def with_defaults(config: dict, defaults: dict) -> dict:
    """``config`` completed with ``defaults``; a key that is not a flag of the experiment is refused."""
    unknown = set(config) - set(defaults)
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)}; expected a subset of {sorted(defaults)}")
    return {**defaults, **config}


def define_flags(spec: FlagSpec) -> None:
    from absl import flags

    for row in spec:
        name, default, help_ = row[:3]
        if len(row) > 3:
            flags.DEFINE_enum(name, default, list(row[3]), help_)
        elif default is None:
            flags.DEFINE_float(name, None, help_)
        elif isinstance(default, bool):
            flags.DEFINE_boolean(name, default, help_)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, help_)
        elif isinstance(default, (list, tuple)):
            flags.DEFINE_list(name, list(default), help_)
        else:
            flags.DEFINE_string(name, default, help_)


def config_from_flags(spec: FlagSpec) -> dict[str, Any]:
    from absl import flags

    return {row[0]: getattr(flags.FLAGS, row[0]) for row in spec}


class _DropOrbaxInfo(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def quiet_orbax() -> None:
    """Keep orbax's per-save INFO lines out of the experiment logs (warnings still show)."""
    logger = pylogging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxInfo) for f in logger.filters):
        logger.addFilter(_DropOrbaxInfo())


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, KeyError)


def launch(spec: FlagSpec, run_fn, report_fn=None) -> None:
    """The ``__main__`` of an experiment: define ``spec``'s flags, then ``run_fn(config, workdir)`` → results, print
    where ``results.json`` went and ``report_fn(results, config)`` (a string) — user errors as one line, exit 2."""
    from absl import app

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        quiet_orbax()
        config = config_from_flags(spec)
        results = run_fn(config, config["workdir"])
        print(f"results: {Path(config['workdir']) / 'results.json'}")
        if report_fn is not None:
            print(report_fn(results, config))

    define_flags(spec)
    app.run(guarded(main))


def guarded(main_fn):
    """Wrap an absl ``main`` so bad input ends with one clear line on stderr and exit code 2, not a traceback."""
    import sys

    def wrapper(argv):
        try:
            return main_fn(argv)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


# ----------------------------------------------------------------------------------------------- train one network
# The initialiser flag of the MLPs and LeNet5 (shared by every experiment that builds them).
WEIGHT_INIT = ("weight_init", "he_normal", "initialiser of the MLPs and LeNet5 (glorot_uniform: Keras' default; "
                                         "torch_default: PyTorch's nn.Linear/nn.Conv2d default, kernel and bias "
                                         "U(±1/√fan_in))",
               tuple(models.INITS))
AUGMENT = ("augment", "none", "training-batch augmentation (crop_flip: pad 4, random crop, random flip — the "
                              "CIFAR recipe)", augment.NAMES)
POOL = ("pool", "max", "LeNet5's pooling (avg: the original LeNet-5's, as the pruned-layer-similarity study)",
        models.POOLS)
PADDING = ("padding", "same", "padding of LeNet5's first convolution (valid: 24×24 maps and a 256-unit flatten, as "
                              "PyTorch LeNet5s and the pruned-layer-similarity study's)", models.PADDINGS)
# Flags added after workdirs were first written: an older config.json ran with their defaults.
ADDED_LATER = {row[0]: row[1] for row in (WEIGHT_INIT, AUGMENT, POOL, PADDING)}
# Flags shared by the experiments that train a single network per seed (merge, filter_prune).
TRAIN_SPEC = [
    ("dataset", "fashion_mnist", "fashion_mnist, mnist, digits, or a TFDS name (e.g. cifar10)"),
    ("data_dir", "", "data directory (default: $JAXPRUNE_DATA_DIR, else ~/tensorflow_datasets)"),
    ("normalize", "unit", "input scaling: [0,1] as loaded, train mean/std, or [-1,1]", NORMALIZATIONS),
    ("max_train_examples", 0, "keep only the first N training examples (0: all)"),
    ("max_test_examples", 0, "keep only the first N test examples (0: all)"),
    ("model", "lenet300", "lenet300, mlp, lenet5, conv2/4/6, vgg11/16/19, resnet20/56, or vgg (with --vgg_cfg)"),
    ("hidden", ["300", "100"], "hidden widths for --model=mlp"),
    ("vgg_cfg", [], "conv widths and M pools for --model=vgg, e.g. 16,16,M,32,32,M,64,64"),
    WEIGHT_INIT,
    ("optimizer", "momentum", "optimizer", train.OPTIMIZERS),
    ("lr", 0.1, "base learning rate"),
    ("momentum", 0.9, "momentum for momentum/nesterov"),
    ("weight_decay", 1e-4, "L2 weight decay"),
    ("schedule", "step", "learning-rate schedule", train.SCHEDULES),
    ("milestones", ["15ep", "30ep", "45ep"], "step-schedule milestones, in steps ('500') or epochs ('15ep')"),
    ("gamma", 0.1, "step-schedule factor"),
    ("training_steps", "60ep", "training length, steps ('2000') or epochs ('60ep')"),
    ("batch_size", 128, "training batch size"),
    AUGMENT,
    ("loop", "auto", "epoch as lax.scan or a Python loop of jitted steps", ("auto", "scan", "python")),
]


def build_model(c: dict, num_classes: int):
    """The model named by a config with ``model``, ``hidden`` and ``vgg_cfg`` (``vgg`` = a custom VGG)."""
    if c["model"] == "vgg":
        if not c["vgg_cfg"]:
            raise ValueError("vgg_cfg: --model=vgg needs conv widths and M pools, e.g. 16,16,M,32,32,M,64,64")
        cfg = tuple("M" if str(v).upper() == "M" else int(v) for v in c["vgg_cfg"])
        return models.VGG(cfg, num_classes)
    return models.build(c["model"], num_classes, hidden=int_list(c["hidden"], "hidden"), weight_init=c["weight_init"])


def optim_config(c: dict, spe: int) -> train.OptimConfig:
    """The optimizer of a :data:`TRAIN_SPEC` config (``spe``: steps per epoch, for milestones in epochs)."""
    return train.OptimConfig(optimizer=c["optimizer"], lr=c["lr"], momentum=c["momentum"],
                             weight_decay=c["weight_decay"], schedule=c["schedule"],
                             milestones=tuple(train.parse_duration(m, spe, "milestones") for m in c["milestones"]),
                             gamma=c["gamma"])


def train_network(c: dict, model, x_train, y_train, seed: int, out: Path) -> tuple[dict, dict]:
    """Train one network of a :data:`TRAIN_SPEC` config (or reload it from ``out``): ``(variables, record)``.

    ``out`` holds ``checkpoint/`` and ``trained.json``, written last (the finished marker)."""
    out = Path(out)
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    template = models.init(model, init_key, x_train.shape)
    if (out / "trained.json").exists():
        return checkpoint.restore(out / "checkpoint", template), checkpoint.read_json(out / "trained.json")
    if out.exists():  # a partial run: start over
        shutil.rmtree(out)
    spe = train.steps_per_epoch(len(y_train), c["batch_size"])
    steps = train.parse_duration(c["training_steps"], spe, "training_steps")
    if steps < 1:
        raise ValueError(f"training_steps={c['training_steps']!r}: expected at least one step")
    optim = optim_config(c, spe)
    tx = train.make_optimizer(optim, train.make_schedule(optim, steps))
    res = train.run(train.make_trainer(model, tx, augment=augment.by_name(c["augment"])),
                    train.create_state(template, tx), x_train, y_train,
                    batch_size=c["batch_size"], num_steps=steps, data_key=data_key, loop=c["loop"],
                    log_prefix=f"[seed {seed}] ")
    variables = train.variables_of(res.state)
    rec = {"seed": seed, "steps": steps, "steps_per_epoch": spe, "train_loss": res.train_loss,
           "train_accuracy": res.train_accuracy, "seconds": res.seconds}
    out.mkdir(parents=True)
    checkpoint.save(out / "checkpoint", variables)
    checkpoint.write_json(out / "trained.json", rec)  # the "finished" marker, written last
    return variables, rec


@functools.lru_cache(maxsize=16)
def _evaluator(model) -> train.Trainer:
    return train.make_trainer(model, optax.identity())  # one compiled evaluation per (hashable) model definition


def accuracy(model, variables: dict, x, y) -> float:
    """Test accuracy (fraction) of ``model`` with ``variables`` on ``(x, y)``."""
    return train.evaluate(_evaluator(model), variables, x, y)["accuracy"]
