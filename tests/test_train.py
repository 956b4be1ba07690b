"""jaxprune.train: schedules, deterministic data order, scan == loop, snapshots, resumption, evaluation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import data, models, train


def test_schedules():
    step = train.make_schedule(train.OptimConfig(lr=0.1, schedule="step", milestones=(10, 20), gamma=0.1), 30)
    np.testing.assert_allclose([step(0), step(9), step(10), step(19), step(20)], [0.1, 0.1, 0.01, 0.01, 0.001],
                               rtol=1e-6)
    cos = train.make_schedule(train.OptimConfig(lr=0.2, schedule="cosine"), 100)
    np.testing.assert_allclose([cos(0), cos(50), cos(100)], [0.2, 0.1, 0.0], atol=1e-7)
    warm = train.make_schedule(train.OptimConfig(lr=0.1, schedule="constant", warmup_steps=10), 100)
    np.testing.assert_allclose([warm(0), warm(5), warm(10), warm(50)], [0.0, 0.05, 0.1, 0.1], atol=1e-7)


def test_bad_optim_config():
    with pytest.raises(ValueError, match="optimizer='rmsprop'"):
        train.OptimConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr=0"):
        train.OptimConfig(lr=0.0)
    with pytest.raises(ValueError, match="duration 'ten'"):
        train.parse_duration("ten", 5)
    assert train.parse_duration("2ep", 7) == 14 and train.parse_duration("30it", 7) == 30


def test_epoch_order_is_a_deterministic_permutation():
    k = jax.random.PRNGKey(0)
    o = train.epoch_order(k, 3, 103, 10)
    assert o.shape == (10, 10) and len(set(np.asarray(o).ravel().tolist())) == 100
    np.testing.assert_array_equal(o, train.epoch_order(k, 3, 103, 10))
    assert not np.array_equal(o, train.epoch_order(k, 4, 103, 10))


@pytest.fixture(scope="module")
def digits_setup():
    d = data.load("digits", "train")
    te = data.load("digits", "test")
    model = models.MLP((32, 10))
    cfg = train.OptimConfig("momentum", 0.05, schedule="cosine")
    tx = train.make_optimizer(cfg, train.make_schedule(cfg, 90))
    v = models.init(model, jax.random.PRNGKey(0), d.images.shape)
    return model, tx, v, train.to_device(d.images, d.labels), train.to_device(te.images, te.labels)


def _run(setup, loop, num_steps=90, state=None, snapshot_step=None):
    model, tx, v, (x, y), _ = setup
    tr = train.make_trainer(model, tx)
    st = train.create_state(v, tx) if state is None else state
    return train.run(tr, st, x, y, batch_size=32, num_steps=num_steps, data_key=jax.random.PRNGKey(1), loop=loop,
                     snapshot_step=snapshot_step)


def test_training_learns_and_scan_equals_python_loop(digits_setup):
    a = _run(digits_setup, "scan")
    b = _run(digits_setup, "python")
    assert int(a.state.step) == 90
    for pa, pb in zip(jax.tree_util.tree_leaves(a.state.params), jax.tree_util.tree_leaves(b.state.params)):
        np.testing.assert_allclose(pa, pb, rtol=2e-5, atol=2e-6)
    model, tx, _, _, (xt, yt) = digits_setup
    ev = train.evaluate(train.make_trainer(model, tx), train.variables_of(a.state), xt, yt)
    assert ev["accuracy"] > 0.9  # 2 epochs of a small MLP on digits


def test_snapshot_and_resume_match_an_uninterrupted_run(digits_setup):
    full = _run(digits_setup, "scan", snapshot_step=57)  # mid-epoch (44 steps per epoch)
    assert int(full.snapshot.step) == 57
    part = _run(digits_setup, "scan", num_steps=57)
    for s, p in zip(jax.tree_util.tree_leaves(full.snapshot), jax.tree_util.tree_leaves(part.state)):
        np.testing.assert_allclose(s, p, rtol=1e-6, atol=1e-7)
    resumed = _run(digits_setup, "scan", state=part.state)
    for s, p in zip(jax.tree_util.tree_leaves(full.state), jax.tree_util.tree_leaves(resumed.state)):
        np.testing.assert_allclose(s, p, rtol=2e-5, atol=2e-6)


def test_evaluate_in_padded_chunks_equals_one_batch(digits_setup):
    model, tx, v, _, (xt, yt) = digits_setup
    tr = train.make_trainer(model, tx)
    a = train.evaluate(tr, v, xt, yt, batch_size=47)  # 360 = 7·47 + 31: last chunk padded
    b = train.evaluate(tr, v, xt, yt, batch_size=360)
    assert a["accuracy"] == b["accuracy"]
    assert abs(a["loss"] - b["loss"]) < 1e-5
    logits = model.apply(v, xt)
    assert abs(b["accuracy"] - float(jnp.mean(jnp.argmax(logits, -1) == yt))) < 1e-9


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_batchnorm_model_trains_with_python_loop():
    model = models.VGG((8, "M", 16, "M"), 10)
    d = data.load("digits", "train")
    cfg = train.OptimConfig("momentum", 0.05)
    tx = train.make_optimizer(cfg, 0.05)
    st = train.create_state(models.init(model, jax.random.PRNGKey(0), d.images.shape), tx)
    x, y = train.to_device(d.images[:256], d.labels[:256])
    r = train.run(train.make_trainer(model, tx), st, x, y, batch_size=64, num_steps=8, data_key=jax.random.PRNGKey(0))
    assert not np.allclose(r.state.batch_stats["bn_0"]["mean"], st.batch_stats["bn_0"]["mean"])
    with pytest.raises(ValueError, match="batch_size=1000"):
        train.run(train.make_trainer(model, tx), st, x, y, batch_size=1000, num_steps=1, data_key=jax.random.PRNGKey(0))


def test_recalibrate_batchnorm_gives_population_statistics():
    model = models.VGG((4, "M", 6), num_classes=3)
    x = jax.random.normal(jax.random.PRNGKey(0), (12, 6, 6, 2)) * 2.0 + 1.0
    v = models.init(model, jax.random.PRNGKey(1), x.shape)
    v = {**v, "batch_stats": jax.tree_util.tree_map(lambda s: s + 7.0, v["batch_stats"])}  # stale statistics
    out = train.recalibrate_batchnorm(model, v, x, batch_size=4, num_batches=3)
    _, inter = model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    u = np.asarray(inter["intermediates"]["conv_0"]["__call__"][0], np.float64)  # bn_0's input, all 12 images
    np.testing.assert_allclose(out["batch_stats"]["bn_0"]["mean"], u.mean((0, 1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["batch_stats"]["bn_0"]["var"], u.var((0, 1, 2)), rtol=1e-4, atol=1e-5)
    assert np.all(np.abs(np.asarray(out["batch_stats"]["bn_1"]["mean"]) - 7.0) > 1e-3)  # replaced, not kept
    jax.tree_util.tree_map(np.testing.assert_array_equal, out["params"], v["params"])
    plain = models.init(models.MLP((4, 3)), jax.random.PRNGKey(0), (1, 5))
    assert train.recalibrate_batchnorm(models.MLP((4, 3)), plain, jnp.ones((8, 5))) is plain
    with pytest.raises(ValueError, match="batch_size"):
        train.recalibrate_batchnorm(model, v, x, batch_size=20)


def test_gradient_clipping_scales_the_global_norm_before_weight_decay():
    """``clip_grad_norm``: the first update is ``-lr·(g·min(1, c/‖g‖) + wd·w)`` (PyTorch's clip_grad_norm_ then
    SGD's coupled weight decay)."""
    params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5]])}
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}  # global norm 13
    cfg = train.OptimConfig(optimizer="sgd", lr=0.1, weight_decay=0.01, clip_grad_norm=1.3)
    tx = train.make_optimizer(cfg, cfg.lr)
    upd, _ = tx.update(grads, tx.init(params), params)
    for k in params:
        np.testing.assert_allclose(upd[k], -0.1 * (grads[k] * 0.1 + 0.01 * params[k]), rtol=1e-6)
    with pytest.raises(ValueError, match="clip_grad_norm=-1"):
        train.OptimConfig(clip_grad_norm=-1.0)


