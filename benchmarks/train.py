"""One IMP level of LeNet-300-100 on MNIST: jaxprune against an eager PyTorch CPU loop, and the train step's
GFLOP/s against this machine's measured matmul GFLOP/s.

    python -m benchmarks.train                        # 2 epochs per level, 3 repeats (ratios are per epoch)
    python -m benchmarks.train --epochs=16 --repeats=1  # a full level of experiments/configs/lenet300_mnist.cfg

A level = train the masked network (SGD 0.1, batch 128, constant rate, as lenet300_mnist.cfg) + evaluate on the
test set + prune 20 % of the remaining weights by global magnitude. jaxprune runs it with the library's own
pieces (``masks.masked`` optimizer, ``train.run`` with ``lax.scan`` epochs, ``train.evaluate``,
``masks.magnitude_prune``), compiled beforehand (compile time is reported on its own line). PyTorch runs the
equivalent eager loop (OpenLTH style: per-epoch ``randperm``, forward, backward, SGD step, mask multiply).
Both sides are timed alternately in one process so machine load hits both; the table gives the median.
PyTorch runs with 1 and with 2 intra-op threads (on a loaded 2-core box its OpenMP threads spin and 2 threads can
be several times slower than 1); each repeat's ratio is taken against the faster of the two.
PyTorch is a benchmark-only dependency (``pip install torch``); without it the comparison is skipped.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from jaxprune import masks, models, train

LAYERS = ((784, 300), (300, 100), (100, 10))


def step_flops(batch: int) -> float:
    """Matmul FLOPs of one train step: forward, weight gradients, input gradients (none for the first layer)."""
    fwd = sum(2 * batch * i * o for i, o in LAYERS)
    igrad = sum(2 * batch * i * o for i, o in LAYERS[1:])
    return 2 * fwd + igrad


def matmul_gflops(n: int = 1024, reps: int = 10) -> tuple[float, float]:
    """Measured f32 GEMM throughput of this machine: (n×n)·(n×n) and the step's own (128×784)·(784×300)."""
    out = []
    for (m, k, o) in ((n, n, n), (128, 784, 300)):
        a = jnp.ones((m, k), jnp.float32)
        b = jnp.ones((k, o), jnp.float32)
        f = jax.jit(lambda a, b: a @ b)
        f(a, b).block_until_ready()
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(reps):
                r = f(a, b)
            r.block_until_ready()
            best = min(best, (time.perf_counter() - t) / reps)
        out.append(2 * m * k * o / best / 1e9)
    return out[0], out[1]


class JaxLevel:
    def __init__(self, x, y, xt, yt, batch: int):
        self.model = models.build("lenet300", 10)
        self.tx = masks.masked(train.make_optimizer(train.OptimConfig("sgd", 0.1), 0.1))
        self.trainer = train.make_trainer(self.model, self.tx)
        self.x, self.y, self.xt, self.yt = train.to_device(x, y, xt, yt)
        self.batch = batch
        v = models.init(self.model, jax.random.PRNGKey(0), self.x.shape)
        self.prunable = masks.prunable_leaves(v["params"], exclude=("^dense_2/",))
        self.state = train.create_state(v, self.tx)
        self.mask = masks.ones_like(v["params"])

    def level(self, steps: int) -> float:
        st = self.state._replace(params=masks.apply_mask(self.state.params, self.mask),
                                 opt_state=masks.with_mask(self.tx, self.state.opt_state, self.mask))
        res = train.run(self.trainer, st, self.x, self.y, batch_size=self.batch, num_steps=steps,
                        data_key=jax.random.PRNGKey(1))
        ev = train.evaluate(self.trainer, train.variables_of(res.state), self.xt, self.yt)
        self.mask = masks.magnitude_prune(res.state.params, self.mask, self.prunable, 0.2)
        jax.block_until_ready(self.mask)
        return ev["accuracy"]

    def step_seconds(self, steps: int) -> float:
        """Seconds per step of the jitted epoch scan alone (data already on the device)."""
        order = train.epoch_order(jax.random.PRNGKey(1), 0, self.x.shape[0], self.batch)[:steps]
        self.trainer.scan(self.state, self.x, self.y, order, jax.random.PRNGKey(1))[0].step.block_until_ready()
        t = time.perf_counter()
        s, _ = self.trainer.scan(self.state, self.x, self.y, order, jax.random.PRNGKey(1))
        s.step.block_until_ready()
        return (time.perf_counter() - t) / steps


