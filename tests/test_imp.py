"""jaxprune.imp: exact densities, zero pruned weights, each rewind mode's start point, branches, resumption."""
from __future__ import annotations

import json
import math
import shutil

import jax
import numpy as np
import optax
import pytest

from experiments import imp as imp_exp
from jaxprune import checkpoint, imp, masks, models, replicas, train

SMALL = dict(dataset="digits", model="mlp", hidden=["24"], optimizer="momentum", lr=0.05, schedule="step",
             milestones=["30"], training_steps="40", batch_size=64, prune_fraction=0.5, seeds=["3"])


def _run(tmp_path, name, **kw):
    cfg = {**SMALL, **kw}
    return imp_exp.train_and_evaluate(cfg, tmp_path / name), tmp_path / name


def _count(n_prunable, fraction, levels):
    r = n_prunable
    for _ in range(levels):
        r -= math.ceil(fraction * r - 1e-9)
    return r


def _opt_count(opt_state):
    return int(optax.tree_utils.tree_get(opt_state, "count"))


@pytest.fixture(scope="module")
def lottery(tmp_path_factory):
    res, wd = _run(tmp_path_factory.mktemp("imp"), "lottery", levels=2, rewind="init", branch="random_mask")
    b, variables, recs = imp_exp.load_levels(wd)
    return res, wd, b, variables, recs


def test_densities_are_exact_and_pruned_weights_stay_zero(lottery):
    res, wd, b, variables, _ = lottery
    n = 64 * 24  # dense_0 only: the output layer is excluded
    for k, r in enumerate(res["levels"]):
        assert r["kept_weights"] == _count(n, 0.5, k)
        assert abs(r["density"] - 0.5 ** k) <= 1 / n
        assert r["layer_densities"].keys() == {"dense_0/kernel"}
        assert 0 <= r["test_accuracy"] <= 1 and np.isfinite(r["train_loss"])
        tree = imp.load_level(wd, k, b.task)
        mask = np.asarray(tree["mask"]["dense_0"]["kernel"])
        kernel = np.asarray(variables[k]["params"]["dense_0"]["kernel"])
        assert mask.sum() == r["kept_weights"]
        assert (kernel[~mask] == 0).all() and (kernel[mask] != 0).all()
        assert np.asarray(tree["mask"]["dense_1"]["kernel"]).all()
        # the mask of level k is the magnitude-pruned mask of level k-1's trained weights
        if k:
            prev = imp.load_level(wd, k - 1, b.task)
            pr = masks.prunable_leaves(prev["state"].params, exclude=("^dense_1/",))
            expect = masks.magnitude_prune(prev["state"].params, prev["mask"], pr, 0.5)
            np.testing.assert_array_equal(expect["dense_0"]["kernel"], mask)
    assert res["finished"] and len(res["levels"]) == 3


def test_random_mask_branch_has_the_same_layer_densities(lottery):
    res = lottery[0]
    for r in res["levels"][1:]:
        br = r["branch"]
        assert br["name"] == "random_mask" and br["layer_densities"] == r["layer_densities"]
        assert br["kept_weights"] == r["kept_weights"]


def test_init_rewinding_restores_initial_weights(lottery):
    _, wd, b, variables, _ = lottery
    init = models.init(b.model, imp._Keys(b.task.seed).init, b.task.x_train.shape)["params"]
    tree = imp.load_level(wd, 2, b.task)
    for a, c in zip(jax.tree_util.tree_leaves(tree["rewind_point"].params), jax.tree_util.tree_leaves(init)):
        np.testing.assert_array_equal(a, c)
    setup = imp._Setup(b.task, imp._Keys(b.task.seed))
    prev = imp.load_level(wd, 1, b.task)
    start = imp._start_state(setup, b.imp, tree["mask"], prev["state"], tree["rewind_point"])
    m = np.asarray(tree["mask"]["dense_0"]["kernel"])
    np.testing.assert_array_equal(np.asarray(start.params["dense_0"]["kernel"]),
                                  np.where(m, np.asarray(init["dense_0"]["kernel"]), 0))
    assert int(start.step) == 0 and _opt_count(start.opt_state) == 0


