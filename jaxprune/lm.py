"""Language-model training and evaluation on character ids: windows, the jitted AdamW loop, loss, sampling.

* Training batches are random contiguous windows of ``context + 1`` ids (inputs and next-id targets), drawn with
  an explicit key per step (``fold_in(data_key, step)``), so a run is reproducible and resumable by step.
* Steps run as ``lax.scan`` over chunks of ``log_every`` steps; the optimizer is :func:`jaxprune.train.make_optimizer`
  (AdamW, linear warmup then cosine decay, global-norm clipping).
* Validation loss is in nats per character, the mean over a fixed set of evenly spaced validation windows (every
  position of a window is scored).

``model`` is any Flax module mapping ``tokens: (b, t) int32 -> logits (b, t, vocab)`` (e.g.
:class:`jaxprune.models.GPT`); ``params`` is its ``"params"`` collection.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import train

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Training recipe: ``steps`` AdamW steps on ``batch_size`` windows of ``context`` characters."""

    steps: int = 3000
    batch_size: int = 32
    context: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    clip_grad_norm: float = 1.0
    log_every: int = 100

    def __post_init__(self):
        for name in ("steps", "batch_size", "context", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected an integer >= 1")

    def optimizer(self) -> optax.GradientTransformation:
        cfg = train.OptimConfig(optimizer="adamw", lr=self.lr, weight_decay=self.weight_decay, schedule="cosine",
                                warmup_steps=min(self.warmup_steps, self.steps - 1),
                                clip_grad_norm=self.clip_grad_norm)
        return train.make_optimizer(cfg, train.make_schedule(cfg, self.steps))

    def finetune_optimizer(self, lr: float) -> optax.GradientTransformation:
        """The fine-tuning round after pruning: AdamW at the constant ``lr`` (no warm-up, no decay) with this
        recipe's weight decay and gradient clipping."""
        cfg = train.OptimConfig(optimizer="adamw", lr=lr, weight_decay=self.weight_decay,
                                clip_grad_norm=self.clip_grad_norm)
        return train.make_optimizer(cfg, cfg.lr)


def random_windows(ids: Array, key: Array, batch_size: int, context: int) -> tuple[Array, Array]:
    """``batch_size`` windows at uniform random starts: inputs ``(b, context)`` and targets (shifted by one)."""
    starts = jax.random.randint(key, (batch_size,), 0, ids.shape[0] - context)
    idx = starts[:, None] + jnp.arange(context + 1)[None, :]
    w = ids[idx]
    return w[:, :-1], w[:, 1:]


def fixed_windows(ids: np.ndarray, n_windows: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_windows`` evenly spaced windows covering ``ids`` (the validation set): ``x, y: (n_windows, context)``."""
    ids = np.asarray(ids)
    if ids.shape[0] < context + 1:
        raise ValueError(f"ids: {ids.shape[0]} characters, expected at least context + 1 = {context + 1}")
    starts = np.linspace(0, ids.shape[0] - context - 1, n_windows).astype(np.int64)
    w = ids[starts[:, None] + np.arange(context + 1)[None, :]]
    return w[:, :-1].astype(np.int32), w[:, 1:].astype(np.int32)


def loss_fn(apply: Callable, params: PyTree, x: Array, y: Array) -> Array:
    """Mean next-character cross-entropy in nats: ``x, y: (b, t) int``."""
    logits = apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.lru_cache(maxsize=32)
def flax_apply(model: nn.Module) -> Callable[[PyTree, Array], Array]:
    """``f(params, tokens) -> logits`` of a Flax module (its ``params`` collection only); the same function for
    equal modules, so the jitted evaluation and sampling below compile once per model."""
    return lambda params, x: model.apply({"params": params}, x)


@functools.lru_cache(maxsize=32)
def _summed_loss(apply: Callable) -> Callable:
    return jax.jit(lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(apply(p, xb), yb).sum())


def make_chunk(apply: Callable, tx: optax.GradientTransformation, ids: Array, cfg: LMConfig) -> Callable:
    """Jitted ``(params, opt_state, data_key, start, n) -> (params, opt_state, losses (n,))``: ``n`` (static)
    training steps from step ``start``, as one ``lax.scan``. ``ids`` (the training text, 18 MB for Shakespeare)
    is an argument of the compiled program, not a constant baked into it."""

    def chunk(params, opt_state, data_key, start, n, text):
        def one(carry, step):
            params, opt_state = carry
            x, y = random_windows(text, jax.random.fold_in(data_key, step), cfg.batch_size, cfg.context)
            loss, grads = jax.value_and_grad(lambda p: loss_fn(apply, p, x, y))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(one, (params, opt_state), start + jnp.arange(n))
        return params, opt_state, losses

    run = jax.jit(chunk, static_argnums=4)
    return lambda params, opt_state, data_key, start, n: run(params, opt_state, data_key, start, n, ids)


def evaluate(apply: Callable, params: PyTree, x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> float:
    """Mean cross-entropy (nats per character) over the windows ``x, y: (n, t)``, in batches."""
    f = _summed_loss(apply)
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        total += float(f(params, jnp.asarray(x[i:i + batch_size]), jnp.asarray(y[i:i + batch_size])))
    return total / float(x.size)


def fit(apply: Callable, params: PyTree, train_ids: np.ndarray, cfg: LMConfig, data_key: Array,
        log: Callable[[int, float, float, PyTree], None] | None = None) -> tuple[PyTree, dict]:
    """Train ``params`` for ``cfg.steps`` steps; ``log(step, mean train loss of the chunk, seconds, params)`` after
    each chunk of ``cfg.log_every`` steps. Returns the trained params and ``{"train_loss": [...per chunk],
    "seconds": float}`` (``seconds``: the training steps only, without the time ``log`` takes)."""
    if train_ids.shape[0] < cfg.context + 2:
        raise ValueError(f"train_ids: {train_ids.shape[0]} characters, expected more than context + 1")
    tx = cfg.optimizer()
    ids = jnp.asarray(train_ids, jnp.int32)
    chunk = make_chunk(apply, tx, ids, cfg)
    opt_state = tx.init(params)
    history, seconds, step = [], 0.0, 0
    while step < cfg.steps:
        n = min(cfg.log_every, cfg.steps - step)
        t0 = time.perf_counter()
        params, opt_state, losses = chunk(params, opt_state, data_key, jnp.int32(step), n)
        history.append(float(jnp.mean(losses)))
        seconds += time.perf_counter() - t0
        step += n
        if log is not None:
            log(step, history[-1], seconds, params)
    return params, {"train_loss": history, "seconds": seconds}


def generate(model: nn.Module, params: PyTree, prompt: np.ndarray, key: Array, n: int,
             temperature: float = 1.0) -> np.ndarray:
    """``n`` ids sampled after ``prompt: (p,) int`` (p >= 1), each from the model's distribution at the last
    position of the most recent ``model.context`` ids (logits divided by ``temperature``). ``model``: a Flax LM
    with a ``context`` field (e.g. :class:`jaxprune.models.GPT`). Returns ``(n,)`` int32."""
    context, apply = int(model.context), flax_apply(model)
    prompt = np.asarray(prompt, np.int32).reshape(-1)[-context:]
    if prompt.size < 1 or not temperature > 0:
        raise ValueError("prompt: expected at least one id, and temperature > 0")
    buf = jnp.zeros((context,), jnp.int32).at[:prompt.size].set(prompt)
    toks = _sampler(apply, context, float(temperature))(params, buf, jnp.int32(prompt.size), jax.random.split(key, n))
    return np.asarray(toks)


@functools.lru_cache(maxsize=32)
def _sampler(apply: Callable, context: int, temperature: float) -> Callable:
    """Jitted ``(params, buf (context,), length, keys (n, 2)) -> ids (n,)``: the sampling loop of :func:`generate`."""

    def run(params, buf, length, keys):
        def step(carry, k):
            buf, length = carry
            logits = apply(params, buf[None])[0, jnp.minimum(length, context) - 1]
            tok = jax.random.categorical(k, logits / temperature).astype(jnp.int32)
            full = length >= context
            buf = jnp.where(full, jnp.roll(buf, -1).at[context - 1].set(tok),
                            buf.at[jnp.minimum(length, context - 1)].set(tok))
            return (buf, length + 1), tok

        return jax.lax.scan(step, (buf, length), keys)[1]

    return jax.jit(run)
