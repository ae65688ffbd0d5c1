"""``python -m benchmarks.overhead``: config transformation, the maths, /proc parsing, the generator, and one short
end-to-end run that checks the report's structure (never its timings)."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from benchmarks import decision, gateway, instructions
from benchmarks import overhead as ov
from benchmarks.overhead.server import (
    CONSTANT_RESPONSE,
    BareProcessor,
    fleet_routing_answer,
    picker_servicer,
    touch_datastore,
)
from benchmarks.ports import free_ports
from extproc.config import Tier
from extproc.datapath.headers import (
    EPP_DESTINATION_HEADER,
    EPP_NAMESPACE,
    HOSTS_HEADER,
    PICKER_CLUSTER,
    READ_HEADERS,
    TIER_HEADER,
)
from extproc.datapath.scheduling.types import InferenceRequest, Protocol, Route
from extproc.envoy_config import EXT_PROC_FILTER, HEADER_MUTATION_FILTER, ROUTER_FILTER, render_bootstrap
from extproc.handlers.server import Processor

UPSTREAM = [18001, 18002, 18003]
SPARE = [18101, 18102, 18103, 18104, 18105, 18106]


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return render_bootstrap(ov.bench_fleet(UPSTREAM, SPARE, "unix:/tmp/rendered.sock", 18080, 18090))


def _variant(base: dict[str, Any], variant: str, listen: str | None = "unix:/tmp/x/picker.sock") -> dict[str, Any]:
    return ov.variant_bootstrap(base, variant, listen_port=18200, admin_port=18300, picker_listen=listen)


def _routes(boot: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for m in ov.http_managers(boot) for vh in m["route_config"]["virtual_hosts"] for r in vh["routes"]]


def _picker_address(boot: dict[str, Any]) -> dict[str, Any]:
    (cluster,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == PICKER_CLUSTER]
    address: dict[str, Any] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    return address


# ---------------------------------------------------------------------------------------- configuration


def test_fleet_points_every_host_at_an_upstream_port() -> None:
    fleet = ov.bench_fleet(UPSTREAM, SPARE, "unix:/tmp/p.sock", 18080, 18090)
    assert [h.http_port for h in fleet.hosts] == UPSTREAM
    assert {h.address for h in fleet.hosts} == {"127.0.0.1"}
    assert fleet.envoy.tls is None
    assert [m.name for m in fleet.models] == [ov.MODEL]
    with pytest.raises(ValueError, match="two spare ports"):
        ov.bench_fleet(UPSTREAM, SPARE[:3], "unix:/tmp/p.sock", 18080, 18090)


def test_plain_variant_drops_only_ext_proc(base: dict[str, Any]) -> None:
    before = json.dumps(base, sort_keys=True)
    plain = _variant(base, "plain", None)
    assert json.dumps(base, sort_keys=True) == before, "the rendered base must not be modified"
    rendered = ov.http_filter_names(base)
    assert ov.http_filter_names(plain) == [f for f in rendered if f != EXT_PROC_FILTER]
    assert ov.http_filter_names(plain)[0] == HEADER_MUTATION_FILTER
    assert ov.http_filter_names(plain)[-1] == ROUTER_FILTER
    assert PICKER_CLUSTER not in {c["name"] for c in plain["static_resources"]["clusters"]}
    assert all(EXT_PROC_FILTER not in r.get("typed_per_filter_config", {}) for r in _routes(plain))
    assert EXT_PROC_FILTER not in json.dumps(plain)
    # Routes, the Triton clusters and their override_host policy are all still there.
    assert [r["name"] for r in _routes(plain)] == [r["name"] for r in _routes(base)]
    assert {c["name"] for c in plain["static_resources"]["clusters"]} == {
        c["name"] for c in base["static_resources"]["clusters"] if c["name"] != PICKER_CLUSTER
    }


@pytest.mark.parametrize("variant", ["bare", "picker"])
def test_processor_variants_keep_ext_proc_and_point_at_the_processor(base: dict[str, Any], variant: str) -> None:
    boot = _variant(base, variant, f"unix:/tmp/x/{variant}.sock")
    names = ov.http_filter_names(boot)
    assert names == ov.http_filter_names(base)
    assert EXT_PROC_FILTER in names
    assert names[0] == HEADER_MUTATION_FILTER and names[-1] == ROUTER_FILTER
    assert _picker_address(boot) == {"pipe": {"path": f"/tmp/x/{variant}.sock"}}
    listener = boot["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18200}
    assert boot["admin"]["address"]["socket_address"]["port_value"] == 18300
    tcp = _variant(base, variant, "127.0.0.1:9999")
    assert _picker_address(tcp) == {"socket_address": {"address": "127.0.0.1", "port_value": 9999}}


def test_variants_differ_only_by_ext_proc(base: dict[str, Any]) -> None:
    picker = _variant(base, "picker")
    ov.strip_ext_proc(picker)
    assert picker == _variant(base, "plain", None)


def test_variant_errors(base: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        _variant(base, "nope")
    with pytest.raises(ValueError, match="listen address"):
        _variant(base, "bare", None)
    with pytest.raises(ValueError, match="no extproc_picker"):
        ov.point_picker_cluster({"static_resources": {"clusters": []}}, "unix:/x")


def test_upstream_answers_everything_and_echoes_the_hosts_header() -> None:
    boot = ov.upstream_bootstrap(UPSTREAM, 18999)
    listeners = boot["static_resources"]["listeners"]
    assert [lst["address"]["socket_address"]["port_value"] for lst in listeners] == UPSTREAM
    for i, lst in enumerate(listeners):
        manager = lst["filter_chains"][0]["filters"][0]["typed_config"]
        assert manager["stat_prefix"] == f"up{i}"
        (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
        assert route["match"] == {"prefix": "/"}
        assert route["direct_response"]["status"] == 200
        echo = {h["header"]["key"]: h["header"]["value"] for h in route["response_headers_to_add"]}
        assert echo[ov.ECHO_HEADER] == f"%REQ({HOSTS_HEADER})%"
        assert echo[ov.ECHO_DESTINATION_HEADER] == f"%REQ({EPP_DESTINATION_HEADER})%"


def _epp_variant() -> dict[str, Any]:
    fleet = ov.bench_fleet(UPSTREAM, SPARE, "unix:/tmp/rendered.sock", 18080, 18090)
    return ov.epp_bootstrap(fleet, listen_port=18200, admin_port=18300, picker_listen="unix:/tmp/x/epp.sock")


def test_epp_variant_is_the_gateway_shaped_envoy() -> None:
    """The epp gateway streams both bodies to the picker over the plaintext socket, routes by the
    destination it answers (override_host) to the same upstream ports, and keeps the rendered gateway's stat
    prefix (the fail-open counters are read there)."""
    boot = _epp_variant()
    (listener,) = boot["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18200}
    assert boot["admin"]["address"]["socket_address"]["port_value"] == 18300
    (manager,) = ov.http_managers(boot)
    assert f"http.{manager['stat_prefix']}." == ov.gateway_stat_prefix()
    assert ov.http_filter_names(boot) == [
        EXT_PROC_FILTER,
        "envoy.filters.http.header_to_metadata",
        ROUTER_FILTER,
    ]
    ext_proc = manager["http_filters"][0]["typed_config"]
    assert ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"] == PICKER_CLUSTER
    mode = ext_proc["processing_mode"]
    assert mode["request_body_mode"] == mode["response_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert ext_proc["failure_mode_allow"] is True
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    assert _picker_address(boot) == {"pipe": {"path": "/tmp/x/epp.sock"}}
    assert "transport_socket" not in clusters[PICKER_CLUSTER]
    rest = clusters[gateway.REST_CLUSTER]
    ports = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for e in rest["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert ports == UPSTREAM
    (policy,) = rest["load_balancing_policy"]["policies"]
    (source,) = policy["typed_extension_config"]["typed_config"]["override_host_sources"]
    assert source == {"metadata": {"key": EPP_NAMESPACE, "path": [{"key": EPP_DESTINATION_HEADER}]}}


def test_the_gateway_shape_speaks_tls_to_a_picker_on_tcp() -> None:
    """As GIE gateways reach their picker (tests/test_epp_gateway.py): TLS, certificate not verified."""
    cluster = gateway.epp_cluster("epp", "127.0.0.1:9002")
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address == {"socket_address": {"address": "127.0.0.1", "port_value": 9002}}
    assert cluster["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    assert "validation_context" not in json.dumps(cluster)


@pytest.mark.skipif(
    shutil.which("envoy") is None and not (Path(sys.executable).parent / "envoy").is_file(), reason="no envoy binary"
)
def test_envoy_accepts_every_generated_config(base: dict[str, Any], tmp_path: Path) -> None:
    from extproc.runtime.stack import find_envoy

    configs = {
        "upstream": ov.upstream_bootstrap(UPSTREAM, 18999),
        "plain": _variant(base, "plain", None),
        "bare": _variant(base, "bare"),
        "picker": _variant(base, "picker"),
        "epp": _epp_variant(),
    }
    for name, boot in configs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(boot, sort_keys=False), encoding="utf-8")
        result = subprocess.run(
            [find_envoy(), "--mode", "validate", "-c", str(path), "-l", "warning", "--disable-hot-restart"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"


# ------------------------------------------------------------------------------------------------ maths


def test_percentile_is_nearest_rank() -> None:
    data = [float(x) for x in range(1, 101)]  # 1..100
    assert ov.percentile(data, 50) == 50
    assert ov.percentile(data, 99) == 99
    assert ov.percentile(data, 99.9) == 100
    assert ov.percentile(data, 100) == 100
    assert ov.percentile(data, 0) == 1
    assert ov.percentile([7.0], 99) == 7
    assert math.isnan(ov.percentile([], 50))


def test_latency_summary_in_ms() -> None:
    summary = ov.latency_summary([0.003, 0.001, 0.002, 0.004])
    assert summary["p50_ms"] == pytest.approx(2.0)
    assert summary["p99_ms"] == pytest.approx(4.0)
    assert summary["max_ms"] == pytest.approx(4.0)
    assert summary["mean_ms"] == pytest.approx(2.5)
    assert all(math.isnan(v) for v in ov.latency_summary([]).values())


def test_added_latency_ratios_and_medians() -> None:
    plain = {"p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "p999_ms": 4.0, "mean_ms": 1.5, "max_ms": 9.0}
    picker = {"p50_ms": 1.25, "p90_ms": 2.5, "p99_ms": 4.0, "p999_ms": 6.0, "mean_ms": 2.0, "max_ms": 1.0}
    assert ov.added_latency(picker, plain) == {
        "p50_ms": 0.25,
        "p90_ms": 0.5,
        "p99_ms": 1.0,
        "p999_ms": 2.0,
        "mean_ms": 0.5,
    }
    assert ov.round_ratios([900.0, 1000.0], [1000.0, 0.0])[0] == pytest.approx(0.9)
    assert math.isnan(ov.round_ratios([1.0], [0.0])[0])
    assert ov.median([3.0, math.nan, 1.0, 2.0]) == 2.0
    assert math.isnan(ov.median([math.nan]))


def test_rss_growth_slope() -> None:
    series = [{"requests": n, "rss_bytes": 100_000_000 + 110 * n} for n in (0, 50_000, 100_000, 150_000)]
    assert ov.growth_per_request(series) == pytest.approx(110.0)
    assert math.isnan(ov.growth_per_request(series[:1]))
    soak = {
        "variant": "bare",
        "requests": 150_000,
        "generator": "wrk",
        "series": [{**p, "elapsed_s": 1.0} for p in series],
        "rss_max_over_min": 1.2,
        "rss_max_over_min_including_cold": 1.2,
        "rss_last_over_first_warm": 1.2,
        "errors": 0,
        "fail_open": 0,
        "processor_cpu_us_per_request": 300.0,
        "growth_bytes_per_request": 110.0,
    }
    text = ov.format_soak(soak)
    assert "through the bare" in text and "FAIL" in text and "110.0 bytes/request" in text


def test_rotation_reachability_and_schedule() -> None:
    assert ov.rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert ov.rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert ov.rotated(["a", "b", "c"], 5) == ["c", "a", "b"]
    assert ov.rotated([], 3) == []
    assert ov.reachable(1000, None)
    assert ov.reachable(900, 1000)
    assert not ov.reachable(1000, 1000)
    offsets = ov.constant_rate_offsets(500, 2.0)
    assert len(offsets) == 1000
    assert offsets[1] - offsets[0] == pytest.approx(0.002)
    assert offsets[-1] < 2.0


def _records() -> ov.OpenLoopRecords:
    # 10 requests every 0.1 s from t=100; request 2 (warm-up) and 7 failed; latency 1 ms + 0.1 ms lag.
    intended = [100.0 + 0.1 * i for i in range(10)]
    return ov.OpenLoopRecords(
        intended=intended,
        sent=[t + 0.0001 for t in intended],
        done=[t + 0.001 for t in intended],
        status=[200, 200, 503, 200, 200, 200, 200, ov.NO_ANSWER, 200, 200],
    )


def test_open_loop_summary() -> None:
    summary = ov.summarize_open_loop(_records(), rate=10.0, warmup_s=0.25)
    assert summary["requests"] == 7  # intended at 0.3 s .. 0.9 s
    assert summary["ok"] == 6
    assert summary["errors"] == {"no_answer": 1}
    assert summary["latency"]["p50_ms"] == pytest.approx(1.0)
    assert summary["service"]["p50_ms"] == pytest.approx(0.9)
    assert summary["lag"]["p99_ms"] == pytest.approx(0.1)
    assert summary["achieved_rps"] == pytest.approx(6 / 0.7)


def _rate_run(latencies_ms: list[float], processor_cpu_s: float | None, variant: str, rnd: int = 0) -> dict[str, Any]:
    cpu = {"upstream": 0.1, f"gateway_{variant}": 0.2}
    if processor_cpu_s is not None:
        cpu[f"processor_{variant}"] = processor_cpu_s
    return {
        "round": rnd,
        "requests": len(latencies_ms),
        "completed": len(latencies_ms),
        "error_count": 0,
        "achieved_rps": 100.0,
        "latency": ov.latency_summary([x / 1e3 for x in latencies_ms]),
        "generator_cpu_us_per_request": 30.0,
        "gateway": {"ext_proc_fail_open": 0},
        "cpu_s": cpu,
        "upstream_share": {"up0": 1.0},
        "machine": {"other_cores": 0.25},
        "_latencies_s": [x / 1e3 for x in latencies_ms],
        "_lags_s": [0.0001] * len(latencies_ms),
    }


def test_rate_summary_takes_medians_of_rounds_and_pairs_rounds_with_plain() -> None:
    settings = ov.Settings()
    runs = {
        # Round 1 is noisy for everybody; round 2 only for bare; the medians drop both.
        "plain": [
            _rate_run([1.0] * 100, None, "plain", 0),
            _rate_run([5.0] * 100, None, "plain", 1),
            _rate_run([1.0] * 100, None, "plain", 2),
        ],
        "bare": [
            _rate_run([1.5] * 100, 0.02, "bare", 0),
            _rate_run([5.5] * 100, 0.02, "bare", 1),
            _rate_run([9.0] * 100, 0.02, "bare", 2),
        ],
        "picker": [],
    }
    out = ov.summarize_rate(100.0, runs, {"picker": "not reachable: ..."}, settings)
    assert set(out["variants"]) == {"plain", "bare"}
    assert out["not_reachable"] == {"picker": "not reachable: ..."}
    bare = out["variants"]["bare"]
    assert bare["latency"]["p50_ms"] == pytest.approx(5.5)  # median of 1.5, 5.5, 9.0
    assert bare["latency_rounds_ms"]["p50_ms"] == pytest.approx([1.5, 5.5, 9.0])
    assert bare["latency_pooled"]["p99_ms"] == pytest.approx(9.0)
    added = out["added_over_plain_ms"]["bare"]
    assert added["p50_rounds_ms"] == pytest.approx([0.5, 0.5, 8.0])
    assert added["p50_ms"] == pytest.approx(0.5)
    assert out["added_over_plain_pooled_ms"]["bare"]["p50_ms"] == pytest.approx(4.5)  # 5.5 - 1.0
    assert "picker" not in out["added_over_plain_ms"]
    assert bare["requests"] == 300
    assert bare["cpu_us_per_request"]["processor"] == pytest.approx(0.06 * 1e6 / 300)
    assert bare["other_load_cores"] == pytest.approx(0.25)
    assert out["variants"]["plain"]["cpu_us_per_request"]["processor"] is None
    assert bare["sustained"]
    assert "_latencies_s" not in json.dumps(out)


def test_paired_added_ignores_unpaired_rounds() -> None:
    plain = [_rate_run([1.0], None, "plain", 0)]
    bare = [_rate_run([2.0], 0.01, "bare", 0), _rate_run([3.0], 0.01, "bare", 1)]
    value, diffs = ov.paired_added(bare, plain, "p50_ms")
    assert diffs == pytest.approx([1.0])
    assert value == pytest.approx(1.0)


def test_max_summary_ratios_per_round_and_targets() -> None:
    def wrk_run(rps: float, variant: str) -> dict[str, Any]:
        return {
            "rps": rps,
            "completed": int(rps * 10),
            "error_count": 0,
            "latency": {"p50_ms": 1.0, "p99_ms": 2.0},
            "gateway": {"ext_proc_fail_open": 0},
            "cpu_s": {"upstream": 1.0, f"gateway_{variant}": 2.0, f"processor_{variant}": 5.0},
            "upstream_share": {},
        }

    runs = {
        "plain": [wrk_run(5000, "plain"), wrk_run(5200, "plain")],
        "bare": [wrk_run(1500, "bare"), wrk_run(1400, "bare")],
        "picker": [wrk_run(1200, "picker"), wrk_run(1330, "picker")],
    }
    out = ov.summarize_max(runs, ov.Settings(rounds=2))
    assert out["variants"]["bare"]["rps"] == 1450
    assert out["variants"]["bare"]["rps_best"] == 1500
    assert out["ratios"]["picker/bare"]["rounds"] == pytest.approx([0.8, 0.95])
    assert out["ratios"]["picker/bare"]["median"] == pytest.approx(0.875)
    assert out["variants"]["picker"]["cpu_us_per_request"]["processor"] == pytest.approx(10e6 / 25300)
    rate = {"rate_rps": 500.0, "added_over_plain_ms": {"picker": {"p50_ms": 0.2, "p99_ms": 2.0}}}
    targets = ov.evaluate_targets({"max_throughput": out, "fixed_rate": [rate]})
    assert targets["throughput_picker_over_bare"]["pass"] is False
    assert targets["added_p50_at_500_rps_ms"]["pass"] is True
    assert targets["added_p99_at_500_rps_ms"]["pass"] is False
    skipped = ov.evaluate_targets({"max_throughput": {"skipped": "no wrk"}, "fixed_rate": []})
    assert {t["pass"] for t in skipped.values()} == {None}


def test_report_formats_with_missing_parts() -> None:
    settings = ov.Settings(rounds=1)
    rate = ov.summarize_rate(
        500.0,
        {"plain": [_rate_run([1.0] * 10, None, "plain")], "bare": [_rate_run([1.2] * 10, 0.01, "bare")], "picker": []},
        {"picker": "not reachable: maximum sustained 400 req/s"},
        settings,
    )
    report: dict[str, Any] = {
        "environment": {"cpus": 2, "envoy_version": "1.40.0", "loadavg_start": "0.1 0.1 0.1"},
        "settings": ov.settings_json(settings),
        "max_throughput": {"skipped": ov.WRK_INSTALL_HINT},
        "fixed_rate": [rate],
    }
    report["targets"] = ov.evaluate_targets(report)
    text = ov.format_report(report)
    assert "skipped" in text and "apt-get install -y wrk" in text
    assert "not reachable" in text
    json.dumps(ov.json_safe(report), allow_nan=False)


# ------------------------------------------------------------------------------------- /proc and parsers


def test_proc_stat_parsing_survives_odd_command_names() -> None:
    fields = " ".join(str(n) for n in range(3, 53))  # fields 3..52; utime is field 14, stime field 15
    assert ov.parse_proc_stat(f"1234 (python) x) y) {fields}") == (14, 15)
    assert ov.parse_proc_stat(f"1234 (envoy) {fields}") == (14, 15)
    with pytest.raises(ValueError):
        ov.parse_proc_stat("garbage")
    assert ov.cpu_us_per_request(0.5, 1000) == pytest.approx(500.0)
    assert math.isnan(ov.cpu_us_per_request(0.5, 0))
    assert ov.parse_statm_rss("5000 1200 300 1 0 900 0\n", 4096) == 1200 * 4096
    stat = "cpu  100 5 50 1000 20 3 2 0 7 0\ncpu0 50 2 25 500 10 1 1 0 0 0\nintr 1\n"
    assert ov.parse_machine_cpu(stat) == (160, 1180)  # busy = user+nice+system+irq+softirq+steal
    with pytest.raises(ValueError):
        ov.parse_machine_cpu("intr 1\n")


def test_proc_readers_on_this_process() -> None:
    import os

    assert ov.cpu_seconds(os.getpid()) > 0
    assert ov.rss_bytes(os.getpid()) > 1 << 20
    assert ov.machine_busy_seconds() > 0
    assert ov.own_cpu_seconds() > 0


def test_wrk_output_parsing() -> None:
    out = (
        "Running 10s test @ http://127.0.0.1:1/v2/models/mlp/infer\n"
        'WRK_RESULT {"requests":15000,"duration_us":10000000,"connect":0,"read":1,"write":0,"status":2,'
        '"timeout":0,"p50_us":900.0,"p90_us":1500.0,"p99_us":3000.5,"p999_us":5000.0,"mean_us":1000.0,'
        '"max_us":9000.0}\n'
    )
    parsed = ov.parse_wrk_output(out)
    assert parsed["rps"] == pytest.approx(1500.0)
    assert parsed["error_count"] == 3
    assert parsed["latency"]["p99_ms"] == pytest.approx(3.0005)
    with pytest.raises(ValueError, match="WRK_RESULT"):
        ov.parse_wrk_output("no summary here")
    script = ov.wrk_script()
    assert ov.REQUEST_BODY.decode() in script
    assert 'wrk.method = "POST"' in script and ov.WRK_RESULT_PREFIX in script


def test_envoy_counter_parsing() -> None:
    stats = {
        "stats": [
            {"name": "http.ingress.downstream_rq_total", "value": 10},
            {"name": "http.ingress.ext_proc.failure_mode_allowed", "value": 2},
            {"histograms": {"computed_quantiles": []}},
        ]
    }
    counters = ov.parse_envoy_counters(stats)
    assert counters == {"http.ingress.downstream_rq_total": 10, "http.ingress.ext_proc.failure_mode_allowed": 2}
    delta = ov.counter_delta({"http.ingress.downstream_rq_total": 4}, counters)
    summary = ov.gateway_summary(delta)
    assert summary["rq_total"] == 6 and summary["ext_proc_fail_open"] == 2 and summary["rq_5xx"] == 0


def test_http_response_parsing() -> None:
    one = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nserver: envoy\r\n\r\nok"
    assert ov.parse_response(one) == (200, len(one))
    assert ov.parse_response(one[:-1]) is None
    assert ov.parse_response(b"HTTP/1.1 200 OK\r\ncontent-le") is None
    two = one + b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
    assert ov.parse_response(two) == (200, len(one))
    assert ov.parse_response(two[len(one) :]) == (503, len(two) - len(one))
    # Chunked (ext_proc streaming the response body): complete only after the last chunk and the trailers.
    chunked = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\ne\r\n{"outputs":[]}\r\n0\r\n\r\n'
    assert ov.parse_response(chunked + one) == (200, len(chunked))
    assert all(ov.parse_response(chunked[:i]) is None for i in range(len(chunked)))
    trailers = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;x=y\r\nok\r\n0\r\ngrpc-status: 0\r\n\r\n"
    assert ov.parse_response(trailers) == (200, len(trailers))
    assert ov.parse_response(trailers[:-2]) is None
    with pytest.raises(ValueError):
        ov.parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    with pytest.raises(ValueError, match="not an HTTP response"):
        ov.parse_response(b"SSH-2.0\r\n\r\n")
    request = ov.request_bytes(8080)
    assert request.startswith(b"POST /v2/models/mlp/infer HTTP/1.1\r\n")
    assert request.endswith(b"\r\n\r\n" + ov.REQUEST_BODY)


# -------------------------------------------------------------------------------------------- generator


@pytest.fixture
def tiny_server() -> Iterator[int]:
    """A keep-alive HTTP/1.1 server on loopback answering every request 200 at once."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    stop = threading.Event()
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    def serve(conn: socket.socket) -> None:
        buf = b""
        with conn:
            while not stop.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while (end := buf.find(b"\r\n\r\n")) >= 0 and len(buf) >= end + 4 + len(ov.REQUEST_BODY):
                    buf = buf[end + 4 + len(ov.REQUEST_BODY) :]
                    conn.sendall(answer)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield int(listener.getsockname()[1])
    stop.set()
    listener.close()


