"""Jitted training and evaluation. Knows nothing about pruning: masks arrive inside the optimizer.

Training is counted in steps; an epoch is ``n // batch_size`` steps (the remainder is dropped so shapes stay
static). The order of examples in epoch ``e`` is ``permutation(fold_in(data_key, e))``, so a run that starts at
step ``k`` (a rewind point, a resumed level) sees exactly the batches an uninterrupted run would. Dropout at step
``s`` draws from its own stream, ``fold_in(fold_in(data_key, DROPOUT_STREAM), s)`` (see :func:`step_keys`).

MLP epochs run as one ``lax.scan`` (about 20 % faster on CPU); convolutional models use a Python loop of jitted
steps, because XLA's CPU convolutions are many times slower inside ``scan``.

Data parallelism: ``make_trainer(model, tx, mesh=distributed.data_mesh())`` shards every batch over the mesh's
devices and replicates the rest (:mod:`jaxprune.distributed`); ``run`` and ``evaluate`` place the arrays.
Replicas: a :class:`Trainer` with ``replicas=K`` (built by :mod:`jaxprune.replicas`) trains K stacked states at
once; ``run`` then takes ``data_key: (K, 2)`` and reports per-replica metrics as lists.

Batches from an iterator (a generator, a tf.data / grain pipeline): :func:`run_batches` and
:func:`evaluate_batches` (one jitted step per batch; ``Trainer.step`` with ``idx=None`` takes the batch itself).
``make_trainer(..., loss=f)`` trains on any ``f(logits, labels)``; ``train_arg=False`` for models whose
``__call__`` has no ``train`` argument.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxprune import _validate, distributed
from jaxprune.models import BN_MOMENTUM

Array = jax.Array
PyTree = Any

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
AUGMENT_STREAM = 0x417547  # fold_in tag of the augmentation key (derived from fold_in(data_key, step))
DROPOUT_STREAM = 0x44524F50  # fold_in tag of the dropout stream, apart from the epoch permutation keys
# Divergence rule: training stops when a step's loss is non-finite or exceeds this many times max(|first loss|, 1)
# (the first loss of the run: 2.3 for 10-way cross-entropy at initialisation, so the limit is 230).
DIVERGENCE_FACTOR = 100.0
DIVERGENCE_HINT = ("lower the learning rate (--lr, OptimConfig.lr), clip the gradients (--clip_grad_norm, "
                   "OptimConfig.clip_grad_norm) or warm up (--warmup, OptimConfig.warmup_steps)")


class TrainState(NamedTuple):
    step: Array  # () int32, optimizer steps taken
    params: PyTree
    batch_stats: PyTree  # {} for models without BatchNorm
    opt_state: PyTree


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule. ``milestones`` are steps at which ``step`` multiplies by ``gamma``."""

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_steps: int = 0
    clip_grad_norm: float = 0.0  # > 0: scale gradients to at most this global L2 norm first (as PyTorch's clip_grad_norm_)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: expected one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr}: expected a positive finite learning rate")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay}: expected >= 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum}: expected a value in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}: expected >= 0")
        if not (self.clip_grad_norm >= 0 and math.isfinite(self.clip_grad_norm)):
            raise ValueError(f"clip_grad_norm={self.clip_grad_norm}: expected 0 (off) or a positive finite norm")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step, over a run of ``total_steps``."""
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "step":
        main = optax.piecewise_constant_schedule(cfg.lr, {int(m) - cfg.warmup_steps: cfg.gamma for m in cfg.milestones})
    else:
        main = optax.cosine_decay_schedule(cfg.lr, max(total_steps - cfg.warmup_steps, 1))
    if cfg.warmup_steps:
        warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
        return optax.join_schedules([warm, main], [cfg.warmup_steps])
    return main


def make_optimizer(cfg: OptimConfig, schedule: optax.Schedule | float) -> optax.GradientTransformation:
    """SGD (coupled L2 weight decay, as PyTorch), momentum/Nesterov, Adam (coupled), AdamW (decoupled).

    ``clip_grad_norm > 0`` clips the gradients' global norm before anything else (before weight decay is added,
    as ``torch.nn.utils.clip_grad_norm_`` before ``optimizer.step()``)."""
    clip = [optax.clip_by_global_norm(cfg.clip_grad_norm)] if cfg.clip_grad_norm else []
    if cfg.optimizer == "adamw":  # unchained without clipping: the optimizer state of existing runs stays as it was
        adamw = optax.adamw(schedule, weight_decay=cfg.weight_decay)
        return optax.chain(*clip, adamw) if clip else adamw
    decay = [optax.add_decayed_weights(cfg.weight_decay)] if cfg.weight_decay else []
    if cfg.optimizer == "adam":
        core = optax.adam(schedule)
    else:
        mom = None if cfg.optimizer == "sgd" else cfg.momentum
        core = optax.sgd(schedule, momentum=mom, nesterov=cfg.optimizer == "nesterov")
    return optax.chain(*clip, *decay, core)


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy. ``logits: (n, c)``, ``labels: (n,) int``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def create_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
    params = variables["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, variables.get("batch_stats", {}), tx.init(params))


def variables_of(state: TrainState) -> dict:
    v = {"params": state.params}
    if state.batch_stats:
        v["batch_stats"] = state.batch_stats
    return v


def has_conv(params: PyTree, lead: int = 0) -> bool:
    """Whether any leaf is a conv kernel (``lead`` leading axes, e.g. 1 for stacked replicas)."""
    return any(leaf.ndim == 4 + lead for leaf in jax.tree_util.tree_leaves(params))


class Trainer(NamedTuple):
    """Jitted functions for one (model, optimizer) pair; build once with :func:`make_trainer`, reuse across levels."""

    step: Callable  # (state, x_all, y_all, idx (b,), key) -> (state, (loss, correct))
    scan: Callable  # (state, x_all, y_all, idx (s, b), key) -> (state, (loss (s,), correct (s,)))
    evaluate: Callable  # (variables, x (b, …), y (b,), weight (b,)) -> (sum loss, sum correct)
    mesh: Any = None  # jax.sharding.Mesh: batches split over its devices, everything else replicated
    replicas: int | None = None  # K: states, keys and batch indices carry a leading replica axis


def step_functions(model: nn.Module, tx: optax.GradientTransformation, mesh=None,
                   augment: Callable[[Array, Array], Array] | None = None,
                   loss: Callable[[Array, Array], Array] | None = None,
                   train_arg: bool = True) -> tuple[Callable, ...]:
    """The un-jitted ``(step, scan, evaluate)`` of :func:`make_trainer` (for vmapping them into replicas).

    ``step(state, x_all, y_all, idx, key)`` trains on ``x_all[idx]``; with ``idx=None`` on ``(x_all, y_all)``
    themselves (a batch from an iterator, see :func:`run_batches`)."""
    loss_fn_ = cross_entropy if loss is None else loss
    kw = {"train": True} if train_arg else {}

    def step(state: TrainState, x_all: Array, y_all: Array, idx: Array | None, key: Array):
        batch = (x_all, y_all) if idx is None else (x_all[idx], y_all[idx])
        x, y = distributed.constrain_batch(batch, mesh)
        dropout_key, augment_key = step_keys(key, state.step)
        if augment is not None:  # its own stream, so augmenting leaves the dropout masks as they were
            x = augment(augment_key, x)

        def loss_fn(params):
            v = {"params": params, "batch_stats": state.batch_stats} if state.batch_stats else {"params": params}
            logits, new = model.apply(v, x, **kw, mutable=["batch_stats"], rngs={"dropout": dropout_key})
            return loss_fn_(logits, y), (logits, new.get("batch_stats", {}))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return TrainState(state.step + 1, params, batch_stats, opt_state), (loss, correct)

    def scan(state, x_all, y_all, idx, key):
        return jax.lax.scan(lambda s, i: step(s, x_all, y_all, i, key), state, idx)

    def evaluate(variables, x, y, weight):
        x, y, weight = distributed.constrain_batch((x, y, weight), mesh)
        logits = model.apply(variables, x, **({"train": False} if train_arg else {}))
        if loss is None:
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        else:  # per example: the loss of a batch of one (a mean loss, summed with weights below)
            losses = jax.vmap(lambda l, t: loss(l[None], t[None]))(logits, y)
        return jnp.sum(losses * weight), jnp.sum((jnp.argmax(logits, -1) == y) * weight)

    return step, scan, evaluate


def make_trainer(model: nn.Module, tx: optax.GradientTransformation, mesh=None,
                 augment: Callable[[Array, Array], Array] | None = None,
                 loss: Callable[[Array, Array], Array] | None = None, train_arg: bool = True) -> Trainer:
    """Jitted step/scan/evaluate. ``mesh`` (see :func:`jaxprune.distributed.data_mesh`): data-parallel over its
    devices (batch sizes must be multiples of the device count); ``None``: the default device. ``augment(key, x)``
    (see :mod:`jaxprune.augment`) transforms every training batch inside the step; evaluation never sees it.
    ``loss(logits, labels) -> scalar``: the mean training loss of a batch (default :func:`cross_entropy`); the
    evaluation loss is its mean over single examples. ``train_arg=False``: the model's ``__call__`` takes no
    ``train`` argument. Accuracy is ``argmax(logits) == labels`` (integer labels)."""
    return Trainer(*(jax.jit(f) for f in step_functions(model, tx, mesh, augment, loss, train_arg)), mesh=mesh)


def step_keys(data_key: Array, step: Array | int) -> tuple[Array, Array]:
    """``(dropout_key, augment_key)`` of optimizer step ``step``.

    Dropout: ``fold_in(fold_in(data_key, DROPOUT_STREAM), step)``, never :func:`epoch_key` of any epoch.
    Augmentation: ``fold_in(fold_in(data_key, step), AUGMENT_STREAM)`` (as before the dropout stream was split
    off, so runs without dropout are unchanged)."""
    _validate.key(data_key, "data_key")
    dropout = jax.random.fold_in(jax.random.fold_in(data_key, DROPOUT_STREAM), step)
    return dropout, jax.random.fold_in(jax.random.fold_in(data_key, step), AUGMENT_STREAM)


def epoch_key(data_key: Array, epoch: int) -> Array:
    """The key whose permutation orders epoch ``epoch``: ``fold_in(data_key, epoch)``."""
    return jax.random.fold_in(_validate.key(data_key, "data_key"), epoch)


def epoch_order(key: Array, epoch: int, n: int, batch_size: int) -> Array:
    """Batch indices of one epoch: ``(n // batch_size, batch_size)`` int32."""
    steps = n // batch_size
    perm = jax.random.permutation(epoch_key(_validate.key(key), epoch), n)
    return perm[: steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)


class Diverged(ValueError):
    """Training stopped because the loss diverged (:data:`DIVERGENCE_FACTOR`); ``step`` is the first bad step (1-based
    count of optimizer steps taken), ``loss`` its loss."""

    def __init__(self, message: str, step: int, loss: float):
        super().__init__(message)
        self.step, self.loss = step, loss


def loss_limit(first_loss: Array, factor: float | None = DIVERGENCE_FACTOR) -> Array:
    """The loss above which training counts as diverged: ``factor · max(|first_loss|, 1)`` (``inf`` when
    ``factor`` is None: no limit). ``first_loss: (…,)`` (one per replica)."""
    if factor is None:
        return jnp.full(jnp.shape(first_loss), jnp.inf)
    return factor * jnp.maximum(jnp.abs(first_loss), 1.0)


def check_divergence(losses: Array, limit: Array, first_step: int, log_prefix: str = "") -> None:
    """Raise :class:`Diverged` when a loss of ``losses: (…, s)`` (steps ``first_step + 1 …``; a leading replica
    axis allowed) is non-finite or above ``limit: (…,)``. One device→host transfer of two small arrays."""
    bad = ~jnp.isfinite(losses) | (losses > jnp.asarray(limit)[..., None])
    hit, where = np.asarray(jnp.any(bad, -1)), np.asarray(jnp.argmax(bad, -1))
    if not hit.any():
        return
    r = int(np.argmax(hit.reshape(-1)))
    i = int(where.reshape(-1)[r])
    value = float(np.asarray(losses).reshape(-1, np.shape(losses)[-1])[r, i])
    lim = float(np.asarray(limit).reshape(-1)[r])
    who = f" (replica {r})" if np.ndim(hit) else ""
    why = "not finite" if not math.isfinite(value) else f"above the limit {lim:.4g}, a multiple of the first loss"
    raise Diverged(f"{log_prefix}training diverged at step {first_step + i + 1}{who}: the training loss is "
                   f"{value:.4g} ({why}); {DIVERGENCE_HINT}", first_step + i + 1, value)


@dataclasses.dataclass
class RunResult:
    state: TrainState
    train_loss: float  # mean over the steps run in the last epoch segment
    train_accuracy: float
    snapshot: TrainState | None  # the state when ``state.step == snapshot_step`` (a rewind point), if asked
    seconds: float
    history: list[dict]


def run(trainer: Trainer, state: TrainState, x: Array, y: Array, *, batch_size: int, num_steps: int,
        data_key: Array, loop: str = "auto", snapshot_step: int | None = None, log_prefix: str = "",
        eval_fn: Callable[[TrainState], dict] | None = None,
        max_loss_factor: float | None = DIVERGENCE_FACTOR) -> RunResult:
    """Train from ``state.step`` until ``state.step == num_steps``. ``x: (n, …)``, ``y: (n,)`` device arrays.

    ``loop``: ``"scan"`` (an epoch per call), ``"python"`` (a jitted step per call) or ``"auto"`` (scan unless the
    model has convolutions). ``snapshot_step``: return a copy of the state taken when that step is reached.
    ``eval_fn(state) -> dict`` is called after each epoch and logged. With ``trainer.replicas = K``: ``data_key:
    (K, 2)``, every state leaf has a leading K axis and the metrics are lists of K floats.
    Divergence: a step's loss that is non-finite or above ``max_loss_factor · max(|first loss of this run|, 1)``
    raises :class:`Diverged` naming the step (checked once per epoch on the epoch's losses, no per-step host sync;
    ``None``: no check).
    """
    n = _check_run_args(trainer, x, y, batch_size, loop, data_key)
    lead = 0 if trainer.replicas is None else 1
    if trainer.mesh is not None:
        distributed.check_divisible(batch_size, trainer.mesh)
        x, y, state = distributed.replicate((x, y, state), trainer.mesh)
    use_scan = (loop == "scan") or (loop == "auto" and not has_conv(state.params, lead))
    spe = n // batch_size
    start = int(np.asarray(state.step).reshape(-1)[0])  # replicas advance in lockstep
    snapshot = state if snapshot_step is not None and start == snapshot_step else None
    t0 = time.perf_counter()
    history: list[dict] = []
    loss = acc = float("nan")
    limit = None
    s = start
    while s < num_steps:
        epoch, offset = divmod(s, spe)
        stop = min(spe, offset + (num_steps - s))
        order = _epoch_order(trainer, data_key, epoch, n, batch_size)
        state, losses, corrects, snap = _run_epoch(trainer, state, (x, y, order, data_key), (offset, stop),
                                                   snapshot_step - epoch * spe if snapshot_step is not None else None,
                                                   use_scan)
        snapshot = snap if snap is not None else snapshot
        s = epoch * spe + stop
        limit = loss_limit(losses[..., 0], max_loss_factor) if limit is None else limit
        check_divergence(losses, limit, epoch * spe + offset, log_prefix)
        loss = _metric(jnp.mean(losses, -1))
        acc = _metric(jnp.sum(corrects, -1) / ((stop - offset) * batch_size))
        elapsed = time.perf_counter() - t0
        rec = {"epoch": epoch + 1 if stop == spe else epoch + stop / spe, "step": s, "train_loss": loss,
               "train_accuracy": acc, "examples_per_s": (s - start) * batch_size / max(elapsed, 1e-9)}
        if eval_fn is not None:
            rec.update(eval_fn(state))
        history.append(rec)
        _log_epoch(rec, log_prefix, num_steps, elapsed / (s - start) * (num_steps - s))
    return RunResult(state, loss, acc, snapshot, time.perf_counter() - t0, history)


def _check_run_args(trainer: Trainer, x: Array, y: Array, batch_size: int, loop: str, data_key: Array) -> int:
    """Refuse what :func:`run` cannot train on (lengths, batch size, loop, replica keys); returns ``n``."""
    n = int(x.shape[0])
    if np.shape(y)[:1] != (n,):
        raise ValueError(f"y: {np.shape(y)[0] if np.ndim(y) else 'a scalar'} labels for {n} examples of x; expected "
                         f"one label per example (y: ({n},))")
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"batch_size={batch_size}: expected 1 <= batch_size <= number of examples ({n})")
    if loop not in ("auto", "scan", "python"):
        raise ValueError(f"loop={loop!r}: expected 'auto', 'scan' or 'python'")
    _check_data_key(trainer, data_key)
    return n


