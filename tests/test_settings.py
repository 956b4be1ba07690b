"""experiments.settings: typed, frozen experiment configs whose flag tables are derived from them."""
from __future__ import annotations

import dataclasses

import pytest

from experiments import common, imp, settings, similarity
from experiments.settings import setting


@dataclasses.dataclass(frozen=True)
class _Probe:
    steps: str = setting("5ep", "training length")
    widths: tuple[str, ...] = setting(["8", "4"], "hidden widths")
    mode: str = setting("fast", "how", ("fast", "exact"))
    augment: str = settings.row(common.AUGMENT)


def test_the_flag_table_is_the_dataclass():
    assert settings.spec(_Probe) == [("steps", "5ep", "training length"), ("widths", ["8", "4"], "hidden widths"),
                                     ("mode", "fast", "how", ("fast", "exact")),
                                     ("augment", *common.AUGMENT[1:3], tuple(common.AUGMENT[3]))]
    assert _Probe().widths == ("8", "4")  # frozen: tuples inside, lists in the flag table and the dicts
    assert settings.to_dict(_Probe(widths=("3",))) == {"steps": "5ep", "widths": ["3"], "mode": "fast",
                                                       "augment": "none"}
    assert settings.from_dict(_Probe, {"widths": ["3"]}) == _Probe(widths=("3",))


def test_a_shared_row_must_keep_its_name():
    @dataclasses.dataclass(frozen=True)
    class Renamed:
        aug: str = settings.row(common.AUGMENT)

    with pytest.raises(ValueError, match=r"Renamed.aug: declared from the flag row 'augment'"):
        settings.spec(Renamed)


def test_unknown_settings_are_named():
    with pytest.raises(ValueError, match=r"^stepz: not settings of _Probe \(expected some of steps, widths"):
        settings.from_dict(_Probe, {"stepz": "1"})


@pytest.mark.parametrize("exp,cls", [(imp, imp.ImpSettings), (similarity, similarity.SimilaritySettings)])
def test_the_experiments_defaults_are_their_typed_configs(exp, cls):
    assert settings.to_dict(cls()) == exp.DEFAULTS == common.defaults(exp.SPEC)
    assert [row[0] for row in exp.SPEC] == [f.name for f in dataclasses.fields(cls)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls().workdir = "elsewhere"


def test_a_typed_imp_config_is_stored_as_its_dict():
    typed = imp.canonical(settings.as_config(imp.ImpSettings(hidden=("12",), warmup="1ep", seeds=("2", "3"))))
    assert typed == imp.canonical({"hidden": ["12"], "warmup": "1ep", "seeds": ["2", "3"]})
    assert typed["seeds"] == [2, 3] and settings.as_config(imp.ImpSettings(levels=2)) == {**imp.DEFAULTS, "levels": 2}


def test_one_optimizer_builder_reads_warmup_and_clipping_where_an_experiment_has_them():
    c = {**imp.DEFAULTS, "warmup": "1.5ep", "clip_grad_norm": 2.0, "milestones": ["2ep", "30"]}
    optim = common.optim_config(c, 10)
    assert (optim.warmup_steps, optim.clip_grad_norm, optim.milestones) == (15, 2.0, (20, 30))
    train_only = {k: v for k, v in c.items() if k not in ("warmup", "clip_grad_norm")}  # merge, filter_prune
    assert common.optim_config(train_only, 10) == dataclasses.replace(optim, warmup_steps=0, clip_grad_norm=0.0)
    with pytest.raises(ValueError, match="warmup"):
        common.optim_config({**c, "warmup": "soon"}, 10)
