"""Flax models used as pure functions: ``model.apply(variables, x, train=False) -> logits (n, classes)``.

Inputs are NHWC ``(n, h, w, c)`` (MLPs flatten them; ``(n, d)`` works too). The pruning code reads these models
like any user model, from their graph (:mod:`jaxprune.graph`); each has a ``with_widths({layer: units})`` hook that
structured pruning uses to rebuild it smaller. Layer names:

* ``MLP``: ``dense_0 … dense_{L-1}`` (the last is the output layer);
* ``LeNet5``: ``conv_0, conv_1, dense_0, dense_1, dense_2``;
* ``ConvNet`` (LTH Conv-2/4/6): ``conv_0 … conv_{k-1}``, ``dense_0, dense_1, dense_2``;
* ``VGG``: ``conv_i`` each followed by ``bn_i``, then ``dense_0`` (after global average pooling);
* ``ResNet``: ``stem_conv, stem_bn``, blocks ``block{stage}_{index}`` holding ``conv_0, bn_0, conv_1, bn_1``
  (and ``shortcut_conv, shortcut_bn`` where the shape changes), then ``dense``;
* ``ViT`` (pre-LN vision transformer): ``patch_embed, cls_token, pos_embed, block_{i}_attn/{query, key, value,
  out}, block_{i}_ln_{0,1}, block_{i}_fc, block_{i}_proj, ln_f, head`` (heads and MLP units pruned through the
  graph; no ``with_widths``);
* ``GPT`` (character language model, token ids ``(b, t) -> logits (b, t, vocab)``; not built by :func:`build`, no
  representations): ``embed, pos_embed, block_{i}_attn/{q,k,v,out}, block_{i}_ln_{0,1}, block_{i}_fc,
  block_{i}_proj, ln_f, head``.

Every model sows its named intermediate representations (post-activation and pooling outputs, then ``logits``)
into the ``"representations"`` collection; :func:`representations` returns them in forward order.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune import _validate, conventions

Array = jax.Array
Variables = dict[str, Any]

KERNEL_INIT = nn.initializers.kaiming_normal()  # He et al. 2015 (fan-in), as OpenLTH
# Kernel initialisers an MLP can be built with (``MLP.weight_init``); Keras' default is glorot_uniform;
# ``torch_default`` is PyTorch's ``nn.Linear`` default, U(±1/√fan_in) for the kernel *and* the bias (the
# reference code of most pruning papers was trained from it; see :func:`bias_init`).
INITS = {"he_normal": KERNEL_INIT, "glorot_uniform": nn.initializers.glorot_uniform(),
         "lecun_normal": nn.initializers.lecun_normal(),
         "torch_default": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")}


def bias_init(weight_init: str, fan_in: int) -> nn.initializers.Initializer:
    """Bias initialiser that goes with ``weight_init``: U(±1/√fan_in) for ``torch_default``, else zeros."""
    if weight_init != "torch_default":
        return nn.initializers.zeros_init()
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init

VGG_CFGS: dict[str, tuple] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}
CONV_CFGS: dict[int, tuple] = {
    2: (64, 64, "M"),
    4: (64, 64, "M", 128, 128, "M"),
    6: (64, 64, "M", 128, 128, "M", 256, 256, "M"),
}


def _indexed_widths(widths, prefix: str, current: Sequence[int], what: str) -> tuple[int, ...]:
    """``current`` with entries ``i`` replaced by ``widths[f"{prefix}{i}"]`` (the layers' module paths)."""
    out = [int(w) for w in current]
    for i in range(len(out)):
        if f"{prefix}{i}" in widths:
            out[i] = int(widths[f"{prefix}{i}"])
    return tuple(out)


def _unknown(widths, known: Sequence[str], model: nn.Module) -> None:
    bad = sorted(set(widths) - set(known))
    if bad:
        raise ValueError(f"widths: {type(model).__name__} sets no width for layers {bad} (it has width fields for "
                         f"{list(known)})")


def _merge(prev: dict, new: dict) -> dict:
    return {**prev, **new}


def _sow(module: nn.Module, name: str, value: Array) -> Array:
    # One ordered dict per module (sow names may not collide with submodule names such as ``dense_0``).
    module.sow("representations", "named", {name: value}, init_fn=dict, reduce_fn=_merge)
    return value


BN_MOMENTUM = 0.9  # running statistics: new = BN_MOMENTUM · old + (1 − BN_MOMENTUM) · batch


def _batchnorm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=conventions.BN_EPSILON,
                        name=name)