def test_dropout_has_its_own_stream_and_the_data_order_is_unchanged():
    """The dropout key of step ``s`` used to be ``fold_in(data_key, s)``, the permutation key of epoch ``s``."""
    k = jax.random.PRNGKey(1)
    epoch_keys = [np.asarray(train.epoch_key(k, e)) for e in range(6)]
    for s in range(6):
        drop, aug = (np.asarray(x) for x in train.step_keys(k, s))
        assert not any(np.array_equal(drop, e) for e in epoch_keys) and not np.array_equal(drop, aug)
        np.testing.assert_array_equal(drop, jax.random.fold_in(jax.random.fold_in(k, train.DROPOUT_STREAM), s))
        # augmentation and the data order keep their streams: runs without dropout are bit-identical
        np.testing.assert_array_equal(aug, jax.random.fold_in(jax.random.fold_in(k, s), train.AUGMENT_STREAM))
        np.testing.assert_array_equal(epoch_keys[s], jax.random.fold_in(k, s))
    np.testing.assert_array_equal(train.epoch_order(k, 3, 20, 5),
                                  jax.random.permutation(jax.random.fold_in(k, 3), 20)[:20].reshape(4, 5))
    # the train step draws its dropout masks from that stream
    model = models.MLP((16, 3), dropout=0.5)
    x, y = jax.random.normal(jax.random.PRNGKey(2), (8, 5)), jnp.arange(8) % 3
    v = models.init(model, jax.random.PRNGKey(0), x.shape)
    tx = train.make_optimizer(train.OptimConfig("sgd", 0.1), 0.1)
    st = train.create_state(v, tx)._replace(step=jnp.asarray(4, jnp.int32))
    _, (loss, _) = train.make_trainer(model, tx).step(st, x, y, jnp.arange(8), k)
    expect = lambda key: train.cross_entropy(model.apply(v, x, train=True, rngs={"dropout": key}), y)
    assert float(loss) == pytest.approx(float(expect(train.step_keys(k, 4)[0])), rel=1e-6)
    assert float(loss) != pytest.approx(float(expect(jax.random.fold_in(k, 4))), rel=1e-6)


