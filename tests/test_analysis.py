"""jaxprune.analysis (interpolation, barrier, mask overlap and its random baseline, similarity to dense) and the
``--analyses`` of experiments.imp (analysis.json: values, resumption, settings checks, flag errors)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from experiments import imp as imp_exp
from jaxprune import analysis, checkpoint, data, imp, masks, models, runs, train

SMALL = dict(dataset="digits", model="mlp", hidden=["24"], optimizer="momentum", lr=0.05, schedule="step",
             milestones=["30"], training_steps="40", batch_size=64, prune_fraction=0.5, seeds=["3"])
ALL = ["similarity", "overlap", "instability"]


# ----------------------------------------------------------------------------------------------- interpolation
@pytest.fixture(scope="module")
def two_nets():
    """Two MLPs trained on digits from one init with different data orders, and the test set."""
    tr, te = data.load("digits", "train"), data.load("digits", "test")
    model = models.build("mlp", 10, hidden=(32,))
    tx = optax.sgd(0.05, momentum=0.9)
    trainer = train.make_trainer(model, tx)
    x, y, xt, yt = train.to_device(tr.images, tr.labels, te.images, te.labels)
    start = train.create_state(models.init(model, jax.random.PRNGKey(0), x.shape), tx)
    nets = [train.variables_of(train.run(trainer, start, x, y, batch_size=32, num_steps=60,
                                         data_key=jax.random.PRNGKey(s)).state) for s in (1, 2)]
    return model, trainer, nets, xt, yt


def test_interpolation_end_points_are_the_two_networks_own_accuracies(two_nets):
    model, trainer, (a, b), xt, yt = two_nets
    batches = analysis.make_batches(xt, yt, 100)  # 360 examples: the last batch is padded and weighted out
    assert batches[0].shape[:2] == (4, 100) and float(batches[2].sum()) == 360
    curve = analysis.interpolation_curve(models.apply_fn(model), a, b, batches, 7)
    np.testing.assert_allclose(curve.alphas, np.linspace(0, 1, 7), atol=1e-7)
    assert float(curve.alphas[0]) == 0.0 and float(curve.alphas[-1]) == 1.0
    for net, acc in ((a, curve.accuracy[0]), (b, curve.accuracy[-1])):
        own = np.mean(np.argmax(np.asarray(model.apply(net, xt, train=False)), -1) == np.asarray(yt))
        assert float(acc) == pytest.approx(own, abs=1e-7)
        assert float(acc) == pytest.approx(train.evaluate(trainer, net, xt, yt)["accuracy"], abs=1e-7)
    np.testing.assert_allclose(curve.error, 1 - curve.accuracy)
    own_loss = train.evaluate(trainer, a, xt, yt)["loss"]
    assert float(curve.loss[0]) == pytest.approx(own_loss, rel=1e-5)
    # the barrier: the largest error on the path above the mean of the end points
    e = np.asarray(curve.error, np.float64)
    assert float(analysis.barrier(curve)) == pytest.approx(e.max() - (e[0] + e[-1]) / 2, abs=1e-7)
    assert float(analysis.barrier(curve)) >= 0


def test_interpolated_weights_are_exact_at_the_ends_and_linear_between():
    a = {"w": jnp.asarray([1.0, -2.0]), "step": jnp.asarray(3)}
    b = {"w": jnp.asarray([3.0, 4.0]), "step": jnp.asarray(9)}
    np.testing.assert_array_equal(analysis.interpolate(a, b, 0.0)["w"], a["w"])
    np.testing.assert_array_equal(analysis.interpolate(a, b, 1.0)["w"], b["w"])
    np.testing.assert_allclose(analysis.interpolate(a, b, 0.25)["w"], [1.5, -0.5])
    assert int(analysis.interpolate(a, b, 0.5)["step"]) == 3  # non-float leaves come from a
    with pytest.raises(ValueError, match=r"params_b: has no leaf 'step'"):
        analysis.interpolate(a, {"w": b["w"]}, 0.5)
    with pytest.raises(ValueError, match=r"params_b: leaf 'w' has shape \(1,\); expected \(2,\)"):  # no broadcast
        analysis.interpolate(a, {"w": jnp.asarray([3.0]), "step": b["step"]}, 0.5)


def test_the_barrier_of_a_network_with_itself_is_zero(two_nets):
    model, _, (a, _), xt, yt = two_nets
    curve = analysis.interpolation_curve(models.apply_fn(model), a, a, analysis.make_batches(xt, yt), 5)
    assert float(analysis.barrier(curve)) == 0.0 and float(analysis.barrier(curve, metric="loss")) == 0.0
    assert len(set(np.asarray(curve.accuracy).tolist())) == 1


def test_barrier_values_and_errors():
    assert float(analysis.barrier(jnp.asarray([0.1, 0.3, 0.2]))) == pytest.approx(0.15)
    assert float(analysis.barrier([0.2, 0.1, 0.2])) == pytest.approx(0.0)  # a valley is no barrier
    with pytest.raises(ValueError, match=r"curve: expected values along the path"):
        analysis.barrier([0.1])
    with pytest.raises(ValueError, match=r"metric='accuracy'"):
        analysis.barrier(analysis.InterpolationCurve(*(jnp.zeros(3),) * 4), metric="accuracy")
    with pytest.raises(ValueError, match=r"metric='loss2'"):  # raw values too: a typo is not read as "error"
        analysis.barrier([0.1, 0.2], metric="loss2")
    with pytest.raises(ValueError, match=r"curve: the error along the path holds NaN"):  # not a NaN barrier
        analysis.barrier([0.1, float("nan"), 0.2])
    assert np.isnan(float(jax.jit(analysis.barrier)(jnp.asarray([0.1, jnp.nan, 0.2]))))  # traced: NaN, not a number


def test_curve_is_jittable_and_recalibration_path_agrees(two_nets):
    model, _, (a, b), xt, yt = two_nets
    batches = analysis.make_batches(xt, yt, 120)
    f = models.apply_fn(model)
    direct = analysis.interpolation_curve(f, a, b, batches, 4)
    jitted = jax.jit(lambda p, q: analysis.barrier(analysis.interpolation_curve(f, p, q, batches, 4)))(a, b)
    assert float(jitted) == pytest.approx(float(analysis.barrier(direct)), abs=1e-7)
    looped = analysis.interpolation_curve(f, a, b, batches, 4, recalibrate=lambda v: v)
    np.testing.assert_allclose(looped.accuracy, direct.accuracy, atol=1e-7)
    np.testing.assert_allclose(looped.loss, direct.loss, rtol=1e-5)


def test_interpolation_input_errors_name_the_argument(two_nets):
    model, _, (a, b), xt, yt = two_nets
    f = models.apply_fn(model)
    batches = analysis.make_batches(xt, yt)
    with pytest.raises(ValueError, match=r"n_points=1: expected an integer >= 2"):
        analysis.interpolation_curve(f, a, b, batches, 1)
    with pytest.raises(ValueError, match=r"batches: expected x \(m, b, …\)"):
        analysis.interpolation_curve(f, a, b, (xt, yt), 3)
    bad = jax.tree_util.tree_map(lambda v: v[..., :1] if v.ndim == 2 else v, b)
    with pytest.raises(ValueError, match=r"params_b: leaf 'params/dense_0/kernel' has shape"):
        analysis.interpolation_curve(f, a, bad, batches, 3)


# ----------------------------------------------------------------------------------------------- overlap
def _masks(key, shapes, density):
    ks = jax.random.split(key, len(shapes))
    return {f"l{i}": {"kernel": jax.random.uniform(k, s) < density, "bias": jnp.ones(s[-1:], bool)}
            for i, (k, s) in enumerate(zip(ks, shapes))}


def test_overlap_of_a_mask_with_itself_is_one_and_with_its_complement_zero():
    m = _masks(jax.random.PRNGKey(0), [(20, 10), (10, 5)], 0.4)
    prunable = jax.tree_util.tree_map_with_path(lambda p, _: masks.path_str(p).endswith("kernel"), m)
    same = analysis.overlap(m, m, prunable)
    assert set(same["layers"]) == {"l0/kernel", "l1/kernel"}
    for rec in [*same["layers"].values(), same["overall"]]:
        assert float(rec["jaccard"]) == 1.0 and float(rec["kept_fraction"]) == 1.0
        assert int(rec["intersection"]) == int(rec["union"]) == int(rec["kept_a"])
    comp = jax.tree_util.tree_map(jnp.logical_not, m)
    other = analysis.overlap(m, comp, prunable)
    for rec in [*other["layers"].values(), other["overall"]]:
        assert float(rec["jaccard"]) == 0.0 and float(rec["kept_fraction"]) == 0.0
        assert int(rec["union"]) == int(rec["size"])
    assert int(other["overall"]["size"]) == 20 * 10 + 10 * 5
    # prunable=None counts every leaf (the all-True biases too)
    assert int(analysis.overlap(m, m)["overall"]["size"]) == 250 + 15


def test_overlap_counts_and_kept_fraction_on_a_small_example():
    a = {"k": jnp.asarray([[1, 1, 1, 0]], bool)}
    b = {"k": jnp.asarray([[1, 0, 0, 1]], bool)}
    rec = analysis.overlap(a, b)["overall"]
    assert (int(rec["intersection"]), int(rec["union"]), int(rec["kept_a"]), int(rec["kept_b"])) == (1, 4, 3, 2)
    assert float(rec["jaccard"]) == pytest.approx(0.25) and float(rec["kept_fraction"]) == pytest.approx(1 / 3)
    empty = {"k": jnp.zeros((1, 4), bool)}
    e = analysis.overlap(empty, empty)["overall"]
    assert float(e["jaccard"]) == 1.0 and float(e["kept_fraction"]) == 1.0  # the empty sets are equal
    jitted = jax.jit(analysis.overlap)(a, b)
    assert float(jitted["overall"]["jaccard"]) == pytest.approx(0.25)


def test_overlap_errors_name_the_argument():
    a = {"k": jnp.ones((2, 2), bool)}
    with pytest.raises(ValueError, match=r"mask_a: leaf 'k' has dtype float32"):
        analysis.overlap({"k": jnp.ones((2, 2))}, a)
    with pytest.raises(ValueError, match=r"mask: leaf 'k' has shape \(2, 3\)"):
        analysis.overlap(a, {"k": jnp.ones((2, 3), bool)})
    with pytest.raises(ValueError, match=r"kept_b=5: a nested mask"):
        analysis.expected_random_overlap(10, 3, 5, nested=True)
    with pytest.raises(ValueError, match=r"kept_a=11: expected 0 <= kept_a <= size \(10\)"):
        analysis.expected_random_overlap(10, 11, 5)


@pytest.mark.parametrize("n,a,b", [(50, 20, 10), (400, 120, 300), (1000, 50, 40)])
def test_expected_random_overlap_matches_monte_carlo(n, a, b):
    """Masks of exactly a and b kept weights at uniformly random positions; 4 standard errors of T draws."""
    rng = np.random.default_rng(0)
    t = 4000
    inter = np.empty(t)
    jac = np.empty(t)
    for i in range(t):
        ma = np.zeros(n, bool)
        ma[rng.choice(n, a, replace=False)] = True
        mb = np.zeros(n, bool)
        mb[rng.choice(n, b, replace=False)] = True
        inter[i] = np.sum(ma & mb)
        jac[i] = inter[i] / np.sum(ma | mb)
    exp = analysis.expected_random_overlap(n, a, b)
    assert exp["intersection"] == pytest.approx(n * (a / n) * (b / n))  # E|A∩B| = n p q
    assert abs(inter.mean() - exp["intersection"]) < 4 * exp["intersection_std"] / math.sqrt(t)
    assert inter.std(ddof=1) == pytest.approx(exp["intersection_std"], rel=0.1)
    assert abs(jac.mean() - exp["jaccard"]) < 4 * jac.std(ddof=1) / math.sqrt(t)
    assert exp["kept_fraction"] == pytest.approx(b / n)


def test_bernoulli_masks_overlap_n_p_q():
    """Independent Bernoulli masks of densities p, q: E|A∩B| = n p q, binomial std sqrt(n pq (1 - pq))."""
    n, p, q, t = 2000, 0.3, 0.6, 2000
    rng = np.random.default_rng(1)
    inter = np.sum((rng.random((t, n)) < p) & (rng.random((t, n)) < q), axis=1)
    exp = analysis.expected_random_overlap(n, p * n, q * n)
    std = math.sqrt(n * p * q * (1 - p * q))
    assert exp["intersection"] == pytest.approx(n * p * q)
    assert abs(inter.mean() - n * p * q) < 4 * std / math.sqrt(t)


def test_random_overlap_like_matches_random_masks_with_the_same_layer_counts():
    key = jax.random.PRNGKey(3)
    ma = _masks(key, [(30, 20), (20, 8)], 0.5)
    mb = _masks(jax.random.fold_in(key, 1), [(30, 20), (20, 8)], 0.2)
    prunable = jax.tree_util.tree_map_with_path(lambda p, _: masks.path_str(p).endswith("kernel"), ma)
    exp = analysis.random_overlap_like(ma, mb, prunable)
    t = 600
    obs = [analysis.overlap(masks.random_like(jax.random.PRNGKey(2 * i), ma, prunable),
                            masks.random_like(jax.random.PRNGKey(2 * i + 1), mb, prunable), prunable)["overall"]
           for i in range(t)]
    inter = np.asarray([float(o["intersection"]) for o in obs])
    jac = np.asarray([float(o["jaccard"]) for o in obs])
    assert abs(inter.mean() - exp["overall"]["intersection"]) < 4 * exp["overall"]["intersection_std"] / math.sqrt(t)
    assert abs(jac.mean() - exp["overall"]["jaccard"]) < 4 * jac.std(ddof=1) / math.sqrt(t)
    for name, rec in exp["layers"].items():
        layer = name.split("/")[0]
        n, ka = ma[layer]["kernel"].size, int(ma[layer]["kernel"].sum())
        assert rec == analysis.expected_random_overlap(n, ka, int(mb[layer]["kernel"].sum()))
    # nested: a random subset of A's survivors keeps b/a of them, always
    sub = {k: {"kernel": ma[k]["kernel"] & mb[k]["kernel"], "bias": ma[k]["bias"]} for k in ma}
    nest = analysis.random_overlap_like(ma, sub, prunable, nested=True)
    ka, kb = (sum(int(t[k]["kernel"].sum()) for k in t) for t in (ma, sub))
    assert nest["overall"]["jaccard"] == pytest.approx(kb / ka) and nest["overall"]["intersection_std"] == 0
    o = analysis.overlap(ma, sub, prunable)["overall"]
    assert float(o["kept_fraction"]) == pytest.approx(nest["overall"]["kept_fraction"])  # nested is exact


# ----------------------------------------------------------------------------------------------- similarity
@pytest.mark.slow
def test_similarity_of_the_dense_network_with_itself_is_one_for_every_metric(two_nets):
    model, _, (a, _), xt, _ = two_nets
    reps = models.representations(model, a, xt[:200])
    vals = analysis.similarity_to_dense(reps, reps, list(analysis.SIMILARITY_METRICS))
    assert set(vals) == set(analysis.SIMILARITY_METRICS)
    for metric, per_layer in vals.items():
        assert list(per_layer) == ["dense_0", "logits"]
        for layer, v in per_layer.items():
            if metric == "pwcca_svcca" and layer == "dense_0":
                # google/svcca's recipe weights directions outside the span of the dead ReLUs' constant units too,
                # so it stays below 1 for a layer with dead units (0.984 with 5 of 32 units constant), by design
                assert 0.9 < v <= 1.0 + 1e-6
                continue
            assert v == pytest.approx(1.0, abs=2e-4), (metric, layer)


def test_similarity_of_two_networks_agrees_with_the_single_pair_functions(two_nets):
    from jaxprune import similarity as S

    model, _, (a, b), xt, _ = two_nets
    ra, rb = models.representations(model, a, xt[:200]), models.representations(model, b, xt[:200])
    vals = analysis.similarity_to_dense(rb, ra, ["linear_cka", "pwcca"], layers=["dense_0"])
    assert vals["linear_cka"]["dense_0"] == pytest.approx(float(S.linear_cka(rb["dense_0"], ra["dense_0"])), abs=1e-5)
    assert vals["pwcca"]["dense_0"] == pytest.approx(float(S.pwcca(rb["dense_0"], ra["dense_0"])), abs=1e-5)
    assert 0.3 < vals["linear_cka"]["dense_0"] < 1.0
    with pytest.raises(ValueError, match=r"metrics: 'cka' is not a similarity"):
        analysis.similarity_to_dense(rb, ra, ["cka"])
    with pytest.raises(ValueError, match=r"reps: no layer\(s\) \['conv_0'\]"):
        analysis.similarity_to_dense(rb, ra, layers=["conv_0"])


# ----------------------------------------------------------------------------------------------- experiments.imp
def _run(path, **kw):
    return imp_exp.train_and_evaluate({**SMALL, **kw}, path)


def _read(path):
    return checkpoint.read_record(path / "analysis.json")  # verified; the record without its checksum


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    wd = tmp_path_factory.mktemp("analysis") / "run"
    res = _run(wd, levels=2, analyses=ALL, instability_points=5)
    return res, wd, _read(wd)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_analysis_json_holds_one_record_per_level_with_stable_keys(analysed):
    res, wd, doc = analysed
    assert doc["format"] == 1 and [lv["level"] for lv in doc["levels"]] == [0, 1, 2]
    for lv, rec in zip(doc["levels"], res["levels"]):
        assert list(lv) == ["level", "density", "similarity", "overlap", "instability"]
        assert lv["density"] == rec["density"]
        for name in ALL:
            assert lv[name]["settings"] == json.loads(json.dumps(imp_exp.analysis_settings(
                {**imp_exp.DEFAULTS, **SMALL, "analyses": ALL, "instability_points": 5}, imp_exp.build(SMALL))[name]))
    assert doc["levels"][0]["similarity"]["settings"]["examples"] == 360  # digits' test set is smaller than 1000
    assert doc["levels"][2]["instability"]["checkpoints"] == {
        f"level_{j}": res["levels"][j]["checkpoint_sha256"] for j in (1, 2)}
    config = json.loads((wd / "config.json").read_text())
    assert not set(imp_exp.ANALYSIS_FLAGS) & set(config)  # analyses are not IMP settings
    for name in ("analysis_similarity_linear_cka.png", "analysis_similarity_pwcca.png", "analysis_similarity_nbs.png",
                 "analysis_instability_barrier.png", "analysis_instability_paths.png",
                 "analysis_overlap_previous.png"):
        assert (wd / name).stat().st_size > 1000, name
    timing = json.loads((wd / "analysis_timing.json").read_text())["levels"]
    assert all(t[f"{n}_seconds"] > 0 for t in timing for n in ALL)


def test_level_zero_is_identical_to_itself_and_pruned_levels_drift(analysed):
    _, _, doc = analysed
    lv0 = doc["levels"][0]["similarity"]["metrics"]
    assert set(lv0) == {"linear_cka", "pwcca", "nbs"}
    for metric, per_layer in lv0.items():
        assert list(per_layer) == ["dense_0", "logits"]
        assert all(v == pytest.approx(1.0, abs=2e-4) for v in per_layer.values()), metric
    cka2 = doc["levels"][2]["similarity"]["metrics"]["linear_cka"]
    assert all(0.0 < v < 0.9999 for v in cka2.values())


def test_instability_end_points_are_the_level_and_its_copy(analysed):
    res, wd, doc = analysed
    for lv, rec in zip(doc["levels"], res["levels"]):
        ins = lv["instability"]
        assert ins["alphas"] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
        assert ins["accuracy_a"] == pytest.approx(rec["test_accuracy"], abs=1e-6)  # α = 0: the level's network
        assert ins["error"][0] == pytest.approx(1 - rec["test_accuracy"], abs=1e-6)
        assert ins["accuracy_b"] == pytest.approx(1 - ins["error"][-1], abs=1e-7)
        e = ins["error"]
        assert ins["barrier"] == pytest.approx(max(e) - (e[0] + e[-1]) / 2, abs=1e-7) and ins["barrier"] >= 0
    # the copy really is another network (another data order)
    b = imp_exp.build(SMALL)
    copy = runs.Analyzer(b.task, b.imp, wd, {}).train_copy(1)
    level = imp.load_level(wd, 1, b.task)["state"]
    assert not np.array_equal(copy.state.params["dense_0"]["kernel"], level.params["dense_0"]["kernel"])


def test_overlap_with_the_previous_level_is_nested(analysed):
    res, _, doc = analysed
    assert doc["levels"][0]["overlap"] == {**doc["levels"][0]["overlap"], "previous": None, "between_replicas": None}
    for k in (1, 2):
        prev = doc["levels"][k]["overlap"]["previous"]
        obs = prev["observed"]["overall"]
        kept = [res["levels"][j]["kept_weights"] for j in (k - 1, k)]
        assert (obs["kept_a"], obs["kept_b"], obs["intersection"]) == (kept[0], kept[1], kept[1])
        assert obs["kept_fraction"] == pytest.approx(kept[1] / kept[0]) == pytest.approx(obs["jaccard"])
        assert prev["random_nested"]["overall"]["jaccard"] == pytest.approx(obs["jaccard"], abs=1e-7)
        assert prev["random"]["overall"]["kept_fraction"] == pytest.approx(kept[1] / 1536)  # independent: q


@pytest.mark.parametrize("rewind,extra", [("init", {}), ("step", {"rewind_step": "10"}), ("lr", {}),
                                          ("finetune", {"schedule": "constant", "milestones": []}),
                                          ("lr", {"seeds": ["3", "4"]}), ("step", {"rewind_step": "10",
                                                                                 "seeds": ["3", "4"]})])
@pytest.mark.slow
def test_the_copy_trained_with_the_levels_own_data_order_is_the_level(tmp_path, rewind, extra):
    """The instability copy starts where the level started: with the level's data key it retrains it exactly."""
    cfg = {**SMALL, "rewind": rewind, **extra}
    wd = tmp_path / rewind
    _run(wd, levels=1, **extra, rewind=rewind)
    b = imp_exp.build(cfg)
    an = runs.Analyzer(b.task, b.imp, wd, {})
    k = b.task.num_replicas
    keys = [imp._Keys(b.task.seed + r).data for r in range(k)]
    for level in (0, 1):
        copy = an.train_copy(level, data_key=keys[0] if k == 1 else jax.numpy.stack(keys))
        saved = imp.load_level(wd, level, b.task)["state"]
        np.testing.assert_array_equal(copy.state.step, saved.step)
        for u, v in zip(jax.tree_util.tree_leaves(copy.state.params), jax.tree_util.tree_leaves(saved.params)):
            np.testing.assert_array_equal(u, v)


