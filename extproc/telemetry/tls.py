"""TLS for the picker's scrapes of the Triton hosts, where ``envoy.upstream_tls`` says the hosts speak it.

The hosts' ports then sit behind TLS (Triton serves HTTP and its metrics in plaintext, so in practice a
TLS-terminating sidecar fronts all three ports), and the picker reads them as Envoy does: the metrics page
over HTTPS, the repository index and model configs over gRPC with TLS; each host's certificate must chain to
``ca_file`` and name ``server_name`` (hosts are addressed by IP, so the name cannot come from the address),
and with ``cert_file``/``key_file`` the picker presents that client certificate (mutual TLS). The admin key
that the index carries then never crosses the network in the clear.

The files are read once, when the picker starts (a missing or malformed file refuses the start, naming the
key) and on each config reload (a bad file there keeps the previous material), not when the pools' hosts
change: a rotated CA or client certificate applies at the next reload.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from extproc.config import ConfigError, Fleet
from extproc.config.envoy import UpstreamTlsSpec
from extproc.config.hosts import HostSpec, endpoint

__all__ = ["TritonTls", "read_triton_tls"]

# gRPC checks the host's certificate against this name, and sends it as SNI, instead of the address's.
_TARGET_NAME: Final = "grpc.ssl_target_name_override"


@dataclass(frozen=True)
class TritonTls:
    """What a TLS scrape needs, read from the files ``envoy.upstream_tls`` names."""

    server_name: str
    context: ssl.SSLContext  # for the metrics page (extproc.telemetry.http)
    credentials: grpc.ChannelCredentials  # for the repository index and model configs

    def metrics_url(self, host: HostSpec) -> str:
        return f"https://{endpoint(host.address, host.metrics_port)}/metrics"

    def channel_args(self) -> list[tuple[str, str]]:
        return [(_TARGET_NAME, self.server_name)]


def read_triton_tls(fleet: Fleet) -> TritonTls | None:
    """The TLS material for scraping the hosts, or None where they speak plaintext. Raises
    :class:`ConfigError` naming the file, its key and the problem."""
    spec = fleet.envoy.upstream_tls
    if spec is None:
        return None
    where = f"{fleet.source}: key envoy.upstream_tls"
    ca = _read(Path(spec.ca_file), f"{where}.ca_file")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise ConfigError(f"{where}.ca_file: {spec.ca_file} holds no PEM certificate") from None
    # As Envoy's upstream context (extproc/envoy_config/tls.py): TLS 1.2 at least.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = _client_pair(spec, where, context)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return TritonTls(spec.server_name, context, credentials)


def _client_pair(spec: UpstreamTlsSpec, where: str, context: ssl.SSLContext) -> tuple[bytes | None, bytes | None]:
    """The client certificate and key (PEM), loaded into ``context`` too; (None, None) without them."""
    if spec.cert_file is None or spec.key_file is None:
        return None, None
    cert = _read(Path(spec.cert_file), f"{where}.cert_file")
    key = _read(Path(spec.key_file), f"{where}.key_file")
    try:
        context.load_cert_chain(spec.cert_file, spec.key_file)
    except (ssl.SSLError, OSError):
        raise ConfigError(
            f"{where}.cert_file: {spec.cert_file} and {spec.key_file} are not a PEM certificate and its key"
        ) from None
    return cert, key


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
