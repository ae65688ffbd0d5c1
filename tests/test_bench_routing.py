"""``python -m benchmarks.routing``: scenarios, the Poisson trace, the summary maths, the baseline Envoy config, the
PNG, and one small end-to-end run over real Triton hosts, Envoy and the picker."""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from benchmarks import loadgen, plot, routing
from benchmarks.loadgen import LoadSpec, MixEntry, Records, build_trace, percentile
from benchmarks.routing import (
    Policy,
    PolicyResult,
    Scenario,
    ScenarioError,
    baseline_bootstrap,
    envoy_host_requests,
    localize_front,
    localize_hosts,
    parse_scenario,
    parse_triton_counts,
    summarize,
)
from extproc.config import Fleet
from extproc.datapath.headers import PICKER_CLUSTER, cluster_name
from extproc.envoy_config import EXT_PROC_FILTER, render_bootstrap
from extproc.runtime.stack import find_envoy

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((REPO / "benchmarks" / "scenarios").glob("*.yaml"))
DATA = Path(__file__).resolve().parent / "data"


def scenario_data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "unit",
        "fleet": {
            "model_repository": str(REPO / "triton_models"),
            "hosts": [
                {"name": "a", "address": "127.0.0.1", "tier": "gpu", "launch": {"models": ["timed_batch"]}},
                {
                    "name": "b",
                    "address": "127.0.0.1",
                    "tier": "cpu",
                    "launch": {"models": ["timed_batch", "mlp_classifier"], "service_time_factor": 4},
                },
            ],
            "models": [{"name": "timed_batch", "tiers": ["gpu", "cpu"]}],
        },
        "load": {
            "rate_rps": 50,
            "duration_s": 3,
            "warmup_s": 1,
            "seed": 3,
            "mix": [
                {"model": "timed_batch", "shape": [1, 4], "weight": 3},
                {"model": "mlp_classifier", "protocol": "grpc", "shape": [2, 16], "weight": 1},
            ],
        },
    }
    data.update(overrides)
    return data


def scenario_problem(data: dict[str, Any]) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, "s.yaml")
    return str(info.value)


# ------------------------------------------------------------------------------------------------ scenarios


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_shipped_scenarios_are_valid(path: Path) -> None:
    scenario = routing.load_scenario(path)
    assert scenario.name == path.stem
    assert set(scenario.policies) == set(Policy)
    # Short enough for three policies in a few minutes.
    assert scenario.load.total_s <= 40


def test_shipped_scenarios_cover_the_issue() -> None:
    assert {"heterogeneous", "homogeneous", "mixed_tiers", "partial_placement"} <= {p.stem for p in SCENARIOS}
    het = routing.load_scenario(REPO / "benchmarks" / "scenarios" / "heterogeneous.yaml")
    factors = sorted(h.launch.service_time_factor for h in het.fleet_for_validation().hosts if h.launch)
    assert factors == [1.0, 1.0, 4.0]
    assert het.load.rate_rps == 300
    assert [(m.model, m.protocol, m.shape) for m in het.load.mix] == [("timed_batch", "http", (1, 4))]


def test_fleet_settings_change_the_scenarios_fleet_and_are_checked() -> None:
    path = REPO / "benchmarks" / "scenarios" / "mixed_sizes.yaml"
    scenario = routing.load_scenario(path, ["picker.workers=2", "picker.share_worker_picks=false"])
    picker = scenario.fleet_for_validation().picker
    assert (picker.workers, picker.share_worker_picks, picker.log_level) == (2, False, "info")
    with pytest.raises(ScenarioError, match=r"picker\.workerz"):
        routing.load_scenario(path, ["picker.workerz=2"])
    with pytest.raises(ScenarioError, match="expected KEY=VALUE"):
        routing.load_scenario(path, ["picker.workers"])


