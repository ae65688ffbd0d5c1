"""``picker.workers: 2`` on the real stack: a telemetry leader and two ext_proc workers behind Envoy."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.stack import Stack, children, local_fleet, start_stack, stop_stack, wait_for
from tests.test_e2e import rest

pytestmark = pytest.mark.e2e

BODY = {"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("workers")
    stack = start_stack(run_dir, local_fleet(run_dir, workers=2))
    yield stack
    stop_stack(stack)


def picker_endpoints(stack: Stack) -> dict[str, int]:
    """Requests Envoy sent to each picker worker socket."""
    with urllib.request.urlopen(f"{stack.admin_url}/clusters?format=json", timeout=5) as response:
        doc: dict[str, Any] = json.load(response)
    out = {}
    for cluster in doc["cluster_statuses"]:
        if cluster["name"] != "extproc_picker":
            continue
        for host in cluster["host_statuses"]:
            stats = {s["name"]: int(s.get("value", 0)) for s in host["stats"]}
            out[host["address"]["pipe"]["path"]] = stats.get("rq_total", 0)
    return out


def worker_pids(stack: Stack) -> list[int]:
    return children(stack.pids()["picker"])


def test_both_workers_serve_and_metrics_are_summed(stack: Stack) -> None:
    for _ in range(40):
        status, _, body = rest(stack, "/v2/models/embed_normalize/infer", BODY)
        assert status == 200, body
    counts = picker_endpoints(stack)
    assert len(counts) == 2 and all(n > 0 for n in counts.values()), counts
    pages: list[str] = []

    def decided() -> float:
        with urllib.request.urlopen(stack.metrics_url, timeout=5) as response:
            pages.append(response.read().decode())
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in pages[-1].splitlines()
            if line.startswith("extproc_decisions_total{") and 'model="embed_normalize"' in line
        )

    # More decisions than either worker handled streams: the leader's /metrics sums both workers'. Workers
    # add their decisions to the shared directory once a second: wait up to a few flushes.
    wait_for(lambda: decided() > max(counts.values()), 5, f"more than {counts} decisions in /metrics", interval_s=0.2)
    assert 'extproc_telemetry_age_seconds{host="triton-a",source="metrics"}' in pages[-1]


def test_workers_count_each_others_picks(stack: Stack) -> None:
    """Each worker applies the picks the other made since its last decision and Envoy's last count
    (picker.share_worker_picks): requests in parallel, so that picks fall between two polls."""
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: rest(stack, "/v2/models/embed_normalize/infer", BODY), range(80)))
    assert all(status == 200 for status, _, _ in answers), answers

    def applied() -> float:
        with urllib.request.urlopen(stack.metrics_url, timeout=5) as response:
            page = response.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in page.splitlines()
            if line.startswith('extproc_worker_picks_total{outcome="applied"}')
        )

    wait_for(lambda: applied() >= 5, 5, "the workers' shared picks in /metrics", interval_s=0.2)
    assert (Path(stack.fleet["runtime_dir"]) / "worker-picks").stat().st_mode & 0o777 == 0o600


def test_only_the_leader_scrapes(stack: Stack) -> None:
    log = stack.log("picker")
    roles = [json.loads(line)["role"] for line in log.splitlines() if '"picker_started"' in line]
    assert sorted(roles) == ["leader", "worker", "worker"]
    assert len(worker_pids(stack)) == 2


def test_a_dead_worker_is_replaced_and_nothing_fails(stack: Stack) -> None:
    before = worker_pids(stack)
    os.kill(before[0], signal.SIGKILL)
    failures = 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status, _, _ = rest(stack, "/v2/models/embed_normalize/infer", BODY)
        failures += status != 200
        now = worker_pids(stack)
        if len(now) == 2 and before[0] not in now:
            break
        time.sleep(0.05)
    assert failures == 0
    assert len(worker_pids(stack)) == 2 and before[0] not in worker_pids(stack)