def _check_data_key(trainer: Trainer, data_key: Array) -> None:
    """``data_key``: one key, or ``(K, 2)`` keys (one per replica) for a trainer of K replicas."""
    if trainer.replicas is not None and np.shape(data_key)[:1] != (trainer.replicas,):
        raise ValueError(f"data_key: expected ({trainer.replicas}, 2) keys, one per replica; got {np.shape(data_key)}")
    _validate.key(data_key, "data_key", batch=trainer.replicas)


def _epoch_order(trainer: Trainer, data_key: Array, epoch: int, n: int, batch_size: int) -> Array:
    """Epoch ``epoch``'s batch indices ``(steps, b)`` (``(K, steps, b)`` for K replicas), placed on the mesh."""
    if trainer.replicas is not None:
        order = jax.vmap(lambda k: epoch_order(k, epoch, n, batch_size))(data_key)
    else:
        order = epoch_order(data_key, epoch, n, batch_size)
    if trainer.mesh is not None:
        order = distributed.put(order, distributed.batch_sharding(trainer.mesh, order.ndim - 1))
    return order


def _run_epoch(trainer: Trainer, state: TrainState, data: tuple, span: tuple[int, int], snap_at: int | None,
               use_scan: bool) -> tuple[TrainState, Array, Array, TrainState | None]:
    """Steps ``span = (offset, stop)`` of one epoch (``data = (x, y, order, data_key)``); returns the state, the
    steps' losses and correct counts ``(…, stop - offset)`` and the state after step ``snap_at`` of the epoch (its
    index within the epoch) when that falls inside the span."""
    x, y, order, data_key = data
    offset, stop = span
    cuts = [offset, stop]
    if snap_at is not None and offset < snap_at < stop:
        cuts.insert(1, snap_at)
    losses, corrects, snapshot = [], [], None
    for a, b in zip(cuts[:-1], cuts[1:]):
        if use_scan:
            state, (l, c) = trainer.scan(state, x, y, order[..., a:b, :], data_key)
            losses.append(l)
            corrects.append(c)
        else:
            for i in range(a, b):
                state, (l, c) = trainer.step(state, x, y, order[..., i, :], data_key)
                losses.append(l[..., None])
                corrects.append(c[..., None])
        if snap_at is not None and b == snap_at:
            snapshot = state
    return state, jnp.concatenate(losses, -1), jnp.concatenate(corrects, -1), snapshot