def test_scenario_defaults() -> None:
    scenario = parse_scenario(scenario_data())
    assert scenario.policies == (Policy.ROUND_ROBIN, Policy.LEAST_REQUEST, Policy.BASELINE, Policy.PICKER)
    assert scenario.slowdowns == ()
    assert scenario.baseline_pool == "all_hosts"
    assert scenario.load.timeout_s == 10
    assert scenario.load.mix[0].protocol == "http" and scenario.load.mix[0].input == "INPUT0"
    assert scenario.load.mix[1].label == "mlp_classifier/grpc/2x16"


def test_scenario_ports_in_the_file_do_not_matter() -> None:
    data = scenario_data()
    for host in data["fleet"]["hosts"]:
        host.update(http_port=8000, grpc_port=8001, metrics_port=8002)  # clash: the run replaces them
    parse_scenario(data)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(extra=1), "s.yaml: key extra: Extra inputs are not permitted"),
        (lambda d: d["load"].update(rate_rps=0), "s.yaml: key load.rate_rps: Input should be greater than 0"),
        (lambda d: d["load"]["mix"][0].update(protocol="udp"), "key load.mix[0].protocol"),
        (lambda d: d["load"].update(mix=[]), "key load.mix"),
        (lambda d: d.update(policies=["picker", "picker"]), "policies repeat a policy"),
        (lambda d: d.update(policies=["random"]), "key policies[0]"),
        (lambda d: d["fleet"]["hosts"][0].update(tier="tpu"), "s.yaml: key fleet.hosts[0].tier"),
        (lambda d: d["fleet"]["hosts"][1].pop("launch"), "key fleet.hosts[1].launch: the benchmark starts"),
        (lambda d: d["fleet"]["hosts"][1].update(address="10.0.0.1"), "10.0.0.1 is not a loopback address"),
        (
            lambda d: d["fleet"].update(pools=[{"name": "p", "dns": "triton.local", "tier": "gpu"}]),
            "key fleet.pools: the benchmark starts every host itself",
        ),
        (lambda d: d["load"]["mix"][0].update(model="nope"), "key load.mix[0].model: 'nope' is loaded on no host"),
        (lambda d: d["load"]["mix"][1].update(name="timed_batch/http/1x4"), "mix entries need distinct names"),
        (
            lambda d: d.update(slowdowns=[{"host": "nope", "at_s": 1, "factor": 2}]),
            "key slowdowns[0].host: 'nope' is not a host of the fleet",
        ),
        (
            lambda d: d.update(slowdowns=[{"host": d["fleet"]["hosts"][0]["name"], "at_s": 999, "factor": 2}]),
            "key slowdowns[0].at_s: 999 s is after the load's end",
        ),
        (lambda d: d.update(slowdowns=[{"host": "x", "at_s": 1, "factor": 0}]), "key slowdowns[0].factor"),
    ],
)
def test_scenario_errors_name_the_key(mutate: Any, expected: str) -> None:
    data = scenario_data()
    mutate(data)
    assert expected in scenario_problem(data)


def test_scenario_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read the scenario file"):
        routing.load_scenario(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        routing.load_scenario(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ScenarioError, match="must be a mapping"):
        routing.load_scenario(bad)


def test_main_refuses_an_invalid_scenario(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario_data(policies=["nope"])))
    assert routing.run(path, tmp_path / "out.json") == 2
    assert "key policies[0]" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


# ------------------------------------------------------------------------------------------- fleet files


def test_localize_moves_every_port_and_path(tmp_path: Path) -> None:
    data = scenario_data()["fleet"]
    hosts = localize_hosts(data, iter(range(41000, 41100)))
    assert [(h["http_port"], h["grpc_port"], h["metrics_port"]) for h in hosts["hosts"]] == [
        (41000, 41001, 41002),
        (41003, 41004, 41005),
    ]
    assert "http_port" not in data["hosts"][0]  # the scenario's data is not changed
    front = localize_front(hosts, tmp_path, iter(range(42000, 42100)), base_id=77)
    assert front["picker"]["listen"] == f"unix:{tmp_path}/picker.sock"
    assert front["picker"]["metrics_port"] == 42000
    assert front["envoy"]["listener"] == {"address": "127.0.0.1", "port": 42001}
    assert front["envoy"]["admin"] == {"address": "127.0.0.1", "port": 42002}
    assert front["envoy"]["tls"] is None and front["envoy"]["expose_upstream_host"] is True
    assert front["envoy"]["base_id"] == 77
    assert front["runtime_dir"] == str(tmp_path)
    assert Path(front["model_repository"]).is_absolute()