def test_open_loop_generator_sends_on_schedule(tiny_server: int) -> None:
    loop = ov.OpenLoop(tiny_server, ov.request_bytes(tiny_server), initial_connections=2, timeout_s=5.0)
    records = loop.run(ov.constant_rate_offsets(500, 0.2))
    assert len(records.intended) == 100
    assert records.status == [200] * 100
    assert all(d >= s >= i - 1e-3 for i, s, d in zip(records.intended, records.sent, records.done, strict=True))
    assert records.intended[-1] - records.intended[0] == pytest.approx(0.198)
    summary = ov.summarize_open_loop(records, 500, 0.0)
    assert summary["ok"] == 100 and summary["error_count"] == 0
    assert summary["latency"]["p50_ms"] > 0


def test_open_loop_generator_fails_loudly_when_nothing_listens() -> None:
    port = free_ports(1)[0]
    with pytest.raises(OSError):
        ov.OpenLoop(port, ov.request_bytes(port), initial_connections=1).run([0.0])


# ------------------------------------------------------------------------------------------- processors


def _headers_message(path: str) -> ep.ProcessingRequest:
    headers = [(":method", "POST"), (":path", path), ("content-type", "application/json"), ("content-length", "90")]
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers])
        )
    )


async def _stream(servicer: Any, messages: list[ep.ProcessingRequest]) -> list[ep.ProcessingResponse]:
    """The servicer's answers to ``messages``: as parsed messages to the bare one, as bytes to the picker's
    (each as its gRPC handler hands them over)."""
    raw = isinstance(servicer, Processor)

    async def requests() -> AsyncIterator[Any]:
        for m in messages:
            yield m.SerializeToString() if raw else m

    return [r async for r in servicer.Process(requests(), None)]


