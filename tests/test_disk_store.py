"""The executor's disk tier: atomic puts, LRU eviction by bytes, listing, removal."""

from __future__ import annotations

import os
import time

import pytest

from services.common.errors import ResourceExhausted
from services.executor.registry_source import DiskAdapterStore


def _put(store, adapter_id, version, size):
    tmp = store.tempdir()
    (tmp / "adapter_model.safetensors").write_bytes(b"x" * size)
    (tmp / "adapter_config.json").write_text("{}")
    return store.put(adapter_id, version, "sha256:0", tmp)


def test_lru_eviction_by_bytes(tmp_path):
    store = DiskAdapterStore(tmp_path, capacity_bytes=3000)
    _put(store, "org/a", 1, 1000)
    time.sleep(0.01)
    _put(store, "org/b", 1, 1000)
    time.sleep(0.01)
    assert store.path("org/a", 1) is not None          # a used: b is now the oldest
    time.sleep(0.01)
    _put(store, "org/c", 1, 1000)                      # over 3000 with metadata: evict b
    assert store.path("org/b", 1) is None
    assert {("org/a", 1), ("org/c", 1)} <= set(store.held())
    assert not any(p.name.startswith(".fetch-") for p in tmp_path.iterdir())


def test_an_adapter_larger_than_the_cache_is_refused(tmp_path):
    store = DiskAdapterStore(tmp_path, capacity_bytes=500)
    with pytest.raises(ResourceExhausted, match="--disk-cache-bytes"):
        _put(store, "big", 1, 1000)
    assert store.held() == []


def test_unbounded_store_keeps_everything_and_remove_drops_every_version(tmp_path):
    store = DiskAdapterStore(tmp_path)
    for v in (1, 2, 3):
        _put(store, "team/x", v, 10)
    assert store.versions("team/x") == [1, 2, 3]
    store.remove("team/x")
    assert store.held() == []


def test_stale_fetches_are_cleaned_at_start(tmp_path):
    (tmp_path / ".fetch-dead").mkdir()
    (tmp_path / ".fetch-dead" / "adapter_model.safetensors").write_bytes(b"partial")
    DiskAdapterStore(tmp_path)
    assert not (tmp_path / ".fetch-dead").exists()
    assert os.listdir(tmp_path) == []


def test_a_removed_version_leaves_no_ghost_but_an_evicted_one_does(tmp_path):
    """The policy remembers an evicted copy's frequency (it may come back); a deleted version is
    forgotten, so register/delete churn keeps nothing per deleted version (benchmarks/churn.py)."""
    store = DiskAdapterStore(tmp_path, capacity_bytes=3000, policy="gdsf")   # the executor's
    for v in range(1, 50):
        _put(store, "churn/a", v, 100)
        store.remove("churn/a", v)
    assert store.held() == [] and not store._policy._ghost and not store._policy._freq
    _put(store, "org/a", 1, 1000)
    time.sleep(0.01)
    _put(store, "org/b", 1, 1000)
    time.sleep(0.01)
    _put(store, "org/c", 1, 1000)                      # evicts org/a: remembered
    assert ("org/a", 1) in store._policy._ghost
