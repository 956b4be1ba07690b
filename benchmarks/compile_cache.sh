#!/usr/bin/env bash
# CPU seconds of one test subset with the test session's persistent JAX compilation cache off, cold (empty cache,
# the CI case: a fresh clone) and warm (a rerun). Run from the repository root:
#   JAXPRUNE_DATA_DIR=../shared/data bash benchmarks/compile_cache.sh [python] [test files...]
set -euo pipefail
py=${1:-python}
shift || true
tests=${*:-tests/test_imp.py tests/test_cli.py tests/test_lm.py}
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
run() { /usr/bin/time -f "$1: %e s wall, %U s user, %S s sys" "$py" -m pytest -p no:xdist -q $tests 2>&1 | tail -2; }
JAXPRUNE_TEST_COMPILATION_CACHE=0 run off
JAX_COMPILATION_CACHE_DIR=$cache run cold
JAX_COMPILATION_CACHE_DIR=$cache run warm
echo "cache: $(du -sh "$cache" | cut -f1) in $(ls "$cache" | wc -l) entries"
