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


def _tiers(tmp_path, llama_dir, reg, write_back: bool = True):
    """A host arena with room for one adapter over a disk tier with room for one full copy (files and
    packed image) and one written-back image, not two full copies, on the registry fixture's adapters
    (all rank 4: one size)."""
    import torch

    from services.executor.adapters.arena import ArenaLayout, HostArena
    from services.executor.adapters.residency import Residency
    from services.executor.model.loader import read_config
    _, cfg = read_config(llama_dir)
    probe_src = RegistryAdapterSource(reg.address, DiskAdapterStore(tmp_path / "probe"))
    probe = Residency(HostArena(ArenaLayout.for_model(cfg), 8 << 20, torch.float32), probe_src, cfg, 16)
    nbytes = probe.preload("t/a7", 0).entry.nbytes
    copy = tmp_path / "probe" / "t%2Fa7" / "1"
    full = sum(f.stat().st_size for f in copy.iterdir())
    image = sum(f.stat().st_size for f in copy.glob("arena-*.pt")) + 512    # + its meta.json
    assert image + 512 < full - 512
    probe.close()
    probe_src.close()
    arena = HostArena(ArenaLayout.for_model(cfg), int(nbytes * 1.5), torch.float32)
    src = RegistryAdapterSource(reg.address, DiskAdapterStore(tmp_path / "disk", full + image))
    return arena, src, Residency(arena, src, cfg, 16, write_back=write_back)


def _wait_for(condition, seconds: float = 20.0) -> bool:
    import time
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_an_adapter_the_host_evicts_is_written_back_and_reloads_from_disk(registry, tmp_path, llama_dir):
    """The disk drops the copies the host holds first, so an adapter the host then evicts was held
    nowhere and came back only by a registry fetch. Now the host writes it back (its packed image
    alone, smaller than a full copy) and the reload is a disk read, of the same weights, after a
    restart too."""
    import torch

    from services.executor.adapters.residency import Residency
    reg, _ = registry
    arena, src, res = _tiers(tmp_path, llama_dir, reg)
    try:
        first = res.preload("t/a0", 0)
        assert first.source_tier == "registry"
        want = [t.clone() for t in arena.read_back(first.entry, 0)]
        res.preload("t/a1", 0)                         # the disk drops a0 (covered); the host evicts it
        assert _wait_for(lambda: src.holds("t/a0", 1)), "a0 was not written back"
        copy = tmp_path / "disk" / "t%2Fa0" / "1"
        assert not (copy / WEIGHTS_FILE).exists() and len(list(copy.glob("arena-*.pt"))) == 1
        assert src.store.write_backs == 1 and src.holds("t/a1", 1)   # both fit: a full copy + an image
        again = res.preload("t/a0", 0)                 # the host evicts a1, which the disk holds
        assert again.source_tier == "disk"
        assert all(torch.equal(a, b) for a, b in zip(arena.read_back(again.entry, 0), want, strict=True))
        assert src.store.write_backs == 1               # a1 was still on disk: nothing to write
    finally:
        res.close()
        src.close()
    src = RegistryAdapterSource(reg.address, DiskAdapterStore(tmp_path / "disk"))   # a restart
    res = Residency(arena.__class__(arena.layout, arena.capacity_bytes, torch.float32), src, res.cfg, 16)
    try:
        assert src.holds("t/a0", 1)
        lease = res.preload("t/a0", 1)
        assert lease.source_tier == "disk"
        assert all(torch.equal(a, b) for a, b in zip(res.arena.read_back(lease.entry, 0), want, strict=True))
    finally:
        res.close()
        src.close()


