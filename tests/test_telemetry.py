"""Telemetry: the parsers on captured pages, the load maths, Envoy's view applied to a Datastore, NVML
through a fake at the pynvml layer, the collector against real local HTTP and gRPC servers, and its scrapes
over TLS (envoy.upstream_tls) through TLS sidecars in front of a real Triton.

Fixtures in tests/data/:
- triton_metrics_cpu_t0.txt, _t1.txt: two scrapes 50 ms apart of a real Triton 2.51 (nvidia-pytriton
  wheel, CPU only) while 60 requests of batch size 1-3 were queued on a python-backend model that
  batches up to 8 (``add_one``), with a second, idle model.
- triton_metrics_gpu.txt: written by hand in the same format (HELP/TYPE lines and order as Triton
  2.51 writes them) with the ``nv_gpu_*`` families of a GPU build: two GPUs, per-model series labelled
  ``gpu_uuid`` as Triton labels instances that run on a GPU.
- envoy_clusters.json: a real ``GET /clusters?format=json`` of Envoy 1.40 with clusters triton_cpu_http
  (127.0.0.1:37621 with 3 requests in flight; 127.0.0.2:37622 failing its health check and ejected),
  triton_cpu_grpc (two idle hosts) and extproc_picker (a unix-socket host).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pynvml
import pytest
import structlog
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc

from benchmarks.ports import free_ports
from extproc.app import Picker
from extproc.config import ConfigError, Fleet, parse_fleet
from extproc.datapath.datastore import Datastore, HostState, ModelTimes, TrafficShare, TritonLoad
from extproc.telemetry import collector as collector_module
from extproc.telemetry import nvml as nvml_module
from extproc.telemetry import triton_metrics as triton_metrics_module
from extproc.telemetry.collector import TelemetryCollector
from extproc.telemetry.envoy_admin import (
    EndpointStatus,
    EnvoyAdminError,
    apply_envoy_view,
    endpoint_key,
    parse_clusters,
)
from extproc.telemetry.nvml import NvmlReader, parse_visible_devices
from extproc.telemetry.repository import RepositoryClient, index_from_models
from extproc.telemetry.tls import read_triton_tls
from extproc.telemetry.triton_metrics import (
    DRAIN_DRIFT,
    MIN_SHARE,
    SHARE_MIN_DONE,
    SHARE_MIN_INTERVALS,
    SHARE_ONE,
    SMOOTHING,
    Counters,
    MetricsParseError,
    TritonSnapshot,
    counter_delta,
    derive_load,
    parse_metrics,
    traffic_share,
)
from tests.stack import REPO, TcpProxy, http_status, launch, stop_processes, triton_spec, wait_for
from tests.test_security import Pki, make_pki

DATA = Path(__file__).parent / "data"

LogList = list[MutableMapping[str, Any]]


def read(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[LogList]:
    """Structured log events of the telemetry modules. Fresh logger proxies, so that a logger cached by
    an earlier ``extproc.logs.configure()`` in this session does not bypass the capture."""
    with structlog.testing.capture_logs() as captured:
        for module in (collector_module, nvml_module):
            monkeypatch.setattr(module, "log", structlog.get_logger(module.__name__))
        yield captured


# -- a Triton page writer (the format of the captured pages) ----------------------------------------------

_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("nv_inference_request_success", "counter", "Number of successful inference requests, all batch sizes"),
    ("nv_inference_request_failure", "counter", "Number of failed inference requests, all batch sizes"),
    ("nv_inference_count", "counter", "Number of inferences performed (does not include cached requests)"),
    ("nv_inference_exec_count", "counter", "Number of model executions performed (does not include cached requests)"),
    (
        "nv_inference_request_duration_us",
        "counter",
        "Cumulative inference request duration in microseconds (includes cached requests)",
    ),
    (
        "nv_inference_queue_duration_us",
        "counter",
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "counter",
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
    ),
    (
        "nv_inference_pending_request_count",
        "gauge",
        "Instantaneous number of pending requests awaiting execution per-model.",
    ),
)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def triton_page(
    series: Mapping[str, Counters],
    pending: Mapping[str, int] | None = None,
    gpus: Sequence[tuple[str, int, int, float]] = (),
) -> str:
    """A metrics page as Triton 2.51 writes it; ``series`` keys are label sets (``model="m",version="1"``),
    ``gpus`` are (uuid, used bytes, total bytes, utilisation)."""
    pending = pending or {}
    lines: list[str] = []
    for name, kind, help_text in _FAMILIES:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, c in series.items():
            if name == "nv_inference_request_failure":
                model, _, version = labels.partition(",")
                lines += [f"{name}{{{model},reason={r!r},{version}}} 0".replace("'", '"') for r in ("BACKEND", "OTHER")]
                continue
            value = {
                "nv_inference_request_success": c.request_success,
                "nv_inference_count": c.inference_count,
                "nv_inference_exec_count": c.exec_count,
                "nv_inference_request_duration_us": c.queue_us + c.compute_infer_us,
                "nv_inference_queue_duration_us": c.queue_us,
                "nv_inference_compute_infer_duration_us": c.compute_infer_us,
                "nv_inference_pending_request_count": pending.get(labels, 0),
            }[name]
            lines.append(f"{name}{{{labels}}} {_num(value)}")
    if gpus:
        for name, help_text, values in (
            ("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", [g[3] for g in gpus]),
            ("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", [g[2] for g in gpus]),
            ("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", [g[1] for g in gpus]),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            lines += [f'{name}{{gpu_uuid="{g[0]}"}} {_num(v)}' for g, v in zip(gpus, values, strict=True)]
    lines += [
        "# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]",
        "# TYPE nv_cpu_utilization gauge",
        "nv_cpu_utilization 0.25",
    ]
    return "\n".join(lines) + "\n"


M1 = 'model="m1",version="1"'
M2 = 'model="m2",version="1"'


# -- parsing Triton's page --------------------------------------------------------------------------------


def test_parse_real_cpu_page() -> None:
    snap = parse_metrics(read("triton_metrics_cpu_t1.txt"))
    assert snap.series.keys() == {'model="idle_model",version="1"', 'model="add_one",version="1"'}
    assert snap.totals == Counters(
        request_success=41, inference_count=81, exec_count=13, queue_us=2257757, compute_infer_us=312320
    )
    assert snap.pending == 19
    # A CPU-only Triton has no nv_gpu_* series.
    assert (snap.gpu_memory_used, snap.gpu_memory_total, snap.gpu_utilization) == (None, None, None)


def test_parse_gpu_page() -> None:
    snap = parse_metrics(read("triton_metrics_gpu.txt"))
    # One series per (gpu_uuid, model, version): resnet50 runs on both GPUs.
    assert len(snap.series) == 3
    assert snap.totals == Counters(
        request_success=10240 + 9728 + 512,
        inference_count=20480 + 19456 + 512,
        exec_count=1280 + 1216 + 128,
        queue_us=30720000 + 28672000 + 1024000,
        compute_infer_us=81920000 + 77824000 + 3020800,
    )
    assert snap.pending == 17 + 9
    assert snap.gpu_memory_used == 21474836480 + 8589934592
    assert snap.gpu_memory_total == 2 * 85520809984
    assert snap.gpu_utilization == pytest.approx((0.91 + 0.63) / 2)


@pytest.mark.parametrize("name", ["triton_metrics_cpu_t0.txt", "triton_metrics_cpu_t1.txt", "triton_metrics_gpu.txt"])
def test_parse_agrees_with_prometheus_client(name: str) -> None:
    text = read(name)
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[family.name] = sums.get(family.name, 0.0) + sample.value
    snap = parse_metrics(text)
    t = snap.totals
    assert t.request_success == sums["nv_inference_request_success"]
    assert t.inference_count == sums["nv_inference_count"]
    assert t.exec_count == sums["nv_inference_exec_count"]
    assert t.queue_us == sums["nv_inference_queue_duration_us"]
    assert t.compute_infer_us == sums["nv_inference_compute_infer_duration_us"]
    assert snap.pending == sums["nv_inference_pending_request_count"]
    assert snap.gpu_memory_used == sums.get("nv_gpu_memory_used_bytes")


def test_parse_value_forms_and_unrelated_families() -> None:
    text = (
        "# TYPE nv_inference_request_success counter\n"
        'nv_inference_request_success{model="a",version="1"} 116.000000\n'  # older Triton: fixed-point
        'nv_inference_request_success{model="b",version="1"} 1.5e+03 1700000000000\n'  # with a timestamp
        'nv_inference_request_success{model="c",version="1"} NaN\n'  # skipped
        'nv_inference_request_summary_us_count{model="a",version="1"} 99\n'  # a different family
        'nv_inference_request_success_total{model="a",version="1"} 99\n'
        "nv_gpu_utilization 0.5\n"  # no labels
        'nv_gpu_memory_used_bytes{gpu_uuid="GPU-x"} 1024'  # no final newline
    )
    snap = parse_metrics(text)
    assert snap.totals.request_success == 116 + 1500
    assert snap.gpu_utilization == 0.5
    assert snap.gpu_memory_used == 1024
    assert snap.gpu_memory_total is None
    assert parse_metrics("").series == {}


@pytest.mark.parametrize(
    "line",
    ['nv_inference_count{model="a",version="1"} lots', "nv_inference_count", 'nv_inference_count{model="a" 3'],
)
def test_parse_rejects_malformed_lines_of_wanted_families(line: str) -> None:
    with pytest.raises(MetricsParseError):
        parse_metrics(line + "\n")


# -- deriving the load ------------------------------------------------------------------------------------


def test_derive_from_two_real_scrapes() -> None:
    t0 = parse_metrics(read("triton_metrics_cpu_t0.txt"))
    t1 = parse_metrics(read("triton_metrics_cpu_t1.txt"))
    load = derive_load(t0, t1, TritonLoad())
    # 30 requests completed in 10 executions; they waited 2021490 us in the queue in all; the
    # executions they were part of took 158088 us summed per request.
    assert load.queue_ms == pytest.approx(2021490 / 30 / 1000)
    assert load.service_ms == pytest.approx(158088 / 30 * (10 / 30) / 1000)
    assert load.pending == 19


def test_service_time_is_the_per_request_share_of_a_batch() -> None:
    # Measured on Triton 2.51: 64 requests (batch size 1 each) ran in 8 executions of 8 requests,
    # each execution ~43.6 ms; Triton added 43.6 ms to compute_infer for every one of the 64 requests.
    before = TritonSnapshot(series={M1: Counters()})
    after = TritonSnapshot(
        series={M1: Counters(request_success=64, inference_count=64, exec_count=8, compute_infer_us=64 * 43600)}
    )
    load = derive_load(before, after, TritonLoad())
    assert load.service_ms == pytest.approx(43.6 / 8)
    # Unbatched, the share is the whole execution.
    after1 = TritonSnapshot(
        series={M1: Counters(request_success=10, inference_count=10, exec_count=10, compute_infer_us=10 * 5000)}
    )
    assert derive_load(before, after1, TritonLoad()).service_ms == pytest.approx(5.0)


def test_interval_without_completions_keeps_the_previous_estimate() -> None:
    snap = parse_metrics(
        triton_page({M1: Counters(100, 100, 25, 200_000, 400_000)}, pending={M1: 3}, gpus=[("GPU-a", 10, 100, 0.5)])
    )
    last = TritonLoad(queue_ms=7.5, service_ms=2.5)
    load = derive_load(snap, snap, last)
    assert (load.queue_ms, load.service_ms) == (7.5, 2.5)
    # ... while the gauges are always the current ones.
    assert load.pending == 3
    assert (load.gpu_memory_used, load.gpu_memory_total, load.gpu_utilization) == (10, 100, 0.5)
    # No previous scrape: nothing to take a difference of.
    assert derive_load(None, snap, TritonLoad()).queue_ms is None
    assert derive_load(None, snap, last).service_ms == 2.5


def test_service_estimates_are_smoothed_over_intervals() -> None:
    before = parse_metrics(triton_page({M1: Counters(0, 0, 0, 0, 0)}))
    # 20 requests in 10 executions of 6 ms: 6 ms a batch, 3 ms a request.
    after = parse_metrics(triton_page({M1: Counters(20, 20, 10, 0, 20 * 6_000)}))
    load = derive_load(before, after, TritonLoad(service_ms=1.0, exec_ms=2.0))
    assert load.service_ms == pytest.approx(SMOOTHING * 3.0 + (1 - SMOOTHING) * 1.0)
    assert load.exec_ms == pytest.approx(SMOOTHING * 6.0 + (1 - SMOOTHING) * 2.0)


def test_drain_time_remembers_the_best_batching_and_drifts_back() -> None:
    t0 = parse_metrics(triton_page({M1: Counters()}))
    # 40 requests in 5 full batches of 24 ms (3 ms a request), then 10 alone at 10 ms each.
    t1 = parse_metrics(triton_page({M1: Counters(40, 40, 5, 0, 40 * 24_000)}))
    t2 = parse_metrics(triton_page({M1: Counters(50, 50, 15, 0, 40 * 24_000 + 10 * 10_000)}))
    first = derive_load(t0, t1, TritonLoad())
    second = derive_load(t1, t2, first)
    assert first.drain_ms == pytest.approx(3.0)
    assert second.service_ms == pytest.approx(SMOOTHING * 10.0 + (1 - SMOOTHING) * 3.0)
    assert second.drain_ms == pytest.approx(3.0 * DRAIN_DRIFT)


def test_counter_reset_counts_from_zero_and_never_goes_negative() -> None:
    before = parse_metrics(triton_page({M1: Counters(1000, 1000, 250, 5_000_000, 9_000_000)}))
    # Triton restarted: every counter is lower than before.
    after = parse_metrics(triton_page({M1: Counters(20, 20, 10, 100_000, 60_000)}))
    delta = counter_delta(before, after)
    assert delta == Counters(20, 20, 10, 100_000, 60_000)
    load = derive_load(before, after, TritonLoad(queue_ms=99.0))
    assert load.queue_ms == pytest.approx(100_000 / 20 / 1000)
    assert load.service_ms == pytest.approx(60_000 / 20 * (10 / 20) / 1000)
    assert load.exec_ms == pytest.approx(60_000 / 20 / 1000)
    # Restarted and idle since: zero counters, no completions, previous estimate kept, nothing negative.
    idle = parse_metrics(triton_page({M1: Counters()}))
    assert counter_delta(before, idle) == Counters()
    assert derive_load(before, idle, TritonLoad(queue_ms=4.0, service_ms=1.0)).queue_ms == 4.0


def test_unloaded_and_new_models_are_handled_per_series() -> None:
    before = parse_metrics(triton_page({M1: Counters(10, 10, 10, 1000, 10_000), M2: Counters(500, 500, 500, 0, 0)}))
    # m2 was unloaded (its series vanish: the sum over models drops, which is not a restart of m1),
    # and m3 was loaded and served 2 requests.
    m3 = 'model="m3",version="1"'
    after = parse_metrics(triton_page({M1: Counters(14, 14, 14, 1400, 14_000), m3: Counters(2, 2, 2, 200, 2000)}))
    assert counter_delta(before, after) == Counters(6, 6, 6, 600, 6000)


# -- Envoy admin ------------------------------------------------------------------------------------------


def test_parse_real_envoy_clusters() -> None:
    endpoints = parse_clusters(json.loads(read("envoy_clusters.json")))
    # extproc_picker is not a triton_* cluster (and its host is a unix socket).
    assert endpoints == {
        "127.0.0.1:37621": EndpointStatus(rq_active=3, rq_total=6),
        "127.0.0.2:37622": EndpointStatus(failed_outlier_check=True, failed_active_health_check=True),
        "127.0.0.1:37623": EndpointStatus(),
        "127.0.0.2:37624": EndpointStatus(),
    }
    assert parse_clusters(json.loads(read("envoy_clusters.json")), prefix="extproc_") == {}


def test_the_traffic_share_is_envoys_answers_over_tritons_completions() -> None:
    """Four gateways route to a host: Triton completes four times the requests this Envoy gets answered, so
    its live count and its picker's picks each stand for four requests in flight."""
    share, scale = traffic_share(TrafficShare(), 1000, 40.0)
    assert (share.answered_mark, share.answered, share.done, scale) == (1000, 0.0, 0.0, 1.0), "first: a mark"
    answered = 1000
    for _ in range(60):
        answered += 10
        share, scale = traffic_share(share, answered, 40.0)
    assert scale == pytest.approx(4.0)
    assert traffic_share(share, None, 40.0) == (share, scale), "no Envoy count: kept"
    restarted, same = traffic_share(share, 3, 40.0)
    assert (restarted.answered_mark, same) == (3, scale), "Envoy restarted: counted again from its new count"


