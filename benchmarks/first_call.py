"""First-call (compile) time of an all-pairs similarity in a fresh process, with or without JAX's persistent
compilation cache — what a notebook session pays before its first result.

    python -m benchmarks.first_call                          # no cache
    python -m benchmarks.first_call --cache=/tmp/jcache      # run twice: the second process reads the cache
"""
from __future__ import annotations

import argparse
import time

import jax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metric", default="mean_cca")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--widths", default="1000,800,500,300,200,100,50")
    ap.add_argument("--cache", default="", help="persistent compilation cache directory (empty: none)")
    args = ap.parse_args()
    if args.cache:  # before any compilation; a user setting, as the library sets no global state
        jax.config.update("jax_compilation_cache_dir", args.cache)
    from benchmarks.similarity import synthetic
    from jaxprune import similarity as S

    widths = [int(w) for w in args.widths.split(",")]
    xs, ys = synthetic(args.n, widths, 0), synthetic(args.n, widths, 1)
    times = []
    for _ in range(2):
        t = time.perf_counter()
        jax.block_until_ready(S.pairwise(args.metric, xs, ys))
        times.append(time.perf_counter() - t)
    print(f"{args.metric} n={args.n} widths={widths} cache={args.cache or 'none'}: first call {times[0]:.1f} s, "
          f"second {times[1]:.1f} s")


if __name__ == "__main__":
    main()
