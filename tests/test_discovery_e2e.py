"""Discovery on the real stack: the GPU tier is a pool whose name a DNS server in this test resolves, two real
Triton hosts on 127.0.0.2 and 127.0.0.3 (same ports), and ``extproc up`` runs the picker and Envoy. Under a
steady REST load, hosts join and leave the pool through DNS alone: no restart and no failed request."""

from __future__ import annotations

import functools
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.ports import envoy_base_id, free_ports
from extproc.sharing import PUSH_INTERVAL_S
from tests.dns_server import DnsServer, dns_server
from tests.stack import (
    REPOSITORY,
    Load,
    MixEntry,
    Stack,
    envoy_stat,
    http_status,
    launch,
    picker_view,
    picks,
    start_stack,
    stop_processes,
    stop_stack,
    triton_spec,
    wait_for,
)

pytestmark = pytest.mark.e2e

NAME = "triton-gpu.inference.test"
A, B = "127.0.0.2", "127.0.0.3"  # Linux routes all of 127/8 to the loopback interface
REFRESH_S = 1.0
MODEL = "embed_normalize"
WORKERS_FOLLOW_S = 10 * PUSH_INTERVAL_S


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with dns_server({NAME: [A]}) as server:
        yield server


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    http, grpc, metrics = free_ports(3)
    return {"http_port": http, "grpc_port": grpc, "metrics_port": metrics}


@pytest.fixture(scope="module")
def tritons(tmp_path_factory: pytest.TempPathFactory, ports: dict[str, int]) -> Iterator[None]:
    """Triton on A and on B, the same ports on each, started by the test (a pool is never launched)."""
    run_dir = tmp_path_factory.mktemp("tritons")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for address in (A, B):
            spec = triton_spec(run_dir, {**ports, "address": address}, [MODEL], ports["metrics_port"])
            processes.append(launch(spec, run_dir / f"triton-{address}.log"))
        for address in (A, B):
            ready = functools.partial(triton_ready, f"http://{address}:{ports['http_port']}/v2/health/ready")
            wait_for(ready, 120, f"Triton on {address}", interval_s=0.25)
        yield
    finally:
        stop_processes(processes)


def triton_ready(url: str) -> bool:
    return http_status(url) == 200


# One picker process, and a leader that resolves the pools for two workers (which get the hosts with the
# telemetry snapshots).
@pytest.fixture(scope="module", params=[1, 2], ids=["one-picker", "two-workers"])
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    dns: DnsServer,
    ports: dict[str, int],
    tritons: None,
) -> Iterator[Stack]:
    dns.set(NAME, [A])
    run_dir = tmp_path_factory.mktemp("pool-stack")
    picker_metrics, listener, admin = free_ports(3)
    fleet: dict[str, Any] = {
        "model_repository": str(REPOSITORY),
        "runtime_dir": str(run_dir),
        "pools": [{"name": "gpu", "dns": NAME, "tier": "gpu", "refresh_s": REFRESH_S, **ports}],
        "dns_resolvers": [dns.address],
        "models": [{"name": MODEL, "tiers": ["gpu"]}],
        "picker": {
            "listen": f"unix:{run_dir}/picker.sock",
            "metrics_port": picker_metrics,
            "log_level": "debug",
            "workers": request.param,
            # Spread over every candidate, so that "both serve" does not depend on the scorers' ties.
            "profile": {"picker": "round_robin"},
        },
        "envoy": {
            "listener": {"port": listener},
            "admin": {"port": admin},
            "tls": None,
            "expose_upstream_host": True,
            "base_id": envoy_base_id(),
        },
    }
    stack = start_stack(run_dir, fleet)
    yield stack
    stop_stack(stack)


def envoy_members(stack: Stack) -> dict[str, dict[str, Any]]:
    """The GPU REST cluster's hosts in Envoy (``ip`` → health flags)."""
    with urllib.request.urlopen(f"{stack.admin_url}/clusters?format=json", timeout=5) as response:
        doc = json.load(response)
    (cluster,) = [c for c in doc["cluster_statuses"] if c["name"] == "triton_gpu_http"]
    return {h["address"]["socket_address"]["address"]: h.get("health_status", {}) for h in cluster["host_statuses"]}


def pool_gauge(stack: Stack) -> float | None:
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith('extproc_pool_hosts{pool="gpu"}'):
                return float(line.split()[-1])
    return None


def test_hosts_join_and_leave_through_dns_under_load(stack: Stack, dns: DnsServer, ports: dict[str, int]) -> None:
    host_a, host_b = f"gpu-{A.replace('.', '-')}", f"gpu-{B.replace('.', '-')}"
    served_a, served_b = f"{A}:{ports['http_port']}", f"{B}:{ports['http_port']}"
    assert set(stack.picker_status()["hosts"]) == {host_a}
    failed_open_before = envoy_stat(stack, "ext_proc.failure_mode_allowed")
    load = Load(stack, [MixEntry("http", MODEL, "INPUT", (1, 4))], rate_rps=30, duration_s=24)
    try:
        load.sleep_until(6)
        added = time.time()
        dns.set(NAME, [A, B])
        # The picker lists the new host at its next resolution and routes to it once its telemetry is in and
        # Envoy has it (healthy).
        joined = added + wait_for(lambda: picker_view(stack, host_b).get("routable", False), 15, "B to be routable")
        assert pool_gauge(stack) == 2
        load.sleep_until(joined - load.start + 6)
        removed = time.time()
        dns.set(NAME, [B])
        gone = removed + wait_for(lambda: host_a not in stack.picker_status()["hosts"], 15, "A to leave the picker")
        # /status is the leader's view; workers take it from the leader's next snapshot push, which a busy
        # machine (the suite runs several modules at once) can hold up for a few intervals.
        gone += WORKERS_FOLLOW_S
        assert pool_gauge(stack) == 1
        # Envoy keeps a host that left DNS while it passes its health checks (eventually consistent
        # discovery): requests in flight to it finish; the picker no longer names it.
        time.sleep(3 * REFRESH_S)
        assert envoy_members(stack)[A].get("pending_dynamic_removal") is True
        result = load.result()
    finally:
        load.kill()

    print(f"B routable {joined - added:.2f} s after DNS added it; A left the picker {gone - removed:.2f} s after")
    assert result.failed == 0 and result.lost == 0, result.describe()
    assert set(result.served(until=added)) == {served_a}
    both = result.served(since=joined + 1, until=removed)
    assert both[served_a] > 10 and both[served_b] > 10, both
    # The picker names only B once A has left it. Envoy's own balancing, where it fails open (its wait for
    # a picker held up on a busy machine ran out), may still pick A while A stays in its cluster.
    assert [p for p in picks(stack, gone) if host_a in p.hosts] == []
    late_on_a = result.served(since=gone)[served_a]
    assert late_on_a <= envoy_stat(stack, "ext_proc.failure_mode_allowed") - failed_open_before, late_on_a
    assert result.served(since=gone)[served_b] > 30
    assert joined - added < 5 * REFRESH_S + 3
    assert gone - removed < 3 * REFRESH_S