def _log_epoch(rec: dict, log_prefix: str, num_steps: int, eta: float) -> None:
    extra = "".join(f" {k}={np.mean(v):.4f}" for k, v in rec.items() if k.startswith("test_"))
    logging.info("%sepoch %.2f step %d/%d loss=%.4f acc=%.4f%s %.0f ex/s eta %.0fs", log_prefix, rec["epoch"],
                 rec["step"], num_steps, np.mean(rec["train_loss"]), np.mean(rec["train_accuracy"]), extra,
                 rec["examples_per_s"], eta)


def run_batches(trainer: Trainer, state: TrainState, batches: Iterable, *, num_steps: int, data_key: Array,
                snapshot_step: int | None = None, log_prefix: str = "", log_every: int = 100,
                eval_fn: Callable[[TrainState], dict] | None = None,
                max_loss_factor: float | None = DIVERGENCE_FACTOR) -> RunResult:
    """:func:`run` over batches from an iterator: one jitted step per ``(x, y)`` batch, from ``state.step`` until
    ``state.step == num_steps``.

    ``batches`` yields the batches of steps ``state.step, state.step + 1, …`` (a generator, a tf.data / grain
    pipeline as numpy); running out before ``num_steps`` is a ValueError. Batches of one shape compile once.
    Dropout and augmentation keys are drawn from ``data_key`` by step, as in :func:`run`. Metrics and
    ``eval_fn`` are taken every ``log_every`` steps and at the end (the train metrics: means over those steps).
    Single-replica trainers without a mesh only. Divergence (``max_loss_factor``) as in :func:`run`, checked every
    ``log_every`` steps."""
    if trainer.replicas is not None or trainer.mesh is not None:
        raise ValueError("run_batches: expected a single-replica trainer without a mesh (train.make_trainer(model, "
                         "tx)); replicas and data parallelism need in-memory arrays (train.run)")
    if log_every < 1:
        raise ValueError(f"log_every={log_every}: expected >= 1")
    start = s = int(state.step)
    snapshot = state if snapshot_step is not None and start == snapshot_step else None
    t0 = time.perf_counter()
    history: list[dict] = []
    loss = acc = float("nan")
    _validate.key(data_key, "data_key")
    losses, corrects, seen = [], [], 0
    limit = None
    it = iter(batches)
    while s < num_steps:
        try:
            xb, yb = next(it)
        except StopIteration:
            raise ValueError(f"batches ran out at step {s}: expected batches for steps {start}..{num_steps - 1} "
                             f"({num_steps - start} batches)") from None
        xb, yb = jnp.asarray(xb), jnp.asarray(yb)
        state, (l, c) = trainer.step(state, xb, yb, None, data_key)
        s += 1
        losses.append(l)
        corrects.append(c)
        seen += int(yb.shape[0])
        if snapshot_step is not None and s == snapshot_step:
            snapshot = state
        if s % log_every == 0 or s == num_steps:
            window = jnp.stack(losses)
            limit = loss_limit(window[0], max_loss_factor) if limit is None else limit
            check_divergence(window, limit, s - len(losses), log_prefix)
            loss = float(np.mean(np.asarray(window, np.float64)))
            acc = float(np.sum(np.asarray(jnp.stack(corrects), np.float64)) / seen)
            elapsed = time.perf_counter() - t0
            rec = {"step": s, "train_loss": loss, "train_accuracy": acc,
                   "steps_per_s": (s - start) / max(elapsed, 1e-9)}
            if eval_fn is not None:
                rec.update(eval_fn(state))
            history.append(rec)
            extra = "".join(f" {k}={v:.4f}" for k, v in rec.items() if k.startswith("test_"))
            logging.info("%sstep %d/%d loss=%.4f acc=%.4f%s", log_prefix, s, num_steps, loss, acc, extra)
            losses, corrects, seen = [], [], 0
    return RunResult(state, loss, acc, snapshot, time.perf_counter() - t0, history)


