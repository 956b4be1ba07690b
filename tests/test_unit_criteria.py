"""The one criterion table (:mod:`jaxprune.unit_criteria`): a criterion registered here, in the test file, is
accepted by every dispatch (``structured``'s selections, ``criteria.scores``) and by the experiments' criterion
flags with no other edit; values checked against float64 references written here. Also the one ``takes_train``."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, filter_prune, head_prune, lrp_toy, merge, oneshot
from jaxprune import criteria, graph, structured, unit_criteria


class Tower(nn.Module):
    """Two hidden dense layers (5 and 3 units) and a readout; other names and widths than jaxprune.models."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(5, name="wide")(x))
        h = nn.relu(nn.Dense(3, name="narrow")(h))
        return nn.Dense(2, name="readout")(h)


class TinyAttention(nn.Module):
    """Tokens → one 2-head self-attention (q/k/v of 2 heads × 3 channels) → mean over tokens → readout."""

    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6, name="mixer")(x, x)
        return nn.Dense(3, name="readout")(h.mean(axis=1))


@pytest.fixture
def registered():
    """Names registered by a test, removed afterwards (the table is process-wide)."""
    names: list[str] = []
    yield names
    for n in names:
        unit_criteria.CRITERIA.pop(n, None)


def _max_abs(v: np.ndarray, key) -> np.ndarray:
    return np.abs(v).max(axis=1)


def _tower():
    model = Tower()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
    return model, variables


def _rows64(p: dict) -> np.ndarray:
    """``(units, in + 1)`` float64: each unit's incoming weights and bias (the reference's unit vectors)."""
    return np.concatenate([np.asarray(p["kernel"], np.float64).T, np.asarray(p["bias"], np.float64)[:, None]], 1)


def _top(s: np.ndarray, k: int) -> list[int]:
    return sorted(np.argsort(-s, kind="stable")[:k].tolist())


def test_a_vectors_criterion_registered_here_reaches_every_dispatch(registered):
    unit_criteria.register_criterion("max_abs", kind="vectors")(_max_abs)
    registered.append("max_abs")
    model, v = _tower()
    p = v["params"]["wide"]
    ref = _rows64(p).__abs__().max(axis=1)
    np.testing.assert_allclose(structured.unit_scores(p["kernel"], "max_abs", bias=p["bias"]), ref, rtol=1e-6)
    assert structured.select_units(p["kernel"], 2, "max_abs", bias=p["bias"]).tolist() == _top(ref, 2)
    keep = structured.select_layers(model, v, {"wide": 2, "narrow": 1}, "max_abs", x=(1, 4))
    assert keep["wide"].tolist() == _top(ref, 2)
    assert keep["narrow"].tolist() == _top(_rows64(v["params"]["narrow"]).__abs__().max(axis=1), 1)
    groups = structured.select_groups(model, v, {"wide": 2}, "max_abs", x=(1, 4))
    assert groups["wide"].tolist() == _top(ref, 2)
    s = criteria.scores("max_abs", model, v, jnp.zeros((2, 4)))  # norm "none": the raw scores
    assert list(s) == ["wide", "narrow"]
    np.testing.assert_allclose(s["wide"], ref, rtol=1e-6)
    # the experiments' criterion flags read the same table: accepted with no other edit
    assert filter_prune._config({"criterion": "max_abs"})["criterion"] == "max_abs"
    assert "max_abs" in list(dict(((r[0], r) for r in filter_prune.SPEC))["criterion"][3])
    assert "max_abs" in list(dict(((r[0], r) for r in oneshot.SPEC))["unit_criterion"][3])
    assert head_prune._config({"criteria": ["max_abs", "lrp"]})["criteria"] == ["max_abs", "lrp"]
    assert merge._config({"criteria": ["max_abs"]})["criteria"] == ["max_abs"]
    lrp_toy._check({**lrp_toy.DEFAULTS, "criteria": ["max_abs", "grad"]})


