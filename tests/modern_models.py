"""Modern user models written here (other names and shapes than ``jaxprune.models``) for the graph tests:
attention, depthwise/grouped convs, non-zero-at-zero activations, tied and raw-parameter layers."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class SigmoidMLP(nn.Module):
    """in → 7 → sigmoid → 6 → sigmoid → 3 (a masked unit would still send sigmoid(0) = 0.5)."""

    hidden: tuple = (7, 6)

    @nn.compact
    def __call__(self, x):
        x = nn.sigmoid(nn.Dense(self.hidden[0], name="lin_a")(x))
        x = nn.sigmoid(nn.Dense(self.hidden[1], name="lin_b")(x))
        return nn.Dense(3, name="read")(x)


class ReluThenNorm(nn.Module):
    """dense → ReLU → BatchNorm → dense → ReLU → BatchNorm → dense (BN(0) ≠ 0 after the activation)."""

    hidden: tuple = (9, 5)

    @nn.compact
    def __call__(self, x):
        for i, h in enumerate(self.hidden):
            x = nn.relu(nn.Dense(h, name=f"proj{i}")(x))
            x = nn.BatchNorm(use_running_average=True, name=f"post{i}")(x)
        return nn.Dense(2, name="cls")(x)


class SeparableNet(nn.Module):
    """1×1 conv (8) → depthwise 3×3 (8 groups) → grouped 3×3 conv (2 groups, 8 → 6) → mean → dense 3."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (1, 1), name="expand")(x))
        x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, padding="SAME", name="dw")(x))
        x = nn.relu(nn.Conv(6, (3, 3), feature_group_count=2, padding="VALID", name="grouped")(x))
        return nn.Dense(3, name="fin")(x.mean(axis=(1, 2)))


class Encoder(nn.Module):
    heads: int = 2
    dim: int = 8
    mlp: int = 12

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim, name="mha")(y, y)
        y = nn.LayerNorm(name="ln2")(x)
        y = nn.Dense(self.dim, name="up")(nn.gelu(nn.Dense(self.mlp, name="down_in")(y)))
        return x + y


class TinyViT(nn.Module):
    """Patches (p×p) → dense embedding + position embedding → one pre-LN encoder block → mean → dense."""

    patch: int = 3
    dim: int = 8
    classes: int = 4

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        p = self.patch
        x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // p) * (w // p), -1)
        x = nn.Dense(self.dim, name="patchify")(x)
        x = x + self.param("pos", nn.initializers.normal(0.02), (x.shape[1], self.dim))
        x = Encoder(dim=self.dim, name="enc")(x)
        return nn.Dense(self.classes, name="cls_head")(nn.LayerNorm(name="ln_f")(x).mean(axis=1))


class TiedAutoencoder(nn.Module):
    """in (d) → dense (h) → ReLU → dense (h2) → ReLU → back to h → read out through the first kernel transposed."""

    h: int = 6
    h2: int = 5

    @nn.compact
    def __call__(self, x):
        enc = nn.Dense(self.h, name="enc")
        y = nn.relu(enc(x))
        y = nn.relu(nn.Dense(self.h2, name="bottle")(y))
        y = nn.Dense(self.h, name="back")(y)
        return y @ enc.variables["params"]["kernel"].T


class RawParamMLP(nn.Module):
    """Two layers written with ``self.param`` (no submodules): in → 6 → tanh → 3."""

    @nn.compact
    def __call__(self, x):
        w1 = self.param("w_in", nn.initializers.lecun_normal(), (x.shape[-1], 6))
        b1 = self.param("b_in", nn.initializers.normal(0.1), (6,))
        w2 = self.param("w_out", nn.initializers.lecun_normal(), (6, 3))
        return jnp.tanh(x @ w1 + b1) @ w2


class SharedLayerNet(nn.Module):
    """One dense layer applied twice (weight sharing): in (5) → lift (6) → ReLU → shared → ReLU → shared → out."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(6, name="lift")(x))
        shared = nn.Dense(6, name="shared")
        x = nn.relu(shared(nn.relu(shared(x))))
        return nn.Dense(2, name="out")(x)


class LoopedNet(nn.Module):
    """A dense layer, then a matmul repeated inside ``fori_loop`` (control flow the FLOP count cannot read)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, name="first")(x)
        w = self.param("rec", nn.initializers.orthogonal(), (4, 4))
        return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ w), x)


class TokenTagger(nn.Module):
    """Token ids → embedding (vocab 11, 6) + position embedding → dense (5) → GELU → readout tied to the embedding
    (``attend``)."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(11, 6, name="tok")
        x = emb(ids) + self.param("where", nn.initializers.normal(0.1), (ids.shape[1], 6))
        x = nn.Dense(6, name="mix")(nn.gelu(nn.Dense(5, name="pre")(x)))
        return emb.attend(x)


class SortedTokens(nn.Module):
    """(n, tokens, 4) → dense (5) → ReLU → sorted along the tokens (``lax.sort``, axis 1) → dense (2) → mean."""

    width: int = 5

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width, name="tok_in")(x))
        x = jax.lax.sort(x, dimension=1)
        return nn.Dense(2, name="tok_out")(x).mean(axis=1)
