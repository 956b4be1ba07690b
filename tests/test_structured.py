"""jaxprune.structured: unit layout, exact selection counts and tie-breaking, the criteria against float64
references, KMeans removing duplicates first, masked ≡ physically shrunk networks, FLOP counts, clear errors."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_

from jaxprune import merging, models
from jaxprune import structured as st

KEY = jax.random.PRNGKey(0)


# ----------------------------------------------------------------------------------------------- layout
def test_unit_vectors_dense_conv_and_bias():
    k = np.arange(6.0).reshape(2, 3)  # (in=2, out=3)
    np.testing.assert_array_equal(st.unit_vectors(k), [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(st.unit_vectors(k, np.array([7.0, 8, 9])), [[0, 3, 7], [1, 4, 8], [2, 5, 9]])
    c = np.arange(2 * 2 * 3 * 4.0).reshape(2, 2, 3, 4)
    v = np.asarray(st.unit_vectors(c))
    assert v.shape == (4, 12)
    for o in range(4):
        np.testing.assert_array_equal(v[o], c[..., o].ravel())
    with pytest.raises(ValueError, match="bias"):
        st.unit_vectors(k, np.ones(2))
    with pytest.raises(ValueError, match="kernel"):
        st.unit_vectors(np.ones(3))


# ----------------------------------------------------------------------------------------------- selection
def _ref_scores(kernel: np.ndarray, criterion: str) -> np.ndarray:
    v = kernel.reshape(-1, kernel.shape[-1]).T.astype(np.float64)
    if criterion == "l1":
        return np.abs(v).sum(1)
    if criterion == "l2":
        return np.sqrt((v ** 2).sum(1))
    # l2_gm: sum_j ||v_i - v_j||_2, written out pair by pair
    return np.array([sum(np.linalg.norm(v[i] - v[j]) for j in range(len(v))) for i in range(len(v))])


@settings(max_examples=20, deadline=None)
@given(n=st_.integers(1, 12), d=st_.integers(1, 6), conv=st_.booleans(), seed=st_.integers(0, 10_000),
       crit=st_.sampled_from(["l1", "l2", "l2_gm"]), frac=st_.floats(0.0, 1.0))
def test_select_units_matches_float64_reference(n, d, conv, seed, crit, frac):
    rng = np.random.default_rng(seed)
    shape = (2, 2, d, n) if conv else (d, n)
    kernel = rng.normal(size=shape).astype(np.float32)
    n_keep = int(round(frac * n))
    kept = np.asarray(st.select_units(kernel, n_keep, crit))
    assert kept.dtype == np.int32 and kept.shape == (n_keep,)
    assert np.all(np.diff(kept) > 0)
    ref = _ref_scores(kernel, crit)
    order = np.argsort(-ref, kind="stable")
    np.testing.assert_array_equal(kept, np.sort(order[:n_keep]))


def test_ties_keep_the_lower_index():
    col = np.array([1.0, -2.0, 0.5])
    kernel = np.stack([col, col, 2 * col, col, col], axis=1)  # units 0,1,3,4 tie; unit 2 is largest
    for crit in ("l1", "l2"):
        np.testing.assert_array_equal(st.select_units(kernel, 3, crit), [0, 1, 2])
    np.testing.assert_array_equal(st.select_by_scores(jnp.array([1.0, 2, 2, 0, 2]), 2), [1, 2])
    np.testing.assert_array_equal(st.select_by_scores(jnp.zeros(5), 3), [0, 1, 2])


def test_l2_gm_removes_the_unit_nearest_the_geometric_median_first():
    u = np.array([1.0, 2.0, -1.0])
    kernel = np.stack([t * u for t in (-2.0, -1.0, 0.1, 1.0, 2.5)], axis=1)  # collinear; 0.1·u is central
    np.testing.assert_array_equal(st.select_units(kernel, 4, "l2_gm"), [0, 1, 3, 4])
    np.testing.assert_array_equal(st.select_units(kernel, 2, "l2_gm"), [0, 4])
    # l2 norm would drop the same central unit first but then the -1 (norm 1) one, unlike l2_gm's ordering
    np.testing.assert_array_equal(st.select_units(kernel, 2, "l2"), [0, 4])
    s = np.asarray(st.unit_scores(kernel, "l2_gm"))
    np.testing.assert_allclose(s, _ref_scores(kernel, "l2_gm"), rtol=1e-6)


def test_random_needs_a_key_and_is_deterministic_per_key():
    kernel = np.ones((3, 20))
    with pytest.raises(ValueError, match="key"):
        st.select_units(kernel, 5, "random")
    a = st.select_units(kernel, 5, "random", key=jax.random.PRNGKey(1))
    b = st.select_units(kernel, 5, "random", key=jax.random.PRNGKey(1))
    c = st.select_units(kernel, 5, "random", key=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (5,) and not np.array_equal(a, c)


def _layer_with_duplicates(seed: int = 0):
    rng = np.random.default_rng(seed)
    distinct = rng.normal(size=(3, 3, 2, 6)) * 3.0
    dup_of = [1, 4, 4]
    kernel = np.concatenate([distinct, distinct[..., dup_of]], axis=-1)  # units 6,7,8 copy units 1,4,4
    return kernel, dup_of


def test_kmeans_removes_duplicated_filters_first():
    kernel, dup_of = _layer_with_duplicates()
    groups = [{0}, {1, 6}, {2}, {3}, {4, 7, 8}, {5}]
    for seed in range(3):
        kept = set(np.asarray(st.select_units(kernel, 6, "kmeans", key=jax.random.PRNGKey(seed))).tolist())
        assert len(kept) == 6
        assert all(len(kept & g) == 1 for g in groups), kept  # exactly one copy of every distinct filter
    # n_keep above the number of distinct filters: fill with the duplicates last (7 kept → one duplicate)
    kept = np.asarray(st.select_units(kernel, 7, "kmeans"))
    assert kept.shape == (7,) and sum(len(set(kept.tolist()) & g) for g in groups) == 7
    # deterministic given the key
    k1 = st.select_units(kernel, 4, "kmeans", key=jax.random.PRNGKey(5))
    k2 = st.select_units(kernel, 4, "kmeans", key=jax.random.PRNGKey(5))
    np.testing.assert_array_equal(k1, k2)


def test_kmeans_keeps_the_member_nearest_each_centre():
    # two tight clusters of 3 filters each: the centre of each is its middle member
    a, b = np.array([10.0, 0.0]), np.array([0.0, 10.0])
    units = [a - [0.1, 0], a, a + [0.2, 0], b - [0, 0.1], b, b + [0, 0.2]]
    kernel = np.stack(units, axis=1)
    np.testing.assert_array_equal(st.select_units(kernel, 2, "kmeans"), [1, 4])


def test_selection_errors():
    k = np.ones((3, 4))
    with pytest.raises(ValueError, match="criterion"):
        st.select_units(k, 2, "l3")
    with pytest.raises(ValueError, match="n_keep"):
        st.select_units(k, 5, "l1")
    with pytest.raises(ValueError, match="n_keep"):
        st.select_units(k, 2.5, "l1")
    with pytest.raises(ValueError, match="scores"):
        st.select_by_scores(jnp.array([1.0, jnp.nan]), 1)
    with pytest.raises(ValueError, match="scores"):
        st.select_by_scores(jnp.ones((2, 2)), 1)
    assert st.n_keep_for(10, 0.25) == 7 and st.n_keep_for(200, 0.99) == 2 and st.n_keep_for(5, 0.0) == 5


# ----------------------------------------------------------------------------------------------- removal
def _randomize(variables, key):
    """Random params and BatchNorm statistics (init leaves BN at the identity, which hides mistakes)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, (path, x) in zip(keys, leaves):
        name = str(path[-1].key)
        if name == "var":
            out.append(jax.random.uniform(k, x.shape, minval=0.5, maxval=2.0))
        elif name == "scale":
            out.append(jax.random.uniform(k, x.shape, minval=0.5, maxval=1.5))
        elif name in ("mean", "bias"):
            out.append(0.3 * jax.random.normal(k, x.shape))
        else:
            out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


