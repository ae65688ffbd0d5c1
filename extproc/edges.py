"""The picker's gRPC listeners, as parts of its roles (:mod:`extproc.roles`): the ext_proc server of its own
dialect and, where ``picker.epp`` is set, the Endpoint Picker Protocol's for GIE gateways, each with the
standard gRPC health service."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.config import EppSpec
from extproc.handlers.server import add_to_server
from extproc.parts import Part
from extproc.tls import ensure_self_signed

if TYPE_CHECKING:
    from extproc.app import Picker

__all__ = ["GRPC_OPTIONS", "edges", "epp_certificate"]

# Health-checked service names: the server as a whole ("") and the ext_proc service.
_HEALTH_SERVICES = ("", "envoy.service.ext_proc.v3.ExternalProcessor")
# An endpoint picker's, as GIE's protocol names them (its liveness and readiness probes ask for these).
_EPP_HEALTH_SERVICES = (*_HEALTH_SERVICES, "liveness", "readiness")
# Listen addresses that name no host, hence no name for a certificate.
_ANY_ADDRESS = frozenset({"0.0.0.0", "::", "[::]"})

GRPC_OPTIONS: Final = [
    # Envoy opens one stream per request over a few connections; do not let gRPC cap them.
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.so_reuseport", 1),
    # Envoy bounds each message: a chunked REST body is buffered whole, up to envoy.max_request_bytes, and
    # reaches the picker as one message. gRPC's default 4 MiB limit failed those streams, and Envoy then
    # sent the body on without the picker's checks (failing open).
    ("grpc.max_receive_message_length", -1),
]


def _ext_proc_server(picker: Picker, epp: bool) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A gRPC server with the picker's processor (``epp``: in the Endpoint Picker Protocol) and the health
    service, not yet listening."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_to_server(picker.processor, server, epp=epp)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return server, servicer


class _GrpcEdge(Part):
    """The ext_proc gRPC server, with the standard gRPC health service (Kubernetes gRPC probes,
    grpc-health-probe, Envoy's gRPC health checks): NOT_SERVING until the picker serves, and again from the
    start of a shutdown."""

    def __init__(self, picker: Picker, address: str) -> None:
        self._server, self._health = _ext_proc_server(picker, epp=False)
        self._server.add_insecure_port(address)

    async def start(self) -> None:
        await self._server.start()
        for service in _HEALTH_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace=1.0)


class _EppEdge(Part):
    """The ext_proc gRPC server for GIE gateways (``picker.epp``: the Endpoint Picker Protocol), over TLS,
    with the health service there and, for Kubernetes' probes, alone on a plaintext port."""

    def __init__(self, picker: Picker, spec: EppSpec) -> None:
        self._server, self._health = _ext_proc_server(picker, epp=True)
        if spec.tls:
            epp_certificate(spec)
            key, cert = Path(spec.key_file).read_bytes(), Path(spec.cert_file).read_bytes()
            self._server.add_secure_port(spec.listen, grpc.ssl_server_credentials([(key, cert)]))
        else:
            self._server.add_insecure_port(spec.listen)
        self._probes: grpc.aio.Server | None = None
        if spec.health_port is not None:
            self._probes = grpc.aio.server(options=GRPC_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._probes)
            self._probes.add_insecure_port(f"{spec.listen.rpartition(':')[0]}:{spec.health_port}")

    async def start(self) -> None:
        await self._server.start()
        if self._probes is not None:
            await self._probes.start()
        for service in _EPP_HEALTH_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace=1.0)
        if self._probes is not None:
            await self._probes.stop(grace=None)


def epp_certificate(spec: EppSpec) -> None:
    """The EPP listener's self-signed certificate, where asked for and missing. A leader makes it before its
    workers start, so that they do not all write it at once."""
    if spec.tls and spec.self_signed:
        host = spec.listen.rpartition(":")[0]
        names = [] if host in _ANY_ADDRESS else [host]
        ensure_self_signed(Path(spec.cert_file), Path(spec.key_file), names)


def edges(picker: Picker, address: str) -> list[Part]:
    """The ext_proc servers: the picker's own dialect, and the Endpoint Picker Protocol where configured."""
    servers: list[Part] = [_GrpcEdge(picker, address)]
    spec = picker.fleet.picker.epp
    if spec is not None:
        servers.append(_EppEdge(picker, spec))
    return servers
