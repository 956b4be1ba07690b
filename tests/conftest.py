"""Shared fixtures. Real data: ``JAXPRUNE_DATA_DIR`` (CI sets it to ../shared/data), else ../shared/data if present."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_platforms", "cpu")
REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after every test module. Each XLA:CPU executable kept alive by a jit cache holds
    memory mappings; one xdist worker running ~450 tests accumulated them towards the kernel's limit
    (``vm.max_map_count`` = 65530): 12,672 maps after ``test_similarity_pairwise.py`` alone, 697 with this fixture
    (BUILD-notes, "CI crash of 2026-12-06"). Programs are rarely shared across modules, so little is recompiled."""
    yield
    if not os.environ.get("JAXPRUNE_TEST_KEEP_PROGRAMS"):  # benchmarks/probe_maps.py --keep: the state without it
        jax.clear_caches()
        gc.collect()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXPRUNE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
