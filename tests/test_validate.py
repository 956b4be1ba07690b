"""jaxprune._validate and the public arguments it guards: every function that takes a PRNG ``key``, every
fraction, every layer width — a one-line error naming the argument instead of JAX's "invalid PRNG key data",
Python's "'<=' not supported" or a ZeroDivisionError after training."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune import _validate, augment, conventions, imp, masks, models, structured, train


class Tiny(nn.Module):  # a model of the test's own: two dense layers of odd widths
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(7, name="first")(x.reshape((x.shape[0], -1))))
        return nn.Dense(3, name="out")(x)


def _tree():
    p = {"w": jnp.arange(12.0).reshape(4, 3) - 5.5, "v": jnp.arange(6.0).reshape(2, 3) + 1.0}
    return p, masks.ones_like(p), masks.prunable_leaves(p)


def _trainer_state():
    v = models.init(Tiny(), jax.random.PRNGKey(0), (1, 5))
    tx = train.make_optimizer(train.OptimConfig(), 0.1)
    return train.make_trainer(Tiny(), tx), train.create_state(v, tx), tx


def _key_calls():
    """Every public function of jaxprune that takes a PRNG key, called with ``bad`` in the key's place."""
    p, m, pr = _tree()
    tr, state, tx = _trainer_state()
    mtx = masks.masked(tx)
    mstate = train.create_state(train.variables_of(state), mtx)
    pm = masks.ones_like(mstate.params)
    x, y = jnp.ones((8, 5)), jnp.zeros((8,), jnp.int32)
    img = jnp.ones((2, 6, 6, 1))
    kernel = jnp.arange(15.0).reshape(5, 3)
    return {
        "masks.random_prune": ("key", lambda k: masks.random_prune(k, m, pr, 0.5)),
        "masks.random_like": ("key", lambda k: masks.random_like(k, m, pr)),
        "imp.random_mask_branch": ("key", lambda k: imp.random_mask_branch(k, mtx, "init", pm, masks.prunable_leaves(
            mstate.params), mstate, mstate)),
        "models.init": ("key", lambda k: models.init(Tiny(), k, (1, 5))),
        "structured.unit_scores": ("key", lambda k: structured.unit_scores(kernel, "random", key=k)),
        "structured.select_units": ("key", lambda k: structured.select_units(kernel, 2, "kmeans", key=k)),
        "augment.random_flip": ("key", lambda k: augment.random_flip(k, img)),
        "augment.random_crop": ("key", lambda k: augment.random_crop(k, img)),
        "augment.crop_flip": ("key", lambda k: augment.crop_flip(k, img)),
        "train.run": ("data_key", lambda k: train.run(tr, state, x, y, batch_size=4, num_steps=1, data_key=k)),
        "train.epoch_order": ("key", lambda k: train.epoch_order(k, 0, 8, 4)),
        "train.step_keys": ("data_key", lambda k: train.step_keys(k, 3)),
        "train.run_batches": ("data_key", lambda k: train.run_batches(tr, state, [(x, y)], num_steps=1, data_key=k)),
    }


KEY_CALLS = sorted(_key_calls())


@pytest.mark.parametrize("name", KEY_CALLS)
@pytest.mark.parametrize("bad", [0, 7.5, None, "seed", np.uint32(3), np.zeros((3,), np.uint32),
                                 np.zeros((2,), np.float32)])