class MLP(nn.Module):
    """Fully connected ReLU net; ``features`` includes the output width, e.g. ``(300, 100, 10)``.

    ``dropout``: a rate after every hidden activation, or one rate per hidden layer.
    ``no_relu_after``: hidden layer indices whose ReLU is left out (reproduces buggy reference nets).
    ``weight_init``: a key of :data:`INITS` (default He normal with zero biases, as OpenLTH).
    """

    features: Sequence[int]
    use_bias: bool = True
    dropout: float | Sequence[float] = 0.0
    no_relu_after: Sequence[int] = ()
    weight_init: str = "he_normal"

    @property
    def output_layer(self) -> str:
        return f"dense_{len(self.features) - 1}"

    def with_widths(self, widths: dict[str, int]) -> "MLP":
        """The same MLP with ``{layer: units}`` (``dense_i``) changed: the structured-pruning hook."""
        _unknown(widths, [f"dense_{i}" for i in range(len(self.features))], self)
        return self.clone(features=_indexed_widths(widths, "dense_", self.features, "features"))

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = x.reshape((x.shape[0], -1))
        _validate.widths(self.features, "features", allow_empty=False)
        hidden = len(self.features) - 1
        rates = [self.dropout] * hidden if isinstance(self.dropout, (int, float)) else list(self.dropout)
        if len(rates) != hidden:
            raise ValueError(f"dropout: expected a float or {hidden} rates (one per hidden layer), got {rates}")
        if self.weight_init not in INITS:
            raise ValueError(f"weight_init={self.weight_init!r}: expected one of {sorted(INITS)}")
        for i, width in enumerate(self.features):
            x = nn.Dense(width, use_bias=self.use_bias, kernel_init=INITS[self.weight_init],
                         bias_init=bias_init(self.weight_init, x.shape[-1]), name=f"dense_{i}")(x)
            if i == hidden:
                break
            if i not in self.no_relu_after:
                x = nn.relu(x)
            _sow(self, f"dense_{i}", x)
            if rates[i] > 0:
                x = nn.Dropout(rates[i], deterministic=not train)(x)
        return _sow(self, "logits", x)


POOLS = ("max", "avg")


def _pool(x: Array, kind: str) -> Array:
    if kind == "max":
        return nn.max_pool(x, (2, 2), strides=(2, 2))
    if kind == "avg":
        return nn.avg_pool(x, (2, 2), strides=(2, 2))
    raise ValueError(f"pool={kind!r}: expected one of {POOLS}")


PADDINGS = ("same", "valid")


def _dense_head(module: nn.Module, x: Array, widths: Sequence[int], start: int = 0,
                weight_init: str = "he_normal") -> Array:
    """Flatten, then ReLU dense layers ``dense_{start}…``; the last one (the output) has no ReLU."""
    x = x.reshape((x.shape[0], -1))
    for j, width in enumerate(widths):
        name = f"dense_{start + j}"
        x = nn.Dense(width, kernel_init=INITS[weight_init], bias_init=bias_init(weight_init, x.shape[-1]),
                     name=name)(x)
        if j < len(widths) - 1:
            x = _sow(module, name, nn.relu(x))
    return _sow(module, "logits", x)


