"""The graph on modern user models written in tests/modern_models.py: every product counted in FLOPs (attention,
DenseGeneral, depthwise and grouped convs) against closed forms, masking == removal whatever the activation,
tied and raw-parameter layers, and the parameters' roles in the program."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import modern_models as M
import user_models as U
from jaxprune import criteria, graph
from jaxprune import structured as st

KEY = jax.random.PRNGKey(3)


def _setup(model, shape, seed=0):
    v = U.init(model, shape, seed)
    return v, jax.random.normal(jax.random.PRNGKey(seed + 11), shape)


# ----------------------------------------------------------------------------------------------- FLOPs
def test_count_flops_counts_attention_products_and_dense_general_closed_form():
    h, p, c, d, heads, mlp, classes = 9, 3, 2, 8, 2, 12, 4
    model = M.TinyViT(patch=p, dim=d, classes=classes)
    v, _ = _setup(model, (2, h, h, c))
    t = (h // p) ** 2  # tokens
    patch = t * (p * p * c) * d
    qkv_out = 4 * t * d * d  # query, key, value and output projections (DenseGeneral)
    scores_and_mix = 2 * heads * t * t * (d // heads)  # q·kᵀ and attn·v
    mlp_macs = 2 * t * d * mlp
    expected = patch + qkv_out + scores_and_mix + mlp_macs + d * classes
    got = st.count_flops(model, v, (2, h, h, c))
    assert got["macs"] == expected and got["flops"] == 2 * expected and got["uncounted"] == ()
    assert got["layers"]["enc/mha/query"] == t * d * d and got["layers"]["patchify"] == patch


def test_count_flops_counts_depthwise_and_grouped_convolutions_closed_form():
    model = M.SeparableNet()
    s, cin = 7, 3
    v, _ = _setup(model, (2, s, s, cin))
    expand = s * s * 1 * 1 * cin * 8
    depthwise = s * s * 8 * (3 * 3 * 8 // 8)  # out elems · kh·kw·(cin / groups)
    grouped = (s - 2) ** 2 * 6 * (3 * 3 * 8 // 2)  # VALID padding, 2 groups
    got = st.count_flops(model, v, (1, s, s, cin))
    assert got["layers"] == {"expand": expand, "fin": 6 * 3, "dw": depthwise, "grouped": grouped}
    assert got["macs"] == expand + depthwise + grouped + 18


def test_count_flops_names_the_products_it_cannot_count():
    model = M.LoopedNet()
    v, _ = _setup(model, (2, 5))
    got = st.count_flops(model, v, (2, 5))
    assert got["macs"] == 5 * 4 and got["uncounted"] == ("scan after layer 'first'",)


# ----------------------------------------------------------------------------------------------- mask == remove
@pytest.mark.parametrize("model", [M.SigmoidMLP(), M.ReluThenNorm()], ids=["sigmoid", "relu_then_bn"])
def test_mask_units_equals_remove_units_when_the_activation_does_not_map_zero_to_zero(model):
    v, x = _setup(model, (4, 5))
    g = graph.build(model, v, x)
    layer = g.prunable()[0]
    keep = np.array([0, 2, 3])
    small, sv = st.remove_units(model, v, layer, keep, x=x)
    masked = st.mask_units(model, v, layer, keep, x=x)
    np.testing.assert_allclose(model.apply(masked, x), small.apply(sv, x), rtol=1e-5, atol=1e-5)
    both = {n: np.array([1, 4]) for n in g.prunable()}
    small, sv = st.remove_many(model, v, both, x=x)
    np.testing.assert_allclose(model.apply(st.mask_many(model, v, both, x=x), x), small.apply(sv, x),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- tied, raw
def test_a_kernel_read_transposed_is_a_tied_layer_coupled_to_its_partner():
    model = M.TiedAutoencoder(h=6, h2=5)
    v, x = _setup(model, (3, 5))
    g = graph.build(model, v, x)
    assert list(g.layers) == ["enc", "bottle", "back", "enc#2"] and g.output_layers() == ("enc#2",)
    assert g.prunable() == ("bottle",) and g.coupled_groups() == (("enc", "back"),)
    assert g.layers["enc#2"].kernel == g.layers["enc"].kernel and g.layers["enc#2"].in_axis == 1
    assert st.count_flops(model, v, (1, 5))["macs"] == 5 * 6 + 6 * 5 + 5 * 6 + 6 * 5  # the tied readout too
    keep = {"enc": np.array([0, 2, 5]), "back": np.array([0, 2, 5])}
    small, sv = st.remove_many(model, v, keep, x=x)
    assert sv["params"]["enc"]["kernel"].shape == (5, 3)
    np.testing.assert_allclose(model.apply(st.mask_many(model, v, keep, x=x), x), small.apply(sv, x),
                               rtol=1e-5, atol=1e-5)
    s = criteria.scores("taylor", model, v, x, jnp.zeros(3, jnp.int32))
    assert list(s) == ["enc", "bottle", "back"] and all(np.isfinite(a).all() for a in s.values())


def test_a_layer_applied_twice_has_two_names_and_no_index_error():
    model = M.SharedLayerNet()
    v, x = _setup(model, (3, 5))
    g = graph.build(model, v, x)
    assert list(g.layers) == ["lift", "shared", "shared#2", "out"] and g.output_layers() == ("out",)
    assert g.coupled_groups() == (("lift", "shared", "shared#2"),)
    assert st.count_flops(model, v, (1, 5))["macs"] == 5 * 6 + 2 * 6 * 6 + 6 * 2
    for c in ("weight", "grad", "taylor", "lrp"):
        s = criteria.scores(c, model, v, x, jnp.zeros(3, jnp.int32))
        assert {k: a.shape for k, a in s.items()} == {"lift": (6,), "shared": (6,), "shared#2": (6,)}


def test_raw_param_layers_are_read_with_their_parameter_paths():
    model = M.RawParamMLP()
    v, x = _setup(model, (3, 5))
    g = graph.build(model, v, x)
    assert list(g.layers) == ["params/w_in", "params/w_out"] and g.output_layers() == ("params/w_out",)
    assert g.net.paths[g.layers["params/w_in"].bias] == "params/b_in"
    s = criteria.scores("lrp", model, v, x, jnp.zeros(3, jnp.int32))
    assert s["params/w_in"].shape == (6,) and np.isfinite(s["params/w_in"]).all()


# ----------------------------------------------------------------------------------------------- roles
def _chosen(model, v, x, **kw):
    from jaxprune import masks

    t = masks.prunable_leaves(v["params"], predicate=graph.role_prunable(model, v, x, **kw))
    return sorted(masks.path_str(p) for p, b in jax.tree_util.tree_leaves_with_path(t) if b)


def test_prunable_by_role_leaves_attention_biases_norms_and_position_embeddings_out():
    model = M.TinyViT()
    x = jnp.zeros((1, 9, 9, 2))
    v = model.init(KEY, x)
    assert v["params"]["enc"]["mha"]["query"]["bias"].ndim == 2  # (heads, head_dim): ndim >= 2, not a weight
    kernels = ["cls_head/kernel", "enc/down_in/kernel", "enc/mha/key/kernel", "enc/mha/out/kernel",
               "enc/mha/query/kernel", "enc/mha/value/kernel", "enc/up/kernel", "patchify/kernel"]
    assert _chosen(model, v, x) == kernels


def test_embeddings_are_weights_only_when_asked_even_when_tied_to_the_readout():
    model = M.TokenTagger()
    ids = jnp.array([[1, 4, 2, 10], [0, 3, 3, 7]])
    v = model.init(KEY, ids)
    assert _chosen(model, v, ids) == ["mix/kernel", "pre/kernel"]
    assert _chosen(model, v, ids, embeddings=True) == ["mix/kernel", "pre/kernel", "tok/embedding"]


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_prunable_by_role_equals_the_ndim_rule_on_the_library_models():
    from jaxprune import masks, models

    for model, shape in [(models.MLP((7, 5, 3)), (1, 4, 4, 1)), (models.LeNet5(num_classes=3), (1, 28, 28, 1)),
                         (models.ConvNet(depth=2, num_classes=3, widths=(4, 5), hidden=(6, 5)), (1, 8, 8, 2)),
                         (models.ResNet(depth=8, num_classes=3, width=2), (1, 8, 8, 3))]:
        v = models.init(model, KEY, shape)
        x = jnp.zeros(shape)
        by_role = masks.prunable_leaves(v["params"], predicate=graph.role_prunable(model, v, x))
        assert by_role == masks.prunable_leaves(v["params"]), type(model).__name__


def test_imp_prunes_the_vit_kernels_not_its_attention_biases_or_position_embedding():
    from jaxprune import imp, train

    model = M.TinyViT()
    x = jax.random.normal(KEY, (4, 9, 9, 2))
    task = imp.Task(model, x, jnp.zeros(4, jnp.int32), x, jnp.zeros(4, jnp.int32), optim=train.OptimConfig(),
                    num_steps=1, batch_size=2)
    params = imp.init_variables(task, KEY)["params"]
    tree = imp.prunable_tree(task, imp.ImpConfig(exclude=("^cls_head/",), prune_biases=True), params)
    assert tree["enc"]["mha"]["query"]["kernel"] and tree["enc"]["mha"]["query"]["bias"]  # biased with its kernel
    assert not tree["pos"] and not tree["enc"]["ln1"]["scale"] and not tree["cls_head"]["kernel"]
    tree = imp.prunable_tree(task, imp.ImpConfig(), params)
    assert not tree["enc"]["mha"]["query"]["bias"] and tree["enc"]["mha"]["out"]["kernel"]


# ----------------------------------------------------------------------------------------------- the op registry
def test_an_unregistered_op_is_refused_by_name_and_one_registered_handler_makes_it_followable(monkeypatch):
    from jaxprune.graph import ops

    model = M.SortedTokens()
    v, x = _setup(model, (3, 4, 4))
    g = graph.build(model, v, x)
    assert g.prunable() == () and "sort is not an operation the graph can follow" in g.why_not_prunable("tok_in")
    with pytest.raises(graph.UnsupportedError, match="sort is not an operation .* after layer 'tok_in'"):
        criteria.scores("lrp", model, v, x, jnp.zeros(3, jnp.int32))

    monkeypatch.setattr(ops, "OPS", dict(ops.OPS))  # the registry and the graph cache restored after the test
    monkeypatch.setattr(graph.analyse, "_CACHE", {})

    @ops.register_op("sort")
    def sort_positions(e, t):  # sorting along positions keeps each value in its channel
        if int(e.params["dimension"]) == len(e.shapes[0]) - 1:
            return t.opaque(e, "sort along the channel axis")
        t.origin[e.outs[0]] = t.origin[t.acts(e)[0]]
        return "move", ""

    g = graph.build(model, v, x)
    assert g.prunable() == ("tok_in",)
    small, sv = st.remove_units(model, v, "tok_in", np.array([0, 3]), x=x)
    masked = st.mask_units(model, v, "tok_in", np.array([0, 3]), x=x)
    np.testing.assert_allclose(model.apply(masked, x), small.apply(sv, x), rtol=1e-5, atol=1e-5)


def test_mergeable_layers_lists_only_the_layers_merge_accepts():
    from jaxprune import merging

    for model in (M.SigmoidMLP(), M.ReluThenNorm()):  # sigmoid, BN after ReLU: not positively homogeneous
        v, x = _setup(model, (4, 5))
        layer = graph.build(model, v, x).prunable()[0]
        assert merging.mergeable_layers(model, variables=v) == ()
        with pytest.raises(ValueError, match="positively homogeneous"):
            merging.decompose_layer(model, v, layer, 2)
    plain, shape = U.PlainMLP(), (3, 5, 2)
    assert merging.mergeable_layers(plain, variables=U.init(plain, shape)) == ("fc1", "fc2")
