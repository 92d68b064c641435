"""Registry benchmark, side by side in one run.

Two registry processes: SQLite + files under a data dir, and PostgreSQL + S3 (a throwaway initdb
cluster and moto's S3 server as a subprocess, both on loopback; skipped with a note when PostgreSQL
is not installed).

1. Loading a 64 MiB adapter, interleaved rounds, medians, against reading the same file from the
   page cache: an executor's direct blob read (services/executor/blob_direct.py, verified by
   sha256) from the shared blob directory and from S3, and FetchAdapter over loopback (the client
   keeps every byte). Then, as extra information, the disk read and FetchAdapter with the files
   dropped from the page cache first.
2. --count RegisterAdapter(file://...) calls of a small adapter under distinct ids (8 concurrent
   clients) per backend: rate, and the registry process's RSS before/after.

    .venv/bin/python benchmarks/registry.py [--rounds 7] [--count 10000]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.gen.openlora.v1 import registry_pb2 as pb  # noqa: E402
from services.common.gen.openlora.v1 import registry_pb2_grpc  # noqa: E402
from services.common.harness import Service, free_port, rss_mib  # noqa: E402
from services.executor.blob_direct import DirectBlobReader  # noqa: E402
from services.synthetic import AdapterSpec, ModelSpec, write_adapter  # noqa: E402
from tests.backends import S3_ENV, PostgresServer, postgres_bindir  # noqa: E402

MiB = 1024 * 1024
# As the executor's registry client: read the socket in large pieces (gRPC starts at 8 KiB).
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 16 * MiB),
                   ("grpc.experimental.tcp_min_read_chunk_size", 1 * MiB),
                   ("grpc.experimental.tcp_max_read_chunk_size", 8 * MiB)]


def read_disk(path: pathlib.Path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            n += len(chunk)
    return n


def drop_cache(*paths: pathlib.Path) -> None:
    """Ask the kernel to forget the files' cached pages (clean pages go; best effort)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fetch_verified(stub, adapter_id: str, buf: bytearray) -> int:
    """fetch() plus a sha256 per file, as an executor's FetchAdapter path checks what it gets."""
    n, hashes = 0, {}
    for msg in stub.FetchAdapter(pb.FetchAdapterRequest(adapter_id=adapter_id), timeout=120):
        if msg.WhichOneof("item") != "chunk":
            continue
        data = msg.chunk.data
        hashes.setdefault(msg.chunk.file_name, hashlib.sha256()).update(data)
        buf[n:n + len(data)] = data
        n += len(data)
    return n


def fetch(stub, adapter_id: str, buf: bytearray) -> int:
    """Receive the whole adapter into `buf` (files back to back), like a client that keeps it."""
    n = 0
    for msg in stub.FetchAdapter(pb.FetchAdapterRequest(adapter_id=adapter_id), timeout=120):
        data = msg.chunk.data
        buf[n:n + len(data)] = data
        n += len(data)
    return n


class Registry:
    """`openlora registry` in a subprocess (the harness's Service), with a stub."""

    def __init__(self, data_dir: pathlib.Path, *args: str, env: dict | None = None):
        self.service = Service("registry", "--data-dir", str(data_dir), "--log-level", "warning", *args,
                               env=env).start(timeout=60)
        self.port, self.proc = self.service.port, self.service.proc
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=CHANNEL_OPTIONS)
        self.stub = registry_pb2_grpc.AdapterRegistryStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.service.terminate(timeout=30)


def start_s3(work: pathlib.Path) -> tuple[subprocess.Popen, dict]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    import boto3
    client = boto3.client("s3")
    deadline = time.time() + 60
    while True:
        try:
            client.create_bucket(Bucket="bench")
            return proc, env
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def direct(reader: DirectBlobReader, meta, work: pathlib.Path) -> float:
    """Seconds for one verified direct read into a fresh directory (made and removed untimed)."""
    dest = pathlib.Path(tempfile.mkdtemp(dir=work, prefix="direct-"))
    try:
        t = time.perf_counter()
        assert reader.fetch(meta, dest)
        return time.perf_counter() - t
    finally:
        for p in dest.iterdir():
            p.unlink()
        dest.rmdir()


def sha256_only(path: pathlib.Path) -> float:
    """Seconds to sha256 the file from the page cache: the floor of any verified read."""
    t = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return time.perf_counter() - t


def count_registrations(stub, source: str, count: int, tag: str) -> float:
    def register(i: int) -> int:
        return stub.RegisterAdapter(pb.RegisterAdapterRequest(
            adapter_id=f"bench-{tag}/{i:05d}", source=source, labels={"i": str(i % 10)}),
            timeout=120).version

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(v == 1 for v in pool.map(register, range(count)))
    return time.perf_counter() - t


