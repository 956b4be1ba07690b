"""Depthwise and grouped convolutions, normalisations over channels and elementwise activations in the graph, on
models written here (MobileNetV2-style inverted residuals, a ConvNeXt-style block net, GroupNorm and RMSNorm nets):
removal == masking to 1e-5, parameter counts and MACs against closed forms, exact removal against a smaller model
written with the sliced parameters, refusals that name the layer or the norm."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import criteria, graph
from jaxprune import structured as st

KEY = jax.random.PRNGKey(5)


def _noisy(v: dict, seed: int = 1) -> dict:
    """Every variable perturbed (biases and BatchNorm shifts non-zero, variances positive), so masks are exercised."""
    leaves, tree = jax.tree_util.tree_flatten(v)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [a + 0.3 * jnp.abs(jax.random.normal(k, a.shape)) for a, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def _setup(model, shape, seed=0):
    v = _noisy(model.init(jax.random.PRNGKey(seed), jnp.zeros(shape)), seed + 1)
    return v, jax.random.normal(jax.random.PRNGKey(seed + 7), shape)


def _n_params(v: dict) -> int:
    return int(sum(np.size(a) for a in jax.tree_util.tree_leaves(v["params"])))


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- depthwise convs
def _relu6(x):
    return jnp.minimum(jnp.maximum(x, 0.0), 6.0)  # written with min/max, not jax.nn.relu6


class InvertedNet(nn.Module):
    """stem 3×3 (s) → BN → ReLU6 → two inverted residuals [1×1 expand (h) → BN → ReLU6 → depthwise 3×3 (h·m, the
    second dilated by 2) → BN → ReLU6 → 1×1 project (s) → BN] + skip → mean → dense."""

    stem: int = 6
    hidden: tuple = (12, 10)
    mult: tuple = (1, 2)
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        bn = lambda name: nn.BatchNorm(use_running_average=True, name=name)
        x = _relu6(bn("stem_bn")(nn.Conv(self.stem, (3, 3), padding="SAME", name="stem")(x)))
        for i, (h, m) in enumerate(zip(self.hidden, self.mult)):
            y = _relu6(bn(f"b{i}_bn1")(nn.Conv(h, (1, 1), name=f"b{i}_expand")(x)))
            y = nn.Conv(h * m, (3, 3), feature_group_count=h, padding="SAME", kernel_dilation=(i + 1, i + 1),
                        name=f"b{i}_dw")(y)
            y = _relu6(bn(f"b{i}_bn2")(y))
            x = x + bn(f"b{i}_bn3")(nn.Conv(self.stem, (1, 1), name=f"b{i}_project")(y))
        return nn.Dense(self.classes, name="head")(x.mean(axis=(1, 2)))


def _inverted_counts(c, hw, s, hidden, mult, classes):
    """(parameters, MACs) of InvertedNet written out: conv kernels + biases, BatchNorm scale + bias per channel."""
    params = 9 * c * s + s + 2 * s + s * classes + classes
    macs = hw * 9 * c * s + s * classes
    for h, m in zip(hidden, mult):
        params += (s * h + h + 2 * h) + (9 * h * m + h * m + 2 * h * m) + (h * m * s + s + 2 * s)
        macs += hw * (s * h + 9 * h * m + h * m * s)  # depthwise: kh·kw·(cin / groups = 1) per output element
    return params, macs


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_depthwise_channels_follow_their_input_and_removal_equals_masking():
    model, shape = InvertedNet(), (2, 7, 7, 3)
    v, x = _setup(model, shape)
    g = graph.build(model, v, x)
    assert list(g.layers) == ["stem", "b0_expand", "b0_project", "b1_expand", "b1_project", "head"]
    assert g.prunable() == ("b0_expand", "b1_expand")
    assert g.coupled_groups() == (("stem", "b0_project", "b1_project"),)
    assert g.layers["b1_expand"].consumers == ("b1_project",)
    assert _inverted_counts(3, 49, 6, (12, 10), (1, 2), 3) == (_n_params(v), st.count_flops(model, v, shape)["macs"])
    keep0, keep1 = np.array([0, 2, 3, 5, 7, 8, 11]), np.array([1, 2, 4, 9])
    small, sv = st.remove_units(model, v, "b1_expand", keep1, x=x)
    _close(small.apply(sv, x), model.apply(st.mask_units(model, v, "b1_expand", keep1, x=x), x))
    assert small.hidden == (12, 4) and sv["params"]["b1_dw"]["kernel"].shape == (3, 3, 1, 8)
    np.testing.assert_array_equal(sv["batch_stats"]["b1_bn2"]["mean"],
                                  v["batch_stats"]["b1_bn2"]["mean"][np.repeat(keep1 * 2, 2) + np.tile([0, 1], 4)])
    both = {"b0_expand": keep0, "b1_expand": keep1}
    small, sv = st.remove_many(model, v, both, x=x)
    _close(small.apply(sv, x), model.apply(st.mask_many(model, v, both, x=x), x))
    assert _inverted_counts(3, 49, 6, (7, 4), (1, 2), 3) == (_n_params(sv), st.count_flops(small, sv, shape)["macs"])
    assert graph.depthwise_groups(g, graph.shrink(g, both)) == {"b0_dw": 7, "b1_dw": 4}
    with pytest.raises(ValueError, match="'b1_dw'.*depthwise convolution .*remove them at the layer that produces"):
        st.remove_units(model, v, "b1_dw", keep1, x=x)


def test_the_stream_through_depthwise_blocks_shrinks_as_one_coupled_group():
    model, shape = InvertedNet(), (2, 6, 6, 3)
    v, x = _setup(model, shape, seed=2)
    keep = np.array([0, 1, 3, 4])
    stream = {"stem": keep, "b0_project": keep, "b1_project": keep}
    small, sv = st.remove_many(model, v, stream, x=x)
    _close(small.apply(sv, x), model.apply(st.mask_many(model, v, stream, x=x), x))
    assert small.stem == 4 and _n_params(sv) == _inverted_counts(3, 36, 4, (12, 10), (1, 2), 3)[0]
    s = criteria.scores("taylor", model, v, x, jnp.zeros(2, jnp.int32))
    assert {k: a.shape for k, a in s.items()} == {"stem": (6,), "b0_expand": (12,), "b0_project": (6,),
                                                  "b1_expand": (10,), "b1_project": (6,)}
    assert all(np.isfinite(a).all() for a in s.values())


class GroupedNet(nn.Module):
    """1×1 conv (9) → sigmoid → 3×3 conv in 3 groups (9 → 6, stride 3: a stride equal to the group count) → ReLU →
    mean → dense (2); every width written inline."""

    @nn.compact
    def __call__(self, x):
        x = jax.nn.sigmoid(nn.Conv(9, (1, 1), name="wide")(x))
        x = nn.relu(nn.Conv(6, (3, 3), strides=3, feature_group_count=3, name="trio")(x))
        return nn.Dense(2, name="out")(x.mean(axis=(1, 2)))


def _grouped_counts(cin: int, groups: int, k: int, m: int, pos_in: int, pos_out: int) -> tuple[int, int]:
    """(parameters, MACs per example) of GroupedNet with ``groups`` groups of ``k`` inputs and ``m`` outputs."""
    c, o = groups * k, groups * m
    params = (cin * c + c) + (9 * k * o + o) + (o * 2 + 2)
    macs = pos_in * cin * c + pos_out * o * 9 * k + o * 2
    return params, macs


def test_a_grouped_convolution_loses_whole_groups_and_its_group_count_follows():
    model, shape = GroupedNet(), (2, 6, 6, 2)
    v, x = _setup(model, shape)
    g = graph.build(model, v, x)
    assert list(g.layers) == ["wide", "out"] and g.prunable() == ("wide",)
    with pytest.raises(ValueError, match=r"layer='trio'.*grouped convolution \(feature_group_count=3 of 9 input"):
        st.remove_units(model, v, "trio", np.array([0, 1]), x=x)
    assert (_n_params(v), st.count_flops(model, v, shape)["macs"]) == _grouped_counts(2, 3, 3, 2, 36, 4)
    keep = {"wide": np.array([0, 1, 2, 6, 7, 8])}  # groups 0 and 2
    small, sv = st.remove_many(model, v, keep, x=x)
    _close(small.apply(sv, x), model.apply(st.mask_many(model, v, keep, x=x), x))
    assert sv["params"]["trio"]["kernel"].shape == (3, 3, 3, 4)
    np.testing.assert_array_equal(sv["params"]["trio"]["kernel"], v["params"]["trio"]["kernel"][..., [0, 1, 4, 5]])
    assert (_n_params(sv), st.count_flops(small, sv, shape)["macs"]) == _grouped_counts(2, 2, 3, 2, 36, 4)
    half = r"coupled to units \['wide\[3\]', 'wide\[4\]'\] .*grouped convolution's channel group"
    with pytest.raises(ValueError, match=half):
        st.remove_many(model, v, {"wide": np.array([0, 1, 2, 3, 4, 6, 7, 8])}, x=x)


def test_select_layers_keeps_whole_groups_before_a_grouped_convolution():
    model, shape = GroupedNet(), (2, 6, 6, 2)
    v, x = _setup(model, shape)
    scores = {"wide": jnp.array([9.0, 8, 0, 7, 0, 0, 0, 0, 6])}  # top 4: units 0, 1 (group 0), 3 (1), 8 (2)
    assert st.select_layers(model, v, {"wide": 4}, scores, x=x)["wide"].tolist() == [0, 1, 2, 3, 4, 5]  # tie: 1
    assert st.select_layers(model, v, {"wide": 3}, scores, x=x)["wide"].tolist() == [0, 1, 2]
    keep = st.select_layers(model, v, {"wide": 6}, "l1", x=x)
    assert len(keep["wide"]) == 6 and st.remove_many(model, v, keep, x=x)[1]["params"]["trio"]["bias"].shape == (4,)


def test_an_nnx_grouped_convolution_is_rebuilt_with_its_new_group_count():
    from flax import nnx

    class Grouped(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.spread = nnx.Conv(2, 9, (1, 1), rngs=rngs)
            self.split = nnx.Conv(9, 6, (3, 3), feature_group_count=3, rngs=rngs)
            self.read = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            return self.read(jnp.tanh(self.split(jax.nn.sigmoid(self.spread(x)))).mean(axis=(1, 2)))

    x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 5, 2))
    gd, state = nnx.split(Grouped(nnx.Rngs(0)))
    keep = {"spread": np.array([0, 1, 2, 6, 7, 8])}
    small_gd, small_state = st.remove_many(gd, state, keep, x=x)
    conv = nnx.merge(small_gd, small_state).split
    assert (conv.in_features, conv.out_features, conv.feature_group_count, conv.kernel_shape) == (6, 4, 2,
                                                                                                  (3, 3, 3, 4))
    _close(nnx.merge(small_gd, small_state)(x), nnx.merge(gd, st.mask_many(gd, state, keep, x=x))(x))


# ----------------------------------------------------------------------------------------------- LayerNorm stream
class NextBlocks(nn.Module):
    """2×2 patch conv (d) → two blocks [depthwise 7×7 → LayerNorm → 1×1 (``mlp``, 4d) → GELU → 1×1 (d)] + skip →
    mean → LayerNorm → dense."""

    dim: int = 6
    mlp: tuple = (24, 24)
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.dim, (2, 2), strides=(2, 2), name="patch")(x)
        for i in range(2):
            y = nn.Conv(self.dim, (7, 7), feature_group_count=self.dim, padding="SAME", name=f"s{i}_dw")(x)
            y = nn.LayerNorm(name=f"s{i}_norm")(y)
            y = nn.Conv(self.dim, (1, 1), name=f"s{i}_down")(nn.gelu(nn.Conv(self.mlp[i], (1, 1),
                                                                              name=f"s{i}_up")(y)))
            x = x + y
        return nn.Dense(self.classes, name="cls")(nn.LayerNorm(name="final")(x.mean(axis=(1, 2))))


def _slice_stream(p: dict, keep: np.ndarray) -> dict:
    """NextBlocks' parameters with the stream channels ``keep`` written out per leaf (the exact definition)."""
    out = {"patch": {"kernel": p["patch"]["kernel"][..., keep], "bias": p["patch"]["bias"][keep]},
           "final": {k: a[keep] for k, a in p["final"].items()},
           "cls": {"kernel": p["cls"]["kernel"][keep], "bias": p["cls"]["bias"]}}
    for i in range(2):
        out[f"s{i}_dw"] = {"kernel": p[f"s{i}_dw"]["kernel"][..., keep], "bias": p[f"s{i}_dw"]["bias"][keep]}
        out[f"s{i}_norm"] = {k: a[keep] for k, a in p[f"s{i}_norm"].items()}
        out[f"s{i}_up"] = {"kernel": p[f"s{i}_up"]["kernel"][:, :, keep], "bias": p[f"s{i}_up"]["bias"]}
        out[f"s{i}_down"] = {"kernel": p[f"s{i}_down"]["kernel"][..., keep], "bias": p[f"s{i}_down"]["bias"][keep]}
    return out


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_layernorm_stream_channels_are_removed_as_a_smaller_model_and_masking_them_is_refused():
    model, shape = NextBlocks(), (2, 8, 8, 3)
    v, x = _setup(model, shape, seed=3)
    g = graph.build(model, v, x)
    assert g.prunable() == ("s0_up", "s1_up") and g.coupled_groups() == (("patch", "s0_down", "s1_down"),)
    assert sorted(g.norms) == ["final", "s0_norm", "s1_norm"]
    d, hw = 6, 16
    macs = hw * (4 * 3 * d + 2 * (49 * d + 2 * 4 * d * d)) + d * 3
    params = 4 * 3 * d + d + 2 * (49 * d + d + 2 * d + 2 * (4 * d * d) + 4 * d + d) + 2 * d + 3 * d + 3
    assert (st.count_flops(model, v, shape)["macs"], _n_params(v)) == (macs, params)
    hidden = {"s0_up": np.arange(0, 24, 2), "s1_up": np.array([1, 5, 7, 20])}  # the MLP units: masking == removal
    small, sv = st.remove_many(model, v, hidden, x=x)
    _close(small.apply(sv, x), model.apply(st.mask_many(model, v, hidden, x=x), x))
    keep = np.array([0, 2, 3, 5])
    stream = {"patch": keep, "s0_down": keep, "s1_down": keep}
    small, sv = st.remove_many(model, v, stream, x=x)
    fresh = NextBlocks(dim=4)
    ref = fresh.apply({"params": _slice_stream(v["params"], keep)}, x)
    _close(small.apply(sv, x), ref)
    assert small.dim == 4 and jax.tree_util.tree_structure(sv) == jax.tree_util.tree_structure(
        fresh.init(KEY, x))
    with pytest.raises(ValueError, match=r"normalised together with other channels by 's0_norm' .*remove_units"):
        st.mask_many(model, v, stream, x=x)
    s = criteria.scores("grad", model, v, x, jnp.zeros(2, jnp.int32))
    assert {k: a.shape for k, a in s.items()} == {"patch": (6,), "s0_up": (24,), "s0_down": (6,), "s1_up": (24,),
                                                  "s1_down": (6,)} and all(np.isfinite(a).all() for a in s.values())


