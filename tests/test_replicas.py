"""jaxprune.replicas and --seeds=s:s+K (replicas): each replica of one vmapped program equals a separate run with its seed."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import imp as imp_exp
from jaxprune import data, imp, models, replicas, train

SMALL = dict(dataset="digits", model="mlp", hidden=["24"], optimizer="momentum", lr=0.05, schedule="step",
             milestones=["30"], training_steps="40", batch_size=64, prune_fraction=0.5, seeds=["3"], levels=2)


def _close(a, b, rtol=2e-5, atol=2e-6):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_stack_unstack_roundtrip():
    trees = [{"a": np.full((2, 3), r, np.float32), "b": (np.int32(r),)} for r in range(3)]
    s = replicas.stack(trees)
    assert s["a"].shape == (3, 2, 3) and s["b"][0].shape == (3,)
    for r, t in enumerate(replicas.unstack(s)):
        _close(t, trees[r])
        _close(replicas.index(s, r), trees[r])
    with pytest.raises(ValueError, match="at least one tree"):
        replicas.stack([])


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@pytest.mark.parametrize("layout,loop", [("vmap", "scan"), ("unrolled", "python")])
def test_replica_trainer_equals_separate_runs(layout, loop):
    d = data.load("digits", "train")
    x, y = train.to_device(d.images[:512], d.labels[:512])
    model = models.MLP((16, 10), dropout=0.2)  # dropout: each replica must use its own key stream
    cfg = train.OptimConfig("adam", 1e-2, schedule="cosine")
    tx = train.make_optimizer(cfg, train.make_schedule(cfg, 30))
    vs = [models.init(model, jax.random.PRNGKey(s), x.shape) for s in range(3)]
    keys = [jax.random.PRNGKey(10 + s) for s in range(3)]
    tr = train.make_trainer(model, tx)
    singles = [train.run(tr, train.create_state(v, tx), x, y, batch_size=32, num_steps=30, data_key=k, loop=loop)
               for v, k in zip(vs, keys)]
    rt = replicas.make_trainer(model, tx, 3, layout=layout)
    st = replicas.stack([train.create_state(v, tx) for v in vs])
    res = train.run(rt, st, x, y, batch_size=32, num_steps=30, data_key=replicas.stack(keys), loop=loop)
    assert res.state.params["dense_0"]["kernel"].shape == (3, 64, 16)
    ev = train.evaluate(rt, train.variables_of(res.state), x, y, batch_size=100)
    for r, single in enumerate(singles):
        _close(replicas.index(res.state, r), single.state)
        assert res.train_loss[r] == pytest.approx(single.train_loss, rel=1e-5)
        one = train.evaluate(tr, train.variables_of(single.state), x, y, batch_size=100)
        assert ev["accuracy"][r] == pytest.approx(one["accuracy"], abs=1e-9)
        assert ev["loss"][r] == pytest.approx(one["loss"], rel=1e-5)
    assert len({round(v, 6) for v in res.train_loss}) == 3  # the replicas really differ
    with pytest.raises(ValueError, match=r"data_key: expected \(3, 2\) keys"):
        train.run(rt, st, x, y, batch_size=32, num_steps=1, data_key=keys[0])


def test_bad_replica_settings():
    with pytest.raises(ValueError, match="num_replicas=0"):
        replicas.make_trainer(models.MLP((4, 2)), train.make_optimizer(train.OptimConfig(), 0.1), 0)
    with pytest.raises(ValueError, match="layout='loop'"):
        replicas.make_trainer(models.MLP((4, 2)), train.make_optimizer(train.OptimConfig(), 0.1), 2, layout="loop")


@pytest.fixture(scope="module")
def imp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    cfg = dict(SMALL, branch="random_mask")
    stacked = imp_exp.train_and_evaluate({**cfg, "seeds": ["3", "4"]}, root / "k2")
    singles = [imp_exp.train_and_evaluate({**cfg, "seeds": [s]}, root / f"seed{s}") for s in (3, 4)]
    return root, stacked, singles


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_imp_replicas_equal_separate_seeds(imp_runs):
    root, stacked, singles = imp_runs
    b, variables, _ = imp_exp.load_levels(root / "k2")
    assert variables[0]["params"]["dense_0"]["kernel"].shape == (2, 64, 24)
    for r, single in enumerate(singles):
        bs, vs, _ = imp_exp.load_levels(root / f"seed{3 + r}")
        _, picked, _ = imp_exp.load_levels(root / "k2", replica=r)
        for k in range(SMALL["levels"] + 1):
            mine = imp.load_level(root / "k2", k, b.task)
            theirs = imp.load_level(root / f"seed{3 + r}", k, bs.task)
            # masks (IMP's and the random-mask control's count) are exactly those of the separate run
            np.testing.assert_array_equal(replicas.index(mine["mask"], r)["dense_0"]["kernel"],
                                          theirs["mask"]["dense_0"]["kernel"])
            _close(picked[k], vs[k], rtol=1e-4, atol=1e-5)
            _close(replicas.index(mine["rewind_point"], r), theirs["rewind_point"], rtol=1e-4, atol=1e-5)
            rec, one = stacked["levels"][k]["replicas"][r], single["levels"][k]
            assert rec["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=1e-9)
            assert rec["kept_weights"] == one["kept_weights"]
            if k:
                assert rec.get("branch") is None  # branches summarised separately
                br = stacked["levels"][k]["branch"]["replicas"][r]
                assert br["test_accuracy"] == pytest.approx(one["branch"]["test_accuracy"], abs=1e-9)


def test_results_json_holds_mean_and_std(imp_runs):
    root, stacked, singles = imp_runs
    res = json.loads((root / "k2" / "results.json").read_text())
    assert res["config"]["seeds"] == [3, 4] and res["finished"]
    for k, lvl in enumerate(res["levels"]):
        accs = [s["levels"][k]["test_accuracy"] for s in singles]
        assert lvl["num_replicas"] == 2 and len(lvl["replicas"]) == 2
        assert lvl["test_accuracy"] == pytest.approx(np.mean(accs), abs=1e-9)
        assert lvl["test_accuracy_std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-9)
        assert lvl["kept_weights"] == singles[0]["levels"][k]["kept_weights"]
        assert all("history" not in r for r in lvl["replicas"])
        assert 0 <= lvl["test_accuracy"] <= 1


def test_replica_run_resumes(imp_runs, tmp_path):
    root, stacked, _ = imp_runs
    wd = tmp_path / "k2"
    cfg = dict(SMALL, branch="random_mask", seeds=["3:5"])
    imp_exp.train_and_evaluate({**cfg, "levels": 1}, wd)
    resumed = imp_exp.train_and_evaluate(cfg, wd)
    for a, c in zip(resumed["levels"], stacked["levels"]):
        assert [r["test_accuracy"] for r in a["replicas"]] == pytest.approx(
            [r["test_accuracy"] for r in c["replicas"]], abs=1e-6)
    with pytest.raises(ValueError, match=r"seeds: \[3, 4\] -> \[3, 4, 5\]"):
        imp_exp.train_and_evaluate({**cfg, "seeds": ["3:6"]}, wd)


# ------------------------------------------------------------------ the library's stacked form (K = 1 included)
def _tiny_task(k: int, seed: int = 5, layout: str = "unrolled") -> imp.Task:
    d = data.load("digits", "train")
    x, y, xt, yt = train.to_device(d.images[:192], d.labels[:192], d.images[192:320], d.labels[192:320])
    return imp.Task(models.MLP((12, 10)), x, y, xt, yt, optim=train.OptimConfig("momentum", 0.05), num_steps=12,
                    batch_size=32, seed=seed, num_replicas=k, replica_layout=layout)


TINY = imp.ImpConfig(levels=1, fraction=0.5, branch="random_mask")


def _run_tiny(task: imp.Task, cfg: imp.ImpConfig = TINY, workdir=None) -> tuple[list[dict], dict]:
    trees: dict = {}
    return imp.run(task, cfg, workdir, on_checkpoint=lambda k, t: trees.__setitem__(k, t)), trees


def _equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_one_replica_is_replica_0_of_two_and_records_as_a_single_run():
    """K = 1 and replica 0 of K = 2 (unrolled: the same step program) agree: masks and counts exactly, weights and
    metrics to float32 rounding (a per-replica metric is reduced over another shape; jax 0.10.2 rounds its last bit
    differently); the K = 1 record has a single run's keys, and its checkpoint a single run's shapes."""
    one, t1 = _run_tiny(_tiny_task(1))
    two, t2 = _run_tiny(_tiny_task(2))
    for level in range(TINY.levels + 1):
        a, r0 = one[level], two[level]["replicas"][0]
        assert not {"replicas", "num_replicas", "test_accuracy_std"} & set(a)
        assert (a["kept_weights"], a["layer_densities"]) == (r0["kept_weights"], r0["layer_densities"])
        for key in ("test_accuracy", "test_loss", "train_loss", "train_accuracy"):
            assert a[key] == pytest.approx(r0[key], rel=1e-6, abs=1e-7), key
        assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in r0["history"]],
                                                                        rel=1e-6)
        _close(t1[level]["state"], replicas.index(t2[level]["state"], 0), rtol=1e-6, atol=1e-7)
        _equal(t1[level]["mask"], replicas.index(t2[level]["mask"], 0))
        assert t1[level]["state"].params["dense_0"]["kernel"].shape == (64, 12)  # the single-run format on disk
        assert t2[level]["state"].params["dense_0"]["kernel"].shape == (2, 64, 12)
        assert np.shape(t1[level]["level"]) == () and np.shape(t1[level]["rng"]) == (2,)
    assert one[1]["branch"]["test_accuracy"] == pytest.approx(two[1]["branch"]["replicas"][0]["test_accuracy"],
                                                              abs=1e-7)
    assert two[1]["replicas"][0]["test_accuracy"] != two[1]["replicas"][1]["test_accuracy"]  # replicas differ


def test_a_workdir_in_the_single_run_checkpoint_format_resumes(tmp_path):
    """Level 0 written as a single run's checkpoint (unstacked leaves, ``level: ()``, ``rng: (2,)``, what every
    workdir before stacked replicas holds) resumes into the same later levels as an uninterrupted run."""
    task, cfg = _tiny_task(1), dataclasses.replace(TINY, levels=2)
    full, trees = _run_tiny(task, cfg)
    old = {"state": trees[0]["state"], "mask": trees[0]["mask"], "rewind_point": trees[0]["rewind_point"],
           "level": jnp.asarray(0, jnp.int32), "rng": jax.random.PRNGKey(task.seed)}
    assert old["state"].params["dense_0"]["kernel"].shape == (64, 12)
    imp._save_level(tmp_path / "level_0", old, full[0], task.seed)
    resumed, rtrees = _run_tiny(task, cfg, tmp_path)
    assert set(rtrees) == {1, 2}  # level 0 was read back, not retrained
    for a, b in zip(resumed, full):
        assert (a["test_accuracy"], a["train_loss"], a["kept_weights"]) == (b["test_accuracy"], b["train_loss"],
                                                                             b["kept_weights"])
    _equal(rtrees[2], trees[2])
    _equal(imp.load_level(tmp_path, 2, task), trees[2])