@pytest.mark.slow
def test_a_killed_and_resumed_run_reproduces_analysis_json_exactly(tmp_path):
    kw = dict(analyses=ALL, seeds=["3:5"], instability_points=4, analysis_metrics=["linear_cka", "nbs"])
    full = tmp_path / "full"
    _run(full, levels=2, **kw)
    part = tmp_path / "part"
    _run(part, levels=1, **kw)  # "killed" after level 1 (and its analyses)
    t1 = json.loads((part / "analysis_timing.json").read_text())["levels"]
    _run(part, levels=2, **kw)
    assert (part / "analysis.json").read_bytes() == (full / "analysis.json").read_bytes()
    t2 = json.loads((part / "analysis_timing.json").read_text())["levels"]
    assert t2[:2] == t1  # levels 0 and 1 were not analysed again
    doc = _read(full)
    rep = doc["levels"][2]["overlap"]["between_replicas"]
    assert rep["pairs"] == [[0, 1]] and len(rep["per_pair"]) == 1
    obs, rnd = rep["observed"]["overall"], rep["random"]["overall"]
    assert 0 < obs["jaccard"] < 1 and rnd["jaccard"] == pytest.approx(0.25 ** 2 / (2 * 0.25 - 0.25 ** 2), rel=0.02)
    ins = doc["levels"][2]["instability"]
    assert len(ins["replicas"]) == 2 and ins["barrier"] == pytest.approx(np.mean([r["barrier"] for r in ins["replicas"]]))
    assert doc["levels"][0]["overlap"]["between_replicas"]["observed"]["overall"]["jaccard"] == 1.0
    sim = doc["levels"][1]["similarity"]
    assert len(sim["replicas"]) == 2 and sim["metrics"]["nbs"]["dense_0"] == pytest.approx(
        np.mean([r["nbs"]["dense_0"] for r in sim["replicas"]]))
    assert (full / "analysis_overlap_between_replicas.png").stat().st_size > 1000