def evaluate_batches(trainer: Trainer, variables: dict, batches: Iterable) -> dict[str, float]:
    """:func:`evaluate` over ``(x, y)`` batches from an iterator (each batch shape compiles once)."""
    if trainer.replicas is not None or trainer.mesh is not None:
        raise ValueError("evaluate_batches: expected a single-replica trainer without a mesh")
    tot_loss = tot_correct = np.float64(0.0)
    n = 0
    for xb, yb in batches:
        xb, yb = jnp.asarray(xb), jnp.asarray(yb)
        l, c = trainer.evaluate(variables, xb, yb, jnp.ones((yb.shape[0],), jnp.float32))
        tot_loss, tot_correct = tot_loss + np.float64(l), tot_correct + np.float64(c)
        n += int(yb.shape[0])
    if n == 0:
        raise ValueError("evaluate_batches: no batches (empty evaluation set)")
    return {"loss": float(tot_loss / n), "accuracy": float(tot_correct / n)}


def _metric(x: Array) -> float | list[float]:
    """A scalar as a float; a per-replica vector ``(K,)`` as a list of K floats."""
    x = np.asarray(x, np.float64)
    return float(x) if x.ndim == 0 else x.tolist()


def evaluate(trainer: Trainer, variables: dict, x: Array, y: Array,
             batch_size: int = 1000) -> dict[str, float | list[float]]:
    """Mean loss and accuracy over ``(x, y)`` in fixed-size chunks (the last one padded and weighted out).

    Data-parallel trainers round the chunk up to a multiple of the device count; replica trainers (stacked
    ``variables``) give lists of K values.
    """
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("evaluate: empty evaluation set")
    b = min(batch_size, n)
    if trainer.mesh is not None:
        d = distributed.num_shards(trainer.mesh)
        b = -(-b // d) * d
        x, y, variables = distributed.replicate((x, y, variables), trainer.mesh)
    tot_loss = tot_correct = np.float64(0.0)
    for i in range(0, n, b):
        xb, yb = x[i:i + b], y[i:i + b]
        m = xb.shape[0]
        w = jnp.ones((b,), jnp.float32)
        if m < b:
            pad = b - m
            xb = jnp.concatenate([xb, jnp.zeros((pad,) + xb.shape[1:], xb.dtype)])
            yb = jnp.concatenate([yb, jnp.zeros((pad,), yb.dtype)])
            w = w.at[m:].set(0.0)
        l, c = trainer.evaluate(variables, xb, yb, w)
        tot_loss = tot_loss + np.asarray(l, np.float64)
        tot_correct = tot_correct + np.asarray(c, np.float64)
    return {"loss": _metric(tot_loss / n), "accuracy": _metric(tot_correct / n)}


@functools.partial(jax.jit, static_argnames="model")
def _batch_bn_stats(model: nn.Module, variables: dict, xb: Array, key: Array) -> dict:
    """One batch's own BatchNorm statistics, ``{…: {'mean': (c,), 'var': (c,)}}`` (one compile per model/shape)."""
    zero = jax.tree_util.tree_map(jnp.zeros_like, variables["batch_stats"])
    _, new = model.apply({**variables, "batch_stats": zero}, xb, train=True, mutable=["batch_stats"],
                         rngs={"dropout": key})
    # running stats start at 0, so one update is (1 − momentum) × the batch's own stats
    return jax.tree_util.tree_map(lambda v: v / (1.0 - BN_MOMENTUM), new["batch_stats"])


def recalibrate_batchnorm(model: nn.Module, variables: dict, x: Array, *, batch_size: int = 256,
                          num_batches: int = 20, key: Array | None = None) -> dict:
    """Re-estimate every BatchNorm's running mean and variance as population statistics over ``num_batches``
    batches of ``x`` (the first ``num_batches · batch_size`` examples), forward in train mode.

    After units are removed or merged upstream, the stored statistics no longer describe a layer's inputs; this
    replaces them (exactly: the mean of the batch means, and the mean of ``var_b + mean_b²`` minus the squared
    mean), leaving every parameter untouched. Returns ``variables`` unchanged for models without BatchNorm.
    """
    if not variables.get("batch_stats"):
        return variables
    n = int(x.shape[0])
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size={batch_size}: expected 1 <= batch_size <= number of examples ({n})")
    num_batches = min(int(num_batches), n // batch_size)
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches}: expected >= 1")
    key = jax.random.PRNGKey(0) if key is None else _validate.key(key)
    per = [_batch_bn_stats(model, variables, x[i * batch_size:(i + 1) * batch_size], jax.random.fold_in(key, i))
           for i in range(num_batches)]

    def pool(*stats):  # per BatchNorm: {'mean': (c,), 'var': (c,)} of each batch → population statistics
        mean = sum(s["mean"] for s in stats) / len(stats)
        second = sum(s["var"] + s["mean"] ** 2 for s in stats) / len(stats)
        return {"mean": mean, "var": jnp.maximum(second - mean ** 2, 0.0)}

    is_bn = lambda t: isinstance(t, dict) and set(t) == {"mean", "var"}
    pooled = jax.tree_util.tree_map(pool, *per, is_leaf=is_bn)
    return {**variables, "batch_stats": pooled}


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size


def parse_duration(spec: str | int, spe: int, name: str = "") -> int:
    """``"16ep"`` → 16·spe steps, ``"500"`` or ``"500it"`` → 500 steps (OpenLTH notation).

    ``name``: the setting (flag) the value came from, named in the error; a negative or non-finite duration is
    refused."""
    s = str(spec).strip()
    where = f"{name}: " if name else ""
    try:
        if s.endswith("ep"):
            epochs = float(s[:-2])
            if not math.isfinite(epochs):
                raise ValueError
            steps = int(round(epochs * spe))
        else:
            steps = int(s[:-2] if s.endswith("it") else s)
    except (ValueError, OverflowError):
        raise ValueError(f"{where}duration {spec!r}: expected steps ('500', '500it') or epochs ('2ep')") from None
    if steps < 0:
        raise ValueError(f"{where}duration {spec!r}: expected a length >= 0 (steps ('500') or epochs ('2ep'))")
    return steps


def to_device(*arrays: np.ndarray) -> Sequence[Array]:
    return tuple(jnp.asarray(a) for a in arrays)
