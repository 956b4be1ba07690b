"""jaxprune.runs: a filter_prune seed folder and a trained network read back by library code (round checkpoints and
``trained/`` verified against their recorded sha256). One tiny filter_prune run (the library's MLP on a slice of
the embedded digits, a few steps) shared by the module."""
from __future__ import annotations

import re
import shutil

import jax
import pytest

from experiments import common, filter_prune, merge
from jaxprune import checkpoint, models, runs, structured, train

CFG = dict(dataset="digits", normalize="none", model="mlp", hidden=["12", "8"], layer_kind="dense",
           optimizer="momentum", lr=0.05, training_steps="3", batch_size=64, max_train_examples=256,
           max_test_examples=64, finetune_steps="2", prune_fraction=0.25, max_pruned_fraction=0.8, max_rounds=2)
INPUT = (1, 8, 8, 1)  # the digits' images


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("filter_prune")
    return wd, filter_prune.run(CFG, wd)


def _model():
    return common.build_model(filter_prune._config(CFG), 10)


def _test_data():
    _, te = common.load_data("digits", "", "none", max_test=CFG["max_test_examples"])
    return train.to_device(te.images, te.labels)


def _tamper(ckpt, template) -> None:
    """Replace the checkpoint at ``ckpt`` by one whose first leaf is shifted by 1 (same shapes: only the recorded
    sha256 tells)."""
    tree = checkpoint.restore(ckpt, template)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    shutil.rmtree(ckpt)
    checkpoint.save(ckpt, jax.tree_util.tree_unflatten(treedef, [leaves[0] + 1.0, *leaves[1:]]))


def test_a_round_read_back_has_the_recorded_widths_and_accuracy(run):
    wd, res = run
    seed_dir = wd / "seed_0"
    assert runs.finished_rounds(seed_dir) == [1, 2]
    small, v, rec = runs.load_round(seed_dir, 1, _model(), INPUT)
    assert rec["widths"] == res["rounds"][1]["widths"] == {"dense_0": 9, "dense_1": 6}  # 12 − 3, 8 − 2
    assert structured.widths(small, v) == rec["widths"]
    assert rec["seed"] == 0 and len(rec["checkpoint_sha256"]) == 64
    assert common.accuracy(small, v, *_test_data()) == rec["accuracy_after_finetune"]
    assert rec["accuracy_after_finetune"] == res["rounds"][1]["accuracy_after_finetune"]


def test_the_trained_network_read_back_scores_round_zero(run):
    wd, res = run
    template = models.init(_model(), jax.random.PRNGKey(0), INPUT)
    v, rec = runs.load_trained(wd / "seed_0" / "trained", template, seed=0)
    assert rec["seed"] == 0 and rec["steps"] == 3
    assert common.accuracy(_model(), v, *_test_data()) == res["rounds"][0]["accuracy"]
    with pytest.raises(checkpoint.RecordError, match=r"trained\.json: records seed=0 where seed=1 belongs"):
        runs.load_trained(wd / "seed_0" / "trained", template, seed=1)


def test_a_tampered_round_checkpoint_is_refused_naming_it(run, tmp_path):
    seed_dir = tmp_path / "seed_0"
    shutil.copytree(run[0] / "seed_0", seed_dir)
    model, v, _ = runs.load_round(seed_dir, 2, _model(), INPUT)
    _tamper(seed_dir / "round_2" / "checkpoint", v)
    ckpt = re.escape(str((seed_dir / "round_2" / "checkpoint").absolute()))
    with pytest.raises(ValueError, match=rf"^checkpoint {ckpt}: its contents do not match the sha256 .*; delete "):
        runs.load_round(seed_dir, 2, _model(), INPUT)
    runs.load_round(seed_dir, 1, _model(), INPUT)  # the other round is untouched


def test_a_tampered_trained_checkpoint_is_refused_naming_it(run, tmp_path):
    folder = tmp_path / "trained"
    shutil.copytree(run[0] / "seed_0" / "trained", folder)
    template = models.init(_model(), jax.random.PRNGKey(0), INPUT)
    _tamper(folder / "checkpoint", template)
    ckpt = re.escape(str((folder / "checkpoint").absolute()))
    with pytest.raises(ValueError, match=rf"^checkpoint {ckpt}: its contents do not match the sha256 .*; delete "
                                         rf"{re.escape(str(folder))} to train it again"):
        runs.load_trained(folder, template)


def test_missing_moved_and_unfinished_rounds_are_named(run, tmp_path):
    moved = tmp_path / "seed_3"  # seed 0's rounds under another seed's name
    shutil.copytree(run[0] / "seed_0", moved)
    with pytest.raises(checkpoint.RecordError, match=r"round_1/round\.json: records seed=0 where seed=3 belongs"):
        runs.load_round(moved, 1, _model(), INPUT)
    (moved / "round_2" / "round.json").unlink()  # an interrupted round: no marker
    assert runs.finished_rounds(moved) == [1]
    with pytest.raises(FileNotFoundError, match=r"^round=2: .*round_2/round\.json does not exist \(finished rounds "
                                                r"of .*seed_3: \[1\]\)"):
        runs.load_round(moved, 2, _model(), INPUT)
    with pytest.raises(ValueError, match=r"^seed_dir=.*elsewhere: expected a seed_<s> folder"):
        runs.load_round(tmp_path / "elsewhere", 1, _model(), INPUT)


def test_merge_reads_a_merge_seed_folder_through_the_library(tmp_path):
    """``--source_workdir`` = a merge seed folder: the network read back (:func:`jaxprune.runs.load_trained`) gives
    the same evaluation as the run that trained it; a tampered checkpoint there is refused, naming it."""
    cfg = dict(dataset="digits", model="mlp", hidden=["8"], optimizer="momentum", lr=0.05, training_steps="3",
               batch_size=32, max_test_examples=100, sparsity=["0.5"], criteria=["l2"], seeds=["0"])
    first = merge.run(cfg, tmp_path / "a")
    again = merge.run({**cfg, "source_workdir": str(tmp_path / "a" / "seed_{seed}")}, tmp_path / "b")
    assert again["summary"] == first["summary"]
    model = common.build_model(merge._config(cfg), 10)
    _tamper(tmp_path / "a" / "seed_0" / "checkpoint", models.init(model, jax.random.PRNGKey(0), INPUT))
    ckpt = re.escape(str((tmp_path / "a" / "seed_0" / "checkpoint").absolute()))
    with pytest.raises(ValueError, match=rf"^checkpoint {ckpt}: its contents do not match .*; retrain it"):
        merge.run({**cfg, "source_workdir": str(tmp_path / "a" / "seed_{seed}")}, tmp_path / "c")