# ----------------------------------------------------------------------------------------------- GroupNorm
class GroupedNormNet(nn.Module):
    """3×3 conv (width) → GroupNorm (groups of ``size``, or ``groups`` groups) → SiLU → 3×3 conv (5) → mean → dense."""

    width: int = 8
    size: int | None = 2
    groups: int | None = None

    def with_widths(self, widths: dict) -> "GroupedNormNet":
        return self.clone(width=widths.get("feat", self.width))  # num_groups (``groups``) does not follow

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.width, (3, 3), name="feat")(x)
        x = nn.silu(nn.GroupNorm(num_groups=self.groups, group_size=self.size, name="gn")(x))
        return nn.Dense(2, name="o")(nn.Conv(5, (3, 3), name="mix")(x).mean(axis=(1, 2)))


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_groupnorm_groups_are_coupled_and_removing_whole_groups_is_exact():
    model, shape = GroupedNormNet(), (2, 6, 6, 3)
    v, x = _setup(model, shape, seed=4)
    g = graph.build(model, v, x)
    assert g.prunable() == ("feat", "mix") and g.norms["gn"].shape == (4, 2) and not g.normed
    keep = np.array([2, 3, 6, 7])  # groups 1 and 3
    small, sv = st.remove_units(model, v, "feat", keep, x=x)
    p = v["params"]
    sliced = {"feat": {"kernel": p["feat"]["kernel"][..., keep], "bias": p["feat"]["bias"][keep]},
              "gn": {k: a[keep] for k, a in p["gn"].items()},
              "mix": {"kernel": p["mix"]["kernel"][:, :, keep], "bias": p["mix"]["bias"]}, "o": p["o"]}
    _close(small.apply(sv, x), GroupedNormNet(width=4).apply({"params": sliced}, x))
    _close(small.apply(sv, x), model.apply(st.mask_units(model, v, "feat", keep, x=x), x))
    with pytest.raises(ValueError, match="a norm.s channel group"):
        st.remove_units(model, v, "feat", np.array([0, 2, 3, 6, 7]), x=x)  # half of group 0