def test_a_vectors_criterion_scores_a_head_across_its_q_k_v(registered):
    unit_criteria.register_criterion("max_abs", kind="vectors")(_max_abs)
    registered.append("max_abs")
    model = TinyAttention()
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 5))
    v = model.init(jax.random.PRNGKey(2), x)
    v = jax.tree_util.tree_map(lambda a: a * jnp.arange(1, a.size + 1).reshape(a.shape) / a.size, v)  # no ties
    att = v["params"]["mixer"]
    att["value"]["kernel"] = att["value"]["kernel"].at[:, 0].multiply(3.0)  # head 0 wins through its value rows
    group = ("mixer/query", "mixer/key", "mixer/value")
    assert group in structured.unit_groups(model, v, x=x.shape)
    ref = np.array([max(float(np.abs(att[n]["kernel"][:, h]).max()), float(np.abs(att[n]["bias"][h]).max()))
                    for h in range(2) for n in ("query", "key", "value")]).reshape(2, 3).max(axis=1)
    keep = structured.select_groups(model, v, {"mixer/query": 1}, "max_abs", x=x.shape)
    assert ref[0] > ref[1] and max(np.abs(att[n]["kernel"][:, 0]).max() for n in ("query", "key")) < ref[1]
    assert {k: a.tolist() for k, a in keep.items()} == {n: [0] for n in group}  # one unit per head: the head kept
    s = criteria.scores("max_abs", model, v, x)  # per head of each projection (a heads layer's units)
    np.testing.assert_allclose(s["mixer/query"], [np.abs(np.concatenate(
        [np.ravel(att["query"]["kernel"][:, h]), att["query"]["bias"][h]])).max() for h in range(2)], rtol=1e-6)


def _mean_preactivation(model, variables, x, y):
    """Mean ``|z|`` of each non-output layer's pre-activation over the batch (a data-driven criterion)."""
    g = graph.build(model, variables, x)
    _, z = graph.run(g, g.net.leaves, x)
    return {k: jnp.mean(jnp.abs(z[k]), axis=0) for k in g.layers if k != "readout"}


def test_a_data_criterion_registered_here_is_scored_normalised_and_selected(registered):
    unit_criteria.register_criterion("mean_preact", kind="model", needs_data=True, norm="l1")(_mean_preactivation)
    registered.append("mean_preact")
    model, v = _tower()
    x = jax.random.normal(jax.random.PRNGKey(3), (6, 4))
    y = jnp.array([0, 1, 0, 1, 1, 0])
    p = {k: {n: np.asarray(a, np.float64) for n, a in d.items()} for k, d in v["params"].items()}
    z1 = np.asarray(x, np.float64) @ p["wide"]["kernel"] + p["wide"]["bias"]
    z2 = np.maximum(z1, 0) @ p["narrow"]["kernel"] + p["narrow"]["bias"]
    s = criteria.scores("mean_preact", model, v, x, y)
    for k, z in (("wide", z1), ("narrow", z2)):
        ref = np.abs(z).mean(0)
        np.testing.assert_allclose(s[k], ref / ref.sum(), rtol=1e-5)  # the entry's norm: l1
    np.testing.assert_allclose(criteria.scores("mean_preact", model, v, x, y, normalized=False)["wide"],
                               np.abs(z1).mean(0), rtol=1e-5)
    with pytest.raises(ValueError, match=r"criterion='mean_preact' needs a reference batch"):
        criteria.scores("mean_preact", model, v)
    with pytest.raises(ValueError, match=r"criterion='mean_preact' scores units on a reference batch: pass its "
                                         r"scores, jaxprune\.criteria\.scores"):
        structured.select_layers(model, v, {"wide": 2}, "mean_preact", x=(1, 4))
    keep = structured.select_groups(model, v, {"wide": 2}, s, x=(1, 4))
    assert keep["wide"].tolist() == _top(np.abs(z1).mean(0), 2)
    c = filter_prune._config({"criterion": "mean_preact", "reference_examples": 4})
    assert c["criterion"] == "mean_preact"
    with pytest.raises(ValueError, match=r"reference_examples=0: expected >= 1 for a data-driven criterion"):
        filter_prune._config({"criterion": "mean_preact", "reference_examples": 0})
    assert head_prune._data_driven("mean_preact") and not head_prune._data_driven("l2")


def test_a_data_free_model_criterion_is_computed_by_the_selections():
    """``weight`` (kind model, no data): select_layers computes its scores itself, equal to passing them."""
    model, v = _tower()
    by_name = structured.select_layers(model, v, {"wide": 3, "narrow": 1}, "weight", x=(1, 4))
    ref = np.abs(np.asarray(v["params"]["wide"]["kernel"], np.float64)).sum(0)  # incoming L1, no bias
    assert by_name["wide"].tolist() == _top(ref, 3)
    scores = criteria.scores("weight", model, v, None, normalized=False)
    assert {k: a.tolist() for k, a in by_name.items()} == {
        k: a.tolist() for k, a in structured.select_layers(model, v, {"wide": 3, "narrow": 1}, scores).items()}


