"""What `openlora bench` does around its run: wait for the target, register synthetic adapters, name
its output files, and say why when every request failed."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import pathlib
import time

import grpc

from services.client import not_ready_hint
from services.common import harness
from services.common.gen.openlora.v1 import (
    executor_pb2,
    executor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from services.common.tls import channel as open_channel


class BenchSetupError(Exception):
    """One line saying what stops the benchmark and what to do; bench prints it and exits 1."""


def wait_ready(args) -> None:
    """Each target SERVING, waiting up to --wait seconds; BenchSetupError saying how to wait."""
    deadline = time.monotonic() + args.wait
    for address in args.executor or [args.router]:
        with harness.HealthProbe(address, args.security) as probe:
            while (why := probe.not_serving(timeout=2)) is not None:
                if time.monotonic() >= deadline:
                    raise BenchSetupError(f"{address} is not ready ({why}). {not_ready_hint(address, 'bench')}")
                time.sleep(0.5)


def served_base_model(args) -> str:
    """The base model the target's executors report serving (their --base-model)."""
    with open_channel((args.executor or [args.router])[0], args.security) as channel:
        try:
            if args.executor:
                return executor_pb2_grpc.ExecutorStub(channel).GetStatus(
                    executor_pb2.GetStatusRequest(), timeout=30).base_model
            executors = router_pb2_grpc.RouterStub(channel).ListExecutors(
                router_pb2.ListExecutorsRequest(), timeout=30).executors
        except grpc.RpcError as exc:
            raise BenchSetupError(f"cannot ask which base model is served: {exc.code().name}: "
                                  f"{exc.details()}") from None
    for e in executors:
        if e.status.base_model:
            return e.status.base_model
    raise BenchSetupError("the router knows no executor reporting its base model yet; retry with --wait 60")


def synthetic_adapter_files(model_dir: str, rank: int, seed: int) -> dict[str, bytes]:
    """A PEFT LoRA adapter (every projection of every layer, non-zero B) shaped for model_dir's
    config.json, as the bytes of its two files; the same seed gives the same bytes."""
    import torch
    from safetensors.torch import save

    from services.registry.base_models import BaseModelShape
    from services.synthetic import AdapterSpec, adapter_config
    try:
        shape = BaseModelShape.from_dir(model_dir)
    except ValueError as exc:
        raise BenchSetupError(f"--synthetic-adapters needs the base model's config.json: {exc}; pass "
                              f"--base-model DIR (a directory holding it)") from None
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.layers):
        for module, (d_out, d_in) in shape.dims.items():
            kind = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{kind}.{module}."
            tensors[prefix + "lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
            tensors[prefix + "lora_B.weight"] = torch.randn(d_out, rank, generator=g) / rank ** 0.5
    config = adapter_config(AdapterSpec(rank=rank, alpha=2.0 * rank, targets=tuple(shape.dims),
                                        seed=seed, base_model=model_dir))
    return {"adapter_config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
            "adapter_model.safetensors": save(tensors, metadata={"format": "pt"})}


def _upload(adapter_id: str, base_model: str, files: dict[str, bytes], chunk: int = 1 << 20):
    yield registry_pb2.UploadAdapterRequest(header=registry_pb2.UploadHeader(
        adapter_id=adapter_id, base_model=base_model, labels={"bench": "synthetic"}))
    for name, data in files.items():
        for off in range(0, max(len(data), 1), chunk):
            yield registry_pb2.UploadAdapterRequest(chunk=registry_pb2.FileChunk(file_name=name,
                                                                                  data=data[off:off + chunk]))


def register_synthetic(args) -> None:
    """Upload --synthetic-adapters N adapters as --adapter-prefix0..N-1 to --registry. Each one's bytes
    depend only on its index, rank and the model's shapes, so a rerun makes no new versions."""
    import sys
    model = args.base_model or served_base_model(args)
    if not pathlib.Path(model, "config.json").is_file():
        raise BenchSetupError(f"the executors serve {model!r}, which is not a model directory here; pass "
                              f"--base-model DIR (a directory with its config.json) to shape the adapters")
    with open_channel(args.registry, args.security) as channel:
        stub = registry_pb2_grpc.AdapterRegistryStub(channel)
        added = 0
        for i in range(args.synthetic_adapters):
            files = synthetic_adapter_files(model, args.synthetic_rank, seed=1000 + i)
            adapter_id = f"{args.adapter_prefix}{i}"
            try:
                try:
                    held = stub.GetAdapter(registry_pb2.GetAdapterRequest(adapter_id=adapter_id), timeout=30)
                    if held.digest == content_digest(files):
                        continue
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                stub.UploadAdapter(_upload(adapter_id, model, files), timeout=120)
                added += 1
            except grpc.RpcError as exc:
                hint = f" {not_ready_hint(args.registry, 'bench')}" \
                    if exc.code() == grpc.StatusCode.UNAVAILABLE else ""
                raise BenchSetupError(f"cannot register synthetic adapter {adapter_id} with the registry "
                                      f"at {args.registry}: {exc.code().name}: {exc.details()}.{hint}") from None
    print(f"synthetic adapters {args.adapter_prefix}0..{args.synthetic_adapters - 1} (rank "
          f"{args.synthetic_rank}, for {model}): {added} registered with {args.registry}, "
          f"{args.synthetic_adapters - added} already there", file=sys.stderr)


def content_digest(files: dict[str, bytes]) -> str:
    """The registry's digest of an adapter's files (CONTRACT: sha256 of the NAME<TAB>SHA256 manifest)."""
    manifest = "".join(f"{name}\t{hashlib.sha256(data).hexdigest()}\n" for name, data in sorted(files.items()))
    return "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()


def plot_path(args) -> str:
    """--plot's file: as given, or a new one under --data-dir/bench/ (the directory made)."""
    if args.plot != "<data-dir>":
        path = pathlib.Path(args.plot)
    else:
        path = pathlib.Path(args.data_dir) / "bench" / time.strftime("latency-%Y%m%d-%H%M%S.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


HINTS = {
    "NOT_FOUND": "register the adapters first (`openlora adapters add ID DIR`; `openlora adapters list` "
                 "shows what is registered), or pass --synthetic-adapters N to register N random ones for "
                 "the served base model, or --adapter ID for registered ones",
    "FAILED_PRECONDITION": "the adapters do not fit the served base model; --synthetic-adapters N makes "
                           "ones that do",
    "DEADLINE_EXCEEDED": "the requests took longer than --timeout; raise it, or lower --concurrency",
    "RESOURCE_EXHAUSTED": "the executors' queues or caches are full; lower --concurrency or --rate",
    "UNAUTHENTICATED": "pass --token (or set OPENLORA_TOKEN)",
    "PERMISSION_DENIED": "the --token's role or tenant may not use these adapters",
}


def why_all_failed(results, args) -> str:
    """One line: every request failed, the commonest code with one of its messages, and what to do."""
    codes = collections.Counter(r.code for r in results)
    code, count = codes.most_common(1)[0]
    detail = next((r.detail for r in results if r.code == code and r.detail), "")
    out = io.StringIO()
    out.write(f"all {len(results)} requests failed ({count} {code}")
    out.write(f": {detail[:300]})" if detail else ")")
    if code == "UNAVAILABLE":
        out.write(". " + not_ready_hint((args.executor or [args.router])[0], "bench"))
    elif code in HINTS:
        out.write(f"; {HINTS[code]}")
    return out.getvalue()
