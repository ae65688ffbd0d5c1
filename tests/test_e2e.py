"""The whole product on loopback: ``extproc up`` starts three real Triton hosts, the picker and Envoy.

Tests run in file order on one stack; the last ones kill the picker (fail open) and stop the stack.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from extproc.datapath.headers import HOSTS_HEADER, TIER_HEADER, TIER_HINT_HEADER, UPSTREAM_HOST_HEADER
from extproc.runtime.process import group_members
from tests.models import F32, mlp_expected
from tests.stack import Stack, alive, local_fleet, start_stack, stop_stack

pytestmark = pytest.mark.e2e

# Requests above this many bytes are classified to the GPU tier in the test fleet (the local file uses
# 64 KiB; a smaller threshold keeps test requests small).
GPU_BYTES = 4096


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("stack")
    fleet = local_fleet(run_dir)
    fleet["models"][0]["rules"][0]["min_bytes"] = GPU_BYTES
    stack = start_stack(run_dir, fleet)
    yield stack
    stop_stack(stack)


def rest(
    stack: Stack, path: str, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://{stack.http_url}{path}", data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def mlp_body(x: F32) -> dict[str, Any]:
    return {"inputs": [{"name": "INPUT0", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def mostly(counts: Counter[str], expected: str, allowed: set[str]) -> None:
    """``expected`` served (nearly) all; the rest went only to ``allowed`` hosts. On a loaded machine an
    active health check can time out, and the picker then rightly spills over to another host that has the
    model; it must never pick a host without it."""
    assert set(counts) <= {expected, *allowed}, counts
    assert counts[expected] >= 0.8 * sum(counts.values()), counts


def served_by(stack: Stack, headers: dict[str, str]) -> str:
    return stack.host_by_http_endpoint()[headers[UPSTREAM_HOST_HEADER]]


def rows(n: int, seed: int = 0) -> F32:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def test_rest_inference_through_envoy(stack: Stack) -> None:
    client = httpclient.InferenceServerClient(stack.http_url)
    x = rows(3)
    inputs = [httpclient.InferInput("INPUT0", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    result = client.infer("mlp_classifier", inputs)
    probs, labels = mlp_expected(x)
    np.testing.assert_allclose(result.as_numpy("PROBS"), probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("LABEL"), labels)

    e = np.array([[3.0, 4.0, 0.0, 0.0]], dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT", list(e.shape), "FP32")]
    inputs[0].set_data_from_numpy(e)
    result = client.infer("embed_normalize", inputs)
    np.testing.assert_allclose(result.as_numpy("OUTPUT"), [[0.6, 0.8, 0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("NORM"), [[5.0]], rtol=1e-6)
    client.close()


def test_grpc_inference_through_envoy(stack: Stack) -> None:
    client = grpcclient.InferenceServerClient(stack.http_url)
    assert client.is_server_ready()
    assert client.is_model_ready("embed_normalize")
    x = rows(5, seed=1)
    inputs = [grpcclient.InferInput("INPUT0", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    result = client.infer("mlp_classifier", inputs)
    probs, _ = mlp_expected(x)
    np.testing.assert_allclose(result.as_numpy("PROBS"), probs, rtol=1e-5, atol=1e-6)

    t = np.arange(8, dtype=np.float32).reshape(2, 4)
    inputs = [grpcclient.InferInput("INPUT0", list(t.shape), "FP32")]
    inputs[0].set_data_from_numpy(t)
    np.testing.assert_allclose(client.infer("timed_batch", inputs).as_numpy("OUTPUT0"), t * 2 + 1)
    client.close()


def test_rest_model_on_some_hosts_only(stack: Stack) -> None:
    """mlp_classifier is on triton-a (gpu) and triton-c (cpu), never triton-b: small requests go to the CPU
    tier, large ones to the GPU tier, and none ever reaches triton-b."""
    small, large = Counter[str](), Counter[str]()
    for i in range(15):
        status, headers, _ = rest(stack, "/v2/models/mlp_classifier/infer", mlp_body(rows(1, i)))
        assert status == 200
        small[served_by(stack, headers)] += 1
        status, headers, body = rest(stack, "/v2/models/mlp_classifier/infer", mlp_body(rows(64, i)))
        assert status == 200, body
        large[served_by(stack, headers)] += 1
    mostly(small, "triton-c", {"triton-a"})
    mostly(large, "triton-a", {"triton-c"})


def grpc_infer_host(stack: Stack, model: str, x: F32, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    """Raw gRPC ModelInfer through Envoy; returns the host that served it (from the response metadata)."""
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=list(x.shape))
    del tensor  # filled through raw_input_contents
    request.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(stack.http_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=30)
        upstream = dict(call.initial_metadata())[UPSTREAM_HOST_HEADER]
    grpc_to_name: dict[str, str] = {f"127.0.0.1:{h['grpc_port']}": h["name"] for h in stack.fleet["hosts"]}
    return grpc_to_name[str(upstream)]


def test_grpc_routed_by_model_in_body(stack: Stack) -> None:
    """The model name is only in the protobuf body: the picker reads it from the first chunk."""
    hosts = Counter(grpc_infer_host(stack, "mlp_classifier", rows(1, i)) for i in range(10))
    mostly(hosts, "triton-c", {"triton-a"})
    hosts = Counter(grpc_infer_host(stack, "mlp_classifier", rows(64, i)) for i in range(10))
    mostly(hosts, "triton-a", {"triton-c"})
    t = np.ones((1, 4), dtype=np.float32)
    hosts = Counter(grpc_infer_host(stack, "timed_batch", t) for _ in range(10))
    assert set(hosts) <= {"triton-a", "triton-b"} and sum(hosts.values()) == 10


def test_client_routing_headers_are_ignored(stack: Stack) -> None:
    """A client naming an upstream (in any spelling, repeated) or a tier is routed as if it had not."""
    b = stack.host("triton-b")
    b_http, b_grpc = f"127.0.0.1:{b['http_port']}", f"127.0.0.1:{b['grpc_port']}"
    spellings = [
        {HOSTS_HEADER: b_http, TIER_HEADER: "gpu"},
        {HOSTS_HEADER.upper(): b_http, TIER_HEADER.title(): "gpu"},
        {"X-Triton-Lb-Hosts": f"{b_http},{b_http}", "x-triton-lb-tier": "gpu"},
    ]
    for headers in spellings:
        status, response, _ = rest(stack, "/v2/models/mlp_classifier/infer", mlp_body(rows(1)), headers)
        assert status == 200 and served_by(stack, response) == "triton-c"
    # Repeated header lines, sent raw (dicts cannot repeat a key).
    metadata = ((HOSTS_HEADER, b_grpc), (HOSTS_HEADER, b_grpc), (TIER_HEADER, "gpu"), (TIER_HEADER, "cpu"))
    assert grpc_infer_host(stack, "mlp_classifier", rows(1), metadata) == "triton-c"


def test_tier_hint_is_honoured_where_allowed(stack: Stack) -> None:
    hinted = Counter[str]()
    for i in range(5):
        status, headers, _ = rest(
            stack, "/v2/models/mlp_classifier/infer", mlp_body(rows(1, i)), {TIER_HINT_HEADER: "gpu"}
        )
        assert status == 200
        hinted[served_by(stack, headers)] += 1
    mostly(hinted, "triton-a", {"triton-c"})
    status, headers, _ = rest(stack, "/v2/models/embed_normalize/ready", headers={TIER_HINT_HEADER: "cpu"})
    assert status == 200 and served_by(stack, headers) in {"triton-a", "triton-b"}


def test_grpc_sequences_stay_on_their_host(stack: Stack) -> None:
    """Interleaved sequences of seq_accumulate (on triton-a and triton-b): a request landing on another host
    than its sequence's first would be rejected by Triton, and the running sums would be wrong."""
    client = grpcclient.InferenceServerClient(stack.http_url)
    sequences = {1000 + i: 0.0 for i in range(8)}
    for step in range(4):
        for sequence_id in sequences:
            value = np.array([[float(step + 1)]], dtype=np.float32)
            inputs = [grpcclient.InferInput("INPUT", [1, 1], "FP32")]
            inputs[0].set_data_from_numpy(value)
            result = client.infer(
                "seq_accumulate", inputs, sequence_id=sequence_id, sequence_start=step == 0, sequence_end=step == 3
            )
            sequences[sequence_id] += step + 1
            assert result.as_numpy("OUTPUT")[0][0] == sequences[sequence_id]
    client.close()
    homes = {
        json.loads(line)["sequence_id"]: tuple(json.loads(line)["hosts"][:1])
        for line in stack.log("picker").splitlines()
        if '"sequence"' in line
    }
    assert len(set(homes.values())) == 2, "eight sequences should spread over both hosts"