def test_registration_is_refused_when_ambiguous_or_malformed(registered):
    with pytest.raises(ValueError, match=r"name='l1': a criterion of that name is already registered"):
        unit_criteria.register_criterion("l1", kind="vectors")
    with pytest.raises(ValueError, match=r"kind='scores': expected one of \('vectors', 'selection', 'model'\)"):
        unit_criteria.register_criterion("new_one", kind="scores")
    with pytest.raises(ValueError, match=r"needs_data: only a kind='model' criterion"):
        unit_criteria.register_criterion("new_one", kind="vectors", needs_data=True)
    with pytest.raises(ValueError, match=r"norm='l3'"):
        unit_criteria.register_criterion("new_one", kind="model", norm="l3")
    assert "new_one" not in unit_criteria.CRITERIA
    deco = unit_criteria.register_criterion("twice", kind="vectors")
    deco(_max_abs)
    registered.append("twice")
    with pytest.raises(ValueError, match="already registered"):
        deco(_max_abs)


def test_every_dispatch_names_the_argument_and_the_accepted_names():
    model, v = _tower()
    names = r"\('l1', 'l2', 'random', 'kmeans', 'l2_gm', 'weight', 'grad', 'taylor', 'lrp'"
    with pytest.raises(ValueError, match=rf"criterion='magic': expected one of {names}"):
        structured.select_layers(model, v, {"wide": 2}, "magic", x=(1, 4))
    with pytest.raises(ValueError, match=r"criterion='kmeans': expected one of \('l1', 'l2', 'random', 'l2_gm', "
                                         r"'weight', 'grad', 'taylor', 'lrp'.*\) \(kmeans"):
        criteria.scores("kmeans", model, v, None)
    with pytest.raises(ValueError, match=r"criterion='grad': expected one of \('l1', 'l2', 'random', 'kmeans', "
                                         r"'l2_gm'\)"):
        structured.select_units(v["params"]["wide"]["kernel"], 2, "grad")
    with pytest.raises(ValueError, match=rf"criterion='magic': expected one of {names}"):
        filter_prune._config({"criterion": "magic"})
    with pytest.raises(ValueError, match=r"unit_criterion='weight': expected one of \('l1', 'l2', 'random', "
                                         r"'kmeans', 'l2_gm'\)"):
        oneshot._check_global("weight")
    with pytest.raises(TypeError, match=r"scores: unknown options \['composit'\]"):
        criteria.scores("weight", model, v, None, composit="zplus")


class Forwarding(nn.Module):
    """``__call__(x, **kwargs)`` reading ``kwargs['train']``: takes ``train`` through ``**kwargs``."""

    @nn.compact
    def __call__(self, x, **kwargs):
        h = nn.Dense(4, name="body")(x)
        h = nn.Dropout(0.5, deterministic=not kwargs["train"])(nn.relu(h))
        return nn.Dense(2, name="readout")(h)


def test_takes_train_is_one_answer_for_kwargs_models():
    """``**kwargs`` counts as taking ``train`` everywhere; the graph used to call such a model without it."""
    assert graph.takes_train(Forwarding) and graph.takes_train(Forwarding())
    assert not graph.takes_train(Tower())
    assert graph.call_kwargs(Forwarding()) == (("train", False),) and graph.call_kwargs(Tower()) == ()
    assert common._with_train(Forwarding) is Forwarding and common._with_train(Tower) is not Tower
    model = Forwarding()
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)), train=False)
    assert structured.prunable_layers(model, variables=v, x=(1, 3)) == ("body",)


class TrainGate(nn.Module):
    """A layer whose ``__call__`` takes ``train`` (a Sequential forwards keywords to its first layer only)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(4, name="gate")(x)


def test_a_sequential_takes_train_as_its_first_layer_does():
    """``nn.Sequential.__call__(*args, **kwargs)`` passes keywords to its first layer only: a Dense first layer
    would fail on ``train=`` (graph.build raised that TypeError), a first layer with ``train`` takes it."""
    plain = nn.Sequential([nn.Dense(4), jax.nn.relu, nn.Dense(2)])
    gated = nn.Sequential([TrainGate(), jax.nn.relu, nn.Dense(2)])
    assert not graph.takes_train(plain) and graph.call_kwargs(plain) == ()
    assert graph.takes_train(gated) and not graph.takes_train(nn.Sequential([jax.nn.relu, nn.Dense(2)]))
    x = jnp.ones((2, 3))
    assert graph.build(plain, plain.init(jax.random.PRNGKey(0), x), x).prunable() == ("layers_0",)
