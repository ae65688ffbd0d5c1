"""``python -m benchmarks.routing --scenario FILE``: the picker against Envoy's own load balancers, on a real fleet.

A scenario file (``benchmarks/scenarios/*.yaml``) embeds a fleet (the fleet-file schema: hosts with ``launch``
models and ``service_time_factor``, models, picker settings), a load (open-loop Poisson rate, duration,
warm-up, seed, request mix) and the policies to compare:

- ``round_robin`` / ``least_request``: Envoy alone. The fleet's bootstrap (:func:`render_bootstrap`) with
  the ext_proc filter and the picker cluster removed and each Triton cluster balancing by Envoy's
  ``round_robin`` / ``least_request`` policy. With ``baseline_pool: all_hosts`` (default) the clusters the
  un-routed requests take (the fallback tier's) hold every host of the fleet, as a plain Envoy in front of
  the whole fleet would; ``fallback_tier`` keeps them as rendered.
- ``picker``: the product: the picker and the fleet's bootstrap as ``extproc up`` runs them.

The Triton hosts are started once (on free loopback ports, in a private temporary directory) and reused by
every policy; each policy gets a fresh Envoy (and picker) on fresh ports. Each policy replays the same
seeded trace (:mod:`benchmarks.loadgen`, in a child process). Between policies Triton's queues drain.
What each host served is measured at the servers: Triton's per-model ``nv_inference_request_success`` /
``_failure`` counters and Envoy's per-host upstream ``rq_total`` before and after each policy, and per
request from the ``x-triton-host`` response header. A request Envoy sent to a host that Triton did not count
under any loaded model is one that reached a host without its model ("unattributed").

Output: a table on stdout, a JSON file, and a latency-CDF PNG beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime as dt
import ipaddress
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Any, Literal, TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from benchmarks import REPO_ROOT, RESULTS_DIR, SCENARIOS_DIR, child_env, quiet_logs, shown
from benchmarks.loadgen import LAG_BEHIND_MS, OK_STATUSES, LoadSpec, Records, RunSpec, percentile
from benchmarks.overhead.measure import http_get
from benchmarks.plot import write_latency_cdf
from benchmarks.ports import envoy_base_id, free_ports
from extproc.config import ConfigError, Fleet, HostSpec, key_path, parse_fleet
from extproc.datapath.headers import PICKER_CLUSTER, cluster_name
from extproc.envoy_config import EXT_PROC_FILTER, render_bootstrap, render_yaml
from extproc.runtime.process import Supervisor
from extproc.runtime.stack import StartupError, _picker_sees, find_envoy
from extproc.runtime.triton import prepare_backend_dir, triton_command, triton_env

DEFAULT_RESULTS_DIR = RESULTS_DIR
START_TIMEOUT_S = 240.0
# After everything reports ready: let the picker poll Triton and Envoy a few times, and Envoy health-check.
SETTLE_S = 2.0

_LB_POLICY_TYPES = {
    "round_robin": (
        "envoy.load_balancing_policies.round_robin",
        "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin",
    ),
    "least_request": (
        "envoy.load_balancing_policies.least_request",
        "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
    ),
}


# Read by triton_models/timed_batch: a file whose factor replaces the launch one while the model runs.
SPEED_FILE_ENV = "EXTPROC_SERVICE_TIME_FILE"


class Policy(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_REQUEST = "least_request"
    # The simple expected-completion picker (benchmarks/baseline_picker.py) behind the picker's own Envoy.
    BASELINE = "baseline"
    PICKER = "picker"

    @property
    def processor(self) -> bool:
        """An ext_proc processor decides, behind the Envoy config extproc renders."""
        return self in (Policy.BASELINE, Policy.PICKER)


class ScenarioError(Exception):
    """An invalid scenario file; ``str()`` names the file, the key and the problem."""


class Slowdown(BaseModel):
    """``host`` runs ``factor`` times slower than its launch speed from ``at_s`` seconds into each policy's
    load (warm-up included) to its end: its ``timed_batch`` reads the factor from a file the benchmark
    writes (``EXTPROC_SERVICE_TIME_FILE``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    at_s: float = Field(ge=0)
    factor: float = Field(gt=0, le=1000)


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    description: str = ""
    # A fleet file's content. Its ports, runtime_dir, picker listen/metrics port and Envoy listener/admin/TLS
    # are replaced at run time (free loopback ports, a private temporary directory).
    fleet: dict[str, Any]
    load: LoadSpec
    policies: tuple[Policy, ...] = Field(default=tuple(Policy), min_length=1)
    # Which hosts Envoy's own balancers spread over: every host of the fleet (what a plain Envoy in front of
    # the fleet does) or only the fleet's fallback tier.
    baseline_pool: Literal["all_hosts", "fallback_tier"] = "all_hosts"
    # Longest wait for Triton's queues to empty between policies.
    drain_timeout_s: float = Field(default=60.0, gt=0, le=600)
    slowdowns: tuple[Slowdown, ...] = ()
    source: str = Field(default="<memory>", exclude=True)

    @field_validator("policies")
    @classmethod
    def _distinct(cls, value: tuple[Policy, ...]) -> tuple[Policy, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"policies repeat a policy: {[p.value for p in value]}")
        return value

    def fleet_for_validation(self) -> Fleet:
        """The embedded fleet with placeholder ports, validated (see :func:`parse_scenario`)."""
        return _validate_fleet(localize_hosts(self.fleet, iter(range(20000, 60000))), self.source)


# --------------------------------------------------------------------------------------------- scenarios


def _validate_fleet(data: dict[str, Any], source: str) -> Fleet:
    try:
        return parse_fleet(data, source)
    except ConfigError as exc:
        # parse_fleet says "SOURCE: key hosts[1].x: ..."; in a scenario the fleet is under "fleet".
        lines = [line.replace(f"{source}: key ", f"{source}: key fleet.", 1) for line in str(exc).splitlines()]
        raise ScenarioError("\n".join(lines)) from None


_Model = TypeVar("_Model", bound=BaseModel)


def validate_scenario(model: type[_Model], data: Any, source: str) -> _Model:
    """A benchmark's scenario (already parsed YAML) as ``model``, its schema checked; raises
    :class:`ScenarioError` naming the file, each key and its problem."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario must be a mapping at the top level")
    try:
        return model.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems = [f"{source}: key {key_path(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ScenarioError("\n".join(problems)) from None


def parse_scenario(data: Any, source: str = "<memory>") -> Scenario:
    """Validate a scenario (already parsed YAML): schema, the embedded fleet, and their consistency."""
    scenario = validate_scenario(Scenario, data, source)
    fleet = scenario.fleet_for_validation()
    problems = []
    loaded: set[str] = set()
    for i, host in enumerate(fleet.hosts):
        if host.launch is None:
            problems.append(
                f"{source}: key fleet.hosts[{i}].launch: the benchmark starts every host itself; "
                "each needs launch: {models: [...]}"
            )
        else:
            loaded.update(host.launch.models)
        if not ipaddress.ip_address(host.address).is_loopback:
            problems.append(f"{source}: key fleet.hosts[{i}].address: {host.address} is not a loopback address")
    if fleet.pools:
        problems.append(f"{source}: key fleet.pools: the benchmark starts every host itself; list them under hosts")
    for i, entry in enumerate(scenario.load.mix):
        if entry.model not in loaded:
            problems.append(f"{source}: key load.mix[{i}].model: {entry.model!r} is loaded on no host")
    names = {h.name for h in fleet.hosts}
    for i, slowdown in enumerate(scenario.slowdowns):
        if slowdown.host not in names:
            problems.append(f"{source}: key slowdowns[{i}].host: {slowdown.host!r} is not a host of the fleet")
        if slowdown.at_s >= scenario.load.total_s:
            problems.append(f"{source}: key slowdowns[{i}].at_s: {slowdown.at_s:g} s is after the load's end")
    if problems:
        raise ScenarioError("\n".join(problems))
    return scenario


def read_scenario_yaml(path: Path, error: type[Exception]) -> Any:
    """A scenario file's YAML, or ``error`` naming the file and what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read the scenario file: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None


def load_scenario(path: str | Path, fleet_settings: Sequence[str] = ()) -> Scenario:
    """The scenario file, with ``fleet_settings`` (see :func:`with_fleet_keys`) applied to its fleet."""
    path = Path(path)
    data = read_scenario_yaml(path, ScenarioError)
    if fleet_settings and isinstance(data, dict):
        data["fleet"] = with_fleet_keys(data.get("fleet") or {}, fleet_settings, ScenarioError)
    return parse_scenario(data, str(path))


def with_fleet_keys(fleet: Mapping[str, Any], settings: Sequence[str], error: type[Exception]) -> dict[str, Any]:
    """A copy of fleet-file data with each ``KEY=VALUE`` of ``settings`` set: a dotted key (e.g.
    ``picker.workers``), the value read as YAML. A malformed setting is an ``error`` naming it."""
    data = copy.deepcopy(dict(fleet))
    for setting in settings:
        key, sep, text = setting.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise error(f"--fleet {setting!r}: expected KEY=VALUE with a dotted fleet-file key")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise error(f"--fleet {setting!r}: fleet.{part} is not a mapping")
            node = child
        node[parts[-1]] = yaml.safe_load(text)
    return data


# ------------------------------------------------------------------------------------------ fleet files


def localize_hosts(fleet: Mapping[str, Any], ports: Iterator[int]) -> dict[str, Any]:
    """A copy of the fleet data with each host's three ports taken from ``ports`` (file values ignored)."""
    data = copy.deepcopy(dict(fleet))
    hosts = data.get("hosts")
    if isinstance(hosts, list):
        for host in hosts:
            if isinstance(host, dict):
                host.update(http_port=next(ports), grpc_port=next(ports), metrics_port=next(ports))
    return data


def _resolve_repository(value: Any) -> str:
    path = Path(str(value)) if value is not None else Path("triton_models")
    if path.is_absolute():
        return str(path)
    for base in (Path.cwd(), REPO_ROOT):
        if (base / path).is_dir():
            return str((base / path).resolve())
    return str(path.resolve())


def localize_front(fleet: Mapping[str, Any], run_dir: Path, ports: Iterator[int], base_id: int) -> dict[str, Any]:
    """A copy of the fleet data with the picker and Envoy moved to ``ports`` and ``run_dir``.

    TLS is off (the benchmark speaks plain HTTP/h2c) and ``expose_upstream_host`` is on, so every response
    names the host that served it.
    """
    data = copy.deepcopy(dict(fleet))
    data["model_repository"] = _resolve_repository(data.get("model_repository"))
    data["runtime_dir"] = str(run_dir)
    picker = dict(data.get("picker") or {})
    picker.update(listen=f"unix:{run_dir}/picker.sock", metrics_address="127.0.0.1", metrics_port=next(ports))
    data["picker"] = picker
    envoy = dict(data.get("envoy") or {})
    envoy.update(
        listener={"address": "127.0.0.1", "port": next(ports)},
        admin={"address": "127.0.0.1", "port": next(ports)},
        tls=None,
        expose_upstream_host=True,
        base_id=base_id,
    )
    data["envoy"] = envoy
    return data


def _lb_policy(name: str) -> dict[str, Any]:
    extension, type_url = _LB_POLICY_TYPES[name]
    return {"policies": [{"typed_extension_config": {"name": extension, "typed_config": {"@type": type_url}}}]}


def baseline_bootstrap(fleet: Fleet, policy: str, pool: str = "all_hosts") -> dict[str, Any]:
    """The fleet's bootstrap for Envoy alone: no ext_proc filter, no picker cluster, and every Triton
    cluster balancing by ``policy`` (``round_robin`` or ``least_request``).

    With ``pool="all_hosts"`` the fallback tier's clusters (the ones requests take when nothing sets the
    tier header) hold every host of the fleet.
    """
    if policy not in _LB_POLICY_TYPES:
        raise ValueError(f"no Envoy load-balancing policy {policy!r}; expected one of {sorted(_LB_POLICY_TYPES)}")
    boot = render_bootstrap(fleet)
    resources = boot["static_resources"]
    for listener in resources["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                manager = network_filter["typed_config"]
                manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != EXT_PROC_FILTER]
                for vhost in manager["route_config"]["virtual_hosts"]:
                    for route in vhost["routes"]:
                        per_filter = route.get("typed_per_filter_config")
                        if per_filter is not None:
                            per_filter.pop(EXT_PROC_FILTER, None)
                            if not per_filter:
                                del route["typed_per_filter_config"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != PICKER_CLUSTER]
    fallback = fleet.envoy.fallback_tier.value
    for cluster in resources["clusters"]:
        cluster["load_balancing_policy"] = _lb_policy(policy)
        if pool == "all_hosts" and cluster["name"] in {cluster_name(fallback, "http"), cluster_name(fallback, "grpc")}:
            grpc = cluster["name"].endswith("_grpc")
            cluster["load_assignment"]["endpoints"] = [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": h.address,
                                        "port_value": h.grpc_port if grpc else h.http_port,
                                    }
                                }
                            }
                        }
                        for h in fleet.hosts
                    ]
                }
            ]
    return boot


