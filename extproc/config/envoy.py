"""Envoy's settings (``envoy``): its listeners, TLS to clients and to the Triton hosts, and its limits."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from extproc.config.common import Port, Strict, Tier

__all__ = ["EnvoySpec", "Listener", "TlsSpec", "UpstreamTlsSpec"]


class Listener(Strict):
    address: str = "127.0.0.1"
    port: Port


class TlsSpec(Strict):
    port: Port = 8443
    cert_file: str = ".run/tls/server.crt"
    key_file: str = ".run/tls/server.key"
    # Generate a self-signed certificate at start-up when the files do not exist (local use only).
    self_signed: bool = True
    # PEM bundle of the CAs whose client certificates are accepted. Set alone: a client may present a
    # certificate (it must then verify); with require_client_certificate: every client must (mutual TLS).
    client_ca_file: str | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _client_ca(self) -> Self:
        if self.require_client_certificate and self.client_ca_file is None:
            raise ValueError("require_client_certificate needs client_ca_file (the CAs that sign client certificates)")
        return self


class UpstreamTlsSpec(Strict):
    """TLS from Envoy to the Triton hosts (their HTTP and gRPC ports; health checks included)."""

    # PEM bundle of the CAs that sign the Triton hosts' certificates: an unverifiable host gets no requests.
    ca_file: str
    # Sent as SNI, and every host's certificate must carry it as a DNS subjectAltName (hosts are addressed
    # by IP, so the name cannot come from the address).
    server_name: str = Field(min_length=1, max_length=253)
    # Envoy's client certificate, for Triton hosts (or their TLS sidecars) that require mutual TLS.
    cert_file: str | None = None
    key_file: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class EnvoySpec(Strict):
    listener: Listener = Listener(port=8080)
    tls: TlsSpec | None = TlsSpec()
    admin: Listener = Listener(port=9901)
    # Adds ``x-triton-host: ip:port`` to responses so a person can see the routing. Off in production.
    expose_upstream_host: bool = False
    # The tier Envoy uses when the picker is unreachable and answers nothing (fail open).
    fallback_tier: Tier = Tier.GPU
    # Route timeout for inference; 0 disables it (Envoy's 15 s default is wrong for inference).
    route_timeout_s: float = Field(default=0, ge=0)
    # A try that takes longer is answered 504 (gRPC UNAVAILABLE) rather than left waiting on a stalled
    # host; it is not sent elsewhere, since the request may be what stalls the host. 0 disables it.
    per_try_timeout_s: float = Field(default=0, ge=0)
    # Largest request body Envoy accepts (bytes). A larger content-length is answered 413 before the body is
    # read; a REST body without content-length (chunked) is buffered up to this size, then 413.
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=2**32 - 1)
    # Request line plus headers (KiB); over it Envoy answers 431. Triton's HTTP server drops the connection
    # without an answer once a request line or header passes ~16 KiB, which Envoy would count against the
    # host (outlier ejection), so the cap stays below that.
    max_request_headers_kb: int = Field(default=8, ge=1, le=15)
    # Concurrent HTTP/2 streams per client connection (Envoy's default is 1024): every open stream holds
    # memory in Envoy, the picker and Triton.
    max_streams_per_connection: int = Field(default=100, ge=1, le=1024)
    # Envoy's heap (MiB): at 95 % it stops accepting requests, from 90 % it resets the streams that buffer
    # the most, so no client can grow the gateway until the kernel kills it.
    max_heap_mb: int = Field(default=1024, ge=64)
    # Serve Triton's statistics (REST /v2/models[/NAME]/stats, gRPC ModelStatistics) to clients. Off by
    # default: they tell a client every model of the fleet and its traffic.
    allow_statistics: bool = False
    # Accept compressed gRPC messages (grpc-encoding gzip or deflate). Off by default: Triton inflates a
    # message whole and without a limit, so the picker inflates each one first, in bounded steps, to refuse
    # those over max_request_bytes; several such messages at once can keep the picker past
    # picker.message_timeout_ms, and a request Envoy then lets through unchecked (failing open) reaches Triton.
    allow_grpc_compression: bool = False
    # TLS to the Triton hosts, Envoy's and the picker's telemetry alike (extproc/telemetry/tls.py); null:
    # plaintext (a trusted network).
    upstream_tls: UpstreamTlsSpec | None = None
    concurrency: int = Field(default=1, ge=1, le=256)
    base_id: int = Field(default=0, ge=0)
