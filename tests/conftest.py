"""Shared fixtures. Real data: ``JAXPRUNE_DATA_DIR`` (CI sets it to ../shared/data), else ../shared/data if present."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_platforms", "cpu")
REPO = Path(__file__).resolve().parents[1]

# JAX's persistent compilation cache, shared by the xdist workers and by the experiments' subprocesses (they inherit
# the environment): the suite compiles the same small programs in many tests and processes, and a cache hit costs
# about half the CPU time of a compile (BUILD-notes, "Session of 2026-12-06 (fourth)"). Entries are keyed by the
# program, the compile options and the jax/jaxlib version, so a stale entry is never served. A caller's own
# JAX_COMPILATION_CACHE_DIR wins; JAXPRUNE_TEST_COMPILATION_CACHE=0 turns it off.
if os.environ.get("JAXPRUNE_TEST_COMPILATION_CACHE", "1") != "0":
    for _name, _default, _kind in (("jax_compilation_cache_dir", REPO / ".pytest_cache" / "jax-compilation-cache", str),
                                   ("jax_persistent_cache_min_compile_time_secs", 0, float),
                                   ("jax_persistent_cache_min_entry_size_bytes", 0, int)):
        jax.config.update(_name, _kind(os.environ.setdefault(_name.upper(), str(_default))))


def _real_data_dir() -> Path | None:
    env = os.environ.get("JAXPRUNE_DATA_DIR")
    if env:
        if not Path(env, "mnist").is_dir():
            raise RuntimeError(f"JAXPRUNE_DATA_DIR={env} holds no mnist/ folder; expected ../shared/data")
        return Path(env)
    cand = REPO.parent / "shared" / "data"
    return cand if (cand / "mnist").is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real MNIST/Fashion-MNIST directory; tests needing it skip (with the reason) when it is absent."""
    d = _real_data_dir()
    if d is None:
        pytest.skip("real data not found: set JAXPRUNE_DATA_DIR to the shared data folder")
    return d


_MAPPINGS_LIMIT = 20_000  # far below vm.max_map_count (65,530); the most one test file added here: 12,666


def _mappings() -> int | None:
    """This process's memory mappings (lines of ``/proc/self/maps``), or None where there is no such file."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after a test module once this process holds many memory mappings. Each
    XLA:CPU executable kept alive by a jit cache holds mappings; one xdist worker running ~450 tests accumulated
    them towards the kernel's limit (``vm.max_map_count`` = 65530): 12,666 maps after ``test_similarity_pairwise.py``
    alone (BUILD-notes, "Session of 2026-12-06 (second)"). Cleared only above ``_MAPPINGS_LIMIT`` (always where
    ``/proc`` is missing), so programs shared between test files are rarely compiled twice."""
    yield
    if os.environ.get("JAXPRUNE_TEST_KEEP_PROGRAMS"):  # benchmarks/probe_maps.py --keep: the state without it
        return
    n = _mappings()
    if n is None or n > _MAPPINGS_LIMIT:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXPRUNE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
