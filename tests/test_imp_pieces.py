"""IMP as pure pieces (jaxprune.imp.capture / prune_and_rewind / start_level / branches) in a user's own loop.

A hand-written ``jax.jit`` loop with ``optax.adamw``, a custom loss and a model without a ``train`` argument,
fed by a python generator, must equal ``imp.run`` on the same Task level by level (same masks, same weights to
float tolerance, same test accuracies), for every rewind mode; and the README's example runs as printed.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import data, imp, masks, train

SEED, STEPS, BATCH, LEVELS, FRACTION = 5, 24, 64, 2, 0.5
EXCLUDE = ("^Dense_1/",)
TR, TE = data.load("digits", "train"), data.load("digits", "test")


class Net(nn.Module):
    """A user's model: no ``train`` argument."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)


MODEL = Net()


def smoothed_ce(logits, labels):  # a custom loss: label-smoothed cross-entropy
    return optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, 10), 0.1)).mean()


def make_tx():
    return optax.adamw(optax.cosine_decay_schedule(1e-2, STEPS), weight_decay=1e-3)


def finetune_tx():  # the same state structure as make_tx's (a schedule, so a count)
    return optax.adamw(optax.constant_schedule(1e-3), weight_decay=1e-3)


def batches(start):
    """The batches of steps ``start, start + 1, …``: a python generator (epoch e shuffled by seed e)."""
    n = len(TR.labels)
    spe = n // BATCH
    step = start
    while True:
        epoch, i = divmod(step, spe)
        order = np.random.default_rng(epoch).permutation(n)[i * BATCH:(i + 1) * BATCH]
        yield TR.images[order], TR.labels[order]
        step += 1


def _task(**kw):
    base = dict(x_test=jnp.asarray(TE.images), y_test=jnp.asarray(TE.labels), optim=make_tx(), num_steps=STEPS,
                seed=SEED, loss=smoothed_ce, train_batches=batches)
    return imp.Task(MODEL, **{**base, **kw})


def _accuracy(params):
    return float(np.mean(np.asarray(MODEL.apply({"params": params}, jnp.asarray(TE.images)).argmax(-1))
                         == TE.labels))


def user_imp(rewind, branch="none", rewind_step=0):
    """IMP written by hand around a jitted train step and the pieces; returns per level (mask, params, acc,
    branch acc)."""
    tx = masks.masked(make_tx())
    tx_run = masks.masked(finetune_tx()) if rewind == "finetune" else tx  # the pruned levels' optimizer

    def make_step(tx):
        @jax.jit
        def step(params, opt_state, x, y):
            grads = jax.grad(lambda p: smoothed_ce(MODEL.apply({"params": p}, x), y))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state
        return step

    steps = {id(tx): make_step(tx), id(tx_run): make_step(tx_run)}

    def train_from(state, tx, capture_at=None):
        params, opt_state, point = state.params, state.opt_state, None
        for s, (x, y) in zip(range(int(state.step), STEPS), batches(int(state.step))):
            if s == capture_at:
                point = imp.capture(params, opt_state, s)
            params, opt_state = steps[id(tx)](params, opt_state, jnp.asarray(x), jnp.asarray(y))
        return imp.capture(params, opt_state, STEPS), point

    keys = imp.Keys(SEED)
    params = MODEL.init(keys.init, jnp.zeros((1, 8, 8, 1)))["params"]
    prunable = masks.prunable_leaves(params, exclude=EXCLUDE)
    mask = masks.ones_like(params)
    point = imp.capture(params, tx.init(params))
    trained, at_k = train_from(point, tx, capture_at=rewind_step if rewind == "step" else None)
    point = at_k if rewind == "step" else point
    out = [(mask, trained.params, _accuracy(trained.params), None)]
    for level in range(1, LEVELS + 1):
        start, mask = imp.prune_and_rewind(tx_run, rewind, trained, point, mask, prunable, FRACTION)
        branch_acc = None
        if branch == "random_mask":
            bstart, bmask = imp.random_mask_branch(keys.random_mask(level), tx_run, rewind, mask, prunable,
                                                   trained, point)
            assert masks.density_report(bmask, prunable)["layers"] == masks.density_report(mask, prunable)["layers"]
            branch_acc = _accuracy(train_from(bstart, tx_run)[0].params)
        elif branch == "reinit":
            fresh = MODEL.init(keys.reinit(level), jnp.zeros((1, 8, 8, 1)))["params"]
            bstart = imp.reinit_branch(tx_run, rewind, mask, point, fresh)
            branch_acc = _accuracy(train_from(bstart, tx_run)[0].params)
        trained, _ = train_from(start, tx_run)
        out.append((mask, trained.params, _accuracy(trained.params), branch_acc))
    return out