def test_every_public_key_argument_refuses_a_non_key_naming_it(name, bad):
    arg, call = _key_calls()[name]
    if bad is None and name.startswith("structured."):
        pytest.skip("key=None means no key there (kmeans seeds 0; random says it needs one)")
    with pytest.raises(TypeError) as e:
        call(bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{arg}=")
    assert "jax.random.PRNGKey(seed) or jax.random.key(seed)" in msg


@pytest.mark.parametrize("name", KEY_CALLS)
@pytest.mark.parametrize("make", [jax.random.PRNGKey, jax.random.key], ids=["raw", "typed"])
def test_every_public_key_argument_takes_both_kinds_of_key(name, make):
    _key_calls()[name][1](make(3))  # no error


def test_replica_keys_must_be_stacked():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    assert _validate.key(k, "data_key", batch=3) is k
    assert _validate.key(jax.random.split(jax.random.key(0), 3), batch=3) is not None
    with pytest.raises(TypeError, match=r"data_key=an array of shape \(2,\).*3 keys stacked"):
        _validate.key(k[0], "data_key", batch=3)


def test_key_check_works_under_jit():
    _, m, pr = _tree()
    f = jax.jit(lambda k: masks.random_prune(k, m, pr, 0.5))
    out = f(jax.random.PRNGKey(2))
    assert int(sum(x.sum() for x in jax.tree_util.tree_leaves(out))) == 18 - 9


FRACTION_CALLS = {
    "masks.magnitude_prune": lambda f: masks.magnitude_prune(*_tree(), f),
    "masks.random_prune": lambda f: masks.random_prune(jax.random.PRNGKey(0), *_tree()[1:], f),
    "masks.prune_by_score": lambda f: masks.prune_by_score(*_tree(), f),
    "conventions.n_to_prune": lambda f: conventions.n_to_prune(f, 10),
    "structured.n_keep_for": lambda f: structured.n_keep_for(10, f),
    "imp.ImpConfig": lambda f: imp.ImpConfig(fraction=f),
}


@pytest.mark.parametrize("name", sorted(FRACTION_CALLS))
@pytest.mark.parametrize("bad", ["0.5", None, True, [0.5], 1.5, -0.1, float("nan"), float("inf")])
def test_every_public_fraction_refuses_a_non_fraction_naming_it(name, bad):
    with pytest.raises(ValueError) as e:
        FRACTION_CALLS[name](bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("fraction=") and "in [0, 1]" in msg


@settings(max_examples=40, deadline=None)
@given(st.fractions(0, 1), st.integers(0, 500))
def test_fraction_check_accepts_every_fraction_and_counts_stay_exact(f, n):
    # the exact ceiling of f·n (Fraction arithmetic) for f given as float, numpy float or 0-d array
    for value in (float(f), np.float32(float(f)), np.asarray(float(f))):
        assert _validate.fraction(value) == float(value)
    expected = -((-f.numerator * n) // f.denominator)  # ceil(f·n) exactly
    # float(f)·n may land just below an integer (and the 1e-9 slack absorbs that): one fewer at most
    assert conventions.n_to_prune(float(f), n) in (expected, expected - 1)


@pytest.mark.parametrize("hidden,bad", [((0,), "0"), ((300, 0), "0"), ((16, -4), "-4"), ((3.5,), "3.5")])
def test_zero_or_negative_widths_are_refused_before_any_model_runs(hidden, bad):
    with pytest.raises(ValueError, match=rf"^hidden=.*expected layer widths as integers >= 1.*got {bad}"):
        models.build("mlp", 10, hidden=hidden)
    with pytest.raises(ValueError, match=r"^features=.*expected layer widths as integers >= 1"):
        models.init(models.MLP(tuple(hidden) + (10,)), jax.random.PRNGKey(0), (1, 4))
    with pytest.raises(ValueError, match=r"^cfg=.*expected layer widths as integers >= 1"):
        models.init(models.VGG((8, "M") + tuple(hidden), 10), jax.random.PRNGKey(0), (1, 8, 8, 1))


def test_labels_check():
    y = jnp.asarray([0, 2, 1])
    _validate.labels(y, 3, 3)
    with pytest.raises(ValueError, match=r"^y: label 3 is outside \[0, 3\); the model has 3 outputs"):
        _validate.labels(jnp.asarray([0, 3, 1]), 3, 3)
    with pytest.raises(ValueError, match=r"^y: label -1 is outside"):
        _validate.labels(jnp.asarray([0, -1, 1]), 3, 3)
    with pytest.raises(ValueError, match=r"^y: 3 labels for 4 examples of x"):
        _validate.labels(y, 3, 4)
    with pytest.raises(ValueError, match=r"^y: expected integer class labels of shape \(3,\)"):
        _validate.labels(y.astype(jnp.float32), 3, 3)
