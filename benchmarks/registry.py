"""Registry benchmark, side by side in one run.

1. FetchAdapter of a 64 MiB adapter over loopback vs reading the same file from local disk (page
   cache warm for both), interleaved rounds, medians; goal: fetch >= 0.5x disk throughput. The
   fetching client keeps every byte (copies each chunk into one buffer, as a real client must);
   then, as extra information, both again with the files dropped from the page cache first.
2. 10,000 RegisterAdapter(file://...) calls of a small adapter under distinct ids (8 concurrent
   clients): wall time and the registry process's RSS before/after.

    .venv/bin/python benchmarks/registry.py [--rounds 7] [--count 10000]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import signal
import socket
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
from services.synthetic import AdapterSpec, ModelSpec, write_adapter  # noqa: E402

MiB = 1024 * 1024
# As the executor's registry client: read the socket in large pieces (gRPC starts at 8 KiB).
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 16 * MiB),
                   ("grpc.experimental.tcp_min_read_chunk_size", 1 * MiB),
                   ("grpc.experimental.tcp_max_read_chunk_size", 8 * MiB)]


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def fetch(stub, adapter_id: str, buf: bytearray) -> int:
    """Receive the whole adapter into `buf` (files back to back), like a client that keeps it."""
    n = 0
    for msg in stub.FetchAdapter(pb.FetchAdapterRequest(adapter_id=adapter_id), timeout=120):
        data = msg.chunk.data
        buf[n:n + len(data)] = data
        n += len(data)
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--count", type=int, default=10_000)
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="openlora-bench-"))
    big = write_adapter(work / "big", ModelSpec(hidden=4096, heads=32, kv_heads=32, layers=16),
                        AdapterSpec(rank=64, targets=("q_proj", "v_proj")))
    small = write_adapter(work / "small", ModelSpec(), AdapterSpec(rank=8))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "registry", "--port", str(port),
                             "--data-dir", str(work / "data"), "--log-level", "warning"], cwd=ROOT)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    stub = registry_pb2_grpc.AdapterRegistryStub(channel)
    grpc.channel_ready_future(channel).result(30)
    try:
        a = stub.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="big", source=f"file://{big}"),
                                 timeout=120)
        size = a.size_bytes
        weights = big / "adapter_model.safetensors"
        buf = bytearray(size)
        fetch(stub, "big", buf), read_disk(weights)            # warm up both
        disk_s, grpc_s = [], []
        for _ in range(args.rounds):
            t = time.perf_counter(); read_disk(weights); read_disk(big / "adapter_config.json")
            disk_s.append(time.perf_counter() - t)
            t = time.perf_counter(); assert fetch(stub, "big", buf) == size
            grpc_s.append(time.perf_counter() - t)
        disk, net = statistics.median(disk_s), statistics.median(grpc_s)
        print(f"adapter: {size / MiB:.1f} MiB, {args.rounds} interleaved rounds, medians")
        print(f"  local disk read   {disk * 1e3:8.1f} ms  {size / MiB / disk:8.0f} MiB/s")
        print(f"  FetchAdapter      {net * 1e3:8.1f} ms  {size / MiB / net:8.0f} MiB/s")
        print(f"  ratio fetch/disk  {disk / net:.2f}x  (goal >= 0.5x)")
        blobs = [p for p in (work / "data" / "blobs").rglob("*") if p.is_file()]
        cold_disk, cold_net = [], []
        for _ in range(3):
            drop_cache(weights, big / "adapter_config.json")
            t = time.perf_counter(); read_disk(weights); read_disk(big / "adapter_config.json")
            cold_disk.append(time.perf_counter() - t)
            drop_cache(*blobs)
            t = time.perf_counter(); assert fetch(stub, "big", buf) == size
            cold_net.append(time.perf_counter() - t)
        disk, net = statistics.median(cold_disk), statistics.median(cold_net)
        print("  cold(ish), page cache dropped first (POSIX_FADV_DONTNEED), 3 rounds, medians:")
        print(f"    local disk read {disk * 1e3:8.1f} ms  {size / MiB / disk:8.0f} MiB/s")
        print(f"    FetchAdapter    {net * 1e3:8.1f} ms  {size / MiB / net:8.0f} MiB/s")

        rss0 = rss_mib(proc.pid)
        source = f"file://{small}"

        def register(i: int) -> int:
            return stub.RegisterAdapter(pb.RegisterAdapterRequest(
                adapter_id=f"bench/{i:05d}", source=source, labels={"i": str(i % 10)}),
                timeout=60).version

        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert all(v == 1 for v in pool.map(register, range(args.count)))
        took = time.perf_counter() - t
        rss1 = rss_mib(proc.pid)
        t = time.perf_counter()
        token, listed = "", 0
        while True:
            resp = stub.ListAdapters(pb.ListAdaptersRequest(page_size=1000, page_token=token))
            listed += len(resp.adapters)
            token = resp.next_page_token
            if not token:
                break
        list_s = time.perf_counter() - t
        print(f"{args.count} registrations via RegisterAdapter(file://, small adapter, distinct ids, "
              "8 concurrent clients)")
        print(f"  total {took:.1f} s  ({args.count / took:.0f}/s, {took / args.count * 1e3:.2f} ms each)")
        print(f"  registry RSS  before {rss0:.0f} MiB  after {rss1:.0f} MiB")
        print(f"  listing all {listed} through pages of 1000: {list_s:.2f} s")
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
