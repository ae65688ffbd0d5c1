"""``python -m benchmarks.fleet.emulator SPEC``: N emulated Triton hosts in one asyncio process.

``SPEC`` is a JSON file ``{"rate": R, "hosts": [{"http_port", "grpc_port", "metrics_port", "gpu"}, ...]}``.
Per host, on loopback:

- its metrics port and its HTTP port: a raw asyncio HTTP/1.1 server (keep-alive) answering ``GET /metrics``
  (the recorded page, :class:`benchmarks.fleet.pages.PageTemplate`, GPU-shaped where ``gpu``),
  ``GET /v2/health/ready`` and ``/v2/health/live`` (200, what Envoy's REST health check asks) and
  ``POST /v2/models/M/infer`` (a fixed answer; the request counts as served by M);
- its gRPC port: one ``grpc.aio`` server listening on every host's gRPC port (one server, not one per host:
  the answers are the same on every host) with ``inference.GRPCInferenceService`` ``RepositoryIndex``,
  ``ModelConfig``, ``ServerLive``, ``ServerReady``, ``ModelReady`` (the recorded answers, serialised once)
  and ``grpc.health.v1.Health/Check`` (SERVING: Envoy's gRPC health check).

Counters advance as Triton's do: each host serves ``rate`` requests/s spread evenly over its models, and
every scrape shows the counters for the requests served so far. Any HTTP port also answers
``GET /emulator/stats`` (JSON: requests seen per host and kind, gRPC calls per method) and
``POST /emulator/rate?r=R`` (every host's rate from now on). Prints ``READY`` on stdout once it serves.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Final

from benchmarks.fleet.pages import PageTemplate, load_template, model_configs, repository_index

READY_LINE: Final = "READY"
_INFER_ANSWER: Final = b'{"model_name":"emulated","outputs":[]}'
_SERVICE: Final = "inference.GRPCInferenceService"
_HEALTH_SERVING: Final = b"\x08\x01"  # grpc.health.v1.HealthCheckResponse{status: SERVING}


class Host:
    """One emulated host's counters and the requests it has seen."""

    __slots__ = ("index", "last", "rate", "seen", "served", "template")

    def __init__(self, index: int, template: PageTemplate, rate: float) -> None:
        self.index = index
        self.template = template
        self.served: dict[str, float] = dict.fromkeys(template.models, 0.0)
        self.rate = rate
        self.last = time.monotonic()
        self.seen: Counter[str] = Counter()

    def advance(self) -> None:
        now = time.monotonic()
        if self.rate > 0:
            each = self.rate * (now - self.last) / len(self.served)
            for model in self.served:
                self.served[model] += each
        self.last = now

    def page(self) -> bytes:
        self.advance()
        return self.template.render(self.served, self.rate)

    def infer(self, model: str) -> None:
        self.advance()
        if model in self.served:
            self.served[model] += 1


class Emulator:
    def __init__(self, spec: dict[str, Any]) -> None:
        templates = {False: load_template(False), True: load_template(True)}
        self.spec = spec
        self.hosts = [
            Host(i, templates[bool(h.get("gpu"))], float(spec.get("rate", 0.0))) for i, h in enumerate(spec["hosts"])
        ]
        self.grpc_calls: Counter[str] = Counter()
        self.other: list[str] = []  # the first requests answered 404, for debugging
        self.started = time.monotonic()

    def stats(self) -> bytes:
        return json.dumps(
            {
                "elapsed_s": time.monotonic() - self.started,
                "hosts": [dict(h.seen) for h in self.hosts],
                "grpc": dict(self.grpc_calls),
                "other": self.other,
            }
        ).encode()

    def set_rate(self, rate: float) -> None:
        for host in self.hosts:
            host.advance()
            host.rate = rate


def _response(status: str, body: bytes, content_type: bytes = b"text/plain; charset=utf-8") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def _chunked_end(buffer: bytes, at: int) -> int:
    """Where the chunked body starting at ``at`` ends (after the last chunk and trailers), -1 if incomplete."""
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return -1
        size = int(buffer[at:line_end].partition(b";")[0], 16)
        if size == 0:
            trailers_end = buffer.find(b"\r\n\r\n", line_end)  # no trailers: "0\r\n\r\n"
            return -1 if trailers_end < 0 else trailers_end + 4
        at = line_end + 2 + size + 2
        if at > len(buffer):
            return -1


