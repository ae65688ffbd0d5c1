"""Envoy's admin ``GET /clusters?format=json``: what Envoy has in flight to each Triton host, and whether it
has ejected it or failed its health checks.

Shape (Envoy 1.40, the JSON form of ``envoy.admin.v3.Clusters``)::

    {"cluster_statuses": [{"name": "triton_gpu_http",
                           "host_statuses": [{"address": {"socket_address": {"address": "10.0.0.7",
                                                                             "port_value": 8000}},
                                              "stats": [{"name": "cx_total", "value": "12"},
                                                        {"type": "GAUGE", "name": "rq_active", "value": "3"},
                                                        ...],
                                              "health_status": {"failed_outlier_check": true,
                                                                "failed_active_health_check": true,
                                                                "eds_health_status": "HEALTHY"},
                                              ...}]}, ...]}

Proto3 JSON leaves out defaults: a stat whose value is 0 has no ``"value"``, a counter has no ``"type"``,
and a false health flag is absent. 64-bit values are strings. Hosts with a ``pipe`` address (unix
sockets, e.g. the picker's own cluster) have no ``socket_address`` and are skipped.

A cheaper source, where the clusters track per-endpoint stats (``track_cluster_stats.per_endpoint_stats``,
which ``extproc envoy-config`` sets): ``GET`` :data:`STATS_QUERY`, Envoy's text stats filtered to the
in-flight counts of each endpoint of the ``triton_*`` clusters, and their health::

    cluster.triton_gpu_http.membership_healthy: 1
    cluster.triton_gpu_http.membership_total: 2
    cluster.triton_gpu_http.endpoint.10.0.0.7_8000.rq_total: 12
    cluster.triton_gpu_http.endpoint.10.0.0.7_8000.rq_active: 3
    cluster.triton_gpu_http.endpoint.[fd00__7]_8000.rq_total: 0
    cluster.triton_gpu_http.endpoint.[fd00__7]_8000.rq_active: 0

(``:`` in the address is written ``_``.) It does not say which host is out of rotation, or why, so
:func:`parse_endpoint_stats` says whether every cluster has all its members healthy; where one has not,
``/clusters`` tells an outlier ejection from a failed health check.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from extproc.datapath.datastore import Datastore, EnvoyView

TRITON_CLUSTER_PREFIX: Final = "triton_"
# Envoy matches the filter (RE2) against every stat's name; this one keeps 2 per endpoint and 2 per cluster.
STATS_QUERY: Final = "/stats?filter=" + urllib.parse.quote(
    rf"^cluster\.{TRITON_CLUSTER_PREFIX}[^.]*\.(membership_(healthy|total)|endpoint\..*\.(rq_active|rq_total))$",
    safe="",
)


class EnvoyAdminError(ValueError):
    """The document is not Envoy's ``/clusters?format=json``."""


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """One ``ip:port`` as Envoy sees it, summed over the clusters it is a member of."""

    rq_active: int = 0
    rq_pending_active: int = 0
    failed_outlier_check: bool = False
    failed_active_health_check: bool = False
    rq_total: int = 0  # requests ever sent to it (a counter)

    def merge(self, other: EndpointStatus) -> EndpointStatus:
        return EndpointStatus(
            rq_active=self.rq_active + other.rq_active,
            rq_pending_active=self.rq_pending_active + other.rq_pending_active,
            rq_total=self.rq_total + other.rq_total,
            failed_outlier_check=self.failed_outlier_check or other.failed_outlier_check,
            failed_active_health_check=self.failed_active_health_check or other.failed_active_health_check,
        )


def endpoint_key(address: str, port: int) -> str:
    """``ip:port`` exactly as :class:`~extproc.config.HostSpec` spells it (``[v6]:port`` for IPv6)."""
    if ":" in address:
        with contextlib.suppress(ValueError):
            address = str(ipaddress.ip_address(address))
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def _stat(value: Any) -> int:
    # Proto3 JSON writes uint64 as a string; tolerate a number too.
    if value is None:
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EnvoyAdminError(f"stat value {value!r} is not an integer") from None


def parse_clusters(doc: Any, prefix: str = TRITON_CLUSTER_PREFIX) -> dict[str, EndpointStatus]:
    """Per-``ip:port`` status over the clusters whose name starts with ``prefix``.

    ``doc`` is the decoded JSON. An endpoint that is a member of several such clusters (a host's REST
    and gRPC ports are distinct endpoints, but a port may appear in more than one cluster) is summed.
    """
    if not isinstance(doc, dict):
        raise EnvoyAdminError("expected a JSON object")
    clusters = doc.get("cluster_statuses")
    if clusters is None:
        # An Envoy with no clusters at all writes ``{}``.
        if doc:
            raise EnvoyAdminError("no 'cluster_statuses' key: not /clusters?format=json")
        return {}
    if not isinstance(clusters, list):
        raise EnvoyAdminError("'cluster_statuses' is not a list")
    out: dict[str, EndpointStatus] = {}
    for cluster in clusters:
        if not isinstance(cluster, dict):
            raise EnvoyAdminError("a cluster status is not an object")
        name = cluster.get("name")
        if not isinstance(name, str) or not name.startswith(prefix):
            continue
        for host in cluster.get("host_statuses") or ():
            socket = (host.get("address") or {}).get("socket_address")
            if socket is None:
                continue  # pipe (unix socket) or internal address: never a Triton host
            address = socket.get("address")
            port = socket.get("port_value")
            if not isinstance(address, str) or not isinstance(port, int):
                raise EnvoyAdminError(f"cluster {name}: bad socket_address {socket!r}")
            rq_active = rq_pending_active = rq_total = 0
            for stat in host.get("stats") or ():
                stat_name = stat.get("name")
                if stat_name == "rq_active":
                    rq_active = _stat(stat.get("value"))
                elif stat_name == "rq_pending_active":
                    rq_pending_active = _stat(stat.get("value"))
                elif stat_name == "rq_total":
                    rq_total = _stat(stat.get("value"))
            health = host.get("health_status") or {}
            status = EndpointStatus(
                rq_active=rq_active,
                rq_pending_active=rq_pending_active,
                failed_outlier_check=bool(health.get("failed_outlier_check", False)),
                failed_active_health_check=bool(health.get("failed_active_health_check", False)),
                rq_total=rq_total,
            )
            key = endpoint_key(address, port)
            seen = out.get(key)
            out[key] = status if seen is None else seen.merge(status)
    return out