def list_all(stub) -> tuple[int, float]:
    t = time.perf_counter()
    token, listed = "", 0
    while True:
        resp = stub.ListAdapters(pb.ListAdaptersRequest(page_size=1000, page_token=token))
        listed += len(resp.adapters)
        token = resp.next_page_token
        if not token:
            return listed, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--count", type=int, default=10_000)
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="openlora-bench-"))
    big = write_adapter(work / "big", ModelSpec(hidden=4096, heads=32, kv_heads=32, layers=16),
                        AdapterSpec(rank=64, targets=("q_proj", "v_proj")))
    small = write_adapter(work / "small", ModelSpec(), AdapterSpec(rank=8))
    bindir = postgres_bindir()
    pg = s3_proc = remote = None
    local = Registry(work / "data")
    try:
        if bindir is None:
            print("PostgreSQL not installed: the PostgreSQL + S3 registry is skipped")
        else:
            pg = PostgresServer(bindir).start()
            s3_proc, env = start_s3(work)
            remote = Registry(work / "data-remote", "--metadata-url", pg.url(), "--blob-url",
                              "s3://bench/blobs", env=env)
        stub = local.stub
        a = stub.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="big", source=f"file://{big}"),
                                 timeout=300)
        size = a.size_bytes
        weights = big / "adapter_model.safetensors"
        buf = bytearray(size)
        readers = {"direct, shared blob dir": (DirectBlobReader(f"file://{work / 'data' / 'blobs'}"), a)}
        if remote is not None:
            b = remote.stub.RegisterAdapter(pb.RegisterAdapterRequest(
                adapter_id="big", source=f"file://{big}"), timeout=300)
            readers["direct, S3 (moto server)"] = (DirectBlobReader("s3://bench/blobs"), b)
        fetch(stub, "big", buf), read_disk(weights)            # warm up
        for reader, meta in readers.values():
            direct(reader, meta, work)
        times: dict[str, list[float]] = {"page cache read": [], **{k: [] for k in readers},
                                         "FetchAdapter (files store)": [],
                                         "FetchAdapter + sha256": [],
                                         "sha256 of the file alone": []}
        for _ in range(args.rounds):
            t = time.perf_counter()
            read_disk(weights)
            read_disk(big / "adapter_config.json")
            times["page cache read"].append(time.perf_counter() - t)
            for name, (reader, meta) in readers.items():
                times[name].append(direct(reader, meta, work))
            times["sha256 of the file alone"].append(sha256_only(weights))
            t = time.perf_counter()
            assert fetch(stub, "big", buf) == size
            times["FetchAdapter (files store)"].append(time.perf_counter() - t)
            t = time.perf_counter()
            assert fetch_verified(stub, "big", buf) == size
            times["FetchAdapter + sha256"].append(time.perf_counter() - t)
        base = statistics.median(times["page cache read"])
        print(f"adapter: {size / MiB:.1f} MiB, {args.rounds} interleaved rounds, medians "
              "(direct reads verify every file's sha256)")
        for name, ts in times.items():
            m = statistics.median(ts)
            print(f"  {name:28s} {m * 1e3:8.1f} ms  {size / MiB / m:8.0f} MiB/s  {base / m:5.2f}x")
        print("  (goal: direct read >= 0.5x the page cache read)")
        blobs = [p for p in (work / "data" / "blobs").rglob("*") if p.is_file()]
        cold_disk, cold_net = [], []
        for _ in range(3):
            drop_cache(weights, big / "adapter_config.json")
            t = time.perf_counter()
            read_disk(weights)
            read_disk(big / "adapter_config.json")
            cold_disk.append(time.perf_counter() - t)
            drop_cache(*blobs)
            t = time.perf_counter()
            assert fetch(stub, "big", buf) == size
            cold_net.append(time.perf_counter() - t)
        disk, net = statistics.median(cold_disk), statistics.median(cold_net)
        print("  cold(ish), page cache dropped first (POSIX_FADV_DONTNEED), 3 rounds, medians:")
        print(f"    local disk read {disk * 1e3:8.1f} ms  {size / MiB / disk:8.0f} MiB/s")
        print(f"    FetchAdapter    {net * 1e3:8.1f} ms  {size / MiB / net:8.0f} MiB/s")

        source = f"file://{small}"
        print(f"{args.count} registrations per backend via RegisterAdapter(file://, small adapter, "
              "distinct ids, 8 concurrent clients)")
        for name, reg in (("SQLite + files", local), ("PostgreSQL + S3", remote)):
            if reg is None:
                continue
            rss0 = rss_mib(reg.proc.pid)
            took = count_registrations(reg.stub, source, args.count, name.split()[0].lower())
            rss1 = rss_mib(reg.proc.pid)
            listed, list_s = list_all(reg.stub)
            print(f"  {name:16s} {took:6.1f} s  {args.count / took:6.0f}/s  "
                  f"({took / args.count * 1e3:.2f} ms each)  RSS {rss0:.0f} -> {rss1:.0f} MiB  "
                  f"listing all {listed} in pages of 1000: {list_s:.2f} s")
    finally:
        for reg in (local, remote):
            if reg is not None:
                reg.stop()
        if s3_proc is not None:
            s3_proc.terminate()
            s3_proc.wait(30)
        if pg is not None:
            pg.stop()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