class InlineGroups(nn.Module):
    """3×3 conv (width) → GroupNorm with 2 groups written inline → SiLU → mean → dense."""

    width: int = 8

    def with_widths(self, widths: dict) -> "InlineGroups":
        return self.clone(width=widths["feat"])

    @nn.compact
    def __call__(self, x):
        x = nn.silu(nn.GroupNorm(num_groups=2, name="gn")(nn.Conv(self.width, (3, 3), name="feat")(x)))
        return nn.Dense(2, name="o")(x.mean(axis=(1, 2)))


def test_a_rebuilt_groupnorm_group_count_follows_its_field_or_is_refused_naming_the_norm():
    model, shape = GroupedNormNet(width=8, size=None, groups=2), (2, 5, 5, 3)
    v, x = _setup(model, shape)
    keep = np.arange(4)  # group 0 of 2
    small, sv = st.remove_units(model, v, "feat", keep, x=x)  # with_widths sets the width, not the groups
    assert (small.width, small.groups) == (4, 1)
    _close(small.apply(sv, x), model.apply(st.mask_units(model, v, "feat", keep, x=x), x))
    inline = InlineGroups()
    v = _noisy(inline.init(KEY, x))
    with pytest.raises(ValueError, match=r"normalises 'gn' in 2 groups of 2 channels, the shrunk variables keep 1 "
                                         r"groups of 4"):  # width 4 with 2 groups would be groups of 2: wrong
        st.remove_units(inline, v, "feat", np.arange(4, 8), x=x)


