"""Unit groups (structured.unit_groups / group_widths / select_groups): attention heads scored once across their
q/k/v projections, key/value groups under grouped-query attention, and layers pruned alone, on a model written
here (raw einsum parameters, grouped-query attention, a SiLU layer)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import structured as st


class KVGroupNet(nn.Module):
    """(n, t, 6) → grouped-query attention on raw einsum kernels (``kv`` key/value heads, ``r`` query heads each,
    ``dh`` channels) → residual → dense (7) → SiLU → mean over tokens → dense (4)."""

    kv: int = 2
    r: int = 2
    dh: int = 3
    hidden: int = 7

    def with_widths(self, widths: dict) -> "KVGroupNet":
        return self.clone(kv=int(widths.get("params/wq", self.kv * self.r)) // self.r,
                          hidden=int(widths.get("hidden", self.hidden)))

    @nn.compact
    def __call__(self, x):
        n, t, d = x.shape
        init = nn.initializers.normal(0.4)
        wq = self.param("wq", init, (d, self.kv * self.r, self.dh))
        wk, wv = (self.param(f"w{c}", init, (d, self.kv, self.dh)) for c in "kv")
        wo = self.param("wo", init, (self.kv * self.r, self.dh, d))
        q = jnp.einsum("btd,dhk->bthk", x, wq).reshape(n, t, self.kv, self.r, self.dh)
        k, v = (jnp.einsum("btd,dgk->btgk", x, w) for w in (wk, wv))
        a = jax.nn.softmax(jnp.einsum("btgrk,bsgk->bgrts", q, k), axis=-1)
        o = jnp.einsum("bgrts,bsgk->btgrk", a, v).reshape(n, t, self.kv * self.r, self.dh)
        x = x + jnp.einsum("bthk,hkd->btd", o, wo)
        return nn.Dense(4, name="readout")(nn.silu(nn.Dense(self.hidden, name="hidden")(x)).mean(axis=1))


QKV = ("params/wq", "params/wk", "params/wv")


@pytest.fixture(scope="module")
def net():
    model = KVGroupNet(kv=3)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 6))
    return model, model.init(jax.random.PRNGKey(0), x), x


def test_groups_are_the_attention_and_the_layer_alone_with_kv_groups_as_units(net):
    model, v, x = net
    groups = st.unit_groups(model, v, x=x)
    assert groups == (QKV, ("hidden",))
    assert st.unit_groups(model, v, x=x, heads=False) == (("hidden",),)
    assert st.group_widths(model, v, groups, x=x) == {"params/wq": 3, "hidden": 7}


def test_a_weight_criterion_scores_each_kv_group_over_its_query_key_and_value_weights(net):
    model, v, x = net
    p = {k: np.asarray(v["params"][k], np.float64) for k in ("wq", "wk", "wv")}
    # kv group g: query heads 2g, 2g+1 (r = 2), key head g and value head g, all (d, dh) slices, in float64
    norms = [np.sqrt(sum((p["wq"][:, h] ** 2).sum() for h in (2 * g, 2 * g + 1)) + (p["wk"][:, g] ** 2).sum()
                     + (p["wv"][:, g] ** 2).sum()) for g in range(3)]
    top = np.sort(np.argsort(norms)[::-1][:2])
    keep = st.select_groups(model, v, {"params/wq": 2}, "l2", x=x)
    assert np.array_equal(keep["params/wk"], top) and np.array_equal(keep["params/wv"], top)
    assert np.array_equal(keep["params/wq"], np.sort(np.concatenate([2 * top, 2 * top + 1])))


def test_data_scores_of_a_group_are_summed_over_its_layers_and_units(net):
    model, v, x = net
    scores = {"params/wq": jnp.array([5.0, 0.0, 0.0, 0.0, 1.0, 1.0]), "params/wk": jnp.array([0.0, 3.0, 1.0]),
              "params/wv": jnp.array([0.0, 1.5, 0.0])}  # groups: 5, 4.5, 3
    keep = st.select_groups(model, v, {"params/wq": 1}, scores, x=x)
    assert keep["params/wk"].tolist() == [0] and keep["params/wq"].tolist() == [0, 1]
    keep = st.select_groups(model, v, {"params/wq": 2}, {**scores, "params/wv": jnp.array([0.0, 1.5, 1.6])}, x=x)
    assert keep["params/wk"].tolist() == [0, 2]  # 5, 4.5, 4.6
    with pytest.raises(ValueError, match=r"no scores for layers \['params/wv'\]"):
        st.select_groups(model, v, {"params/wq": 1}, {k: scores[k] for k in QKV[:2]}, x=x)


def test_removing_selected_groups_equals_masking_them_and_shrinks_every_head_axis(net):
    model, v, x = net
    keep = st.select_groups(model, v, {"params/wq": 1, "hidden": 4}, "l1", x=x)
    small, sv = st.remove_many(model, v, keep, x=x)
    masked = model.apply(st.mask_many(model, v, keep, x=x), x)
    np.testing.assert_allclose(small.apply(sv, x), masked, atol=1e-5)
    shapes = {k: a.shape for k, a in sv["params"].items() if k.startswith("w")}
    assert shapes == {"wq": (6, 2, 3), "wk": (6, 1, 3), "wv": (6, 1, 3), "wo": (2, 3, 6)}
    assert sv["params"]["hidden"]["kernel"].shape == (6, 4)


@pytest.mark.parametrize("criterion", ["l1", "l2_gm", "random", "kmeans"])
def test_a_layer_alone_selects_exactly_as_select_layers(net, criterion):
    model, v, x = net
    key = jax.random.PRNGKey(7)
    a = st.select_groups(model, v, {"hidden": 3}, criterion, key=key, x=x)
    b = st.select_layers(model, v, {"hidden": 3}, criterion, key=key, x=x)
    assert a.keys() == {"hidden"} and np.array_equal(a["hidden"], b["hidden"])


def test_refusals_name_the_layer_and_the_argument(net):
    model, v, x = net
    with pytest.raises(ValueError, match="layer='readout': cannot remove units"):
        st.select_groups(model, v, {"readout": 2}, "l1", x=x)
    with pytest.raises(ValueError, match=r"n_keep\['params/wq'\]=4"):
        st.select_groups(model, v, {"params/wq": 4}, "l1", x=x)
    with pytest.raises(ValueError, match="criterion='l3'"):
        st.select_groups(model, v, {"hidden": 2}, "l3", x=x)


def test_the_library_vit_prunes_heads_and_mlp_units_per_block():
    from jaxprune import models
    model = models.build("vit", 10)
    x = jnp.zeros((1, 28, 28, 1))
    v = jax.eval_shape(lambda: models.init(model, jax.random.PRNGKey(0), x.shape))
    groups = st.unit_groups(model, v, x=x)
    assert [grp[0] for grp in groups] == ["block_0_attn/query", "block_0_fc", "block_1_attn/query", "block_1_fc"]
    assert st.group_widths(model, v, groups, x=x) == dict(zip([grp[0] for grp in groups], [4, 128, 4, 128]))
    # MACs of one 28x28 image (16 patches + class token = 17 tokens, width 64, 4 heads of 16, MLP 128):
    # patch embedding 16·49·64; per block q/k/v/out 4·17·64·64, q·kᵀ and attention·v 2·17·17·64, MLP 2·17·64·128
    macs = 16 * 49 * 64 + 2 * (4 * 17 * 64 * 64 + 2 * 17 * 17 * 64 + 2 * 17 * 64 * 128) + 64 * 10
    assert st.count_flops(model, v, x.shape)["macs"] == macs


class ReshapedHeads(nn.Module):
    """(n, t, 8) → dense q/k/v (8) reshaped into 2 heads of 4 → softmax attention → merged → dense (8) → residual →
    gated pair (silu(a)·b, 5 units: one unit per layer in each class, not heads) → dense (3) on the mean."""

    @nn.compact
    def __call__(self, x):
        n, t, d = x.shape
        q, k, v = (nn.Dense(d, name=f"p{c}")(x).reshape(n, t, 2, d // 2) for c in "qkv")
        a = jax.nn.softmax(jnp.einsum("bthc,bshc->bhts", q, k), axis=-1)
        x = x + nn.Dense(d, name="mix")(jnp.einsum("bhts,bshc->bthc", a, v).reshape(n, t, d))
        h = nn.silu(nn.Dense(5, name="ga")(x)) * nn.Dense(5, name="gb")(x)
        return nn.Dense(3, name="o")(h.mean(axis=1))


def test_dense_projections_reshaped_into_heads_are_a_heads_group_and_a_gated_pair_is_not():
    model = ReshapedHeads()
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 8))
    v = model.init(jax.random.PRNGKey(0), x)
    groups = st.unit_groups(model, v, x=x)
    assert groups == (("pq", "pk", "pv"),)
    assert st.group_widths(model, v, groups, x=x) == {"pq": 2}
    p = {c: np.concatenate([np.asarray(v["params"][c]["kernel"], np.float64),
                            np.asarray(v["params"][c]["bias"], np.float64)[None]]) for c in ("pq", "pk", "pv")}
    l1 = [sum(np.abs(p[c][:, 4 * h:4 * h + 4]).sum() for c in p) for h in range(2)]
    keep = st.select_groups(model, v, {"pq": 1}, "l1", x=x)
    head = int(np.argmax(l1))
    assert all(keep[c].tolist() == list(range(4 * head, 4 * head + 4)) for c in ("pq", "pk", "pv"))
    keep = st.select_groups(model, v, {"ga": 3}, "l2", x=x)  # the gated pair, asked for by name
    assert keep.keys() == {"ga", "gb"} and np.array_equal(keep["ga"], keep["gb"])


class NormedResidual(nn.Module):
    """(n, 6, 6, 2) → conv (4) → residual conv (4) → GroupNorm (2 groups) → ReLU → mean → dense (3): a coupled group
    of two layers whose classes hold 2 channels each, made by the norm, not by heads."""

    @nn.compact
    def __call__(self, x):
        a = nn.Conv(4, (3, 3), name="c_a")(x)
        a = a + nn.Conv(4, (3, 3), name="c_b")(a)
        return nn.Dense(3, name="fc")(nn.relu(nn.GroupNorm(num_groups=2, name="gn")(a)).mean(axis=(1, 2)))


def test_a_residual_stream_grouped_by_a_groupnorm_is_not_listed_as_heads():
    model = NormedResidual()
    x = jnp.zeros((1, 6, 6, 2))
    v = model.init(jax.random.PRNGKey(0), x)
    from jaxprune import graph
    assert graph.build(model, v, x).coupled_groups() == (("c_a", "c_b"),)
    assert st.unit_groups(model, v, x=x) == ()
    assert st.group_widths(model, v, [("c_a", "c_b")], x=x) == {"c_a": 2}


class OneHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=1, qkv_features=4, name="att")(x, x)
        return nn.Dense(2, name="o")(x.mean(1))


def test_a_single_head_is_scored_with_its_bias_rows():
    """A one-head attention's bias (1, head_dim) has a size-1 head axis the graph does not follow as a slice; the
    head's vector still holds its kernel and bias (it raised StopIteration before)."""
    from jaxprune import graph
    model = OneHead()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
    v = model.init(jax.random.PRNGKey(1), x)
    p = {**v["params"]["att"]["key"], "bias": jnp.arange(1.0, 5.0)[None]}  # (1, head_dim), nonzero
    v = {"params": {**v["params"], "att": {**v["params"]["att"], "key": p}}}
    g = graph.build(model, v, x)
    want = np.concatenate([np.asarray(p["kernel"]).reshape(-1), np.asarray(p["bias"]).reshape(-1)])
    np.testing.assert_allclose(np.sort(np.asarray(st.unit_params(g, "att/key")["kernel"]).ravel()), np.sort(want))
    keep = st.select_groups(model, v, {"att/query": 1}, "l1", x=x)
    assert {k: a.tolist() for k, a in keep.items()} == {"att/query": [0], "att/key": [0], "att/value": [0]}