def _bench_fleet(tmp_path: Path, **scenario: Any) -> Fleet:
    data = localize_front(
        localize_hosts(scenario_data(**scenario)["fleet"], iter(range(43000, 43100))),
        tmp_path,
        iter(range(44000, 44100)),
        5,
    )
    return routing._validate_fleet(data, "s.yaml")


def _triton_clusters(boot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in boot["static_resources"]["clusters"] if c["name"].startswith("triton_")}


def _endpoints(cluster: dict[str, Any]) -> list[int]:
    """The cluster's priority-0 hosts: Envoy alone balances over them while any is healthy (the spill tiers'
    hosts at priority 1 only take over when none is)."""
    return [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for group in cluster["load_assignment"]["endpoints"]
        if not group.get("priority")
        for e in group["lb_endpoints"]
    ]


@pytest.mark.parametrize("policy", ["round_robin", "least_request"])
def test_baseline_bootstrap_is_envoy_alone(tmp_path: Path, policy: str) -> None:
    fleet = _bench_fleet(tmp_path)
    boot = baseline_bootstrap(fleet, policy)
    text = json.dumps(boot)
    assert EXT_PROC_FILTER not in text
    assert PICKER_CLUSTER not in text
    assert "override_host" not in text
    clusters = _triton_clusters(boot)
    assert set(clusters) == {cluster_name(t, p) for t in ("cpu", "gpu") for p in ("http", "grpc")}
    for cluster in clusters.values():
        (entry,) = cluster["load_balancing_policy"]["policies"]
        config = entry["typed_extension_config"]
        assert config["name"] == f"envoy.load_balancing_policies.{policy}"
        assert config["typed_config"]["@type"].endswith(f".{policy}.v3.{policy.title().replace('_', '')}")
        # Health checks and outlier detection stay as the product has them: only the balancer differs.
        assert cluster["health_checks"] and cluster["outlier_detection"]
    # all_hosts: the fallback (gpu) clusters spread over every host, in fleet order.
    assert _endpoints(clusters["triton_gpu_http"]) == [h.http_port for h in fleet.hosts]
    assert _endpoints(clusters["triton_gpu_grpc"]) == [h.grpc_port for h in fleet.hosts]
    assert _endpoints(clusters["triton_cpu_http"]) == [fleet.hosts[1].http_port]

    # The filter chain is the product's without ext_proc: the routing headers are still stripped first and
    # the router is still last.
    def filters(b: dict[str, Any]) -> list[str]:
        manager = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        return [f["name"] for f in manager["http_filters"]]

    product = filters(render_bootstrap(fleet))
    assert filters(boot) == [f for f in product if f != EXT_PROC_FILTER]
    assert filters(boot)[0] == "envoy.filters.http.header_mutation" and filters(boot)[-1] == "envoy.filters.http.router"


def test_baseline_bootstrap_fallback_tier_pool(tmp_path: Path) -> None:
    fleet = _bench_fleet(tmp_path)
    clusters = _triton_clusters(baseline_bootstrap(fleet, "round_robin", pool="fallback_tier"))
    assert _endpoints(clusters["triton_gpu_http"]) == [fleet.hosts[0].http_port]
    with pytest.raises(ValueError, match="no Envoy load-balancing policy"):
        baseline_bootstrap(fleet, "maglev")