def test_one_gateway_or_too_little_traffic_leaves_the_count_as_is() -> None:
    seen = TrafficShare(answered_mark=0, intervals=SHARE_MIN_INTERVALS)  # long enough to be believed
    share, scale = traffic_share(seen, 24, 20.0)  # errors: more answered than done
    share, scale = traffic_share(share, 60, 20.0)
    assert scale == 1.0 and share.done > SHARE_MIN_DONE, "a share over 1 is 1"
    _, near_one = traffic_share(seen, round(SHARE_ONE * 100) + 1, 100.0)
    assert near_one == 1.0, "the clocks' offset is not another gateway"
    _, few_scale = traffic_share(seen, 1, SHARE_MIN_DONE / 2)
    assert few_scale == 1.0, "too few completions to tell"
    _, early = traffic_share(TrafficShare(answered_mark=0), 10, 100.0)
    assert early == 1.0, "too few intervals to tell"
    _, tiny = traffic_share(seen, 0, 1000.0)
    assert tiny == 1 / MIN_SHARE, "a share of 0 is clamped"


def test_derive_load_tracks_the_share_from_envoys_count() -> None:
    labels = 'model="m",version="1"'
    snapshots = [
        TritonSnapshot(series={labels: Counters(100.0 * k, 100.0 * k, 10.0 * k, 0.0, 1e6 * k)}) for k in range(11)
    ]
    load = derive_load(None, snapshots[0], TritonLoad(), answered=7)
    assert load.share.answered_mark == 7 and load.envoy_scale == 1.0
    for k in range(1, 11):
        load = derive_load(snapshots[k - 1], snapshots[k], load, answered=7 + 50 * k)
    assert load.envoy_scale == pytest.approx(2.0)
    assert derive_load(snapshots[10], snapshots[10], load).envoy_scale == load.envoy_scale


