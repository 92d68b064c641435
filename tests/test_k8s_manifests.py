"""deploy/k8s: every resource valid against the Kubernetes schemas (kubernetes-validate's bundled
schemas, strict: unknown fields fail, no network), and wired consistently: env vars are real flags,
probes hit named ports, grace periods outlast the drain, the router resolves the executors' headless
Service."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

from services.common.config import env_name  # noqa: E402
from services.executor.config import ExecutorConfig  # noqa: E402
from services.registry.config import RegistryConfig  # noqa: E402
from services.router.config import RouterConfig  # noqa: E402

K8S = pathlib.Path(__file__).resolve().parents[1] / "deploy" / "k8s"
CONFIGS = {"registry": RegistryConfig, "executor": ExecutorConfig, "router": RouterConfig}


def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _resources() -> list[dict]:
    docs = []
    for name in _kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def _by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _resources() if d["kind"] == kind}


def test_kustomization_lists_every_manifest():
    listed = set(_kustomization()["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("doc", _resources(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_valid_against_the_kubernetes_schema(doc):
    version = kubernetes_validate.utils.latest_version()
    kubernetes_validate.validate(doc, version, strict=True)   # raises ValidationError with the path


def _workloads():
    return {**_by_kind("StatefulSet"), **_by_kind("Deployment")}


@pytest.mark.parametrize("name", ["openlora-registry", "openlora-executor", "openlora-router"])
def test_workload_wiring(name):
    w = _workloads()[name]
    kind = name.removeprefix("openlora-")
    pod = w["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    fields = {env_name(f.name) for f in dataclasses.fields(CONFIGS[kind])}
    assert set(env) <= fields, f"not flags of openlora {kind}: {set(env) - fields}"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == int(env["OPENLORA_PORT"]) and ports["metrics"] == int(env["OPENLORA_METRICS_PORT"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == ports["grpc"]            # the gRPC health check
    assert pod["terminationGracePeriodSeconds"] > float(env["OPENLORA_GRACE_SECONDS"])
    labels = w["spec"]["template"]["metadata"]["labels"]
    assert w["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = _by_kind("Service")[name]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    if w["kind"] == "StatefulSet":
        assert w["spec"]["serviceName"] == name
        mounts = {m["name"] for m in c["volumeMounts"]}
        assert {t["metadata"]["name"] for t in w["spec"]["volumeClaimTemplates"]} <= mounts


def test_router_follows_the_executors_headless_service():
    executors = _by_kind("Service")["openlora-executor"]
    assert executors["spec"]["clusterIP"] == "None"                 # one DNS record per pod
    port = next(p["port"] for p in executors["spec"]["ports"] if p["name"] == "grpc")
    (c,) = _workloads()["openlora-router"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["OPENLORA_EXECUTOR"] == f"dns:///openlora-executor:{port}"
    RouterConfig(executor=[env["OPENLORA_EXECUTOR"]])               # a target the router accepts
    (ex,) = _workloads()["openlora-executor"]["spec"]["template"]["spec"]["containers"]
    reg = {e["name"]: e.get("value") for e in ex["env"]}["OPENLORA_REGISTRY"]
    assert reg == env["OPENLORA_REGISTRY"] == "openlora-registry:50051"
    disk = {e["name"]: e.get("value") for e in ex["env"]}["OPENLORA_DISK_CACHE_DIR"]
    assert any(disk.startswith(m["mountPath"]) for m in ex["volumeMounts"] if m["name"] == "cache")


def _apply_json_patch(doc: dict, ops: list[dict]) -> dict:
    """The JSON 6902 `add` ops the overlays use (a path's "-" appends to a list)."""
    import copy
    doc = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] == "add", op
        *parents, last = op["path"].strip("/").split("/")
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node.append(op["value"]) if last == "-" else node.insert(int(last), op["value"])
        else:
            node[last] = op["value"]
    return doc


def test_cpu_executors_request_no_gpu_and_the_cuda_overlay_requests_one_each():
    """deploy/k8s asked a GPU for an image that installs CPU-only torch: the base now runs CPU
    executors (the CPU image), and deploy/k8s/cuda patches in the CUDA image, a GPU and --device cuda."""
    base = _workloads()["openlora-executor"]
    (c,) = base["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in str(c.get("resources"))
    overlay = yaml.safe_load((K8S / "cuda" / "kustomization.yaml").read_text())
    assert overlay["resources"] == [".."]
    images = {i["name"]: i["newName"] for i in overlay["images"]}
    executor_image = next(i for i in _kustomization()["images"] if i["name"] == "openlora-executor")["newName"]
    assert images == {executor_image: "openlora/executor-cuda"}
    (patch,) = overlay["patches"]
    assert patch["target"]["kind"] == "StatefulSet" and patch["target"]["name"] == "openlora-executor"
    ops = yaml.safe_load((K8S / "cuda" / patch["path"]).read_text())
    cuda = _apply_json_patch(base, ops)
    kubernetes_validate.validate(cuda, kubernetes_validate.utils.latest_version(), strict=True)
    (c,) = cuda["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 1}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["OPENLORA_DEVICE"] == "cuda"
    known = {env_name(f.name) for f in dataclasses.fields(ExecutorConfig)}
    assert set(env) - {"OPENLORA_EXECUTOR_ID"} <= known, set(env) - known
    assert env["OPENLORA_BUILD_DIR"].startswith(next(m["mountPath"] for m in c["volumeMounts"]
                                                      if m["name"] == "cache"))


def test_every_image_installs_the_wheel_and_copies_only_what_exists():
    """Each Dockerfile builds the wheel in a first stage and installs it (a non-editable install
    ships the kernel sources); every COPY source exists; the executors' images say their device."""
    root = K8S.parents[1]
    files = sorted((root / "deploy").glob("*.Dockerfile"))
    assert {f.name for f in files} >= {"registry.Dockerfile", "executor.Dockerfile", "executor-cuda.Dockerfile",
                                       "router.Dockerfile", "gateway.Dockerfile"}
    for f in files:
        text = f.read_text()
        assert "pip wheel --no-cache-dir --no-deps -w /dist ." in text and "/dist/*.whl" in text, f.name
        for line in text.splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                for src in line.split()[1:-1]:
                    assert (root / src).exists(), f"{f.name}: {line}"
        if f.name.startswith("executor"):
            device = "cuda" if "cuda" in f.name else "cpu"
            assert f"OPENLORA_DEVICE={device}" in text, f.name
            if device == "cpu":
                assert "download.pytorch.org/whl/cpu" in text, f.name       # PyPI's torch is the CUDA build