def test_envoy_accepts_the_baseline_bootstrap(tmp_path: Path) -> None:
    envoy = find_envoy()
    fleet = _bench_fleet(tmp_path)
    for policy in ("round_robin", "least_request"):
        path = tmp_path / f"{policy}.yaml"
        path.write_text(yaml.safe_dump(baseline_bootstrap(fleet, policy)))
        result = subprocess.run(
            [envoy, "--mode", "validate", "-c", str(path), "-l", "warning"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ the trace


def test_poisson_trace_is_seeded() -> None:
    load = LoadSpec.model_validate(scenario_data()["load"])
    first, second = build_trace(load), build_trace(load)
    assert first == second
    other = build_trace(load.model_copy(update={"seed": 4}))
    assert other.offsets != first.offsets


def test_poisson_rate_and_gaps() -> None:
    rate, total = 400.0, 100.0
    offsets = loadgen.poisson_offsets(rate, total, np.random.default_rng(9))
    n = len(offsets)
    # Count ~ Poisson(40000): sd 200, so 2 % (4 sd) never fails by chance.
    assert abs(n - rate * total) < 0.02 * rate * total
    assert all(0 <= a < b < total for a, b in itertools.pairwise(offsets))
    gaps = np.diff(np.array(offsets))
    assert abs(gaps.mean() - 1 / rate) < 0.02 / rate
    # Exponential gaps: the coefficient of variation is 1 (a fixed-interval schedule would give 0).
    assert abs(gaps.std() / gaps.mean() - 1) < 0.03
    # Per-second counts vary like a Poisson process (variance ~ mean), not like a paced one.
    per_second = np.bincount(np.array(offsets).astype(int), minlength=int(total))
    assert 0.7 < per_second.var() / per_second.mean() < 1.3


def test_trace_follows_the_mix_weights() -> None:
    load = LoadSpec(
        rate_rps=1000,
        duration_s=20,
        warmup_s=0,
        mix=(MixEntry(model="a", weight=3), MixEntry(model="b", weight=1, name="b")),
    )
    counts = Counter(build_trace(load).entries)
    assert abs(counts[0] / (counts[0] + counts[1]) - 0.75) < 0.02


def test_request_bodies() -> None:
    load = LoadSpec.model_validate(scenario_data()["load"])
    rest, grpc_bytes = loadgen.request_bodies(load)
    body = json.loads(rest)
    (tensor,) = body["inputs"]
    assert tensor["name"] == "INPUT0" and tensor["shape"] == [1, 4] and tensor["datatype"] == "FP32"
    assert len(tensor["data"]) == 4
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest.FromString(grpc_bytes)
    assert request.model_name == "mlp_classifier"
    assert list(request.inputs[0].shape) == [2, 16]
    assert len(request.raw_input_contents[0]) == 2 * 16 * 4
    assert loadgen.request_bodies(load) == [rest, grpc_bytes]  # fixed data: same bodies every time


# ------------------------------------------------------------------------------------------ the maths


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 90) == 90
    assert percentile(values, 99) == 99
    assert percentile(values, 99.9) == 100
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([7.0], 99) == 7
    assert math.isnan(percentile([], 50))
    summary = routing.latency_summary([3.0, 1.0, 2.0, 4.0])
    assert summary["p50_ms"] == 2 and summary["max_ms"] == 4 and summary["mean_ms"] == 2.5
    assert math.isnan(routing.latency_summary([])["p99_ms"])


def _result(records: Records, **kwargs: Any) -> PolicyResult:
    defaults: dict[str, Any] = {
        "policy": "picker",
        "records": records,
        "generator": {"cpu_share": 0.1},
        "triton_delta": {"a": {"timed_batch": 3.0}, "b": {"timed_batch": 1.0, "mlp_classifier": 1.0}},
        "envoy_requests": {"a": 4.0, "b": 2.0},
        "drained_s": 0.3,
    }
    defaults.update(kwargs)
    return PolicyResult(**defaults)


def test_summarize(tmp_path: Path) -> None:
    scenario = parse_scenario(scenario_data())  # warm-up 1 s, duration 3 s; entry 0 timed_batch, 1 mlp
    fleet = _bench_fleet(tmp_path)
    names = {fleet.hosts[0].http_endpoint: "a", fleet.hosts[1].http_endpoint: "b"}
    a, b = fleet.hosts[0].http_endpoint, fleet.hosts[1].http_endpoint
    records = Records(
        intended=[0.5, 1.0, 1.5, 2.0, 2.5, 3.0],
        entry=[0, 0, 0, 1, 0, 1],
        sent=[0.5, 1.001, 1.5, 2.0, 2.502, 3.0],
        done=[0.6, 1.010, 1.520, 2.030, 2.540, 3.2],
        status=["http 200", "http 200", "http 200", "grpc OK", "http 200", "grpc UNAVAILABLE"],
        host=[a, a, b, b, a, a],
    )
    s = summarize(_result(records), scenario, fleet, names)
    assert s["requests"] == 5 and s["requests_with_warmup"] == 6 and s["ok"] == 4
    assert s["latency"]["p50_ms"] == pytest.approx(20)
    assert s["latency"]["max_ms"] == pytest.approx(40)
    assert s["errors"] == {"grpc UNAVAILABLE": 1}
    assert s["offered_rps"] == pytest.approx(5 / 3)
    assert s["achieved_rps"] == pytest.approx(4 / 3)
    assert s["host_share"]["client"] == {"a": 0.6, "b": 0.4}
    assert s["host_share"]["triton"] == {"a": 0.6, "b": 0.4}
    assert s["host_share"]["envoy"] == pytest.approx({"a": 4 / 6, "b": 2 / 6})
    assert sum(s["host_share"]["triton"].values()) == pytest.approx(1)
    # The last mlp_classifier request went to a, which does not load it: the header and the servers agree.
    assert s["misplaced"]["client_header"] == 1
    assert s["misplaced"]["server_unattributed"] == {"a": 1.0, "b": 0.0}
    assert s["generator"]["lag_max_ms"] == pytest.approx(2, abs=1e-6)
    assert s["generator"]["behind"] is False
    assert s["per_entry"]["timed_batch/http/1x4"]["requests"] == 3
    table = routing.format_table([s], ["a", "b"])
    assert "picker" in table and "grpc UNAVAILABLE: 1" in table and "timed_batch/http/1x4" in table
    lagging = Records(**{**records.to_json(), "sent": [t + 0.05 for t in records.intended]})
    behind = summarize(_result(lagging), scenario, fleet, names)
    assert behind["generator"]["behind"] is True
    assert "fell behind" in routing.format_table([behind], ["a", "b"])


def test_comparisons_and_json_safety() -> None:
    summaries = [
        {"policy": "least_request", "latency": {"p99_ms": 200.0}},
        {"policy": "picker", "latency": {"p99_ms": 50.0}},
    ]
    assert routing.comparisons(summaries) == {"picker_p99_over_least_request_p99": 0.25}
    assert routing.json_safe({"a": [math.nan, 1.0, math.inf], "b": (2,)}) == {"a": [None, 1.0, None], "b": [2]}


def test_server_side_counters() -> None:
    counts = parse_triton_counts((DATA / "triton_metrics_cpu_t1.txt").read_text())
    assert counts.success["add_one"] == 41
    assert counts.pending == 19
    clusters = json.loads((DATA / "envoy_clusters.json").read_text())
    per_host = envoy_host_requests(clusters, {"127.0.0.1:37621": "x", "127.0.0.2:37622": "y"})
    assert per_host["x"] >= 6 and per_host["y"] == 0
    assert routing.envoy_all_healthy({"cluster_statuses": []})
    unhealthy = {
        "cluster_statuses": [
            {
                "name": "triton_gpu_http",
                "host_statuses": [
                    {"health_status": {"eds_health_status": "HEALTHY", "failed_active_health_check": True}}
                ],
            }
        ]
    }
    assert not routing.envoy_all_healthy(unhealthy)


def test_cpu_accounting() -> None:
    table = routing.process_table()
    me = os.getpid()
    assert me in table and table[me][1] >= 0
    # This process's tree includes at least this process.
    assert routing.tree_cpu_s(table, me) >= table[me][1]
    assert routing.tree_cpu_s({1: (0, 1.0), 2: (1, 0.5), 3: (2, 0.25), 4: (0, 9.0)}, 1) == 1.75
    assert routing.machine_busy_s() > 0
    cores, timeline = routing.cpu_usage([(0.0, {"envoy": 1.0}), (1.0, {"envoy": 1.5}), (3.0, {"envoy": 2.5})])
    assert cores == {"envoy": 0.5}
    assert timeline == [{"t": 1.0, "envoy": 0.5}, {"t": 3.0, "envoy": 0.5}]
    assert routing.cpu_usage([(0.0, {"envoy": 1.0})]) == ({}, [])


def test_records_round_trip() -> None:
    trace = build_trace(LoadSpec.model_validate(scenario_data()["load"]))
    records = Records.for_trace(trace)
    assert Records.from_json(json.loads(json.dumps(records.to_json()))).intended == records.intended


# -------------------------------------------------------------------------------------------------- PNG


def _png_size(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, width, height, idat = 8, 0, 0, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def test_latency_cdf_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    series = {
        "least_request": list(rng.lognormal(3, 1, 2000)),
        "picker": list(rng.lognormal(2.5, 0.5, 2000)),
    }
    path = plot.write_latency_cdf(tmp_path / "sub" / "cdf.png", series, "test: latency cdf")
    width, height, raw = _png_size(path.read_bytes())
    assert (width, height) == (960, 600 + 2 * 24)  # the legend rows under the chart
    assert len(raw) == height * (1 + 3 * width)
    # Both policies' colours are on the canvas.
    for color in (plot.POLICY_COLORS["least_request"], plot.POLICY_COLORS["picker"]):
        assert bytes(color) in raw
    # Empty and degenerate inputs still give a valid image.
    _png_size(plot.latency_cdf_png({"x": []}, "empty"))
    _png_size(plot.latency_cdf_png({"x": [5.0]}, "one"))


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_routing_bench_end_to_end(tmp_path: Path) -> None:
    data = scenario_data(
        name="smoke",
        policies=["least_request", "picker"],
        fleet={
            "model_repository": str(REPO / "triton_models"),
            "hosts": [
                {"name": "fast", "address": "127.0.0.1", "tier": "gpu", "launch": {"models": ["timed_batch"]}},
                {
                    "name": "slow",
                    "address": "127.0.0.1",
                    "tier": "gpu",
                    "launch": {"models": ["timed_batch"], "service_time_factor": 2},
                },
            ],
            "models": [{"name": "timed_batch", "tiers": ["gpu"]}],
        },
        load={
            "rate_rps": 50,
            "duration_s": 3,
            "warmup_s": 1,
            "seed": 5,
            "mix": [
                {"model": "timed_batch", "protocol": "http", "shape": [1, 4], "weight": 3},
                {"model": "timed_batch", "protocol": "grpc", "shape": [2, 4], "weight": 1},
            ],
        },
    )
    scenario_file = tmp_path / "smoke.yaml"
    scenario_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "results" / "smoke.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.routing", "--scenario", str(scenario_file), "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "[bench picker]" in result.stderr  # progress lines
    assert "least_request" in result.stdout and "picker" in result.stdout
    report = json.loads(out.read_text())
    assert [p["policy"] for p in report["policies"]] == ["least_request", "picker"]
    assert Path(report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for summary in report["policies"]:
        assert summary["errors_with_warmup"] == {}, summary["policy"]
        assert summary["ok"] == summary["requests"] > 0
        for source in ("client", "triton", "envoy"):
            assert sum(summary["host_share"][source].values()) == pytest.approx(1), (summary["policy"], source)
        assert summary["misplaced"]["client_header"] == 0
        assert summary["misplaced"]["server_unattributed_total"] == 0
        # Every request was counted by a Triton: the server-side total is the trace.
        triton_total = sum(sum(models.values()) for models in summary["triton_requests"].values())
        assert triton_total == summary["requests_with_warmup"]
        assert summary["responses_without_host_header"] == 0
        assert set(summary["per_entry"]) == {"timed_batch/http/1x4", "timed_batch/grpc/2x4"}
        assert summary["generator"]["lag_p99_ms"] is not None


def test_scenario_model_is_exported() -> None:
    assert Scenario.model_fields["load"].annotation is LoadSpec