def test_rest_sequences_from_tritonclient_stay_on_their_host(stack: Stack) -> None:
    """tritonclient.http puts the correlation id in the JSON body's parameters; seq_accumulate is marked
    ``sequence: true``, so its REST bodies are streamed to the picker, which reads it from there."""
    client = httpclient.InferenceServerClient(stack.http_url)
    sequences = {2000 + i: 0.0 for i in range(6)}
    for step in range(3):
        for sequence_id in sequences:
            value = np.array([[float(step + 1)]], dtype=np.float32)
            inputs = [httpclient.InferInput("INPUT", [1, 1], "FP32")]
            inputs[0].set_data_from_numpy(value)
            result = client.infer(
                "seq_accumulate", inputs, sequence_id=sequence_id, sequence_start=step == 0, sequence_end=step == 2
            )
            sequences[sequence_id] += step + 1
            assert result.as_numpy("OUTPUT")[0][0] == sequences[sequence_id]
    client.close()
    routed = [json.loads(line) for line in stack.log("picker").splitlines() if '"routed"' in line]
    rest_ids = {r["sequence_id"] for r in routed if r["protocol"] == "http" and r["model"] == "seq_accumulate"}
    assert {str(i) for i in sequences} <= rest_ids
    # Each decision's time, and the part of it until the answer was ready (before gRPC sent it).
    assert all(0 < r["answer_us"] <= r["decision_us"] for r in routed)


