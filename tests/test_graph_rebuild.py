"""Rebuilding smaller models: linen models whose widths are written inline (``nn.Dense(48)`` inside
``@nn.compact``: rebuilt by intercepting the submodules' calls) and NNX models (their width attributes follow the
shrunk parameters). Models written here, with their own names and shapes."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import graph
from jaxprune import structured as st

KEY = jax.random.PRNGKey(7)


class InlineMLP(nn.Module):
    """in → 11 → relu → 9 → relu → 3, widths written inline, auto-named layers."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(11)(x.reshape((x.shape[0], -1))))
        x = nn.relu(nn.Dense(9)(x))
        return nn.Dense(3)(x)


class InlineCNN(nn.Module):
    """conv 6 → BatchNorm → relu → max pool → conv 5 (set up in ``setup``) → BatchNorm → relu → flatten → dense 4."""

    def setup(self):
        self.second = nn.Conv(5, (3, 3), padding="SAME", use_bias=False)
        self.second_norm = nn.BatchNorm(use_running_average=True)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(6, (3, 3), padding="SAME", name="first")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="first_norm")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(self.second_norm(self.second(x)))
        return nn.Dense(4, name="readout")(x.reshape((x.shape[0], -1)))


class Skip(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.relu(nn.Conv(7, (3, 3), padding="SAME", name="inner")(x))
        return nn.relu(x + nn.Conv(x.shape[-1], (3, 3), padding="SAME", name="outer")(y))


class InlineResidual(nn.Module):
    """stem conv 4 → two residual units (inner 7, identity shortcuts) → mean → dense 2."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="stem")(x))
        x = Skip(name="u1")(Skip(name="u0")(x))
        return nn.Dense(2, name="cls")(x.mean(axis=(1, 2)))


def _init(model, shape, seed=0):
    v = model.init(jax.random.PRNGKey(seed), jnp.zeros(shape))
    if "batch_stats" in v:  # non-trivial statistics, so BatchNorm's slicing is exercised
        v = {**v, "batch_stats": jax.tree_util.tree_map(
            lambda a: a + jax.random.uniform(jax.random.PRNGKey(seed + 1), a.shape), v["batch_stats"])}
    return v, jax.random.normal(jax.random.PRNGKey(seed + 5), shape)


def _removed_equals_masked(model, v, x, keep):
    small, sv = st.remove_many(model, v, keep, x=x)
    want = model.apply(st.mask_many(model, v, keep, x=x), x)
    np.testing.assert_allclose(small.apply(sv, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(small.apply)(sv, x), want, rtol=1e-5, atol=1e-5)
    assert jax.tree_util.tree_map(jnp.shape, small.init(KEY, x)) == jax.tree_util.tree_map(jnp.shape, sv)
    return small, sv


@pytest.mark.parametrize("model,shape,first,second", [
    (InlineMLP(), (3, 4, 2), {"Dense_0": [0, 2, 3, 5, 8, 10]}, {"Dense_1": [1, 2, 4], "Dense_0": [0, 1, 5]}),
    (InlineCNN(), (2, 6, 6, 3), {"first": [1, 2, 4, 5]}, {"second": [0, 3], "first": [0, 1, 3]}),
    (InlineResidual(), (2, 5, 5, 3), {"u0/inner": [0, 3, 6], "stem": [0, 1, 3], "u0/outer": [0, 1, 3],
                                      "u1/outer": [0, 1, 3]}, {"u1/inner": [2, 4]}),
], ids=["mlp", "cnn_bn", "residual"])
@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_a_model_with_inline_widths_shrinks_by_interception_and_shrinks_again(model, shape, first, second):
    v, x = _init(model, shape)
    keep = {k: np.asarray(i) for k, i in first.items()}
    small, sv = _removed_equals_masked(model, v, x, keep)
    assert type(small).__name__ == type(model).__name__ and isinstance(small, type(model))
    g = graph.build(small, sv, x)
    assert all(g.layers[k].units == len(i) for k, i in first.items())
    # a second removal, on the shrunk model (indices of its own widths), keeps the first one's widths
    small2, sv2 = _removed_equals_masked(small, sv, x, {k: np.asarray(i) for k, i in second.items()})
    g2 = graph.build(small2, sv2, x)
    assert all(g2.layers[k].units == len(i) for k, i in second.items())
    assert all(g2.layers[k].units == len(i) for k, i in first.items() if k not in second)
    assert type(small2).__mro__[1] is type(small).__mro__[1]  # one subclass of the original class


def test_a_width_that_is_no_field_of_a_module_is_refused_naming_the_layer():
    class RawWidth(nn.Module):  # the hidden width is a literal in a self.param shape: nothing holds it
        @nn.compact
        def __call__(self, x):
            w = self.param("w_hidden", nn.initializers.lecun_normal(), (x.shape[-1], 6))
            return nn.Dense(2, name="out")(nn.relu(x @ w))

    m = RawWidth()
    v, x = _init(m, (2, 3))
    with pytest.raises(ValueError, match=r"layer 'params/w_hidden'.*not a field of a submodule.*with_widths"):
        st.remove_units(m, v, "params/w_hidden", np.array([0, 1]), x=x)


# ----------------------------------------------------------------------------------------------- NNX
class Scaled(nnx.Module):
    """A module of the test's own holding its width as an attribute: y = x · gain, gain: (width,)."""

    def __init__(self, width: int):
        self.width = width
        self.gain = nnx.Param(jnp.linspace(0.5, 1.5, width))

    def __call__(self, x):
        return x * self.gain[...]


class NNXMixer(nnx.Module):
    """conv 3 → 6 → BatchNorm → relu → conv 6 → 6 (equal in and out widths) → relu → mean → Scaled → linear 6 → 5
    → relu → linear 5 → 2."""

    def __init__(self, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(3, 6, (3, 3), padding="SAME", rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.c2 = nnx.Conv(6, 6, (3, 3), padding="SAME", rngs=rngs)
        self.scale = Scaled(6)
        self.fc = nnx.Linear(6, 5, rngs=rngs)
        self.out = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.c2(nnx.relu(self.bn(self.c1(x)))))
        x = self.scale(x.mean(axis=(1, 2)))
        return self.out(nnx.relu(self.fc(x)))


def test_an_nnx_model_after_removal_reports_its_new_widths_and_applies():
    m = NNXMixer(nnx.Rngs(2))
    m.eval()
    gd, state = nnx.split(m)
    x = jax.random.normal(KEY, (2, 5, 5, 3))
    keep = {"c1": np.array([0, 2, 5]), "c2": np.array([1, 3, 4, 5]), "fc": np.array([0, 4])}
    small, sv = st.remove_many(gd, state, keep, x=x)
    got = nnx.merge(small, sv)
    np.testing.assert_allclose(got(x), nnx.merge(gd, st.mask_many(gd, state, keep, x=x))(x), rtol=1e-5, atol=1e-5)
    assert (got.c1.in_features, got.c1.out_features, got.bn.num_features) == (3, 3, 3)
    assert (got.c2.in_features, got.c2.out_features, got.scale.width) == (3, 4, 4)
    assert getattr(got.c2, "kernel_shape", (3, 3, 3, 4)) == got.c2.kernel[...].shape == (3, 3, 3, 4)
    assert (got.fc.in_features, got.fc.out_features, got.out.in_features, got.out.out_features) == (4, 2, 2, 2)
    small2, sv2 = st.remove_units(small, sv, "fc", np.array([1]), x=x)  # and again, on the shrunk model
    again = nnx.merge(small2, sv2)
    assert (again.fc.out_features, again.out.in_features, again.c2.out_features) == (1, 1, 4)