async def test_bare_processor_answers_headers_with_the_constant() -> None:
    responses = await _stream(BareProcessor(), [_headers_message("/v2/models/mlp/infer")])
    assert responses == [CONSTANT_RESPONSE]
    assert not CONSTANT_RESPONSE.request_headers.response.HasField("header_mutation")


async def test_bare_processor_can_answer_as_the_picker_routes() -> None:
    fleet = ov.bench_fleet(UPSTREAM, SPARE, "unix:/tmp/p.sock", 18080, 18090)
    (response,) = await _stream(BareProcessor(fleet_routing_answer(fleet)), [_headers_message("/v2/models/m/infer")])
    common = response.request_headers.response
    headers = {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}
    assert headers == {TIER_HEADER: "gpu", HOSTS_HEADER: ",".join(f"127.0.0.1:{p}" for p in UPSTREAM)}
    assert common.clear_route_cache
    # The picker's own answer for a route over the same hosts is this very message.
    processor, _ = picker_servicer(fleet)
    decision = Route(Tier.GPU, tuple(processor._scheduler._store.hosts.values()), "classified")
    assert processor._responder.answer(decision, InferenceRequest(Protocol.HTTP, ov.MODEL)) == response


async def test_picker_servicer_makes_real_decisions() -> None:
    fleet = ov.bench_fleet(UPSTREAM, SPARE, "unix:/tmp/p.sock", 18080, 18090)
    processor, store = picker_servicer(fleet)
    endpoints = {f"127.0.0.1:{p}" for p in UPSTREAM}
    seen: set[str] = set()
    for _ in range(12):
        (response,) = await _stream(processor, [_headers_message(f"/v2/models/{ov.MODEL}/infer")])
        mutation = response.request_headers.response.header_mutation
        headers = {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
        assert headers[TIER_HEADER] == "gpu"
        hosts = headers[HOSTS_HEADER].split(",")
        assert set(hosts) <= endpoints
        seen.add(hosts[0])
    assert len(seen) > 1, "the picks of one poll interval should spread over the hosts"
    touch_datastore(store, store.now())
    assert all(h.picks_since_poll == 0 and h.estimate_at == h.envoy_at for h in store.hosts.values())


def test_decision_benchmark_times_each_path() -> None:
    results = decision.run([10, 20], 30, ["argmax", "power_of_two"], workers=[1, 3])
    assert [(r["picker"], r["hosts"], r["workers"]) for r in results][:4] == [
        ("argmax", 10, 1),
        ("argmax", 10, 3),
        ("argmax", 20, 1),
        ("argmax", 20, 3),
    ]
    for result in results:
        # Two other workers, one pick each before each timed decision (after the warm-up's none).
        assert result["picks_applied"] == (2 * 2 * 30 if result["workers"] == 3 else 0), result
        for path in ("decide", "decide_after_change", "refresh_after_answer", "edge"):
            timing = result[path]
            assert 0 < timing["p50_us"] <= timing["p99_us"], (result["picker"], result["hosts"], path)


def test_decision_benchmark_times_decisions_not_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing answers the benchmark's picks: without Envoy's counts read back, three hosts fill within a few
    hundred inference requests and every decision after that is a refusal (overloaded), which the
    benchmark would time instead (it refuses to report then)."""
    (result,) = decision.run([3], 200, ["argmax"])
    assert result["decide"]["p50_us"] > 0
    monkeypatch.setattr(decision, "POLL_EVERY", 10**9)
    with pytest.raises(RuntimeError, match="does not route"):
        decision.run([3], 200, ["argmax"])


def test_decision_benchmark_takes_turns_among_models() -> None:
    one, several = (decision.run([20], 40, ["argmax"], models=m)[0] for m in (1, 4))
    assert one["models"] == 1 and one["hosts_with_several_models"] == 0
    assert several["models"] == 4 and several["hosts_with_several_models"] > 0
    assert 0 < several["decide"]["p50_us"] <= several["decide"]["p99_us"]


def test_in_process_benchmarks_send_only_headers_envoy_forwards() -> None:
    # Envoy's forward_rules pass READ_HEADERS only (seen from a real Envoy in the overhead bench: :path,
    # content-length, x-request-id); a header beyond them would count work the picker never does.
    message = ep.ProcessingRequest.FromString(decision.rest_request_bytes("mlp"))
    keys = [h.key for h in message.request_headers.headers.headers]
    assert set(keys) <= READ_HEADERS and ":path" in keys, keys


# ---------------------------------------------------------------------------------------------- the run


@pytest.mark.e2e
def test_overhead_bench_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """All three variants, ~2 s each at a low rate (and 2 s of wrk each when wrk is installed)."""
    output = tmp_path / "overhead.json"
    argv = ["--rates", "100", "--duration", "2", "--rounds", "1", "--max-duration", "2", "--output", str(output)]
    assert ov.main(argv) == 0
    report = json.loads(output.read_text())
    assert "latency at fixed rates" in capsys.readouterr().out
    (rate,) = report["fixed_rate"]
    assert set(rate["variants"]) == set(ov.VARIANTS)
    for variant, v in rate["variants"].items():
        assert v["errors"] == 0, variant
        assert v["requests"] > 0 and v["latency"]["p50_ms"] > 0, variant
        assert v["gateway"]["ext_proc_fail_open"] == 0, variant
        assert v["cpu_us_per_request"]["gateway"] > 0, variant
        expected_streams = 0 if variant == "plain" else v["gateway"]["rq_total"]
        assert v["gateway"]["ext_proc_streams"] == expected_streams, variant
    for variant in ("bare", "picker"):
        assert rate["variants"][variant]["cpu_us_per_request"]["processor"] > 0
        assert set(rate["added_over_plain_ms"][variant]) >= {"p50_ms", "p99_ms"}
    maximum = report["max_throughput"]
    if ov.find_wrk() is None:
        assert "apt-get install -y wrk" in maximum["skipped"]
    else:
        assert set(maximum["variants"]) == set(ov.VARIANTS)
        for variant, m in maximum["variants"].items():
            assert m["rps"] > 0 and m["errors"] == 0, variant
        assert maximum["ratios"]["picker/bare"]["median"] > 0
    assert set(report["targets"]) == {
        "throughput_picker_over_bare",
        "added_p50_at_500_rps_ms",
        "added_p99_at_500_rps_ms",
    }


@pytest.mark.e2e
def test_overhead_bench_with_a_routing_bare_processor(tmp_path: Path) -> None:
    """--bare-answer routing: start-up checks that the bare gateway now routes to the upstream hosts too."""
    output = tmp_path / "overhead.json"
    argv = ["--no-wrk", "--bare-answer", "routing", "--rates", "100", "--duration", "1", "--rounds", "1"]
    assert ov.main([*argv, "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["settings"]["bare_answer"] == "routing"
    bare = report["fixed_rate"][0]["variants"]["bare"]
    assert bare["errors"] == 0 and bare["gateway"]["ext_proc_fail_open"] == 0
    assert sum(bare["upstream_share"].values()) == pytest.approx(1.0)


@pytest.mark.e2e
def test_overhead_bench_with_the_epp_variant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--epp: the picker in the Endpoint Picker Protocol behind the gateway-shaped Envoy, beside the others
    (start-up checks that it routes by x-gateway-destination-endpoint; every body passes through it)."""
    output = tmp_path / "overhead.json"
    argv = ["--epp", "--no-wrk", "--rates", "100", "--duration", "1", "--rounds", "1", "--output", str(output)]
    assert ov.main(argv) == 0
    assert "\n   100 epp " in capsys.readouterr().out
    report = json.loads(output.read_text())
    assert report["settings"]["epp"] is True
    (rate,) = report["fixed_rate"]
    assert list(rate["variants"]) == list(ov.ALL_VARIANTS)
    epp = rate["variants"][ov.EPP_VARIANT]
    assert epp["errors"] == 0 and epp["sustained"]
    assert epp["gateway"]["ext_proc_fail_open"] == 0
    assert epp["gateway"]["ext_proc_streams"] == epp["gateway"]["rq_total"] > 0
    assert epp["cpu_us_per_request"]["processor"] > 0
    assert set(rate["added_over_plain_ms"][ov.EPP_VARIANT]) >= {"p50_ms", "p99_ms"}
    assert sum(epp["upstream_share"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("part", instructions.PARTS)
def test_bench_instructions_runs_each_part_of_the_request_path(part: str) -> None:
    run = instructions.part_runner(part, 3)
    run(3)  # what valgrind counts; an error here would fail the benchmark's run


def test_bench_instructions_reads_callgrinds_count() -> None:
    output = "==1== Events    : Ir\n==1== Collected : 3051014446\n==1==\n==1== I   refs:      3,051,014,446\n"
    assert instructions.parse_collected(output) == 3_051_014_446
    assert instructions.per_request(3_000_000, 3_400_000, 4000) == 100
    with pytest.raises(RuntimeError, match="no instruction count"):
        instructions.parse_collected("valgrind: command not found")


@pytest.mark.parametrize("variant", ["bare", "picker"])
def test_bench_instructions_starts_drives_and_stops_each_processor(variant: str, tmp_path: Path) -> None:
    # Without valgrind in front (an empty prefix) the run is the same but nothing counts instructions.
    with pytest.raises(RuntimeError, match="no instruction count"):
        instructions.count_process([], variant, 5, tmp_path)