class TorchLevel:
    def __init__(self, torch, x, y, xt, yt, batch: int):
        self.t = torch
        nn = torch.nn
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                                 nn.Linear(100, 10))
        self.x, self.y = torch.from_numpy(x.reshape(len(x), -1)), torch.from_numpy(y.astype(np.int64))
        self.xt, self.yt = torch.from_numpy(xt.reshape(len(xt), -1)), torch.from_numpy(yt.astype(np.int64))
        self.batch = batch
        self.masks = {n: torch.ones_like(p) for n, p in self.net.named_parameters() if n.endswith("weight")
                      and not n.startswith("5.")}
        self.init = {k: v.clone() for k, v in self.net.state_dict().items()}  # rewind point, as the jax side

    def level(self, steps: int) -> float:
        t, net = self.t, self.net
        net.load_state_dict(self.init)  # rewind to init every level, like JaxLevel
        opt = t.optim.SGD(net.parameters(), lr=0.1)
        params = dict(net.named_parameters())
        with t.no_grad():
            for name, m in self.masks.items():
                params[name].mul_(m)
        n = len(self.y)
        spe = n // self.batch
        done = 0
        g = t.Generator().manual_seed(1)
        while done < steps:
            perm = t.randperm(n, generator=g)
            for i in range(min(spe, steps - done)):
                idx = perm[i * self.batch:(i + 1) * self.batch]
                loss = t.nn.functional.cross_entropy(net(self.x[idx]), self.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with t.no_grad():
                    for name, m in self.masks.items():
                        params[name].mul_(m)
            done += min(spe, steps - done)
        with t.no_grad():
            acc = float((net(self.xt).argmax(-1) == self.yt).float().mean())
            scores = t.cat([params[k].abs().flatten() for k in self.masks])
            alive = t.cat([m.flatten() for m in self.masks.values()]).bool()
            k = int(np.ceil(0.2 * int(alive.sum())))
            thresh = t.kthvalue(scores[alive], k).values
            for name in self.masks:
                self.masks[name] = (params[name].abs() > thresh).float() * self.masks[name]
        return acc


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default=os.environ.get("JAXPRUNE_DATA_DIR", "../shared/data"))
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--torch_threads", default="1,2", help="PyTorch intra-op thread counts to try")
    args = ap.parse_args()

    tr, te = common.load_data("mnist", args.data_dir)
    spe = len(tr.labels) // args.batch_size
    steps = int(round(args.epochs * spe))
    jl = JaxLevel(tr.images, tr.labels, te.images, te.labels, args.batch_size)
    t0 = time.perf_counter()
    jl.level(spe)  # compiles the epoch scan, evaluation and the pruning path
    compile_s = time.perf_counter() - t0
    threads = [int(v) for v in args.torch_threads.split(",")]
    try:
        import torch
        tl = TorchLevel(torch, tr.images, tr.labels, te.images, te.labels, args.batch_size)
        tl.level(10)  # warm-up
    except ImportError:
        torch = tl = None
        print("torch is not installed: PyTorch comparison skipped (pip install torch)")

    jax_s, torch_s, ratios, accs = [], {n: [] for n in threads}, [], {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        accs["jaxprune"] = jl.level(steps)
        jax_s.append(time.perf_counter() - t)
        if tl is not None:
            for n in threads:
                torch.set_num_threads(n)
                t = time.perf_counter()
                accs["pytorch"] = tl.level(steps)
                torch_s[n].append(time.perf_counter() - t)
            ratios.append(jax_s[-1] / min(torch_s[n][-1] for n in threads))

    step_s = [jl.step_seconds(min(spe, 200)) for _ in range(args.repeats)]
    mm_big, mm_step = matmul_gflops()
    gflops = step_flops(args.batch_size) / statistics.median(step_s) / 1e9

    load = os.getloadavg()
    print(f"\nmachine: {platform.machine()} {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}; jax {jax.__version__}" + (f", torch {torch.__version__}" if torch else ""))
    print(f"one IMP level = {args.epochs:g} epochs ({steps} steps of {args.batch_size}) + test eval + 20 % pruning; "
          f"median of {args.repeats}; jax compile (first level) {compile_s:.1f} s\n")
    print("| measurement | value |")
    print("| --- | --- |")
    print(f"| jaxprune level (s) | {statistics.median(jax_s):.2f} (all: {', '.join(f'{v:.2f}' for v in jax_s)}) |")
    if tl is not None:
        for n in threads:
            print(f"| PyTorch eager level, {n} thread(s) (s) | {statistics.median(torch_s[n]):.2f} "
                  f"(all: {', '.join(f'{v:.2f}' for v in torch_s[n])}) |")
        print(f"| jaxprune / PyTorch (target <= 0.5) | {statistics.median(ratios):.2f} "
              f"(all: {', '.join(f'{v:.2f}' for v in ratios)}) |")
        print(f"| test accuracy jaxprune / PyTorch | {accs['jaxprune']:.4f} / {accs['pytorch']:.4f} |")
    print(f"| train step (ms, scan) | {1e3 * statistics.median(step_s):.2f} |")
    print(f"| train step GFLOP/s | {gflops:.1f} |")
    print(f"| matmul GFLOP/s, 1024^3 f32 | {mm_big:.1f} |")
    print(f"| matmul GFLOP/s, 128x784 @ 784x300 | {mm_step:.1f} |")
    print(f"| step / best matmul (target >= 0.5) | {gflops / max(mm_big, mm_step):.2f} |")


if __name__ == "__main__":
    main()
