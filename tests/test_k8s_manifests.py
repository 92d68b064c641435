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
