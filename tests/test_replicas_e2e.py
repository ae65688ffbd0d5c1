"""Two picker replicas on the real stack: ``extproc up``'s picker publishes its telemetry (the leader), a second
picker (a leader with two workers) with its own Envoy follows it (``picker.replicas``), the same three Triton
hosts behind both, and they share their loads (``share_load``): each counts the other's picks and Envoy
counts. The follower's scrapes of the hosts' metrics go through counting proxies: none while it follows;
when the leader is killed under load it scrapes itself within takeover_after_ms, and nothing fails through
its Envoy; when the leader is back it follows again."""

from __future__ import annotations

import copy
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.ports import envoy_base_id, free_ports
from tests.stack import (
    REPO,
    Load,
    MixEntry,
    ProcessSpec,
    Stack,
    http_status,
    kill_and_wait,
    launch,
    local_fleet,
    pid_of,
    process_spec,
    spawn,
    start_envoy,
    start_stack,
    stop_processes,
    stop_stack,
    wait_for,
)

pytestmark = pytest.mark.e2e

TAKEOVER_MS = 1000
MIX = (MixEntry("http", "embed_normalize", "INPUT", (1, 4)), MixEntry("grpc", "embed_normalize", "INPUT", (1, 4)))
RATE_RPS = 30


class _CountingProxy(http.server.ThreadingHTTPServer):
    """A host's metrics page, forwarded, with the time of every request."""

    def __init__(self, port: int, target_port: int) -> None:
        self.target = f"http://127.0.0.1:{target_port}/metrics"
        self.times: list[float] = []
        super().__init__(("127.0.0.1", port), _Forward)

    def count(self, since: float, until: float = float("inf")) -> int:
        return sum(1 for t in list(self.times) if since <= t < until)


class _Forward(http.server.BaseHTTPRequestHandler):
    server: _CountingProxy

    def do_GET(self) -> None:
        self.server.times.append(time.time())
        with urllib.request.urlopen(self.server.target, timeout=5) as response:
            body = response.read()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@dataclass
class Replicas:
    leader: Stack
    follower: Stack  # the follower's fleet and run directory (its process: the test's, below)
    proxies: list[_CountingProxy]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def follower_log(self) -> list[dict[str, Any]]:
        lines = (self.follower.run_dir / "logs" / "picker.log").read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.follower_log() if e.get("event") == name]

    def scrapes(self, since: float, until: float = float("inf")) -> int:
        return sum(p.count(since, until) for p in self.proxies)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    run_dir = tmp_path_factory.mktemp("leader")
    token = run_dir / "replicas.token"
    token.write_text("a-secret-that-both-replicas-share\n")
    token.chmod(0o600)
    (publish_port,) = free_ports(1)
    replicas = {"token_file": str(token), "takeover_after_ms": TAKEOVER_MS, "share_load": True}
    data = local_fleet(run_dir, replicas={**replicas, "publish": f"127.0.0.1:{publish_port}"})
    leader = start_stack(run_dir, data)
    follower_dir = tmp_path_factory.mktemp("follower")
    proxies: list[_CountingProxy] = []
    processes: list[subprocess.Popen[bytes]] = []
    try:
        follower_data = _follower_fleet(data, run_dir, follower_dir, replicas, f"127.0.0.1:{publish_port}")
        for host, original in zip(follower_data["hosts"], data["hosts"], strict=True):
            proxy = _CountingProxy(host["metrics_port"], original["metrics_port"])
            threading.Thread(target=proxy.serve_forever, daemon=True).start()
            proxies.append(proxy)
        config = follower_dir / "fleet.yaml"
        config.write_text(yaml.safe_dump(follower_data, sort_keys=False))
        argv = (sys.executable, "-m", "extproc", "--log-format", "json", "serve", "--config", str(config))
        processes.append(launch(ProcessSpec(argv, dict(os.environ), str(REPO)), follower_dir / "logs" / "picker.log"))
        follower = Stack(follower_data, follower_dir, leader.process)
        ready = follower.metrics_url.replace("/metrics", "/ready")
        wait_for(lambda: http_status(ready) == 200, 60, "the follower picker to be ready")
        processes.append(start_envoy(follower_dir, follower_data))
        yield Replicas(leader, follower, proxies, processes)
    finally:
        stop_processes(processes)
        for proxy in proxies:
            proxy.shutdown()
            proxy.server_close()
        stop_stack(leader)


