"""Pieces shared by the experiment mains: data preparation, result files, environment record."""
from __future__ import annotations

import csv
import logging as pylogging
import platform
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jaxprune import data

NORMALIZATIONS = ("none", "standardize", "unit")


def load_data(dataset: str, data_dir: str | None, normalize: str = "none", max_train: int = 0,
              max_test: int = 0, seed: int = 0) -> tuple[data.Dataset, data.Dataset]:
    """Train and test splits, normalised with the *train* statistics; ``max_*`` > 0 keeps the first examples."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}: expected one of {NORMALIZATIONS}")
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


def int_list(values: Sequence[str] | str) -> tuple[int, ...]:
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    return tuple(int(v) for v in values)


# ----------------------------------------------------------------------------------------------- flags
# Experiment modules define their flags only when run as ``__main__`` (``define_flags(SPEC)``), so tests can import
# any number of them into one process. A spec row: (name, default, help) or (name, default, help, enum values).
FlagSpec = Sequence[tuple]


def defaults(spec: FlagSpec) -> dict[str, Any]:
    """The config dict an experiment runs with when no flag is given."""
    return {row[0]: row[1] for row in spec}


def define_flags(spec: FlagSpec) -> None:
    from absl import flags

    for row in spec:
        name, default, help_ = row[:3]
        if len(row) > 3:
            flags.DEFINE_enum(name, default, list(row[3]), help_)
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
