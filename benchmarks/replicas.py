"""K replicas of LeNet-300-100 on MNIST in one program against K separate runs; time per replica.

    python -m benchmarks.replicas                       # K = 1, 2, 4, 8; 200 steps of 128; both layouts
    python -m benchmarks.replicas --ks=4 --steps=468    # the issue's case: 4 seeds, one epoch
    python -m benchmarks.replicas --agreement --ks=3    # not timing: is replica r the single run of seed r?

For each K the single-seed run and the K-replica runs (``jaxprune.replicas`` layouts ``vmap`` and ``unrolled``)
are timed back to back (compiled beforehand), so machine load hits them alike; "per replica / single" ≤ 1 means
K replicas in one program are no slower than K separate runs. A second table times the GEMMs of the first layer
(forward, weight gradient, input gradient) for K replicas as one batched ``dot_general`` against K plain GEMMs in
one jitted function, and counts the ops of each layout's compiled step — the profile behind the choice of layout.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp

from experiments import common
from jaxprune import masks, models, replicas, train


def _timed(fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


class Bench:
    def __init__(self, x, y, steps: int, batch: int, model: str = "lenet300"):
        self.model = models.build(model, 10)
        self.tx = masks.masked(train.make_optimizer(train.OptimConfig("sgd", 0.1), 0.1))
        self.x, self.y = train.to_device(x, y)
        self.steps, self.batch = steps, batch
        self.single = train.make_trainer(self.model, self.tx)
        self.multi: dict = {}

    def state(self, seed: int) -> train.TrainState:
        return train.create_state(models.init(self.model, jax.random.PRNGKey(seed), self.x.shape), self.tx)

    def run_single(self, seed: int = 0):
        return train.run(self.single, self.state(seed), self.x, self.y, batch_size=self.batch,
                         num_steps=self.steps, data_key=jax.random.PRNGKey(100 + seed)).state.params

    def run_multi(self, k: int, layout: str):
        if (k, layout) not in self.multi:
            self.multi[k, layout] = replicas.make_trainer(self.model, self.tx, k, layout=layout)
        st = replicas.stack([self.state(s) for s in range(k)])
        keys = replicas.stack([jax.random.PRNGKey(100 + s) for s in range(k)])
        return train.run(self.multi[k, layout], st, self.x, self.y, batch_size=self.batch, num_steps=self.steps,
                         data_key=keys).state.params

    def hlo_ops(self, k: int, layout: str) -> dict[str, int]:
        tr = self.multi[k, layout]
        st = replicas.stack([self.state(s) for s in range(k)])
        idx = jnp.zeros((k, self.batch), jnp.int32)
        keys = replicas.stack([jax.random.PRNGKey(s) for s in range(k)])
        text = tr.step.lower(st, self.x, self.y, idx, keys).compile().as_text()
        body = [ln for ln in text.splitlines() if "=" in ln and not ln.lstrip().startswith(("ROOT %tuple", "//"))]
        return {"dot": sum(bool(re.search(r"\bdot\(", ln)) for ln in body),
                "batched dot": sum("lhs_batch_dims" in ln for ln in body),
                "transpose/copy": sum(bool(re.search(r"\b(transpose|copy)\(", ln)) for ln in body)}


def breakdown(b: "Bench", k: int, reps: int = 50) -> dict[str, float]:
    """Milliseconds per step, K stacked replicas vs 1 (vmap): the whole train step, the gradient alone (forward +
    backward), and the update alone (masked SGD applied to a given gradient)."""
    out = {}
    for kk in (1, k):
        st = replicas.stack([b.state(s) for s in range(kk)])
        x = jnp.stack([b.x[:b.batch]] * kk)
        y = jnp.stack([b.y[:b.batch]] * kk)
        loss = lambda p, xb, yb: train.cross_entropy(b.model.apply({"params": p}, xb), yb)
        grad = jax.jit(jax.vmap(jax.grad(loss)))
        g = grad(st.params, x, y)
        upd = jax.jit(jax.vmap(lambda gr, o, p: b.tx.update(gr, o, p)))
        full = b.multi.get((kk, "vmap")) or replicas.make_trainer(b.model, b.tx, kk)
        idx = jnp.zeros((kk, b.batch), jnp.int32)
        keys = replicas.stack([jax.random.PRNGKey(s) for s in range(kk)])
        cases = {"step": lambda: full.step(st, b.x, b.y, idx, keys)[0].params,
                 "grad": lambda: grad(st.params, x, y),
                 "update": lambda: upd(g, st.opt_state, st.params)[0]}
        for name, f in cases.items():
            jax.block_until_ready(f())
            out[f"{name} K={kk}"] = min(_timed(lambda: [f() for _ in range(reps)][-1]) for _ in range(3)) / reps * 1e3
    return out


def gemm_table(k: int, batch: int, reps: int = 20) -> list[tuple[str, float, float]]:
    """GFLOP/s of layer-1 GEMMs for K replicas: batched dot_general vs K plain GEMMs, same jit."""
    i, o = 784, 300
    x, w, g = jnp.ones((k, batch, i)), jnp.ones((k, i, o)), jnp.ones((k, batch, o))
    cases = [("forward x·W", "kbi,kio->kbo", lambda a, b: a @ b, (x, w)),
             ("weight grad xᵀ·g", "kbi,kbo->kio", lambda a, b: a.T @ b, (x, g)),
             ("input grad g·Wᵀ", "kbo,kio->kbi", lambda a, b: a @ b.T, (g, w))]
    flops = 2 * k * batch * i * o
    rows = []
    for name, eq, one, args in cases:
        batched = jax.jit(lambda a, b, eq=eq: jnp.einsum(eq, a, b))
        unrolled = jax.jit(lambda a, b, one=one: jnp.stack([one(a[r], b[r]) for r in range(k)]))
        best = {}
        for label, f in (("batched", batched), ("unrolled", unrolled)):
            f(*args).block_until_ready()
        for _ in range(3):  # alternate so load hits both alike
            for label, f in (("batched", batched), ("unrolled", unrolled)):
                t = _timed(lambda: [f(*args) for _ in range(reps)][-1]) / reps
                best[label] = min(best.get(label, float("inf")), t)
        rows.append((name, flops / best["batched"] / 1e9, flops / best["unrolled"] / 1e9))
    return rows


def agreement(x, y, k: int, steps: int, batch: int, layouts: list[str]) -> list[tuple[str, str, float]]:
    """Rows ``(model, what, max |Δ|)``: replica r of K against the single run of seed r, max over r and leaves —
    the gradient of one batch at the initial weights under ``jax.vmap``, and the weights after ``steps`` steps
    for each layout. 0.0 means bit-identical."""
    rows = []
    diff = lambda a, c: float(jnp.max(jnp.abs(a - c)))
    worst = lambda ts, us: max(max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(diff, t, u)))
                               for t, u in zip(ts, us))
    for name in ("lenet300", "lenet5"):
        b = Bench(x, y, steps, batch, name)
        xb, yb = b.x[:batch], b.y[:batch]
        grad = jax.grad(lambda p: train.cross_entropy(b.model.apply({"params": p}, xb), yb))
        params = [b.state(s).params for s in range(k)]
        rows.append((name, "first-step gradient, vmap", worst(replicas.unstack(jax.jit(jax.vmap(grad))(
            replicas.stack(params))), [jax.jit(grad)(p) for p in params])))
        singles = [b.run_single(s) for s in range(k)]
        for layout in layouts:
            rows.append((name, f"weights after {steps} steps, {layout}",
                         worst(replicas.unstack(b.run_multi(k, layout)), singles)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default=os.environ.get("JAXPRUNE_DATA_DIR", "../shared/data"))
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layouts", default="vmap,unrolled")
    ap.add_argument("--agreement", action="store_true", help="compare replicas with single runs (LeNet-300-100 "
                    "and LeNet5) instead of timing; K = the largest of --ks")
    args = ap.parse_args()
    ks = [int(v) for v in args.ks.split(",")]
    layouts = args.layouts.split(",")

    tr, _ = common.load_data("mnist", args.data_dir)
    if args.agreement:
        print(f"\njax {jax.__version__}; replica r of K={max(ks)} vs the single run of seed r; max |Δ| over r and "
              f"leaves (0 = bit-identical)\n")
        print("| model | compared | max abs difference |")
        print("| --- | --- | --- |")
        for name, what, d in agreement(tr.images, tr.labels, max(ks), args.steps, args.batch_size, layouts):
            print(f"| {name} | {what} | {d:.3g} |")
        return
    b = Bench(tr.images, tr.labels, args.steps, args.batch_size)
    b.run_single()
    rows = []
    for k in ks:
        for layout in layouts:
            b.run_multi(k, layout)  # compile
        single, multi = [], {lay: [] for lay in layouts}
        for _ in range(args.repeats):
            single.append(_timed(b.run_single))
            for lay in layouts:
                multi[lay].append(_timed(lambda: b.run_multi(k, lay)))
        s = statistics.median(single)
        rows.append((k, s, {lay: statistics.median(v) for lay, v in multi.items()}))

    load = os.getloadavg()
    print(f"\nmachine: {platform.machine()} {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}; jax {jax.__version__}; {args.steps} steps of {args.batch_size} per replica, "
          f"median of {args.repeats}\n")
    head = "".join(f" {lay}: s per replica | {lay}: per replica / single |" for lay in layouts)
    print(f"| K | single run (s) |{head}")
    print("| --- | --- |" + " --- | --- |" * len(layouts))
    for k, s, m in rows:
        cells = "".join(f" {m[lay] / k:.2f} | {m[lay] / k / s:.2f} |" for lay in layouts)
        print(f"| {k} | {s:.2f} |{cells}")

    kk = max(ks)
    print(f"\nLayer-1 GEMMs (batch {args.batch_size}, 784→300) for K={kk}: GFLOP/s\n")
    print("| GEMM | batched dot_general | K plain GEMMs |")
    print("| --- | --- | --- |")
    for name, gb, gu in gemm_table(kk, args.batch_size):
        print(f"| {name} | {gb:.1f} | {gu:.1f} |")
    bd = breakdown(b, kk)
    print(f"\nWhere a step's time goes, ms per step (vmap): K=1 vs K={kk} (per replica = K={kk} / {kk})\n")
    print("| part | K=1 | K=%d | K=%d per replica / K=1 |" % (kk, kk))
    print("| --- | --- | --- | --- |")
    for part in ("step", "grad", "update"):
        one, many = bd[f"{part} K=1"], bd[f"{part} K={kk}"]
        print(f"| {part} | {one:.3f} | {many:.3f} | {many / kk / one:.2f} |")
    print(f"\nOps in the compiled K={kk} train step\n")
    print("| layout | dot | batched dot | transpose/copy |")
    print("| --- | --- | --- | --- |")
    for lay in layouts:
        ops = b.hlo_ops(kk, lay)
        print(f"| {lay} | {ops['dot']} | {ops['batched dot']} | {ops['transpose/copy']} |")


if __name__ == "__main__":
    main()