CASES = {
    "mlp": (lambda: models.MLP((9, 7, 3), use_bias=True), (5, 6)),
    "mlp_nobias": (lambda: models.MLP((9, 7, 3), use_bias=False), (5, 6)),
    "lenet5": (lambda: models.LeNet5(widths=(4, 5, 12, 8)), (3, 28, 28, 1)),
    "conv2": (lambda: models.ConvNet(2, widths=(6, 5), hidden=(8, 7)), (3, 8, 8, 2)),
    "vgg_small": (lambda: models.VGG((6, "M", 5, 4), num_classes=3), (3, 8, 8, 2)),
    "resnet8": (lambda: models.ResNet(8, num_classes=3, width=4), (2, 8, 8, 3)),
}


def _reps(model, variables, x):
    """Representations under one jit (eager op-by-op dispatch is many times slower for a ResNet)."""
    return jax.jit(lambda v, x: models.representations(model, v, x))(variables, x)


def _logits(model, variables, x):
    return jax.jit(lambda v, x: model.apply(v, x))(variables, x)


def _shapes_abstract(model, x_shape):
    return jax.eval_shape(lambda k: models.init(model, k, x_shape), KEY)


def _shapes(model, x_shape):
    return jax.tree_util.tree_map(jnp.shape, _shapes_abstract(model, x_shape))


