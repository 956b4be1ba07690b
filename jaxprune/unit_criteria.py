"""The one table of unit / head criteria: :data:`CRITERIA`, filled by :func:`register_criterion`.

Every place that validates or dispatches a criterion name reads this table: :mod:`jaxprune.structured`
(``select_units``, ``unit_scores``, ``select_layers``, ``select_groups``), :func:`jaxprune.criteria.scores` and the
experiments' criterion flags. An entry says what the criterion needs and how it is called (its ``kind``):

* ``"vectors"``: ``fn(v: (n, d) float64, key) -> (n,)`` scores, higher = kept. ``v`` holds one row per unit (a
  layer's incoming weights and bias, :func:`jaxprune.structured.unit_vectors`) or per coupling class (an attention
  head: its units' rows concatenated over the q/k/v projections, :func:`jaxprune.structured.select_groups`). Built in
  (:mod:`jaxprune.structured`): ``l1``, ``l2``, ``random`` (``needs_key``), ``l2_gm``.
* ``"selection"``: ``fn(v: (n, d) float64, n_keep: int, key) -> (n_keep,)`` kept row indices, chosen directly
  (no score to rank globally). Built in: ``kmeans``.
* ``"model"``: ``fn(model, variables, x, y, **options) -> {layer: (n_units,)}`` raw (un-normalised) scores of the
  model's non-output layers, heads layers per head; ``needs_data``: ``x: (n, …)`` a reference batch (else an example
  input or shape, or None), ``needs_labels``: ``y: (n,)`` int labels too. :func:`jaxprune.criteria.scores` divides
  each layer by its ``norm`` (Yeom et al.'s per-layer normalisation); a group (a head across q/k/v) scores the sum of
  its units'. Built in (:mod:`jaxprune.criteria`): ``weight``, ``grad``, ``taylor``, ``lrp`` (option
  ``composite``).

Every kind scores single units and head groups alike. ``options`` names the keyword options the criterion reads
(``key`` is passed to those with ``needs_key``); others passed to :func:`jaxprune.criteria.scores` are ignored for
it. The built-ins register when :mod:`jaxprune.structured` (vectors, selection) and :mod:`jaxprune.criteria`
(model) are imported; ``docs/extending.md`` ("A unit criterion") has a worked example.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

KINDS = ("vectors", "selection", "model")
NORMS = ("l1", "l2", "none")


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One registered criterion: its ``fn`` (called as its ``kind`` says, module docstring) and what it needs."""

    name: str
    fn: Callable
    kind: str
    needs_data: bool = False
    needs_labels: bool = False
    needs_key: bool = False
    norm: str = "none"
    options: tuple[str, ...] = ()


CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, *, kind: str, needs_data: bool = False, needs_labels: bool | None = None,
                       needs_key: bool = False, norm: str = "none", options: tuple[str, ...] = ()) -> Callable:
    """Decorator: ``@register_criterion("max_abs", kind="vectors")`` puts ``fn`` in :data:`CRITERIA` under ``name``
    (``needs_labels`` defaults to ``needs_data``). A name already registered is refused (ValueError)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r}: expected a non-empty criterion name")
    if name in CRITERIA:
        raise ValueError(f"name={name!r}: a criterion of that name is already registered ({CRITERIA[name].fn!r}); "
                         "pick another name")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: expected one of {NORMS}")
    labels = needs_data if needs_labels is None else needs_labels
    if (needs_data or labels) and kind != "model":
        raise ValueError(f"needs_data: only a kind='model' criterion reads a reference batch, got kind={kind!r}")

    def deco(fn: Callable) -> Callable:
        if name in CRITERIA:
            raise ValueError(f"name={name!r}: a criterion of that name is already registered; pick another name")
        CRITERIA[name] = Criterion(name, fn, kind, bool(needs_data), bool(labels), bool(needs_key), norm,
                                   tuple(options))
        return fn

    return deco


def names(kinds: tuple[str, ...] = KINDS) -> tuple[str, ...]:
    """The registered names of ``kinds``, in registration order."""
    return tuple(n for n, c in CRITERIA.items() if c.kind in kinds)


def get(name: Any, kinds: tuple[str, ...] = KINDS, argument: str = "criterion", note: str = "") -> Criterion:
    """The entry of ``name`` among ``kinds``; a ValueError naming ``argument`` and the accepted names otherwise
    (``note``: the rest of the message, e.g. what else is accepted)."""
    entry = CRITERIA.get(name) if isinstance(name, str) else None
    if entry is None or entry.kind not in kinds:
        raise ValueError(f"{argument}={name!r}: expected one of {names(kinds)}{note}")
    return entry


class Choices:
    """The names of ``kinds`` read at each use (a flag's enum values, a membership test), so a criterion
    registered after an experiment module was imported is still a valid choice."""

    def __init__(self, kinds: tuple[str, ...] = KINDS) -> None:
        self.kinds = kinds

    def __iter__(self) -> Iterator[str]:
        return iter(names(self.kinds))

    def __contains__(self, name: object) -> bool:
        return name in names(self.kinds)

    def __repr__(self) -> str:
        return repr(names(self.kinds))