def test_rest_sequence_header_pins_the_host(stack: Stack) -> None:
    headers = {"x-triton-sequence-id": "77"}
    hosts = set()
    for step in range(5):
        body = {
            "parameters": {"sequence_id": 77, "sequence_start": step == 0, "sequence_end": step == 4},
            "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}],
        }
        status, response, raw = rest(stack, "/v2/models/seq_accumulate/infer", body, headers)
        assert status == 200, raw
        assert json.loads(raw)["outputs"][0]["data"] == [step + 1.0]
        hosts.add(served_by(stack, response))
    assert len(hosts) == 1


def test_drained_host_gets_no_new_requests(stack: Stack) -> None:
    picker = stack.metrics_url.removesuffix("/metrics")

    def post(path: str) -> dict[str, Any]:
        with urllib.request.urlopen(urllib.request.Request(picker + path, method="POST"), timeout=5) as response:
            result: dict[str, Any] = json.load(response)
        return result

    body = {"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
    assert post("/hosts/triton-b/drain") == {"host": "triton-b", "draining": True}
    try:
        served = Counter(served_by(stack, rest(stack, "/v2/models/embed_normalize/infer", body)[1]) for _ in range(12))
        assert served == {"triton-a": 12}
    finally:
        assert post("/hosts/triton-b/undrain")["draining"] is False
    with pytest.raises(urllib.error.HTTPError) as info:
        post("/hosts/nope/drain")
    assert info.value.code == 404


def test_picker_reads_each_models_batching_from_triton(stack: Stack) -> None:
    # From the model configs in triton_models/: max_batch_size with a dynamic or sequence batcher, one
    # KIND_CPU instance each.
    expected = {
        "embed_normalize": {"max_batch": 32, "instances": 1},
        "mlp_classifier": {"max_batch": 64, "instances": 1},
        "seq_accumulate": {"max_batch": 8, "instances": 1, "sequence_slots": 64, "sequence_idle_s": 60.0},
        "timed_batch": {"max_batch": 8, "instances": 1},
    }
    deadline = time.monotonic() + 10
    while True:
        hosts = stack.picker_status()["hosts"]
        seen = {name: host["batching"] for name, host in hosts.items()}
        wanted = {name: {m: expected[m] for m in host["ready"]} for name, host in hosts.items()}
        if seen == wanted or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert seen == wanted
    assert all(wanted.values())


def test_picker_answers_the_grpc_health_service(stack: Stack) -> None:
    with grpc.insecure_channel(stack.fleet["picker"]["listen"]) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            answer = check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as unknown:
            check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


def test_unknown_model_is_404_with_json_error(stack: Stack) -> None:
    status, headers, body = rest(stack, "/v2/models/no_such_model/infer", mlp_body(rows(1)))
    assert status == 404
    assert headers["content-type"] == "application/json"
    assert "no_such_model" in json.loads(body)["error"]
    client = grpcclient.InferenceServerClient(stack.http_url)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(rows(1))
    with pytest.raises(InferenceServerException) as info:
        client.infer("no_such_model", inputs)
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in str(info.value.message())
    client.close()


def test_malformed_requests_are_400(stack: Stack) -> None:
    status, _, body = rest(stack, "/v2/models/%ff%fe/infer", raw=b"{}")
    assert status == 400 and "UTF-8" in json.loads(body)["error"]
    status, _, body = rest(stack, "/v2/models/a%00b/infer", raw=b"{}")
    assert status == 400
    status, _, body = rest(stack, "/nothing/here")
    assert status == 404 and "error" in json.loads(body)


def test_requests_without_a_model(stack: Stack) -> None:
    status, _, _ = rest(stack, "/v2/health/ready")
    assert status == 200
    status, _, body = rest(stack, "/v2")
    assert status == 200 and json.loads(body)["name"] == "triton"


def test_tls_listener_serves_tritonclient(stack: Stack) -> None:
    client = grpcclient.InferenceServerClient(
        stack.tls_url,
        ssl=True,
        root_certificates=stack.cert_file,
        channel_args=[("grpc.ssl_target_name_override", "localhost")],
    )
    assert client.is_model_ready("mlp_classifier")
    inputs = [grpcclient.InferInput("INPUT0", [2, 16], "FP32")]
    x = rows(2, seed=7)
    inputs[0].set_data_from_numpy(x)
    np.testing.assert_allclose(
        client.infer("mlp_classifier", inputs).as_numpy("PROBS"), mlp_expected(x)[0], rtol=1e-5, atol=1e-6
    )
    client.close()

    context = ssl.create_default_context(cafile=stack.cert_file)
    http_client = httpclient.InferenceServerClient(stack.tls_url, ssl=True, ssl_context_factory=lambda: context)
    inputs_h = [httpclient.InferInput("INPUT0", [2, 16], "FP32")]
    inputs_h[0].set_data_from_numpy(x)
    np.testing.assert_allclose(
        http_client.infer("mlp_classifier", inputs_h).as_numpy("PROBS"), mlp_expected(x)[0], rtol=1e-5, atol=1e-6
    )
    http_client.close()


def test_picker_metrics_count_decisions(stack: Stack) -> None:
    # One decision of each kind, so the test stands alone (the series exist once counted).
    assert rest(stack, "/v2/models/mlp_classifier/infer", mlp_body(rows(1)))[0] == 200
    assert rest(stack, "/v2/models/no_such_model/infer", mlp_body(rows(1)))[0] == 404
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as response:
        text = response.read().decode()
    assert 'extproc_decisions_total{host="triton-c",model="mlp_classifier",reason="classified",tier="cpu"}' in text
    assert 'extproc_rejections_total{reason="unknown_model",status="404"}' in text
    assert "extproc_decision_seconds_bucket" in text
    assert 'extproc_telemetry_age_seconds{host="triton-a",source="metrics"}' in text


def test_routing_decisions_are_logged(stack: Stack) -> None:
    routed = [json.loads(line) for line in stack.log("picker").splitlines() if '"routed"' in line]
    assert routed, "the picker logs each decision at debug level"
    assert {"model", "tier", "hosts", "request_id", "decision_us"} <= set(routed[-1])


def test_config_reload_applies_valid_files_and_rejects_invalid_ones(stack: Stack) -> None:
    config = stack.run_dir / "fleet.yaml"
    original = config.read_text()
    large = mlp_body(rows(64))

    def large_goes_to(host: str) -> bool:
        status, headers, _ = rest(stack, "/v2/models/mlp_classifier/infer", large)
        return status == 200 and served_by(stack, headers) == host

    def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.2)
        return False

    try:
        config.write_text(original.replace("min_bytes: 4096", "min_bytes: -5"))  # invalid
        assert eventually(lambda: "config_reload_rejected" in stack.log("picker"))
        assert "models[0].rules[0].min_bytes" in stack.log("picker")
        assert large_goes_to("triton-a"), "the previous config keeps serving"

        config.write_text(original.replace("min_bytes: 4096", "min_bytes: 100000000"))
        assert eventually(lambda: large_goes_to("triton-c")), "large requests now classify to the CPU tier"
        # The picker logs the reload once the old telemetry is closed, a moment after routing switched.
        assert eventually(lambda: "config_reloaded" in stack.log("picker"))
    finally:
        config.write_text(original)
    assert eventually(lambda: large_goes_to("triton-a"))


