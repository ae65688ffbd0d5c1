"""The fleet benchmark (benchmarks/fleet): its emulated Triton pages against the picker's real parsers, the
emulator over the wire, and a small run of the whole benchmark with the real picker and Envoy."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from benchmarks.fleet import pages
from benchmarks.fleet.bench import Settings, run
from benchmarks.fleet.emulator import _chunked_end, serve
from benchmarks.ports import free_ports
from extproc.datapath.datastore import TritonLoad
from extproc.telemetry.repository import RepositoryClient, batching_from_config, index_from_models
from extproc.telemetry.triton_metrics import derive_load, parse_metrics

MODELS = {"embed_normalize", "mlp_classifier", "seq_accumulate", "timed_batch"}


@pytest.mark.parametrize("gpu", [False, True])
def test_recorded_page_parses_and_counters_advance(gpu: bool) -> None:
    template = pages.load_template(gpu)
    assert set(template.models) == MODELS
    first = parse_metrics(template.render({}).decode())
    served = dict.fromkeys(template.models, 50.0)
    second = parse_metrics(template.render(served, rate=100.0).decode())
    assert len(first.series) == len(MODELS) * (2 if gpu else 1)
    assert second.totals.request_success == first.totals.request_success + 200 * (2 if gpu else 1)
    assert second.totals.compute_infer_us > first.totals.compute_infer_us
    load = derive_load(first, second, TritonLoad(), None)
    assert load.exec_ms is not None and load.exec_ms > 0
    if gpu:
        assert second.gpu_memory_total is not None and second.gpu_memory_used is not None
        assert second.gpu_utilization is not None and second.gpu_utilization > (first.gpu_utilization or 0)
    else:
        assert second.gpu_memory_total is None


def test_gpu_page_is_synthesised_from_the_recorded_page() -> None:
    recorded = pages.CPU_PAGE.read_text(encoding="utf-8")
    assert pages.GPU_PAGE.read_text(encoding="utf-8") == pages.gpu_page(recorded)
    assert pages.load_template(True).render({}).decode() == pages.GPU_PAGE.read_text(encoding="utf-8")
    assert pages.load_template(False).render({}).decode() == recorded


def test_recorded_index_and_configs_parse() -> None:
    index = index_from_models(pages.repository_index().models)
    assert set(index.ready) == MODELS
    assert index.known == MODELS | {"crash_probe"}
    configs = pages.model_configs()
    assert set(configs) == MODELS
    batching = {name: batching_from_config(c.config) for name, c in configs.items()}
    assert batching["mlp_classifier"].max_batch == 64
    assert batching["seq_accumulate"].sequence and batching["seq_accumulate"].sequence_slots == 64


def test_chunked_request_bodies_are_framed() -> None:
    # What Envoy forwards once the picker has streamed a REST body: a chunked body, then the next request.
    head = b"POST /v2/models/m/infer HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
    body = b"5\r\nhello\r\n3;x=1\r\nabc\r\n0\r\n\r\n"
    assert _chunked_end(head + body + b"GET /metrics", len(head)) == len(head + body)
    for cut in range(len(body)):
        assert _chunked_end(head + body[:cut], len(head)) == -1


@pytest.mark.e2e
async def test_emulator_over_the_wire() -> None:
    http_port, grpc_port, metrics_port = free_ports(3)
    spec: dict[str, Any] = {
        "rate": 200.0,
        "hosts": [{"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port, "gpu": True}],
    }
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(spec, ready, stop))
    client = RepositoryClient(f"127.0.0.1:{grpc_port}")
    try:
        await asyncio.wait_for(ready.wait(), 10)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            async with session.get(url) as response:
                first = parse_metrics(await response.text())
            await asyncio.sleep(0.2)
            async with session.get(url) as response:
                second = parse_metrics(await response.text())
            async with session.get(f"http://127.0.0.1:{http_port}/v2/health/ready") as response:
                assert response.status == 200
            async with session.get(f"http://127.0.0.1:{http_port}/emulator/stats") as response:
                stats = await response.json()
        assert second.totals.request_success > first.totals.request_success
        assert stats["hosts"][0] == {"metrics": 2, "health": 1}
        index = await client.index(5.0)
        assert set(index.ready) == MODELS
        assert (await client.batching("embed_normalize", 5.0)).max_batch == 32
    finally:
        await client.aclose()
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.mark.e2e
def test_small_fleet_run_sees_every_host_fresh() -> None:
    start = time.monotonic()
    report = run(
        Settings(
            hosts=4,
            rate=20.0,
            duration_s=2.0,
            status_samples=2,
            request_rate=20.0,
            replicas=2,
            decision_samples=True,
        )
    )
    assert time.monotonic() - start < 120
    for phase in ("idle", "load", "requests"):
        result = report[phase]
        ages = result["telemetry_age_s"]
        assert ages["fresh_hosts_min"] == 4
        for source in ("metrics", "index", "envoy"):
            assert ages[source]["max"] <= ages["stale_after_s"]
        assert result["cpu_cores"]["picker"] > 0
        assert result["scrapes_per_host_s"]["http_metrics"]["mean"] > 0
        admin = result["envoy_admin"]
        assert admin["clusters_json_bytes"] > admin["stats_bytes"] > 0
    assert report["load"]["telemetry_age_s"]["hosts_with_exec_ms_min"] == 4
    requests = report["requests"]
    assert requests["requests"]["ok"] == requests["requests"]["requests"] == 40
    assert requests["decision_s"]["count"] >= 40
    assert requests["decision_us"]["n"] >= 40  # every decision, as the picker logged it
    assert "http_other" not in requests["scrapes_per_host_s"]
    # A follower replica takes the publisher's snapshots: the hosts see no more scrapes than with one picker.
    replicas = report["replicas"]
    assert replicas["cpu_cores"]["follower1"] > 0
    alone = report["idle"]["scrapes_per_host_s"]["http_metrics"]["mean"]
    assert replicas["scrapes_per_host_s"]["http_metrics"]["mean"] <= 1.5 * alone
    assert replicas["followers_telemetry_age_s"]["follower1"]["fresh_hosts_min"] == 4
