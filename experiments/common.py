"""Pieces shared by the experiment mains: data preparation, result files, environment record."""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging as pylogging
import math
import platform
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.core import FrozenDict

from experiments import settings
from experiments.settings import setting
from jaxprune import augment, checkpoint, data, graph, masks, models, runs, train

NORMALIZATIONS = ("none", "standardize", "unit")


# Flag rows for multi-host runs (jaxprune.distributed.initialize's arguments); they do not change results.
DISTRIBUTED_FLAGS = [
    ("coordinator_address", "", "multi-host: 'host:port' of process 0 (empty: single host)"),
    ("num_processes", 1, "multi-host: number of processes (one per host)"),
    ("process_id", 0, "multi-host: this process's index in [0, num_processes)"),
    ("distributed", False, "multi-host: call jax.distributed.initialize() with cluster auto-detection"),
]


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


def width_list(values: Sequence[str] | str, name: str = "hidden") -> tuple[int, ...]:
    """``--hidden``-style layer widths: :func:`int_list`, each an integer >= 1 (errors name the flag)."""
    from jaxprune import _validate

    return _validate.widths(int_list(values, name), name)


# ----------------------------------------------------------------------------------------------- flags
# Experiment modules define their flags only when run as ``__main__`` (``define_flags(SPEC)``), so tests can import
# any number of them into one process. A spec row: (name, default, help) or (name, default, help, enum values).
# A default of None makes an optional number (a float flag that is None unless given).
FlagSpec = Sequence[tuple]


def defaults(spec: FlagSpec) -> dict[str, Any]:
    """The config dict an experiment runs with when no flag is given."""
    return {row[0]: row[1] for row in spec}


def with_defaults(config: dict, defaults: dict, renamed: Sequence[Renamed] = ()) -> dict:
    """``config`` completed with ``defaults``; a renamed flag's old key is mapped to its new one (with a deprecation
    warning, :func:`resolve_renamed`); a key that is not a flag of the experiment is refused."""
    config = resolve_renamed(config, renamed)
    unknown = set(config) - set(defaults)
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)}; expected a subset of {sorted(defaults)}")
    return {**defaults, **config}


# ----------------------------------------------------------------------------------------------- renamed flags
# One name per concept across the experiments (docs/design.md, "Flag names"). A flag renamed in this release keeps
# working until the next one: its old spelling is still defined, mapped to the new flag with a FutureWarning, and
# refused beside the new one. Stored records (config.json) written under the old names are migrated silently.
@dataclasses.dataclass(frozen=True)
class Renamed:
    """Old flags ``old`` (rows ``(name, default, help)``) replaced by the flag ``new``; ``convert`` maps the old
    values (``{name: value}``, every old flag present, defaults filled in) to the new flag's value; ``hint`` says how
    to write it now (shown in the warning)."""

    old: tuple
    new: str
    convert: Callable[[dict], Any]
    hint: str = ""
    # the new flag's value as old flags ({name: value}): fills the old flags a command line leaves out when it
    # overrides a flagfile's new flag with old ones (--num_replicas=4 over a flagfile's --seeds=3 → seeds 3..6)
    inverse: Callable[[Any], dict] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(row[0] for row in self.old)

    def value(self, given: Mapping[str, Any]) -> Any:
        return self.convert({row[0]: given.get(row[0], row[1]) for row in self.old})


def resolve_renamed(config: Mapping[str, Any], renamed: Sequence[Renamed]) -> dict:
    """``config`` with every old key of ``renamed`` replaced by its new key (a FutureWarning per old flag used);
    an old flag given together with its new one is refused (ValueError naming both)."""
    out = dict(config)
    for r in renamed:
        given = {k: out.pop(k) for k in r.names if k in out}
        if not given:
            continue
        flags_ = ", ".join(f"--{k}" for k in given)
        if r.new in out:
            raise ValueError(f"{flags_} and --{r.new}: {flags_} is the old name of --{r.new} (deprecated); give only "
                             f"--{r.new}")
        out[r.new] = r.value(given)
        shown = ",".join(map(str, out[r.new])) if isinstance(out[r.new], (list, tuple)) else out[r.new]
        warnings.warn(f"{flags_} is deprecated and will be removed in the next release: use --{r.new}={shown}"
                      + (f" ({r.hint})" if r.hint else ""), FutureWarning, stacklevel=2)
    return out


def migrate_record(record: Mapping[str, Any], renamed: Sequence[Renamed]) -> dict:
    """A stored settings record (``config.json``) written under old flag names, in the new names (no warning: the
    user did not type them)."""
    out = dict(record)
    for r in renamed:
        given = {k: out.pop(k) for k in r.names if k in out}
        if given and r.new not in out:
            out[r.new] = r.value(given)
    return out


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float when it is a finite number in the interval (ends closed unless ``*_open``); else a
    ValueError naming the flag and the interval, e.g. ``noise=-1.0: expected a finite number in [0, inf)``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    ok = math.isfinite(v) and (low is None or (v > low if low_open else v >= low)) and (
        high is None or (v < high if high_open else v <= high))
    if not ok or isinstance(value, bool):
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{name}={value!r}: expected a finite number in {lo}, {hi}")
    return v


def check_flagfiles(argv: Sequence[str]) -> None:
    """Refuse a ``--flagfile`` that does not exist with one line naming it (absl would end with its own FATAL)."""
    for i, a in enumerate(argv):
        path = a.split("=", 1)[1] if a.startswith("--flagfile=") else (
            argv[i + 1] if a == "--flagfile" and i + 1 < len(argv) else None)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"flagfile={path!r}: no such file; expected a flag file such as "
                             "experiments/configs/quickstart.cfg")


