"""picker.fail_open_checked off, on the real stack: while the picker does not answer, requests whose body it
checks (REST inference, gRPC) are refused rather than sent on unchecked, and the others still fail open."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from tritonclient.grpc import service_pb2

from tests.stack import Stack, local_fleet, pid_of, start_stack, stop_stack

pytestmark = pytest.mark.e2e

BODY = json.dumps({"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("fail-closed")
    stack = start_stack(run_dir, local_fleet(run_dir, fail_open_checked=False))
    try:
        yield stack
    finally:
        stop_stack(stack)


def status(stack: Stack, path: str, body: bytes | None = None) -> int:
    request = urllib.request.Request(f"http://{stack.http_url}{path}", data=body)
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def grpc_infer(stack: Stack) -> grpc.StatusCode:
    request = service_pb2.ModelInferRequest(model_name="embed_normalize")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\0" * 16)
    with grpc.insecure_channel(stack.http_url) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer"
        )
        try:
            call(request.SerializeToString(), timeout=15)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            return exc.code()
    return grpc.StatusCode.OK


def test_checked_requests_are_refused_while_the_picker_is_stalled(stack: Stack) -> None:
    """Envoy waits for the stopped picker a second per request (the tests' message timeout), so the stop
    outlasts the telemetry's stale limit (3 s): the time the picker was stopped does not count against its
    hosts' telemetry (it counts in extproc_not_running_seconds_total), and the first request after it is
    routed, not refused."""
    infer = "/v2/models/embed_normalize/infer"
    assert status(stack, infer, BODY) == 200 and grpc_infer(stack) is grpc.StatusCode.OK
    pid = pid_of(stack, "picker")
    os.kill(pid, signal.SIGSTOP)
    try:
        refused = status(stack, infer, BODY)
        refused_grpc = grpc_infer(stack)
        health = status(stack, "/v2/health/ready")
        metadata = status(stack, "/v2/models/embed_normalize")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert refused >= 500 and refused_grpc is not grpc.StatusCode.OK, (refused, refused_grpc)
    assert (health, metadata) == (200, 200)  # no body to check: these still fail open
    assert status(stack, infer, BODY) == 200 and grpc_infer(stack) is grpc.StatusCode.OK
    assert not_running_s(stack) >= 2.0


def not_running_s(stack: Stack) -> float:
    with urllib.request.urlopen(stack.metrics_url, timeout=15) as response:
        page = response.read().decode()
    return sum(
        float(line.split()[1]) for line in page.splitlines() if line.startswith("extproc_not_running_seconds_total")
    )