# ---------------------------------------------------------------------------------------- observation


def _ok(url: str) -> Callable[[], bool]:
    return lambda: http_get(url, 1.0)[0] == 200


@dataclass(frozen=True)
class TritonCounts:
    """One host's Triton counters: requests per model (success + failure) and queued requests."""

    success: dict[str, float]
    failure: dict[str, float]
    pending: float

    @property
    def total(self) -> float:
        return sum(self.success.values()) + sum(self.failure.values())


def parse_triton_counts(text: str) -> TritonCounts:
    success: defaultdict[str, float] = defaultdict(float)
    failure: defaultdict[str, float] = defaultdict(float)
    pending = 0.0
    for family in text_string_to_metric_families(text):
        # The parser names counter families without "_total" and their samples with it; match families.
        for sample in family.samples:
            model = sample.labels.get("model", "")
            if family.name == "nv_inference_request_success":
                success[model] += sample.value
            elif family.name == "nv_inference_request_failure":
                failure[model] += sample.value
            elif family.name == "nv_inference_pending_request_count":
                pending += sample.value
    return TritonCounts(dict(success), dict(failure), pending)


def triton_counts(host: HostSpec) -> TritonCounts | None:
    status, body = http_get(host.metrics_url)
    return parse_triton_counts(body.decode()) if status == 200 else None


