"""The gateway's edge, as a hostile client sees it: the threat list, one test (or a few) per threat.

Every test sends what an unauthenticated client could send through the gateway (the plain listener, and the
TLS one where the answer could differ) to the real stack (Envoy, the picker, three Triton hosts), and checks
that the client gets a clear refusal and that no Triton host died, lost a model, grew its memory or was
ejected. The threats are those of the security review (2026-12); its ids are in the test names:

- C1 Triton's control APIs (repository load/unload/index, shared memory, logging, trace): 403 /
  PERMISSION_DENIED before any host is picked.
- C2 a large form-encoded body (Triton 2.51 segfaults on ~4 MB): reaches Triton without that content type.
- C3 compression bombs: REST content-encoding refused (415); a gRPC message that inflates past
  ``envoy.max_request_bytes`` refused (RESOURCE_EXHAUSTED) before Triton has it whole.
- H1 an over-long request line or header: 431 from Envoy, never a dropped connection that ejects a host.
- H2 sequences started and never ended: a start that would wait for a sequence slot gets 429 at once.
- H3 a gRPC stream or REST body that arrives late: still routed by the picker, not failed open.
- H4 streams per connection capped, and long-lived streams per client.
- M1 a correlation id pins only sequence models.
- M2 crafted length headers and deep JSON: a clean 400 from the picker, no failed ext_proc stream.
- M3 chunked REST bodies of a sequence model keep their sequence's host.
- M4 rejections cost a short, rate-limited log line.
- M7 a second model name after the tensors: refused.
- L2 a gRPC stream is routed by its first message: a later message naming another model ends it.
- L1 a gRPC body announced over ``envoy.max_request_bytes``: RESOURCE_EXHAUSTED (Envoy's own mapping says UNKNOWN).
- Queries of death: a tensor shape whose element count the body cannot hold is refused (400) by the picker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import functools
import gzip
import http.client
import json
import queue
import socket
import ssl
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

from tests.stack import TEST_MESSAGE_TIMEOUT_MS, Stack, alive, envoy_stat, module_stack, pid_of, wait_for

pytestmark = pytest.mark.e2e

MAX_REQUEST_BYTES = 8 * 1024 * 1024  # envoy.max_request_bytes of this module's fleet
TIMEOUT_S = 20.0
# Later than Envoy's wait for the picker (picker.message_timeout_ms): Envoy would fail open at this delay.
LATE_S = 1.5 * TEST_MESSAGE_TIMEOUT_MS / 1000
TRITONS = ("triton-a", "triton-b", "triton-c")
GRPC = "/inference.GRPCInferenceService/"
TIMED_BATCH = json.dumps(
    {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
).encode()
MLP = json.dumps(
    {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": list(range(16))}]}
).encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # gRPC compression allowed, so that the picker's bounded inflate is what refuses the bombs (C3); by
    # default Envoy refuses compressed gRPC (test_bad_input.py).
    yield from module_stack(tmp_path_factory, "edge", MAX_REQUEST_BYTES, allow_grpc_compression=True)


@pytest.fixture(autouse=True)
def fleet_unharmed(stack: Stack) -> Iterator[None]:
    """After every threat: every Triton host alive, none ejected, and its peak memory not 300 MB higher."""
    pids = {name: pid_of(stack, name) for name in TRITONS}
    peaks = {name: peak_rss_mb(pid) for name, pid in pids.items()}
    ejected = envoy_stat(stack, "outlier_detection.ejections_enforced_total")
    yield
    dead = [name for name, pid in pids.items() if not alive(pid)]
    assert not dead, f"Triton hosts died: {dead}"
    grown = {name: peak_rss_mb(pid) - peaks[name] for name, pid in pids.items()}
    assert max(grown.values()) < 300, f"Triton peak memory grew (MB): {grown}"
    assert envoy_stat(stack, "outlier_detection.ejections_enforced_total") == ejected, "a host was ejected"


# ------------------------------------------------------------------------------------------------ helpers


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def request(
    stack: Stack,
    path: str,
    body: bytes | None = None,
    headers: Sequence[tuple[str, str]] = (),
    method: str = "POST",
    tls: bool = False,
    source: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """``source``: the client's address (another loopback address is another client for the picker)."""
    url = stack.tls_url if tls else stack.http_url
    host, port = url.split(":")
    conn: http.client.HTTPConnection
    bind = (source, 0) if source is not None else None
    if tls:
        context = ssl.create_default_context(cafile=stack.cert_file)
        context.check_hostname = False
        conn = http.client.HTTPSConnection(host, int(port), timeout=TIMEOUT_S, context=context, source_address=bind)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S, source_address=bind)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in headers:
            conn.putheader(key, value)
        if body is not None and not any(k.lower() == "transfer-encoding" for k, _ in headers):
            conn.putheader("content-length", str(len(body)))
        conn.endheaders()
        if body is not None:
            if any(k.lower() == "transfer-encoding" for k, _ in headers):
                conn.send(f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
            else:
                conn.send(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def grpc_call(stack: Stack, method: str, message: bytes, tls: bool = False, **kwargs: object) -> grpc.StatusCode:
    if tls:
        credentials = grpc.ssl_channel_credentials(Path(stack.cert_file).read_bytes())
        channel = grpc.secure_channel(
            stack.tls_url, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
        )
    else:
        channel = grpc.insecure_channel(stack.http_url, options=[("grpc.max_send_message_length", -1)])
    with channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(GRPC + method)
        try:
            call(message, timeout=TIMEOUT_S, **kwargs)  # type: ignore[arg-type]
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            return exc.code()
    return grpc.StatusCode.OK


def direct(stack: Stack, host: str, path: str) -> int:
    """A GET on a Triton host's own port (not through the gateway)."""
    url = f"http://127.0.0.1:{stack.host(host)['http_port']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def models_still_ready(stack: Stack) -> None:
    for host in ("triton-a", "triton-b"):
        assert direct(stack, host, "/v2/models/timed_batch/ready") == 200, host
    assert direct(stack, "triton-c", "/v2/models/mlp_classifier/ready") == 200


def served_by(stack: Stack, path: str, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> tuple[int, str]:
    status, got, _ = request(stack, path, body, headers)
    return status, got.get("x-triton-host", "")


# ---------------------------------------------------------------------------------------- C1 control APIs

CONTROL_PATHS = [
    ("POST", "/v2/repository/models/timed_batch/unload", b"{}"),
    ("POST", "/v2/repository/models/timed_batch/load", b"{}"),
    # Triton's load with file overrides: a model with the client's own code (remote code execution).
    (
        "POST",
        "/v2/repository/models/adv_probe/load",
        json.dumps({"parameters": {"config": "{}", "file:1/model.py": "aW1wb3J0IG9z"}}).encode(),
    ),
    ("POST", "/v2/repository/index", b"{}"),
    ("POST", "/v2/logging", b'{"log_verbose_level": 1}'),
    ("GET", "/v2/logging", None),
    ("POST", "/v2/trace/setting", b"{}"),
    ("GET", "/v2/models/timed_batch/trace/setting", None),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/systemsharedmemory/region/r/register", b'{"key": "/x", "offset": 0, "byte_size": 64}'),
    ("GET", "/v2/cudasharedmemory/status", None),
    ("GET", "/v2/models/stats", None),
    ("GET", "/v2/models/timed_batch/stats", None),
]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_c1_rest_control_apis_are_forbidden(stack: Stack, tls: bool) -> None:
    for method, path, body in CONTROL_PATHS:
        status, headers, answer = request(stack, path, body, method=method, tls=tls)
        assert status == 403, (path, status, answer)
        assert "x-triton-host" not in headers, path  # no host was picked
        assert "error" in json.loads(answer)
    models_still_ready(stack)
    assert direct(stack, "triton-a", "/v2/models/adv_probe/ready") != 200


GRPC_CONTROL = [
    ("RepositoryModelUnload", service_pb2.RepositoryModelUnloadRequest(model_name="timed_batch")),
    ("RepositoryModelLoad", service_pb2.RepositoryModelLoadRequest(model_name="timed_batch")),
    ("RepositoryIndex", service_pb2.RepositoryIndexRequest()),
    ("LogSettings", service_pb2.LogSettingsRequest()),
    ("TraceSetting", service_pb2.TraceSettingRequest()),
    ("SystemSharedMemoryStatus", service_pb2.SystemSharedMemoryStatusRequest()),
    ("CudaSharedMemoryRegister", service_pb2.CudaSharedMemoryRegisterRequest(name="r")),
    ("ModelStatistics", service_pb2.ModelStatisticsRequest(name="timed_batch")),
]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_c1_grpc_control_methods_are_permission_denied(stack: Stack, tls: bool) -> None:
    for method, message in GRPC_CONTROL:
        assert grpc_call(stack, method, message.SerializeToString(), tls=tls) is grpc.StatusCode.PERMISSION_DENIED, (
            method
        )
    models_still_ready(stack)
    # What a client may call still works on both listeners.
    ready = service_pb2.ModelReadyRequest(name="timed_batch").SerializeToString()
    assert grpc_call(stack, "ModelReady", ready, tls=tls) is grpc.StatusCode.OK


def test_c1_client_apis_still_served(stack: Stack) -> None:
    for path in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/timed_batch",
        "/v2/models/timed_batch/ready",
    ):
        assert request(stack, path, method="GET")[0] == 200, path
    assert request(stack, "/v2/models/timed_batch/config", method="GET")[0] == 200
    assert request(stack, "/v2/models/timed_batch/infer", TIMED_BATCH)[0] == 200


# ----------------------------------------------------------------------------- C2 form-encoded body crash


def test_c2_large_form_encoded_bodies_do_not_crash_triton(stack: Stack) -> None:
    """``curl -d`` sends application/x-www-form-urlencoded; Triton 2.51 segfaults on ~4.19 MB of it, on
    any path. Triton never needs a REST body's content type, so it never gets this one."""
    form = b"a" * 4_300_000
    headers = [("content-type", "application/x-www-form-urlencoded")]
    pids = {name: pid_of(stack, name) for name in TRITONS}
    for hint in ("gpu", "gpu", "cpu"):
        try:
            status, _, _ = request(stack, "/v2/health/ready", form, [*headers, ("x-triton-tier-hint", hint)])
        except (ConnectionResetError, BrokenPipeError):
            continue  # Envoy refused it on its headers (413) and closed before the whole body was sent
        assert status in (200, 413), status
    assert [name for name, pid in pids.items() if not alive(pid)] == []
    # A valid inference request of that size, sent the same way, is served.
    n = 32 * 32 * 1024
    big = json.dumps({"inputs": [{"name": "INPUT", "shape": [32, n // 32], "datatype": "FP32", "data": [1.5] * n}]})
    assert len(big) > 4_300_000
    assert request(stack, "/v2/models/embed_normalize/infer", big.encode(), headers)[0] == 200
    # A JSON body sent the curl -d way is served as it always was.
    assert request(stack, "/v2/models/timed_batch/infer", TIMED_BATCH, headers)[0] == 200
    multipart = [("content-type", "multipart/form-data; boundary=x")]
    assert request(stack, "/v2/models/timed_batch/infer", TIMED_BATCH, multipart)[0] == 200


# --------------------------------------------------------------------------------------- C3 compression


def test_c3_compressed_rest_bodies_are_refused(stack: Stack) -> None:
    bomb = gzip.compress(b'{"inputs":[' + b" " * (64 * 1024 * 1024) + b"]}", compresslevel=9)
    for encoding in ("gzip", "deflate", "br", "GZIP"):
        status, _, answer = request(stack, "/v2/models/timed_batch/infer", bomb, [("content-encoding", encoding)])
        assert status == 415, (encoding, answer)
    assert request(stack, "/v2/models/timed_batch/infer", TIMED_BATCH, [("content-encoding", "identity")])[0] == 200


def test_c3_grpc_message_inflating_past_the_limit_is_refused(stack: Stack) -> None:
    width = 2 * MAX_REQUEST_BYTES // 4
    bomb = service_pb2.ModelInferRequest(model_name="mlp_classifier")
    bomb.inputs.add(name="INPUT0", datatype="FP32", shape=[width // 16, 16])
    bomb.raw_input_contents.append(bytes(width * 4))
    message = bomb.SerializeToString()
    for _ in range(3):
        code = grpc_call(stack, "ModelInfer", message, compression=grpc.Compression.Gzip)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, code
    # Compression within the limit still works, for tritonclient as for any gRPC client.
    client = grpcclient.InferenceServerClient(stack.http_url)
    x = np.ones((64, 16), np.float32)
    inputs = [grpcclient.InferInput("INPUT0", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    result = client.infer("mlp_classifier", inputs, compression_algorithm="gzip")
    assert result.as_numpy("PROBS").shape == (64, 4)


def test_l1_a_grpc_body_announced_over_the_limit_is_resource_exhausted(stack: Stack) -> None:
    host, port = stack.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", stack.http_url),
            (":path", GRPC + "ModelInfer"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("content-length", str(MAX_REQUEST_BYTES + 1)),
        ]
        conn.send_headers(1, headers)
        sock.sendall(conn.data_to_send())
        answer: dict[bytes, bytes] = {}
        deadline = time.time() + TIMEOUT_S
        while b"grpc-status" not in answer and time.time() < deadline:
            for event in conn.receive_data(sock.recv(65536)):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    answer.update((bytes(k), bytes(v)) for k, v in event.headers)
            sock.sendall(conn.data_to_send())
    assert answer[b":status"] == b"200", answer
    assert answer[b"grpc-status"] == b"8", answer  # RESOURCE_EXHAUSTED, not UNKNOWN
    assert str(MAX_REQUEST_BYTES).encode() in answer.get(b"grpc-message", b""), answer


def test_l2_a_stream_serves_only_the_model_it_was_routed_for(stack: Stack) -> None:
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client = grpcclient.InferenceServerClient(stack.http_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    got = []
    try:
        for model, width in (("mlp_classifier", 16), ("mlp_classifier", 16), ("timed_batch", 4)):
            inputs = [grpcclient.InferInput("INPUT0", [1, width], "FP32")]
            inputs[0].set_data_from_numpy(np.ones((1, width), np.float32))
            client.async_stream_infer(model, inputs)
            got.append(answers.get(timeout=TIMEOUT_S))
    finally:
        client.stop_stream()
    assert [error for _, error in got[:2]] == [None, None], got
    # The stream went to a host picked for mlp_classifier: another model's message ends it. Its answers have
    # begun, so Envoy can only reset it; the reason is in the picker's log.
    result, error = got[2]
    assert result is None and "RST_STREAM" in str(error), got
    wait_for(lambda: "a stream serves one model" in stack.log("picker"), TIMEOUT_S, "the refusal's log line")
    models_still_ready(stack)


# ------------------------------------------------------------------------------------ H1 long headers


def test_h1_long_request_lines_and_headers_get_431_and_eject_nothing(stack: Stack) -> None:
    long_query = "/v2/models/mlp_classifier/infer?q=" + "a" * 20_000
    for _ in range(20):
        assert request(stack, long_query, MLP)[0] == 431
        assert request(stack, "/v2/models/mlp_classifier/infer", MLP, [("x-pad", "b" * 20_000)])[0] == 431
    # The CPU tier's one host still serves its model (the fixture checks that nothing was ejected).
    status, host = served_by(stack, "/v2/models/mlp_classifier/infer", MLP)
    assert status == 200 and host.endswith(str(stack.host("triton-c")["http_port"]))


# ---------------------------------------------------------------------------- H2 sequence slots


def sequence_body(seq: int, start: bool = False, end: bool = False) -> bytes:
    return json.dumps(
        {
            "parameters": {"sequence_id": seq, "sequence_start": start, "sequence_end": end},
            "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [1]}],
        }
    ).encode()


def test_h2_sequences_that_never_end_get_429_not_a_hang(stack: Stack) -> None:
    """seq_accumulate keeps 64 sequences per host (oldest strategy) and an idle one for 60 s; beyond that a
    new sequence would wait in Triton's backlog. 140 starts that never end, from one client: the ones over
    its share of the slots (half) are answered 429 with retry-after at once instead of hanging, and the
    same client's next new sequences too; another client (another address) still starts and ends its
    own."""
    path = "/v2/models/seq_accumulate/infer"

    def start(seq: int) -> tuple[int, int, float]:
        began = time.monotonic()
        status, _, _ = request(stack, path, sequence_body(seq, start=True))
        return seq, status, time.monotonic() - began

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        attack = list(pool.map(start, range(300_000, 300_140)))
    try:
        statuses = Counter(status for _, status, _ in attack)
        assert set(statuses) <= {200, 429} and statuses[429] > 0, statuses
        assert max(took for _, _, took in attack) < 5.0
        assert statuses[200] <= 64, statuses  # half of each GPU host's slots
        for seq in range(400_000, 400_004):
            began = time.monotonic()
            status, headers, answer = request(stack, path, sequence_body(seq, start=True, end=True))
            assert time.monotonic() - began < 2.0
            assert status == 429 and headers.get("retry-after") == "1", (status, answer)
            status, _, answer = request(stack, path, sequence_body(seq + 10, start=True, end=True), source="127.0.0.2")
            assert status == 200, (status, answer)
    finally:
        for seq, status, _ in attack:
            if status == 200:
                request(stack, path, sequence_body(seq, end=True))
    # Ended sequences free their slots: a new one is served again.
    assert request(stack, path, sequence_body(400_100, start=True, end=True))[0] == 200


# ------------------------------------------------------------------------------------ H3 late bodies


def _collect(into: list[object], result: object, error: object) -> None:
    into.append(error or result)


def test_h3_a_stream_whose_first_request_comes_late_is_routed_by_the_picker(stack: Stack) -> None:
    """tritonclient's start_stream() opens the stream at once and sends requests later; mlp_classifier is
    on triton-a alone in the GPU tier, so a stream that failed open to the GPU tier would land on triton-b
    half the time and fail; Envoy's count of timed-out waits says so every time."""
    timeouts = envoy_stat(stack, "ext_proc.message_timeouts")
    for _ in range(2):
        results: list[object] = []
        client = grpcclient.InferenceServerClient(stack.http_url)
        client.start_stream(callback=functools.partial(_collect, results), headers={"x-triton-tier-hint": "gpu"})
        time.sleep(LATE_S)
        x = np.ones((1, 16), np.float32)
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32")]
        inputs[0].set_data_from_numpy(x)
        client.async_stream_infer("mlp_classifier", inputs)
        deadline = time.time() + TIMEOUT_S
        while not results and time.time() < deadline:
            time.sleep(0.01)
        client.stop_stream()
        client.close()
        assert results and not isinstance(results[0], Exception), results
    assert envoy_stat(stack, "ext_proc.message_timeouts") == timeouts


def test_h3_a_rest_sequence_body_that_lags_its_headers_keeps_its_host(stack: Stack) -> None:
    def send(seq: int, start: bool, delay_s: float) -> tuple[int, str]:
        body = json.dumps(
            {
                "parameters": {"sequence_id": seq, "sequence_start": start},
                "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [1]}],
            }
        ).encode()
        host, port = stack.http_url.split(":")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
            sock.sendall(
                b"POST /v2/models/seq_accumulate/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
            )
            time.sleep(delay_s)
            sock.sendall(body)
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        head = data.partition(b"\r\n\r\n")[0].decode()
        served = [
            line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("x-triton-host")
        ]
        return int(head.split()[1]), served[0] if served else ""

    timeouts = envoy_stat(stack, "ext_proc.message_timeouts")
    for seq in range(7100, 7103):
        status, home = send(seq, True, 0.0)
        assert status == 200
        assert send(seq, False, LATE_S) == (200, home)
    assert envoy_stat(stack, "ext_proc.message_timeouts") == timeouts


# ------------------------------------------------------------------------------------ H4 stream caps


def test_h4_streams_per_connection_are_capped(stack: Stack) -> None:
    host, port = stack.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        settings: dict[int, int] = {}
        deadline = time.time() + TIMEOUT_S
        while not settings and time.time() < deadline:
            for event in conn.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    settings = {k: v.new_value for k, v in event.changed_settings.items()}
    assert settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 100


STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
STREAMS_PER_CLIENT = 100  # picker.max_streams_per_client (the default)


async def _open_stream(channel: grpc.aio.Channel, closed: asyncio.Event) -> tuple[grpc.StatusCode, object]:
    """A ModelStreamInfer stream that sends one request, reads its answer and stays open until ``closed``:
    (OK, the call) once answered; (the status, None) if refused."""
    request = service_pb2.ModelInferRequest(model_name="embed_normalize")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\0" * 16)

    async def requests() -> AsyncIterator[bytes]:
        yield request.SerializeToString()
        await closed.wait()

    method: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(STREAM_INFER)
    call = method(requests(), timeout=TIMEOUT_S * 4)
    try:
        answer = await call.read()
    except grpc.aio.AioRpcError as exc:
        return exc.code(), None
    if answer is grpc.aio.EOF:
        return await call.code(), None
    return grpc.StatusCode.OK, call


async def _open_stream_answered(
    channel: grpc.aio.Channel, closed: asyncio.Event, attempts: int = 5
) -> tuple[grpc.StatusCode, object]:
    """:func:`_open_stream`, again while the answer is INTERNAL: on these routes Envoy fails a stream closed
    when the picker answers after its message timeout (a loaded machine), which says nothing about the
    limit; any other answer is returned at once."""
    for _ in range(attempts - 1):
        code, call = await _open_stream(channel, closed)
        if code is not grpc.StatusCode.INTERNAL:
            return code, call
        await asyncio.sleep(0.5)
    return await _open_stream(channel, closed)


def test_h4_one_client_holds_at_most_its_streams_open(stack: Stack) -> None:
    """Each long-lived stream holds memory in Envoy, the picker and Triton: one client (here, its address)
    may hold picker.max_streams_per_client open; the next is refused with RESOURCE_EXHAUSTED before any
    host sees it, and one closed makes room again."""

    async def scenario() -> tuple[list[grpc.StatusCode], grpc.StatusCode, grpc.StatusCode]:
        closed = asyncio.Event()
        # Envoy takes 100 streams per connection: two connections.
        channels = [
            grpc.aio.insecure_channel(stack.http_url, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(2)
        ]
        try:
            # Ten at a time: a hundred at once can keep the picker past Envoy's message timeout on a busy
            # machine, and a stream Envoy lets through without the picker (failing open) is not counted.
            held: list[tuple[grpc.StatusCode, object]] = []
            for batch in range(0, STREAMS_PER_CLIENT, 10):
                opened = (
                    _open_stream(channels[i % 2], closed) for i in range(batch, min(batch + 10, STREAMS_PER_CLIENT))
                )
                held += await asyncio.gather(*opened)
            over, _ = await _open_stream_answered(channels[0], closed)
            first = held[0][1]
            assert isinstance(first, grpc.aio.Call)
            first.cancel()
            await asyncio.sleep(1.0)  # Envoy ends the picker's stream of the cancelled call
            again, _ = await _open_stream_answered(channels[1], closed)
            return [code for code, _ in held], over, again
        finally:
            closed.set()
            for channel in channels:
                await channel.close()

    held, over, again = asyncio.run(scenario())
    assert held == [grpc.StatusCode.OK] * STREAMS_PER_CLIENT
    assert over is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert again is grpc.StatusCode.OK


# ------------------------------------------------------------------------------------ M1 sequence pins


def sequence_picks(stack: Stack, model: str, since: float) -> list[str]:
    """The reasons of the picker's decisions for ``model`` since ``since`` (its debug log)."""
    reasons = []
    for line in stack.log("picker").splitlines():
        if '"routed"' in line and f'"model": "{model}"' in line:
            record = json.loads(line)
            at = dt.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
            if at >= since:
                reasons.append(str(record["reason"]))
    return reasons


def test_m1_a_correlation_id_does_not_pin_other_models(stack: Stack) -> None:
    since = time.time()
    for _ in range(10):
        assert request(stack, "/v2/models/timed_batch/infer", TIMED_BATCH, [("x-triton-sequence-id", "4")])[0] == 200
    sequence = json.dumps(
        {
            "parameters": {"sequence_id": 4, "sequence_start": True, "sequence_end": True},
            "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [1]}],
        }
    ).encode()
    for _ in range(3):
        assert request(stack, "/v2/models/seq_accumulate/infer", sequence)[0] == 200
    time.sleep(0.5)  # the log is written after the answer
    timed = sequence_picks(stack, "timed_batch", since)
    assert len(timed) == 10 and "sequence" not in timed, timed  # balanced like any request
    assert sequence_picks(stack, "seq_accumulate", since) == ["sequence"] * 3


# ------------------------------------------------------------------------------- M2 crafted headers


def test_m2_crafted_lengths_and_deep_json_get_400_not_a_failed_stream(stack: Stack) -> None:
    start = json.dumps(
        {
            "parameters": {"sequence_id": 79, "sequence_start": True, "sequence_end": True},
            "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [1]}],
        }
    ).encode()
    failed = envoy_stat(stack, "ext_proc.streams_failed")
    path = "/v2/models/seq_accumulate/infer"
    host, port = stack.http_url.split(":")
    # A latin-1 '²' that str.isdigit() accepts and int() refuses; http.client would refuse to send it.
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.sendall(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: \xb2\r\n"
            b"Content-Length: %d\r\n\r\n" % len(start) + start
        )
        assert sock.recv(65536).split(b" ")[1] == b"400"
    assert request(stack, path, start, [("inference-header-content-length", "1" * 5000)])[0] in (400, 431)
    assert request(stack, path, start, [("inference-header-content-length", "9" * 30)])[0] == 400
    assert request(stack, path, b"[" * 3000 + b"]" * 3000)[0] == 400
    assert request(stack, path, b'{"inputs":' + b"[" * 3000 + b"]" * 3000 + b"}")[0] == 400
    assert envoy_stat(stack, "ext_proc.streams_failed") == failed


def test_n1_a_chunked_body_over_grpcs_default_message_size_is_still_checked(stack: Stack) -> None:
    """Found by the re-run of the review: a chunked REST body reaches the picker whole, as one message;
    over gRPC's default 4 MiB receive limit its stream failed and Envoy sent the body on unchecked (200 from
    a host for a body the picker refuses). Now the picker reads it, and refuses it."""
    failed = envoy_stat(stack, "ext_proc.streams_failed")
    bad = json.dumps(
        {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1]}], "pad": "x" * 5_000_000}
    ).encode()
    assert 4 * 1024 * 1024 < len(bad) < MAX_REQUEST_BYTES
    status, headers, body = request(stack, "/v2/models/timed_batch/infer", bad, [("transfer-encoding", "chunked")])
    assert status == 400, body[:300]
    assert "x-triton-host" not in headers
    assert envoy_stat(stack, "ext_proc.streams_failed") == failed


# ------------------------------------------------------------------------------ M3 chunked sequences


def test_m3_chunked_bodies_keep_their_sequence_host(stack: Stack) -> None:
    path = "/v2/models/seq_accumulate/infer"
    for seq in range(9101, 9105):
        start = json.dumps(
            {
                "parameters": {"sequence_id": seq, "sequence_start": True},
                "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [1]}],
            }
        ).encode()
        status, home = served_by(stack, path, start)
        assert status == 200
        follow = start.replace(b'"sequence_start": true', b'"sequence_start": false')
        for _ in range(3):
            assert served_by(stack, path, follow, [("transfer-encoding", "chunked")]) == (200, home)


# ------------------------------------------------------------------------------ M8 sequence ownership


def test_m8_another_client_cannot_touch_a_sequence(stack: Stack) -> None:
    """The victim (127.0.0.1) runs sequence 9201; another client (127.0.0.2) sending the same id, to add to
    it, end it or restart it, gets 403 and the victim's sum goes on unharmed. Once the victim ends it, the
    id is anyone's."""
    path = "/v2/models/seq_accumulate/infer"

    def send(value: float, source: str | None = None, **flags: bool) -> tuple[int, bytes]:
        body = json.dumps(
            {
                "parameters": {"sequence_id": 9201, **flags},
                "inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [value]}],
            }
        ).encode()
        status, _, answer = request(stack, path, body, source=source)
        return status, answer

    def total(answer: bytes) -> float:
        return float(json.loads(answer)["outputs"][0]["data"][0])

    status, answer = send(1.0, sequence_start=True)
    assert status == 200 and total(answer) == 1.0, answer
    for flags in ({}, {"sequence_end": True}, {"sequence_start": True}):
        status, answer = send(1000.0, source="127.0.0.2", **flags)
        assert status == 403 and b"open for another client" in answer, (flags, status, answer)
    status, answer = send(2.0, sequence_end=True)
    assert status == 200 and total(answer) == 3.0, answer
    assert send(5.0, source="127.0.0.2", sequence_start=True, sequence_end=True)[0] == 200


# ------------------------------------------------------------------------------------ M4 log volume


def test_m4_rejections_cost_a_short_rate_limited_log_line(stack: Stack) -> None:
    log = stack.run_dir / "logs" / "picker.log"
    before = log.stat().st_size
    name = "m" * 1000
    for _ in range(300):
        assert request(stack, f"/v2/models/{name}/infer", b"{}")[0] == 404
    grown = log.stat().st_size - before
    # Ten lines a second at most, each with at most 64 characters of the client's model name.
    lines = [line for line in log.read_text().splitlines()[-40:] if '"rejected"' in line]
    assert lines and all(len(line) < 700 for line in lines), lines[-1]
    assert grown < 300 * 100, grown


# ---------------------------------------------------------------------------------- M7 repeated names


def _field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_m7_a_second_model_name_after_the_tensors_is_refused(stack: Stack) -> None:
    tensor = _field(1, b"INPUT0") + _field(2, b"FP32") + _field(3, bytes([1, 4]))
    message = _field(1, b"mlp_classifier") + _field(5, tensor) + _field(1, b"timed_batch") + _field(7, bytes(16))
    assert grpc_call(stack, "ModelInfer", message) is grpc.StatusCode.INVALID_ARGUMENT
    twice = _field(1, b"mlp_classifier") + _field(1, b"timed_batch") + _field(5, tensor) + _field(7, bytes(16))
    assert grpc_call(stack, "ModelInfer", twice) is grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------------ queries of death


def test_a_shape_the_body_cannot_hold_is_refused_before_triton(stack: Stack) -> None:
    for shape in ([1, 1_000_000_000_000], [1_000_000, 1_000_000], [100_000, 100_000]):
        body = json.dumps(
            {"inputs": [{"name": "INPUT", "shape": shape, "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        ).encode()
        status, _, answer = request(stack, "/v2/models/embed_normalize/infer", body)
        # The picker's words: Triton, given the first shape, aborts. (Where Envoy chose the host before the
        # body's verdict came, its answer names that host in x-triton-host; the host never had the body.)
        assert status == 400 and "'INPUT'" in (error := json.loads(answer)["error"]), answer
        assert "takes the request over its limit" in error, answer


# ------------------------------------------------------------ bodies the picker checked reach Triton intact


def send_in_pieces(
    stack: Stack, path: str, head: list[tuple[str, str]], body: bytes, piece: int, pause_s: float
) -> bytes:
    """A request whose headers go first and whose body follows in ``piece``-byte writes ``pause_s`` apart;
    returns the raw response."""
    host, port = stack.http_url.split(":")
    lines = [f"POST {path} HTTP/1.1", f"Host: {stack.http_url}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in head]
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        for at in range(0, len(body), piece):
            time.sleep(pause_s)
            sock.sendall(body[at : at + piece])
        response = http.client.HTTPResponse(sock)
        response.begin()
        answer = response.read()
        assert response.status == 200, (response.status, answer[:300])
        return answer


@pytest.mark.parametrize(("piece", "pause_s"), [(16_384, 0.05), (1 << 20, 0.2), (1 << 20, 0.0)])
def test_x1_a_checked_rest_body_reaches_triton_once(stack: Stack, piece: int, pause_s: float) -> None:
    """The picker checks a REST body's tensor headers as the body passes; once they have their verdict the
    rest must reach Triton exactly as sent (a body chunk delivered twice made Triton refuse valid requests)."""
    x = np.random.default_rng(piece).random((1, 20_000), dtype=np.float32)
    binary = {"name": "INPUT", "shape": [1, 20_000], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
    head = json.dumps({"inputs": [binary], "outputs": [{"name": "NORM"}]}).encode()
    body = head + x.tobytes()
    answer = send_in_pieces(
        stack,
        "/v2/models/embed_normalize/infer",
        [("Inference-Header-Content-Length", str(len(head)))],
        body,
        piece,
        pause_s,
    )
    (norm,) = [o for o in json.loads(answer)["outputs"] if o["name"] == "NORM"]
    assert norm["data"][0] == pytest.approx(float(np.linalg.norm(x)), rel=1e-5)
    # JSON data, padded past a few MB: the part after the verdict is most of the body.
    padded = json.dumps({"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP32", "data": [3, 0, 4, 0]}]})
    padded = padded[:-1] + " " * (3 << 20) + "}"
    answer = send_in_pieces(stack, "/v2/models/embed_normalize/infer", [], padded.encode(), piece, pause_s)
    (norm,) = [o for o in json.loads(answer)["outputs"] if o["name"] == "NORM"]
    assert norm["data"] == [5.0]


def test_nothing_was_logged_as_a_picker_error(stack: Stack) -> None:
    """Last: every threat above was answered on purpose, none by an exception in the picker."""
    assert '"picker_error"' not in stack.log("picker")
