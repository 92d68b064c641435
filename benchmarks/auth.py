"""What auth and TLS cost: p50 latency of a 1-token request through the router, on vs off, one run.

Two deployments side by side (registry + executor + router each, subprocesses on loopback, the same
tiny model and adapter): one open and plaintext, one with --auth-file and mutual TLS on every hop
(client -> router -> executor, executor -> registry), the client sending a tenant's token. Rounds
alternate between them; each round times --requests sequential requests (max_new_tokens=1, the
tenant's own adapter), and the figure is the median over every request. Goal: on <= 1.05 x off + 1 ms.

    .venv/bin/python benchmarks/auth.py [--rounds 8] [--requests 50] [--variants off,auth,tls,on]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.bench import percentile  # noqa: E402
from services.common.auth import hash_token  # noqa: E402
from services.common.gen.openlora.v1 import common_pb2, registry_pb2, registry_pb2_grpc, router_pb2_grpc  # noqa: E402
from services.common.harness import Service  # noqa: E402
from services.common.tls import ClientSecurity, channel  # noqa: E402
from services.synthetic import AdapterSpec, ModelSpec, write_adapter, write_model  # noqa: E402

SPEC = ModelSpec(arch="llama", hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=4096)
TOKENS = {"tenant": "bench-tenant-token", "service": "bench-service-token"}


def _pki(root: pathlib.Path) -> dict[str, pathlib.Path]:
    import trustme
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    root.mkdir(parents=True, exist_ok=True)
    paths = {"ca": root / "ca.pem", "cert": root / "cert.pem", "key": root / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    return paths


def deploy(root: pathlib.Path, model: pathlib.Path, adapter: pathlib.Path, name: str):
    """name: off (open, plaintext), auth (tokens only), tls (mutual TLS only), on (both)."""
    args, client = [], ClientSecurity()
    if name in ("auth", "on"):
        auth_file = root / f"tokens-{name}.json"
        auth_file.write_text(json.dumps({"tokens": [
            {"token_sha256": hash_token(TOKENS["tenant"]), "tenant": "acme", "role": "tenant"},
            {"token_sha256": hash_token(TOKENS["service"]), "tenant": "cluster", "role": "service"}]}))
        args += ["--auth-file", str(auth_file), "--token", TOKENS["service"]]
        client = ClientSecurity(token=TOKENS["tenant"])
    if name in ("tls", "on"):
        pki = _pki(root / name)
        args += ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]), "--tls-ca", str(pki["ca"])]
        client = ClientSecurity(token=client.token, ca=pki["ca"].read_bytes(),
                                cert=pki["cert"].read_bytes(), key=pki["key"].read_bytes())
    probe = ClientSecurity(ca=client.ca, cert=client.cert, key=client.key)
    registry = Service("registry", "--data-dir", str(root / f"reg-{name}"),
                       "--allow-local-dir", str(adapter.parent), *args,
                       log_path=root / f"registry-{name}.log", security=probe).start()
    executor = Service("executor", "--registry", registry.address, "--base-model", str(model),
                       "--disk-cache-dir", str(root / f"disk-{name}"), *args,
                       log_path=root / f"executor-{name}.log", security=probe).start()
    router = Service("router", "--registry", registry.address, "--executor", executor.address,
                     *args, log_path=root / f"router-{name}.log", security=probe).start()
    with channel(registry.address, client) as ch:
        registry_pb2_grpc.AdapterRegistryStub(ch).RegisterAdapter(registry_pb2.RegisterAdapterRequest(
            adapter_id="acme/bench", source=f"file://{adapter}"), timeout=60)
    # the token as per-call metadata rather than a channel interceptor (what a latency-minded client does)
    ch = channel(router.address, probe)
    return [registry, executor, router], ch, router_pb2_grpc.RouterStub(ch), client.metadata()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--variants", default="off,on", help="of off,auth,tls,on: which deployments to compare")
    args = p.parse_args()
    names = args.variants.split(",")
    root = pathlib.Path(tempfile.mkdtemp(prefix="openlora-bench-auth-"))
    model = write_model(root / "model", SPEC)
    adapter = write_adapter(root / "adapters" / "bench", SPEC,
                            AdapterSpec(rank=8, alpha=16, targets=("q_proj", "v_proj"), seed=3))
    deployments = {}
    try:
        for name in names:
            deployments[name] = deploy(root, model, adapter, name)
        req = common_pb2.GenerateRequest(adapter_id="acme/bench", prompt_token_ids=[5, 17, 42, 99],
                                          sampling=common_pb2.SamplingParams(max_new_tokens=1,
                                                                             ignore_eos=True))
        for _, _, stub, md in deployments.values():        # warm up: adapter load, channels, caches
            for _ in range(20):
                assert len(stub.Generate(req, timeout=60, metadata=md).token_ids) == 1
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                _, _, stub, md = deployments[name]
                for _ in range(args.requests):
                    t0 = time.perf_counter()
                    stub.Generate(req, timeout=60, metadata=md)
                    times[name].append(time.perf_counter() - t0)
        print(f"1-token request through the router, {args.rounds} rounds x {args.requests} requests each")
        print(f"{'':24}{'p50 ms':>10}{'p90 ms':>10}")
        labels = {"off": "open, plaintext", "auth": "auth, plaintext", "tls": "open, mutual TLS",
                  "on": "auth + mutual TLS"}
        for k in names:
            label = labels[k]
            xs = times[k]
            print(f"{label:24}{statistics.median(xs) * 1e3:10.2f}{percentile(xs, 0.9) * 1e3:10.2f}")
        if "off" not in times or "on" not in times:
            return
        off, on = (statistics.median(times[k]) * 1e3 for k in ("off", "on"))
        budget = 1.05 * off + 1.0
        print(f"on / off = {on / off:.3f}x, on - off = {on - off:+.2f} ms; goal on <= 1.05 x off + 1 ms "
              f"= {budget:.2f} ms: {'met' if on <= budget else 'NOT met'}")
    finally:
        for services, ch, _, _ in deployments.values():
            ch.close()
            for s in reversed(services):
                s.stop()


if __name__ == "__main__":
    main()
