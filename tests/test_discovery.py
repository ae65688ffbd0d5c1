"""DNS discovery of pools against a real DNS server on loopback (tests/dns_server.py): resolution outcomes,
host sets and their changes, failures that keep the last set, config reloads, the picker's switch of fleet
(single and worker) and the pool gauge."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.ports import free_ports
from extproc import discovery as discovery_module
from extproc.app import Picker
from extproc.config import Fleet, parse_fleet
from extproc.datapath.datastore import Datastore
from extproc.datapath.metrics import PickerMetrics
from extproc.discovery import Discovery, DiscoveryError, _resolver, resolve, resolve_pools
from extproc.sharing import apply_snapshot, read_snapshot, snapshot
from tests.dns_server import DnsServer, dns_server

NAME = "triton-gpu.inference.svc.cluster.local"

LogList = list[MutableMapping[str, Any]]


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with dns_server({NAME: ["10.0.0.7", "10.0.0.5"]}) as running:
        yield running


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[LogList]:
    with structlog.testing.capture_logs() as captured:
        monkeypatch.setattr(discovery_module, "log", structlog.get_logger(discovery_module.__name__))
        yield captured


def fleet_data(server: DnsServer, tmp_path: Path | None = None, **pool: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "hosts": [{"name": "cpu-a", "address": "10.0.0.1", "tier": "cpu"}],
        "pools": [{"name": "gpu", "dns": NAME, "tier": "gpu", "http_port": 9000, "refresh_s": 0.1, **pool}],
        "dns_resolvers": [server.address],
    }
    if tmp_path is not None:
        metrics_port, envoy_admin = free_ports(2)
        data["runtime_dir"] = str(tmp_path)
        data["picker"] = {"listen": f"unix:{tmp_path}/picker.sock", "metrics_port": metrics_port}
        data["envoy"] = {"admin": {"port": envoy_admin}, "tls": None}
    return data


def fleet(server: DnsServer, tmp_path: Path | None = None, **pool: Any) -> Fleet:
    return parse_fleet(fleet_data(server, tmp_path, **pool))


async def test_resolve_outcomes(server: DnsServer) -> None:
    resolver = _resolver((server.address,))
    assert await resolve(resolver, NAME) == {"10.0.0.5", "10.0.0.7"}
    assert await resolve(resolver, NAME.upper() + ".") == {"10.0.0.5", "10.0.0.7"}
    server.set("empty.example", [])  # the name exists, without an A record
    assert await resolve(resolver, "empty.example") == frozenset()
    assert await resolve(resolver, "nothing.example") == frozenset()  # NXDOMAIN
    server.failing = True
    with pytest.raises(DiscoveryError, match=r"SERVFAIL|NoNameservers"):
        await resolve(resolver, NAME)
    server.failing, server.silent = False, True
    with pytest.raises(DiscoveryError, match="Timeout"):
        await resolve(resolver, NAME)


async def test_pool_hosts_follow_the_records(server: DnsServer, logs: LogList) -> None:
    discovery = Discovery(fleet(server))
    assert not discovery.hosts and discovery.counts == {"gpu": 0}
    assert await discovery.refresh_once()
    assert [(h.name, h.address, h.http_port, h.grpc_port, h.tier.value) for h in discovery.hosts] == [
        ("gpu-10-0-0-5", "10.0.0.5", 9000, 8001, "gpu"),
        ("gpu-10-0-0-7", "10.0.0.7", 9000, 8001, "gpu"),
    ]
    assert not await discovery.refresh_once()  # same answer: no change
    server.set(NAME, ["10.0.0.7", "10.0.0.9"])
    assert await discovery.refresh_once()
    assert [h.name for h in discovery.hosts] == ["gpu-10-0-0-7", "gpu-10-0-0-9"]
    assert discovery.counts == {"gpu": 2}
    changes = [e for e in logs if e["event"] == "pool_hosts_changed"]
    assert changes[-1]["added"] == ["gpu-10-0-0-9"] and changes[-1]["removed"] == ["gpu-10-0-0-5"]


async def test_a_failing_server_keeps_the_last_hosts_an_empty_answer_empties(server: DnsServer, logs: LogList) -> None:
    discovery = Discovery(fleet(server))
    await discovery.refresh_once()
    server.failing = True
    for _ in range(3):
        assert not await discovery.refresh_once()
    assert [h.address for h in discovery.hosts] == ["10.0.0.5", "10.0.0.7"]
    assert [e["event"] for e in logs if "resolution" in e["event"]] == ["pool_resolution_failing"]  # logged once
    server.failing = False
    assert not await discovery.refresh_once()
    assert [e["event"] for e in logs if "resolution" in e["event"]][-1] == "pool_resolution_recovered"
    server.remove(NAME)  # NXDOMAIN: the Service has no ready pod
    assert await discovery.refresh_once()
    assert not discovery.hosts and discovery.counts == {"gpu": 0}


async def test_an_address_of_a_static_host_is_left_out(server: DnsServer, logs: LogList) -> None:
    data = fleet_data(server)
    data["hosts"].append({"name": "static", "address": "10.0.0.5", "tier": "gpu", "http_port": 9000})
    discovery = Discovery(parse_fleet(data))
    await discovery.refresh_once()
    assert [h.name for h in discovery.hosts] == ["gpu-10-0-0-7"]
    assert [e["hosts"] for e in logs if e["event"] == "pool_hosts_shadowed"] == [["gpu-10-0-0-5"]]


async def test_a_reload_keeps_the_hosts_of_unchanged_pools(server: DnsServer) -> None:
    first = Discovery(fleet(server))
    await first.refresh_once()
    server.failing = True  # the new config's first resolution must not be needed
    relabelled = Discovery(fleet(server, labels={"speed": "fast"}, grpc_port=9001), first)
    assert [(h.name, h.grpc_port, h.labels) for h in relabelled.hosts] == [
        ("gpu-10-0-0-5", 9001, {"speed": "fast"}),
        ("gpu-10-0-0-7", 9001, {"speed": "fast"}),
    ]
    assert Discovery(fleet(server, dns="other.example"), first).hosts == ()


async def test_run_resolves_new_pools_at_once_then_every_refresh(server: DnsServer) -> None:
    discovery = Discovery(fleet(server))
    changed = asyncio.Event()

    async def on_change() -> None:
        changed.set()

    task = asyncio.create_task(discovery.run(on_change))
    try:
        await asyncio.wait_for(changed.wait(), timeout=1)  # never resolved: at once
        assert [h.address for h in discovery.hosts] == ["10.0.0.5", "10.0.0.7"]
        changed.clear()
        queries = server.queries
        server.set(NAME, ["10.0.0.8"])
        await asyncio.wait_for(changed.wait(), timeout=2)
        assert [h.address for h in discovery.hosts] == ["10.0.0.8"]
        await asyncio.sleep(0.35)
        assert server.queries - queries >= 3  # every refresh_s (0.1 s), changes or not
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_the_picker_routes_over_discovered_hosts_and_keeps_them_on_reload(
    server: DnsServer, tmp_path: Path
) -> None:
    config = fleet(server, tmp_path)
    discovery = Discovery(config)
    await discovery.refresh_once()
    picker = Picker(config, "single", 0, discovery)
    try:
        assert set(picker.datastore.hosts) == {"cpu-a", "gpu-10-0-0-5", "gpu-10-0-0-7"}
        picker.datastore.hosts["gpu-10-0-0-7"].draining = True  # live state, to be adopted
        server.set(NAME, ["10.0.0.7", "10.0.0.8"])
        assert await discovery.refresh_once()
        await picker.rediscovered()
        assert set(picker.datastore.hosts) == {"cpu-a", "gpu-10-0-0-7", "gpu-10-0-0-8"}
        assert picker.datastore.hosts["gpu-10-0-0-7"].draining
        assert picker.scheduler is not None and picker.fleet.hosts[0].name == "cpu-a"

        server.failing = True  # a reload must keep the discovered hosts without resolving again
        data = fleet_data(server, tmp_path)
        data["hosts"].append({"name": "cpu-b", "address": "10.0.0.2", "tier": "cpu"})
        data["picker"]["metrics_port"] = config.picker.metrics_port
        await picker.reload(parse_fleet(data))
        assert set(picker.datastore.hosts) == {"cpu-a", "cpu-b", "gpu-10-0-0-7", "gpu-10-0-0-8"}
        assert picker.datastore.hosts["gpu-10-0-0-7"].draining
        assert picker.discovery is not discovery and picker.config.hosts[-1].name == "cpu-b"

        del data["pools"]  # pools gone: so are their hosts
        data["envoy"]["fallback_tier"] = "cpu"
        await picker.reload(parse_fleet(data))
        assert set(picker.datastore.hosts) == {"cpu-a", "cpu-b"} and picker.discovery is None
    finally:
        await picker.stop()


async def test_workers_take_the_discovered_hosts_from_the_leaders_snapshot(server: DnsServer, tmp_path: Path) -> None:
    config = fleet(server, tmp_path)
    discovery = Discovery(config)
    await discovery.refresh_once()
    leader = Picker(config, "single", 0, discovery)
    worker = Picker(config, "worker", 0)
    try:
        host = leader.datastore.hosts["gpu-10-0-0-5"]
        host.draining, host.metrics_at = True, 12.5
        sent = read_snapshot(snapshot(leader.datastore, leader.discovered))
        assert set(worker.datastore.hosts) == {"cpu-a"}
        assert sent.discovered is not None
        discovered = sent.discovered
        await worker.use_discovered(discovered)
        generation = worker.datastore.generation
        apply_snapshot(worker.datastore, sent)
        assert worker.datastore.generation > generation, "the worker's scheduler must see the leader's telemetry"
        assert set(worker.datastore.hosts) == set(leader.datastore.hosts)
        assert worker.datastore.hosts["gpu-10-0-0-5"].draining
        assert worker.datastore.hosts["gpu-10-0-0-5"].metrics_at == 12.5
        before = worker.datastore
        await worker.use_discovered(discovered)
        assert worker.datastore is before  # the same hosts again: nothing to switch
    finally:
        await worker.stop()
        await leader.stop()


async def test_the_pool_gauge(server: DnsServer) -> None:
    config = fleet(server)
    discovery = Discovery(config)
    await discovery.refresh_once()
    metrics = PickerMetrics(Datastore(config))
    metrics.use_discovery(discovery)
    assert pool_gauge(metrics) == {"gpu": 2.0}
    server.set(NAME, ["10.0.0.5"])
    await discovery.refresh_once()
    assert pool_gauge(metrics) == {"gpu": 1.0}
    metrics.use_discovery(None)
    assert pool_gauge(metrics) == {}


def pool_gauge(metrics: PickerMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "extproc_pool_hosts"]
    return {s.labels["pool"]: s.value for s in family.samples}


async def test_resolve_pools_for_one_shot_commands(server: DnsServer) -> None:
    config = fleet(server)
    resolved = await resolve_pools(config)
    assert [h.name for h in resolved.hosts] == ["cpu-a", "gpu-10-0-0-5", "gpu-10-0-0-7"]
    assert resolved.pools == config.pools
    no_pools = parse_fleet({"hosts": fleet_data(server)["hosts"], "envoy": {"fallback_tier": "cpu"}})
    assert await resolve_pools(no_pools) is no_pools


def test_extproc_models_talks_to_the_pools_hosts(server: DnsServer, tmp_path: Path) -> None:
    server.set(NAME, ["127.0.0.2"])
    data = fleet_data(server)
    data["pools"][0].update(http_port=free_ports(1)[0])  # nothing listens there
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "models", "list", "--json", "--config", str(config), "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    hosts = json.loads(result.stdout)["hosts"]
    assert set(hosts) == {"cpu-a", "gpu-127-0-0-2"}
    assert "127.0.0.2:8001" in hosts["gpu-127-0-0-2"]["error"]
