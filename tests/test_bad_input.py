"""Bad input on the real stack: malformed bodies, oversized bodies, hostile model names, header abuse, garbage
gRPC frames and HTTP/2 misuse. Each case must get a clear answer (a 4xx, a gRPC error status, or for a broken
HTTP/2 connection a GOAWAY/reset) from Envoy, the picker or Triton, without a hang; after each one the picker
and Envoy are still up, no Triton host was ejected, and REST and gRPC inference still work.

Every case prints one row of the table in docs/faults.md (``pytest -s``).
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import struct
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from tests.stack import (
    Stack,
    alive,
    module_stack,
    pid_of,
    remove_orphaned,
    routable,
    triton_shm_regions,
)

pytestmark = pytest.mark.e2e

MAX_REQUEST_BYTES = 1024 * 1024  # envoy.max_request_bytes of this module's fleet
TIMEOUT_S = 20.0  # no case may take this long: a hang fails the test
INFER = "/v2/models/embed_normalize/infer"
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from module_stack(tmp_path_factory, "bad_input", MAX_REQUEST_BYTES)


# ------------------------------------------------------------------------------------------------ clients


def tensor(
    name: str = "INPUT", shape: Sequence[int] = (1, 4), datatype: str = "FP32", data: object = None
) -> dict[str, object]:
    return {
        "name": name,
        "shape": list(shape),
        "datatype": datatype,
        "data": data if data is not None else [1, 2, 3, 4],
    }


def json_body(**fields: object) -> bytes:
    return json.dumps({"inputs": [tensor()], **fields}).encode()


def http1(
    stack: Stack,
    path: str,
    body: bytes | None = None,
    headers: Sequence[tuple[str, str]] = (),
    method: str = "POST",
    chunked: bool = False,
) -> tuple[int, bytes]:
    """One HTTP/1.1 request (headers may repeat); returns the status and the body."""
    host, port = stack.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in headers:
            conn.putheader(key, value)
        if chunked:
            conn.putheader("transfer-encoding", "chunked")
        elif body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders()
        if body is not None and chunked:
            for i in range(0, len(body), 64 * 1024):
                chunk = body[i : i + 64 * 1024]
                conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            conn.send(b"0\r\n\r\n")
        elif body is not None:
            conn.send(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def raw_http1(stack: Stack, data: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read what comes back until the connection closes or a whole response has arrived."""
    host, port = stack.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
            0,
        )
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    assert head.startswith(b"HTTP/1.1 "), f"no HTTP response: {received[:200]!r}"
    return int(head.split()[1]), body


def grpc_raw(stack: Stack, message: bytes, method: str = GRPC_INFER) -> str:
    """A gRPC call with ``message`` as the serialized request (real gRPC framing, HTTP/2)."""
    with grpc.insecure_channel(stack.http_url) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        try:
            call(message, timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            return f"grpc {exc.code().name}"
    return "grpc OK"


def infer_request(model: str = "embed_normalize", version: str = "", datatype: str = "FP32", nbytes: int = 16) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="INPUT", datatype=datatype, shape=[1, 4])
    request.raw_input_contents.append(b"\0" * nbytes)
    return bytes(request.SerializeToString())


def grpc_over_http1(stack: Stack, body: bytes, encoding: str | None = None) -> str:
    """A gRPC request body sent as-is (frame prefix included) over HTTP/1.1: the framing is ours to break.
    Envoy routes it like any gRPC call (content-type application/grpc) and answers with a grpc-status."""
    headers = [("content-type", "application/grpc"), ("te", "trailers")]
    if encoding is not None:
        headers.append(("grpc-encoding", encoding))
    host, port = stack.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    try:
        conn.request("POST", GRPC_INFER, body=body, headers=dict(headers))
        response = conn.getresponse()
        response.read()
        return f"grpc-status {response.getheader('grpc-status')}"
    finally:
        conn.close()


def frame(payload: bytes, flag: int = 0, length: int | None = None) -> bytes:
    return struct.pack(">BI", flag, len(payload) if length is None else length) + payload


