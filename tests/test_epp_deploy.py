"""The Gateway API manifests (deploy/gateway-api: InferencePools naming the pickers as their endpoint picker,
for Istio and Envoy Gateway), checked offline like tests/test_deploy.py checks the others.

- every variant renders; its built-in resources match the Kubernetes schemas (strict);
- the InferencePools match the v1 API (tests/data/crds/inferencepool-v1.schema.json, from GIE's API types);
- cross-references: the pools' endpoint picker is a Service over the pickers whose ports are the fleet file's
  picker.epp ports, the pools select the Triton pods on their REST and gRPC ports with the right application
  protocol, the HTTPRoute sends gRPC and REST to them from the variant's Gateway, the gateway's pods may reach
  the pickers and the hosts, and Istio reaches the picker over TLS;
- the picker's fleet file is the base's plus picker.epp, nothing else.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy import (
    BASE_PICKER_FLEET,
    K8S_VERSIONS,
    REPO,
    Resource,
    _container_ports,
    _fleet,
    _kubernetes_validate,
    _named,
    _of_kind,
    _pod_labels,
    _rendered,
    _selected_workloads,
)

ISTIO = "deploy/gateway-api/istio"
ENVOY_GATEWAY = "deploy/gateway-api/envoy-gateway"
VARIANTS = (ISTIO, ENVOY_GATEWAY)
EPP_PICKER_FLEET = "deploy/gateway-api/base/picker-fleet.yaml"
POOL_SCHEMA = Path(__file__).parent / "data" / "crds" / "inferencepool-v1.schema.json"
POOL_GROUP = "inference.networking.k8s.io"
# Kinds defined by CRDs, checked here by their own schema or shape rather than Kubernetes' schemas.
CRD_GROUPS = frozenset({POOL_GROUP, "gateway.networking.k8s.io", "networking.istio.io"})
NAMESPACE = "triton-lb"


def _pool_validator() -> Any:
    """A JSON Schema validator of InferencePools (jsonschema comes with kubernetes-validate)."""
    jsonschema = pytest.importorskip("jsonschema", reason="dev dependency kubernetes-validate")
    return jsonschema.Draft202012Validator(json.loads(POOL_SCHEMA.read_text(encoding="utf-8")))


def _pools(resources: tuple[Resource, ...]) -> dict[str, Resource]:
    return {p["metadata"]["name"]: p for p in _of_kind(resources, "InferencePool")}


def _service_port(service: Resource, number: int) -> Resource:
    found = [p for p in service["spec"]["ports"] if p["port"] == number]
    assert len(found) == 1, f"Service {service['metadata']['name']} has no port {number}"
    port: Resource = found[0]
    return port


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_renders_unique_resources(variant: str) -> None:
    resources = _rendered(variant)
    keys = [(r["apiVersion"], r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]) for r in resources]
    assert len(keys) == len(set(keys)), "a resource is defined twice"
    assert {r["metadata"].get("namespace") for r in resources if r["kind"] != "Namespace"} == {NAMESPACE}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_builtin_resources_match_the_kubernetes_schema(variant: str, version: str) -> None:
    kv = _kubernetes_validate()
    checked = 0
    for resource in _rendered(variant):
        if resource["apiVersion"].split("/")[0] in CRD_GROUPS:
            continue
        try:
            kv.validate(resource, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{resource['kind']} {resource['metadata']['name']} at {where}: {exc.message}")
        checked += 1
    assert checked


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_pools_match_the_v1_api(variant: str) -> None:
    validator = _pool_validator()
    pools = _pools(_rendered(variant))
    assert set(pools) == {"triton-rest", "triton-grpc"}
    for pool in pools.values():
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(pool)]
        assert not errors, f"InferencePool {pool['metadata']['name']}: {errors}"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.update(targetPortNumber=8000),  # the pre-v1 field
        lambda s: s["endpointPickerRef"].update(failureMode="Open"),
        lambda s: s["endpointPickerRef"].pop("port"),  # a Service needs its port
        lambda s: s.update(targetPorts=[{"number": 8000}, {"number": 8000}]),
        lambda s: s.update(appProtocol="grpc"),
        lambda s: s["selector"].update(app="triton"),  # the v1alpha2 map instead of matchLabels
    ],
)
def test_the_pool_schema_catches_mistakes(mutate: Any) -> None:
    pool = copy.deepcopy(_pools(_rendered(ISTIO))["triton-rest"])
    mutate(pool["spec"])
    assert list(_pool_validator().iter_errors(pool))


@pytest.mark.parametrize("variant", VARIANTS)
def test_pools_name_the_pickers_epp_and_select_the_triton_ports(variant: str) -> None:
    resources = _rendered(variant)
    epp = _fleet(EPP_PICKER_FLEET).picker.epp
    assert epp is not None
    picker = _named(resources, "Deployment", "extproc-picker")
    picker_ports = _container_ports(picker)
    assert picker_ports["epp"] == int(epp.listen.rpartition(":")[2])
    assert picker_ports["epp-health"] == epp.health_port
    protocols = {"triton-rest": ("http", "http"), "triton-grpc": ("grpc", "kubernetes.io/h2c")}
    for name, pool in _pools(resources).items():
        spec = pool["spec"]
        ref = spec["endpointPickerRef"]
        assert ref["failureMode"] == "FailOpen", "the picker's own gateway fails open too"
        service = _named(resources, "Service", ref["name"])
        assert _selected_workloads(resources, NAMESPACE, service["spec"]["selector"]) == [picker]
        port = _service_port(service, ref["port"]["number"])
        assert picker_ports[port["targetPort"]] == picker_ports["epp"]
        # Every Triton workload is in every pool: the picker picks the tier.
        selected = _selected_workloads(resources, NAMESPACE, spec["selector"]["matchLabels"])
        assert {w["metadata"]["name"] for w in selected} == {"triton-gpu", "triton-cpu"}
        triton_port, protocol = protocols[name]
        for workload in selected:
            assert [p["number"] for p in spec["targetPorts"]] == [_container_ports(workload)[triton_port]]
        assert spec["appProtocol"] == protocol


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_route_sends_grpc_and_rest_to_their_pools(variant: str) -> None:
    resources = _rendered(variant)
    gateway = _named(resources, "Gateway", "inference-gateway")
    (route,) = _of_kind(resources, "HTTPRoute")
    assert [p["name"] for p in route["spec"]["parentRefs"]] == [gateway["metadata"]["name"]]
    by_prefix = {}
    for rule in route["spec"]["rules"]:
        (match,) = rule["matches"]
        (backend,) = rule["backendRefs"]
        assert (backend["group"], backend["kind"]) == (POOL_GROUP, "InferencePool")
        assert backend["name"] in _pools(resources)
        by_prefix[match["path"]["value"]] = backend["name"]
        assert rule["timeouts"]["request"] == "60s", "the picker's default deadline (picker.overload.deadline_ms)"
    assert by_prefix == {"/inference.GRPCInferenceService/": "triton-grpc", "/v2": "triton-rest"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_gateway_pods_may_reach_the_pickers_and_the_hosts(variant: str) -> None:
    resources = _rendered(variant)
    allowed: dict[str, set[str]] = {}
    for policy in _of_kind(resources, "NetworkPolicy"):
        for workload in _selected_workloads(resources, NAMESPACE, policy["spec"]["podSelector"]["matchLabels"]):
            for rule in policy["spec"]["ingress"]:
                sources = rule.get("from", [])
                from_gateway = any(
                    "gateway.networking.k8s.io/gateway-name" in s.get("podSelector", {}).get("matchLabels", {})
                    or "gateway.envoyproxy.io/owning-gateway-name" in s.get("podSelector", {}).get("matchLabels", {})
                    for s in sources
                )
                if from_gateway:
                    names = {p["port"] for p in rule["ports"]}
                    assert names <= set(_container_ports(workload)), f"{policy['metadata']['name']}: {names}"
                    allowed.setdefault(workload["metadata"]["name"], set()).update(names)
    assert allowed == {
        "extproc-picker": {"epp"},
        "triton-gpu": {"http", "grpc"},
        "triton-cpu": {"http", "grpc"},
    }


def test_istio_reaches_the_picker_over_tls() -> None:
    resources = _rendered(ISTIO)
    rule = _named(resources, "DestinationRule", "extproc-epp")
    service = _named(resources, "Service", "extproc-epp")
    assert rule["spec"]["host"] == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert rule["spec"]["trafficPolicy"]["tls"]["mode"] == "SIMPLE"
    epp = _fleet(EPP_PICKER_FLEET).picker.epp
    assert epp is not None and epp.tls


def test_the_pickers_fleet_file_is_the_bases_plus_epp() -> None:
    base = yaml.safe_load((REPO / BASE_PICKER_FLEET).read_text(encoding="utf-8"))
    ours = yaml.safe_load((REPO / EPP_PICKER_FLEET).read_text(encoding="utf-8"))
    epp = ours["picker"].pop("epp")
    # The base's pickers follow its telemetry publisher (deploy/k8s/base/telemetry.yaml); this variant runs
    # none, so its pickers scrape the hosts themselves.
    assert base["picker"].pop("replicas")["follow"]
    assert ours == base
    assert epp["cert_file"].startswith(base["runtime_dir"]), "written at start: under the pod's writable /tmp"
    for variant in VARIANTS:
        picker = _named(_rendered(variant), "Deployment", "extproc-picker")
        configmaps = [
            c for c in _of_kind(_rendered(variant), "ConfigMap") if c["metadata"]["name"].startswith("extproc-fleet")
        ]
        assert [c["data"]["fleet.yaml"] for c in configmaps] == [(REPO / EPP_PICKER_FLEET).read_text(encoding="utf-8")]
        volumes = {v["name"]: v for v in picker["spec"]["template"]["spec"]["volumes"]}
        assert volumes["fleet"]["configMap"]["name"] == configmaps[0]["metadata"]["name"]
        assert _pod_labels(picker)["app.kubernetes.io/name"] == "extproc-picker"