def test_envoys_count_and_the_picks_are_scaled_to_the_hosts_whole_traffic() -> None:
    store = Datastore(envoy_fleet())
    a = store.hosts["a"]
    store.set_load(a, TritonLoad(envoy_scale=4.0))
    apply_envoy_view(store, parse_clusters(json.loads(read("envoy_clusters.json"))), now=42.0)
    assert (a.envoy.active, a.envoy.routed, a.envoy.answered(), a.estimate) == (3, 6, 3, 12.0)
    a.record_pick(42.0, weight=2)
    assert (a.estimate, a.picks_since_poll) == (20.0, 2)
    assert store.hosts["b"].estimate == 0.0
    # A worker applies the leader's record the same way.
    worker = Datastore(envoy_fleet())
    worker.set_records({"a": store.telemetry(a)})
    assert worker.hosts["a"].estimate == 12.0


def envoy_fleet(**picker: Any) -> Fleet:
    return parse_fleet(
        {
            "hosts": [
                {"name": "a", "address": "127.0.0.1", "http_port": 37621, "grpc_port": 37623, "tier": "cpu"},
                {"name": "b", "address": "127.0.0.2", "http_port": 37622, "grpc_port": 37624, "tier": "cpu"},
                {"name": "c", "address": "127.0.0.3", "tier": "gpu"},
            ],
            "envoy": {"fallback_tier": "cpu"},
            "picker": picker,
        }
    )


def test_apply_real_envoy_view_to_datastore() -> None:
    store = Datastore(envoy_fleet())
    for host in store.hosts.values():
        host.record_pick(41.0, weight=5)
    missing = apply_envoy_view(store, parse_clusters(json.loads(read("envoy_clusters.json"))), now=42.0)
    a, b, c = store.hosts["a"], store.hosts["b"], store.hosts["c"]
    assert (a.envoy.active, a.envoy.ejected, a.envoy.unhealthy, a.envoy_at) == (3, False, False, 42.0)
    assert (b.envoy.active, b.envoy.ejected, b.envoy.unhealthy, b.envoy_at) == (0, True, True, 42.0)
    # c is in no cluster: an empty view, its envoy_at not refreshed, and reported.
    assert missing == ["c"]
    assert c.envoy_at is None and c.envoy.active == 0
    # The poll supersedes the picker's optimistic count: the estimate restarts from Envoy's.
    assert [h.picks_since_poll for h in store.hosts.values()] == [0, 0, 0]
    assert [(h.estimate, h.estimate_at) for h in store.hosts.values()] == [(3.0, 42.0), (0.0, 42.0), (0.0, 42.0)]


def envoy_doc(hosts: Mapping[tuple[str, str, int], tuple[int, bool, bool]]) -> dict[str, Any]:
    """``/clusters?format=json`` as Envoy writes it: {(cluster, ip, port): (rq_active, outlier, hc)}."""
    clusters: dict[str, list[dict[str, Any]]] = {}
    for (cluster, ip, port), (active, outlier, hc) in hosts.items():
        health: dict[str, Any] = {"eds_health_status": "HEALTHY"}
        if hc:
            health["failed_active_health_check"] = True
        if outlier:
            health["failed_outlier_check"] = True
        stats: list[dict[str, Any]] = [{"name": "cx_total", "value": "4"}, {"name": "rq_error"}]
        stats.append({"type": "GAUGE", "name": "rq_active", **({"value": str(active)} if active else {})})
        stats.append({"type": "GAUGE", "name": "rq_pending_active"})
        clusters.setdefault(cluster, []).append(
            {
                "address": {"socket_address": {"address": ip, "port_value": port}},
                "stats": stats,
                "health_status": health,
                "weight": 1,
                "locality": {},
            }
        )
    return {
        "cluster_statuses": [
            {"name": name, "host_statuses": hs, "observability_name": name} for name, hs in clusters.items()
        ]
    }


def test_envoy_view_sums_rest_and_grpc_endpoints() -> None:
    store = Datastore(envoy_fleet())
    doc = envoy_doc(
        {
            ("triton_cpu_http", "127.0.0.1", 37621): (2, False, False),
            ("triton_cpu_grpc", "127.0.0.1", 37623): (5, True, False),
            ("triton_cpu_http", "127.0.0.2", 37622): (1, False, False),
            ("triton_cpu_grpc", "127.0.0.2", 37624): (0, False, True),
            ("other_cluster", "127.0.0.3", 8000): (9, True, True),  # not a triton_* cluster
        }
    )
    assert apply_envoy_view(store, parse_clusters(doc), now=1.0) == ["c"]
    a, b = store.hosts["a"], store.hosts["b"]
    assert (a.envoy.active, a.envoy.ejected, a.envoy.unhealthy) == (7, True, False)
    assert (b.envoy.active, b.envoy.ejected, b.envoy.unhealthy) == (1, False, True)


def test_envoy_ipv6_endpoints_match_hostspec() -> None:
    fleet = parse_fleet({"hosts": [{"name": "v6", "address": "::1", "tier": "gpu"}]})
    store = Datastore(fleet)
    assert endpoint_key("0:0::1", 8000) == store.hosts["v6"].http_endpoint == "[::1]:8000"
    doc = envoy_doc({("triton_gpu_grpc", "::1", 8001): (4, False, False)})
    apply_envoy_view(store, parse_clusters(doc), now=1.0)
    assert store.hosts["v6"].envoy.active == 4