def test_changed_settings_recompute_only_that_analysis(tmp_path, analysed):
    import shutil

    wd = tmp_path / "copy"
    shutil.copytree(analysed[1], wd)
    before = json.loads((wd / "analysis_timing.json").read_text())["levels"]
    res = _run(wd, levels=2, analyses=ALL, instability_points=3)  # finished IMP run: only analyses change
    assert res["finished"]
    doc = _read(wd)
    after = json.loads((wd / "analysis_timing.json").read_text())["levels"]
    for lv, old, new, prev in zip(doc["levels"], analysed[2]["levels"], after, before):
        assert len(lv["instability"]["alphas"]) == 3 and lv["instability"]["settings"]["points"] == 3
        assert lv["similarity"] == old["similarity"] and lv["overlap"] == old["overlap"]
        assert new["similarity_seconds"] == prev["similarity_seconds"]
        assert new["instability_seconds"] != prev["instability_seconds"]
    # a run without --analyses leaves analysis.json alone; asking for one analysis keeps the others' records
    _run(wd, levels=2)
    assert _read(wd) == doc
    _run(wd, levels=2, analyses=["overlap"])
    assert _read(wd) == doc


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_analyses_can_be_added_to_a_run_made_without_them(tmp_path):
    wd = tmp_path / "plain"
    _run(wd, levels=1)
    assert not (wd / "analysis.json").exists()
    doc = imp_exp.run_analyses(wd, ["overlap", "similarity"], analysis_examples=50)
    assert [lv["level"] for lv in doc["levels"]] == [0, 1]
    assert doc["levels"][1]["similarity"]["settings"]["examples"] == 50
    assert _read(wd) == doc


@pytest.mark.parametrize("bad,match", [
    (dict(analyses=["similarity", "stability"]), r"analyses=similarity,stability: expected a comma-separated subset"),
    (dict(analyses=["overlap", "overlap"]), r"analyses=overlap,overlap: .*each once"),
    (dict(analyses=["similarity"], analysis_examples=2), r"analysis_examples=2: expected an integer >= 4"),
    (dict(analyses=["similarity"], analysis_metrics=["cka"]), r"analysis_metrics=cka: expected a non-empty"),
    (dict(analyses=["instability"], instability_points=1), r"instability_points=1: expected an integer >= 2"),
])
def test_bad_analysis_settings_name_the_flag_and_leave_no_workdir(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        _run(tmp_path / "bad", levels=1, **bad)
    assert not (tmp_path / "bad").exists()


def test_cli_flag_error_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "experiments.imp", "--model=mlp", "--hidden=8", "--levels=1",
                        "--analyses=overlap,barrier", f"--workdir={tmp_path / 'x'}"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and not (tmp_path / "x").exists()
    assert p.stderr.strip().splitlines()[-1].startswith("error: analyses=overlap,barrier: expected a comma-separated")