# ----------------------------------------------------------------------------------------------- activations, RMSNorm
def _hard_swish(v):
    return v * jnp.clip(v + 3.0, 0.0, 6.0) / 6.0


class ActStream(nn.Module):
    """in → dense (d) → four pre-RMSNorm MLP blocks with GELU, SiLU, hard-swish and ReLU6 (``clip``), each
    [RMSNorm → dense (h_i) → act → dense (d)] + skip → RMSNorm → dense (2)."""

    dim: int = 5
    hidden: tuple = (7, 6, 8, 4)

    @nn.compact
    def __call__(self, x):
        acts = (nn.gelu, nn.silu, _hard_swish, lambda v: jnp.clip(v, 0.0, 6.0))
        x = nn.Dense(self.dim, name="lift")(x)
        for i, (h, act) in enumerate(zip(self.hidden, acts)):
            y = nn.Dense(h, name=f"m{i}_in")(nn.RMSNorm(name=f"m{i}_rms")(x))
            x = x + nn.Dense(self.dim, name=f"m{i}_out")(act(y))
        return nn.Dense(2, name="head")(nn.RMSNorm(name="rms_f")(x))


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_any_elementwise_activation_is_followed_and_rmsnorm_streams_shrink_exactly():
    model, shape = ActStream(), (3, 4)
    v, x = _setup(model, shape, seed=6)
    g = graph.build(model, v, x)
    assert g.prunable() == ("m0_in", "m1_in", "m2_in", "m3_in") and sorted(g.norms) == [
        "m0_rms", "m1_rms", "m2_rms", "m3_rms", "rms_f"]
    hidden = {"m0_in": np.array([0, 3, 6]), "m1_in": np.array([1, 2]), "m2_in": np.array([0, 4, 5, 7]),
              "m3_in": np.array([3])}
    small, sv = st.remove_many(model, v, hidden, x=x)
    assert small.hidden == (3, 2, 4, 1)
    _close(small.apply(sv, x), model.apply(st.mask_many(model, v, hidden, x=x), x))
    keep = np.array([0, 1, 4])
    stream = {"lift": keep, **{f"m{i}_out": keep for i in range(4)}}
    small, sv = st.remove_many(model, v, stream, x=x)
    p = v["params"]
    sliced = {"lift": {"kernel": p["lift"]["kernel"][:, keep], "bias": p["lift"]["bias"][keep]},
              "rms_f": {"scale": p["rms_f"]["scale"][keep]}, "head": {"kernel": p["head"]["kernel"][keep],
                                                                      "bias": p["head"]["bias"]}}
    for i in range(4):
        sliced[f"m{i}_rms"] = {"scale": p[f"m{i}_rms"]["scale"][keep]}
        sliced[f"m{i}_in"] = {"kernel": p[f"m{i}_in"]["kernel"][keep], "bias": p[f"m{i}_in"]["bias"]}
        sliced[f"m{i}_out"] = {"kernel": p[f"m{i}_out"]["kernel"][:, keep], "bias": p[f"m{i}_out"]["bias"][keep]}
    _close(small.apply(sv, x), ActStream(dim=3).apply({"params": sliced}, x))
    with pytest.raises(ValueError, match="by 'm0_rms'"):
        st.mask_many(model, v, stream, x=x)


