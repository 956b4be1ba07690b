"""Models a user might bring, written here (not in jaxprune.models), with their own layer names and shapes.

Used by the structure-dependent tests (graph, LRP, criteria, unit removal, merging, FLOPs). Each entry of
:data:`LINEN` is ``(name, model, input shape)``; :func:`nnx_model` builds the NNX one.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class PlainMLP(nn.Module):
    """fc1 → relu → fc2 → relu → head (widths as fields, so the graph can find them)."""

    hidden: Sequence[int] = (12, 9)
    classes: int = 4

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden[0], name="fc1")(x))
        x = nn.relu(nn.Dense(self.hidden[1], name="fc2")(x))
        return nn.Dense(self.classes, name="head")(x)


class StridedBNNet(nn.Module):
    """Strided conv + BatchNorm + max pooling, conv + BatchNorm, flatten, dense (no ``train`` argument)."""

    c1: int = 6
    c2: int = 5
    fc: int = 7
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.c1, (3, 3), strides=(2, 2), padding="SAME", use_bias=False, name="stem")(x)
        x = nn.BatchNorm(use_running_average=True, name="stem_norm")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = nn.Conv(self.c2, (3, 3), padding=((1, 1), (0, 2)), name="mid")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="mid_norm")(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.fc, name="fc")(x))
        return nn.Dense(self.classes, name="logits")(x)


class ResidualUnit(nn.Module):
    width: int
    inner: int

    @nn.compact
    def __call__(self, x):
        y = nn.relu(nn.Conv(self.inner, (3, 3), use_bias=False, name="conv_a")(x))
        y = nn.Conv(self.width, (3, 3), use_bias=False, name="conv_b")(y)
        return nn.relu(x + y)


class ResidualNet(nn.Module):
    """A conv stem, two residual units (identity shortcuts), global average pooling, a dense head."""

    width: int = 5
    inner: Sequence[int] = (4, 6)
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.width, (3, 3), use_bias=False, name="entry")(x))
        for i, w in enumerate(self.inner):
            x = ResidualUnit(self.width, w, name=f"block{i + 1}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.classes, name="out")(x)


class Tower(nn.Module):
    features: Sequence[int]

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.relu(nn.Dense(f, name=f"lin{i}")(x))
        return x


class NestedNet(nn.Module):
    """Nested submodules: an encoder tower of two dense layers, a second tower, a classifier."""

    enc: Sequence[int] = (10, 8)
    dec: Sequence[int] = (6,)
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = Tower(self.enc, name="encoder")(x)
        x = Tower(self.dec, name="decoder")(x)
        return nn.Dense(self.classes, name="classifier")(x)


class NNXNet(nnx.Module):
    """NNX: conv → BatchNorm → relu → avg pool → flatten → dense → relu → dense."""

    def __init__(self, rngs: nnx.Rngs, channels: int = 3, hw: int = 6, classes: int = 3):
        self.conv = nnx.Conv(channels, 5, (3, 3), padding="SAME", rngs=rngs)
        self.norm = nnx.BatchNorm(5, rngs=rngs)
        self.hidden = nnx.Linear(5 * (hw // 2) ** 2, 8, rngs=rngs)
        self.head = nnx.Linear(8, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.conv(x)))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        x = nnx.relu(self.hidden(x.reshape((x.shape[0], -1))))
        return self.head(x)


LINEN = (
    ("plain_mlp", PlainMLP(), (3, 5, 2)),
    ("strided_bn", StridedBNNet(), (2, 12, 12, 2)),
    ("residual", ResidualNet(), (2, 6, 6, 5)),
    ("nested", NestedNet(), (3, 7)),
)


def init(model: nn.Module, shape, seed: int = 0, stats: bool = True) -> dict:
    """Variables with non-trivial BatchNorm statistics and scales (so folding is exercised)."""
    v = model.init(jax.random.PRNGKey(seed), jnp.zeros(shape))
    if stats and "batch_stats" in v:
        k = jax.random.PRNGKey(seed + 1)
        leaves, tree = jax.tree_util.tree_flatten(v["batch_stats"])
        keys = jax.random.split(k, len(leaves))
        leaves = [a + 0.5 * jax.random.uniform(kk, a.shape) for a, kk in zip(leaves, keys)]
        v = {**v, "batch_stats": jax.tree_util.tree_unflatten(tree, leaves)}
        p = jax.tree_util.tree_map_with_path(
            lambda path, a: a * (1.0 + 0.5 * jax.random.uniform(jax.random.PRNGKey(len(str(path))), a.shape))
            if str(path[-1]).find("scale") >= 0 else a, v["params"])
        v = {**v, "params": p}
    return v


def nnx_model(seed: int = 0) -> NNXNet:
    m = NNXNet(nnx.Rngs(seed))
    m.eval()
    return m
