"""The picker as an InferencePool's endpoint picker, behind the Envoy a GIE gateway builds, with real Triton.

The stack of ``extproc up`` runs with ``picker.epp`` on; beside its own Envoy, this module starts a second
Envoy shaped like the one Istio renders for an HTTPRoute to an InferencePool (docs/gateway-api.md; the
configuration is :mod:`benchmarks.gateway`'s, which the overhead benchmark's ``epp`` variant uses too): the pool's
endpoints (every host's REST port in one cluster, gRPC port in another, as two pools with ``appProtocol``
http and h2c), the ``override_host`` load-balancing policy reading the destination from the ``envoy.lb``
dynamic metadata, ext_proc to the picker's EPP port over TLS with both bodies FULL_DUPLEX_STREAMED and the
response phases sent, fail-open (``failureMode: FailOpen``). Like the gateways, it reports the endpoint that
served each request back to the picker (``envoy.lb`` / ``x-gateway-destination-endpoint-served``).

Three listeners: ``pool`` (the gateway), ``narrow`` (the same, with a subset hint naming triton-b's REST
port) and ``dead`` (its endpoint picker unreachable).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from benchmarks.gateway import SERVED_HEADER, epp_cluster, gateway_bootstrap, pool_listener
from benchmarks.ports import free_ports
from tests.models import F32, mlp_expected
from tests.stack import Stack, local_fleet, picks, start_stack, stop_stack, wait_for

pytestmark = pytest.mark.e2e

GPU_BYTES = 4096  # as tests/test_e2e.py: larger mlp_classifier requests go to the GPU tier


def gateway_config(fleet: dict[str, Any], ports: dict[str, int], dead_port: int) -> dict[str, Any]:
    """The whole gateway bootstrap (:mod:`benchmarks.gateway`): ``pool``, ``narrow`` (triton-b's REST port
    as the subset hint) and ``dead`` (an endpoint picker nobody serves)."""
    hosts = fleet["hosts"]
    narrow = [f"127.0.0.1:{h['http_port']}" for h in hosts if h["name"] == "triton-b"]
    return gateway_bootstrap(
        ports["admin"],
        [
            pool_listener("pool", ports["pool"], "epp"),
            pool_listener("narrow", ports["narrow"], "epp", subset=narrow),
            pool_listener("dead", ports["dead"], "epp_dead"),
        ],
        [(h["address"], h["http_port"]) for h in hosts],
        [(h["address"], h["grpc_port"]) for h in hosts],
        [epp_cluster("epp", f"127.0.0.1:{ports['epp']}"), epp_cluster("epp_dead", f"127.0.0.1:{dead_port}")],
    )


class Gateway:
    def __init__(self, stack: Stack, ports: dict[str, int]) -> None:
        self.stack = stack
        self.ports = ports

    def url(self, listener: str = "pool") -> str:
        return f"127.0.0.1:{self.ports[listener]}"

    def host_name(self, endpoint: str) -> str:
        names: dict[str, str] = {}
        for h in self.stack.fleet["hosts"]:
            names[f"127.0.0.1:{h['http_port']}"] = names[f"127.0.0.1:{h['grpc_port']}"] = h["name"]
        return names[endpoint]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    run_dir = tmp_path_factory.mktemp("epp")
    names = ("epp", "health", "pool", "narrow", "dead", "admin", "closed")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    epp = {
        "listen": f"127.0.0.1:{ports['epp']}",
        "health_port": ports["health"],
        "cert_file": str(run_dir / "tls/epp.crt"),
        "key_file": str(run_dir / "tls/epp.key"),
    }
    fleet = local_fleet(run_dir, epp=epp)
    fleet["models"][0]["rules"][0]["min_bytes"] = GPU_BYTES
    stack = start_stack(run_dir, fleet)
    config = run_dir / "gateway.yaml"
    config.write_text(yaml.safe_dump(gateway_config(fleet, ports, ports["closed"]), sort_keys=False))
    envoy = Path(sys.executable).parent / "envoy"
    log = (run_dir / "gateway.log").open("w")
    process = subprocess.Popen(
        # A base id of its own, whatever other Envoys run on this machine (hot restart's shared memory).
        [str(envoy), "-c", str(config), "--use-dynamic-base-id", "--concurrency", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _ready(ports["admin"]), 30, "the gateway's Envoy")
        yield Gateway(stack, ports)
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        stop_stack(stack)


def _ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def rest(gateway: Gateway, path: str, body: Any = None, listener: str = "pool") -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{gateway.url(listener)}{path}", data=data)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def mlp_body(x: F32) -> dict[str, Any]:
    return {"inputs": [{"name": "INPUT0", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def rows(n: int, seed: int = 0) -> F32:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def grpc_infer(gateway: Gateway, model: str, x: F32, listener: str = "pool") -> str:
    """Raw gRPC ModelInfer through the gateway; the host that served it."""
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(gateway.url(listener)) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ModelInfer.with_call(request, timeout=30)
        return gateway.host_name(str(dict(call.initial_metadata())[SERVED_HEADER]))


def test_rest_goes_where_the_picker_says(gateway: Gateway) -> None:
    """Conformance GatewayFollowingEPPRouting: every request is served by the endpoint the picker named
    first, which is model-aware (mlp_classifier is never on triton-b; small requests on the CPU tier, large
    ones on the GPU tier)."""
    since = time.time()
    served = []
    for i in range(8):
        for n in (1, 64):
            status, headers, body = rest(gateway, "/v2/models/mlp_classifier/infer", mlp_body(rows(n, i)))
            assert status == 200, body
            served.append(gateway.host_name(headers[SERVED_HEADER]))
    assert json.loads(body)["outputs"][0]["shape"] == [64, 4]
    wait_for(lambda: len(picks(gateway.stack, since)) >= len(served), 5, "the picker's decisions in its log")
    assert served == [p.hosts[0] for p in picks(gateway.stack, since)]
    assert Counter(served[0::2]).most_common(1)[0][0] == "triton-c"
    assert Counter(served[1::2]).most_common(1)[0][0] == "triton-a"
    assert "triton-b" not in served


def test_grpc_is_routed_by_the_model_in_its_body(gateway: Gateway) -> None:
    served = Counter(grpc_infer(gateway, "timed_batch", np.ones((1, 4), dtype=np.float32)) for _ in range(8))
    assert set(served) <= {"triton-a", "triton-b"} and sum(served.values()) == 8
    served = Counter(grpc_infer(gateway, "mlp_classifier", rows(1, i)) for i in range(8))
    assert set(served) <= {"triton-a", "triton-c"}


def test_tritonclient_grpc_results_and_sequences(gateway: Gateway) -> None:
    """Responses pass whole through the picker (it owns both bodies), and a sequence's requests stay on
    its host (a request on another host would fail in Triton, and the running sums would be wrong)."""
    client = grpcclient.InferenceServerClient(gateway.url())
    x = rows(5, seed=1)
    inputs = [grpcclient.InferInput("INPUT0", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    probs, _ = mlp_expected(x)
    np.testing.assert_allclose(client.infer("mlp_classifier", inputs).as_numpy("PROBS"), probs, rtol=1e-5, atol=1e-6)
    sums = {3000 + i: 0.0 for i in range(6)}
    for step in range(3):
        for sequence_id in sums:
            value = np.array([[float(step + 1)]], dtype=np.float32)
            inputs = [grpcclient.InferInput("INPUT", [1, 1], "FP32")]
            inputs[0].set_data_from_numpy(value)
            result = client.infer(
                "seq_accumulate", inputs, sequence_id=sequence_id, sequence_start=step == 0, sequence_end=step == 2
            )
            sums[sequence_id] += step + 1
            assert result.as_numpy("OUTPUT")[0][0] == sums[sequence_id]
    client.close()


def test_unknown_model_is_404(gateway: Gateway) -> None:
    status, headers, body = rest(gateway, "/v2/models/no_such_model/infer", mlp_body(rows(1)))
    assert status == 404 and "no_such_model" in json.loads(body)["error"]
    assert SERVED_HEADER not in headers
    client = grpcclient.InferenceServerClient(gateway.url())
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(rows(1))
    with pytest.raises(InferenceServerException) as info:
        client.infer("no_such_model", inputs)
    assert info.value.status() == "StatusCode.NOT_FOUND"
    client.close()


def test_the_subset_hint_limits_the_choice(gateway: Gateway) -> None:
    """The ``narrow`` listener allows triton-b's REST port only: embed_normalize (on triton-a and -b) goes
    there every time; mlp_classifier (not on triton-b) gets the protocol's 503."""
    body = {"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP32", "data": [3.0, 4.0, 0.0, 0.0]}]}
    for _ in range(6):
        status, headers, raw = rest(gateway, "/v2/models/embed_normalize/infer", body, listener="narrow")
        assert status == 200, raw
        assert gateway.host_name(headers[SERVED_HEADER]) == "triton-b"
    status, headers, _ = rest(gateway, "/v2/models/mlp_classifier/infer", mlp_body(rows(1)), listener="narrow")
    assert status == 503 and headers["retry-after"] == "1"