class StatisticElsewhere(nn.Module):
    """A channel mean used as a feature (concatenated) and as an offset of other channels: not a norm."""

    @nn.compact
    def __call__(self, x):
        a = nn.relu(nn.Dense(4, name="a")(x))
        b = nn.relu(nn.Dense(3, name="b")(x))
        c = nn.relu(nn.Dense(5, name="c")(jnp.concatenate([b, b.mean(axis=-1, keepdims=True)], axis=-1)))
        return nn.Dense(2, name="out")(nn.relu(nn.Dense(5, name="d")(a)) + a.sum(axis=-1, keepdims=True) + c)


def test_a_channel_reduction_that_is_not_a_norm_still_freezes_its_channels():
    model = StatisticElsewhere()
    v, x = _setup(model, (3, 4))
    g = graph.build(model, v, x)
    assert g.prunable() == () and not g.norms and not g.normed
    assert "normalised by statistics of other channels" in g.why_not_prunable("a")
    assert "reduce_sum over the channel axis" in g.why_not_prunable("b")


def test_classic_lrp_refuses_a_layernorm_by_name_and_attn_lrp_conserves_through_it():
    """A norm's statistic has no classic LRP rule: refused naming the op and the layer before it (not a leaked
    tracer); the attn_lrp composite holds the normalising factor constant and conserves the target logit."""
    from jaxprune import lrp

    class DenseNormDense(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(6, name="inner", use_bias=False)(x))
            x = nn.LayerNorm(name="norm_x", use_bias=False, use_scale=False)(x)
            return nn.Dense(3, name="outer", use_bias=False)(x)

    model, x = DenseNormDense(), jax.random.normal(jax.random.PRNGKey(0), (4, 5))
    v = model.init(jax.random.PRNGKey(1), x)
    with pytest.raises(graph.UnsupportedError, match="reduce_sum after layer 'inner'.*attn_lrp"):
        lrp.relevance(model, v, x, composite="epsilon")
    r = lrp.relevance(model, v, x, composite="attn_lrp")
    np.testing.assert_allclose(np.asarray(r.input).sum(1), np.asarray(r.logits)[np.arange(4), np.asarray(r.target)],
                               rtol=1e-4)
