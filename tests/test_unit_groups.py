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