def _start_of_level1(tmp_path, rewind, **kw):
    res, wd = _run(tmp_path, rewind, levels=1, rewind=rewind, **kw)
    b, _, _ = imp_exp.load_levels(wd)
    l0, l1 = imp.load_level(wd, 0, b.task), imp.load_level(wd, 1, b.task)
    setup = imp._Setup(b.task, imp._Keys(b.task.seed))
    start = imp._start_state(setup, b.imp, l1["mask"], l0["state"], l1["rewind_point"])
    return res, b, setup, l0, l1, start


def test_lr_rewinding_keeps_trained_weights_and_restarts_the_schedule(tmp_path):
    res, b, setup, l0, l1, start = _start_of_level1(tmp_path, "lr")
    m = np.asarray(l1["mask"]["dense_0"]["kernel"])
    np.testing.assert_array_equal(np.asarray(start.params["dense_0"]["kernel"]),
                                  np.where(m, np.asarray(l0["state"].params["dense_0"]["kernel"]), 0))
    assert int(start.step) == 0 and _opt_count(start.opt_state) == 0
    assert _opt_count(l0["state"].opt_state) == 40 and _opt_count(l1["state"].opt_state) == 40
    assert float(setup.schedule(0)) == pytest.approx(0.05) and float(setup.schedule(39)) == pytest.approx(0.005)
    assert res["levels"][1]["steps"] == 40


@pytest.fixture(scope="module")
def step_rewound(tmp_path_factory):
    return _start_of_level1(tmp_path_factory.mktemp("imp"), "step", rewind_step="10")


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def test_step_rewinding_restarts_from_step_k(step_rewound):
    res, b, setup, l0, l1, start = step_rewound
    assert int(start.step) == 10 and _opt_count(start.opt_state) == 10
    assert int(l1["rewind_point"].step) == 10
    assert res["levels"][1]["steps"] == 40
    # the weights too: recompute the dense run's state at step 10 (same init, same data order, 10 steps of the
    # library's train loop) and compare it with the stored rewind point and the masked start of level 1
    seed = b.task.seed
    init = models.init(b.model, imp._Keys(seed).init, b.task.x_train.shape)
    dense = train.run(train.make_trainer(b.model, setup.tx), train.create_state(init, setup.tx), b.task.x_train,
                      b.task.y_train, batch_size=b.task.batch_size, num_steps=10, data_key=imp._Keys(seed).data,
                      loop=b.task.loop).state
    assert int(dense.step) == 10
    m = _leaves(l1["mask"])
    w10, w0 = _leaves(dense.params), _leaves(init["params"])
    for got, want in zip(_leaves(l1["rewind_point"].params), w10):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for got, want, mk, w_init in zip(_leaves(start.params), w10, m, w0):
        np.testing.assert_allclose(got, np.where(mk, want, 0), rtol=1e-6, atol=1e-7)
        assert (got[mk] != w_init[mk]).mean() > 0.5  # not the init weights: 10 steps moved them
    # the momentum of step 10, zeroed where the mask prunes
    trace = lambda st: _leaves(optax.tree_utils.tree_get(st.opt_state, "trace"))
    for got, want, mk in zip(trace(start), trace(dense), m):
        np.testing.assert_allclose(got, np.where(mk, want, 0), rtol=1e-6, atol=1e-7)


