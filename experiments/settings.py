"""Typed, frozen experiment configs: one dataclass per experiment, its absl flags derived from it.

A config is a frozen dataclass whose fields are the experiment's flags, in flag order, each declared with
:func:`setting` (default, help, choices). :func:`spec` turns it into the flag table that :mod:`experiments.common`
defines and parses (``common.define_flags``, ``common.config_from_flags``), so flag names, defaults, help and
choices are written once, in the dataclass. List-valued flags are tuples in the dataclass (it is frozen) and lists
in the flag table and in the config dicts the experiments store (``config.json``, ``results.json``): a typed config
and the flags give the same dict (:func:`to_dict`), hence the same run identity.

    @dataclasses.dataclass(frozen=True)
    class MySettings:
        workdir: str = setting("runs/mine", "output directory")
        steps: str = setting("10ep", "training length, steps ('2000') or epochs ('10ep')")
        mode: str = setting("fast", "how to run", choices=("fast", "exact"))

    SPEC = settings.spec(MySettings)        # common.define_flags(SPEC) under __main__
    DEFAULTS = common.defaults(SPEC)       # == settings.to_dict(MySettings())
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence


def setting(default: Any, help_: str, choices: Sequence[str] | None = None, *, name: str | None = None) -> Any:
    """A dataclass field that is also a flag: ``default`` (a list is stored as a tuple), its ``help_`` text and,
    for an enum flag, its ``choices`` (``name``: the flag's, checked against the field's by :func:`spec`)."""
    value = tuple(default) if isinstance(default, list) else default
    meta = {"help": help_, "choices": choices, **({} if name is None else {"name": name})}
    return dataclasses.field(default=value, metadata=meta)


def row(flag: tuple) -> Any:
    """A field from a flag row ``(name, default, help[, choices])`` shared by several experiments (``common.AUGMENT``
    …): declared once, and the field must carry the row's name (checked by :func:`spec`)."""
    return setting(*flag[1:], name=flag[0])


def spec(cls: type) -> list[tuple]:
    """The flag table of the config dataclass ``cls``: ``(name, default, help[, choices])`` per field, in order
    (tuple defaults as lists, as the flags hold them). Listed choices become a tuple; other choices are kept as
    given (e.g. :class:`jaxprune.unit_criteria.Choices`, read at each use: a criterion registered later is still a
    valid choice)."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("name", f.name) != f.name:
            raise ValueError(f"{cls.__name__}.{f.name}: declared from the flag row {f.metadata['name']!r}")
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        choices = f.metadata.get("choices")
        if isinstance(choices, (list, tuple)):
            choices = tuple(choices)
        rows.append((f.name, default, f.metadata["help"]) + (() if choices is None else (choices,)))
    return rows


def to_dict(config: Any) -> dict:
    """A config dataclass as the flat dict the experiment functions take (keys = flag names, tuples as lists)."""
    return {f.name: (list(v) if isinstance(v := getattr(config, f.name), tuple) else v)
            for f in dataclasses.fields(config)}


def from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """The config dataclass ``cls`` from flag values (missing ones: the defaults); an unknown key is a ValueError
    naming it."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not settings of {cls.__name__} (expected some of {', '.join(names)})")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def as_config(config: Any) -> dict:
    """A config dict as given, or a config dataclass as its dict (:func:`to_dict`): what the experiments take."""
    return to_dict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else dict(config)