def _library_imp(rewind, branch="none", rewind_step=0, workdir=None, levels=LEVELS, task=None):
    task = task or _task(finetune_optim=finetune_tx() if rewind == "finetune" else None)
    cfg = imp.ImpConfig(levels=levels, fraction=FRACTION, rewind=rewind, rewind_step=rewind_step, branch=branch,
                        exclude=EXCLUDE)
    trees = {}
    recs = imp.run(task, cfg, workdir, on_checkpoint=lambda k, t: trees.__setitem__(k, t))
    return recs, trees


def _counts(opt_state):  # every step count in an optax state (adamw with a schedule holds two)
    return [int(v) for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")]


def _assert_close(a, b, rtol=2e-4, atol=2e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("rewind,branch,rewind_step", [
    ("init", "random_mask", 0),
    ("step", "reinit", 7),
    ("lr", "reinit", 0),
    ("finetune", "none", 0),
])
def test_a_users_loop_with_the_pieces_equals_imp_run(rewind, branch, rewind_step):
    mine = user_imp(rewind, branch, rewind_step)
    recs, trees = _library_imp(rewind, branch, rewind_step)
    assert len(recs) == len(mine) == LEVELS + 1
    for level, (rec, (mask, params, acc, branch_acc)) in enumerate(zip(recs, mine)):
        for a, b in zip(jax.tree_util.tree_leaves(trees[level]["mask"]), jax.tree_util.tree_leaves(mask)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        _assert_close(trees[level]["state"].params, params)
        assert rec["test_accuracy"] == pytest.approx(acc, abs=1.5 / len(TE.labels))
        assert rec["density"] == pytest.approx((1 - FRACTION) ** level, abs=1e-3)
        assert rec["steps"] == STEPS
        if branch_acc is not None:
            assert rec["branch"]["name"] == branch
            assert rec["branch"]["test_accuracy"] == pytest.approx(branch_acc, abs=1.5 / len(TE.labels))
    if rewind == "step":  # the rewind point is the state at step k, its count too (the schedule position)
        point = trees[1]["rewind_point"]
        assert int(point.step) == rewind_step
        assert _counts(point.opt_state) == [rewind_step, rewind_step]


def test_lr_rewinding_restarts_an_optax_schedule():
    """``lr``: the trained weights, a fresh ``tx.init`` (count 0: the cosine schedule from its start)."""
    tx = masks.masked(make_tx())
    params = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    st = imp.capture(params, tx.init(params))
    for i, (x, y) in zip(range(3), batches(0)):  # a few steps, so counts and moments are non-zero
        grads = jax.grad(lambda p: smoothed_ce(MODEL.apply({"params": p}, x), y))(st.params)
        upd, opt = tx.update(grads, st.opt_state, st.params)
        st = imp.capture(optax.apply_updates(st.params, upd), opt, i + 1)
    prunable = masks.prunable_leaves(params, exclude=EXCLUDE)
    start, mask = imp.prune_and_rewind(tx, "lr", st, None, masks.ones_like(params), prunable, 0.5)
    assert _counts(st.opt_state) == [3, 3]
    assert int(start.step) == 0 and _counts(start.opt_state) == [0, 0]
    k = np.asarray(mask["Dense_0"]["kernel"])
    np.testing.assert_array_equal(np.asarray(start.params["Dense_0"]["kernel"]),
                                  np.where(k, np.asarray(st.params["Dense_0"]["kernel"]), 0))
    assert not np.asarray(optax.tree_utils.tree_get(start.opt_state, "mu")["Dense_0"]["kernel"]).any()
    np.testing.assert_array_equal(np.asarray(start.opt_state.mask["Dense_0"]["kernel"]), k)
    # the same through optax.inject_hyperparams: its learning rate is the schedule's first again
    ih = masks.masked(optax.inject_hyperparams(optax.adamw)(learning_rate=optax.cosine_decay_schedule(1e-2, 10)))
    s0 = imp.capture(params, ih.init(params))
    _, s1 = ih.update(jax.tree_util.tree_map(jnp.ones_like, params), s0.opt_state, params)
    again = imp.start_level(ih, "lr", mask, imp.capture(params, s1, 1), None)
    assert float(again.opt_state.inner.hyperparams["learning_rate"]) == pytest.approx(1e-2)


def test_an_iterator_task_resumes_like_an_uninterrupted_run(tmp_path):
    """An optax / custom-loss / iterator Task checkpoints and resumes (load_level rebuilds its state)."""
    full, trees = _library_imp("lr")
    _library_imp("lr", workdir=tmp_path / "wd", levels=1)
    resumed, rtrees = _library_imp("lr", workdir=tmp_path / "wd")
    assert set(rtrees) == {2}  # levels 0 and 1 were loaded, not retrained
    assert [r["test_accuracy"] for r in resumed] == pytest.approx([r["test_accuracy"] for r in full], abs=1e-9)
    loaded = imp.load_level(tmp_path / "wd", 1, _task())
    _assert_close(loaded["state"], trees[1]["state"], rtol=0, atol=0)
    _assert_close(rtrees[2]["state"].params, trees[2]["state"].params, rtol=0, atol=0)


def test_array_task_with_optax_and_custom_loss_equals_a_users_loop():
    """The in-memory Task path (arrays, epoch order from ``imp.Keys(seed).data``) with optax and a custom loss,
    against the same order written out by hand."""
    x, y = jnp.asarray(TR.images), jnp.asarray(TR.labels)
    task = _task(train_batches=None, x_train=x, y_train=y, batch_size=BATCH, loop="python")
    recs, trees = _library_imp("init", levels=1, task=task)
    n, spe, key = len(TR.labels), len(TR.labels) // BATCH, imp.Keys(SEED).data
    order = lambda s: train.epoch_order(key, s // spe, n, BATCH)[s % spe]
    tx = masks.masked(make_tx())

    @jax.jit
    def step(params, opt_state, idx):
        grads = jax.grad(lambda p: smoothed_ce(MODEL.apply({"params": p}, x[idx]), y[idx]))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = MODEL.init(imp.Keys(SEED).init, x[:1])["params"]
    point = st = imp.capture(params, tx.init(params))
    prunable, mask = masks.prunable_leaves(params, exclude=EXCLUDE), masks.ones_like(params)
    for level in range(2):
        if level:
            st, mask = imp.prune_and_rewind(tx, "init", st, point, mask, prunable, FRACTION)
        p, o = st.params, st.opt_state
        for s in range(STEPS):
            p, o = step(p, o, order(s))
        st = imp.capture(p, o, STEPS)
        _assert_close(trees[level]["state"].params, p)
        assert recs[level]["test_accuracy"] == pytest.approx(_accuracy(p), abs=1.5 / len(TE.labels))


def test_task_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"optim=.*expected a jaxprune.train.OptimConfig or an optax"):
        _task(optim="adam")
    with pytest.raises(ValueError, match=r"expected training data"):
        _task(train_batches=None)
    with pytest.raises(ValueError, match=r"train_batches: expected num_replicas=1"):
        _task(num_replicas=2)
    cfg = imp.ImpConfig(levels=1, rewind="finetune", exclude=EXCLUDE)
    with pytest.raises(ValueError, match=r"rewind='finetune' with an optax optimizer: set Task.finetune_optim"):
        imp.run(_task(), cfg, None)
    with pytest.raises(ValueError, match=r"finetune_lr=0.1: with an optax optimizer set Task.finetune_optim"):
        imp.run(_task(finetune_optim=finetune_tx()), imp.ImpConfig(levels=1, rewind="finetune", finetune_lr=0.1,
                                                                     exclude=EXCLUDE), None)
    with pytest.raises(ValueError, match=r"Task.finetune_optim: its state has another structure"):
        imp.run(_task(finetune_optim=optax.adamw(1e-3)), cfg, None)
    short = lambda start: (b for _, b in zip(range(5), batches(start)))
    with pytest.raises(ValueError, match=r"batches ran out at step 5: expected batches for steps 0..23"):
        imp.run(_task(train_batches=short), imp.ImpConfig(levels=0, exclude=EXCLUDE), None)


def _readme_section() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## IMP in your own training loop", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_as_printed():
    """The README's "IMP in your own training loop" code, executed verbatim."""
    code = _readme_section()
    out = io.StringIO()
    ns: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), ns)
    lines = [line.split() for line in out.getvalue().splitlines()]
    assert [(int(a), float(b)) for a, b, _ in lines] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert all(float(c) > 0.6 for _, _, c in lines)
    k, m = np.asarray(ns["state"].params["dense_0"]["kernel"]), np.asarray(ns["mask"]["dense_0"]["kernel"])
    assert (k[~m] == 0).all() and m.mean() == pytest.approx(0.125, abs=1e-3)
    assert np.asarray(ns["mask"]["dense_1"]["kernel"]).all()


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_replicas_take_a_custom_loss_and_a_model_without_train():
    """Replica r of a K=2 in-memory run with a custom loss equals the single run with seed + r."""
    arrays = dict(x_train=jnp.asarray(TR.images), y_train=jnp.asarray(TR.labels), batch_size=BATCH,
                  train_batches=None)
    cfg = imp.ImpConfig(levels=1, fraction=FRACTION, rewind="init", exclude=EXCLUDE)
    both = imp.run(_task(num_replicas=2, **arrays), cfg, None)
    for r in range(2):
        one = imp.run(_task(seed=SEED + r, **arrays), cfg, None)
        for level in range(2):
            np.testing.assert_allclose(both[level]["replicas"][r]["test_accuracy"], one[level]["test_accuracy"],
                                       atol=1e-6)
            np.testing.assert_allclose(both[level]["replicas"][r]["density"], one[level]["density"], atol=1e-9)


def test_labels_outside_the_models_classes_and_mismatched_lengths_are_refused_before_training():
    """Labels >= the model's 10 outputs trained to a NaN loss; x/y of different lengths trained on."""
    x, y = jnp.asarray(TR.images[:256]), jnp.asarray(TR.labels[:256])
    xt, yt = jnp.asarray(TE.images[:64]), jnp.asarray(TE.labels[:64])
    arrays = lambda **kw: imp.Task(MODEL, **{**dict(x_train=x, y_train=y, x_test=xt, y_test=yt, optim=make_tx(),
                                                    num_steps=STEPS, batch_size=BATCH, seed=SEED), **kw})
    cfg = imp.ImpConfig(levels=0, exclude=EXCLUDE)
    with pytest.raises(ValueError, match=r"^y_train: label 10 is outside \[0, 10\); the model has 10 outputs"):
        imp.run(arrays(y_train=y.at[3].set(10)), cfg, None)
    with pytest.raises(ValueError, match=r"^y_test: label -1 is outside \[0, 10\)"):
        imp.run(arrays(y_test=yt.at[0].set(-1)), cfg, None)
    with pytest.raises(ValueError, match=r"^y_train: shape \(255,\) for 256 examples of x_train; expected one label"):
        arrays(y_train=y[:-1])
    with pytest.raises(ValueError, match=r"^y_test: shape \(64, 1\) for 64 examples of x_test"):
        arrays(y_test=yt[:, None])
    assert len(imp.run(arrays(), cfg, None)) == 1  # the same task with good labels trains
