"""Memory mappings held by one test process: the count of ``/proc/self/maps`` lines after running test files in
this process, with JAX's compiled programs kept (as a plain pytest process keeps them) and with
``tests/conftest.py``'s clearing active (``jax.clear_caches()`` after a test module once the process holds more
than 20,000 mappings; the numbers in BUILD-notes were taken when it cleared after every module). The kernel refuses new mappings beyond
``vm.max_map_count`` (65530 here), and XLA:CPU then crashes while compiling or loading a program.

    PYTHONPATH=. JAXPRUNE_DATA_DIR=... python benchmarks/probe_maps.py [--keep] tests/test_similarity_pairwise.py …

``--keep`` disables the clearing (sets ``JAXPRUNE_TEST_KEEP_PROGRAMS=1``: the state before the fixture). Linux only.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


class _Count:
    """The mapping count after each test file (after its module fixtures are torn down)."""

    def __init__(self):
        self.rows: list[tuple[str, int]] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item, nextitem):
        yield
        if nextitem is None or nextitem.path != item.path:
            self.rows.append((item.path.name, _maps()))


def main(argv: list[str]) -> int:
    keep = "--keep" in argv
    if keep:
        os.environ["JAXPRUNE_TEST_KEEP_PROGRAMS"] = "1"
    files = [a for a in argv if a != "--keep"]
    with open("/proc/sys/vm/max_map_count") as f:
        print(f"vm.max_map_count = {f.read().strip()}; clearing per module: {not keep}")
    count = _Count()
    rc = pytest.main(["-p", "no:xdist", "-q", "-m", "not slow", "--rootdir", str(REPO), *files], plugins=[count])
    for name, n in count.rows:
        print(f"maps {n:6d} after {name}")
    print(f"maps at the end: {_maps()} (clearing per module: {not keep})")
    return int(rc)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