def test_duration_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"^warmup: duration '1.5': expected steps"):
        train.parse_duration("1.5", 10, "warmup")
    assert train.parse_duration("1.5ep", 10, "warmup") == 15


# ----------------------------------------------------------------------------------------------- divergence
def test_divergence_rule_closed_form():
    """Non-finite, or above 100 · max(|first loss|, 1): the first such step is named (1-based steps after
    ``first_step``), per replica."""
    lim = train.loss_limit(jnp.asarray(2.0))
    assert float(lim) == 200.0 and float(train.loss_limit(jnp.asarray(0.25))) == 100.0
    assert float(train.loss_limit(jnp.asarray(-3.0))) == 300.0 and np.isinf(train.loss_limit(jnp.asarray(2.0), None))
    train.check_divergence(jnp.asarray([2.0, 150.0, 199.9]), lim, 10)  # below the limit: no error
    with pytest.raises(train.Diverged, match=r"^training diverged at step 13: the training loss is 250 \(above the "
                                             r"limit 200") as e:
        train.check_divergence(jnp.asarray([2.0, 150.0, 250.0, jnp.nan]), lim, 10)
    assert (e.value.step, e.value.loss) == (13, 250.0)
    with pytest.raises(train.Diverged, match=r"step 2 \(replica 1\): the training loss is nan \(not finite\); lower "
                                             r"the learning rate"):
        train.check_divergence(jnp.asarray([[2.0, 3.0, 4.0], [2.0, jnp.nan, 4.0]]), jnp.asarray([200.0, 200.0]), 0)
    with pytest.raises(train.Diverged, match=r"step 1: the training loss is inf"):
        train.check_divergence(jnp.asarray([jnp.inf]), train.loss_limit(jnp.asarray(jnp.inf)), 0)


@pytest.mark.parametrize("loop", ["scan", "python"])
def test_a_diverging_run_stops_at_the_first_bad_step(digits_setup, loop):
    """SGD at lr 1e6 on digits: the error names the step a step-by-step float64 reference finds first."""
    model, _, v, (x, y), _ = digits_setup
    tx = train.make_optimizer(train.OptimConfig("sgd", 1e6), 1e6)
    tr = train.make_trainer(model, tx)
    key = jax.random.PRNGKey(1)
    st, ref, first_bad = train.create_state(v, tx), [], None
    for i in range(88):  # the reference: one step at a time, losses read on the host
        st, (l, _) = tr.step(st, x, y, train.epoch_order(key, i // 44, x.shape[0], 32)[i % 44], key)
        ref.append(float(l))
        if not np.isfinite(ref[-1]) or ref[-1] > 100 * max(abs(ref[0]), 1.0):
            first_bad = i + 1
            break
    assert first_bad is not None and first_bad > 1  # it does diverge, after a finite first step
    with pytest.raises(train.Diverged, match=rf"^training diverged at step {first_bad}: the training loss is ") as e:
        train.run(tr, train.create_state(v, tx), x, y, batch_size=32, num_steps=88, data_key=key, loop=loop)
    assert e.value.step == first_bad and "--lr" in str(e.value) and "--clip_grad_norm" in str(e.value)
    if np.isfinite(ref[-1]):
        np.testing.assert_allclose(e.value.loss, ref[-1], rtol=1e-3)
    else:
        assert not np.isfinite(e.value.loss)
    r = train.run(tr, train.create_state(v, tx), x, y, batch_size=32, num_steps=88, data_key=key, loop=loop,
                  max_loss_factor=None)  # the check off: trains through, as before
    assert not np.isfinite(r.train_loss) or r.train_loss > 100 * max(abs(ref[0]), 1.0)


def test_run_batches_stops_a_diverging_run(digits_setup):
    model, _, v, (x, y), _ = digits_setup
    tx = train.make_optimizer(train.OptimConfig("sgd", 1e6), 1e6)
    batches = ((x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(40))
    with pytest.raises(train.Diverged, match=r"^training diverged at step \d+"):
        train.run_batches(train.make_trainer(model, tx), train.create_state(v, tx), batches, num_steps=40,
                          data_key=jax.random.PRNGKey(0), log_every=10)


def test_labels_of_another_length_than_x_are_refused(digits_setup):
    model, tx, v, (x, y), _ = digits_setup
    with pytest.raises(ValueError, match=rf"^y: {x.shape[0] - 1} labels for {x.shape[0]} examples of x"):
        train.run(train.make_trainer(model, tx), train.create_state(v, tx), x, y[:-1], batch_size=32, num_steps=1,
                  data_key=jax.random.PRNGKey(0))