def _follower_fleet(
    data: dict[str, Any], leader_dir: Path, run_dir: Path, replicas: dict[str, Any], leader: str
) -> dict[str, Any]:
    """The leader's fleet for a second replica: its own picker (with workers) and Envoy ports and run
    directory, the same hosts (their metrics behind counting proxies), following the leader."""
    follower = copy.deepcopy(data)
    ports = iter(free_ports(len(follower["hosts"]) + 3))
    for host in follower["hosts"]:
        host["metrics_port"] = next(ports)
    follower["runtime_dir"] = str(run_dir)
    follower["admin_key_file"] = str(leader_dir / "admin.key")  # the key `extproc up` made for the hosts
    # A leader and two workers: the leader holds the channel and relays picks between it and the workers.
    follower["picker"].update(
        listen=f"unix:{run_dir}/picker.sock",
        metrics_port=next(ports),
        replicas={**replicas, "follow": leader},
        workers=2,
    )
    envoy = follower["envoy"]
    envoy["listener"]["port"], envoy["admin"]["port"] = next(ports), next(ports)
    envoy["tls"] = None
    envoy["base_id"] = envoy_base_id()
    return follower


def _peer_metrics(stack: Stack) -> dict[str, float]:
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as response:
        text = response.read().decode()
    return {
        sample.name + "".join(f":{v}" for v in sample.labels.values()): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("extproc_peer_")
        for sample in family.samples
    }


def test_each_replica_counts_the_others_picks(replicas: Replicas) -> None:
    """Under load through both Envoys, each picker hears the other and applies its picks, and its view of a
    host holds the other's part of the count."""
    before = [_peer_metrics(stack) for stack in (replicas.leader, replicas.follower)]
    loads = [Load(stack, MIX, RATE_RPS, duration_s=3) for stack in (replicas.leader, replicas.follower)]
    try:
        results = [load.result() for load in loads]
    finally:
        for load in loads:
            load.kill()
    for result in results:
        assert result.failed == 0 and result.lost == 0, result.describe()
    for stack, earlier, other in zip((replicas.leader, replicas.follower), before, reversed(results), strict=True):
        after = _peer_metrics(stack)  # a single picker publishes its counters as /metrics is read
        applied = after["extproc_peer_picks_total:applied"] - earlier.get("extproc_peer_picks_total:applied", 0.0)
        # Every request the other replica's Envoy routed was one of its picks (retries aside).
        assert applied >= other.sent * 0.9, (applied, other.describe())
        assert after["extproc_peer_picks_total:lost"] == earlier.get("extproc_peer_picks_total:lost", 0.0)
        assert after["extproc_peer_replicas"] == 1.0
        views = stack.picker_status()["hosts"].values()
        assert all(view["peer_in_flight"] is not None for view in views), views


def test_the_follower_scrapes_nothing_takes_over_and_follows_again(replicas: Replicas) -> None:
    assert replicas.events("telemetry_following"), replicas.follower_log()[-20:]
    follower_load = Load(replicas.follower, MIX, RATE_RPS, duration_s=12)
    leader_load = Load(replicas.leader, MIX, RATE_RPS, duration_s=12)
    try:
        follower_load.sleep_until(1)
        following_from = time.time()
        follower_load.sleep_until(4)
        following_until = time.time()
        pid = pid_of(replicas.leader, "picker")
        spec = process_spec(pid)
        killed_at = time.time()
        kill_and_wait(pid)
        wait_for(lambda: replicas.scrapes(killed_at) > 0, TAKEOVER_MS / 1000 + 3, "the follower to scrape itself")
        took_over = min(t for p in replicas.proxies for t in p.times if t >= killed_at) - killed_at
        follower_load.sleep_until(7)
        spawn(replicas.leader, "picker", spec)  # the leader again, as its Deployment would restart it
        follower_result = follower_load.result()
        leader_result = leader_load.result()
    finally:
        follower_load.kill()
        leader_load.kill()
    # The follower follows again once the restarted leader's snapshots have come for takeover_after_ms.
    wait_for(lambda: bool(replicas.events("telemetry_leader_back")), 30, "telemetry_leader_back", interval_s=0.2)
    back_at = time.time()
    scraping = [t for p in replicas.proxies for t in p.times if killed_at <= t < back_at - 0.5]
    own_rate = len(scraping) / len(replicas.proxies) / max(0.5, max(scraping) - min(scraping))
    time.sleep(0.5)
    settled = time.time()
    time.sleep(2.0)
    after_back = replicas.scrapes(settled)
    following_rate = replicas.scrapes(following_from, following_until) / len(replicas.proxies) / 3.0
    print(
        f"\nTriton metrics requests per host per second from the follower: {following_rate:.2f} while following, "
        f"{own_rate:.2f} while scraping itself (as an independent picker); took over {took_over:.2f} s after "
        f"the leader's SIGKILL; follower load {follower_result.describe()}; leader load {leader_result.describe()}"
    )
    assert replicas.scrapes(following_from, following_until) == 0
    assert took_over <= TAKEOVER_MS / 1000 + 1.5
    assert follower_result.failed == 0 and follower_result.lost == 0, follower_result.describe()
    assert after_back == 0, f"{after_back} scrapes after the follower followed again"
    assert replicas.events("telemetry_leader_lost")