def test_a_written_back_copy_the_arena_cannot_use_is_fetched_again(registry, tmp_path, llama_dir):
    reg, _ = registry
    arena, src, res = _tiers(tmp_path, llama_dir, reg)
    try:
        res.preload("t/a2", 0)
        res.preload("t/a3", 0)
        assert _wait_for(lambda: src.holds("t/a2", 1))
        (image,) = (tmp_path / "disk" / "t%2Fa2" / "1").glob("arena-*.pt")
        data = bytearray(image.read_bytes())
        data[len(data) // 2] ^= 0xFF                   # bit rot inside the rows
        image.write_bytes(bytes(data))
        lease = res.preload("t/a2", 0)                 # discarded, fetched again, never served
        assert lease.source_tier == "registry"
        assert (tmp_path / "disk" / "t%2Fa2" / "1" / WEIGHTS_FILE).exists()
    finally:
        res.close()
        src.close()


def test_a_restart_with_bfloat16_pages_refetches_an_image_packed_for_float32(registry, tmp_path, llama_dir):
    """--lora-dtype changed across a restart: the disk holds only an fp32 arena's packed image of t/a4
    (written back), which a bfloat16 arena cannot use; it is fetched again and packed for the new
    arena, whose pages are the fp32 ones rounded once."""
    import torch

    from services.executor.adapters.residency import Residency
    reg, _ = registry
    arena, src, res = _tiers(tmp_path, llama_dir, reg)
    try:
        want = [t.clone() for t in arena.read_back(res.preload("t/a4", 0).entry, 0)]
        res.preload("t/a5", 0)                         # the host evicts a4: written back as an fp32 image
        assert _wait_for(lambda: src.holds("t/a4", 1))
        assert not (tmp_path / "disk" / "t%2Fa4" / "1" / WEIGHTS_FILE).exists()
    finally:
        res.close()
        src.close()
    src = RegistryAdapterSource(reg.address, DiskAdapterStore(tmp_path / "disk"))
    bf16 = arena.__class__(arena.layout, arena.capacity_bytes, torch.bfloat16)
    res = Residency(bf16, src, res.cfg, 16)
    try:
        lease = res.preload("t/a4", 1)
        assert lease.source_tier == "registry"
        got = res.arena.read_back(lease.entry, 0)
        assert all(g.dtype == torch.bfloat16 and torch.equal(g, w.bfloat16()) for g, w in zip(got, want, strict=True))
    finally:
        res.close()
        src.close()


def test_no_write_back_when_it_is_off(registry, tmp_path, llama_dir):
    reg, _ = registry
    _, src, res = _tiers(tmp_path, llama_dir, reg, write_back=False)
    try:
        res.preload("t/a4", 0)
        res.preload("t/a5", 0)
        assert not _wait_for(lambda: src.holds("t/a4", 1), seconds=1.0)
        assert src.store.write_backs == 0
    finally:
        res.close()
        src.close()


def test_a_write_back_never_brings_back_a_removed_adapter_or_replaces_a_copy(tmp_path):
    store = DiskAdapterStore(tmp_path)
    image = lambda d: (d / "arena-x.pt").write_bytes(b"rows")    # noqa: E731
    before = store.generation("t/gone")
    store.remove("t/gone")                             # deleted while its image was being copied out
    assert not store.put_image("t/gone", 1, image, before)
    assert not store.holds("t/gone", 1) and not (tmp_path / "t%2Fgone").exists()
    assert store.put_image("t/gone", 1, image, store.generation("t/gone"))   # a later eviction may
    assert store.holds("t/gone", 1) and store.image_only("t/gone", 1)
    assert not store.put_image("t/gone", 1, image, store.generation("t/gone"))   # already held
    assert list(tmp_path.glob(".fetch-*")) == []       # no temp dir left behind
    again = DiskAdapterStore(tmp_path)                 # a restart keeps it, as image-only
    assert again.holds("t/gone", 1) and again.image_only("t/gone", 1)
    assert again.acquire("t/gone", 1) is not None      # nothing to check against a digest


def test_concurrent_loads_evictions_and_write_backs_serve_the_right_weights(registry, tmp_path, llama_dir):
    """8 threads ask for 8 adapters at random through an arena for one and a disk for a full copy and
    an image: loads, evictions, write-backs and discards race, and every load serves its own adapter's
    weights, never another's and never a failure."""
    import random

    import torch
    reg, _ = registry
    want = {}
    arena, src, res = _tiers(tmp_path, llama_dir, reg)
    try:
        for i in range(N):
            want[f"t/a{i}"] = [t.clone() for t in arena.read_back(res.preload(f"t/a{i}", 0).entry, 0)]
        rng = random.Random(5)
        asks = [f"t/a{rng.randrange(N)}" for _ in range(160)]

        def load(adapter_id):
            lease = res.acquire(adapter_id, 0).result(60)
            try:
                got = [t.clone() for t in arena.read_back(lease.entry, 0)]
            finally:
                res.release(lease)
            return adapter_id, got, lease.source_tier

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(load, asks))
        for adapter_id, got, _ in results:
            assert all(torch.equal(a, b) for a, b in zip(got, want[adapter_id], strict=True)), adapter_id
        assert {tier for *_, tier in results} >= {"disk"}    # some reloads came from written-back copies
        assert src.store.write_backs > 0
    finally:
        res.close()
        src.close()
