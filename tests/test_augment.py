"""jaxprune.augment: exact crop/flip constructions, and augmentation inside the training step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune import augment, data, imp, models, train


def _images(b: int, h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, h, w, c)).astype(np.float32)


def test_flip_mirrors_a_subset_and_leaves_the_rest():
    x = _images(64, 5, 7, 3)
    out = np.asarray(augment.random_flip(jax.random.PRNGKey(1), jnp.asarray(x)))
    same = np.all(out == x, axis=(1, 2, 3))
    mirrored = np.all(out == x[:, :, ::-1, :], axis=(1, 2, 3))
    assert np.all(same ^ mirrored)  # every image is exactly one of the two (the random images are not symmetric)
    assert 0 < mirrored.sum() < 64


@settings(max_examples=15, deadline=None)
@given(h=st.integers(2, 9), w=st.integers(2, 9), padding=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_crop_is_a_window_of_the_zero_padded_image(h, w, padding, seed):
    x = _images(6, h, w, 2, seed)
    out = np.asarray(augment.random_crop(jax.random.PRNGKey(seed), jnp.asarray(x), padding))
    assert out.shape == x.shape
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    for i in range(len(x)):
        windows = [padded[i, a:a + h, b:b + w] for a in range(2 * padding + 1) for b in range(2 * padding + 1)]
        assert any(np.array_equal(out[i], win) for win in windows)
    if padding == 0:
        np.testing.assert_array_equal(out, x)


def test_crop_flip_composes_and_names():
    x = jnp.asarray(_images(8, 6, 6, 1))
    k = jax.random.PRNGKey(3)
    kc, kf = jax.random.split(k)
    np.testing.assert_array_equal(augment.crop_flip(k, x),
                                  augment.random_flip(kf, augment.random_crop(kc, x)))
    assert augment.by_name("none") is None and augment.by_name("crop_flip") is augment.crop_flip
    with pytest.raises(ValueError, match="augment='rotate'"):
        augment.by_name("rotate")
    with pytest.raises(ValueError, match=r"NHWC image batch .* shape \(8, 36\)"):
        augment.random_flip(k, x.reshape(8, 36))
    with pytest.raises(ValueError, match="augment='mixup'"):
        imp.Task(models.MLP((4, 2)), x, x, x, x, train.OptimConfig(), 1, 1, augment="mixup")


def test_augmentation_runs_inside_the_step_with_its_own_key_stream():
    d = data.load("digits", "train")
    model = models.MLP((32, 10), dropout=0.5)
    tx = train.make_optimizer(train.OptimConfig("momentum", 0.05), 0.05)
    v = models.init(model, jax.random.PRNGKey(0), d.images.shape)
    x, y = train.to_device(d.images, d.labels)
    idx, key = jnp.arange(64), jax.random.PRNGKey(7)
    seen = []

    def identity(k, batch):
        seen.append(batch.shape)
        return batch

    plain = train.make_trainer(model, tx).step(train.create_state(v, tx), x, y, idx, key)[0]
    ident = train.make_trainer(model, tx, augment=identity).step(train.create_state(v, tx), x, y, idx, key)[0]
    crop = train.make_trainer(model, tx, augment=augment.crop_flip).step(train.create_state(v, tx), x, y, idx, key)[0]
    assert seen == [(64, 8, 8, 1)]  # applied to the training batch, once, at trace time
    # an identity augmentation leaves the dropout masks and hence the update unchanged
    jax.tree_util.tree_map(np.testing.assert_array_equal, plain.params, ident.params)
    assert not np.allclose(plain.params["dense_0"]["kernel"], crop.params["dense_0"]["kernel"])
