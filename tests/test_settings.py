"""experiments.settings: typed, frozen experiment configs whose flag tables are derived from them."""
from __future__ import annotations

import dataclasses

import pytest

from experiments import common, filter_prune, head_prune, imp, lm_prune, oneshot, settings, similarity
from experiments.settings import setting
from jaxprune import data, train, unit_criteria


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
                                     (filter_prune, filter_prune.FilterPruneSettings),
                                     (head_prune, head_prune.HeadPruneSettings)])
def test_the_experiments_defaults_are_their_typed_configs(exp, cls):
    assert settings.to_dict(cls()) == exp.DEFAULTS == common.defaults(exp.SPEC)
    assert [row[0] for row in exp.SPEC] == [f.name for f in dataclasses.fields(cls)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls().workdir = "elsewhere"


def test_filter_prune_inherits_the_shared_training_settings_and_keeps_its_own():
    shared = [f.name for f in dataclasses.fields(common.TrainSettings)]
    assert filter_prune.SPEC[:len(shared)] == common.TRAIN_SPEC  # inherited: neither redeclared nor overridden
    assert [row[0] for row in filter_prune.SPEC[len(shared):]] == [
        "finetune_steps", "finetune_lr", "criterion", "reference_examples", "prune_fraction", "max_pruned_fraction",
        "max_rounds", "layer_kind", "prune_heads", "bn_recalibration_batches", "seeds", "workdir"]
    own = {row[0]: row[1] for row in filter_prune.SPEC[len(shared):]}
    assert (own["finetune_lr"], own["prune_fraction"], own["max_rounds"], own["seeds"]) == (None, 0.2, 4, ["0"])
    choices = dict((row[0], row) for row in filter_prune.SPEC)["criterion"][3]
    assert isinstance(choices, unit_criteria.Choices)  # live: a criterion registered later is a valid choice
    typed = filter_prune.FilterPruneSettings(max_rounds=1, seeds=("2", "3"), hidden=("12",))
    assert filter_prune._config(settings.as_config(typed)) == filter_prune._config(
        {"max_rounds": 1, "seeds": ["2", "3"], "hidden": ["12"]})


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


def test_an_unset_finetune_lr_is_the_training_schedules_final_one_as_in_imp():
    """filter_prune/head_prune fine-tune at --finetune_lr; unset (the shared default, imp's), at the learning rate
    the training schedule ends with: lr · gamma^(milestones passed) for a step schedule, refused at the end of a
    cosine schedule (0: no weight would change)."""
    c = {**imp.DEFAULTS, "optimizer": "momentum", "lr": 0.1, "schedule": "step", "milestones": ["2ep", "3ep"],
         "gamma": 0.5, "training_steps": "4ep", "batch_size": 10, "weight_decay": 1e-4}
    ft = common.finetune_optim(c, 100)  # 10 steps an epoch, 40 steps: both milestones passed
    assert ft.lr == pytest.approx(0.1 * 0.5 ** 2)
    assert ft == train.OptimConfig(optimizer="momentum", lr=ft.lr, momentum=0.9, weight_decay=1e-4)  # constant
    assert common.finetune_optim({**c, "finetune_lr": 0.003}, 100).lr == 0.003
    with pytest.raises(ValueError, match="finetune_lr unset.*cosine"):
        common.finetune_optim({**c, "schedule": "cosine"}, 100)
    assert common.finetune_steps({**c, "finetune_steps": "2ep"}, 100) == 20


def test_oneshot_flags_are_the_shared_training_rows_then_its_own():
    """The flag table of experiments.oneshot: common.TrainSettings' rows (issue 30: one default per flag; the old
    bare recipe, the bias-free 1000-1000-500-200 MLP with Adam 1e-3, is oneshot_mnist.cfg's), the shared pruning rows
    (use_bias, scope: imp's defaults), then its own; the unit criterion's choices stay the live registry names (a
    criterion registered later is a valid choice)."""
    n = len(common.TRAIN_SPEC)
    rows = [(r[0], r[1], r[2]) + ((list(r[3]),) if len(r) > 3 else ()) for r in oneshot.SPEC]
    assert rows[:n] == [(r[0], r[1], r[2]) + ((list(r[3]),) if len(r) > 3 else ()) for r in common.TRAIN_SPEC]
    assert [r[:2] for r in rows[n:]] == [
        common.USE_BIAS[:2], ("sparsity", ["0", "0.25", "0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "0.97", "0.99"]),
        ("methods", ["weight", "unit"]), common.SCOPE[:2], ("unit_criterion", "l2"), ("seeds", ["0"]),
        ("workdir", "runs/oneshot")]
    assert (common.USE_BIAS[:2], common.SCOPE[:2]) == (("use_bias", True), ("scope", "global"))  # imp's defaults
    unit = oneshot.SPEC[[r[0] for r in rows].index("unit_criterion")]
    assert isinstance(unit[3], unit_criteria.Choices)
    assert oneshot.SPEC == settings.spec(oneshot.OneshotSettings)  # listed choices as tuples, the registry's live


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


# ----------------------------------------------------------------------------------------------- one default per flag
# Issue 30: a flag that means the same in several experiments is declared once (common.TrainSettings, a shared row of
# common used through settings.row) and has ONE default and ONE help text everywhere; an experiment's own recipe
# lives in its configs (experiments/configs/*.cfg). The experiments checked pairwise; filter_prune and head_prune
# join once they inherit common.TrainSettings without overrides (the lead extends this tuple then).
CHECKED = ("imp", "similarity", "oneshot", "lm_prune", "merge", "sparse_train", "lrp_toy", "filter_prune", "head_prune")
ALL = None  # an exception for every experiment
# flag -> (the experiments whose row may differ from the others' (ALL: any), why). Nothing else may differ.
EXCEPTIONS = {
    "workdir": (ALL, "names the experiment: each writes to its own runs/<experiment> (similarity: beside its IMP run)"),
    "seeds": (ALL, "experiment vocabularies: replicas of one program (imp), networks compared (merge, similarity), "
                   "calibration draws (lm_prune), reference-sample draws (lrp_toy); defaults sized to each"),
    "methods": (ALL, "experiment vocabularies: weight/unit, gradual/rigl/set/static, magnitude/wanda/sparsegpt"),
    "criteria": (ALL, "experiment vocabularies: unit criteria on weights (merge) or with data (lrp_toy)"),
    "sparsity": (ALL, "experiment vocabularies: the sweep each experiment plots (units or weights removed)"),
    "dataset": (("lm_prune",), "the language model trains on a text corpus (data.TEXTS), not an image dataset"),
    "lr": (("lm_prune",), "the GPT's AdamW recipe: peak learning rate of warm-up + cosine"),
    "batch_size": (("lm_prune",), "the GPT's AdamW recipe: training windows per step"),
    "weight_decay": (("lm_prune",), "the GPT's AdamW recipe: decoupled weight decay 0.1"),
    "layers": (("similarity",), "representation names compared (similarity), not the layers merge merges"),
    "model": (("lrp_toy",), "mlp or a user model on 2-D inputs: no library image model applies to the toys"),
}


def _rows(names=CHECKED) -> dict[str, dict[str, tuple]]:
    import importlib

    return {n: {row[0]: row for row in importlib.import_module(f"experiments.{n}").SPEC} for n in names}


def _conflicts(rows: dict[str, dict[str, tuple]], exceptions: dict) -> list[str]:
    """``"a/b flag: what differs"`` for every pair of experiments whose rows of a shared flag differ in default or
    help and that no exception covers."""
    import itertools

    out = []
    for a, b in itertools.combinations(sorted(rows), 2):
        for name in sorted(set(rows[a]) & set(rows[b])):
            ra, rb = rows[a][name], rows[b][name]
            what = [w for w, i in (("default", 1), ("help", 2)) if ra[i] != rb[i]]
            who = exceptions.get(name, ((),))[0]
            if what and not (name in exceptions and (who is ALL or a in who or b in who)):
                out.append(f"{a}/{b} {name}: {' and '.join(what)} differ ({ra[1]!r} vs {rb[1]!r})")
    return out


def test_a_flag_shared_by_two_experiments_has_one_default_and_help():
    assert _conflicts(_rows(), EXCEPTIONS) == []


def test_every_exception_is_needed():
    """An exception that no pair of checked experiments uses any more is stale: remove it."""
    rows = _rows()
    stale = [name for name in EXCEPTIONS if not _conflicts(rows, {k: v for k, v in EXCEPTIONS.items() if k != name})]
    assert stale == []


def test_the_check_catches_a_redeclared_default_and_help():
    @dataclasses.dataclass(frozen=True)
    class Redeclares(common.TrainSettings):
        pass

    @dataclasses.dataclass(frozen=True)
    class Other:
        lr: float = setting(0.001, "learning rate")
        hidden: tuple[str, ...] = setting(["300", "100"], "widths")

    rows = {"a": {r[0]: r for r in settings.spec(Redeclares)}, "b": {r[0]: r for r in settings.spec(Other)}}
    assert _conflicts(rows, EXCEPTIONS) == ["a/b hidden: help differ (['300', '100'] vs ['300', '100'])",
                                            "a/b lr: default and help differ (0.1 vs 0.001)"]
    assert _conflicts(rows, {**EXCEPTIONS, "lr": (("b",), "probe"), "hidden": (("b",), "probe")}) == []


@pytest.mark.parametrize("name", ["imp", "oneshot", "merge", "sparse_train"])
def test_the_classifier_experiments_inherit_the_training_settings_unchanged(name):
    import importlib

    cls = {"imp": imp.ImpSettings, "oneshot": oneshot.OneshotSettings}.get(name) or getattr(
        importlib.import_module(f"experiments.{name}_run"), f"{''.join(p.title() for p in name.split('_'))}Settings")
    assert issubclass(cls, common.TrainSettings)
    spec = importlib.import_module(f"experiments.{name}").SPEC
    assert [r[:3] for r in spec[:len(common.TRAIN_SPEC)]] == [r[:3] for r in common.TRAIN_SPEC]
