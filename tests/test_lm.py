"""Text data, the GPT, LM training pieces and the lm_prune experiment end to end on tiny settings."""
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import checkpoint, data, lm, models

TEXT = "to be, or not to be: that is the question.\nwhether 'tis nobler in the mind to suffer\n" * 8


def test_text_data_vocab_and_split():
    t = data.text_data("abcab" * 4 + "z", 0.9)  # 21 characters: floor(18.9) = 18 for training
    assert t.vocab == "abcz"
    assert len(t.train) == 18 and len(t.val) == 3
    np.testing.assert_array_equal(t.train[:5], [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(t.val, [0, 1, 3])
    assert data.decode(np.concatenate([t.train, t.val]), t.vocab) == "abcab" * 4 + "z"
    with pytest.raises(data.DataError, match="'q' is not in the vocabulary"):
        data.encode("abq", "abc")


def _tiny_corpus(tmp_path, monkeypatch, text=TEXT):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "tiny.txt").write_text(text)
    monkeypatch.setitem(data.TEXTS, "tiny", ("tiny/tiny.txt", hashlib.sha256(text.encode()).hexdigest(), 0.9))


def test_load_text_checks_file_and_checksum(tmp_path, monkeypatch):
    _tiny_corpus(tmp_path, monkeypatch)
    t = data.load_text("tiny", tmp_path)
    assert len(t.train) == int(0.9 * len(TEXT)) and t.vocab == "".join(sorted(set(TEXT)))
    with pytest.raises(data.DataError, match=r"missing file .*shakespeare\.txt.*--data_dir"):
        data.load_text("shakespeare", tmp_path)
    (tmp_path / "tiny" / "tiny.txt").write_text(TEXT + "x")
    data._text_cached.cache_clear()
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.load_text("tiny", tmp_path)
    with pytest.raises(data.DataError, match="name='hamlet'"):
        data.load_text("hamlet", tmp_path)


def test_windows_targets_are_the_next_characters():
    ids = jnp.arange(100, dtype=jnp.int32)
    x, y = lm.random_windows(ids, jax.random.PRNGKey(0), 5, 8)
    assert x.shape == y.shape == (5, 8)
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(x[:, 1:], x[:, :-1] + 1)
    xv, yv = lm.fixed_windows(np.arange(50), 3, 10)
    np.testing.assert_array_equal(xv[:, 0], [0, 19, 39])
    np.testing.assert_array_equal(yv, xv + 1)


def test_the_fine_tuning_optimizer_is_adamw_at_a_constant_rate_with_the_recipes_decay_and_clipping():
    """Two steps against AdamW written out in float64 (Loshchilov & Hutter; Kingma & Ba's bias correction): the
    first gradient's global norm 5 is clipped to the recipe's 1, the second (0.5) is not; the rate is the same at
    both steps (no warm-up, no decay); the weight decay is decoupled (times the rate, not through the moments)."""
    import optax

    lr, wd, b1, b2, eps = 0.01, 0.25, 0.9, 0.999, 1e-8
    tx = lm.LMConfig(weight_decay=wd, clip_grad_norm=1.0).finetune_optimizer(lr)
    params = jnp.asarray([3.0, -1.0])
    state, ref, m, v = tx.init(params), np.array([3.0, -1.0]), np.zeros(2), np.zeros(2)
    for t, g in enumerate((np.array([3.0, 4.0]), np.array([0.3, -0.4])), 1):
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
        params = optax.apply_updates(params, updates)
        g = g * min(1.0, 1.0 / np.linalg.norm(g))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g ** 2
        ref = ref - lr * (m / (1 - b1 ** t) / (np.sqrt(v / (1 - b2 ** t)) + eps) + wd * ref)
        np.testing.assert_allclose(np.asarray(params, np.float64), ref, rtol=1e-6)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_gpt_is_causal_and_generate_is_reproducible():
    model = models.GPT(11, context=8, width=16, depth=2, heads=4)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    apply = lm.flax_apply(model)
    a = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    b = a.at[0, 5:].set(0)  # changing later tokens leaves earlier logits alone
    la, lb = apply(params, a), apply(params, b)
    assert la.shape == (1, 8, 11)
    np.testing.assert_allclose(la[0, :5], lb[0, :5], atol=1e-6)
    assert np.abs(np.asarray(la[0, 5:] - lb[0, 5:])).max() > 1e-4
    g1 = lm.generate(model, params, np.array([1, 2]), jax.random.PRNGKey(3), 12)
    g2 = lm.generate(model, params, np.array([1, 2]), jax.random.PRNGKey(3), 12)
    assert g1.shape == (12,) and (g1 == g2).all() and g1.max() < 11
    # the first sampled id comes from the logits after the prompt
    logits = apply(params, jnp.array([[1, 2]]))[0, -1]
    k = jax.random.split(jax.random.PRNGKey(3), 12)[0]
    assert g1[0] == int(jax.random.categorical(k, logits))


@pytest.mark.slow
def test_lm_prune_end_to_end_tiny(tmp_path, monkeypatch):
    from experiments import lm_prune

    _tiny_corpus(tmp_path, monkeypatch)
    cfg = {"dataset": "tiny", "data_dir": str(tmp_path), "width": 16, "depth": 1, "heads": 2, "context": 16,
           "steps": 3, "batch_size": 4, "val_windows": 4, "calib_windows": 4, "seeds": ["0", "1"],
           "blocksize": 8, "sample_chars": 5, "patterns": ["50%", "2:4"]}
    res = lm_prune.run(cfg, tmp_path / "wd")
    stored = json.loads((tmp_path / "wd" / "results.json").read_text())
    assert set(stored["methods"]) == {"magnitude", "wanda", "sparsegpt"}
    for m, by in stored["methods"].items():
        assert set(by) == {"50%", "2:4"}
        for entry in by.values():
            assert set(entry) == {"val_loss", "val_loss_std", "density"}
            assert entry["density"] == pytest.approx(0.5)
            assert np.isfinite(entry["val_loss"])
    assert stored["details"]["wanda"]["50%"]["n"] == 2 and stored["details"]["magnitude"]["50%"]["n"] == 1
    assert (tmp_path / "wd" / "val_loss.png").exists() and "sparsegpt 2:4" in (tmp_path / "wd" / "samples.txt"
                                                                             ).read_text()
    # the trained GPT is reused by run identity (its checkpoint checked by sha256); other settings are refused
    _, rec = lm_prune.dense_model(cfg, tmp_path / "wd")
    assert rec["sha256"] == json.loads((tmp_path / "wd" / "dense" / "trained.json").read_text())["sha256"]
    assert res["training"]["seconds"] == rec["seconds"]
    with pytest.raises(ValueError, match="steps: 3 -> 4"):
        lm_prune.run({**cfg, "steps": 4}, tmp_path / "wd")
    # the record carries its checksum: a changed trained.json is refused
    trained = tmp_path / "wd" / "dense" / "trained.json"
    trained.write_text(json.dumps({**json.loads(trained.read_text()), "val_loss": 0.5}))
    with pytest.raises(checkpoint.RecordError, match="trained.json"):
        lm_prune.dense_model(cfg, tmp_path / "wd")


def test_lm_prune_wanda_group_flag(tmp_path):
    """A bad comparison group is refused before any work; the layer-wise Wanda is never reported as ``wanda``."""
    from experiments import lm_prune

    with pytest.raises(ValueError, match="wanda_group='row'"):
        lm_prune.run({"wanda_group": "row"}, tmp_path / "wd")
    assert not (tmp_path / "wd").exists()
    base = lm_prune.DEFAULTS
    assert lm_prune._label("wanda", base) == "wanda" and lm_prune._label("magnitude", base) == "magnitude"
    assert lm_prune._label("wanda", {**base, "wanda_group": "layer"}) == "wanda_layer"
    assert lm_prune._label("sparsegpt", {**base, "wanda_group": "layer"}) == "sparsegpt"