# -------------------------------------------------------------------------------- a minimal HTTP/2 client


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_H2_ERRORS = {
    0: "NO_ERROR",
    1: "PROTOCOL_ERROR",
    2: "INTERNAL_ERROR",
    3: "FLOW_CONTROL_ERROR",
    6: "FRAME_SIZE_ERROR",
    7: "REFUSED_STREAM",
    8: "CANCEL",
    9: "COMPRESSION_ERROR",
    11: "ENHANCE_YOUR_CALM",
}
_STATIC_STATUS = {0x88: "200", 0x89: "204", 0x8A: "206", 0x8B: "304", 0x8C: "400", 0x8D: "404", 0x8E: "500"}


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def hpack(headers: Sequence[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing, no Huffman: enough to say anything, valid or not."""
    out = b""
    for name, value in headers:
        out += b"\x00" + _hpack_int(len(name), 7) + name.encode() + _hpack_int(len(value), 7) + value.encode()
    return out


def h2_headers(stream: int, headers: Sequence[tuple[str, str]], end_stream: bool = True) -> bytes:
    return h2_frame(1, 0x4 | (0x1 if end_stream else 0), stream, hpack(headers))


H2_GET = [(":method", "GET"), (":scheme", "http"), (":path", "/v2/health/ready"), (":authority", "gateway")]
H2_POST = [(":method", "POST"), (":scheme", "http"), (":path", INFER), (":authority", "gateway")]


def h2_exchange(stack: Stack, frames: bytes, wait_s: float = 5.0) -> str:
    """Send a client preface, SETTINGS and ``frames``; describe the first thing the server does about them:
    ``GOAWAY <error>``, ``RST_STREAM <error>``, ``:status <code>`` or ``closed``."""
    host, port = stack.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        try:
            sock.sendall(frames if frames.startswith(b"PRI") else _H2_PREFACE + h2_frame(4, 0, 0) + frames)
        except (ConnectionResetError, BrokenPipeError):
            return "closed"
        received = b""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                chunk = b""
            received += chunk
            for event in _h2_events(received):
                if event is not None:
                    return event
            if not chunk:
                return "closed"
    return "no answer"


def _h2_events(data: bytes) -> Iterator[str | None]:
    pos = 0
    while pos + 9 <= len(data):
        length, kind, flags = int.from_bytes(data[pos : pos + 3], "big"), data[pos + 3], data[pos + 4]
        payload = data[pos + 9 : pos + 9 + length]
        if len(payload) < length:
            return
        pos += 9 + length
        if kind == 7:
            yield f"GOAWAY {_H2_ERRORS.get(int.from_bytes(payload[4:8], 'big'), '?')}"
        elif kind == 3:
            yield f"RST_STREAM {_H2_ERRORS.get(int.from_bytes(payload[:4], 'big'), '?')}"
        elif kind == 1:
            yield f":status {_STATIC_STATUS.get(payload[0], 'other')}" if payload else ":status ?"
        del flags


# ------------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    kind: str
    send: Callable[[Stack], str]
    expect: frozenset[str]
    by: str


def status_of(result: tuple[int, bytes], json_error: bool = True) -> str:
    status, body = result
    if json_error and 400 <= status < 600:
        assert "error" in json.loads(body), body
    return str(status)


def case(kind: str, send: Callable[[Stack], str], expect: str | Sequence[str], by: str) -> Case:
    return Case(kind, send, frozenset([expect] if isinstance(expect, str) else expect), by)


OVERSIZED = b'{"inputs": [], "pad": "' + b"x" * (MAX_REQUEST_BYTES + 1) + b'"}'
HOSTILE_H2 = "GOAWAY PROTOCOL_ERROR", "closed", "RST_STREAM PROTOCOL_ERROR"

CASES = [
    # REST bodies: Triton's answers (Triton 2.51 answers 500, not 400, to a body it cannot parse)
    case(
        "malformed JSON", lambda s: status_of(http1(s, INFER, b'{"inputs": [')), "400", "picker (tensor header check)"
    ),
    case(
        "JSON array instead of object",
        lambda s: status_of(http1(s, INFER, b"[1, 2, 3]")),
        "400",
        "picker (tensor header check)",
    ),
    case("no 'inputs'", lambda s: status_of(http1(s, INFER, b"{}")), "400", "picker (tensor header check)"),
    case(
        "'data' does not match 'shape'",
        lambda s: status_of(http1(s, INFER, json.dumps({"inputs": [tensor(shape=(1, 5))]}).encode())),
        ("400", "500"),
        "picker (tensor header check)",
    ),
    case(
        "strings as FP32 data",
        lambda s: status_of(http1(s, INFER, json.dumps({"inputs": [tensor(data=["a", "b", "c", "d"])]}).encode())),
        ("400", "500"),
        "picker (tensor header check)",
    ),
    case(
        "negative dimension",
        lambda s: status_of(http1(s, INFER, json.dumps({"inputs": [tensor(shape=(-1, 4))]}).encode())),
        ("400", "500"),
        "picker (tensor header check)",
    ),
    case(
        "JSON nested 100 000 deep",
        lambda s: status_of(http1(s, INFER, b'{"inputs": ' + b"[" * 100_000)),
        ("400", "500"),
        "picker (tensor header check)",
    ),
    case(
        "wrong datatype (INT32 for FP32)",
        lambda s: status_of(http1(s, INFER, json.dumps({"inputs": [tensor(datatype="INT32")]}).encode())),
        "400",
        "Triton",
    ),
    case(
        "unknown datatype",
        lambda s: status_of(http1(s, INFER, json.dumps({"inputs": [tensor(datatype="FP99")]}).encode())),
        "400",
        "picker (tensor header check)",
    ),
    case(
        "unknown input name",
        lambda s: status_of(http1(s, INFER, json.dumps({"inputs": [tensor(name="NOPE")]}).encode())),
        "400",
        "Triton",
    ),
    case(
        "wrong rank",
        lambda s: status_of(http1(s, INFER, json.dumps({"inputs": [tensor(shape=(4,))]}).encode())),
        "400",
        "Triton",
    ),
    case(
        "batch above max_batch_size",
        lambda s: status_of(http1(s, INFER, json.dumps({"inputs": [tensor(shape=(33, 1), data=[1] * 33)]}).encode())),
        "400",
        "Triton",
    ),
    case(
        "unknown output requested",
        lambda s: status_of(http1(s, INFER, json_body(outputs=[{"name": "NOPE"}]))),
        "400",
        "Triton",
    ),
    case(
        "binary-data header larger than the body",
        lambda s: status_of(http1(s, INFER, json_body(), [("inference-header-content-length", "99999")])),
        "400",
        "picker (tensor header check)",
    ),
    case("GET on an inference URL", lambda s: status_of(http1(s, INFER, method="GET")), "405", "Triton"),
    # body size: Envoy
    case(
        "body over envoy.max_request_bytes (content-length)",
        lambda s: status_of(
            raw_http1(
                s, f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-length: {MAX_REQUEST_BYTES + 1}\r\n\r\n".encode()
            )
        ),
        "413",
        "Envoy, before reading the body",
    ),
    case(
        "chunked body over envoy.max_request_bytes",
        lambda s: status_of(http1(s, INFER, OVERSIZED, chunked=True), json_error=False),
        "413",
        "Envoy (buffer filter)",
    ),
    case(
        "body of 900 KiB, under the limit (chunked)",
        lambda s: status_of(http1(s, INFER, json_body(pad="x" * 900 * 1024), chunked=True)),
        "200",
        "Triton (not a bad input: the limit lets it through)",
    ),
    # model names and paths
    case(
        "path traversal /v2/models/../../../etc/passwd",
        lambda s: status_of(raw_http1(s, b"GET /v2/models/../../../etc/passwd HTTP/1.1\r\nhost: x\r\n\r\n")),
        "404",
        "Envoy (path normalised, then no route)",
    ),
    case(
        "percent-encoded ../ as model name",
        lambda s: status_of(http1(s, "/v2/models/%2e%2e/infer", json_body())),
        "403",
        "Envoy (normalised to /v2/infer: not a client API)",
    ),
    case(
        "encoded slash in model name",
        lambda s: status_of(http1(s, "/v2/models/a%2Fb/infer", json_body()), json_error=False),
        "400",
        "Envoy",
    ),
    case(
        "model name over 1 KiB",
        lambda s: status_of(http1(s, f"/v2/models/{'x' * 5000}/infer", json_body())),
        "400",
        "picker",
    ),
    case(
        "model name not UTF-8",
        lambda s: status_of(http1(s, "/v2/models/%ff%fe/infer", json_body())),
        "400",
        "picker",
    ),
    case(
        "control character in model name",
        lambda s: status_of(http1(s, "/v2/models/a%01b/infer", json_body())),
        "400",
        "picker",
    ),
    case(
        "NUL in model name",
        lambda s: status_of(http1(s, "/v2/models/a%00b/infer", json_body()), json_error=False),
        "400",
        "Envoy",
    ),
    case(
        "raw non-ASCII bytes in the path",
        lambda s: status_of(raw_http1(s, b"GET /v2/models/\xff\xfe/ready HTTP/1.1\r\nhost: x\r\n\r\n"), False),
        "400",
        "Envoy",
    ),
    case(
        "unknown model",
        lambda s: status_of(http1(s, "/v2/models/no_such_model/infer", json_body())),
        "404",
        "picker",
    ),
    case(
        "unknown version",
        lambda s: status_of(http1(s, "/v2/models/embed_normalize/versions/99/infer", json_body())),
        "404",
        "picker",
    ),
    case(
        "non-numeric version",
        lambda s: status_of(http1(s, "/v2/models/embed_normalize/versions/latest/infer", json_body())),
        "404",
        "picker",
    ),
    case("path outside Triton's API", lambda s: status_of(http1(s, "/admin/quitquitquit", b"")), "404", "Envoy"),
    # headers
    case(
        "200 request headers",
        lambda s: status_of(http1(s, INFER, json_body(), [(f"x-h{i}", "v") for i in range(200)]), False),
        "431",
        "Envoy",
    ),
    case(
        "one 100 KiB header",
        lambda s: status_of(http1(s, INFER, json_body(), [("x-big", "v" * 100 * 1024)]), False),
        "431",
        "Envoy",
    ),
    case(
        "control character in a header value",
        lambda s: status_of(
            raw_http1(
                s, f"POST {INFER} HTTP/1.1\r\nhost: x\r\nx-bad: a\x01b\r\ncontent-length: 2\r\n\r\n{{}}".encode()
            ),
            False,
        ),
        "400",
        "Envoy",
    ),
    case(
        "content-length and transfer-encoding together",
        lambda s: status_of(
            raw_http1(
                s,
                f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
                "0\r\n\r\n".encode(),
            ),
            False,
        ),
        "400",
        "Envoy",
    ),
    case(
        "garbage request line",
        lambda s: status_of(raw_http1(s, b"\x16\x03\x01 nonsense\r\n\r\n"), False),
        "400",
        "Envoy",
    ),
    case(
        "unknown tier hint",
        lambda s: status_of(http1(s, INFER, json_body(), [("x-triton-tier-hint", "quantum")])),
        "200",
        "ignored (the model's default tier)",
    ),
    # gRPC messages (real gRPC client)
    case("gRPC: message that is not protobuf", lambda s: grpc_raw(s, b"\xff" * 32), "grpc INVALID_ARGUMENT", "picker"),
    case(
        "gRPC: ModelInfer without a model name",
        lambda s: grpc_raw(s, infer_request(model="")),
        "grpc INVALID_ARGUMENT",
        "picker",
    ),
    case(
        "gRPC: model name not UTF-8",
        lambda s: grpc_raw(s, b"\x0a\x02\xff\xfe"),
        "grpc INVALID_ARGUMENT",
        "picker",
    ),
    case("gRPC: unknown model", lambda s: grpc_raw(s, infer_request(model="nope")), "grpc NOT_FOUND", "picker"),
    case("gRPC: unknown version", lambda s: grpc_raw(s, infer_request(version="99")), "grpc NOT_FOUND", "picker"),
    case(
        "gRPC: wrong datatype",
        lambda s: grpc_raw(s, infer_request(datatype="INT64")),
        "grpc INVALID_ARGUMENT",
        "Triton",
    ),
    case(
        "gRPC: tensor bytes do not match the shape",
        lambda s: grpc_raw(s, infer_request(nbytes=15)),
        "grpc INVALID_ARGUMENT",
        "Triton",
    ),
    case(
        "gRPC: unknown method",
        lambda s: grpc_raw(s, b"", "/inference.GRPCInferenceService/Nope"),
        "grpc PERMISSION_DENIED",
        "Envoy (not a client method)",
    ),
    case("gRPC: unknown service", lambda s: grpc_raw(s, b"", "/nope.Nope/Nope"), "grpc UNIMPLEMENTED", "Envoy"),
    # gRPC framing (over HTTP/1.1, so the frame prefix is ours)
    case(
        "gRPC frame with an invalid flag byte",
        lambda s: grpc_over_http1(s, frame(infer_request(), flag=7)),
        "grpc-status 3",
        "picker (INVALID_ARGUMENT)",
    ),
    case(
        "gRPC frame shorter than its length prefix",
        lambda s: grpc_over_http1(s, frame(b"\x0a\x03", length=100)),
        "grpc-status 3",
        "picker (INVALID_ARGUMENT)",
    ),
    case(
        "gRPC body shorter than a frame header",
        lambda s: grpc_over_http1(s, b"\x00\x00"),
        "grpc-status 3",
        "picker (INVALID_ARGUMENT)",
    ),
    case(
        "compressed gRPC frame, unsupported grpc-encoding",
        lambda s: grpc_over_http1(s, frame(infer_request(), flag=1), encoding="snappy"),
        "grpc-status 12",
        "Envoy (UNIMPLEMENTED: compressed gRPC is off, envoy.allow_grpc_compression)",
    ),
    case(
        "compressed gRPC frame, corrupt gzip",
        lambda s: grpc_over_http1(s, frame(gzip.compress(infer_request())[:10] + b"\xff" * 20, flag=1), "gzip"),
        "grpc-status 12",
        "Envoy (UNIMPLEMENTED)",
    ),
    case(
        "compressed gRPC frame, valid gzip",
        lambda s: grpc_over_http1(s, frame(gzip.compress(infer_request()), flag=1), "gzip"),
        "grpc-status 12",
        "Envoy (UNIMPLEMENTED)",
    ),
    case(
        "compressed gRPC frame without a grpc-encoding",
        lambda s: grpc_over_http1(s, frame(gzip.compress(infer_request()), flag=1)),
        "grpc-status 3",
        "picker (INVALID_ARGUMENT)",
    ),
    # HTTP/2 misuse (raw frames): the connection or stream is refused, nothing hangs
    case(
        "HTTP/2: bad connection preface",
        lambda s: h2_exchange(s, b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
        HOSTILE_H2,
        "Envoy",
    ),
    case("HTTP/2: DATA on an idle stream", lambda s: h2_exchange(s, h2_frame(0, 1, 1, b"hi")), HOSTILE_H2, "Envoy"),
    case("HTTP/2: HEADERS on stream 0", lambda s: h2_exchange(s, h2_headers(0, H2_GET)), HOSTILE_H2, "Envoy"),
    case("HTTP/2: even (server-side) stream id", lambda s: h2_exchange(s, h2_headers(2, H2_GET)), HOSTILE_H2, "Envoy"),
    case(
        "HTTP/2: upper-case header name",
        lambda s: h2_exchange(s, h2_headers(1, [*H2_GET, ("X-Triton-Lb-Hosts", "127.0.0.1:1")])),
        HOSTILE_H2,
        "Envoy",
    ),
    case(
        "HTTP/2: no :path",
        lambda s: h2_exchange(s, h2_headers(1, [h for h in H2_GET if h[0] != ":path"])),
        HOSTILE_H2,
        "Envoy",
    ),
    case(
        "HTTP/2: connection-specific header",
        lambda s: h2_exchange(s, h2_headers(1, [*H2_GET, ("connection", "keep-alive")])),
        HOSTILE_H2,
        "Envoy",
    ),
    case(
        "HTTP/2: body longer than its content-length",
        lambda s: h2_exchange(
            s, h2_headers(1, [*H2_POST, ("content-length", "10")], end_stream=False) + h2_frame(0, 1, 1, b"x" * 20)
        ),
        HOSTILE_H2,
        "Envoy",
    ),
    case(
        "HTTP/2: SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
        lambda s: h2_exchange(s, _H2_PREFACE + h2_frame(4, 0, 0, struct.pack(">HI", 4, 2**31))),
        ("GOAWAY FLOW_CONTROL_ERROR", *HOSTILE_H2),
        "Envoy",
    ),
    case(
        "HTTP/2: CONTINUATION flood (6 MB of headers)",
        lambda s: h2_exchange(
            s,
            h2_frame(1, 0, 1, hpack(H2_GET))
            + b"".join(h2_frame(9, 0, 1, hpack([("abc", "def")] * 100)) for _ in range(6000)),
        ),
        ("RST_STREAM INTERNAL_ERROR", "GOAWAY ENHANCE_YOUR_CALM", *HOSTILE_H2),
        "Envoy",
    ),
    case(
        "HTTP/2: rapid reset (500 streams opened and cancelled)",
        lambda s: h2_exchange(
            s,
            b"".join(
                h2_headers(2 * i + 1, H2_POST, end_stream=False) + h2_frame(3, 0, 2 * i + 1, struct.pack(">I", 8))
                for i in range(500)
            )
            + h2_headers(1001, H2_GET),
        ),
        (":status 200", "GOAWAY ENHANCE_YOUR_CALM", *HOSTILE_H2),
        "Envoy",
    ),
]


def still_serving(stack: Stack) -> None:
    """REST and gRPC inference work, the picker and Envoy are the same processes, no host was ejected."""
    status, body = http1(stack, INFER, json_body())
    assert status == 200, body
    assert grpc_raw(stack, infer_request()) == "grpc OK"
    for name in ("picker", "envoy"):
        assert alive(pid_of(stack, name)), f"{name} died:\n{stack.log(name)[-3000:]}"
    with urllib.request.urlopen(f"{stack.admin_url}/clusters", timeout=5) as response:
        clusters = response.read().decode()
    assert "failed_outlier_check" not in clusters, clusters


@pytest.mark.parametrize("bad", CASES, ids=[c.kind for c in CASES])
def test_bad_input_is_refused_and_harmless(stack: Stack, bad: Case) -> None:
    started = time.monotonic()
    outcome = bad.send(stack)
    elapsed = time.monotonic() - started
    print(f"\n| {bad.kind} | {outcome} | {bad.by} |")
    assert outcome in bad.expect, f"{bad.kind}: got {outcome}, expected one of {sorted(bad.expect)}"
    assert elapsed < TIMEOUT_S
    still_serving(stack)


def test_case_count() -> None:
    assert len(CASES) >= 20
    assert len({c.kind for c in CASES}) == len(CASES)


def test_bad_requests_do_not_eject_hosts(stack: Stack) -> None:
    """Triton answers 500 to a body it cannot parse. Outlier detection must not count those: otherwise any
    client ejects healthy hosts with a few malformed requests (3 in a row per host)."""
    for _ in range(20):
        status, _ = http1(stack, INFER, b"not json")
        assert status in (400, 500)
        status, _ = http1(stack, "/v2/models/mlp_classifier/infer", b"not json")
        assert status in (400, 500)
    time.sleep(1.0)  # one outlier-detection interval and several picker polls
    still_serving(stack)
    for host in ("triton-a", "triton-b", "triton-c"):
        assert routable(stack, host), stack.picker_status()["hosts"][host]


def test_grpc_message_over_the_limit_is_refused(stack: Stack) -> None:
    width = (MAX_REQUEST_BYTES + 1024) // 4
    request = service_pb2.ModelInferRequest(model_name="embed_normalize")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, width])
    request.raw_input_contents.append(np.ones(width, dtype=np.float32).tobytes())
    message = bytes(request.SerializeToString())
    with grpc.insecure_channel(stack.http_url, options=[("grpc.max_send_message_length", -1)]) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(GRPC_INFER)
        with pytest.raises(grpc.RpcError) as info:
            call(message, timeout=TIMEOUT_S)
    assert isinstance(info.value, grpc.Call)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_numpy_payload_still_works_after_everything(stack: Stack) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    body = json.dumps({"inputs": [tensor(shape=(2, 4), data=x.ravel().tolist())]}).encode()
    status, answer = http1(stack, INFER, body)
    assert status == 200
    outputs = {o["name"]: o["data"] for o in json.loads(answer)["outputs"]}
    np.testing.assert_allclose(outputs["NORM"], np.linalg.norm(x, axis=1), rtol=1e-5)


def test_absurd_shape_does_not_take_hosts_down(stack: Stack) -> None:
    """Triton 2.51 aborts (std::bad_alloc) on a REST tensor whose shape has a huge element count: the picker
    refuses it, since the body cannot hold that many elements."""
    body = json.dumps({"inputs": [tensor(shape=(1_000_000_000, 1_000_000_000))]}).encode()
    regions = [r for name in ("triton-a", "triton-b") for r in triton_shm_regions(pid_of(stack, name))]
    status, _ = http1(stack, INFER, body)
    time.sleep(1.0)
    survivors = [name for name in ("triton-a", "triton-b") if alive(pid_of(stack, name))]
    if survivors != ["triton-a", "triton-b"]:
        remove_orphaned(regions)  # what the aborted servers left in /dev/shm
    assert 400 <= status < 500 and survivors == ["triton-a", "triton-b"], (status, survivors)
