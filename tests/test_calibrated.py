"""Calibrated one-shot pruning: SparseGPT against a float64 OBS reference, Wanda's scores by hand, N:M masks,
sequential calibration on a 2-layer net, layer discovery from the jaxpr (DenseGeneral, readout)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import calibrated as C


# ----------------------------------------------------------------------------------------------- references
def _lowest_first(scores_flat: np.ndarray) -> np.ndarray:
    """Indices in pruning order: lowest score first, ties: the later position first."""
    idx = np.arange(scores_flat.size)
    return np.lexsort((-idx, scores_flat))


def obs_reference(w: np.ndarray, x: np.ndarray, pattern: C.Pattern, damp: float, bs: int):
    """SparseGPT (paper, Algorithm 1) column by column in float64 without lazy blocks: the OBS update of the
    remaining inputs F = {j, …} uses the explicit inverse of H[F, F]; masks chosen every ``bs`` (unstructured) or
    ``m`` (N:M) columns from w²/[H_F⁻¹]_00 of the weights as they are then."""
    h = x.T.astype(np.float64) @ x.astype(np.float64)
    wt = w.T.astype(np.float64).copy()  # (out, in)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    k_in = wt.shape[1]
    keep = np.ones_like(wt, bool)
    inv_diag = lambda c: np.linalg.inv(h[c:, c:])[0, 0]  # noqa: E731
    for j in range(k_in):
        step = pattern.m if pattern.is_nm else bs
        if j % step == 0:
            cols = list(range(j, min(j + step, k_in)))
            s = np.stack([wt[:, c] ** 2 / inv_diag(c) for c in cols])  # (cols, out): kernel orientation
            if pattern.is_nm:
                for r in range(wt.shape[0]):
                    for i in _lowest_first(s[:, r])[:pattern.m - pattern.n]:
                        keep[r, cols[i]] = False
            else:
                n_prune = math.ceil(pattern.sparsity * s.size - 1e-9)
                for f in _lowest_first(s.reshape(-1))[:n_prune]:
                    keep[f % wt.shape[0], cols[f // wt.shape[0]]] = False
        hinv = np.linalg.inv(h[j:, j:])
        err = (wt[:, j] - wt[:, j] * keep[:, j]) / hinv[0, 0]
        wt[:, j:] -= err[:, None] * hinv[0][None, :]
    return wt.T, keep.T


@pytest.mark.parametrize("pattern,k_in,bs", [("50%", 40, 16), ("0.3", 24, 128), ("2:4", 32, 16), ("4:8", 32, 8)])
def test_sparsegpt_equals_float64_obs_reference(pattern, k_in, bs):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, k_in)) * rng.uniform(0.5, 2.0, size=k_in)
    x[:, 5] = 0.0  # a dead input
    w = rng.normal(size=(k_in, 12))
    p = C.parse_pattern(pattern)
    got_w, got_keep = C.sparsegpt(jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32), p, 0.01, bs)
    want_w, want_keep = obs_reference(w, x, p, 0.01, bs)
    np.testing.assert_array_equal(np.asarray(got_keep), want_keep)
    np.testing.assert_allclose(np.asarray(got_w), want_w, atol=1e-4, rtol=1e-4)
    assert np.all(np.asarray(got_w)[~want_keep] == 0)
    assert np.all(want_w[5] == 0)


def test_sparsegpt_update_beats_plain_masking():
    """The OBS update lowers the layer's output error below zeroing the same weights."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))  # correlated inputs
    w = rng.normal(size=(16, 8))
    new, keep = C.sparsegpt(jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32), C.parse_pattern("50%"))
    err_update = np.linalg.norm(x @ (np.asarray(new) - w))
    err_mask = np.linalg.norm(x @ (w * np.asarray(keep) - w))
    assert err_update < 0.99 * err_mask