def test_the_served_endpoint_comes_back_to_the_picker(gateway: Gateway) -> None:
    """Conformance GatewayDestinationEndpointServed, the picker's side: the gateway reports each served
    endpoint, and it is the one the picker named first."""
    since = time.time()
    for _ in range(4):
        assert rest(gateway, "/v2/health/ready")[0] == 200

    def served() -> list[str]:
        lines = [json.loads(line) for line in gateway.stack.log("picker").splitlines() if '"epp_served' in line]
        return [r["event"] for r in lines if _at(r) >= since]

    wait_for(lambda: len(served()) >= 4, 5, "the served endpoints in the picker's log")
    assert set(served()) == {"epp_served"}


def _at(record: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()


def test_fail_open_when_the_endpoint_picker_is_unreachable(gateway: Gateway) -> None:
    """Conformance EppUnAvailableFailOpen: with the picker unreachable (the ``dead`` listener) the gateway
    still serves, by its own load balancer over the pool. Only requests without a body: in
    FULL_DUPLEX_STREAMED Envoy 1.40 fails open only until it has sent the picker a body chunk, which it
    does at once (a REST inference request gets 500, a gRPC call fails; docs/gateway-api.md)."""
    for path in ("/v2/health/ready", "/v2", "/v2/health/live"):
        status, headers, body = rest(gateway, path, listener="dead")
        assert status == 200, body
        assert headers[SERVED_HEADER]  # a host answered, not Envoy


def test_health_services_on_the_epp_ports(gateway: Gateway) -> None:
    """GIE's health services: over TLS on the EPP port, and in plaintext on the probes' port."""
    cert = Path(gateway.stack.fleet["picker"]["epp"]["cert_file"]).read_bytes()
    credentials = grpc.ssl_channel_credentials(root_certificates=cert)
    with (
        grpc.secure_channel(gateway.url("epp"), credentials) as tls,
        grpc.insecure_channel(gateway.url("health")) as plain,
    ):
        for channel in (tls, plain):
            check = health_pb2_grpc.HealthStub(channel).Check
            for service in ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
                answer = check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


@pytest.mark.parametrize("path", ["/v2/repository/index", "/v2/systemsharedmemory/status", "/v2/logging"])
def test_tritons_control_apis_are_refused_by_the_picker(gateway: Gateway, path: str) -> None:
    """The gateway's routes send every request of the pool to the picker: it refuses Triton's control APIs
    itself, in its words (the hosts, started with the admin key, would refuse them in Triton's)."""
    status, _, body = rest(gateway, path, body={})
    assert status == 403, body
    assert json.loads(body)["error"].startswith("the gateway does not offer"), body


def test_grpc_control_methods_are_refused_by_the_picker(gateway: Gateway) -> None:
    client = grpcclient.InferenceServerClient(gateway.url())
    with pytest.raises(InferenceServerException) as refused:
        client.get_model_repository_index()
    assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
    assert "the gateway does not offer Triton's model repository API" in str(refused.value.message())
