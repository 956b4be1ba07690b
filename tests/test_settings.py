"""experiments.settings: typed, frozen experiment configs whose flag tables are derived from them."""
from __future__ import annotations

import dataclasses

import pytest

from experiments import common, head_prune, imp, lm_prune, oneshot, settings, similarity
from experiments.settings import setting
from jaxprune import data, unit_criteria


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


@pytest.mark.parametrize("exp,cls", [(imp, imp.ImpSettings), (similarity, similarity.SimilaritySettings),
                                     (oneshot, oneshot.OneshotSettings), (lm_prune, lm_prune.LmPruneSettings),
                                     (head_prune, head_prune.HeadPruneSettings)])
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


def test_oneshot_flags_are_the_rows_of_the_tuple_spec_they_replace():
    """The flag table of experiments.oneshot as its tuple SPEC wrote it (names, defaults, help, choices, order); the
    unit criterion's choices stay the live registry names (a criterion registered later is a valid choice)."""
    rows = [(r[0], r[1], r[2]) + ((list(r[3]),) if len(r) > 3 else ()) for r in oneshot.SPEC]
    assert [r[:2] for r in rows] == [
        ("dataset", "digits"), ("data_dir", ""), ("normalize", "unit"), ("max_train_examples", 0),
        ("max_test_examples", 0), ("model", "mlp"), common.MODEL_KWARGS[:2], ("hidden", ["1000", "1000", "500", "200"]),
        ("use_bias", False), common.WEIGHT_INIT[:2], ("optimizer", "adam"), ("lr", 0.001), ("momentum", 0.9),
        ("training_steps", "3ep"), ("batch_size", 100),
        ("sparsity", ["0", "0.25", "0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "0.97", "0.99"]),
        ("methods", ["weight", "unit"]), ("scope", "layerwise"), ("unit_criterion", "l2"), ("seeds", ["0"]),
        ("workdir", "runs/oneshot"), ("loop", "auto")]
    choices = {r[0]: r[3] for r in rows if len(r) > 3}
    assert choices == {"normalize": list(common.NORMALIZATIONS), "weight_init": list(common.WEIGHT_INIT[3]),
                       "optimizer": ["sgd", "momentum", "nesterov", "adam", "adamw"], "scope": ["global", "layerwise"],
                       "unit_criterion": list(oneshot.SPEC[18][3]), "loop": ["auto", "scan", "python"]}
    assert isinstance(oneshot.SPEC[18][3], unit_criteria.Choices)
    assert [r[:3] + tuple(tuple(x) for x in r[3:]) for r in oneshot.SPEC] == settings.spec(oneshot.OneshotSettings)


def test_lm_prune_flags_are_the_rows_of_the_tuple_spec_they_replace():
    assert [r[:2] for r in lm_prune.SPEC] == [
        ("dataset", "shakespeare"), ("data_dir", ""), ("width", 128), ("depth", 4), ("heads", 4), ("context", 128),
        ("tie_embeddings", False), ("steps", 1500), ("batch_size", 32), ("lr", 0.002), ("warmup_steps", 100),
        ("weight_decay", 0.1), ("train_seed", 0), ("val_windows", 256),
        ("methods", ["magnitude", "wanda", "sparsegpt"]), ("patterns", ["50%", "2:4", "4:8"]), ("calib_windows", 64),
        ("damp", 0.01), ("blocksize", 128),
        ("wanda_group", "output"), ("seeds", ["0", "1", "2"]), ("sample_chars", 200), ("workdir", "runs/lm_prune")]
    assert {r[0]: r[3] for r in lm_prune.SPEC if len(r) > 3} == {"dataset": tuple(data.TEXTS),
                                                                 "wanda_group": ("output", "layer")}