def fraction_list(values: Sequence[Any] | str, name: str, *, upper_open: bool = False) -> list[float]:
    """``--sparsity``-style lists → floats in [0, 1] (``[0, 1)`` with ``upper_open``), at least one; errors name the
    flag and the expected form."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    hi = "1)" if upper_open else "1]"
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = float("nan")
        if not (0.0 <= f < 1.0 if upper_open else 0.0 <= f <= 1.0):  # NaN fails both
            raise ValueError(f"{name}={v!r}: expected fractions in [0, {hi} (e.g. --{name}=0.5,0.9; not percent)")
        out.append(f)
    if not out:
        raise ValueError(f"{name}: expected at least one fraction in [0, {hi} (e.g. --{name}=0.5)")
    return out


def seed_list(values: Sequence[Any] | str, name: str = "seeds") -> tuple[int, ...]:
    """``--seeds`` → distinct integers >= 0 in the order given: ``"0,1,2"``, ``["0", "1"]``, ``[0, 1]``, or ranges
    ``"a:b"`` (a, a+1, …, b-1; e.g. ``0:10``). At least one seed."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    elif isinstance(values, (int, np.integer)):
        values = [values]
    out: list[int] = []
    for v in values:
        text = str(v).strip()
        try:
            if ":" in text:
                a, b = (int(t) for t in text.split(":"))
                if b <= a:
                    raise ValueError
                out.extend(range(a, b))
            else:
                if isinstance(v, (float, bool)):
                    raise ValueError
                out.append(int(text))
        except ValueError:
            raise ValueError(f"{name}={text!r}: expected integer seeds >= 0 or ranges a:b with a < b (e.g. "
                             f"--{name}=0,1,2 or --{name}=0:3)") from None
    if not out:
        raise ValueError(f"{name}: expected at least one seed (e.g. --{name}=0)")
    bad = [s for s in out if s < 0]
    if bad:
        raise ValueError(f"{name}={bad[0]}: expected seeds >= 0")
    if len(set(out)) != len(out):
        dup = sorted({s for s in out if out.count(s) > 1})
        raise ValueError(f"{name}: seed {dup[0]} is given twice; expected distinct seeds")
    return tuple(out)


def define_flags(spec: FlagSpec, renamed: Sequence[Renamed] = ()) -> None:
    """Define ``spec``'s flags and the old names of ``renamed`` (each with its old default)."""
    for r in renamed:
        for name, default, help_ in r.old:
            _define(name, default, f"deprecated, use --{r.new}: {help_}")
    for row in spec:
        _define(*row)


def _define(name: str, default: Any, help_: str, enum: Sequence[str] | None = None) -> None:
    from absl import flags

    if enum is not None:
        flags.DEFINE_enum(name, default, list(enum), help_)
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


def config_from_flags(spec: FlagSpec, renamed: Sequence[Renamed] = ()) -> dict[str, Any]:
    """The flags' values (keys: flag names); a renamed flag's old name is mapped to its new one
    (:func:`resolve_renamed`; refused when both are on the command line)."""
    from absl import flags

    config = {row[0]: getattr(flags.FLAGS, row[0]) for row in spec}
    for r in renamed:
        given = {k: getattr(flags.FLAGS, k) for k in r.names if flags.FLAGS[k].present}
        if given and flags.FLAGS[r.new].present:
            given = _command_line_wins(r, given, config[r.new])
        if given and not flags.FLAGS[r.new].present:
            del config[r.new]
        if given and r.new in given:  # the command line's old flags replace the flagfile's new one
            del config[r.new]
            given = {k: v for k, v in given.items() if k != r.new}
        config.update(given)
    return resolve_renamed(config, renamed)


def on_command_line(name: str, argv: Sequence[str] | None = None) -> bool:
    """Whether flag ``name`` is typed on the command line itself (``--name``, ``--name=…``, ``--noname``), not only
    set by a ``--flagfile`` (absl reads both as present)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    for a in argv:
        if a == "--":
            break
        flag = a.lstrip("-").split("=", 1)[0] if a.startswith("-") else None
        if flag in (name, f"no{name}"):
            return True
    return False


def _command_line_wins(r: Renamed, given: dict, new_value: Any) -> dict:
    """Old flags ``given`` beside the new flag ``r.new``: a command line overrides its flagfile. Old flags typed on
    the command line over a new flag from a flagfile → ``given`` completed from the flagfile's value (``r.inverse``)
    and marked to replace it (``r.new`` in the result); a new flag typed over old flags from a flagfile → ``{}``
    (the new flag wins); both typed, or both from flagfiles → ``given`` unchanged (refused as before)."""
    old_typed = any(on_command_line(k) for k in given)
    new_typed = on_command_line(r.new)
    if old_typed == new_typed:
        return given
    if new_typed:
        warnings.warn(f"--{r.new} on the command line overrides {', '.join('--' + k for k in given)} of the "
                      f"flagfile (the deprecated name of --{r.new})", UserWarning, stacklevel=3)
        return {}
    base = r.inverse(new_value) if r.inverse is not None else {}
    warnings.warn(f"{', '.join('--' + k for k in given)} on the command line overrides --{r.new} of the flagfile",
                  UserWarning, stacklevel=3)
    return {**{k: v for k, v in base.items() if k in r.names}, **given, r.new: None}


class _DropOrbaxInfo(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def quiet_orbax() -> None:
    """Keep orbax's per-save INFO lines out of the experiment logs (warnings still show)."""
    logger = pylogging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxInfo) for f in logger.filters):
        logger.addFilter(_DropOrbaxInfo())


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, KeyError)


def launch(spec: FlagSpec, run_fn, report_fn=None, renamed: Sequence[Renamed] = ()) -> None:
    """The ``__main__`` of an experiment: define ``spec``'s flags, then ``run_fn(config, workdir)`` → results, print
    where ``results.json`` went and ``report_fn(results, config)`` (a string) — user errors as one line, exit 2."""
    from absl import app

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        quiet_orbax()
        config = config_from_flags(spec, renamed)
        results = run_tolerating_flagfile(run_fn, config, spec, flagfile_only(spec))
        print(f"results: {Path(config['workdir']) / 'results.json'}")
        if report_fn is not None:
            print(report_fn(results, config))

    define_flags(spec, renamed)
    run_main(main)