def test_removing_and_adding_a_host_drops_no_request(stack: Stack) -> None:
    """Editing the fleet file reloads the picker and hot-restarts Envoy while requests keep flowing."""
    config = stack.run_dir / "fleet.yaml"
    original = config.read_text()
    without_b = yaml.safe_load(original)
    without_b["hosts"] = [h for h in without_b["hosts"] if h["name"] != "triton-b"]
    body = {"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            status, headers, _ = rest(stack, "/v2/models/embed_normalize/infer", body)
            results.append((status, stack.host_by_http_endpoint().get(headers.get(UPSTREAM_HOST_HEADER, ""))))
            time.sleep(0.02)

    def wait_for_output(text: str) -> int:
        deadline = time.monotonic() + 20
        while not any(text in line for line in stack.output):
            assert time.monotonic() < deadline, f"no {text!r} in:\n" + "\n".join(stack.output)
            time.sleep(0.1)
        return len(results)

    def hosts_since(start: int) -> set[str | None]:
        return {h for _, h in results[start:]}

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(1)
        config.write_text(yaml.safe_dump(without_b, sort_keys=False))
        wait_for_output("(epoch 1)")
        time.sleep(11)  # the replaced Envoy drains for up to 10 s, then exits
        removed = len(results)
        time.sleep(1)
        assert hosts_since(removed) == {"triton-a"}, "only triton-a serves embed_normalize without triton-b"
        config.write_text(original)
        restored = wait_for_output("(epoch 2)")
        deadline = time.monotonic() + 20
        while "triton-b" not in hosts_since(restored) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join()
        config.write_text(original)
    failed = [status for status, _ in results if status != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {Counter(failed)}"
    assert "triton-b" in hosts_since(restored), "triton-b came back"


def test_fail_open_when_the_picker_dies(stack: Stack) -> None:
    picker = stack.pids()["picker"]
    os.kill(picker, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive(picker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(picker)
    for i in range(10):
        status, _, body = rest(
            stack,
            "/v2/models/embed_normalize/infer",
            {"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP32", "data": [1.0, i, 0.0, 0.0]}]},
        )
        assert status == 200, body
    client = grpcclient.InferenceServerClient(stack.http_url)
    t = np.ones((1, 4), dtype=np.float32)
    inputs = [grpcclient.InferInput("INPUT0", [1, 4], "FP32")]
    inputs[0].set_data_from_numpy(t)
    np.testing.assert_allclose(client.infer("timed_batch", inputs).as_numpy("OUTPUT0"), t * 2 + 1)
    client.close()


def process_group_members(groups: set[int]) -> list[int]:
    """Live processes in any of ``groups`` (each child of ``extproc up`` leads its own group; Triton's
    python-backend stubs live in their server's group)."""
    return [pid for group in groups for pid in group_members(group)]


def test_supervising_ends_when_a_stop_is_requested(tmp_path: Path) -> None:
    """The stop event alone ends supervision: the signal handler's raise can be lost (printed as "Exception
    ignored") when it lands in a finaliser, which once left `extproc up` running after SIGTERM."""
    from extproc.config import load_fleet
    from extproc.runtime.stack import Stack as RuntimeStack

    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump({"hosts": [{"name": "a", "address": "127.0.0.1", "tier": "gpu"}]}))
    stop = threading.Event()
    supervising = threading.Thread(target=RuntimeStack(load_fleet(config), config).supervise, args=(stop,))
    supervising.start()
    time.sleep(0.2)
    assert supervising.is_alive()
    stop.set()
    supervising.join(timeout=5)
    assert not supervising.is_alive()


def test_stop_leaves_no_process_behind(stack: Stack) -> None:
    groups = set(stack.pids().values())
    assert process_group_members(groups), "the stack's processes should be running before the stop"
    assert stop_stack(stack) == 0
    deadline = time.monotonic() + 10
    while process_group_members(groups) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_group_members(groups) == []
