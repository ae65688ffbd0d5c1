"""Envoy's per-endpoint stats as the picker's source of requests in flight (extproc.telemetry.envoy_admin,
extproc.telemetry.collector), against pages recorded from Envoy 1.40:

- envoy_endpoint_stats.txt: ``GET`` STATS_QUERY with clusters triton_gpu_http (127.0.0.1:18000 with one
  slow request in flight, 127.0.0.1:18002 with two) and triton_gpu_grpc ([::1]:18001), all healthy;
- envoy_endpoint_stats_unhealthy.txt: the same after 127.0.0.1:18002 stopped and failed its health check.

The collector reads them from a local HTTP server serving those pages' format; the real gateway's agreement
with /clusters is in tests/test_faults.py."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import pytest

from extproc.datapath.datastore import Datastore
from extproc.telemetry.collector import TelemetryCollector
from extproc.telemetry.envoy_admin import STATS_QUERY, EndpointStatus, EnvoyAdminError, parse_endpoint_stats
from tests.test_telemetry import Stack, stack  # noqa: F401  (the fixture)

DATA = Path(__file__).parent / "data"


def stats_page(endpoints: Mapping[tuple[str, str, int], tuple[int, int, bool]]) -> str:
    """STATS_QUERY's answer as Envoy writes it: {(cluster, ip, port): (rq_active, rq_total, healthy)}."""
    members: dict[str, list[int]] = {}
    lines: list[str] = []
    for (cluster, ip, port), (active, total, healthy) in endpoints.items():
        counts = members.setdefault(cluster, [0, 0])
        counts[0] += healthy
        counts[1] += 1
        address = f"[{ip.replace(':', '_')}]" if ":" in ip else ip
        prefix = f"cluster.{cluster}.endpoint.{address}_{port}"
        lines += [f"{prefix}.rq_total: {total}", f"{prefix}.rq_active: {active}"]
    head = [
        f"cluster.{cluster}.membership_{name}: {value}"
        for cluster, (healthy, total) in members.items()
        for name, value in (("healthy", healthy), ("total", total))
    ]
    return "\n".join(head + lines) + "\n"


RECORDED = {
    ("triton_gpu_grpc", "::1", 18001): (0, 0, True),
    ("triton_gpu_http", "127.0.0.1", 18000): (1, 2, True),
    ("triton_gpu_http", "127.0.0.1", 18002): (2, 2, True),
}


def test_the_fake_page_is_envoys() -> None:
    recorded = (DATA / "envoy_endpoint_stats.txt").read_text()
    assert stats_page(RECORDED) == recorded
    down = {**RECORDED, ("triton_gpu_http", "127.0.0.1", 18000): (0, 2, True)}
    down[("triton_gpu_http", "127.0.0.1", 18002)] = (0, 2, False)
    assert stats_page(down) == (DATA / "envoy_endpoint_stats_unhealthy.txt").read_text()


def test_parse_the_recorded_pages() -> None:
    keys: dict[str, str] = {}
    stats = parse_endpoint_stats((DATA / "envoy_endpoint_stats.txt").read_text(), keys)
    assert stats.all_healthy
    assert stats.endpoints == {
        "127.0.0.1:18000": EndpointStatus(rq_active=1, rq_total=2),
        "127.0.0.1:18002": EndpointStatus(rq_active=2, rq_total=2),
        "[::1]:18001": EndpointStatus(),
    }
    assert keys == {
        "127.0.0.1_18000": "127.0.0.1:18000",
        "127.0.0.1_18002": "127.0.0.1:18002",
        "[__1]_18001": "[::1]:18001",
    }
    unhealthy = parse_endpoint_stats((DATA / "envoy_endpoint_stats_unhealthy.txt").read_text(), keys)
    assert not unhealthy.all_healthy and len(unhealthy.endpoints) == 3 and len(keys) == 3


def test_an_endpoint_in_two_clusters_is_summed_and_membership_says_unhealthy() -> None:
    page = stats_page(
        {("triton_gpu_http", "10.0.0.7", 8000): (2, 5, True), ("triton_cpu_http", "10.0.0.7", 8000): (1, 1, True)}
    )
    assert parse_endpoint_stats(page).endpoints == {"10.0.0.7:8000": EndpointStatus(rq_active=3, rq_total=6)}
    # An outlier ejection or a failed health check takes a host out of its cluster's healthy members.
    ejected = page.replace("triton_cpu_http.membership_healthy: 1", "triton_cpu_http.membership_healthy: 0")
    assert not parse_endpoint_stats(ejected).all_healthy