class LeNet5(nn.Module):
    """LeNet-5: conv6-k5, pool, conv16-k5 (valid), pool, 120, 84, classes. For 28×28 inputs.

    ``padding`` of ``conv_0``: ``"same"`` (28×28 maps, a 16·5·5 = 400-unit flatten) or ``"valid"`` (24×24 maps, a
    16·4·4 = 256-unit flatten, as most PyTorch LeNet5s and the pruned-layer-similarity study's).
    ``weight_init``: a key of :data:`INITS` for every kernel (``torch_default`` also draws the biases, as PyTorch's
    ``nn.Conv2d``/``nn.Linear``; otherwise biases start at zero).
    """

    num_classes: int = 10
    pool: str = "max"
    widths: Sequence[int] = (6, 16, 120, 84)  # conv_0, conv_1, dense_0, dense_1 (structured pruning shrinks them)
    padding: str = "same"
    weight_init: str = "he_normal"
    output_layer = "dense_2"

    def with_widths(self, widths: dict[str, int]) -> "LeNet5":
        names = ("conv_0", "conv_1", "dense_0", "dense_1")
        _unknown(widths, names, self)
        return self.clone(widths=tuple(int(widths.get(n, w)) for n, w in zip(names, self.widths)))

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if len(self.widths) != 4:
            raise ValueError(f"widths={self.widths}: expected 4 widths (conv_0, conv_1, dense_0, dense_1)")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding={self.padding!r}: expected one of {PADDINGS}")
        if self.weight_init not in INITS:
            raise ValueError(f"weight_init={self.weight_init!r}: expected one of {sorted(INITS)}")
        for i, (c, pad) in enumerate(((self.widths[0], self.padding.upper()), (self.widths[1], "VALID"))):
            x = nn.Conv(int(c), (5, 5), padding=pad, kernel_init=INITS[self.weight_init],
                        bias_init=bias_init(self.weight_init, 25 * x.shape[-1]), name=f"conv_{i}")(x)
            x = _sow(self, f"conv_{i}", nn.relu(x))
            x = _sow(self, f"pool_{i}", _pool(x, self.pool))
        return _dense_head(self, x, (int(self.widths[2]), int(self.widths[3]), self.num_classes),
                           weight_init=self.weight_init)


def _conv_stack(module: nn.Module, x: Array, cfg: Sequence, train: bool, batch_norm: bool) -> Array:
    """3×3 same convs (``conv_i`` [+ ``bn_i``] + ReLU) and 2×2 max pools (``pool_j``) as listed in ``cfg``."""
    _validate.widths([v for v in cfg if v != "M"], "cfg")
    i = j = 0
    for v in cfg:
        if v == "M":
            x = _sow(module, f"pool_{j}", nn.max_pool(x, (2, 2), strides=(2, 2)))
            j += 1
            continue
        x = nn.Conv(int(v), (3, 3), padding="SAME", use_bias=not batch_norm, kernel_init=KERNEL_INIT,
                    name=f"conv_{i}")(x)
        if batch_norm:
            x = _batchnorm(train, f"bn_{i}")(x)
        x = _sow(module, f"conv_{i}", nn.relu(x))
        i += 1
    return x


class ConvNet(nn.Module):
    """Frankle & Carbin's Conv-2/4/6: ``depth`` 3×3 convs (64, 64, M, 128, 128, M, 256, 256, M), then 256-256-C."""

    depth: int = 4
    num_classes: int = 10
    widths: Sequence[int] | None = None  # conv widths overriding the depth's cfg (structured pruning)
    hidden: Sequence[int] = (256, 256)  # dense_0 … dense_{len-1} widths; the output layer is dense_{len(hidden)}

    @property
    def output_layer(self) -> str:
        return f"dense_{len(self.hidden)}"

    def with_widths(self, widths: dict[str, int]) -> "ConvNet":
        convs = tuple(self.widths) if self.widths is not None else tuple(
            v for v in CONV_CFGS.get(self.depth, ()) if v != "M")
        _unknown(widths, [f"conv_{i}" for i in range(len(convs))] + [f"dense_{j}" for j in range(len(self.hidden))],
                 self)
        return self.clone(widths=_indexed_widths(widths, "conv_", convs, "widths"),
                          hidden=_indexed_widths(widths, "dense_", self.hidden, "hidden"))

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.depth not in CONV_CFGS:
            raise ValueError(f"depth={self.depth}: expected one of {tuple(CONV_CFGS)}")
        cfg = CONV_CFGS[self.depth]
        if self.widths is not None:
            if len(self.widths) != self.depth:
                raise ValueError(f"widths={self.widths}: expected {self.depth} conv widths for depth={self.depth}")
            it = iter(self.widths)
            cfg = tuple(v if v == "M" else int(next(it)) for v in cfg)
        x = _conv_stack(self, x, cfg, train, batch_norm=False)
        return _dense_head(self, x, tuple(int(h) for h in self.hidden) + (self.num_classes,))