class _HttpProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 server connection: keep-alive, Content-Length or chunked bodies (what Envoy
    forwards when the picker has streamed the body)."""

    def __init__(self, emulator: Emulator, host: Host, kind: str) -> None:
        self.emulator = emulator
        self.host = host
        self.kind = kind
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17 : stop if stop >= 0 else None].strip())
            if b"\r\ntransfer-encoding: chunked" in lower:
                body_end = _chunked_end(self.buffer, end + 4)
                if body_end < 0:
                    return
                self.buffer = self.buffer[body_end:]
            elif len(self.buffer) < end + 4 + length:
                return
            else:
                self.buffer = self.buffer[end + 4 + length :]
            method, _, rest = head.partition(b" ")
            target = rest.partition(b" ")[0].decode("latin-1")
            assert self.transport is not None
            self.transport.write(self._answer(method, target))

    def _answer(self, method: bytes, target: str) -> bytes:
        path, _, query = target.partition("?")
        host = self.host
        if path == "/metrics":
            host.seen["metrics"] += 1
            return _response("200 OK", host.page(), b"text/plain; charset=utf-8; version=0.0.4")
        if path.startswith("/v2/health/"):
            host.seen["health"] += 1
            return _response("200 OK", b"")
        if method == b"POST" and path.startswith("/v2/models/") and path.endswith("/infer"):
            host.seen["infer"] += 1
            host.infer(path.split("/")[3])
            return _response("200 OK", _INFER_ANSWER, b"application/json")
        if path == "/emulator/stats":
            return _response("200 OK", self.emulator.stats(), b"application/json")
        if path == "/emulator/rate":
            self.emulator.set_rate(float(query.partition("r=")[2] or 0))
            return _response("200 OK", b"ok\n")
        host.seen["other"] += 1
        if len(self.emulator.other) < 5:
            self.emulator.other.append(f"{method.decode('latin-1')} {target}")
        return _response("404 Not Found", b"not found\n")


def _grpc_handlers(emulator: Emulator) -> list[Any]:
    import grpc
    from tritonclient.grpc import service_pb2

    calls = emulator.grpc_calls
    index = repository_index().SerializeToString()
    configs = {name: c.SerializeToString() for name, c in model_configs().items()}
    live = service_pb2.ServerLiveResponse(live=True).SerializeToString()
    ready = service_pb2.ServerReadyResponse(ready=True).SerializeToString()
    model_ready = service_pb2.ModelReadyResponse(ready=True).SerializeToString()

    def fixed(name: str, answer: bytes) -> Any:
        async def handler(request: bytes, context: Any) -> bytes:
            calls[name] += 1
            return answer

        return grpc.unary_unary_rpc_method_handler(handler)

    async def model_config(request: bytes, context: Any) -> bytes:
        calls["ModelConfig"] += 1
        name = service_pb2.ModelConfigRequest.FromString(request).name
        answer = configs.get(name)
        if answer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"Request for unknown model: '{name}' is not found")
        return answer  # type: ignore[return-value]

    return [
        grpc.method_handlers_generic_handler(
            _SERVICE,
            {
                "RepositoryIndex": fixed("RepositoryIndex", index),
                "ModelConfig": grpc.unary_unary_rpc_method_handler(model_config),
                "ServerLive": fixed("ServerLive", live),
                "ServerReady": fixed("ServerReady", ready),
                "ModelReady": fixed("ModelReady", model_ready),
            },
        ),
        grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": fixed("HealthCheck", _HEALTH_SERVING)}),
    ]


async def serve(spec: dict[str, Any], ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve ``spec``'s hosts until ``stop`` is set (or for ever)."""
    import grpc

    emulator = Emulator(spec)
    loop = asyncio.get_running_loop()
    servers = []
    for host, h in zip(emulator.hosts, spec["hosts"], strict=True):
        for kind in ("http", "metrics"):
            servers.append(
                await loop.create_server(
                    partial(_HttpProtocol, emulator, host, kind),
                    "127.0.0.1",
                    h[f"{kind}_port"],
                    reuse_address=True,
                    backlog=256,
                )
            )
    grpc_server = grpc.aio.server(handlers=_grpc_handlers(emulator), options=[("grpc.so_reuseport", 0)])
    for h in spec["hosts"]:
        grpc_server.add_insecure_port(f"127.0.0.1:{h['grpc_port']}")
    await grpc_server.start()
    if ready is not None:
        ready.set()
    try:
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        await grpc_server.stop(0)
        for server in servers:
            server.close()


async def _main(spec: dict[str, Any]) -> None:
    ready, stop = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(serve(spec, ready, stop))
    await ready.wait()
    print(READY_LINE, flush=True)
    await task


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.fleet.emulator SPEC.json")
    asyncio.run(_main(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))))