def run_main(main) -> None:
    """``app.run(guarded(main))``, after refusing a missing ``--flagfile`` with one line (exit 2)."""
    import sys

    from absl import app

    try:
        check_flagfiles(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
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
        except KeyboardInterrupt:
            interrupted()

    return wrapper


def locked(run_fn):
    """An experiment's ``run(config, workdir)`` holding its workdir's lock throughout
    (:func:`jaxprune.checkpoint.workdir_lock`): a second run in the same workdir is refused at once."""

    @functools.wraps(run_fn)
    def run(config: dict, workdir, *args, **kwargs):
        with checkpoint.workdir_lock(workdir):
            return run_fn(config, workdir, *args, **kwargs)

    return run


def interrupted() -> None:
    """Ctrl-C: one line and exit code 130 (128 + SIGINT), no traceback; finished levels, rounds and seeds are on disk
    whole (checkpoints are written with SIGINT held back, :func:`jaxprune.checkpoint.interrupts_deferred`)."""
    import sys

    print("interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
    sys.exit(130)


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
# --model=module.path:ClassName's constructor arguments (a user model; see build_model).
MODEL_KWARGS = ("model_kwargs", "", "for --model=module.path:ClassName: a JSON object of constructor keyword "
                                    "arguments, e.g. '{\"hidden\": [300, 100]}' (JSON arrays become tuples)")
# Flags added after workdirs were first written: an older config.json ran with their defaults.
ADDED_LATER = {row[0]: row[1] for row in (WEIGHT_INIT, AUGMENT, POOL, PADDING, MODEL_KWARGS)}
# Pruning flags of several experiments that are not training flags, each declared once (one default, one help;
# the default is experiments.imp's): used through settings.row.
USE_BIAS = ("use_bias", True, "dense layers with biases (mlp/lenet300)")
SCOPE = ("scope", "global", "rank magnitudes across all pruned layers (global) or within each layer (layerwise)",
         masks.SCOPES)
PRUNE_OUTPUT = ("prune_output", False, "also prune the output layer's kernel (default: it stays dense)")
EXCLUDE = ("exclude", [], "regexes of parameter paths never pruned, re.search-ed against paths like 'dense_0/kernel' "
                          "('^dense_' prunes only the convolutions)")
PRUNE_FRACTION = ("prune_fraction", 0.2, "fraction of what remains removed per step: of the prunable weights per "
                                         "level (imp), of each layer's filters per round (filter_prune)")
FINETUNE_STEPS = ("finetune_steps", "1ep", "fine-tuning after each removal, steps ('200') or epochs ('1ep'); 0: none")
FINETUNE_LR = ("finetune_lr", None, "constant learning rate of fine-tuning (imp: --rewind=finetune; filter_prune, "
                                    "head_prune: after each removal); unset: the training schedule's final one, "
                                    "refused when that is 0 (the end of --schedule=cosine)")
REFERENCE_EXAMPLES = ("reference_examples", 256, "training examples the data-driven criteria (grad, taylor, lrp) are "
                                                 "computed on")
BN_RECALIBRATION = ("bn_recalibration_batches", 0, "re-estimate the BatchNorm statistics of every pruned network on "
                                                   "this many training batches before it is tested or fine-tuned (0: "
                                                   "keep the stale ones, as the reference code and merging's "
                                                   "data-free setting)")
# The classifier-training flags, declared once with one default each: every experiment that trains an image
# classifier (imp, oneshot, merge, sparse_train, filter_prune, head_prune; lrp_toy reuses the rows it has) takes
# them from here and never redeclares them. The defaults are the front door's (experiments.imp: the embedded
# digits, LeNet-300-100, plain SGD 0.1 for 16 epochs); an experiment's own recipe lives in its configs.
@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The shared training flags, in flag order: the first fields of the classifier experiments' settings."""

    dataset: str = setting("digits", "digits (embedded), mnist, fashion_mnist, moons, circles, spiral (2-D toys), "
                                     "or a TFDS name (e.g. cifar10)")
    data_dir: str = setting("", "data directory (default: $JAXPRUNE_DATA_DIR, else ~/tensorflow_datasets)")
    normalize: str = setting("none", "input scaling: [0,1] as loaded, train mean/std, or [-1,1]", NORMALIZATIONS)
    max_train_examples: int = setting(0, "keep only the first N training examples (0: all)")
    max_test_examples: int = setting(0, "keep only the first N test examples (0: all)")
    model: str = setting("lenet300", "lenet300, mlp, lenet5, conv2/4/6, vgg11/16/19, resnet20/56, vgg (with "
                                     "--vgg_cfg), or module.path:ClassName (a model of your own; see --model_kwargs)")
    model_kwargs: str = settings.row(MODEL_KWARGS)
    hidden: tuple[str, ...] = setting(["300", "100"], "hidden widths for --model=mlp")
    vgg_cfg: tuple[str, ...] = setting([], "conv widths and M pools for --model=vgg, e.g. 16,16,M,32,32,M,64,64")
    weight_init: str = settings.row(WEIGHT_INIT)
    optimizer: str = setting("sgd", "optimizer", train.OPTIMIZERS)
    lr: float = setting(0.1, "base learning rate")
    momentum: float = setting(0.9, "momentum for momentum/nesterov")
    weight_decay: float = setting(0.0, "L2 weight decay (decoupled for adamw)")
    schedule: str = setting("constant", "learning-rate schedule", train.SCHEDULES)
    milestones: tuple[str, ...] = setting([], "step-schedule milestones, in steps ('500') or epochs ('15ep')")
    gamma: float = setting(0.1, "step-schedule factor")
    training_steps: str = setting("16ep", "training length, steps ('2000') or epochs ('16ep')")
    batch_size: int = setting(128, "training batch size")
    augment: str = settings.row(AUGMENT)
    loop: str = setting("auto", "epoch as lax.scan or a Python loop of jitted steps", ("auto", "scan", "python"))


TRAIN_SPEC = settings.spec(TrainSettings)


def train_row(name: str) -> tuple:
    """The flag row ``(name, default, help[, choices])`` of the :class:`TrainSettings` field ``name``, for an
    experiment that takes some training flags without inheriting them all (``settings.row(train_row("lr"))``:
    the same default and help)."""
    rows = {row[0]: row for row in TRAIN_SPEC}
    if name not in rows:
        raise ValueError(f"{name!r}: not a TrainSettings flag (expected one of {', '.join(rows)})")
    return rows[name]


# ----------------------------------------------------------------------------------------------- models
# Flags that configure the library's models only; with --model=module.path:ClassName they must keep their defaults
# (the user model's own settings go to --model_kwargs).
LIBRARY_MODEL_FLAGS = ("hidden", "vgg_cfg", "weight_init", "use_bias", "pool", "padding", "dropout", "reference_bug")
USER_MODEL_CONTRACT = (
    "a flax.linen.Module subclass, constructed as ClassName(**model_kwargs) (plus num_classes=<the dataset's class "
    "count> when it has a num_classes field that model_kwargs leaves out), applied as model.apply(variables, x"
    "[, train=...]) to NHWC inputs (n, h, w, c) (MLPs flatten them), returning logits (n, num_classes); a `train` "
    "argument of __call__, when it has one, is True while training (dropout, BatchNorm statistics) and False "
    "otherwise. Or an NNX module class (flax.nnx.Module), constructed as ClassName(**model_kwargs, rngs=...) and "
    "trained through NNXModel (its train()/eval() modes). Pruning reads its layers from its graph (jaxprune.graph); "
    "removing units rebuilds it through a with_widths(dict[layer, int]) method, integer / tuple-of-integer width "
    "fields, or the width fields of its layers' own modules (nn.Dense(48) written inline)")


def is_user_model(name: Any) -> bool:
    """Whether ``--model`` names a model of the user's (``module.path:ClassName``) rather than one of the library's."""
    return isinstance(name, str) and ":" in name


def _json_object(value: Any) -> dict:
    """``--model_kwargs`` as the plain JSON object it holds (a dict given to an importable entry point is taken as
    JSON would give it back); ``""`` gives ``{}``."""
    if isinstance(value, Mapping):
        obj = json.loads(json.dumps(dict(value)))
    else:
        text = "" if value is None else str(value).strip()
        if not text:
            return {}
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"model_kwargs={text!r}: not valid JSON ({e}); expected a JSON object of constructor "
                             "keyword arguments, e.g. '{\"hidden\": [300, 100]}'") from None
    if not isinstance(obj, dict):
        raise ValueError(f"model_kwargs={value!r}: expected a JSON object of constructor keyword arguments "
                         f"(e.g. '{{\"hidden\": [300, 100]}}'), got a JSON {type(obj).__name__}")
    return obj


def parse_model_kwargs(value: Any) -> dict:
    """``--model_kwargs`` as constructor keyword arguments, hashable (Flax models are compared and cached by their
    fields): JSON arrays become tuples, nested JSON objects ``flax.core.FrozenDict``s."""
    from flax.core import FrozenDict

    def hashable(v):
        if isinstance(v, list):
            return tuple(hashable(a) for a in v)
        if isinstance(v, dict):
            return FrozenDict({k: hashable(a) for k, a in v.items()})
        return v

    return {k: hashable(v) for k, v in _json_object(value).items()}


def canonical_model_kwargs(c: dict) -> dict:
    """``c`` with ``model_kwargs`` in one canonical JSON spelling (sorted keys; ``""`` for none), so the same
    arguments make the same run identity however they were typed; bad JSON is refused here, naming the flag."""
    if "model_kwargs" not in c:
        return c
    obj = _json_object(c["model_kwargs"])
    return {**c, "model_kwargs": json.dumps(obj, sort_keys=True) if obj else ""}


def _spec_parts(spec: str) -> tuple[str, str]:
    module_name, _, attr = spec.partition(":")
    if not module_name.strip() or not attr.strip() or ":" in attr:
        raise ValueError(f"model={spec!r}: expected module.path:ClassName (e.g. mymodels:MyMLP) for a model of your "
                         "own, or a library model name (lenet300, mlp, lenet5, conv4, vgg16, resnet20, ...)")
    return module_name.strip(), attr.strip()


def user_model_class(spec: str) -> type:
    """The class ``module.path:ClassName`` names (``ClassName`` may be dotted: ``Outer.Inner``); errors name --model."""
    import importlib

    import flax.linen as nn

    module_name, attr = _spec_parts(spec)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ModuleNotFoundError, or the module's own error while importing
        raise ValueError(f"model={spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); it must "
                         "be importable from the Python path (e.g. a file mymodels.py in the directory the experiment "
                         "runs from, or a folder on PYTHONPATH)") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)
                           and v.__module__ == module.__name__)
            raise ValueError(f"model={spec!r}: module {module_name!r} has no attribute {attr!r}"
                             + (f"; its flax.linen.Module classes: {', '.join(names)}" if names else
                                " (and defines no flax.linen.Module class)"))
        obj = getattr(obj, part)
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        nnx = None
    if isinstance(obj, type) and nnx is not None and issubclass(obj, nnx.Module):
        return obj  # trained through NNXModel
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        what = f"an instance of {type(obj).__name__}" if not isinstance(obj, type) else f"the class {obj.__name__}"
        raise ValueError(f"model={spec!r}: expected a flax.linen.Module subclass, got {what} (or a flax.nnx.Module "
                         f"subclass); the contract: {USER_MODEL_CONTRACT}")
    return obj