def _check_equivalence(model, variables, x, layer, keep, full=None):
    small, sv = st.remove_units(model, variables, layer, keep)
    masked = st.mask_units(model, variables, layer, keep)
    # the smaller definition initialises to exactly the shapes of the shrunk variables (same names)
    assert _shapes(small, x.shape) == jax.tree_util.tree_map(jnp.shape, sv)
    reps = _reps(small, sv, x)
    np.testing.assert_allclose(reps["logits"], _logits(model, masked, x), rtol=1e-5, atol=1e-5)
    # the kept units compute what they computed in the full network
    if full is not None and layer in full:
        np.testing.assert_allclose(reps[layer], np.asarray(full[layer])[..., keep], rtol=1e-5, atol=1e-5)
    return small, sv


LAYERS = {"lenet5": ("conv_1", "dense_0"), "conv2": ("conv_0", "conv_1"),
          "resnet8": ("block0_0/conv_0", "block1_0/conv_0")}


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@pytest.mark.parametrize("name", list(CASES))
def test_masked_and_shrunk_networks_give_the_same_logits(name):
    build, shape = CASES[name]
    model = build()
    v = _randomize(jax.jit(lambda k: models.init(model, k, shape))(KEY), jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), shape)
    layers = st.prunable_layers(model, variables=v)
    if name == "resnet8":
        assert layers == ("block0_0/conv_0", "block1_0/conv_0", "block2_0/conv_0")
    full = _reps(model, v, x)
    for layer in LAYERS.get(name, layers):
        n = st.widths(model, v)[layer]
        keep = st.select_units(st.layer_params(v, layer)["kernel"], max(1, n // 2), "l1")
        _check_equivalence(model, v, x, layer, keep, full)


def test_masking_matters_and_manual_mask_agrees_for_mlp():
    """Independent construction: zero the columns by hand; and check masking does change the output."""
    model = models.MLP((9, 7, 3), use_bias=False)
    v = models.init(model, KEY, (1, 6))
    x = jax.random.normal(KEY, (5, 6))
    keep = np.array([0, 2, 3, 8])
    k0 = np.asarray(v["params"]["dense_0"]["kernel"]).copy()
    k0[:, np.setdiff1d(np.arange(9), keep)] = 0.0
    manual = {"params": {**v["params"], "dense_0": {"kernel": jnp.asarray(k0)}}}
    small, sv = st.remove_units(model, v, "dense_0", keep)
    assert small.features == (4, 7, 3)
    np.testing.assert_allclose(small.apply(sv, x), model.apply(manual, x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(model.apply(v, x), model.apply(manual, x), atol=1e-3)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_shrinking_every_layer_of_a_vgg_and_resnet_in_sequence():
    for name in ("vgg_small", "resnet8"):
        build, shape = CASES[name]
        model = build()
        v = _randomize(jax.jit(lambda k: models.init(model, k, shape))(KEY), jax.random.PRNGKey(3))
        x = jax.random.normal(jax.random.PRNGKey(4), shape)
        n_keep = {layer: max(1, n - 2) for layer, n in st.widths(model, v).items()}
        keep = st.select_layers(model, v, n_keep, "random", key=jax.random.PRNGKey(5))
        masked = v
        for layer, k in keep.items():
            masked = st.mask_units(model, masked, layer, k)
        small, sv = st.remove_many(model, v, keep)
        assert st.widths(small, sv) == n_keep
        np.testing.assert_allclose(_logits(small, sv, x), _logits(model, masked, x), rtol=1e-5, atol=1e-5)
        if name == "resnet8":
            assert small.block_widths == (2, 6, 14)
            # residual widths unchanged
            assert sv["params"]["block2_0"]["conv_1"]["kernel"].shape == (3, 3, 14, 16)


def test_resnet20_every_block_shrinks_to_the_matching_definition():
    """Shapes only (abstract evaluation): all nine block-internal convs of a ResNet-20 at once."""
    model, shape = models.ResNet(20), (1, 32, 32, 3)
    layers = st.prunable_layers(model, x=shape)
    assert layers == tuple(f"block{s}_{b}/conv_0" for s in range(3) for b in range(3))
    keep = {layer: np.arange(0, 16 * 2 ** int(layer[5]), 2) for layer in layers}  # every other filter
    abstract = jax.eval_shape(lambda k: models.init(model, k, shape), KEY)
    zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
    small, sv = st.remove_many(model, zeros, keep)
    assert small.block_widths == (8, 8, 8, 16, 16, 16, 32, 32, 32)
    assert _shapes(small, shape) == jax.tree_util.tree_map(jnp.shape, sv)
    assert sv["params"]["block1_0"]["shortcut_conv"]["kernel"].shape == (1, 1, 16, 32)  # residual path intact


def test_reshape_boundary_conv_to_flatten_dense_by_hand():
    """LeNet5 conv_1 → pool → flatten (5·5·c) → dense_0: rows of channel ``c`` sit at positions ``p·C + c``."""
    model = models.LeNet5(widths=(2, 3, 4, 4))
    v = models.init(model, KEY, (1, 28, 28, 1))
    keep = np.array([0, 2])
    _, sv = st.remove_units(model, v, "conv_1", keep)
    k = np.asarray(v["params"]["dense_0"]["kernel"])  # (75, 4)
    rows = [p * 3 + c for p in range(25) for c in keep]
    np.testing.assert_array_equal(sv["params"]["dense_0"]["kernel"], k[rows])


def test_select_layers_accepts_score_dicts_and_callables():
    model = models.MLP((4, 3, 2))
    v = models.init(model, KEY, (1, 5))
    scores = {"dense_0": jnp.array([0.1, 0.9, 0.5, 0.9]), "dense_1": jnp.array([3.0, 1.0, 2.0])}
    keep = st.select_layers(model, v, {"dense_0": 2, "dense_1": 1}, scores)
    np.testing.assert_array_equal(keep["dense_0"], [1, 3])
    np.testing.assert_array_equal(keep["dense_1"], [0])
    keep = st.select_layers(model, v, {"dense_0": 1}, lambda layer, p: -jnp.arange(p["kernel"].shape[-1]))
    np.testing.assert_array_equal(keep["dense_0"], [0])
    with pytest.raises(ValueError, match="no scores"):
        st.select_layers(model, v, {"dense_1": 1}, {"dense_0": jnp.ones(4)})
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        st.select_layers(model, v, {"dense_0": 1}, {"dense_0": jnp.ones(3)})


def test_removal_errors_are_clear():
    model = models.MLP((4, 3, 2))
    v = models.init(model, KEY, (1, 5))
    with pytest.raises(ValueError, match="output layer"):
        st.remove_units(model, v, "dense_2", [0])
    with pytest.raises(ValueError, match="every unit"):
        st.remove_units(model, v, "dense_0", np.array([], np.int32))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        st.remove_units(model, v, "dense_0", [0, 4])
    with pytest.raises(ValueError, match="unique"):
        st.remove_units(model, v, "dense_0", [1, 1])
    with pytest.raises(ValueError, match="integer"):
        st.remove_units(model, v, "dense_0", [0.5])
    res = models.ResNet(8, width=2)
    rv = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), _shapes_abstract(res, (1, 8, 8, 3)))
    for layer in ("stem_conv", "block0_0/conv_1", "block1_0/shortcut_conv"):
        with pytest.raises(ValueError, match="residual"):
            st.remove_units(res, rv, layer, [0])
    with pytest.raises(TypeError, match="model"):
        st.prunable_layers(models.BasicBlock(4))
    # the next layer's shape does not match the pruned layer (hand-edited variables): refuse
    bad = {"params": {**v["params"], "dense_1": {"kernel": jnp.ones((5, 3)), "bias": jnp.ones(3)}}}
    with pytest.raises(ValueError, match="does not run"):
        st.remove_units(model, bad, "dense_0", [0, 1])


def test_width_overrides_keep_default_shapes_and_names():
    for default, override, shape in [
        (models.LeNet5(), models.LeNet5(widths=(6, 16, 120, 84)), (1, 28, 28, 1)),
        (models.ConvNet(2), models.ConvNet(2, widths=(64, 64), hidden=(256, 256)), (1, 8, 8, 3)),
        (models.ResNet(8), models.ResNet(8, block_widths=(16, 32, 64)), (1, 8, 8, 3)),
    ]:
        assert _shapes(default, shape) == _shapes(override, shape)
    assert _shapes(models.ResNet(8, block_widths=(3, 32, 64)), (1, 8, 8, 3))["params"]["block0_0"]["conv_1"][
        "kernel"] == (3, 3, 3, 16)
    with pytest.raises(ValueError, match="widths"):
        _shapes(models.ConvNet(2, widths=(3,)), (1, 8, 8, 3))


# ----------------------------------------------------------------------------------------------- FLOPs
def test_count_flops_closed_forms():
    abstract = lambda m, shape: jax.eval_shape(lambda k: models.init(m, k, shape), KEY)  # no compute needed
    f = st.count_flops(models.LeNet5(), abstract(models.LeNet5(), (1, 28, 28, 1)), (1, 28, 28, 1))
    # conv_0: 28·28 positions × 5·5·1·6; conv_1: 10·10 × 5·5·6·16; dense: 400·120 + 120·84 + 84·10
    expect = {"conv_0": 784 * 150, "conv_1": 100 * 2400, "dense_0": 48000, "dense_1": 10080, "dense_2": 840}
    assert f["layers"] == expect and f["macs"] == sum(expect.values()) and f["flops"] == 2 * f["macs"]
    res = models.ResNet(8, width=2)
    fr = st.count_flops(res, abstract(res, (1, 8, 8, 3)), (1, 8, 8, 3))
    assert fr["layers"]["block1_0/conv_0"] == 4 * 4 * 3 * 3 * 2 * 4  # stride 2: 4×4 output positions
    assert fr["layers"]["block1_0/shortcut_conv"] == 4 * 4 * 2 * 4
    assert fr["layers"]["dense"] == 8 * 10


def test_mask_units_validates_keep_like_remove_units():
    """A boolean mask used to be cast to indices [1, 0, 1, 0] and floats truncated; now both functions refuse the
    same inputs and agree on the rest. Only an empty keep differs: masking may silence a whole layer."""
    model = models.MLP((4, 3, 2))
    v = models.init(model, KEY, (1, 5))
    for bad, match in (([True, False, True, False], "integer"), ([0.9, 2.9], "integer"), ([1, 1], "unique"),
                       ([0, 4], r"\[0, 4\)"), ([[0, 2]], "1-D")):
        for fn in (st.mask_units, lambda *a: st.remove_units(*a)[1]):
            with pytest.raises(ValueError, match=match):
                fn(model, v, "dense_0", np.array(bad))
    masked = st.mask_units(model, v, "dense_0", jnp.array([0, 2], jnp.int32))
    kernel = np.asarray(v["params"]["dense_0"]["kernel"])
    np.testing.assert_array_equal(masked["params"]["dense_0"]["kernel"], kernel * np.array([1, 0, 1, 0]))
    x = jax.random.normal(KEY, (3, 5))
    small, sv = st.remove_units(model, v, "dense_0", [0, 2])
    np.testing.assert_allclose(small.apply(sv, x), model.apply(masked, x), rtol=1e-5, atol=1e-6)
    silenced = st.mask_units(model, v, "dense_0", np.array([], np.int64))
    assert not np.asarray(silenced["params"]["dense_0"]["kernel"]).any()


@pytest.mark.parametrize("hidden", [(6,), (6, 7, 8)])
def test_convnet_output_layer_follows_the_number_of_hidden_layers(hidden):
    """ConvNet.output_layer was hard-coded 'dense_2': wrong (a hidden layer, or a missing one) unless len == 2."""
    model = models.ConvNet(depth=2, widths=(2, 3), hidden=hidden, num_classes=2)
    v = models.init(model, KEY, (1, 4, 4, 1))
    out = f"dense_{len(hidden)}"
    assert model.output_layer == out and v["params"][out]["kernel"].shape[-1] == 2
    assert st.prunable_layers(model, variables=v)[-1] == f"dense_{len(hidden) - 1}"
    with pytest.raises(ValueError, match="output layer"):
        st.remove_units(model, v, out, [0])
    with pytest.raises(ValueError, match="output layer"):
        merging.merge_layer(model, v, out, 1)
    last_hidden = f"dense_{len(hidden) - 1}"
    small, _, dec = merging.merge_layer(model, v, last_hidden, 2)
    assert small.hidden == hidden[:-1] + (2,) and dec.keep.shape == (2,)
