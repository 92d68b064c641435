"""The executor's disk tier against a real registry: digest-verified reads (a corrupt copy is
discarded and fetched again, never served), and concurrent loads under a disk budget of a few
adapters never failing a request (a copy being read is never deleted under its reader)."""

from __future__ import annotations

import concurrent.futures
import pathlib

import grpc
import pytest

from services.common.gen.openlora.v1 import registry_pb2, registry_pb2_grpc
from services.common.peft_format import WEIGHTS_FILE
from services.executor.registry_source import DiskAdapterStore, RegistryAdapterSource
from services.synthetic import AdapterSpec, write_adapter
from tests.conftest import TINY
from tests.servers import Service

N = 8


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk-tier")
    reg = Service("registry", "--data-dir", str(root / "registry"), log_path=root / "registry.log").start()
    sizes = {}
    with grpc.insecure_channel(reg.address) as ch:
        stub = registry_pb2_grpc.AdapterRegistryStub(ch)
        for i in range(N):
            path = write_adapter(root / f"a{i}", TINY["llama"], AdapterSpec(rank=4, seed=700 + i))
            meta = stub.RegisterAdapter(registry_pb2.RegisterAdapterRequest(
                adapter_id=f"t/a{i}", source=f"file://{path}"), timeout=30)
            sizes[f"t/a{i}"] = meta.size_bytes
    yield reg, sizes
    reg.stop()


def read_bytes(path: pathlib.Path) -> bytes:
    return (path / WEIGHTS_FILE).read_bytes()


def test_a_corrupt_disk_copy_is_refetched_never_served(registry, tmp_path):
    reg, _ = registry
    src = RegistryAdapterSource(reg.address, DiskAdapterStore(tmp_path))
    v, good, tier = src.read("t/a0", 0, read_bytes)
    assert (v, tier) == (1, "registry")
    assert src.read("t/a0", 1, read_bytes)[2] == "disk"
    copy = tmp_path / "t%2Fa0" / "1" / WEIGHTS_FILE
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF                                        # one flipped bit in the weights
    copy.write_bytes(bytes(data))
    src.close()
    src = RegistryAdapterSource(reg.address, DiskAdapterStore(tmp_path))   # a restart: not yet verified
    v, got, tier = src.read("t/a0", 1, read_bytes)
    assert tier == "registry" and got == good               # discarded and fetched again
    assert src.store.stats()["misses"] >= 1
    src.close()


def test_concurrent_loads_with_a_tiny_disk_budget_never_fail(registry, tmp_path):
    reg, sizes = registry
    budget = int(max(sizes.values()) * 2.5)                 # room for about two adapters
    src = RegistryAdapterSource(reg.address, DiskAdapterStore(tmp_path, budget))
    ids = [f"t/a{i % N}" for i in range(96)]

    def load(adapter_id):
        return src.read(adapter_id, 0, read_bytes)[1]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(load, ids))
    assert all(len(r) > 0 for r in results)
    st = src.store.stats()
    assert st["evictions"] > 0 and st["bytes_used"] <= budget * 2
    src.close()


def test_the_disk_index_survives_a_restart(registry, tmp_path):
    reg, _ = registry
    src = RegistryAdapterSource(reg.address, DiskAdapterStore(tmp_path))
    for i in range(3):
        src.read(f"t/a{i}", 0, read_bytes)
    src.close()
    store = DiskAdapterStore(tmp_path)
    assert store.held() == [("t/a0", 1), ("t/a1", 1), ("t/a2", 1)]
    assert store.stats()["adapters"] == 3


def test_files_come_straight_from_the_blob_store_when_it_is_reachable(registry, tmp_path):
    """--blob-url: the registry's blob directory read directly (verified), no FetchAdapter stream;
    a store without the blobs falls back to FetchAdapter."""
    from services.executor.blob_direct import DirectBlobReader
    reg, _ = registry
    blobs = pathlib.Path(reg.args[reg.args.index("--data-dir") + 1]) / "blobs"
    assert blobs.is_dir()
    src = RegistryAdapterSource(reg.address, DiskAdapterStore(tmp_path / "d1"),
                                direct=DirectBlobReader(f"file://{blobs}"))
    v, data, tier = src.read("t/a3", 0, read_bytes)
    assert (v, tier, src.direct_reads) == (1, "registry", 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    fallback = RegistryAdapterSource(reg.address, DiskAdapterStore(tmp_path / "d2"),
                                     direct=DirectBlobReader(f"file://{empty}"))
    assert fallback.read("t/a3", 0, read_bytes)[1] == data and fallback.direct_reads == 0
    src.close()
    fallback.close()


def test_a_packed_image_beside_the_disk_copy_skips_the_parse_and_a_corrupt_one_is_rebuilt(
        registry, tmp_path, llama_dir):
    import torch

    from services.executor.adapters.arena import ArenaLayout, HostArena
    from services.executor.adapters.residency import Residency
    from services.executor.model.loader import read_config
    reg, _ = registry
    _, cfg = read_config(llama_dir)
    arena = HostArena(ArenaLayout.for_model(cfg), 8 << 20, torch.float32)
    src = RegistryAdapterSource(reg.address, DiskAdapterStore(tmp_path))
    res = Residency(arena, src, cfg, 16)
    try:
        first = res.preload("t/a1", 0)
        want = [t.clone() for t in arena.read_back(first.entry, 0)]
        images = list(tmp_path.glob("t%2Fa1/1/arena-*.pt"))
        assert len(images) == 1
        assert src.store.stats()["bytes_used"] > sum(
            f.stat().st_size for f in images[0].parent.iterdir() if f != images[0])  # counted
        calls = []
        import services.executor.adapters.residency as residency
        orig = residency.read_adapter
        residency.read_adapter = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
        try:
            res.unload("t/a1")
            again = res.preload("t/a1", 0)                 # from the image: no parse
            assert calls == []
            assert all(torch.equal(a, b) for a, b in zip(arena.read_back(again.entry, 0), want, strict=False))
            res.unload("t/a1")
            data = bytearray(images[0].read_bytes())
            data[len(data) // 2] ^= 0xFF                   # bit rot inside the rows
            images[0].write_bytes(bytes(data))
            third = res.preload("t/a1", 0)                 # discarded and rebuilt from the files
            assert calls == [1]
            assert all(torch.equal(a, b) for a, b in zip(arena.read_back(third.entry, 0), want, strict=False))
        finally:
            residency.read_adapter = orig
    finally:
        res.close()
        src.close()


def test_the_disk_evicts_what_the_host_tier_holds_first(registry, tmp_path):
    """The disk sees no use of an adapter served from the host arena, so by its own order the hottest
    adapters look the coldest. A copy the host tier also holds goes first: the two tiers then hold
    mostly different adapters, and an adapter only the disk holds survives."""
    reg, sizes = registry
    budget = int(max(sizes.values()) * 2.5)                 # room for two adapters
    src = RegistryAdapterSource(reg.address, DiskAdapterStore(tmp_path, budget, "lru"))
    in_host = {("t/a1", 1)}
    src.set_covered(in_host.__contains__)
    for aid in ("t/a0", "t/a1", "t/a2"):                   # a0 is the least recent, a1 in the host
        src.read(aid, 0, read_bytes)
    assert src.holds("t/a0", 1) and not src.holds("t/a1", 1) and src.holds("t/a2", 1)
    in_host.clear()                                        # nothing covered: plain LRU again
    src.read("t/a3", 0, read_bytes)
    assert not src.holds("t/a0", 1) and src.holds("t/a2", 1) and src.holds("t/a3", 1)
    src.close()