@functools.lru_cache(maxsize=None)
def _with_train(cls: type) -> type:
    """``cls`` itself when its ``__call__`` takes ``train``; else a subclass of the same name whose ``__call__``
    takes (and ignores) ``train``, so the training loop's ``model.apply(v, x, train=...)`` runs it unchanged (same
    fields, same variables, ``clone``/``with_widths`` keep the subclass). One subclass per class."""
    if graph.takes_train(cls):
        return cls

    def __call__(self, x, train: bool = False):
        return super(adapted, self).__call__(x)

    adapted = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return adapted


def _field_names(cls: type) -> list[str]:
    import dataclasses
    import inspect

    if _is_nnx_class(cls):  # an NNX module's constructor arguments (rngs is passed by NNXModel)
        return [n for n in list(inspect.signature(cls.__init__).parameters)[1:] if n != "rngs"]
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def _is_nnx_class(cls: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(cls, type) and issubclass(cls, nnx.Module)


class NNXModel(nn.Module):
    """An NNX module class as a linen module, so the experiments train it unchanged (``model.init`` /
    ``model.apply(variables, x, train=...)`` with ``{'params': …, ['batch_stats': …]}``).

    Every call builds the NNX module abstractly (``nnx.eval_shape``; for ``init``, concretely from the ``params``
    key), ``nnx.merge``s it with the linen variables (its ``nnx.Param`` state as ``params``, its ``nnx.BatchStat``
    state as ``batch_stats``, keyed by the NNX attribute paths: ``params/lin/kernel``), sets its mode
    (``train()`` / ``eval()``), calls it, and in training writes the updated statistics back: the pure training
    step around it is linen's. Other NNX state (random streams of dropout) is rebuilt per call from the ``dropout``
    key. ``shapes``: ``{leaf path: shape}`` of a shrunk model (:meth:`with_shapes`, used by
    :func:`jaxprune.graph.rebuild`); ``init`` gives leading slices of the initial values of those shapes."""

    nnx_class: Any
    kwargs: Any = FrozenDict()
    shapes: Any = FrozenDict()

    def with_shapes(self, shapes: Mapping[str, tuple]) -> "NNXModel":
        return self.clone(shapes=FrozenDict({**self.shapes, **{k: tuple(v) for k, v in shapes.items()}}))

    def constructed(self) -> Any:
        """The NNX module, abstract (``nnx.eval_shape``: nothing is computed)."""
        from flax import nnx

        return nnx.eval_shape(lambda: self._make(jax.random.PRNGKey(0)))

    def _make(self, key):
        import inspect

        from flax import nnx

        takes_rngs = "rngs" in inspect.signature(self.nnx_class.__init__).parameters
        return self.nnx_class(**self.kwargs, **({"rngs": nnx.Rngs(key)} if takes_rngs else {}))

    @nn.compact
    def __call__(self, x, train: bool = False):
        from flax import nnx

        if self.is_initializing():
            module = self._make(self.make_rng("params"))
        else:
            module = self.constructed()
        gdef, params, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
        init = _cut_to({"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}, self.shapes)
        p = {k: self.param(str(k), lambda _, v=v: v) for k, v in init["params"].items()}
        b = {k: self.variable("batch_stats", str(k), lambda v=v: v) for k, v in init["batch_stats"].items()}
        nnx.replace_by_pure_dict(params, p)
        nnx.replace_by_pure_dict(stats, {k: v.value for k, v in b.items()})
        key = self.make_rng("dropout") if train and self.has_rng("dropout") else jax.random.PRNGKey(0)
        m = nnx.merge(gdef, params, stats, _concrete(rest, key))
        m.train() if train else m.eval()
        out = m(x)
        if train and not self.is_initializing() and self.is_mutable_collection("batch_stats"):
            for k, v in nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)).items():
                b[k].value = v
        return out


def _cut_to(tree: dict, shapes: Mapping[str, tuple]) -> dict:
    """``tree`` with every leaf whose ``"/"``-joined path is in ``shapes`` cut to its leading slice of that shape
    (an abstract leaf given that shape)."""
    if not shapes:
        return tree
    def cut(p, a):
        shape = shapes.get(graph._path_str(p))
        if shape is None:
            return a
        if isinstance(a, jax.ShapeDtypeStruct):  # applying: the abstract module's state
            return jax.ShapeDtypeStruct(shape, a.dtype)
        return a[tuple(slice(0, s) for s in shape)]

    return jax.tree_util.tree_map_with_path(cut, tree)


def _concrete(rest: Any, key) -> Any:
    """Concrete values for abstract NNX state other than parameters and statistics: random keys from ``key``
    (one per leaf), zeros otherwise (counters)."""
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten(rest)
    out = []
    for i, a in enumerate(leaves):
        if not isinstance(a, jax.ShapeDtypeStruct):
            out.append(a)
        elif jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            out.append(jnp.broadcast_to(jax.random.wrap_key_data(jax.random.fold_in(key, i)), a.shape))
        else:
            out.append(jnp.zeros(a.shape, a.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def check_model(model, spec: str, input_shape: Sequence[int], num_classes: int) -> None:
    """Refuse a model that does not run on one input of ``input_shape[1:]`` or gives no ``(1, num_classes)``
    logits, naming ``--model`` / ``--model_kwargs`` (abstract evaluation: nothing is computed)."""
    import jax.numpy as jnp

    shape = (1,) + tuple(int(d) for d in input_shape[1:])
    try:
        out, _ = jax.eval_shape(lambda: model.init_with_output(
            {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)}, jnp.zeros(shape, jnp.float32),
            train=False))
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"model={spec!r}: {type(model).__name__} does not run on the dataset's inputs of shape "
                         f"{shape} ({type(e).__name__}: {msg}); check --model_kwargs") from None
    got = getattr(out, "shape", None)
    if got != (1, num_classes):
        what = got if got is not None else f"a {type(out).__name__}"
        raise ValueError(f"model={spec!r}: {type(model).__name__} returns {what} on inputs of shape {shape}; "
                         f"expected logits of shape (1, {num_classes}) for the dataset's {num_classes} classes (give "
                         "the model a num_classes field, or set its output width through --model_kwargs)")


def build_user_model(c: dict, num_classes: int, input_shape: Sequence[int] | None = None,
                     defaults: dict | None = None):
    """The model of ``--model=module.path:ClassName`` with ``--model_kwargs`` (see :data:`USER_MODEL_CONTRACT`);
    ``defaults``: the experiment's flag defaults, to refuse library-model flags set with a user model."""
    spec = c["model"]
    if defaults is not None:
        plain = lambda v: json.loads(json.dumps(list(v) if isinstance(v, tuple) else v))
        changed = [k for k in LIBRARY_MODEL_FLAGS if k in c and k in defaults and plain(c[k]) != plain(defaults[k])]
        if changed:
            raise ValueError(f"{changed[0]}={c[changed[0]]!r}: configures the library's models only, not "
                             f"--model={spec}; set a model of your own through --model_kwargs (flags: "
                             f"{', '.join('--' + k for k in changed)})")
    cls = user_model_class(spec)
    kwargs = parse_model_kwargs(c.get("model_kwargs", ""))
    given = json.dumps(_json_object(c.get("model_kwargs", "")), sort_keys=True)
    fields = _field_names(cls)
    added = "num_classes" in fields and "num_classes" not in kwargs
    if added:
        kwargs["num_classes"] = int(num_classes)
    try:
        model = NNXModel(cls, FrozenDict(kwargs)) if _is_nnx_class(cls) else _with_train(cls)(**kwargs)
        if _is_nnx_class(cls):
            model.constructed()  # constructor errors named here
    except Exception as e:  # unknown or missing arguments, or the model's own checks
        raise ValueError(f"model_kwargs={given}: {cls.__name__}(**model_kwargs"
                         f"{f', num_classes={num_classes}' if added else ''}) fails ({type(e).__name__}: {e}); its "
                         f"fields: {', '.join(fields) or 'none'}") from None
    if input_shape is not None:
        check_model(model, spec, input_shape, num_classes)
    return model


def build_model(c: dict, num_classes: int, *, input_shape: Sequence[int] | None = None, defaults: dict | None = None,
                **library_kwargs):
    """The model a config names: ``model`` = a library model (``hidden`` / ``vgg_cfg`` / ``weight_init`` and
    ``library_kwargs`` such as ``use_bias`` configure it; ``vgg`` = a custom VGG) or ``module.path:ClassName`` with
    ``model_kwargs`` (:func:`build_user_model`; ``input_shape`` (n, …) checks it runs and gives ``num_classes``
    logits, ``defaults`` refuses library-model flags set beside it)."""
    if is_user_model(c["model"]):
        return build_user_model(c, num_classes, input_shape, defaults)
    if _json_object(c.get("model_kwargs", "")):
        raise ValueError(f"model_kwargs={c['model_kwargs']!r}: applies to --model=module.path:ClassName only, not "
                         f"the library model {c['model']!r} (configure it with its own flags)")
    if c["model"] == "vgg" and "vgg_cfg" in c:  # experiments without --vgg_cfg get models.build's refusal
        if not c["vgg_cfg"]:
            raise ValueError("vgg_cfg: --model=vgg needs conv widths and M pools, e.g. 16,16,M,32,32,M,64,64")
        return models.VGG(vgg_cfg(c["vgg_cfg"]), num_classes)
    return models.build(c["model"], num_classes, hidden=int_list(c["hidden"], "hidden"), weight_init=c["weight_init"],
                        **library_kwargs)


def vgg_cfg(values: Sequence[Any] | str, name: str = "vgg_cfg") -> tuple:
    """``--vgg_cfg`` → conv widths (integers >= 1) and ``"M"`` pools, e.g. ``16,16,M,32``; errors name the flag,
    the bad entry and the expected form."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    out: list = []
    for v in values:
        text = str(v).strip()
        if text.upper() == "M":
            out.append("M")
            continue
        try:
            width = int(text)
        except ValueError:
            width = 0
        if width < 1 or isinstance(v, (bool, float)):
            raise ValueError(f"{name}={','.join(map(str, values))}: entry {text!r} is neither a conv width (an "
                             f"integer >= 1) nor M (a 2x2 max pool); expected e.g. --{name}=16,16,M,32,32,M")
        out.append(width)
    return tuple(out)


def output_layers(model, input_shape: Sequence[int], variables: dict | None = None) -> tuple[str, ...]:
    """The layers whose units are the model's outputs (read from its graph, :mod:`jaxprune.graph`; abstract
    variables when none are given): what weight pruning leaves alone, for any model."""
    import jax.numpy as jnp

    spec = jax.ShapeDtypeStruct((1,) + tuple(int(d) for d in input_shape[1:]), jnp.float32)
    if variables is None:
        variables = jax.eval_shape(lambda: models.init(model, jax.random.PRNGKey(0), spec.shape))
    return graph.build(model, variables, spec).output_layers()


representations = runs.representations  # its home is the library; this name stays for the experiments


# ----------------------------------------------------------------------------------------------- run identity
# One rule for every experiment (OpenLTH's idea): every artefact an experiment stores and reuses on a rerun — a
# trained network, a finished round, a per-seed table — records under "settings" the settings that produced it, and
# only those (a trained network: its data, model and training settings, not the pruning evaluated on it later).
# A rerun in the same workdir reuses an artefact only when its recorded settings agree with the run's; otherwise
#  * an artefact that costs training (a trained network, a round) is refused before any work, the error naming
#    every differing setting with its old and its new value (check_stored, called for all of them up front), and
#  * a derived artefact (an evaluation table) is recomputed (stored_matches says whether it is current; the caller
#    logs what changed).
# A record written before settings were recorded (no "settings" block) cannot be checked: it is refused, saying to
# delete it (or to use a new --workdir), unless the caller vouches for it (``legacy_ok``: a workdir-level
# config.json checked by checkpoint.check_run_config already holds the same settings, as in experiments.filter_prune).
# Comparisons are of the values as JSON stores them; settings added after records were first written take their
# ``added_later`` value in an older record that lacks them.

# What a trained network of a TRAIN_SPEC config depends on (plus its seed): everything but data_dir (where the data
# lie, not what they are: a workdir stays usable on another machine).
NOT_TRAINING_SETTINGS = ("data_dir",)


def settings_of(c: dict, keys: Sequence[str]) -> dict:
    """The settings ``keys`` of config ``c`` (those it has), as JSON stores them."""
    return checkpoint.as_stored({k: c[k] for k in keys if k in c})


def training_settings(c: dict, seed: int) -> dict:
    """What a network trained by :func:`train_network` from a :data:`TRAIN_SPEC` config depends on."""
    keys = [row[0] for row in TRAIN_SPEC if row[0] not in NOT_TRAINING_SETTINGS]
    return {**settings_of(c, keys), "seed": int(seed)}


def stored_matches(record: dict | None, settings: dict, added_later: Mapping | None = None,
                   legacy: str = "settings") -> tuple[bool, dict]:
    """``(current, diff)`` of a stored record against the settings a run wants: ``current`` when the record holds a
    settings block (under ``"settings"``, or ``legacy``: an older key for the same thing) equal to ``settings``;
    ``diff`` names what differs (``{}`` when the record holds no settings at all)."""
    if record is None:
        return False, {}
    old = record.get("settings", record.get(legacy))
    if old is None:
        return False, {}
    diff = checkpoint.settings_diff(old, settings, dict(ADDED_LATER if added_later is None else added_later))
    return not diff, diff


def check_stored(path: str | Path, settings: dict, what: str, *, added_later: Mapping | None = None,
                 legacy_ok: bool = False) -> bool:
    """The rule for an artefact that costs training, recorded in the JSON file ``path`` (its finished marker):
    ``False`` when there is none yet (make it), ``True`` when it was made with ``settings`` (reuse it); a
    ValueError, before any work, when it was made with other settings (naming each, old -> new) or when its record
    holds no settings (written by an older version; accepted as is with ``legacy_ok``)."""
    path = Path(path)
    if not path.exists():
        return False
    record = checkpoint.read_record(path, hint=f"; delete {path.parent} to make it again")
    if "settings" not in record:
        if legacy_ok:
            return True
        raise ValueError(f"{path}: {what} recorded without the settings it was made with (written by an older "
                         f"version), so it cannot be checked against this run's settings; delete {path.parent} to "
                         "make it again with these settings, or use a new --workdir")
    _, diff = stored_matches(record, settings, added_later)
    if diff:
        raise ValueError(f"{path}: {what} was made with other settings ({checkpoint.format_settings_diff(diff)}); "
                         f"it would be reused as if made with the new ones: use a new --workdir, go back to the "
                         f"old settings, or delete {path.parent} to make it again")
    return True


def optim_config(c: Mapping[str, Any], spe: int = 1, *, finetune: bool = False, steps: int = 0
                 ) -> train.OptimConfig:
    """The optimizer of a config, built here for every experiment (``spe``: steps per epoch, for milestones and
    warm-up given in epochs): :class:`TrainSettings`' optimizer flags; ``--warmup`` and ``--clip_grad_norm`` where
    the experiment has them (experiments.imp; absent: off), and so for any optimizer flag an experiment lacks
    (absent: :class:`jaxprune.train.OptimConfig`'s default, i.e. off / constant).

    ``finetune=True``: the fine-tuning optimizer of the pruning experiments: the same optimizer, momentum, weight
    decay and clipping at the constant ``--finetune_lr`` (no schedule, no warm-up); unset (None), the training
    schedule's learning rate after its ``steps`` steps, as :class:`jaxprune.imp.ImpConfig` does (a ValueError naming
    the flag when that is 0)."""
    base = train.OptimConfig()
    get = lambda name: c.get(name, getattr(base, name))  # noqa: E731
    if finetune:
        lr = c["finetune_lr"]
        if lr is None:
            lr = float(train.make_schedule(optim_config(c, spe), steps)(steps))
            if lr <= 0:
                raise ValueError(f"finetune_lr unset: fine-tuning would run at the final learning rate of "
                                 f"--schedule={c.get('schedule', base.schedule)}, which is {lr}: no weight would "
                                 "change; set --finetune_lr to a positive learning rate")
        return train.OptimConfig(optimizer=c["optimizer"], lr=float(lr), momentum=get("momentum"),
                                 weight_decay=get("weight_decay"), clip_grad_norm=get("clip_grad_norm"))
    return train.OptimConfig(optimizer=c["optimizer"], lr=c["lr"], momentum=get("momentum"),
                             weight_decay=get("weight_decay"), schedule=get("schedule"),
                             milestones=tuple(train.parse_duration(m, spe, "milestones") for m in get("milestones")),
                             gamma=get("gamma"), warmup_steps=train.parse_duration(c.get("warmup", "0"), spe, "warmup"),
                             clip_grad_norm=get("clip_grad_norm"))


def finetune_steps(c: Mapping[str, Any], num_train: int) -> int:
    """``--finetune_steps`` in steps (epochs of ``num_train`` examples at ``--batch_size``; 0: no fine-tuning)."""
    return train.parse_duration(c["finetune_steps"], train.steps_per_epoch(num_train, c["batch_size"]),
                                "finetune_steps")


def finetune_optim(c: Mapping[str, Any], num_train: int) -> train.OptimConfig:
    """The fine-tuning optimizer of a network :func:`train_network` trained on ``num_train`` examples:
    :func:`optim_config` ``(finetune=True)`` at the length of its training schedule."""
    spe = train.steps_per_epoch(num_train, c["batch_size"])
    return optim_config(c, spe, finetune=True, steps=train.parse_duration(c["training_steps"], spe, "training_steps"))


def check_finetune_lr(value: Any) -> None:
    """``--finetune_lr``: unset (None) or a positive finite learning rate (a ValueError naming the flag)."""
    if value is not None:
        check_range("finetune_lr", value, 0, low_open=True)


def train_network(c: dict, model, x_train, y_train, seed: int, out: Path, *,
                  legacy_ok: bool = False) -> tuple[dict, dict]:
    """Train one network of a :data:`TRAIN_SPEC` config (or reload it from ``out``): ``(variables, record)``.

    ``out`` holds ``checkpoint/`` and ``trained.json``, written last (the finished marker), which records the
    :func:`training_settings`; a network trained with other settings is refused (:func:`check_stored`; callers
    check every seed with :func:`check_trained` before training any). ``legacy_ok``: a ``trained.json`` without
    settings is reused (the caller checked them otherwise)."""
    out = Path(out)
    settings = training_settings(c, seed)
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    template = models.init(model, init_key, x_train.shape)
    if check_stored(out / "trained.json", settings, "a trained network", legacy_ok=legacy_ok):
        return runs.load_trained(out, template, seed=seed)
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
           "train_accuracy": res.train_accuracy, "seconds": res.seconds, "settings": settings}
    out.mkdir(parents=True)
    with checkpoint.interrupts_deferred():
        rec["sha256"] = checkpoint.save(out / "checkpoint", variables)
        checkpoint.write_record(out / "trained.json", rec)  # the "finished" marker, written last
    return variables, rec


def check_trained(c: dict, seeds: Sequence[int], out_of_seed, *, legacy_ok: bool = False) -> None:
    """Refuse, before any training, a run whose workdir holds a network of one of ``seeds`` trained with other
    settings (``out_of_seed(seed)``: the folder :func:`train_network` uses for it)."""
    for seed in seeds:
        check_stored(Path(out_of_seed(seed)) / "trained.json", training_settings(c, seed), "a trained network",
                     legacy_ok=legacy_ok)


@functools.lru_cache(maxsize=16)
def _evaluator(model) -> train.Trainer:
    return train.make_trainer(model, optax.identity())  # one compiled evaluation per (hashable) model definition


def accuracy(model, variables: dict, x, y) -> float:
    """Test accuracy (fraction) of ``model`` with ``variables`` on ``(x, y)``."""
    return train.evaluate(_evaluator(model), variables, x, y)["accuracy"]


# ----------------------------------------------------------------------------------------------- stored settings
# The experiments that record their settings in <workdir>/config.json (checkpoint.check_run_config), each known by
# a setting only it records.
CONFIG_WRITERS = {"experiments.imp": "rewind", "experiments.filter_prune": "max_pruned_fraction",
                  "experiments.head_prune": "reference_fraction"}


def read_run_config(workdir: str | Path, experiment: str, name: str = "workdir") -> dict | None:
    """``workdir/config.json`` as a dict, ``None`` when there is none. Refused with one line naming the file (or
    the flag ``name``) and what to do: a file that is not JSON, JSON that is not an object, or the settings of
    another experiment than ``experiment`` (a key of :data:`CONFIG_WRITERS`)."""
    workdir = Path(workdir)
    path = workdir / "config.json"
    if not path.is_file():
        return None
    fix = f"delete {workdir} to start over, or use a new --{name}" if name == "workdir" else (
        f"expected the --workdir of an {experiment} run")
    record = checkpoint.read_json(path, hint=f"; {fix}")  # the JSON first: its form and its writer are named
    if not isinstance(record, dict):
        raise ValueError(f"{path}: holds a JSON {type(record).__name__}, not the settings object an experiment "
                         f"writes (the file was changed by hand or by another program); {fix}")
    writer = next((w for w, key in CONFIG_WRITERS.items() if key in record), None)
    if writer is not None and writer != experiment:
        short = experiment.split(".")[-1].replace("imp", "IMP")
        article = "an" if short[0] in "AEIOU" else "a"
        raise ValueError(f"{name}={workdir}: not {article} {short} workdir (it was written by {writer}); "
                         + (f"use a new --workdir for {experiment}" if name == "workdir" else fix))
    return checkpoint.verify_record(path, record, hint=f"; {fix}")  # then its checksum (the record without it)


# ----------------------------------------------------------------------------------------------- unused flags
# The rule (docs/design.md, "Flags that do nothing"): a flag set away from its default that has no effect with the
# chosen settings (--rewind_step without --rewind=step, --milestones with --schedule=cosine or past the end of
# training, --momentum with --optimizer=sgd, ...) is refused when it was given explicitly — typed on the command
# line, or a key of the config an importable entry point (train_and_evaluate, run) gets — and, when only a
# --flagfile sets it, warned in one line and reset to its default: flagfiles are shared between modes (one file for
# rewind=init and rewind=step runs), and a value that does nothing changes nothing when dropped.
class UnusedFlag(ValueError):
    """A flag that does nothing with the chosen settings (:func:`check_unused`); ``flag``: its name."""

    def __init__(self, flag: str, value: Any, why: str):
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        super().__init__(f"{flag}={shown}: does nothing {why}; leave it out, or change the setting it depends on")
        self.flag = flag


def changed(c: dict, defaults: dict, name: str) -> bool:
    """Whether flag ``name`` is set away from its default (compared as JSON stores them)."""
    return name in c and name in defaults and checkpoint.as_stored(c[name]) != checkpoint.as_stored(defaults[name])


def training_unused(c: dict, defaults: dict, num_steps: int, spe: int) -> list[tuple[str, str]]:
    """``(flag, why)`` for each changed optimizer/schedule/model flag of ``c`` that does nothing: ``momentum``
    without a momentum optimizer, ``milestones``/``gamma`` without ``--schedule=step`` or (milestones) at or past
    the end of training (``num_steps``; epochs of ``spe`` steps), ``warmup`` as long as training, ``hidden``
    without ``--model=mlp``, ``vgg_cfg`` without ``--model=vgg``."""
    out = []
    if changed(c, defaults, "momentum") and c["optimizer"] not in ("momentum", "nesterov"):
        out.append(("momentum", f"with --optimizer={c['optimizer']} (only momentum and nesterov use it)"))
    for name in ("milestones", "gamma"):
        if changed(c, defaults, name) and c["schedule"] != "step" and (name == "gamma" or c[name]):
            out.append((name, f"with --schedule={c['schedule']} (only --schedule=step uses it)"))
    if changed(c, defaults, "milestones") and c["schedule"] == "step":
        late = [m for m in c["milestones"] if train.parse_duration(m, spe, "milestones") >= num_steps]
        if late:
            out.append(("milestones", f"after step {num_steps - 1}: milestone {late[0]} is at or past the end of "
                                      f"training ({num_steps} steps), so it never applies"))
    if changed(c, defaults, "warmup") and train.parse_duration(c["warmup"], spe, "warmup") >= num_steps:
        out.append(("warmup", f"as a warm-up: it does not end before training does ({num_steps} steps), so the "
                              "learning rate never reaches --lr"))
    if changed(c, defaults, "hidden") and c.get("model") != "mlp" and not is_user_model(c.get("model")):
        out.append(("hidden", f"with --model={c.get('model')} (only --model=mlp takes hidden widths)"))
    if changed(c, defaults, "vgg_cfg") and c.get("model") != "vgg" and not is_user_model(c.get("model")):
        out.append(("vgg_cfg", f"with --model={c.get('model')} (only --model=vgg takes a cfg)"))
    return out


def check_training_unused(c: dict, defaults: dict, num_train: int) -> None:
    """:func:`check_unused` of :func:`training_unused` for a :data:`TRAIN_SPEC` config on ``num_train`` examples."""
    spe = train.steps_per_epoch(num_train, c["batch_size"])
    steps = train.parse_duration(c["training_steps"], spe, "training_steps")
    if steps >= 1:  # else train_network's own error
        check_unused(c, training_unused(c, defaults, steps, spe))


def check_unused(c: dict, found: Sequence[tuple[str, str]]) -> None:
    """Refuse the first flag of ``found`` (``(flag, why)`` pairs, e.g. :func:`training_unused`) as an
    :class:`UnusedFlag`; the CLI (:func:`launch`) turns one that only a flagfile set into a warning."""
    for flag, why in found:
        raise UnusedFlag(flag, c[flag], why)


def flagfile_only(spec: FlagSpec, argv: Sequence[str] | None = None) -> set[str]:
    """The flags of ``spec`` set by a ``--flagfile`` and not typed on the command line."""
    from absl import flags

    return {row[0] for row in spec if flags.FLAGS[row[0]].present and not on_command_line(row[0], argv)}


def run_tolerating_flagfile(run_fn, config: dict, spec: FlagSpec, from_flagfile: set[str]):
    """``run_fn(config, workdir)``; an :class:`UnusedFlag` that only a flagfile set is warned (one line on stderr)
    and reset to its default, and the run started again (the check comes before any work)."""
    import sys

    config = dict(config)
    while True:
        try:
            return run_fn(config, config["workdir"])
        except UnusedFlag as e:
            if e.flag not in from_flagfile or not changed(config, defaults(spec), e.flag):
                raise
            print(f"warning: {e} (set by the flagfile: ignored)", file=sys.stderr)
            config[e.flag] = defaults(spec)[e.flag]