def test_wanda_scores_and_mask_by_hand():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 10)) * np.arange(1, 11)
    w = rng.normal(size=(10, 4))
    gram = jnp.asarray(x.T @ x, jnp.float32)
    want = np.abs(w) * np.sqrt((x ** 2).sum(0))[:, None]
    np.testing.assert_allclose(np.asarray(C.wanda_scores(jnp.asarray(w, jnp.float32), gram)), want, rtol=1e-5)
    new, keep = C.METHODS["wanda"](jnp.asarray(w, jnp.float32), gram, C.parse_pattern("0.3"), C.Options())
    for j in range(4):  # per output: the ceil(0.3 · 10) = 3 lowest go
        assert set(np.flatnonzero(~np.asarray(keep)[:, j])) == set(np.argsort(want[:, j])[:3])
    np.testing.assert_array_equal(np.asarray(new), np.where(np.asarray(keep), w.astype(np.float32), 0))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_masks_exact(method, pattern):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 16))
    w = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    p = C.parse_pattern(pattern)
    new, keep = C.METHODS[method](w, jnp.asarray(x.T @ x, jnp.float32) if method != "magnitude" else None, p,
                                  C.Options(blocksize=8))
    k = np.asarray(keep)
    assert (k.reshape(16 // p.m, p.m, 6).sum(1) == p.n).all()
    assert np.all(np.asarray(new)[~k] == 0)
    if method != "sparsegpt":  # kept: the n highest scores of each group
        s = np.abs(np.asarray(w)) * (np.sqrt((x ** 2).sum(0))[:, None] if method == "wanda" else 1)
        top = np.argsort(-s.reshape(16 // p.m, p.m, 6), axis=1)[:, :p.n]
        want = np.zeros((16 // p.m, p.m, 6), bool)
        np.put_along_axis(want, top, True, axis=1)
        np.testing.assert_array_equal(k, want.reshape(16, 6))


def test_wanda_layer_group_compares_the_whole_layer():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 10)) * np.arange(1, 11)
    w = rng.normal(size=(10, 4))
    s = np.abs(w) * np.sqrt((x ** 2).sum(0))[:, None]
    args = (jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32), C.parse_pattern("0.3"))
    _, keep = C.METHODS["wanda"](*args, C.Options(wanda_group="layer"))
    want = np.ones(40, bool)
    want[np.argsort(s.ravel())[:12]] = False  # ceil(0.3 · 40) = 12 lowest of the layer
    np.testing.assert_array_equal(np.asarray(keep), want.reshape(10, 4))
    assert np.asarray(keep).sum(0).tolist() != [7, 7, 7, 7]  # not the per-output answer
    _, keep_default = C.METHODS["wanda"](*args, C.Options())
    assert np.asarray(keep_default).sum(0).tolist() == [7, 7, 7, 7]  # the paper's per output stays the default
    with pytest.raises(ValueError, match="wanda_group='row'"):
        C.Options(wanda_group="row")


# ----------------------------------------------------------------------------------------------- whole models
class Two(nn.Module):
    """Two dense layers with a ReLU between; the second is the output (readout)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="second")(nn.relu(nn.Dense(8, name="first")(x)))


def test_sequential_calibration_uses_pruned_activations():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(40, 6)), jnp.float32)
    model = Two()
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    apply = lambda p, xx: model.apply({"params": p}, xx)  # noqa: E731
    opts = C.Options(prune_readout=True, batch_size=16)
    pruned, keep, report = C.prune(apply, params, x, "sparsegpt", "50%", opts)
    assert [r["path"] for r in report] == ["first/kernel", "second/kernel"]
    pat = C.parse_pattern("50%")
    w1, _ = C.sparsegpt(params["first"]["kernel"], x.T @ x, pat)
    np.testing.assert_allclose(pruned["first"]["kernel"], w1, atol=1e-6)
    h_pruned = jax.nn.relu(x @ w1 + params["first"]["bias"])
    h_dense = jax.nn.relu(x @ params["first"]["kernel"] + params["first"]["bias"])
    w2, _ = C.sparsegpt(params["second"]["kernel"], h_pruned.T @ h_pruned, pat)
    w2_dense, _ = C.sparsegpt(params["second"]["kernel"], h_dense.T @ h_dense, pat)
    np.testing.assert_allclose(pruned["second"]["kernel"], w2, atol=1e-5)
    assert np.abs(np.asarray(w2) - np.asarray(w2_dense)).max() > 1e-3  # the test can tell the two apart
    np.testing.assert_array_equal(pruned["first"]["bias"], params["first"]["bias"])  # biases untouched
    assert keep["first"]["bias"].all()


def test_readout_left_alone_by_default_and_found_from_the_program():
    x = jnp.ones((3, 6))
    model = Two()
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    apply = lambda p, xx: model.apply({"params": p}, xx)  # noqa: E731
    layers = C.dense_layers(apply, params, x)
    assert [(d.path, d.readout) for d in layers] == [("first/kernel", False), ("second/kernel", True)]
    pruned, _, report = C.prune(apply, params, x, "magnitude", "50%")
    assert [r["path"] for r in report] == ["first/kernel"]
    np.testing.assert_array_equal(pruned["second"]["kernel"], params["second"]["kernel"])


class Heads(nn.Module):
    """DenseGeneral to (3 heads, 4) and back, shared input for two projections, then a tied-style readout."""

    @nn.compact
    def __call__(self, x):
        a = nn.DenseGeneral((3, 4), name="split")(x)
        b = nn.DenseGeneral((3, 4), name="split_too")(x)
        y = nn.DenseGeneral(7, axis=(-2, -1), name="merge")(jnp.tanh(a) * b)
        emb = self.param("table", nn.initializers.normal(1.0), (9, 7))
        return y @ emb.T


def test_dense_general_kernels_viewed_as_in_out():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(30, 7)), jnp.float32)
    model = Heads()
    params = model.init(jax.random.PRNGKey(1), x[:1])["params"]
    apply = lambda p, xx: model.apply({"params": p}, xx)  # noqa: E731
    layers = C.dense_layers(apply, params, x)
    assert [(d.path, d.shape, d.contract, d.readout) for d in layers] == [
        ("split/kernel", (7, 3, 4), (0,), False), ("split_too/kernel", (7, 3, 4), (0,), False),
        ("merge/kernel", (3, 4, 7), (0, 1), False)]  # the readout multiplies by a transposed table: not a layer
    assert layers[0].group == layers[1].group == 0 and layers[2].group == 2
    pruned, keep, _ = C.prune(apply, params, x, "wanda", "50%")
    a = jnp.tanh(jnp.einsum("ni,ihc->nhc", x, pruned["split"]["kernel"]) + pruned["split"]["bias"])
    b = jnp.einsum("ni,ihc->nhc", x, pruned["split_too"]["kernel"]) + pruned["split_too"]["bias"]
    h = np.asarray((a * b).reshape(30, 12), np.float64)
    w = np.asarray(params["merge"]["kernel"]).reshape(12, 7)
    s = np.abs(w) * np.linalg.norm(h, axis=0)[:, None]
    want = np.ones((12, 7), bool)
    for j in range(7):
        want[np.argsort(s[:, j])[:6], j] = False
    np.testing.assert_array_equal(np.asarray(keep["merge"]["kernel"]).reshape(12, 7), want)
    assert np.asarray(keep["table"]).all()


def test_bad_input_errors():
    with pytest.raises(ValueError, match="pattern='3:2'"):
        C.parse_pattern("3:2")
    with pytest.raises(ValueError, match="pattern='150%'"):
        C.parse_pattern("150%")
    with pytest.raises(ValueError, match="damp"):
        C.Options(damp=-1.0)
    model = Two()
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 6)))["params"]
    with pytest.raises(ValueError, match="method='obs'"):
        C.prune(lambda p, xx: model.apply({"params": p}, xx), params, jnp.ones((2, 6)), "obs", "50%")
    with pytest.raises(ValueError, match="m=4"):
        C.sparsegpt(jnp.ones((6, 2)), jnp.eye(6), C.parse_pattern("2:4"))


def test_group_grams_batched_equal_all_at_once_and_by_hand():
    """The Grams of one group, summed over batches of any size, equal the all-layer Grams of the whole set at once
    and XᵀX by hand (float64); the first group's program stops early: fewer flops than the all-layer one."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(37, 7)), jnp.float32)
    model = Heads()
    params = model.init(jax.random.PRNGKey(2), x[:1])["params"]
    apply = lambda p, xx: model.apply({"params": p}, xx)  # noqa: E731
    leaves = jax.tree_util.tree_leaves(params)
    layers = C.dense_layers(apply, params, x)
    every = C.gram_fn(apply, params)(leaves, x)
    first = [d.leaf for d in layers if d.group == 0]
    merge = [d.leaf for d in layers if d.group == 2]
    xd = np.asarray(x, np.float64)
    np.testing.assert_allclose(every[first[0]], xd.T @ xd, rtol=1e-5)
    for wanted in (first, merge):
        fn = C.gram_fn(apply, params, wanted)
        for bs in (1, 5, 37):
            got = C._grams(fn, leaves, x, bs)
            assert set(got) == set(wanted)
            for leaf in wanted:
                np.testing.assert_allclose(got[leaf], every[leaf], rtol=1e-5, atol=1e-4)

    def flops(fn):
        cost = fn.lower(leaves, x).compile().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    assert flops(C.gram_fn(apply, params, first)) < flops(C.gram_fn(apply, params, merge)) <= flops(
        C.gram_fn(apply, params))
