"""The sparse train step against the dense one, side by side: LeNet-300-100, batch 128, SGD 0.1 (as
experiments/configs/sparse_train_lenet300_mnist.cfg), one epoch of MNIST-shaped data as one ``lax.scan``.

    python -m benchmarks.sparse_step                 # 3 repeats of one epoch (468 steps) per variant
    python -m benchmarks.sparse_step --repeats=5 --steps=936

Variants: ``dense`` (plain optax SGD), ``masked`` (``masks.masked``, the IMP step), and the
:mod:`jaxprune.sparse_training` transformations at 90 % sparsity: ``static``, ``gradual`` (pruning every 100
steps), ``set`` and ``rigl`` (rewiring every 100 steps, ERK). The window includes their mask-update steps, so the
ratios are the amortised cost per step. Each variant is compiled first (not timed); the variants are then timed in
turn, repeat after repeat, so machine load hits all of them alike; the table gives the median per step and the ratio
to dense (target <= 1.15). Data are random (timing does not depend on the values).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from jaxprune import masks, models, sparse_training, train


def make_variants(params, steps: int) -> dict[str, optax.GradientTransformation]:
    """The optimizers compared, each over the same SGD(0.1)."""
    sgd = train.make_optimizer(train.OptimConfig("sgd", 0.1), 0.1)
    prunable = masks.prunable_leaves(params, exclude=("^dense_2/",))
    key = jax.random.PRNGKey(0)
    dyn = lambda m: sparse_training.Dynamic(m, 0.9, "erk", 100, max(steps, 101))
    return {"dense": sgd, "masked": masks.masked(sgd),
            "static": sparse_training.dynamic(sgd, prunable, dyn("static"), key),
            "gradual": sparse_training.gradual(sgd, prunable, sparse_training.Gradual(0.9, 0, 400, 100)),
            "set": sparse_training.dynamic(sgd, prunable, dyn("set"), key),
            "rigl": sparse_training.dynamic(sgd, prunable, dyn("rigl"), key)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=468, help="steps per timed window (one epoch: 468)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=128)
    args = ap.parse_args()
    model = models.build("lenet300", 10)
    n = args.steps * args.batch_size
    x = jax.random.normal(jax.random.PRNGKey(1), (n, 28, 28, 1))
    y = jax.random.randint(jax.random.PRNGKey(2), (n,), 0, 10)
    idx = jnp.arange(n).reshape(args.steps, args.batch_size)
    v = models.init(model, jax.random.PRNGKey(0), x.shape)
    runs, compile_s = {}, {}
    for name, tx in make_variants(v["params"], args.steps).items():
        trainer = train.make_trainer(model, tx)
        state = train.create_state(v, tx)
        t = time.perf_counter()
        jax.block_until_ready(trainer.scan(state, x, y, idx, jax.random.PRNGKey(3)))
        compile_s[name] = time.perf_counter() - t
        runs[name] = (trainer, state)
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (trainer, state) in runs.items():
            t = time.perf_counter()
            jax.block_until_ready(trainer.scan(state, x, y, idx, jax.random.PRNGKey(3)))
            times[name].append((time.perf_counter() - t) / args.steps)
    dense = statistics.median(times["dense"])
    load = os.getloadavg()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}; jax {jax.__version__} ({jax.default_backend()})")
    print(f"LeNet-300-100, batch {args.batch_size}, {args.steps} steps per window, median of {args.repeats}")
    print("| step | ms per step (median) | all repeats (ms) | / dense (target <= 1.15) | first call (s) |")
    print("| --- | --- | --- | --- | --- |")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {1e3 * med:.3f} | {', '.join(f'{1e3 * t:.3f}' for t in ts)} | {med / dense:.2f} | "
              f"{compile_s[name]:.1f} |")


if __name__ == "__main__":
    main()