def test_parse_clusters_rejects_other_documents() -> None:
    assert parse_clusters({}) == {}  # an Envoy without clusters
    bad: list[Any] = [[], {"stats": []}, {"cluster_statuses": {}}]
    for doc in bad:
        with pytest.raises(EnvoyAdminError):
            parse_clusters(doc)


# -- repository index -------------------------------------------------------------------------------------

ModelIndex = service_pb2.RepositoryIndexResponse.ModelIndex


def captured_index() -> list[Any]:
    """RepositoryIndex as Triton 2.51 answered it (explicit model control; see repository.py)."""
    return [
        ModelIndex(name="add_one", version="1", state="READY"),
        ModelIndex(name="broken", version="1", state="UNAVAILABLE", reason="Internal: RuntimeError: x"),
        ModelIndex(name="idle_model", version="1", state="UNLOADING"),
        ModelIndex(name="never_loaded"),
        ModelIndex(name="sleep40", version="1", state="READY"),
        ModelIndex(name="sleep40", version="2", state="READY"),
        ModelIndex(name="sleep40", version="3", state="LOADING"),
    ]


def test_index_from_models() -> None:
    index = index_from_models(captured_index())
    assert index.ready == {"add_one": frozenset({"1"}), "sleep40": frozenset({"1", "2"})}
    assert index.known == {"add_one", "broken", "idle_model", "never_loaded", "sleep40"}


class FakeTritonGrpc(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The lowest layer of the repository poll: a real gRPC server answering RepositoryIndex."""

    def __init__(self, models: list[Any]) -> None:
        self.models = models
        self.fail = False
        self.calls = 0

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.calls += 1
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model repository is being polled too hard")
        return service_pb2.RepositoryIndexResponse(models=self.models)


async def start_grpc(servicer: FakeTritonGrpc) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_repository_client_against_a_grpc_server() -> None:
    fake = FakeTritonGrpc(captured_index())
    server, port = await start_grpc(fake)
    client = RepositoryClient(f"127.0.0.1:{port}")
    try:
        index = await client.index(timeout_s=2.0)
        assert index.ready["add_one"] == {"1"}
        fake.fail = True
        with pytest.raises(Exception, match=r"UNAVAILABLE|being polled"):
            await client.index(timeout_s=2.0)
    finally:
        await client.aclose()
        await server.stop(None)


# -- NVML (faked at the pynvml layer) ---------------------------------------------------------------------


class FakeNvml:
    """Stands in for libnvidia-ml behind pynvml's functions."""

    def __init__(self, memory: list[tuple[int, int]], init_error: int | None = None) -> None:
        self.memory = memory  # (used, total) per device index
        self.init_error = init_error
        self.inits = 0
        self.lost: set[int] = set()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(pynvml, "nvmlInit", self.init)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: len(self.memory))
        monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", self.handle)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", self.memory_info)

    def init(self) -> None:
        self.inits += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def handle(self, index: int) -> int:
        if not 0 <= index < len(self.memory):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def memory_info(self, handle: int) -> SimpleNamespace:
        if handle in self.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        used, total = self.memory[handle]
        return SimpleNamespace(used=used, total=total, free=total - used)


GiB = 1024**3


def test_nvml_sums_memory_over_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([(10 * GiB, 80 * GiB), (30 * GiB, 80 * GiB)])
    fake.install(monkeypatch)
    reader = NvmlReader(from_env=False)
    reading = reader.read()
    assert reading is not None
    assert (reading.memory_used, reading.memory_total, reading.devices) == (40 * GiB, 160 * GiB, 2)
    # Utilisation was not faked: pynvml's own function raises (no library), which only drops utilisation.
    assert reading.utilization is None
    fake.memory[0] = (20 * GiB, 80 * GiB)
    again = reader.read()
    assert again is not None and again.memory_used == 50 * GiB
    assert fake.inits == 1  # nvmlInit once
    reader.close()


def test_nvml_utilization_when_the_driver_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([(1, 2), (1, 2)]).install(monkeypatch)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", lambda h: SimpleNamespace(gpu=[90, 30][h], memory=0))
    reading = NvmlReader(from_env=False).read()
    assert reading is not None and reading.utilization == pytest.approx(0.6)