def test_what_the_filter_would_not_keep_is_ignored() -> None:
    page = stats_page({("triton_gpu_http", "10.0.0.7", 8000): (2, 5, True)})
    noise = "server.live: 1\ncluster.other.endpoint.10.0.0.9_80.rq_active: 7\n"
    noise += "cluster.triton_gpu_http.upstream_rq_total: 9\n"
    noise += "cluster.triton_gpu_http.endpoint.10.0.0.7_8000.cx_active: 4\n"
    assert parse_endpoint_stats(noise + page) == parse_endpoint_stats(page)
    assert parse_endpoint_stats("").endpoints == {}
    with pytest.raises(EnvoyAdminError):
        parse_endpoint_stats("cluster.triton_gpu_http.endpoint.nowhere.rq_active: 1\n")


def test_the_endpoint_names_kept_are_bounded() -> None:
    keys = {f"10.0.{i // 256}.{i % 256}_8000": "x" for i in range(200)}
    parse_endpoint_stats(stats_page({("triton_gpu_http", "10.0.0.7", 8000): (0, 0, True)}), keys)
    assert keys == {"10.0.0.7_8000": "10.0.0.7:8000"}


def test_the_query_keeps_what_the_parser_reads() -> None:
    """Envoy matches the filter (RE2; Python's re agrees on this one) against each stat's name."""
    pattern = re.compile(urllib.parse.unquote(STATS_QUERY.partition("filter=")[2]))
    recorded = (DATA / "envoy_endpoint_stats.txt").read_text().splitlines()
    assert all(pattern.search(line.partition(": ")[0]) for line in recorded)
    for other in ("cluster.triton_gpu_http.upstream_rq_active", "cluster.picker.endpoint.1.2.3.4_5.rq_active"):
        assert not pattern.search(other)


# These tests check what one round of refresh_once read: each read may take longer than the stack's 200 ms
# timeout on a machine busy with the rest of the suite (a round once timed out whole there).
_PATIENT: Final = {"request_timeout_ms": 2000, "stale_after_ms": 4000}


async def test_the_collector_reads_clusters_only_when_the_stats_are_not_the_whole_view(stack: Stack) -> None:  # noqa: F811
    fleet = stack.fleet(poll=_PATIENT)
    store = Datastore(fleet)
    a_grpc, b_grpc = stack.grpcs["a"][1], stack.grpcs["b"][1]
    endpoints = {
        ("triton_cpu_http", "127.0.0.1", 1000): (4, 9, True),
        ("triton_cpu_grpc", "127.0.0.1", a_grpc): (1, 2, True),
        ("triton_cpu_grpc", "127.0.0.1", b_grpc): (0, 0, True),
    }
    stack.envoy.also[STATS_QUERY] = lambda: (stats_page(endpoints).encode(), "text/plain")
    async with TelemetryCollector(fleet, store) as collector:
        await collector.refresh_once()
        a, b = store.hosts["a"], store.hosts["b"]
        assert (a.envoy.active, a.envoy.routed, a.envoy.ejected) == (5, 11, False) and b.envoy_at is not None
        assert stack.envoy.requests == 0  # no /clusters
        # A host out of rotation: /clusters says why (the fake's says b's gRPC port was ejected).
        endpoints[("triton_cpu_grpc", "127.0.0.1", b_grpc)] = (0, 0, False)
        await collector.refresh_once()
        assert stack.envoy.requests == 1 and store.hosts["b"].envoy.ejected
        # A host the stats do not list: /clusters too.
        endpoints[("triton_cpu_grpc", "127.0.0.1", b_grpc)] = (0, 0, True)
        del endpoints[("triton_cpu_grpc", "127.0.0.1", a_grpc)], endpoints[("triton_cpu_http", "127.0.0.1", 1000)]
        await collector.refresh_once()
        assert stack.envoy.requests == 2
    assert stack.envoy.also_requests[STATS_QUERY] == 3


async def test_an_envoy_without_endpoint_stats_is_read_through_clusters(stack: Stack) -> None:  # noqa: F811
    """No /stats answer with endpoints in it (404 here; an Envoy whose clusters keep none answers empty):
    /clusters alone, and the stats are not asked again within the retry interval. Each poll, once in the
    datastore, is announced (a leader pushes it to its workers then)."""
    fleet = stack.fleet(poll=_PATIENT)
    store = Datastore(fleet)
    announced: list[int] = []

    def on_poll() -> None:
        announced.append(store.hosts["a"].envoy.active)

    async with TelemetryCollector(fleet, store, on_envoy_poll=on_poll) as collector:
        await collector.refresh_once()
        await collector.refresh_once()
        assert stack.envoy.requests == 2 and store.hosts["a"].envoy.active == 3
        stack.envoy.also[STATS_QUERY] = lambda: (b"", "text/plain")
        await collector.refresh_once()
        assert stack.envoy.requests == 3 and not stack.envoy.also_requests
    assert announced == [3, 3, 3]