def envoy_host_requests(clusters_json: Mapping[str, Any], endpoints: Mapping[str, str]) -> dict[str, float]:
    """Upstream requests per host name over the Triton clusters of Envoy's ``/clusters?format=json``.

    ``endpoints`` maps ``ip:port`` (HTTP and gRPC ports) to host names.
    """
    out: defaultdict[str, float] = defaultdict(float)
    for cluster in clusters_json.get("cluster_statuses", []):
        if not str(cluster.get("name", "")).startswith("triton_"):
            continue
        for host in cluster.get("host_statuses", []):
            sock = host.get("address", {}).get("socket_address", {})
            name = endpoints.get(f"{sock.get('address')}:{sock.get('port_value')}")
            if name is None:
                continue
            for stat in host.get("stats", []):
                if stat.get("name") == "rq_total":
                    out[name] += float(stat.get("value", 0))
    return dict(out)


def envoy_all_healthy(clusters_json: Mapping[str, Any]) -> bool:
    """Whether every host of every Triton cluster passed its active health check."""
    for cluster in clusters_json.get("cluster_statuses", []):
        if not str(cluster.get("name", "")).startswith("triton_"):
            continue
        for host in cluster.get("host_statuses", []):
            health = host.get("health_status", {})
            if health.get("eds_health_status") != "HEALTHY" or any(
                v is True for k, v in health.items() if k.startswith("failed")
            ):
                return False
    return True


def _envoy_clusters(admin: str) -> dict[str, Any] | None:
    status, body = http_get(f"{admin}/clusters?format=json")
    if status != 200:
        return None
    data = json.loads(body)
    return data if isinstance(data, dict) else None


def _envoy_ext_proc_stats(admin: str) -> dict[str, float]:
    """Envoy's ``ext_proc`` counters (streams, timeouts, fail-open), by stat name."""
    status, body = http_get(f"{admin}/stats?format=json&filter=ext_proc")
    if status != 200:
        return {}
    out = {}
    for stat in json.loads(body).get("stats", []):
        if "name" in stat and isinstance(stat.get("value"), int | float):
            out[str(stat["name"])] = float(stat["value"])
    return out


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_table() -> dict[int, tuple[int, float]]:
    """Every process on the machine: pid → (parent pid, CPU seconds used so far), from ``/proc``."""
    return stat_table(1)