def test_nvml_honours_a_visible_devices_list(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([(1 * GiB, 8 * GiB), (2 * GiB, 8 * GiB), (4 * GiB, 8 * GiB)]).install(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    reading = NvmlReader().read()
    assert reading is not None and (reading.memory_used, reading.devices) == (5 * GiB, 2)


def test_parse_visible_devices() -> None:
    assert parse_visible_devices(None) is None
    assert parse_visible_devices("") == []
    assert parse_visible_devices(" 0, 3 ") == [0, 3]
    assert parse_visible_devices("GPU-5e9c3b1a-7f4d,1") == ["GPU-5e9c3b1a-7f4d", 1]
    assert parse_visible_devices("MIG-0f1e2d3c") is None  # not mapped: read every device


def test_nvml_without_driver_logs_once_and_disables(monkeypatch: pytest.MonkeyPatch, logs: LogList) -> None:
    fake = FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    fake.install(monkeypatch)
    reader = NvmlReader(from_env=False)
    assert reader.read() is None
    assert reader.read() is None
    assert reader.disabled and fake.inits == 1
    events = [e for e in logs if e["event"].startswith("nvml")]
    assert len(events) == 1 and events[0]["log_level"] == "info"
    assert "Not Found" in events[0]["error"]


def test_nvml_driver_not_loaded_and_no_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED).install(monkeypatch)
    assert NvmlReader(from_env=False).read() is None
    FakeNvml([]).install(monkeypatch)  # a driver but no GPU
    reader = NvmlReader(from_env=False)
    assert reader.read() is None and reader.disabled


# -- the collector against local servers ------------------------------------------------------------------


class FakeHttp:
    """One HTTP server on 127.0.0.1 (ephemeral port) answering one path: ``ok``, ``error`` (500) or
    ``hang`` (never answers until released). ``also``: more paths, each always answered (counted in
    ``also_requests``); any other path is 404."""

    def __init__(self, path: str, body: Callable[[], tuple[bytes, str]]) -> None:
        self.path = path
        self.body = body
        self.also: dict[str, Callable[[], tuple[bytes, str]]] = {}
        self.also_requests: Counter[str] = Counter()
        self.mode = "ok"
        self.requests = 0
        self.hung = 0
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        if request.path != self.path:
            other = self.also.get(request.path_qs)
            if other is None:
                return web.Response(status=404, text="not found")
            self.also_requests[request.path_qs] += 1
            data, content_type = other()
            return web.Response(body=data, content_type=content_type)
        self.requests += 1
        if self.mode == "error":
            return web.Response(status=500, text="internal error")
        if self.mode == "hang":
            self.hung += 1
            await self._release.wait()
        data, content_type = self.body()
        return web.Response(body=data, content_type=content_type)

    def set_mode(self, mode: str) -> None:
        if self.mode == "hang":
            self._release.set()
            self._release = asyncio.Event()
        self.mode = mode

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()


class FakeTriton:
    """A Triton host's metrics: every scrape, 8 more requests done in one 40 ms execution, each having
    waited 5 ms; 2 pending (while ``busy``; idle: nothing moves, nothing pending). ``gpu`` adds nv_gpu_*
    series."""

    def __init__(self, gpu: tuple[int, int] | None = None) -> None:
        self.done = 0
        self.gpu = gpu
        self.http = FakeHttp("/metrics", self.page)
        self.busy = True  # False: the counters stand still (an idle host)
        self.models = [M1]  # the series' label sets: the model versions loaded

    def page(self) -> tuple[bytes, str]:
        n = self.done
        if self.busy:
            self.done += 8
        series = {labels: Counters(n, n, n // 8, n * 5000, n * 40_000) for labels in self.models}
        gpus = [("GPU-5e9c3b1a", self.gpu[0], self.gpu[1], 0.5)] if self.gpu else []
        return triton_page(series, pending={M1: 2 if self.busy else 0}, gpus=gpus).encode(), "text/plain"


class Stack:
    def __init__(self, tritons: dict[str, FakeTriton], grpcs: dict[str, tuple[FakeTritonGrpc, int]], envoy: FakeHttp):
        self.tritons = tritons
        self.grpcs = grpcs
        self.envoy = envoy

    def fleet(self, poll: dict[str, int] | None = None, **picker: Any) -> Fleet:
        """Polls every 50-60 ms; an idle host and a confirmed index are polled as often unless ``poll`` says
        otherwise."""
        hosts = [
            {
                "name": name,
                "address": "127.0.0.1",
                "http_port": 1000 + i,
                "grpc_port": self.grpcs[name][1],
                "metrics_port": triton.http.port,
                "tier": "cpu",
            }
            for i, (name, triton) in enumerate(self.tritons.items())
        ]
        fast = {"triton_metrics_ms": 50, "idle_metrics_ms": 50, "repository_ms": 60, "confirmed_repository_ms": 60}
        settings = {**fast, "envoy_admin_ms": 50, "nvml_ms": 50, "request_timeout_ms": 200, **(poll or {})}
        return parse_fleet(
            {
                "hosts": hosts,
                "picker": {"poll": settings, **picker},
                "envoy": {"fallback_tier": "cpu", "admin": {"address": "127.0.0.1", "port": self.envoy.port}},
            }
        )


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    tritons = {"a": FakeTriton(), "b": FakeTriton(gpu=(3 * GiB, 16 * GiB))}
    grpcs: dict[str, tuple[FakeTritonGrpc, int]] = {}
    servers: list[grpc.aio.Server] = []
    for name in tritons:
        fake = FakeTritonGrpc([ModelIndex(name="m1", version="1", state="READY"), ModelIndex(name=f"only_{name}")])
        server, port = await start_grpc(fake)
        servers.append(server)
        grpcs[name] = (fake, port)
    ports: dict[str, int] = {}

    def clusters() -> tuple[bytes, str]:
        doc = envoy_doc(
            {
                ("triton_cpu_http", "127.0.0.1", 1000): (2, False, False),
                ("triton_cpu_grpc", "127.0.0.1", ports["a"]): (1, False, False),
                ("triton_cpu_grpc", "127.0.0.1", ports["b"]): (0, True, False),
            }
        )
        return json.dumps(doc).encode(), "application/json"

    envoy = FakeHttp("/clusters", clusters)
    for triton in tritons.values():
        await triton.http.start()
    await envoy.start()
    ports.update({name: port for name, (_, port) in grpcs.items()})
    try:
        yield Stack(tritons, grpcs, envoy)
    finally:
        for triton in tritons.values():
            await triton.http.stop()
        await envoy.stop()
        for server in servers:
            await server.stop(None)


async def until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def stamps(*hosts: HostState) -> list[float]:
    """Every host's metrics_at, index_at and envoy_at; -1 for never."""
    return [-1.0 if t is None else t for h in hosts for t in (h.metrics_at, h.index_at, h.envoy_at)]


def warnings(logs: LogList, event: str, source: str, target: str) -> int:
    return sum(1 for e in logs if e["event"] == event and e.get("source") == source and e.get("target") == target)


async def test_refresh_once_fills_the_datastore(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    fleet = stack.fleet()
    store = Datastore(fleet)
    async with TelemetryCollector(fleet, store) as collector:
        await collector.refresh_once()
        a, b = store.hosts["a"], store.hosts["b"]
        for host in (a, b):
            assert None not in (host.metrics_at, host.index_at, host.envoy_at)
            assert host.ready == {"m1": frozenset({"1"})}
            assert host.known == {"m1", f"only_{host.name}"}
            assert host.load.pending == 2
            assert host.load.service_ms is None  # one scrape: no interval yet
        assert (a.envoy.active, a.envoy.ejected) == (3, False)
        assert (b.envoy.active, b.envoy.ejected) == (0, True)
        assert b.load.gpu_memory_used == 3 * GiB and a.load.gpu_memory_used is None

        await collector.refresh_once()
        # 8 requests in one 40 ms execution, each waited 5 ms.
        assert a.load.queue_ms == pytest.approx(5.0)
        assert a.load.service_ms == pytest.approx(40.0 / 8)
        assert collector.health() == {
            "triton_metrics/a": True,
            "triton_metrics/b": True,
            "repository/a": True,
            "repository/b": True,
            "envoy_admin/envoy": True,
        }


async def test_every_poll_says_the_datastore_changed(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler keeps the candidates it prepared until the datastore's generation moves: a poll that
    wrote without moving it would leave decisions on the telemetry from before."""
    FakeNvml([(5 * GiB, 80 * GiB)]).install(monkeypatch)
    fleet = stack.fleet(nvml_host="b")
    store = Datastore(fleet)
    async with TelemetryCollector(fleet, store, nvml=NvmlReader(from_env=False)) as collector:
        kinds = set()
        for job in collector._jobs:
            before = store.generation
            await job.poll()
            assert store.generation > before, f"{job.kind}/{job.target}"
            kinds.add(job.kind)
        assert kinds == {"triton_metrics", "repository", "envoy_admin", "nvml"}


async def test_collector_runs_through_errors_and_hangs(stack: Stack, logs: LogList) -> None:
    fleet = stack.fleet()
    store = Datastore(fleet)
    collector = TelemetryCollector(fleet, store)
    a, b = store.hosts["a"], store.hosts["b"]
    task = asyncio.create_task(collector.run())
    try:
        # Every timestamp advances while the servers answer.
        await until(lambda: min(stamps(a, b)) > 0)
        marks = stamps(a, b)
        await until(lambda: all(new > old for new, old in zip(stamps(a, b), marks, strict=True)))
        assert a.load.service_ms == pytest.approx(5.0)

        # The loops keep their period: about 10 scrapes of a host in 0.5 s at 50 ms, never a burst.
        before = stack.tritons["a"].http.requests
        await asyncio.sleep(0.5)
        assert 5 <= stack.tritons["a"].http.requests - before <= 12

        # b's metrics answer 500: its metrics_at freezes, a's does not, the collector runs on,
        # and the failure is logged once however many polls fail.
        b_http = stack.tritons["b"].http
        b_http.set_mode("error")
        await until(lambda: b_http.requests > 0 and collector.health()["triton_metrics/b"] is False)
        frozen, a_mark, errors = b.metrics_at, a.metrics_at, b_http.requests
        await until(lambda: b_http.requests >= errors + 4)
        assert b.metrics_at == frozen
        assert a.metrics_at is not None and a_mark is not None and a.metrics_at > a_mark
        assert warnings(logs, "telemetry poll failing", "triton_metrics", "b") == 1

        # b hangs: each poll waits out the 200 ms timeout; no new poll starts while one is waiting.
        b_http.set_mode("hang")
        hung_before = b_http.hung
        await asyncio.sleep(1.0)
        hangs = b_http.hung - hung_before
        assert 2 <= hangs <= 6  # 1.0 s / 0.2 s timeout, not 1.0 s / 50 ms period
        assert b.metrics_at == frozen
        assert not task.done()
        assert warnings(logs, "telemetry poll failing", "triton_metrics", "b") == 1  # still the same outage

        # b recovers: one "recovered" line, and its timestamp moves again.
        b_http.set_mode("ok")
        await until(lambda: b.metrics_at is not None and frozen is not None and b.metrics_at > frozen)
        await until(lambda: warnings(logs, "telemetry poll recovered", "triton_metrics", "b") == 1)

        # Envoy's admin fails: envoy_at freezes; the repository of a fails: a's index_at freezes.
        stack.envoy.set_mode("error")
        stack.grpcs["a"][0].fail = True
        await until(lambda: collector.health()["envoy_admin/envoy"] is False)
        await until(lambda: collector.health()["repository/a"] is False)
        envoy_mark, index_mark, calls = a.envoy_at, a.index_at, stack.grpcs["a"][0].calls
        await until(lambda: stack.grpcs["a"][0].calls >= calls + 3 and stack.envoy.requests >= 3)
        assert (a.envoy_at, a.index_at) == (envoy_mark, index_mark)
        assert warnings(logs, "telemetry poll failing", "envoy_admin", "envoy") == 1
        assert warnings(logs, "telemetry poll failing", "repository", "a") == 1
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await collector.aclose()


async def test_refresh_once_does_not_overlap_a_running_poll(stack: Stack) -> None:
    fleet = stack.fleet()
    store = Datastore(fleet)
    async with TelemetryCollector(fleet, store) as collector:
        b_http = stack.tritons["b"].http
        b_http.set_mode("hang")
        first = asyncio.create_task(collector.refresh_once())
        second = asyncio.create_task(collector.refresh_once())
        start = time.monotonic()
        await asyncio.gather(first, second)
        # The second round waited for the first's hung scrape (200 ms timeout) before scraping b again.
        assert time.monotonic() - start >= 0.35
        # Both rounds scraped b. The fake counts a scrape when its handler thread runs, which on a loaded
        # machine can be after the client's timeout (seen once: 1 of 2 counted at the assertion).
        await until(lambda: b_http.hung == 2)
        assert store.hosts["b"].metrics_at is None and store.hosts["a"].metrics_at is not None


async def test_nvml_overrides_triton_gpu_memory_for_the_sidecar_host(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeNvml([(5 * GiB, 80 * GiB), (7 * GiB, 80 * GiB)])
    fake.install(monkeypatch)
    fleet = stack.fleet(nvml_host="b")
    store = Datastore(fleet)
    b = store.hosts["b"]
    async with TelemetryCollector(fleet, store, nvml=NvmlReader(from_env=False)) as collector:
        await collector.refresh_once()
        await collector.refresh_once()  # whichever of the two polls ends last, NVML's values stand
        assert (b.load.gpu_memory_used, b.load.gpu_memory_total) == (12 * GiB, 160 * GiB)
        assert b.load.service_ms is not None  # the rest of the load is still Triton's
        # A GPU lost: NVML fails, and Triton's nv_gpu_* values are used again.
        fake.lost.add(1)
        await collector.refresh_once()
        await collector.refresh_once()
        assert collector.health()["nvml/b"] is False
        assert b.load.gpu_memory_used == 3 * GiB


async def test_collector_without_nvml_driver_keeps_running(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, logs: LogList
) -> None:
    fake = FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    fake.install(monkeypatch)
    fleet = stack.fleet(nvml_host="b")
    store = Datastore(fleet)
    collector = TelemetryCollector(fleet, store)
    task = asyncio.create_task(collector.run())
    try:
        b = store.hosts["b"]
        await until(lambda: b.metrics_at is not None and b.load.gpu_memory_used == 3 * GiB)
        mark = b.metrics_at
        await until(lambda: b.metrics_at is not None and mark is not None and b.metrics_at > mark)
        assert collector.health()["nvml/b"] is None
        assert fake.inits == 1
        assert [e["log_level"] for e in logs if e["event"].startswith("nvml")] == ["info"]
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await collector.aclose()


async def test_wildcard_admin_address_and_closed_collector(stack: Stack) -> None:
    data = stack.fleet().model_dump(mode="json", exclude={"source"})
    data["envoy"]["admin"]["address"] = "0.0.0.0"
    fleet = parse_fleet(data)
    store = Datastore(fleet)
    async with TelemetryCollector(fleet, store) as collector:
        # Envoy's admin on a wildcard address is polled on loopback.
        assert collector.envoy_url == f"http://127.0.0.1:{stack.envoy.port}/clusters?format=json"
        await collector.refresh_once()
        assert store.hosts["a"].envoy_at is not None
    with pytest.raises(RuntimeError):
        await collector.refresh_once()


async def test_picks_do_not_pile_up_while_envoy_admin_is_unreachable(stack: Stack) -> None:
    fleet = stack.fleet()
    store = Datastore(fleet)
    async with TelemetryCollector(fleet, store) as collector:
        await collector.refresh_once()
        a = store.hosts["a"]
        a.record_pick(store.now(), weight=40)
        await collector.refresh_once()
        assert a.picks_since_poll == 0 and a.estimate == 3  # Envoy's poll superseded them
        await stack.envoy.stop()
        a.envoy_at = store.now() - 60  # Envoy's view has gone stale
        a.record_pick(store.now(), weight=40)
        await collector.refresh_once()
        assert a.picks_since_poll == 0, "a Triton metrics poll resets them once Envoy's view is stale"
        assert a.estimate == a.load.pending


def test_service_times_per_model() -> None:
    m2 = 'model="slow",version="1"'
    before = parse_metrics(triton_page({M1: Counters(), m2: Counters()}))
    # M1: 20 requests in 10 executions of 6 ms; slow: 4 requests, one at a time, 50 ms each.
    after = parse_metrics(triton_page({M1: Counters(20, 20, 10, 0, 20 * 6_000), m2: Counters(4, 4, 4, 0, 4 * 50_000)}))
    load = derive_load(before, after, TritonLoad())
    fast_name = M1.split('"')[1]
    fast, slow = load.models[fast_name], load.models["slow"]
    assert (fast.service_ms, fast.exec_ms, fast.drain_ms) == (3.0, 6.0, 3.0)
    assert (slow.service_ms, slow.exec_ms, slow.drain_ms) == (50.0, 50.0, 50.0)
    # A model with no completions in the next interval keeps its times.
    again = derive_load(after, after, load)
    assert again.models == load.models


def test_a_page_with_still_counters_derives_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle host's next scrape (the same counters) keeps the derived times without taking a difference per
    series, and leaves what the difference of zero would: every model of the page has times, and the
    traffic share counts one more interval."""
    m2 = 'model="new",version="1"'
    before = parse_metrics(triton_page({M1: Counters()}))
    after = parse_metrics(triton_page({M1: Counters(20, 20, 10, 1000, 20 * 6_000), m2: Counters()}))
    load = derive_load(before, after, TritonLoad(), answered=20)
    again = parse_metrics(triton_page({M1: Counters(20, 20, 10, 1000, 20 * 6_000), m2: Counters()}))
    general = derive_load(after, again, dataclasses.replace(load, models={}), answered=20)

    def no_differences(*args: object) -> None:
        raise AssertionError("counters still: no difference per series to take")

    monkeypatch.setattr(triton_metrics_module, "_series_deltas", no_differences)
    still = derive_load(after, again, load, answered=20)
    assert still.models == load.models and set(still.models) == {M1.split('"')[1], "new"}
    assert (still.queue_ms, still.service_ms, still.exec_ms) == (load.queue_ms, load.service_ms, load.exec_ms)
    assert still.share.intervals == load.share.intervals + 1 and still.share.answered_mark == 20
    # Models the last load has no times for get empty ones, as the general case gives them.
    fresh = derive_load(after, again, dataclasses.replace(load, models={}), answered=20)
    assert fresh.models == general.models == {"m1": ModelTimes(), "new": ModelTimes()}


async def test_idle_hosts_and_confirmed_indexes_are_polled_less(stack: Stack) -> None:
    """An idle host (counters still, nothing in flight) is scraped every idle_metrics_ms; a busy one every
    triton_metrics_ms. While the page lists exactly the READY model versions, each scrape confirms the
    index (index_at moves) and the index is read every confirmed_repository_ms; a model version that
    appears on the page has the index read at the next tick."""
    fleet = stack.fleet(poll={"idle_metrics_ms": 400, "confirmed_repository_ms": 2000})
    store = Datastore(fleet)
    collector = TelemetryCollector(fleet, store)
    a, b = store.hosts["a"], store.hosts["b"]
    stack.tritons["b"].busy = False  # and Envoy has nothing in flight on b (a: 3 requests)
    task = asyncio.create_task(collector.run())
    try:
        await until(lambda: min(stamps(a, b)) > 0)
        await asyncio.sleep(0.3)  # past the first scrapes, which count as moved
        scrapes = {name: triton.http.requests for name, triton in stack.tritons.items()}
        index_calls = {name: fake.calls for name, (fake, _) in stack.grpcs.items()}
        index_at = b.index_at
        await asyncio.sleep(1.2)
        scraped = {name: triton.http.requests - scrapes[name] for name, triton in stack.tritons.items()}
        assert scraped["a"] >= 18 and 2 <= scraped["b"] <= 4, scraped  # 50 ms busy, 400 ms idle
        assert b.index_at is not None and index_at is not None and b.index_at > index_at  # confirmed by scrapes
        read = {name: fake.calls - index_calls[name] for name, (fake, _) in stack.grpcs.items()}
        assert read == {"a": 0, "b": 0}, read
        # A new model version on b's page: the page no longer confirms b's index, which is read at once.
        calls = stack.grpcs["b"][0].calls
        stack.tritons["b"].busy = True
        stack.tritons["b"].models = [M1, 'model="m2",version="1"']
        await until(lambda: stack.grpcs["b"][0].calls > calls, within_s=1.0)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await collector.aclose()


async def test_envoy_admin_is_polled_less_while_the_fleet_is_idle(stack: Stack) -> None:
    """While Envoy's last two answers are alike with nothing in flight, no host has anything in flight and
    no host's counters moved, /clusters is read every idle_envoy_admin_ms; a pick of the picker's own has it
    read at the next tick, and traffic that Envoy reports keeps it at envoy_admin_ms."""
    fleet = stack.fleet(poll={"idle_metrics_ms": 400, "idle_envoy_admin_ms": 1000})
    quiet = json.dumps(
        envoy_doc({("triton_cpu_http", "127.0.0.1", 1000 + i): (0, False, False) for i in range(2)})
    ).encode()
    busy = json.dumps(envoy_doc({("triton_cpu_http", "127.0.0.1", 1000): (2, False, False)})).encode()
    envoy = stack.envoy
    envoy.body = lambda: (quiet, "application/json")
    for triton in stack.tritons.values():
        triton.busy = False
    store = Datastore(fleet)
    collector = TelemetryCollector(fleet, store)
    a = store.hosts["a"]
    task = asyncio.create_task(collector.run())
    try:
        await until(lambda: min(stamps(*store.hosts.values())) > 0)
        await asyncio.sleep(0.5)  # past the first scrapes, which count as moved
        polls = envoy.requests
        await asyncio.sleep(2.2)
        assert 1 <= envoy.requests - polls <= 3, envoy.requests - polls  # 1 s idle, not 50 ms

        # Right after an idle poll, a pick: the next 50 ms tick reads Envoy, not the next idle poll.
        polls = envoy.requests
        await until(lambda: envoy.requests > polls, within_s=1.5)
        await asyncio.sleep(0.05)
        polls = envoy.requests
        a.record_pick(store.now())
        await until(lambda: envoy.requests > polls, within_s=0.3)

        # Envoy reports requests in flight: every tick again.
        envoy.body = lambda: (busy, "application/json")
        await until(lambda: a.envoy.active == 2, within_s=1.5)
        polls = envoy.requests
        await asyncio.sleep(0.5)
        assert envoy.requests - polls >= 6, envoy.requests - polls
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await collector.aclose()


async def test_a_follower_polls_its_idle_envoy_at_the_idle_rate(stack: Stack) -> None:
    """A follower replica (not scraping) has no counters of its own: while its Envoy is quiet and nothing is
    in flight by its estimate, /clusters is read every idle_envoy_admin_ms even though the hosts are busy
    elsewhere; its first pick has it read at the next tick, and so does a Triton queue the leader
    published."""
    fleet = stack.fleet(poll={"idle_metrics_ms": 400, "idle_envoy_admin_ms": 1000})
    quiet = json.dumps(
        envoy_doc({("triton_cpu_http", "127.0.0.1", 1000 + i): (0, False, False) for i in range(2)})
    ).encode()
    stack.envoy.body = lambda: (quiet, "application/json")
    envoy = stack.envoy
    store = Datastore(fleet)
    collector = TelemetryCollector(fleet, store, scraping=False)
    a = store.hosts["a"]
    task = asyncio.create_task(collector.run())
    try:
        await until(lambda: a.envoy_at is not None)
        await asyncio.sleep(0.2)  # two alike answers
        polls = envoy.requests
        await asyncio.sleep(2.2)
        assert 1 <= envoy.requests - polls <= 3, envoy.requests - polls  # 1 s idle, not 50 ms
        assert all(triton.http.requests == 0 for triton in stack.tritons.values())

        # Right after an idle poll, the follower's first pick: the next 50 ms tick reads Envoy.
        polls = envoy.requests
        await until(lambda: envoy.requests > polls, within_s=1.5)
        await asyncio.sleep(0.05)
        polls = envoy.requests
        a.record_pick(store.now())
        await until(lambda: envoy.requests > polls, within_s=0.3)

        # Idle again (Envoy's count restarted the estimate at 0); then the leader publishes a queue on a.
        await asyncio.sleep(0.2)
        polls = envoy.requests
        await until(lambda: envoy.requests > polls, within_s=1.5)
        await asyncio.sleep(0.05)
        polls = envoy.requests
        store.set_load(a, TritonLoad(pending=3))
        await until(lambda: envoy.requests > polls, within_s=0.3)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await collector.aclose()


@pytest.mark.parametrize(
    ("poll", "problem"),
    [
        ({"envoy_admin_ms": 500, "idle_envoy_admin_ms": 400}, "idle_envoy_admin_ms is shorter than envoy_admin_ms"),
        ({"idle_envoy_admin_ms": 2500}, r"idle_envoy_admin_ms \+ request_timeout_ms \(3500\) exceed stale_after_ms"),
    ],
)
def test_idle_envoy_polls_must_keep_its_view_fresh(poll: dict[str, int], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_fleet({"hosts": [{"name": "h", "address": "10.0.0.1", "tier": "gpu"}], "picker": {"poll": poll}})


def test_loops_of_one_kind_wake_on_a_few_phases(stack: Stack) -> None:
    """Many loops of one kind share ten phases of their period (they wake together, one pass of the event
    loop for each phase); fewer loops get one phase each."""
    many = stack.fleet().model_dump(mode="json", exclude={"source"})
    many["hosts"] = [
        {
            "name": f"h{i}",
            "address": "127.0.0.1",
            "http_port": 2000 + i,
            "grpc_port": 3000 + i,
            "metrics_port": 4000 + i,
            "tier": "cpu",
        }
        for i in range(25)
    ]
    offsets: dict[str, list[float]] = {}
    for job, offset in TelemetryCollector(parse_fleet(many), Datastore(parse_fleet(many)))._offsets():
        offsets.setdefault(job.kind, []).append(offset)
    period = 0.05  # triton_metrics_ms
    assert sorted(set(offsets["triton_metrics"])) == pytest.approx([period * k / 10 for k in range(10)])
    assert offsets["triton_metrics"] == sorted(offsets["triton_metrics"])  # neighbours share a phase
    assert offsets["envoy_admin"] == [0.0]
    few = TelemetryCollector(stack.fleet(), Datastore(stack.fleet()))._offsets()
    assert sorted(o for job, o in few if job.kind == "repository") == pytest.approx([0.0, 0.03])


# -- TLS to the hosts (envoy.upstream_tls) -----------------------------------------------------------------

TLS_MODEL = "embed_normalize"


def upstream_tls_fleet(metrics_port: int, grpc_port: int, **upstream_tls: str) -> Fleet:
    """One host whose metrics and gRPC ports are TLS sidecars (its HTTP port is not scraped); Envoy's admin
    is a closed port (its poll fails, which changes nothing here)."""
    admin_port, http_port = free_ports(2)
    return parse_fleet(
        {
            "hosts": [
                {
                    "name": "t",
                    "address": "127.0.0.1",
                    "http_port": http_port,
                    "grpc_port": grpc_port,
                    "metrics_port": metrics_port,
                    "tier": "cpu",
                }
            ],
            "picker": {"poll": {"request_timeout_ms": 2000, "stale_after_ms": 4000}},
            "envoy": {
                "fallback_tier": "cpu",
                "admin": {"address": "127.0.0.1", "port": admin_port},
                "upstream_tls": upstream_tls,
            },
        }
    )


def test_reading_the_tls_files_names_the_key_and_problem(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    assert read_triton_tls(upstream_tls_fleet(1, 2, ca_file=str(pki.ca), server_name="a")) is not None
    assert read_triton_tls(parse_fleet({"hosts": [{"name": "h", "address": "10.0.0.1", "tier": "gpu"}]})) is None
    (tmp_path / "not-pem").write_text("no certificate here\n")
    cases = {
        "ca_file: cannot read": {"ca_file": str(tmp_path / "absent")},
        "ca_file: .* holds no PEM certificate": {"ca_file": str(tmp_path / "not-pem")},
        "cert_file: .* are not a PEM certificate and its key": {
            "ca_file": str(pki.ca),
            "cert_file": str(pki.client_cert),
            "key_file": str(pki.triton_key),  # another certificate's key
        },
        "key_file: cannot read": {
            "ca_file": str(pki.ca),
            "cert_file": str(pki.client_cert),
            "key_file": str(tmp_path / "absent.key"),
        },
    }
    for problem, files in cases.items():
        with pytest.raises(ConfigError, match=f"^<memory>: key envoy.upstream_tls.{problem}"):
            read_triton_tls(upstream_tls_fleet(1, 2, server_name="triton.test", **files))


async def test_a_picker_refuses_to_start_without_its_tls_files(tmp_path: Path) -> None:
    fleet = upstream_tls_fleet(1001, 1002, ca_file=str(tmp_path / "absent"), server_name="triton.test")
    with pytest.raises(ConfigError, match=f"key envoy.upstream_tls.ca_file: cannot read {tmp_path}/absent"):
        Picker(fleet)


@pytest.mark.e2e
def test_a_reload_with_unreadable_tls_files_keeps_the_previous_ones(tmp_path: Path) -> None:
    """``extproc serve`` with envoy.upstream_tls (its host does not exist: nothing is scraped): a reload whose CA
    file is gone is applied, scraping with the files read before, and says so."""
    pki = make_pki(tmp_path)
    metrics_port, *host_ports = free_ports(4)
    fleet: dict[str, Any] = {
        "hosts": [
            {"name": "h", "address": "127.0.0.1", "tier": "gpu"}
            | dict(zip(("http_port", "grpc_port", "metrics_port"), host_ports, strict=True))
        ],
        "runtime_dir": str(tmp_path),
        "picker": {"listen": f"unix:{tmp_path}/picker.sock", "metrics_port": metrics_port},
        "envoy": {"upstream_tls": {"ca_file": str(pki.ca), "server_name": "triton.test"}},
    }
    config = tmp_path / "fleet.yaml"
    config.write_text(json.dumps(fleet))
    command = [sys.executable, "-m", "extproc", "--log-format", "json", "serve", "--config", str(config)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    events: list[dict[str, Any]] = []
    assert process.stderr is not None
    reader = threading.Thread(
        target=lambda: events.extend(json.loads(line) for line in process.stderr or () if line.startswith("{")),
        daemon=True,
    )
    reader.start()
    try:
        status = f"http://127.0.0.1:{metrics_port}/status"
        wait_for(lambda: http_status(status) == 200, 30, "the picker to answer /status")
        pki.ca.rename(tmp_path / "ca.moved")
        process.send_signal(signal.SIGHUP)  # a reload of the same file
        wait_for(lambda: any(e["event"] == "config_reloaded" for e in events), 30, "the reload")
        (unreadable,) = [e for e in events if e["event"] == "telemetry_tls_unreadable"]
        assert "key envoy.upstream_tls.ca_file: cannot read" in unreadable["problem"]
        assert http_status(status) == 200
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class TlsTriton:
    pki: Pki
    metrics: TcpProxy
    grpc: TcpProxy
    log: Path


@pytest.fixture(scope="module")
def tls_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsTriton]:
    """A real Triton host with TLS-terminating sidecars on its metrics and gRPC ports (the sidecar of the
    upstream TLS tests in tests/test_security.py), which require a client certificate of the test CA."""
    run_dir = tmp_path_factory.mktemp("tls-triton")
    pki = make_pki(run_dir)
    http_port, grpc_port, metrics_port, metrics_tls, grpc_tls = free_ports(5)
    host = {"address": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port}
    triton = launch(triton_spec(run_dir, host, [TLS_MODEL], metrics_port), run_dir / "triton.log")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.triton_cert, pki.triton_key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    sidecars = TlsTriton(
        pki, TcpProxy(metrics_tls, metrics_port, tls=context), TcpProxy(grpc_tls, grpc_port, tls=context), run_dir
    )
    try:
        ready = f"http://127.0.0.1:{http_port}/v2/health/ready"
        wait_for(lambda: http_status(ready) == 200, 120, "Triton to be ready", interval_s=0.25)
        sidecars.metrics.start()
        sidecars.grpc.start()
        yield sidecars
    finally:
        sidecars.metrics.stop()
        sidecars.grpc.stop()
        stop_processes([triton])


@pytest.mark.e2e
async def test_scrapes_speak_tls_to_hosts_that_do(tls_triton: TlsTriton) -> None:
    """With envoy.upstream_tls the metrics page, the repository index and the model config are all read
    through the TLS sidecars of a real Triton, with the client certificate they require."""
    pki = tls_triton.pki
    fleet = upstream_tls_fleet(
        tls_triton.metrics.listen_port,
        tls_triton.grpc.listen_port,
        ca_file=str(pki.ca),
        server_name="triton.test",
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    tls = read_triton_tls(fleet)
    assert tls is not None
    handshakes = (tls_triton.metrics.handshakes, tls_triton.grpc.handshakes)
    store = Datastore(fleet)
    async with TelemetryCollector(fleet, store, tls=tls) as collector:
        await collector.refresh_once()
        await collector.refresh_once()  # a second scrape, on the connections of the first
        health = collector.health()
        assert (health["triton_metrics/t"], health["repository/t"]) == (True, True), health
        host = store.hosts["t"]
        assert set(host.ready) == {TLS_MODEL} and host.metrics_at is not None and host.index_at is not None
        assert TLS_MODEL in host.batching  # the model config, read over gRPC with TLS
    assert tls_triton.metrics.handshakes > handshakes[0] and tls_triton.grpc.handshakes > handshakes[1]
    # Without TLS the same ports answer nothing a scrape can use.
    plain = Datastore(fleet)
    async with TelemetryCollector(fleet, plain) as collector:
        await collector.refresh_once()
        assert plain.hosts["t"].metrics_at is None and plain.hosts["t"].index_at is None


@pytest.mark.e2e
@pytest.mark.parametrize("wrong", ["ca", "server_name"])
async def test_scrapes_refuse_a_host_they_cannot_verify(
    tls_triton: TlsTriton, wrong: str, tmp_path: Path, logs: LogList
) -> None:
    """A CA that did not sign the host's certificate, or a server name it does not carry: no telemetry from
    the host (it goes stale, so it gets no requests), and the log says why."""
    pki = tls_triton.pki
    ca = make_pki(tmp_path).ca if wrong == "ca" else pki.ca
    fleet = upstream_tls_fleet(
        tls_triton.metrics.listen_port,
        tls_triton.grpc.listen_port,
        ca_file=str(ca),
        server_name="other.test" if wrong == "server_name" else "triton.test",
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    store = Datastore(fleet)
    async with TelemetryCollector(fleet, store, tls=read_triton_tls(fleet)) as collector:
        await collector.refresh_once()
        health = collector.health()
    host = store.hosts["t"]
    assert (health["triton_metrics/t"], health["repository/t"]) == (False, False), health
    assert host.metrics_at is None and host.index_at is None and not host.ready
    failing = {e["source"]: e["error"] for e in logs if e["event"] == "telemetry poll failing" and e["target"] == "t"}
    # Each library's words for it, as they reach the log.
    metrics, repository = {
        "ca": ("certificate verify failed: certificate signature failure", "certificate signature failure"),
        "server_name": ("Hostname mismatch, certificate is not valid for 'other.test'", "Hostname Verification"),
    }[wrong]
    assert metrics in failing["triton_metrics"], failing
    assert repository in failing["repository"], failing
