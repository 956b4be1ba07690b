"""jaxprune.models: shapes, names, representations, closed-form forward passes, clear errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import models

KEY = jax.random.PRNGKey(0)


def _relu(x):
    return np.maximum(x, 0)


def test_mlp_equals_its_matrix_formula():
    m = models.MLP((5, 4, 3))
    v = models.init(m, KEY, (1, 2, 3, 1))  # inputs are flattened: 6 features
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (7, 2, 3, 1)), np.float64)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
    h = x.reshape(7, -1)
    h = _relu(h @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
    h = _relu(h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"])
    ref = h @ p["dense_2"]["kernel"] + p["dense_2"]["bias"]
    np.testing.assert_allclose(m.apply(v, jnp.asarray(x, jnp.float32)), ref, rtol=1e-5, atol=1e-5)
    reps = models.representations(m, v, jnp.asarray(x, jnp.float32))
    assert list(reps) == ["dense_0", "dense_1", "logits"]
    np.testing.assert_allclose(reps["dense_1"], h, rtol=1e-5, atol=1e-5)


def test_mlp_no_relu_after_and_bias_free():
    m = models.MLP((4, 4, 2), use_bias=False, no_relu_after=(1,))
    v = models.init(m, KEY, (1, 3))
    assert set(v["params"]["dense_0"]) == {"kernel"}
    x = jax.random.normal(KEY, (16, 3))
    reps = models.representations(m, v, x)
    assert (reps["dense_0"] >= 0).all() and (reps["dense_1"] < 0).any()  # second hidden layer is linear
    # bias-free ReLU nets are positively homogeneous: f(a x) = a f(x)
    np.testing.assert_allclose(m.apply(v, 3.0 * x), 3.0 * m.apply(v, x), rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
    m = models.MLP((64, 2), dropout=0.5)
    v = models.init(m, KEY, (1, 3))
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 3))
    # Eval mode is the identity: the same weights without dropout give bit-identical outputs.
    np.testing.assert_array_equal(m.apply(v, x), models.MLP((64, 2)).apply(v, x))
    a = m.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = m.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(a, b)
    # Inverted dropout, seen through an identity output layer: every hidden unit is 0 or h / (1 - rate).
    eye = {"params": {**v["params"], "dense_1": {"kernel": jnp.eye(64), "bias": jnp.zeros(64)}}}
    m64 = models.MLP((64, 64), dropout=0.5)
    h = np.asarray(m64.apply(eye, x))  # eval: the hidden ReLU activations themselves
    np.testing.assert_allclose(h, np.maximum(np.asarray(x) @ np.asarray(v["params"]["dense_0"]["kernel"]), 0),
                               rtol=1e-5, atol=1e-6)  # zero biases (he_normal)
    t = np.asarray(m64.apply(eye, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)}))
    live = h > 0
    kept = np.isclose(t, 2.0 * h, rtol=1e-5, atol=0) & live
    assert np.all(kept | (t == 0)) and 0 < kept.sum() < live.sum()
    with pytest.raises(ValueError, match="dropout"):
        models.init(models.MLP((4, 4, 2), dropout=(0.5,)), KEY, (1, 3))


@pytest.mark.parametrize("name,shape,reps,nparams", [
    ("lenet5", (28, 28, 1), ["conv_0", "pool_0", "conv_1", "pool_1", "dense_0", "dense_1", "logits"], 61706),
    ("lenet300", (28, 28, 1), ["dense_0", "dense_1", "logits"], 266610),
    ("conv2", (32, 32, 3), ["conv_0", "conv_1", "pool_0", "dense_0", "dense_1", "logits"], 4301642),
    ("resnet20", (32, 32, 3), None, 272474),  # the published count of CIFAR ResNet-20 (0.27M)
    ("vgg11", (32, 32, 3), None, None),
])
@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_model_zoo(name, shape, reps, nparams):
    m = models.build(name, 10)
    v = models.init(m, KEY, (1,) + shape)
    x = jnp.ones((2,) + shape)
    out = m.apply(v, x)
    assert out.shape == (2, 10)
    r = models.representations(m, v, x)
    np.testing.assert_allclose(r["logits"], out, rtol=1e-6)
    assert list(r)[-1] == "logits"
    if reps is not None:
        assert list(r) == reps
    if nparams is not None:
        assert models.count_params(v["params"]) == nparams
    assert m.output_layer in v["params"]


def test_lenet5_shapes_and_vgg16_cfg():
    m = models.LeNet5()
    v = models.init(m, KEY, (1, 28, 28, 1))
    r = models.representations(m, v, jnp.ones((1, 28, 28, 1)))
    assert [r[k].shape[1:] for k in ("conv_0", "pool_0", "conv_1", "pool_1")] == [
        (28, 28, 6), (14, 14, 6), (10, 10, 16), (5, 5, 16)]
    assert v["params"]["dense_0"]["kernel"].shape == (400, 120)
    vgg = models.build("vgg16", 10)
    vv = models.init(vgg, KEY, (1, 32, 32, 3))
    convs = [k for k in vv["params"] if k.startswith("conv_")]
    assert len(convs) == 13 and vv["params"]["dense_0"]["kernel"].shape == (512, 10)
    assert set(vv["batch_stats"]["bn_0"]) == {"mean", "var"}


def test_lenet5_average_pooling_is_the_mean_of_each_2x2_block():
    m = models.build("lenet5", 10, pool="avg")
    v = models.init(m, KEY, (1, 28, 28, 1))
    r = models.representations(m, v, jax.random.normal(KEY, (2, 28, 28, 1)))
    c = np.asarray(r["conv_1"], np.float64)  # (2, 10, 10, 16)
    want = c.reshape(2, 5, 2, 5, 2, 16).mean((2, 4))
    np.testing.assert_allclose(np.asarray(r["pool_1"]), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want, c.reshape(2, 5, 2, 5, 2, 16).max((2, 4)))
    with pytest.raises(ValueError, match="pool='avg'.*model='mlp'"):
        models.build("mlp", 10, pool="avg")
    with pytest.raises(ValueError, match="pool='min'"):
        models.build("lenet5", 10, pool="min")


def test_batchnorm_statistics_update_only_in_training():
    m = models.build("vgg11", 10)
    v = models.init(m, KEY, (1, 32, 32, 3))
    x = jax.random.normal(KEY, (4, 32, 32, 3)) + 2.0
    _, new = m.apply(v, x, train=True, mutable=["batch_stats"])
    before, after = v["batch_stats"]["bn_0"]["mean"], new["batch_stats"]["bn_0"]["mean"]
    assert not np.allclose(before, after)
    _, same = m.apply(v, x, train=False, mutable=["batch_stats"])
    assert same == {} or np.allclose(same["batch_stats"]["bn_0"]["mean"], before)


def test_bad_model_names_and_depths():
    with pytest.raises(ValueError, match="model='resnet'"):
        models.build("resnet", 10)
    with pytest.raises(ValueError, match=r"depth=21"):
        models.init(models.ResNet(21), KEY, (1, 32, 32, 3))
    with pytest.raises(ValueError, match="model='alexnet'"):
        models.build("alexnet", 10)


@pytest.mark.parametrize("init", sorted(models.INITS))
def test_mlp_initialisers_match_their_distributions(init):
    """Kernel std of each initialiser from its closed form; torch_default: kernel and bias U(±1/√fan_in)."""
    fan_in, width = 400, 600
    model = models.MLP((width, 10), weight_init=init)
    p = models.init(model, jax.random.PRNGKey(0), (2, fan_in))["params"]["dense_0"]
    k, b = np.asarray(p["kernel"]), np.asarray(p["bias"])
    expected_std = {"he_normal": np.sqrt(2.0 / fan_in), "lecun_normal": np.sqrt(1.0 / fan_in),
                    "glorot_uniform": np.sqrt(2.0 / (fan_in + width)),
                    "torch_default": 1.0 / np.sqrt(3.0 * fan_in)}[init]
    assert k.std() == pytest.approx(expected_std, rel=0.02)  # 240 000 draws: the sampling error is ~0.3 %
    if init == "torch_default":
        bound = 1.0 / np.sqrt(fan_in)
        assert np.abs(k).max() <= bound and np.abs(k).max() > 0.99 * bound
        assert np.abs(b).max() <= bound and b.std() == pytest.approx(bound / np.sqrt(3.0), rel=0.15)
    else:
        assert not b.any()  # zero biases
    with pytest.raises(ValueError, match="weight_init"):
        models.build("mlp", 10, weight_init="kaiming")


def test_lenet5_valid_padding_and_pytorch_initialisation():
    """``padding="valid"``: 24×24 conv_0 maps and a 16·4·4 = 256-unit flatten; ``torch_default``: every kernel and
    bias U(±1/√fan_in) with fan_in = kh·kw·c_in for the convolutions."""
    m = models.build("lenet5", 10, pool="avg", padding="valid", weight_init="torch_default")
    v = models.init(m, KEY, (1, 28, 28, 1))
    r = models.representations(m, v, jnp.ones((1, 28, 28, 1)))
    assert r["conv_0"].shape[1:] == (24, 24, 6) and r["pool_1"].shape[1:] == (4, 4, 16)
    assert v["params"]["dense_0"]["kernel"].shape == (256, 120)
    for name, fan_in in (("conv_0", 25), ("conv_1", 150), ("dense_0", 256), ("dense_2", 84)):
        bound = 1.0 / np.sqrt(fan_in)
        for leaf in ("kernel", "bias"):
            a = np.abs(np.asarray(v["params"][name][leaf]))
            assert a.max() <= bound and a.max() > 0.5 * bound, (name, leaf)
    he = models.init(models.build("lenet5", 10), KEY, (1, 28, 28, 1))["params"]
    assert not np.asarray(he["conv_0"]["bias"]).any()
    with pytest.raises(ValueError, match="padding='valid'.*model='conv4'"):
        models.build("conv4", 10, padding="valid")
    with pytest.raises(ValueError, match="weight_init='torch_default'.*model='vgg11'"):
        models.build("vgg11", 10, weight_init="torch_default")
