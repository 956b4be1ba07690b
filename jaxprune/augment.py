"""Training-time data augmentation as pure, jittable functions of an explicit key: ``fn(key, x) -> x``.

Images are NHWC batches ``(b, h, w, c)``; every sample draws its own transformation from ``key``. The CIFAR
recipe of the pruning literature (OpenLTH, Kim et al. 2020, Frankle et al.) is :func:`crop_flip`: zero-pad 4 pixels,
take a random 32 × 32 crop, flip left-right with probability ½. ``jaxprune.train`` applies the chosen augmentation
to every training batch inside the jitted step (never to evaluation batches).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxprune import _validate

Array = jax.Array
Augment = Callable[[Array, Array], Array]


def _check_images(x: Array, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name}: expected an NHWC image batch (b, h, w, c), got shape {tuple(x.shape)}")


def random_flip(key: Array, x: Array) -> Array:
    """Each image mirrored left-right with probability ½. ``x: (b, h, w, c)``."""
    _validate.key(key)
    _check_images(x, "random_flip")
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0],))
    return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


def random_crop(key: Array, x: Array, padding: int = 4) -> Array:
    """Zero-pad every side by ``padding`` pixels and cut a random ``(h, w)`` window per image. ``x: (b, h, w, c)``."""
    _validate.key(key)
    _check_images(x, "random_crop")
    if padding < 0:
        raise ValueError(f"padding={padding}: expected >= 0")
    b, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)

    def crop(img: Array, off: Array) -> Array:
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def crop_flip(key: Array, x: Array, padding: int = 4) -> Array:
    """:func:`random_crop` then :func:`random_flip`, with independent keys."""
    _validate.key(key)
    k_crop, k_flip = jax.random.split(key)
    return random_flip(k_flip, random_crop(k_crop, x, padding))


_BY_NAME: dict[str, Augment | None] = {"none": None, "flip": random_flip, "crop": random_crop,
                                       "crop_flip": crop_flip}
NAMES = tuple(_BY_NAME)


def by_name(name: str) -> Augment | None:
    """The augmentation called ``name`` (one of :data:`NAMES`); ``None`` for ``"none"``."""
    if name not in _BY_NAME:
        raise ValueError(f"augment={name!r}: expected one of {NAMES}")
    return _BY_NAME[name]