def stat_table(field: int) -> dict[int, tuple[int, float]]:
    """Every process on the machine: pid → (its ``/proc/PID/stat`` field ``field``, counted from the state
    after "pid (comm) " as 0, as an integer; CPU seconds used so far)."""
    table: dict[int, tuple[int, float]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            # After "pid (comm) ": state, ppid, ..., utime (12th), stime (13th), ..., nice (17th).
            table[int(entry.name)] = (int(fields[field]), (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return table


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used (``/proc/stat``: everything but idle and iowait)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0.0
    ticks = [int(x) for x in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLK_TCK


def tree_cpu_s(table: Mapping[int, tuple[int, float]], root: int) -> float:
    """CPU seconds of ``root`` and all its descendants alive now (Triton's python backend stubs)."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            total += table[pid][1]
        stack.extend(children.get(pid, ()))
    return total


# -------------------------------------------------------------------------------------------- summaries


@dataclass
class PolicyResult:
    policy: str
    records: Records
    generator: dict[str, float]
    triton_delta: dict[str, dict[str, float]]  # host → model → requests (success + failure)
    envoy_requests: dict[str, float]  # host → upstream requests (all attempts)
    drained_s: float
    notes: list[str] = field(default_factory=list)
    # CPU cores each part used while the load ran (CPU seconds / wall seconds), and a 1 s timeline.
    cpu_cores: dict[str, float] = field(default_factory=dict)
    cpu_timeline: list[dict[str, float]] = field(default_factory=list)
    ext_proc: dict[str, float] = field(default_factory=dict)


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    ordered = sorted(latencies_ms)
    return {
        "p50_ms": percentile(ordered, 50),
        "p90_ms": percentile(ordered, 90),
        "p99_ms": percentile(ordered, 99),
        "p999_ms": percentile(ordered, 99.9),
        "max_ms": ordered[-1] if ordered else math.nan,
        "mean_ms": sum(ordered) / len(ordered) if ordered else math.nan,
    }


def _shares(counts: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    total = sum(counts.values())
    return {n: (counts.get(n, 0.0) / total if total else 0.0) for n in names}


def summarize(
    result: PolicyResult, scenario: Scenario, fleet: Fleet, endpoint_names: Mapping[str, str]
) -> dict[str, Any]:
    """The per-policy numbers: latency of the measured window, throughput, errors, host shares, lag."""
    load = scenario.load
    rec = result.records
    measured = [i for i, t in enumerate(rec.intended) if t >= load.warmup_s]
    ok = [i for i in measured if rec.status[i] in OK_STATUSES]
    latencies = [(rec.done[i] - rec.intended[i]) * 1e3 for i in ok]
    errors = Counter(rec.status[i] for i in measured if rec.status[i] not in OK_STATUSES)
    errors_all = Counter(s for s in rec.status if s not in OK_STATUSES)
    last_done = max((rec.done[i] for i in ok), default=load.warmup_s)
    span = max(load.duration_s, last_done - load.warmup_s)
    lags = sorted((rec.sent[i] - rec.intended[i]) * 1e3 for i in range(len(rec.intended)) if rec.sent[i] == rec.sent[i])
    names = [h.name for h in fleet.hosts]
    served_by: Counter[str] = Counter()
    missing_host_header = 0
    for i in measured:
        name = endpoint_names.get(rec.host[i]) if rec.host[i] else None
        if name is None:
            missing_host_header += 1
        else:
            served_by[name] += 1
    # Requests (all, warm-up included) whose response names a host that does not load the request's model.
    models_of = {h.name: set(h.launch.models) if h.launch else set() for h in fleet.hosts}
    misplaced_client = 0
    for i in range(len(rec.intended)):
        name = endpoint_names.get(rec.host[i]) if rec.host[i] else None
        if name is not None and load.mix[rec.entry[i]].model not in models_of[name]:
            misplaced_client += 1
    triton_per_host = {n: sum(result.triton_delta.get(n, {}).values()) for n in names}
    unattributed = {n: max(0.0, result.envoy_requests.get(n, 0.0) - triton_per_host[n]) for n in names}
    per_entry: dict[str, Any] = {}
    for k, entry in enumerate(load.mix):
        idx = [i for i in ok if rec.entry[i] == k]
        # Where this kind of request went (every measured response that names a host, errors included).
        entry_hosts = Counter(
            endpoint_names[rec.host[i]] for i in measured if rec.entry[i] == k and rec.host[i] in endpoint_names
        )
        per_entry[entry.label] = {
            "requests": sum(1 for i in measured if rec.entry[i] == k),
            "ok": len(idx),
            **latency_summary([(rec.done[i] - rec.intended[i]) * 1e3 for i in idx]),
            "hosts": _shares(entry_hosts, names),
        }
    lag_p99 = percentile(lags, 99)
    return {
        "policy": result.policy,
        "requests": len(measured),
        "requests_with_warmup": len(rec.intended),
        "ok": len(ok),
        "latency": latency_summary(latencies),
        "offered_rps": len(measured) / load.duration_s,
        "achieved_rps": len(ok) / span if span > 0 else 0.0,
        "errors": dict(sorted(errors.items())),
        "errors_with_warmup": dict(sorted(errors_all.items())),
        "host_share": {
            # From the x-triton-host response header, measured window.
            "client": _shares(served_by, names),
            # Triton's own counters over the whole policy run (warm-up included).
            "triton": _shares(triton_per_host, names),
            # Envoy's per-host upstream requests (every attempt, retries included), whole run.
            "envoy": _shares(result.envoy_requests, names),
        },
        "triton_requests": result.triton_delta,
        "envoy_upstream_requests": result.envoy_requests,
        "misplaced": {
            "client_header": misplaced_client,
            "server_unattributed": unattributed,
            "server_unattributed_total": sum(unattributed.values()),
        },
        "responses_without_host_header": missing_host_header,
        "per_entry": per_entry,
        "generator": {
            "lag_p50_ms": percentile(lags, 50),
            "lag_p99_ms": lag_p99,
            "lag_max_ms": lags[-1] if lags else math.nan,
            "behind": bool(lag_p99 > LAG_BEHIND_MS),
            **result.generator,
        },
        "drained_s": result.drained_s,
        "cpu_cores": {
            **result.cpu_cores,
            "tritons": sum(result.cpu_cores.get(h.name, 0.0) for h in fleet.hosts),
        },
        "cpu_timeline": result.cpu_timeline,
        "envoy_ext_proc": result.ext_proc,
        "notes": result.notes,
    }


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN → "-"


# Envoy ext_proc counters that mean a request was not routed by the picker as intended.
_EXT_PROC_TROUBLE = frozenset(
    {"failure_mode_allowed", "message_timeouts", "streams_failed", "rejected_header_mutations", "stream_msgs_failed"}
)


def format_table(summaries: Sequence[Mapping[str, Any]], host_names: Sequence[str]) -> str:
    header = (
        f"{'policy':<14} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'req/s':>7} {'ok':>6} {'errors':>7}"
        f" {'lag p99':>8}  host share (triton) / unattributed"
    )
    lines = [header + "   (latency in ms)", "-" * len(header)]
    for s in summaries:
        lat = s["latency"]
        shares = " ".join(f"{n}={s['host_share']['triton'][n] * 100:.0f}%" for n in host_names)
        gen = s["generator"]
        lag = _fmt(gen["lag_p99_ms"]) + ("!" if gen["behind"] else "")
        lines.append(
            f"{s['policy']:<14} {_fmt(lat['p50_ms']):>8} {_fmt(lat['p90_ms']):>8} {_fmt(lat['p99_ms']):>8}"
            f" {_fmt(lat['max_ms']):>8} {_fmt(s['achieved_rps']):>7} {s['ok']:>6}"
            f" {sum(s['errors'].values()):>7} {lag:>8}  {shares} / {s['misplaced']['server_unattributed_total']:.0f}"
        )
    for s in summaries:
        if s["errors"]:
            detail = ", ".join(f"{k}: {v}" for k, v in s["errors"].items())
            lines.append(f"  {s['policy']} errors: {detail}")
        if s["generator"]["behind"]:
            lines.append(
                f"  {s['policy']}: the load generator fell behind (send lag p99 {s['generator']['lag_p99_ms']:.1f} ms"
                f" > {LAG_BEHIND_MS:.0f} ms): latencies are still from the intended send time"
            )
        for note in s["notes"]:
            lines.append(f"  {s['policy']}: {note}")
    if summaries and summaries[0].get("cpu_cores"):
        lines.append(f"CPU cores used during the load (this machine has {os.cpu_count() or '?'}):")
        for s in summaries:
            cpu = s["cpu_cores"]
            parts = {n: cpu[n] for n in ("envoy", "picker", "tritons", "loadgen") if n in cpu}
            listed = ", ".join(f"{n} {v:.2f}" for n, v in parts.items())
            other = cpu.get("machine", math.nan) - sum(parts.values())
            lines.append(
                f"  {s['policy']:<14} {listed}; whole machine {_fmt(cpu.get('machine', math.nan), 2)}"
                f" (other processes {_fmt(other, 2)})"
            )
    for s in summaries:
        ext = s.get("envoy_ext_proc") or {}
        bad = {k.rsplit(".", 1)[-1]: v for k, v in ext.items() if v and k.rsplit(".", 1)[-1] in _EXT_PROC_TROUBLE}
        if bad:
            lines.append(
                f"  {s['policy']}: Envoy ext_proc " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(bad.items()))
            )
    entries = list(summaries[0]["per_entry"]) if summaries else []
    if len(entries) > 1:
        lines.append("")
        lines.append(f"{'per request kind':<28} " + " ".join(f"{s['policy']:>22}" for s in summaries))
        for label in entries:
            cells = []
            for s in summaries:
                e = s["per_entry"][label]
                cells.append(f"{_fmt(e['p50_ms']):>7} / {_fmt(e['p99_ms']):>7} ms{'':>3}")
            lines.append(f"{label:<28} " + " ".join(f"{c:>22}" for c in cells))
        lines.append(f"{'':<28} " + " ".join(f"{'(p50 / p99)':>22}" for _ in summaries))
    return "\n".join(lines)


def comparisons(summaries: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    by = {s["policy"]: s for s in summaries}
    out: dict[str, float] = {}
    if "picker" in by:
        for base in ("least_request", "round_robin", "baseline"):
            if base in by and by[base]["latency"]["p99_ms"] > 0:
                out[f"picker_p99_over_{base}_p99"] = by["picker"]["latency"]["p99_ms"] / by[base]["latency"]["p99_ms"]
    return out


# -------------------------------------------------------------------------------------------- the run


def cpu_usage(
    samples: Sequence[tuple[float, Mapping[str, float]]],
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Cores used per part between the first and the last sample, and per sampling interval."""
    if len(samples) < 2:
        return {}, []
    timeline = []
    for (t0, a), (t1, b) in itertools.pairwise(samples):
        if t1 > t0:
            timeline.append({"t": round(t1, 2), **{n: round((b[n] - a.get(n, 0.0)) / (t1 - t0), 3) for n in b}})
    (t_first, first), (t_last, last) = samples[0], samples[-1]
    span = t_last - t_first
    return ({n: (last[n] - first.get(n, 0.0)) / span for n in last} if span > 0 else {}), timeline


def _die_with_parent() -> None:
    """In the load generator's process before exec: SIGTERM when this process dies (as Supervisor does)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _progress(message: str) -> None:
    print(f"[bench routing] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Front:
    """A running gateway: Envoy (and the picker) in front of the fleet's Triton hosts."""

    fleet: Fleet
    gateway: str  # http://127.0.0.1:PORT, REST and gRPC (h2c)
    admin: str  # Envoy's admin URL
    work_dir: Path
    supervisor: Supervisor


class FleetBench:
    """Starts a fleet's Triton hosts once; then gateways (Envoy, and the picker) in front of them, in turn,
    and load generators against a gateway."""

    def __init__(
        self, fleet: Mapping[str, Any], source: str, run_dir: Path, drain_timeout_s: float = 60.0, name: str = "routing"
    ) -> None:
        self.name = name
        self.source = source
        self.run_dir = run_dir
        self.drain_timeout_s = drain_timeout_s
        ports = iter(free_ports(3 * len(fleet.get("hosts", []))))
        self.fleet_data = localize_hosts(fleet, ports)
        # The fleet as validated with the real host ports; picker/Envoy ports are per policy.
        self.fleet = _validate_fleet(localize_front(self.fleet_data, run_dir, iter(free_ports(3)), 0), source)
        self.endpoint_names: dict[str, str] = {}
        for h in self.fleet.hosts:
            self.endpoint_names[h.http_endpoint] = h.name
            self.endpoint_names[h.grpc_endpoint] = h.name
        self.tritons = Supervisor(run_dir / "logs")

    def say(self, message: str) -> None:
        """A progress line on stderr, prefixed with the benchmark's name."""
        print(f"[bench {self.name}] {message}", file=sys.stderr, flush=True)

    # -- Triton

    def start_tritons(self) -> None:
        backend_dir = prepare_backend_dir(self.run_dir)
        repository = Path(self.fleet.model_repository)
        for host in self.fleet.hosts:
            assert host.launch is not None
            missing = [m for m in host.launch.models if not (repository / m).is_dir()]
            if missing:
                raise StartupError(f"{host.name}: models {missing} are not in the model repository {repository}")
            self.say(
                f"starting Triton {host.name} ({host.tier.value}, service time x{host.launch.service_time_factor:g},"
                f" models {', '.join(host.launch.models)}) on {host.http_endpoint}"
            )
            argv = triton_command(
                model_repository=repository,
                backend_dir=backend_dir,
                http_port=host.http_port,
                grpc_port=host.grpc_port,
                metrics_port=host.metrics_port,
                models=host.launch.models,
                address=host.address,
            )
            speed = self.speed_file(host.name)
            speed.write_text(f"{host.launch.service_time_factor!r}\n", encoding="utf-8")
            self.tritons.start(
                host.name, argv, triton_env(host.launch.service_time_factor) | {SPEED_FILE_ENV: str(speed)}
            )
        self._wait(
            [(f"Triton {h.name}", _ok(f"http://{h.http_endpoint}/v2/health/ready")) for h in self.fleet.hosts],
            self.tritons,
        )

    def speed_file(self, host: str) -> Path:
        """Where ``host``'s ``timed_batch`` reads its service time factor from (see :class:`Slowdown`)."""
        return self.run_dir / f"speed-{host}.txt"

    def set_speed(self, host: str, factor: float) -> None:
        # A rename, so the model never reads a half-written file.
        path = self.speed_file(host)
        partial = path.with_suffix(".partial")
        partial.write_text(f"{factor!r}\n", encoding="utf-8")
        partial.replace(path)

    def triton_snapshot(self) -> dict[str, TritonCounts]:
        out = {}
        for host in self.fleet.hosts:
            counts = triton_counts(host)
            if counts is None:
                raise StartupError(f"cannot read Triton metrics of {host.name} at {host.metrics_url}")
            out[host.name] = counts
        return out

    def drain(self) -> float:
        """Wait until no Triton has queued requests and the counters stopped moving; seconds waited."""
        started = time.monotonic()
        deadline = started + self.drain_timeout_s
        previous: dict[str, float] | None = None
        while time.monotonic() < deadline:
            snap = self.triton_snapshot()
            totals = {n: c.total for n, c in snap.items()}
            if all(c.pending == 0 for c in snap.values()) and totals == previous:
                return time.monotonic() - started
            previous = totals
            time.sleep(0.3)
        self.say(f"Triton queues did not drain within {self.drain_timeout_s:.0f} s")
        return time.monotonic() - started

    # -- one policy

    def _wait(self, checks: Sequence[tuple[str, Callable[[], bool]]], supervisor: Supervisor) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for name, check in checks:
            while not check():
                for child in supervisor.exited():
                    raise StartupError(
                        f"{child.name} exited with code {child.process.returncode} during start-up; "
                        f"last lines of {child.log_file}:\n{child.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise StartupError(f"{name} did not become ready within {START_TIMEOUT_S:.0f} s")
                time.sleep(0.2)

    @contextlib.contextmanager
    def front(
        self,
        policy: Policy,
        name: str,
        fleet_data: Mapping[str, Any] | None = None,
        baseline_pool: str = "all_hosts",
    ) -> Iterator[Front]:
        """Envoy (and, for ``Policy.PICKER`` or ``BASELINE``, its processor) on fresh ports for ``fleet_data``
        (default the fleet's), ready to route to every host; stopped on leaving."""
        policy_dir = self.run_dir / name
        policy_dir.mkdir(parents=True, exist_ok=True)
        data = localize_front(
            self.fleet_data if fleet_data is None else fleet_data,
            policy_dir,
            iter(free_ports(3)),
            envoy_base_id(),
        )
        fleet = _validate_fleet(data, self.source)
        config_path = policy_dir / "fleet.yaml"
        config_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        envoy_path = policy_dir / "envoy.yaml"
        if policy.processor:
            envoy_path.write_text(render_yaml(fleet), encoding="utf-8")
        else:
            boot = baseline_bootstrap(fleet, policy.value, baseline_pool)
            envoy_path.write_text(yaml.safe_dump(boot, sort_keys=False), encoding="utf-8")
        supervisor = Supervisor(policy_dir / "logs")
        admin = f"http://{fleet.envoy.admin.address}:{fleet.envoy.admin.port}"
        gateway = f"http://{fleet.envoy.listener.address}:{fleet.envoy.listener.port}"
        try:
            checks: list[tuple[str, Callable[[], bool]]] = []
            if policy.processor:
                command = ["extproc", "serve"] if policy is Policy.PICKER else ["benchmarks.baseline_picker"]
                self.say(f"{name}: starting {command[0]}")
                argv = [sys.executable, "-m", *command, "--config", str(config_path)]
                supervisor.start("picker", argv, child_env())
                picker = fleet.picker
                checks.append(("picker", _ok(f"http://{picker.metrics_address}:{picker.metrics_port}/ready")))
            self.say(f"{name}: starting Envoy on {gateway}")
            supervisor.start(
                "envoy",
                [
                    find_envoy(),
                    "-c",
                    str(envoy_path),
                    "--base-id",
                    str(fleet.envoy.base_id),
                    "--concurrency",
                    str(fleet.envoy.concurrency),
                    "--log-level",
                    "warn",
                ],
            )
            checks += [
                ("Envoy", _ok(f"{admin}/ready")),
                ("Envoy's health checks", lambda: (c := _envoy_clusters(admin)) is not None and envoy_all_healthy(c)),
                ("the gateway", _ok(f"{gateway}/v2/health/ready")),
            ]
            if policy is Policy.PICKER:
                # As `extproc up` waits: every host routable in the picker's view, with its models READY.
                status_url = f"http://{fleet.picker.metrics_address}:{fleet.picker.metrics_port}/status"
                checks.append(("the picker's view of every host", lambda: _picker_sees(status_url, list(fleet.hosts))))
            self._wait(checks, supervisor)
            time.sleep(SETTLE_S)
            yield Front(fleet, gateway, admin, policy_dir, supervisor)
        finally:
            supervisor.stop()

    def run_loadgen(
        self,
        label: str,
        load: LoadSpec,
        gateway: str,
        work_dir: Path,
        front: Supervisor | None = None,
        progress: bool = True,
    ) -> tuple[Records, dict[str, float], dict[str, float], list[dict[str, float]]]:
        """``load`` against ``gateway`` (``http://ADDRESS:PORT``, REST and gRPC), from a child process; its
        records, the generator's own stats, and the CPU cores each part (Tritons, ``front``'s processes,
        the generator) used, over the whole load and per second. ``progress``: the generator's line a second."""
        spec = RunSpec(
            label=label,
            http_base=gateway,
            grpc_target=gateway.removeprefix("http://"),
            load=load,
            progress=progress,
        )
        work_dir.mkdir(parents=True, exist_ok=True)
        spec_path = work_dir / f"{label}-loadgen-spec.json"
        out_path = work_dir / f"{label}-loadgen-out.json"
        spec_path.write_text(spec.model_dump_json(), encoding="utf-8")
        children = [*(front.children if front is not None else []), *self.tritons.children]
        parts = {c.name: c.process.pid for c in children}
        # Its own process: the generator's event loop must not share a core's time slice with ours.
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.loadgen", str(spec_path), str(out_path)],
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            env=child_env(),
            preexec_fn=_die_with_parent,
        )
        pids = {**parts, "loadgen": process.pid}
        started = time.monotonic()
        deadline = started + load.total_s + load.timeout_s + 120
        samples: list[tuple[float, dict[str, float]]] = []
        try:
            while process.poll() is None:
                table = process_table()
                sample = {n: tree_cpu_s(table, pid) for n, pid in pids.items()}
                # Everything on the machine: what is left after our parts is someone else's load.
                sample["machine"] = machine_busy_s()
                samples.append((time.monotonic() - started, sample))
                if time.monotonic() > deadline:
                    raise StartupError(f"{label}: the load generator did not finish")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=1.0)
            code = process.returncode
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if code != 0:
            raise StartupError(f"{label}: the load generator exited with code {code}")
        out = json.loads(out_path.read_text(encoding="utf-8"))
        generator = {str(k): float(v) for k, v in out["generator"].items()}
        cores, timeline = cpu_usage(samples)
        if "cpu_share" in generator:
            # Its own rusage: the sampled total also holds its start-up (imports, building the trace).
            cores["loadgen"] = generator["cpu_share"]
        return Records.from_json(out["records"]), generator, cores, timeline

    def stop(self) -> None:
        self.tritons.stop()


class RoutingBench(FleetBench):
    """Starts the scenario's Triton hosts once; runs each policy's Envoy (and picker) and load in turn."""

    def __init__(self, scenario: Scenario, run_dir: Path) -> None:
        super().__init__(scenario.fleet, scenario.source, run_dir, scenario.drain_timeout_s)
        self.scenario = scenario

    def run_policy(self, policy: Policy) -> PolicyResult:
        with self.front(policy, policy.value, baseline_pool=self.scenario.baseline_pool) as front:
            before = self.triton_snapshot()
            envoy_before = envoy_host_requests(_envoy_clusters(front.admin) or {}, self.endpoint_names)
            load = self.scenario.load
            _progress(
                f"{policy.value}: {load.rate_rps:g} req/s for {load.warmup_s:g} s warm-up + {load.duration_s:g} s"
            )
            timers = [
                threading.Timer(s.at_s, self.set_speed, (s.host, s.factor * self._launch_factor(s.host)))
                for s in self.scenario.slowdowns
            ]
            for timer in timers:
                timer.start()
            try:
                records, generator, cpu_cores, timeline = self.run_loadgen(
                    policy.value, load, front.gateway, front.work_dir, front.supervisor
                )
            finally:
                for timer in timers:
                    timer.cancel()
                for s in self.scenario.slowdowns:
                    self.set_speed(s.host, self._launch_factor(s.host))
            drained = self.drain()
            ext_proc = _envoy_ext_proc_stats(front.admin) if policy.processor else {}
            after = self.triton_snapshot()
            envoy_after = envoy_host_requests(_envoy_clusters(front.admin) or {}, self.endpoint_names)
            notes = [f"{c.name} exited during the run (code {c.process.returncode})" for c in front.supervisor.exited()]
        delta = {
            name: {
                model: after[name].success.get(model, 0.0)
                + after[name].failure.get(model, 0.0)
                - before[name].success.get(model, 0.0)
                - before[name].failure.get(model, 0.0)
                for model in set(after[name].success) | set(after[name].failure)
            }
            for name in after
        }
        envoy_delta = {n: envoy_after.get(n, 0.0) - envoy_before.get(n, 0.0) for n in self.endpoint_names.values()}
        return PolicyResult(
            policy.value, records, generator, delta, envoy_delta, drained, notes, cpu_cores, timeline, ext_proc
        )

    def _launch_factor(self, host: str) -> float:
        launch = next(h.launch for h in self.fleet.hosts if h.name == host)
        return launch.service_time_factor if launch is not None else 1.0


def fleet_description(fleet: Fleet) -> list[dict[str, Any]]:
    return [
        {
            "name": h.name,
            "tier": h.tier.value,
            "service_time_factor": h.launch.service_time_factor if h.launch else None,
            "models": list(h.launch.models) if h.launch else [],
        }
        for h in fleet.hosts
    ]


def run_scenario(
    scenario: Scenario, policies: Sequence[Policy] | None = None, keep_dir: Path | None = None
) -> dict[str, Any]:
    """Run every policy of ``scenario`` and return the JSON report (with raw latencies for the plot)."""
    chosen = list(policies or scenario.policies)
    run_dir = keep_dir or Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    bench = RoutingBench(scenario, run_dir)
    summaries: list[dict[str, Any]] = []
    latencies: dict[str, list[float]] = {}
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    _progress(f"scenario {scenario.name}: run directory {run_dir}")
    try:
        bench.start_tritons()
        for policy in chosen:
            result = bench.run_policy(policy)
            summary = summarize(result, scenario, bench.fleet, bench.endpoint_names)
            summaries.append(summary)
            rec = result.records
            latencies[policy.value] = [
                (rec.done[i] - rec.intended[i]) * 1e3
                for i in range(len(rec.intended))
                if rec.intended[i] >= scenario.load.warmup_s and rec.status[i] in OK_STATUSES
            ]
            _progress(
                f"{policy.value}: p99 {_fmt(summary['latency']['p99_ms'])} ms, "
                f"{sum(summary['errors'].values())} errors, drained in {result.drained_s:.1f} s"
            )
    finally:
        bench.stop()
        if keep_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "source": scenario.source,
        "started_at": started_at,
        "machine": {"cpus": os.cpu_count()},
        "load": scenario.load.model_dump(mode="json"),
        "baseline_pool": scenario.baseline_pool,
        "hosts": fleet_description(bench.fleet),
        "policies": summaries,
        "comparisons": comparisons(summaries),
        "_latencies_ms": latencies,
    }


def find_scenario(value: str | Path) -> Path:
    """A scenario file: ``value`` itself when it exists, else the scenario of that name in ``scenarios/``."""
    path = Path(value)
    if path.exists() or path.parent != Path():
        return path
    named = SCENARIOS_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    return named if named.is_file() else path


def run(
    scenario: str | Path,
    output: str | Path | None = None,
    plot: str | Path | None = None,
    policies: Sequence[str] | None = None,
    keep_dir: str | Path | None = None,
    fleet_settings: Sequence[str] = (),
) -> int:
    """Run the scenario (its fleet with ``fleet_settings``, ``KEY=VALUE`` each), print the table, write the
    JSON and the CDF PNG.

    Returns 0, or 2 for an invalid scenario and 1 when the stack could not be started.
    """
    try:
        parsed = load_scenario(find_scenario(scenario), fleet_settings)
        chosen = [Policy(p) for p in policies] if policies else None
    except ScenarioError as exc:
        print(f"benchmarks.routing: invalid scenario:\n{exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"benchmarks.routing: {exc} (policies: {', '.join(p.value for p in Policy)})", file=sys.stderr)
        return 2
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = Path(output) if output else DEFAULT_RESULTS_DIR / f"routing-{parsed.name}-{stamp}.json"
    png_path = Path(plot) if plot else json_path.with_suffix(".png")
    # SIGTERM unwinds like Ctrl-C, so every child (Triton, Envoy, picker, load generator) is stopped.
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        report = run_scenario(parsed, chosen, Path(keep_dir) if keep_dir else None)
    except (StartupError, OSError) as exc:
        print(f"benchmarks.routing: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        print("benchmarks.routing: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    latencies = report.pop("_latencies_ms")
    report["fleet_settings"] = list(fleet_settings)
    write_latency_cdf(png_path, latencies, f"{parsed.name}: latency cdf, {parsed.load.rate_rps:g} req/s")
    report["plot"] = str(png_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(report), indent=2, allow_nan=False, default=_json_default)
    json_path.write_text(text + "\n", encoding="utf-8")
    load = parsed.load
    print(
        f"scenario {parsed.name}: {len(report['hosts'])} hosts, {load.rate_rps:g} req/s Poisson (seed {load.seed}), "
        f"{load.duration_s:g} s measured after {load.warmup_s:g} s warm-up"
    )
    print(
        "hosts: "
        + ", ".join(
            f"{h['name']} ({h['tier']}, x{h['service_time_factor']:g}: {'+'.join(h['models'])})"
            for h in report["hosts"]
        )
    )
    print(format_table(report["policies"], [h["name"] for h in report["hosts"]]))
    for key, value in report["comparisons"].items():
        print(f"{key}: {value:.3f}")
    print(f"results: {json_path}  plot: {png_path}")
    return 0


def _json_default(value: Any) -> Any:
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m benchmarks.routing`` (see :func:`run_from_args`)."""
    parser.add_argument(
        "--scenario",
        "-s",
        type=Path,
        required=True,
        help=f"scenario file, or the name of one in {shown(SCENARIOS_DIR)}/ (e.g. heterogeneous)",
    )
    default_output = f"{shown(DEFAULT_RESULTS_DIR)}/routing-NAME-TIME.json"
    parser.add_argument("--output", "-o", type=Path, help=f"JSON results (default {default_output})")
    parser.add_argument("--plot", type=Path, help="latency-CDF PNG (default: the JSON path with .png)")
    parser.add_argument(
        "--policies", nargs="+", choices=[p.value for p in Policy], help="run only these (default: the scenario's)"
    )
    parser.add_argument("--keep-dir", type=Path, help="keep logs and configs here instead of a deleted temp dir")
    parser.add_argument(
        "--fleet",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a fleet-file key of the scenario (dotted, e.g. picker.workers=2); repeatable",
    )


def run_from_args(args: argparse.Namespace) -> int:
    return run(args.scenario, args.output, args.plot, args.policies, args.keep_dir, args.fleet)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.routing", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    quiet_logs()
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
