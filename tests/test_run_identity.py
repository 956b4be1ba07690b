"""Issue #17, run identity: a rerun in the same workdir reuses a stored artefact only when the settings it records
agree; a changed training setting is refused before any work (naming the setting, old and new value) or the
artefact is recomputed — never silently reused. Tiny runs (embedded digits, 2-D toys, a few steps)."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from experiments import common, filter_prune, lrp_toy, merge, oneshot
from jaxprune import checkpoint, train

MERGE = dict(dataset="digits", model="mlp", hidden=["16", "8"], normalize="none", optimizer="momentum", lr=0.05,
             weight_decay=0.0, schedule="constant", milestones=[], training_steps="5", batch_size=32,
             sparsity=["0.5"], criteria=["l2"], seeds=["0"])
FILTER = dict(dataset="digits", model="vgg", vgg_cfg=["4", "M", "6"], normalize="none", optimizer="momentum",
              lr=0.05, weight_decay=0.0, schedule="constant", milestones=[], training_steps="3", batch_size=64,
              finetune_steps="2", prune_fraction=0.25, max_rounds=1, max_train_examples=256, max_test_examples=64)
# lrp_toy and oneshot: their recipes' optimizer (Adam 1e-3) given, the bare defaults being common.TrainSettings'
LRP = {"datasets": ["moons"], "num_train": 64, "hidden": ["8", "8"], "optimizer": "adam", "lr": 1e-3,
       "training_steps": "3", "batch_size": 32, "samples_per_class": ["1"], "seeds": ["0"], "n_prune": 4, "plot_n": 1,
       "criteria": ["weight"]}
ONESHOT = dict(dataset="digits", model="mlp", hidden=["12"], use_bias=False, normalize="unit", optimizer="adam",
               lr=0.001, training_steps="3", batch_size=64, scope="layerwise", sparsity=["0", "0.5"], seeds=["0"],
               max_train_examples=256, max_test_examples=64)


@pytest.fixture
def runs(monkeypatch):
    """Counts every training run (``jaxprune.train.run``) the experiments start."""
    calls = []
    real = train.run

    def counting(*a, **kw):
        calls.append(kw.get("num_steps"))
        return real(*a, **kw)

    monkeypatch.setattr(train, "run", counting)
    return calls


def _refused(fn, *names_old_new):
    """``fn()`` raises a ValueError naming every ``(setting, old, new)``; returns the message."""
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    for name, old, new in names_old_new:
        assert re.search(rf"{name}: {re.escape(repr(old))} -> {re.escape(repr(new))}", msg), msg
    return msg


# ------------------------------------------------------------------------------------------------ the rule itself
def test_check_stored_absent_agreeing_differing_and_legacy(tmp_path):
    p = tmp_path / "a" / "trained.json"
    assert common.check_stored(p, {"lr": 0.05}, "a trained network") is False
    checkpoint.write_json(p, {"settings": {"lr": 0.05, "hidden": [16, 8]}})
    assert common.check_stored(p, {"lr": 0.05, "hidden": (16, 8)}, "a trained network") is True  # as JSON stores it
    msg = _refused(lambda: common.check_stored(p, {"lr": 0.5, "hidden": (16, 8)}, "a trained network"),
                   ("lr", 0.05, 0.5))
    assert "hidden" not in msg and str(p.parent) in msg
    # a setting added later: an older record without it ran with its added_later value
    assert common.check_stored(p, {"lr": 0.05, "hidden": [16, 8], "augment": "none"}, "x") is True
    _refused(lambda: common.check_stored(p, {"lr": 0.05, "hidden": [16, 8], "augment": "crop_flip"}, "x"),
             ("augment", "none", "crop_flip"))
    checkpoint.write_json(p, {"steps": 5})  # an older version's record: no settings
    with pytest.raises(ValueError, match="recorded without the settings.*delete"):
        common.check_stored(p, {"lr": 0.05}, "a trained network")
    assert common.check_stored(p, {"lr": 0.05}, "a trained network", legacy_ok=True) is True


def test_training_settings_leave_out_the_data_location_and_evaluation_flags():
    c = merge._config(MERGE)
    s = common.training_settings(c, 3)
    assert s["seed"] == 3 and s["lr"] == 0.05 and s["training_steps"] == "5" and s["hidden"] == ["16", "8"]
    assert "data_dir" not in s and "sparsity" not in s and "criteria" not in s and "workdir" not in s


# ------------------------------------------------------------------------------------------------ merge
@pytest.mark.slow
def test_merge_refuses_a_changed_training_setting_before_any_work(tmp_path, runs):
    merge.run(MERGE, tmp_path)
    assert len(runs) == 1
    before = (tmp_path / "seed_0" / "trained.json").stat().st_mtime_ns
    results = checkpoint.read_json(tmp_path / "results.json")
    # the reproduction: --lr=0.5 --training_steps=50 on a workdir trained at lr 0.05 for 5 steps
    _refused(lambda: merge.run({**MERGE, "lr": 0.5, "training_steps": "50"}, tmp_path),
             ("lr", 0.05, 0.5), ("training_steps", "5", "50"))
    assert len(runs) == 1 and checkpoint.read_json(tmp_path / "results.json") == results  # nothing done
    # a new seed beside a changed setting: refused too, before seed 1 is trained
    _refused(lambda: merge.run({**MERGE, "seeds": ["1", "0"], "weight_decay": 1e-4}, tmp_path),
             ("weight_decay", 0.0, 1e-4))
    assert len(runs) == 1 and not (tmp_path / "seed_1").exists()
    # an unchanged rerun (other evaluation settings: not part of the trained network's identity) reuses it
    again = merge.run({**MERGE, "sparsity": ["0.25"], "criteria": ["l1"]}, tmp_path)
    assert len(runs) == 1 and (tmp_path / "seed_0" / "trained.json").stat().st_mtime_ns == before
    assert again["seeds"][0]["trained"]["settings"]["lr"] == 0.05
    assert list(again["summary"]) == ["l1"]  # the evaluation table was recomputed for the new settings


def test_merge_legacy_trained_json_is_refused_with_what_to_do(tmp_path, runs):
    merge.run(MERGE, tmp_path)
    rec = checkpoint.read_json(tmp_path / "seed_0" / "trained.json")
    checkpoint.write_json(tmp_path / "seed_0" / "trained.json",  # as an older version wrote it (no record checksum)
                          {k: v for k, v in rec.items() if k not in ("settings", checkpoint.RECORD_SHA)})
    with pytest.raises(ValueError, match=r"recorded without the settings .*delete .*seed_0"):
        merge.run(MERGE, tmp_path)
    shutil.rmtree(tmp_path / "seed_0")  # what the message says to do
    merge.run(MERGE, tmp_path)
    assert len(runs) == 2


def test_merge_source_folder_of_another_model_is_refused(tmp_path):
    merge.run(MERGE, tmp_path / "a")
    _refused(lambda: merge.run({**MERGE, "hidden": ["16", "4"], "source_workdir": str(tmp_path / "a/seed_{seed}")},
                               tmp_path / "b"), ("hidden", ["16", "8"], ["16", "4"]))


def test_merge_refuses_a_flag_the_model_cannot_take_before_training(tmp_path, runs):
    with pytest.raises(ValueError, match="expected a VGG model"):  # --pruned_cfg × an MLP
        merge.run({**MERGE, "hidden": ["16", "8"], "sparsity": ["0.5"], "pruned_cfg": ["4", "M", "3"]}, tmp_path)
    assert not runs and not tmp_path.joinpath("seed_0").exists()


# ------------------------------------------------------------------------------------------------ lrp_toy
@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_lrp_toy_refuses_a_changed_training_setting_and_reuses_an_unchanged_one(tmp_path, runs):
    lrp_toy.run(LRP, tmp_path)
    assert len(runs) == 1
    info = checkpoint.read_json(tmp_path / "moons" / "train.json")
    assert info["settings"]["lr"] == 1e-3 and info["settings"]["dataset"] == "moons"
    _refused(lambda: lrp_toy.run({**LRP, "lr": 0.5, "training_steps": "50"}, tmp_path),
             ("lr", 0.001, 0.5), ("training_steps", "3", "50"))
    _refused(lambda: lrp_toy.run({**LRP, "hidden": ["8", "9"]}, tmp_path), ("hidden", ["8", "8"], ["8", "9"]))
    assert len(runs) == 1
    res = lrp_toy.run({**LRP, "criteria": ["weight", "grad"], "n_prune": 2}, tmp_path)  # evaluation only
    assert len(runs) == 1 and checkpoint.read_json(tmp_path / "moons" / "train.json") == info
    assert set(res["datasets"]["moons"]["criteria"]) == {"weight", "grad"}


def test_lrp_toy_legacy_record_is_refused(tmp_path, runs):
    lrp_toy.run(LRP, tmp_path)
    info = checkpoint.read_json(tmp_path / "moons" / "train.json")
    checkpoint.write_json(tmp_path / "moons" / "train.json", {"steps": info["steps"], "seconds": 1.0})
    with pytest.raises(ValueError, match="recorded without the settings"):
        lrp_toy.run(LRP, tmp_path)
    assert len(runs) == 1


# ------------------------------------------------------------------------------------------------ filter_prune
@pytest.mark.slow
def test_filter_prune_refuses_a_changed_training_setting_and_resumes_an_unchanged_run(tmp_path, runs):
    filter_prune.run(FILTER, tmp_path)
    n = len(runs)  # training + one fine-tuning round
    assert n == 2
    assert checkpoint.read_json(tmp_path / "seed_0" / "trained" / "trained.json")["settings"]["lr"] == 0.05
    _refused(lambda: filter_prune.run({**FILTER, "lr": 0.5, "training_steps": "50"}, tmp_path),
             ("lr", 0.05, 0.5), ("training_steps", "3", "50"))
    assert len(runs) == n
    filter_prune.run(FILTER, tmp_path)  # unchanged: everything reused
    assert len(runs) == n
    filter_prune.run({**FILTER, "max_rounds": 2}, tmp_path)  # one more round, the trained network reused
    assert len(runs) == n + 1


@pytest.mark.slow
def test_filter_prune_rounds_are_checked_and_a_redone_round_redoes_the_later_ones(tmp_path, runs):
    cfg = {**FILTER, "max_rounds": 3}
    first = filter_prune.run(cfg, tmp_path)["rounds"]
    assert len(runs) == 4  # training + three fine-tuning rounds
    seed = tmp_path / "seed_0"
    r2 = checkpoint.read_json(seed / "round_2" / "round.json")
    assert len(r2["checkpoint_sha256"]) == 64 and "checkpoint_sha256" not in first[2]  # recorded, not reported
    # a changed checkpoint sha, the record re-stamped (a hand edit is refused by the record's own checksum first)
    checkpoint.write_record(seed / "round_2" / "round.json", {**r2, "checkpoint_sha256": "0" * 64})
    with pytest.raises(ValueError, match=r"round_2/checkpoint: its contents do not match the sha256.*delete .*"
                                         r"round_2 to redo that round \(later rounds are then redone too\)"):
        filter_prune.run(cfg, tmp_path)
    checkpoint.write_json(seed / "round_2" / "round.json", r2)
    shutil.rmtree(seed / "round_2")  # as the message says: round 2 and 3 are redone, round 3 not reused
    again = filter_prune.run(cfg, tmp_path)["rounds"]
    assert len(runs) == 6
    assert [r["widths"] for r in again] == [r["widths"] for r in first]
    assert again[3]["accuracy_after_finetune"] == pytest.approx(first[3]["accuracy_after_finetune"], abs=1e-6)


def test_filter_prune_old_workdir_without_recorded_training_settings_still_loads(tmp_path, runs):
    filter_prune.run(FILTER, tmp_path)
    p = tmp_path / "seed_0" / "trained" / "trained.json"
    rec = checkpoint.read_json(p)
    checkpoint.write_json(p, {k: v for k, v in rec.items() if k not in ("settings", checkpoint.RECORD_SHA)})
    filter_prune.run(FILTER, tmp_path)  # config.json vouches for it
    assert len(runs) == 2
    # without the checkpoint's sha256 it cannot be verified: refused, never extended from (issue 28)
    checkpoint.write_json(p, {k: v for k, v in rec.items() if k not in ("settings", "sha256", checkpoint.RECORD_SHA)})
    with pytest.raises(ValueError, match=r"holds no sha256 .*cannot be verified; delete \S*seed_0/trained to train"):
        filter_prune.run(FILTER, tmp_path)
    assert len(runs) == 2


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["taylor", "lrp"])
def test_filter_prune_data_driven_criteria_run_on_resnet(tmp_path, criterion):
    cfg = {**FILTER, "model": "resnet20", "vgg_cfg": [], "criterion": criterion, "reference_examples": 8,
           "training_steps": "1", "finetune_steps": "1", "max_train_examples": 64, "max_test_examples": 32}
    res = filter_prune.run(cfg, tmp_path)
    r1 = res["rounds"][1]["widths"]
    assert r1["block0_0/conv_0"] == 12 and r1["block2_0/conv_0"] == 48  # 16 - ceil(0.25 · 16), 64 - ceil(0.25 · 64)


# ------------------------------------------------------------------------------------------------ oneshot
def test_oneshot_recomputes_a_seed_made_with_other_settings_and_reuses_an_unchanged_one(tmp_path, runs):
    oneshot.run(ONESHOT, tmp_path)
    assert len(runs) == 1
    rec = checkpoint.read_json(tmp_path / "seed_0.json")
    assert rec["settings"]["lr"] == 0.001
    oneshot.run(ONESHOT, tmp_path)
    assert len(runs) == 1  # unchanged: reused
    res = oneshot.run({**ONESHOT, "lr": 0.01}, tmp_path)
    assert len(runs) == 2  # retrained, not reused
    assert checkpoint.read_json(tmp_path / "seed_0.json")["settings"]["lr"] == 0.01
    assert res["config"]["lr"] == 0.01
    # an older version's record (its settings under "config") is still reused when they agree
    rec = checkpoint.read_json(tmp_path / "seed_0.json")
    rec["config"] = rec.pop("settings")
    rec.pop(checkpoint.RECORD_SHA)  # (nor had it a record checksum)
    checkpoint.write_json(tmp_path / "seed_0.json", rec)
    oneshot.run({**ONESHOT, "lr": 0.01}, tmp_path)
    assert len(runs) == 2


def test_oneshot_refuses_global_kmeans_before_training(tmp_path, runs):
    with pytest.raises(ValueError, match="kmeans"):
        oneshot.run({**ONESHOT, "scope": "global", "unit_criterion": "kmeans"}, tmp_path)
    assert not runs


def test_results_record_the_settings_they_were_computed_with(tmp_path):
    res = merge.run(MERGE, tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["config"]["lr"] == 0.05 and res["seeds"][0]["trained"]["settings"]["training_steps"] == "5"