def test_reinit_branch_under_step_rewinding_keeps_the_schedule_position(step_rewound):
    """The reinit control starts from fresh weights and zero moments but at step k of the schedule, as the main
    branch does (its optimizer count used to restart at 0 while the step counter said k)."""
    res, b, setup, l0, l1, start = step_rewound
    fresh = models.init(b.model, imp._Keys(b.task.seed).reinit(1), b.task.x_train.shape)
    rein = imp._start_state(setup, b.imp, l1["mask"], l0["state"], l1["rewind_point"], init_vars=fresh)
    assert int(rein.step) == int(start.step) == 10
    assert _opt_count(rein.opt_state) == _opt_count(start.opt_state) == 10
    assert float(setup.schedule(_opt_count(rein.opt_state))) == float(setup.schedule(_opt_count(start.opt_state)))
    m = np.asarray(l1["mask"]["dense_0"]["kernel"])
    np.testing.assert_array_equal(np.asarray(rein.params["dense_0"]["kernel"]),
                                  np.where(m, np.asarray(fresh["params"]["dense_0"]["kernel"]), 0))
    for leaf in jax.tree_util.tree_leaves(optax.tree_utils.tree_get(rein.opt_state, "trace")):
        assert not np.asarray(leaf).any()  # fresh (zero) momentum
    np.testing.assert_array_equal(rein.opt_state.mask["dense_0"]["kernel"], m)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_finetune_continues_at_the_final_learning_rate(tmp_path):
    res, b, setup, l0, l1, start = _start_of_level1(tmp_path, "finetune")
    m = np.asarray(l1["mask"]["dense_0"]["kernel"])
    np.testing.assert_array_equal(np.asarray(start.params["dense_0"]["kernel"]),
                                  np.where(m, np.asarray(l0["state"].params["dense_0"]["kernel"]), 0))
    # moments carried over from the dense run, zeroed where the mask prunes
    mu = optax.tree_utils.tree_get(start.opt_state, "trace")["dense_0"]["kernel"]
    assert (np.asarray(mu)[~m] == 0).all() and (np.asarray(mu)[m] != 0).any()
    # the fine-tuning optimizer on a known gradient: heavy-ball SGD at the schedule's final learning rate,
    # lr 0.05 x gamma 0.1 after the milestone at step 30 (closed form, not read back from the schedule)
    final_lr, beta = SMALL["lr"] * 0.1, 0.9
    assert b.task.optim.momentum == beta
    mleaves, mus = _leaves(start.opt_state.mask), _leaves(optax.tree_utils.tree_get(start.opt_state, "trace"))
    rng, treedef = np.random.default_rng(11), jax.tree_util.tree_structure(start.params)
    grads = [jax.tree_util.tree_unflatten(treedef, [rng.standard_normal(a.shape, np.float32) for a in mleaves])
             for _ in range(2)]

    def expect(lr, g, trace):  # updates -lr (g + beta trace) and the new trace, both zero where pruned
        new = [np.where(mk, gi + beta * t, 0) for mk, gi, t in zip(mleaves, _leaves(g), trace)]
        return [-lr * t for t in new], new

    for lr, tx in ((final_lr, setup.tx_finetune), (0.02, imp._Setup(b.task, None, 0.02).tx_finetune)):
        state, trace = start.opt_state, mus
        for g in grads:  # two steps: the rate stays constant and the trace carries over
            upd, state = tx.update(g, state, start.params)
            want, trace = expect(lr, g, trace)
            for got, w in zip(_leaves(upd), want):
                np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-8)
    assert setup.finetune_lr == pytest.approx(final_lr) and setup.trainer_for("finetune")[1] is setup.tx_finetune
    # and level 1 really trained at that rate: rerun it from its start with an optimizer written out by hand
    tx = masks.masked(optax.chain(optax.sgd(optax.constant_schedule(final_lr), momentum=beta)))
    again = train.run(train.make_trainer(b.model, tx), start, b.task.x_train, b.task.y_train,
                      batch_size=b.task.batch_size, num_steps=40, data_key=imp._Keys(b.task.seed).data,
                      loop=b.task.loop).state
    for got, want in zip(_leaves(l1["state"].params), _leaves(again.params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_reinit_branch_uses_fresh_weights(tmp_path, monkeypatch):  # with crop/flip augmentation, PyTorch's init
    starts = {}  # the start state of every training run, by log label (branches have no checkpoint of their own)
    real = imp._train_level

    def spy(setup, start, rewind, label, snapshot_step=None):
        starts[label] = replicas.index(start, 0)  # run's states are stacked (one replica here)
        return real(setup, start, rewind, label, snapshot_step)

    monkeypatch.setattr(imp, "_train_level", spy)
    res, wd = _run(tmp_path, "reinit", levels=1, branch="reinit", augment="crop_flip", weight_init="torch_default")
    br = res["levels"][1]["branch"]
    assert br["name"] == "reinit" and br["kept_weights"] == res["levels"][1]["kept_weights"]
    assert br["test_accuracy"] != res["levels"][1]["test_accuracy"]
    assert set(starts) == {"[level 0] ", "[level 1] ", "[level 1 reinit] "}
    b, _, _ = imp_exp.load_levels(wd)
    l1 = imp.load_level(wd, 1, b.task)
    mask = _leaves(l1["mask"])
    branch, main = starts["[level 1 reinit] "], starts["[level 1] "]
    # the level's own mask, installed in the optimizer and applied to the weights
    for got, mk in zip(_leaves(branch.opt_state.mask), mask):
        np.testing.assert_array_equal(got, mk)
    m0 = np.asarray(l1["mask"]["dense_0"]["kernel"])
    assert m0.mean() == pytest.approx(0.5, abs=1e-3)  # (pruned: the check above is not about all-ones masks)
    # fresh weights: models.init with _Keys' reinit stream, fold_in(third split of PRNGKey(seed), 2 * level)
    key = jax.random.fold_in(jax.random.split(jax.random.PRNGKey(b.task.seed), 3)[2], 2 * 1)
    np.testing.assert_array_equal(key, imp._Keys(b.task.seed).reinit(1))
    fresh = _leaves(models.init(b.model, key, b.task.x_train.shape)["params"])
    for got, want, mk, w_main in zip(_leaves(branch.params), fresh, mask, _leaves(main.params)):
        np.testing.assert_array_equal(got, np.where(mk, want, 0))
        assert (got[mk] != w_main[mk]).all()  # not the main branch's (rewound initial) weights
    assert int(branch.step) == 0 and _opt_count(branch.opt_state) == 0
    assert not any(a.any() for a in _leaves(optax.tree_utils.tree_get(branch.opt_state, "trace")))


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, lottery):
    full = lottery[0]
    wd = tmp_path / "lottery"
    imp_exp.train_and_evaluate({**SMALL, "levels": 1, "branch": "random_mask"}, wd)
    (wd / "level_2").mkdir()  # a level that crashed half-way: no level.json
    (wd / "level_2" / "junk").write_text("partial")
    resumed = imp_exp.train_and_evaluate({**SMALL, "levels": 2, "branch": "random_mask"}, wd)
    assert [r["kept_weights"] for r in resumed["levels"]] == [r["kept_weights"] for r in full["levels"]]
    for a, c in zip(resumed["levels"], full["levels"]):
        assert a["test_accuracy"] == pytest.approx(c["test_accuracy"], abs=1e-6)
        assert a["branch"]["test_accuracy"] == pytest.approx(c["branch"]["test_accuracy"], abs=1e-6) if "branch" in a else True
    b = imp_exp.load_levels(wd)[0]
    np.testing.assert_array_equal(imp.load_level(wd, 2, b.task)["mask"]["dense_0"]["kernel"],
                                  imp.load_level(lottery[1], 2, b.task)["mask"]["dense_0"]["kernel"])
    # a finished run is skipped: nothing is retrained or rewritten
    stamp = (wd / "level_2" / "level.json").stat().st_mtime_ns
    again = imp_exp.train_and_evaluate({**SMALL, "levels": 2, "branch": "random_mask"}, wd)
    assert (wd / "level_2" / "level.json").stat().st_mtime_ns == stamp
    assert [r["test_accuracy"] for r in again["levels"]] == [r["test_accuracy"] for r in resumed["levels"]]


def test_results_files(lottery):
    _, wd, *_ = lottery
    res = json.loads((wd / "results.json").read_text())
    assert res["config"]["model"] == "mlp" and res["config"]["rewind"] == "init"
    assert {"level", "density", "test_accuracy", "train_loss", "layer_densities"} <= set(res["levels"][0])
    lines = (wd / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("level,density,test_accuracy") and len(lines) == 4
    assert (wd / "accuracy_vs_density.png").stat().st_size > 1000
    assert (wd / "layer_densities.png").stat().st_size > 1000


def test_excluded_layers_stay_dense(tmp_path):
    res, wd = _run(tmp_path, "excl", model="mlp", hidden=["24", "16"], levels=1, prune_output=True,
                   exclude=["^dense_1/"])
    dens = res["levels"][1]["layer_densities"]
    assert set(dens) == {"dense_0/kernel", "dense_2/kernel"}  # dense_1 is not even prunable
    assert res["levels"][1]["prunable_weights"] == 64 * 24 + 16 * 10
    assert res["levels"][1]["kept_weights"] == _count(64 * 24 + 16 * 10, 0.5, 1)
    mask = imp.load_level(wd, 1, imp_exp.build({**SMALL, "hidden": ["24", "16"]}).task)["mask"]
    assert np.asarray(mask["dense_1"]["kernel"]).all()


def test_other_settings_in_an_existing_workdir_are_refused(tmp_path, lottery):
    _, wd, *_ = lottery
    with pytest.raises(ValueError, match=r"different settings \(lr: 0.05 -> 0.1\)"):
        imp_exp.train_and_evaluate({**SMALL, "levels": 2, "branch": "random_mask", "lr": 0.1}, wd)


def test_workdirs_written_before_later_flags_still_resume(tmp_path, lottery):
    """A config.json lacking settings added later (weight_init, augment, pool, exclude, finetune_lr; vgg_cfg, which
    imp took with common.TrainSettings in issue 30) resumes with their defaults; one written under the earlier flag
    names (seed, num_replicas) is read in the current ones."""
    _, wd, *_ = lottery
    old = tmp_path / "old"
    shutil.copytree(wd, old)
    cfg = json.loads((old / "config.json").read_text())
    for k in ("weight_init", "augment", "pool", "exclude", "finetune_lr", "vgg_cfg", checkpoint.RECORD_SHA):
        cfg.pop(k)  # (an earlier release wrote no record checksum either)
    assert cfg.pop("seeds") == [3]
    cfg["seed"] = 3  # the earlier release's spelling (num_replicas absent: its default 1)
    (old / "config.json").write_text(json.dumps(cfg))
    res = imp_exp.train_and_evaluate({**SMALL, "levels": 2, "branch": "random_mask"}, old)
    assert res["finished"] and len(res["levels"]) == 3
    with pytest.raises(ValueError, match=r"augment: 'none' -> 'flip'"):
        imp_exp.train_and_evaluate({**SMALL, "levels": 2, "branch": "random_mask", "augment": "flip"}, old)


@pytest.mark.parametrize("bad,match", [
    (dict(prune_fraction=1.0), r"fraction=1.0"),
    (dict(rewind="late"), r"rewind='late'"),
    (dict(batch_size=5000), r"batch_size=5000"),
    (dict(model="mlp2"), r"model='mlp2'"),
    (dict(training_steps="x"), r"training_steps: duration 'x'"),
    (dict(rewind="step", rewind_step="100"), r"rewind_step=100"),
    (dict(rewind="step", rewind_step="40"), r"rewind_step=40: expected a step before the end .*< 40"),
    (dict(rewind="step", rewind_step="abc"), r"rewind_step: duration 'abc'"),
    (dict(milestones=["5x"]), r"milestones: duration '5x'"),
    (dict(warmup="1.5"), r"warmup: duration '1.5'"),
    (dict(hidden=["a"]), r"hidden='a': expected comma-separated integers"),
    (dict(max_train_examples=-5), r"max_train_examples=-5: expected an integer >= 0"),
    (dict(max_test_examples=-1), r"max_test_examples=-1: expected an integer >= 0"),
    (dict(finetune_lr=0.01), r"finetune_lr=0.01: only used with rewind='finetune'"),
    (dict(rewind="finetune", finetune_lr=-1.0), r"finetune_lr=-1.0: expected a positive finite learning rate"),
    (dict(colour="red"), r"unknown keys \['colour'\]"),
    (dict(augment="rotate"), r"augment='rotate'"),
    (dict(weight_init="kaiming"), r"weight_init='kaiming'"),
    (dict(exclude=["(dense"]), r"exclude: '\(dense' is not a regular expression"),
    (dict(exclude=["dense_0"]), r"no leaf is prunable"),
    (dict(pool="avg"), r"pool='avg'.*only model=lenet5"),
])
def test_bad_settings_give_clear_errors(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        _run(tmp_path, "bad", **bad)
    assert not (tmp_path / "bad").exists()  # a refused run leaves no (empty) workdir behind


def test_finetuning_at_a_zero_learning_rate_is_refused_and_finetune_lr_is_used(tmp_path):
    """``cosine`` ends at 0: fine-tuning at its final rate moved no weight, yet wrote a level record."""
    cosine = dict(schedule="cosine", milestones=[], training_steps="20", levels=1, rewind="finetune")
    with pytest.raises(ValueError, match=r"--rewind=finetune .* --schedule=cosine, which is 0.0.*--finetune_lr"):
        _run(tmp_path, "ft0", **cosine)
    assert not (tmp_path / "ft0").exists()
    res, wd = _run(tmp_path, "ft", **cosine, finetune_lr=0.01)
    b = imp_exp.load_levels(wd)[0]
    assert b.imp.finetune_lr == 0.01 and imp._Setup(b.task, None, b.imp.finetune_lr).finetune_lr == 0.01
    l0, l1 = imp.load_level(wd, 0, b.task), imp.load_level(wd, 1, b.task)
    m = np.asarray(l1["mask"]["dense_0"]["kernel"])
    w0, w1 = (np.asarray(lv["state"].params["dense_0"]["kernel"]) for lv in (l0, l1))
    moved = np.abs(w1 - w0)[m] > 0  # (weights of the always-blank border pixels get no gradient)
    assert moved.mean() > 0.5 and (w1[~m] == 0).all()
    assert _opt_count(l1["state"].opt_state) == 40 and res["levels"][1]["steps"] == 20
    assert json.loads((wd / "config.json").read_text())["finetune_lr"] == 0.01
    with pytest.raises(ValueError, match=r"different settings \(finetune_lr: 0.01 -> 0.02\)"):
        _run(tmp_path, "ft", **cosine, finetune_lr=0.02)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_an_identical_config_with_tuples_resumes(tmp_path, lottery):
    wd = _copy(lottery[1], tmp_path / "copy")
    res = imp_exp.train_and_evaluate({**SMALL, "hidden": ("24",), "levels": 2, "branch": "random_mask"}, wd)
    assert res["finished"]
    assert [r["kept_weights"] for r in res["levels"]] == [r["kept_weights"] for r in lottery[0]["levels"]]
    checkpoint.check_run_config(tmp_path / "cfg", {"exclude": ("^a", "^b"), "lr": 0.1})
    checkpoint.check_run_config(tmp_path / "cfg", {"exclude": ("^a", "^b"), "lr": 0.1})  # not refused
    with pytest.raises(ValueError, match=r"exclude: \['\^a', '\^b'\] -> \['\^a'\]"):
        checkpoint.check_run_config(tmp_path / "cfg", {"exclude": ("^a",), "lr": 0.1})


def test_corrupt_level_files_are_named_with_what_to_do(tmp_path, lottery):
    b = lottery[2]
    wd = _copy(lottery[1], tmp_path / "copy")
    # (a) a truncated level.json
    text = (wd / "level_1" / "level.json").read_text()
    (wd / "level_1" / "level.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"level_1/level.json: not valid JSON.*delete \S*level_1 to train that"):
        imp_exp.train_and_evaluate({**SMALL, "levels": 2, "branch": "random_mask"}, wd)
    (wd / "level_1" / "level.json").write_text(text)
    # (b) flipped bytes in a checkpoint data file: the sha256 recorded in level.json no longer matches
    rec = json.loads(text)
    assert len(rec["checkpoint_sha256"]) == 64
    files = [f for f in (wd / "level_1" / "checkpoint").rglob("*") if f.is_file()]
    data = max(files, key=lambda f: f.stat().st_size)  # the array data
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"checkpoint .*level_1/checkpoint.*delete .*level_1 to train that level"):
        imp.load_level(wd, 1, b.task)
    # a level saved before checksums were recorded cannot be verified: refused (issue 28), never extended from
    old = _copy(lottery[1], tmp_path / "old")
    rec.pop("checkpoint_sha256")
    rec.pop(checkpoint.RECORD_SHA)
    (old / "level_1" / "level.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match=r"holds no checkpoint_sha256 .*cannot be verified; delete .*level_1 to"):
        imp.load_level(old, 1, b.task)


def test_lowering_levels_below_the_finished_ones_is_refused(tmp_path, lottery):
    wd = _copy(lottery[1], tmp_path / "copy")
    before = (wd / "results.json").read_bytes()
    with pytest.raises(ValueError, match=r"levels=1: .* already holds 3 finished levels .*not lowered below 2"):
        imp_exp.train_and_evaluate({**SMALL, "levels": 1, "branch": "random_mask"}, wd)
    assert (wd / "results.json").read_bytes() == before  # the finished levels stay in the results
    raised = imp_exp.train_and_evaluate({**SMALL, "levels": 2, "branch": "random_mask"}, wd)
    assert len(raised["levels"]) == 3 and raised["finished"]


@pytest.mark.slow
def test_lenet300_learns_real_mnist(tmp_path, data_dir):
    res = imp_exp.train_and_evaluate(dict(dataset="mnist", data_dir=str(data_dir), model="lenet300",
                                          max_train_examples=6000, max_test_examples=2000, training_steps="3ep",
                                          batch_size=64, levels=1, prune_fraction=0.8), tmp_path / "mnist")
    assert res["levels"][0]["test_accuracy"] > 0.87  # 3 epochs on 6k examples (full run: 97.8 %)
    assert res["levels"][1]["density"] == pytest.approx(0.2, abs=1e-5)
    assert res["levels"][1]["test_accuracy"] > 0.85