class VGG(nn.Module):
    """VGG with BatchNorm: ``cfg`` lists conv widths and ``"M"`` pools; global average pool, then ``dense_0``."""

    cfg: Sequence = VGG_CFGS["vgg16"]
    num_classes: int = 10
    output_layer = "dense_0"

    def with_widths(self, widths: dict[str, int]) -> "VGG":
        pos = [p for p, v in enumerate(self.cfg) if v != "M"]
        _unknown(widths, [f"conv_{i}" for i in range(len(pos))], self)
        cfg = list(self.cfg)
        for i, p in enumerate(pos):
            cfg[p] = int(widths.get(f"conv_{i}", cfg[p]))
        return self.clone(cfg=tuple(cfg))

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = _conv_stack(self, x, self.cfg, train, batch_norm=True)
        x = _sow(self, "gap", jnp.mean(x, axis=(1, 2)))
        x = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT, name="dense_0")(x)
        return _sow(self, "logits", x)


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus shortcut (1×1 conv + bn when the shape changes), then ReLU."""

    features: int
    stride: int = 1
    inner: int | None = None  # width of conv_0/bn_0 (default ``features``; structured pruning shrinks it)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        y = nn.Conv(self.features if self.inner is None else int(self.inner), (3, 3), (self.stride, self.stride), padding="SAME", use_bias=False,
                    kernel_init=KERNEL_INIT, name="conv_0")(x)
        y = nn.relu(_batchnorm(train, "bn_0")(y))
        y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, kernel_init=KERNEL_INIT, name="conv_1")(y)
        y = _batchnorm(train, "bn_1")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), (self.stride, self.stride), use_bias=False,
                        kernel_init=KERNEL_INIT, name="shortcut_conv")(x)
            x = _batchnorm(train, "shortcut_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 (20, 56, 110): widths ``width, 2·width, 4·width``, n blocks per stage."""

    depth: int = 20
    num_classes: int = 10
    width: int = 16
    block_widths: Sequence[int] | None = None  # internal (conv_0) width of each block in order, 3n entries
    output_layer = "dense"

    def with_widths(self, widths: dict[str, int]) -> "ResNet":
        """Block-internal widths (``block{s}_{b}/conv_0``); residual (stage) widths are not fields of this model."""
        n = (self.depth - 2) // 6
        names = [f"block{s}_{b}/conv_0" for s in range(3) for b in range(n)]
        _unknown(widths, names, self)
        cur = tuple(self.block_widths) if self.block_widths is not None else tuple(
            self.width * 2**s for s in range(3) for _ in range(n))
        return self.clone(block_widths=tuple(int(widths.get(k, w)) for k, w in zip(names, cur)))

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"depth={self.depth}: a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110)")
        n = (self.depth - 2) // 6
        if self.block_widths is not None and len(self.block_widths) != 3 * n:
            raise ValueError(f"block_widths={self.block_widths}: expected {3 * n} widths (one per block)")
        x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False, kernel_init=KERNEL_INIT,
                    name="stem_conv")(x)
        x = _sow(self, "stem", nn.relu(_batchnorm(train, "stem_bn")(x)))
        for s in range(3):
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                inner = None if self.block_widths is None else self.block_widths[s * n + b]
                x = BasicBlock(self.width * 2**s, stride, inner, name=f"block{s}_{b}")(x, train)
                x = _sow(self, f"block{s}_{b}", x)
        x = _sow(self, "gap", jnp.mean(x, axis=(1, 2)))
        x = nn.Dense(self.num_classes, kernel_init=KERNEL_INIT, name="dense")(x)
        return _sow(self, "logits", x)