# The lines of STATS_QUERY's answer, each kind found by its literal start, which is quicker than a match of
# every line: (endpoint, "active" or "total", value) and ("healthy" or "total", value).
_ENDPOINT_STAT: Final = re.compile(
    rf"cluster\.{TRITON_CLUSTER_PREFIX}[^.]*\.endpoint\.(\S+)\.rq_(active|total): (\d+)$", re.M
)
_MEMBERSHIP_STAT: Final = re.compile(
    rf"cluster\.{TRITON_CLUSTER_PREFIX}[^.]*\.membership_(healthy|total): (\d+)$", re.M
)


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """What :data:`STATS_QUERY` answered: per-``ip:port`` counts (no health flags), and whether every
    cluster had all its members healthy (only then is that all there is to know)."""

    endpoints: dict[str, EndpointStatus]
    all_healthy: bool


def parse_endpoint_stats(text: str, keys: dict[str, str] | None = None) -> EndpointStats:
    """Parse Envoy's text answer to :data:`STATS_QUERY` (``name: value`` per line; other lines are left
    out). No endpoint in it: the clusters do not track per-endpoint stats (an Envoy configured elsewhere), or
    list no hosts yet. Requests waiting for a connection (``rq_pending_active``) are not in it: they are
    Envoy's for an instant, and only ever told the picker whether the fleet was idle. ``keys``: Envoy's
    spelling of each endpoint → its ``ip:port``, kept by the caller from one answer to the next."""
    counts: dict[str, list[int]] = {}
    for name, stat, value in _ENDPOINT_STAT.findall(text):
        pair = counts.get(name)
        if pair is None:
            pair = counts[name] = [0, 0]
        pair[stat == "total"] += int(value)
    members = [0, 0]
    for stat, value in _MEMBERSHIP_STAT.findall(text):
        members[stat == "total"] += int(value)
    if keys is None:
        keys = {}
    elif len(keys) > 2 * len(counts) + 64:  # endpoints that have left the clusters
        keys.clear()
    out: dict[str, EndpointStatus] = {}
    for name, (active, total) in counts.items():
        key = keys.get(name)
        if key is None:
            key = keys[name] = _endpoint_of(name)
        status = EndpointStatus(rq_active=active, rq_total=total)
        seen = out.get(key)
        out[key] = status if seen is None else seen.merge(status)
    return EndpointStats(out, members[0] == members[1])


def _endpoint_of(name: str) -> str:
    """``ip:port`` of an endpoint as Envoy names it in its stats (``10.0.0.7_8000``, ``[fd00__7]_8000``)."""
    address, _, port = name.rpartition("_")
    if address.startswith("["):
        address = address[1:-1].replace("_", ":")
    try:
        return endpoint_key(address, int(port))
    except ValueError:
        raise EnvoyAdminError(f"endpoint stat name {name!r}: no address and port") from None


def apply_envoy_view(datastore: Datastore, endpoints: Mapping[str, EndpointStatus], now: float) -> list[str]:
    """Write Envoy's view into every host of ``datastore``; return the names of hosts Envoy does not list.

    Per host: ``active`` and ``routed`` are ``rq_active`` and ``rq_total`` summed over its REST and gRPC
    endpoints, ``ejected`` / ``unhealthy`` are set when either endpoint failed outlier detection / active
    health checking. The host's in-flight estimate restarts from Envoy's live count (which includes the
    picks made since), scaled to every gateway's (see :meth:`~extproc.datapath.datastore.HostState.envoy_count`).
    ``envoy_at`` is set for hosts Envoy lists; a host in none of the ``triton_*`` clusters gets an empty
    view and keeps its old ``envoy_at``.
    """
    missing: list[str] = []
    for host in datastore.hosts.values():
        found = [s for key in (host.http_endpoint, host.grpc_endpoint) if (s := endpoints.get(key)) is not None]
        if not found:
            datastore.set_envoy(host, None, now)
            host.reset_estimate(0, now)
            missing.append(host.name)
            continue
        view = EnvoyView(
            active=sum(s.rq_active for s in found),
            ejected=any(s.failed_outlier_check for s in found),
            unhealthy=any(s.failed_active_health_check for s in found),
            routed=sum(s.rq_total for s in found),
        )
        datastore.set_envoy(host, view, now)
        host.reset_estimate(host.envoy_count(view.active), now)
    return missing
