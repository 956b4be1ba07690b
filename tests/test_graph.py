"""The model graph (jaxprune.graph) on models written here, and the structure-dependent functions that read it:
unit removal vs masking, coupled residual widths, neuron merging exactness, FLOPs, and clear refusals."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import user_models as U
from jaxprune import graph, merging, models
from jaxprune import structured as st

KEY = jax.random.PRNGKey(0)
MODELS = {name: (model, shape) for name, model, shape in U.LINEN}


def _setup(name, seed=0):
    model, shape = MODELS[name]
    v = U.init(model, shape, seed)
    x = jax.random.normal(jax.random.PRNGKey(seed + 7), shape)
    return model, v, x


# ----------------------------------------------------------------------------------------------- the graph itself
def test_graph_reads_layers_wiring_and_batchnorm_from_the_models():
    model, v, x = _setup("strided_bn")
    g = graph.build(model, v, x)
    assert list(g.layers) == ["stem", "mid", "fc", "logits"]
    assert [g.layers[n].kind for n in g.layers] == ["conv", "conv", "dense", "dense"]
    assert g.layers["stem"].inputs == ("input",) and g.layers["fc"].inputs == ("mid",)
    assert g.layers["mid"].consumers == ("fc",) and g.layers["logits"].consumers == ()
    stem, mid = g.layers["stem"].bn, g.layers["mid"].bn
    assert g.net.paths[stem["var"]] == "batch_stats/stem_norm/var" and stem["layer_bias"] is None
    assert g.net.paths[mid["scale"]] == "params/mid_norm/scale" and g.net.paths[mid["layer_bias"]] == "params/mid/bias"
    np.testing.assert_allclose([stem["epsilon"], mid["epsilon"]], [1e-5, 1e-3], rtol=1e-6)
    assert g.prunable() == ("stem", "mid", "fc") and g.output_layers() == ("logits",)
    out, _ = graph.run(g, g.net.leaves, x)
    np.testing.assert_array_equal(out, model.apply(v, x))


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_residual_widths_are_coupled_and_nested_paths_are_module_paths():
    model, v, x = _setup("residual")
    g = graph.build(model, v, x)
    assert g.prunable() == ("block1/conv_a", "block2/conv_a")
    assert g.coupled_groups() == (("entry", "block1/conv_b", "block2/conv_b"),)
    assert set(g.layers["block2/conv_a"].inputs) == {"entry", "block1/conv_b", "block2/conv_b"}
    nested = graph.build(*_setup("nested")[:2], _setup("nested")[2])
    assert list(nested.layers) == ["encoder/lin0", "encoder/lin1", "decoder/lin0", "classifier"]


def test_nnx_model_through_split():
    m = U.nnx_model()
    gd, state = nnx.split(m)
    x = jax.random.normal(KEY, (2, 6, 6, 3))
    g = graph.build(gd, state, x)
    assert list(g.layers) == ["conv", "hidden", "head"] and g.prunable() == ("conv", "hidden")
    assert g.layers["conv"].bn is not None
    np.testing.assert_allclose(graph.run(g, g.net.leaves, x)[0], m(x), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------- removal = masking
def _masked_equals_removed(model, v, x, keep):
    small, sv = st.remove_many(model, v, keep, x=x)
    masked = st.mask_many(model, v, keep, x=x)
    if len(keep) == 1:
        (layer, k), = keep.items()
        one = st.mask_units(model, v, layer, k, x=x)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(one),
                                                         jax.tree_util.tree_leaves(masked)))
    if isinstance(small, nn.Module):
        got, want = small.apply(sv, x), model.apply(masked, x)
    else:
        got, want = nnx.merge(small, sv)(x), nnx.merge(model, masked)(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return small, sv


@pytest.mark.parametrize("name", list(MODELS))
def test_remove_units_gives_the_logits_of_mask_units_on_every_prunable_layer(name):
    model, v, x = _setup(name)
    layers = st.prunable_layers(model, variables=v)
    assert layers
    for i, layer in enumerate(layers):
        n = graph.build(model, v, x).layers[layer].units
        keep = np.sort(np.random.default_rng(i).choice(n, max(1, n // 2), replace=False))
        small, sv = _masked_equals_removed(model, v, x, {layer: keep})
        kernel = [a for p, a in jax.tree_util.tree_leaves_with_path(sv["params"])
                  if graph._path_str(p) == f"{layer}/kernel"][0]
        assert kernel.shape[-1] == keep.size
    # all at once, and masking really changes the output
    keep = {layer: np.arange(0, graph.build(model, v, x).layers[layer].units, 2) for layer in layers}
    _masked_equals_removed(model, v, x, keep)
    masked = st.mask_units(model, v, layers[0], keep[layers[0]], x=x)
    assert not np.allclose(model.apply(masked, x), model.apply(v, x), atol=1e-4)


def test_remove_units_on_the_nnx_model():
    gd, state = nnx.split(U.nnx_model())
    x = jax.random.normal(KEY, (2, 6, 6, 3))
    for layer, keep in (("conv", np.array([0, 2, 3])), ("hidden", np.array([1, 4, 5, 7]))):
        small, sv = _masked_equals_removed(gd, state, x, {layer: keep})
    assert nnx.merge(small, sv).hidden.kernel[...].shape == (5 * 9, 4)


def test_a_coupled_residual_width_shrinks_only_with_all_its_layers():
    model, v, x = _setup("residual")
    group = ("entry", "block1/conv_b", "block2/conv_b")
    with pytest.raises(ValueError, match=r"coupled.*block1/conv_b"):
        st.remove_units(model, v, "entry", [0, 1, 3], x=x)
    with pytest.raises(ValueError, match="coupled"):
        st.remove_many(model, v, {"entry": [0, 1, 3], "block1/conv_b": [0, 1, 3], "block2/conv_b": [0, 1, 2]}, x=x)
    small, sv = _masked_equals_removed(model, v, x, {layer: np.array([0, 1, 3]) for layer in group})
    assert small.width == 3 and sv["params"]["out"]["kernel"].shape == (3, 3)


def test_refusals_name_the_layer_and_the_reason():
    model, v, x = _setup("plain_mlp")
    with pytest.raises(ValueError, match="output layer"):
        st.remove_units(model, v, "head", [0], x=x)
    with pytest.raises(ValueError, match=r"layer='fc9'.*\['fc1', 'fc2', 'head'\]"):
        st.remove_units(model, v, "fc9", [0], x=x)

    class Softmaxed(nn.Module):  # a softmax over channels inside the network mixes fc1's units
        @nn.compact
        def __call__(self, x):
            x = jax.nn.softmax(nn.Dense(6, name="fc1")(x))
            return nn.Dense(2, name="fc2")(nn.relu(nn.Dense(5, name="mid")(x)))

    sm = Softmaxed()
    sv = sm.init(KEY, jnp.zeros((1, 3)))
    assert st.prunable_layers(sm, variables=sv) == ("mid",)
    with pytest.raises(ValueError, match=r"layer='fc1'.*(reduce_max|custom_jvp_call)"):
        st.remove_units(sm, sv, "fc1", [0, 1], x=jnp.zeros((1, 3)))

    class Grouped(nn.Module):  # a depthwise conv is not a supported linear layer
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), feature_group_count=2, name="dw")(x)
            return nn.Dense(2, name="out")(x.reshape((x.shape[0], -1)))

    gm = Grouped()
    gv = gm.init(KEY, jnp.zeros((1, 4, 4, 2)))
    with pytest.raises(ValueError, match=r"layer='dw'.*feature_group_count=2"):
        st.remove_units(gm, gv, "dw", [0], x=jnp.zeros((1, 4, 4, 2)))

    class Fixed(nn.Module):  # a width hard-coded in a parameter's shape: no way to rebuild it smaller
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="b")(nn.relu(x @ self.param("a", nn.initializers.ones, (3, 7))))

    fm = Fixed()
    fv = fm.init(KEY, jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match="with_widths"):
        st.remove_units(fm, fv, "params/a", [0, 1], x=jnp.zeros((1, 3)))
    masked = st.mask_units(fm, fv, "params/a", [0, 1], x=jnp.zeros((1, 3)))  # masking needs no rebuild
    assert int((np.asarray(masked["params"]["a"]) != 0).any(0).sum()) == 2


# ----------------------------------------------------------------------------------------------- merging
def test_merging_is_exact_for_positive_multiples_dense_with_bias():
    model, v, x = _setup("plain_mlp")
    p = v["params"]
    k, b = np.asarray(p["fc1"]["kernel"]).copy(), np.asarray(p["fc1"]["bias"]).copy()
    b[:] = np.random.default_rng(0).normal(size=b.shape)
    scales = np.array([0.5, 2.0, 3.0, 1.5])
    for j, (src, s) in enumerate(zip([0, 1, 2, 0], scales)):  # units 8..11 = s · units 0, 1, 2, 0
        k[:, 8 + j], b[8 + j] = s * k[:, src], s * b[src]
    v = {"params": {**p, "fc1": {"kernel": jnp.asarray(k), "bias": jnp.asarray(b)}}}
    out = merging.merge(model, v, {"fc1": 8}, keep={"fc1": np.arange(8)}, threshold=0.99, x=x)
    assert out.report["fc1"]["merged"] == 4 and out.model.hidden == (8, 9)
    np.testing.assert_allclose(out.model.apply(out.variables, x), model.apply(v, x), rtol=1e-5, atol=1e-5)
    pruned = merging.merge(model, v, {"fc1": 8}, keep={"fc1": np.arange(8)}, mode="prune", x=x)
    assert not np.allclose(pruned.model.apply(pruned.variables, x), model.apply(v, x), atol=1e-3)


def test_merging_is_exact_for_conv_batchnorm_with_zero_shift():
    model, v, x = _setup("strided_bn")
    p, bs = dict(v["params"]), dict(v["batch_stats"])
    k = np.asarray(p["stem"]["kernel"]).copy()  # (3, 3, 2, 6): filters 4, 5 = s · filters 1, 2
    var = np.asarray(bs["stem_norm"]["var"]).copy()
    gamma = np.abs(np.asarray(p["stem_norm"]["scale"])) + 0.1
    for dst, src, s in ((4, 1, 2.5), (5, 2, 0.4)):
        k[..., dst] = s * k[..., src]
    p["stem"] = {"kernel": jnp.asarray(k)}
    p["stem_norm"] = {"scale": jnp.asarray(gamma), "bias": jnp.zeros(6)}  # zero BN shift
    bs["stem_norm"] = {"mean": jnp.zeros(6), "var": jnp.asarray(var)}
    v = {"params": p, "batch_stats": bs}
    keep = np.array([0, 1, 2, 3])
    out = merging.merge(model, v, {"stem": 4}, keep={"stem": keep}, bn_scale="exact", threshold=0.99, x=x)
    assert out.report["stem"]["merged"] == 2 and out.model.c1 == 4
    np.testing.assert_allclose(out.model.apply(out.variables, x), model.apply(v, x), rtol=1e-5, atol=1e-5)


def test_merging_refuses_non_homogeneous_paths_and_coupled_layers():
    class Tanh(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="o")(jnp.tanh(nn.Dense(4, name="h")(x)))

    tm = Tanh()
    tv = tm.init(KEY, jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match="homogeneous"):
        merging.merge_layer(tm, tv, "h", 2, x=jnp.zeros((1, 3)))
    model, v, x = _setup("residual")
    with pytest.raises(ValueError, match="coupled"):
        merging.merge_layer(model, v, "block1/conv_b", 2, x=x)


# ----------------------------------------------------------------------------------------------- FLOPs
def test_count_flops_of_a_user_model_closed_form():
    model, v, _ = _setup("strided_bn")
    f = st.count_flops(model, v, (1, 12, 12, 2))
    # stem: stride 2 → 6×6 positions × 3·3·2·6; pool → 3×3; mid (pad (1,1),(0,2)): 3×(3+2-2)=3×3 × 3·3·6·5
    expect = {"stem": 36 * 108, "mid": 9 * 270, "fc": 45 * 7, "logits": 7 * 3}
    assert f["layers"] == expect and f["macs"] == sum(expect.values())
    assert st.count_flops(models.LeNet5(), models.init(models.LeNet5(), KEY, (1, 28, 28, 1)),
                          (1, 28, 28, 1))["layers"]["conv_1"] == 100 * 2400


def test_readme_bring_your_own_model_example_runs_as_written():
    import re
    from pathlib import Path

    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    section = text.split("## Bring your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["small"].hidden == (16, 16) and ns["sv"]["params"]["fc2"]["kernel"].shape == (16, 16)
    assert st.prunable_layers(ns["model"], variables=ns["v"]) == ("fc1", "fc2")


def test_merging_an_nnx_dense_layer_is_exact_for_positive_multiples():
    m = U.nnx_model()
    k, b = np.asarray(m.hidden.kernel[...]).copy(), np.random.default_rng(1).normal(size=8).astype(np.float32)
    for dst, src, s in ((6, 0, 2.0), (7, 3, 0.5)):
        k[:, dst], b[dst] = s * k[:, src], s * b[src]
    m.hidden.kernel[...] = jnp.asarray(k)
    m.hidden.bias[...] = jnp.asarray(b)
    gd, state = nnx.split(m)
    x = jax.random.normal(KEY, (2, 6, 6, 3))
    out = merging.merge(gd, state, {"hidden": 6}, keep={"hidden": np.arange(6)}, threshold=0.99, x=x)
    assert out.report["hidden"]["merged"] == 2
    merged = nnx.merge(out.model, out.variables)
    assert merged.head.kernel[...].shape == (6, 3)
    np.testing.assert_allclose(merged(x), m(x), rtol=1e-5, atol=1e-5)