# ----------------------------------------------------------------------------------------------- GPT
GPT_INIT = nn.initializers.normal(0.02)  # GPT-2's initialiser for every kernel and embedding


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate ``q``, ``k``, ``v`` and ``out`` dense layers.

    ``x: (b, t, d) -> (b, t, d)``; ``q``/``k``/``v``: ``d -> heads·head_dim``, ``out``: ``heads·head_dim -> d``.
    ``head_dim`` defaults to ``d // heads`` (``d`` must then be divisible by ``heads``). The projections are split
    into heads of ``head_dim`` channels (the number of heads is read from their width), so a model whose q/k/v
    lost whole heads (:func:`jaxprune.structured.remove_many`) runs with fewer heads."""

    heads: int
    out_init: Callable = GPT_INIT
    head_dim: int | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, t, d = x.shape
        if self.head_dim is None and d % self.heads:
            raise ValueError(f"heads={self.heads}: expected a divisor of the width {d}")
        hd = self.head_dim or d // self.heads
        q, k, v = (nn.Dense(self.heads * hd, kernel_init=GPT_INIT, name=n)(x).reshape(b, t, -1, hd)
                   for n in "qkv")
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) / jnp.sqrt(float(hd)).astype(x.dtype)
        causal = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        y = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1), v).reshape(b, t, -1)
        return nn.Dense(d, kernel_init=self.out_init, name="out")(y)


class GPT(nn.Module):
    """Decoder-only transformer on token ids: ``tokens: (b, t) int -> logits (b, t, vocab_size)`` with
    ``t <= context``.

    Pre-LayerNorm blocks ``x + attn(LN(x))``, ``x + mlp(LN(x))`` (MLP ``d -> mlp_ratio·d -> d``, GELU), learned
    position embeddings, a final LayerNorm, and a readout ``head`` (or, with ``tie_embeddings``, the token
    embedding's transpose). Kernels N(0, 0.02), residual projections N(0, 0.02/√(2·depth)) (GPT-2). Names:
    ``embed, pos_embed, block_{i}_{ln_0, attn/{q,k,v,out}, ln_1, fc, proj}, ln_f, head``."""

    vocab_size: int
    context: int = 128
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    tie_embeddings: bool = False

    @nn.compact
    def __call__(self, tokens: Array, train: bool = False) -> Array:
        t = tokens.shape[-1]
        if t > self.context:
            raise ValueError(f"tokens: {t} positions, expected at most context={self.context}")
        embed = nn.Embed(self.vocab_size, self.width, embedding_init=GPT_INIT, name="embed")
        pos = self.param("pos_embed", GPT_INIT, (self.context, self.width))
        x = embed(tokens) + pos[:t]
        resid = nn.initializers.normal(0.02 / (2 * self.depth) ** 0.5)
        for i in range(self.depth):
            x = x + CausalSelfAttention(self.heads, resid, name=f"block_{i}_attn")(
                nn.LayerNorm(name=f"block_{i}_ln_0")(x))
            h = nn.LayerNorm(name=f"block_{i}_ln_1")(x)
            h = nn.gelu(nn.Dense(self.mlp_ratio * self.width, kernel_init=GPT_INIT, name=f"block_{i}_fc")(h))
            x = x + nn.Dense(self.width, kernel_init=resid, name=f"block_{i}_proj")(h)
        x = nn.LayerNorm(name="ln_f")(x)
        if self.tie_embeddings:
            return embed.attend(x)
        return nn.Dense(self.vocab_size, kernel_init=GPT_INIT, name="head")(x)


# ----------------------------------------------------------------------------------------------- ViT
class ViT(nn.Module):
    """Pre-LayerNorm vision transformer for small images: ``x: (n, h, w, c) -> logits (n, num_classes)``.

    Non-overlapping ``patch × patch`` patches (``h`` and ``w`` divisible by ``patch``) → dense patch embedding
    (``width``) → a learned class token prepended → learned position embeddings → ``depth`` blocks
    ``x + MHA(LN(x))``, ``x + MLP(LN(x))`` (``nn.MultiHeadDotProductAttention`` with ``heads`` heads of
    ``width // heads`` channels; MLP ``width -> mlp -> width``, GELU) → final LayerNorm → dense readout of the class
    token. Kernels N(0, 0.02). Names: ``patch_embed, cls_token, pos_embed, block_{i}_ln_{0,1},
    block_{i}_attn/{query, key, value, out}, block_{i}_fc, block_{i}_proj, ln_f, head``. Sows each block's output (``block_{i}``: ``(n, tokens, width)``),
    the class token after ``ln_f`` (``cls``) and ``logits``. No ``with_widths``: heads and MLP units are removed
    through the graph (:func:`jaxprune.structured.remove_many`), which rebuilds the layers by interception."""

    num_classes: int
    patch: int = 7
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp: int = 128

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        n, h, w, c = x.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"patch={p}: expected a divisor of the image height {h} and width {w}")
        x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // p) * (w // p), -1)
        x = nn.Dense(self.width, kernel_init=GPT_INIT, name="patch_embed")(x)
        cls = self.param("cls_token", GPT_INIT, (1, 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)).astype(x.dtype), x], axis=1)
        x = x + self.param("pos_embed", GPT_INIT, (x.shape[1], self.width))
        for i in range(self.depth):
            y = nn.LayerNorm(name=f"block_{i}_ln_0")(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.width,
                                                    kernel_init=GPT_INIT, name=f"block_{i}_attn")(y, y)
            y = nn.gelu(nn.Dense(self.mlp, kernel_init=GPT_INIT, name=f"block_{i}_fc")(
                nn.LayerNorm(name=f"block_{i}_ln_1")(x)))
            x = _sow(self, f"block_{i}", x + nn.Dense(self.width, kernel_init=GPT_INIT, name=f"block_{i}_proj")(y))
        x = _sow(self, "cls", nn.LayerNorm(name="ln_f")(x)[:, 0])
        return _sow(self, "logits", nn.Dense(self.num_classes, kernel_init=GPT_INIT, name="head")(x))


# ----------------------------------------------------------------------------------------------- helpers
def build(name: str, num_classes: int, *, hidden: Sequence[int] = (300, 100), use_bias: bool = True,
          dropout: float = 0.0, weight_init: str = "he_normal", pool: str = "max", padding: str = "same"
          ) -> nn.Module:
    """Model by name: ``mlp`` (``hidden`` widths), ``lenet300``, ``lenet5``, ``conv2|4|6``, ``vgg11|16|19``,
    ``resnet20|32|44|56|110``, ``vit`` (:class:`ViT` with its defaults, for 28×28 images). ``weight_init`` (a key of :data:`INITS`) applies to the MLPs and ``lenet5`` (the
    other models use He normal); ``pool`` (``max`` or ``avg``, as the original LeNet-5) and ``padding`` (of
    ``conv_0``: ``same`` or ``valid``) to ``lenet5`` only."""
    if weight_init not in INITS:
        raise ValueError(f"weight_init={weight_init!r}: expected one of {sorted(INITS)}")
    if weight_init != "he_normal" and name not in ("mlp", "lenet300", "lenet5"):
        raise ValueError(f"weight_init={weight_init!r}: only the MLPs and model=lenet5 take an initialiser other "
                         f"than he_normal (model={name!r})")
    if pool not in POOLS or (pool != "max" and name != "lenet5"):
        raise ValueError(f"pool={pool!r}: expected one of {POOLS}; only model=lenet5 takes 'avg' (model={name!r})")
    if padding not in PADDINGS or (padding != "same" and name != "lenet5"):
        raise ValueError(f"padding={padding!r}: expected one of {PADDINGS}; only model=lenet5 takes 'valid' "
                         f"(model={name!r})")
    if name == "mlp":
        hidden = _validate.widths(hidden, "hidden")
        return MLP(tuple(hidden) + (num_classes,), use_bias=use_bias, dropout=dropout, weight_init=weight_init)
    if name == "lenet300":
        return MLP((300, 100, num_classes), use_bias=use_bias, dropout=dropout, weight_init=weight_init)
    if name == "lenet5":
        return LeNet5(num_classes, pool=pool, padding=padding, weight_init=weight_init)
    if name.startswith("conv") and name[4:].isdigit() and int(name[4:]) in CONV_CFGS:
        return ConvNet(int(name[4:]), num_classes)
    if name in VGG_CFGS:
        return VGG(VGG_CFGS[name], num_classes)
    if name.startswith("resnet") and name[6:].isdigit():
        return ResNet(int(name[6:]), num_classes)
    if name == "vit":
        return ViT(num_classes)
    raise ValueError(f"model={name!r}: expected one of mlp, lenet300, lenet5, conv2, conv4, conv6, "
                     f"{', '.join(VGG_CFGS)}, resnet20, resnet56 (any 6n+2), vit")


def init(model: nn.Module, key: Array, input_shape: Sequence[int]) -> Variables:
    """Variables ``{'params': …, ['batch_stats': …]}`` for inputs of shape ``(n, *input_shape[1:])``."""
    _validate.key(key)
    x = jnp.zeros((1,) + tuple(input_shape[1:]), jnp.float32)
    variables = model.init({"params": key, "dropout": key}, x, train=False)
    return {k: v for k, v in variables.items() if k != "representations"}


def representations(model: nn.Module, variables: Variables, x: Array) -> dict[str, Array]:
    """Named intermediate representations in forward order, eval mode: ``{name: (n, …)}`` ending with ``logits``."""
    _, state = model.apply(variables, x, train=False, mutable=["representations"])
    return dict(state["representations"]["named"])


def count_params(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def apply_fn(model: nn.Module) -> Callable[[Variables, Array], Array]:
    """``f(variables, x) -> logits`` in eval mode, for code that wants a plain function."""
    return lambda variables, x: model.apply(variables, x, train=False)
