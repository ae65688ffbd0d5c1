"""TLS: the listeners' (downstream, to clients) and the Triton clusters' (upstream) transport sockets."""

from __future__ import annotations

from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.extensions.transport_sockets.tls import v3 as tls
from envoy_data_plane.envoy.type.matcher import v3 as matcher
from envoy_data_plane.google.protobuf import Any as PbAny

from extproc.config import TlsSpec, UpstreamTlsSpec

# Modern TLS 1.2 suites only (ECDHE, AEAD); TLS 1.3 suites are fixed by BoringSSL. ECDSA first: the
# self-signed certificate is EC P-256. RSA suites stay for operators who bring an RSA certificate.
_CIPHER_SUITES = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-RSA-AES256-GCM-SHA384",
)


def _downstream_tls(spec: TlsSpec) -> core.TransportSocket:
    cert_file, key_file = spec.cert_file, spec.key_file
    context = tls.DownstreamTlsContext(
        common_tls_context=tls.CommonTlsContext(
            tls_params=tls.TlsParameters(
                # TLS 1.0/1.1 are deprecated (RFC 8996); 1.3 stays the maximum (Envoy's server default).
                tls_minimum_protocol_version=tls.TlsParametersTlsProtocol.TLSv1_2,
                cipher_suites=list(_CIPHER_SUITES),
            ),
            # Paths as given in the fleet file: relative ones resolve against Envoy's working directory,
            # where `extproc up` also creates the self-signed pair.
            tls_certificates=[
                tls.TlsCertificate(
                    certificate_chain=core.DataSource(filename=cert_file),
                    private_key=core.DataSource(filename=key_file),
                )
            ],
            # Without ALPN a TLS client cannot negotiate HTTP/2, and gRPC over TLS needs it.
            alpn_protocols=["h2", "http/1.1"],
            # Client certificates: verified against client_ca_file when one is presented; with
            # require_client_certificate a client without one fails the handshake (mutual TLS).
            validation_context=(
                tls.CertificateValidationContext(trusted_ca=core.DataSource(filename=spec.client_ca_file))
                if spec.client_ca_file is not None
                else None
            ),
        ),
        require_client_certificate=spec.require_client_certificate or None,
    )
    return core.TransportSocket(name="envoy.transport_sockets.tls", typed_config=PbAny.pack(context))


def _upstream_tls(spec: UpstreamTlsSpec, grpc: bool) -> core.TransportSocket:
    """TLS to Triton: the host's certificate must chain to ``ca_file`` and name ``server_name``."""
    context = tls.UpstreamTlsContext(
        common_tls_context=tls.CommonTlsContext(
            tls_params=tls.TlsParameters(
                tls_minimum_protocol_version=tls.TlsParametersTlsProtocol.TLSv1_2,
                cipher_suites=list(_CIPHER_SUITES),
            ),
            tls_certificates=(
                [
                    tls.TlsCertificate(
                        certificate_chain=core.DataSource(filename=spec.cert_file),
                        private_key=core.DataSource(filename=spec.key_file),
                    )
                ]
                if spec.cert_file is not None and spec.key_file is not None
                else []
            ),
            validation_context=tls.CertificateValidationContext(
                trusted_ca=core.DataSource(filename=spec.ca_file),
                # Envoy checks only the chain unless told which name to expect.
                match_typed_subject_alt_names=[
                    tls.SubjectAltNameMatcher(
                        san_type=tls.SubjectAltNameMatcherSanType.DNS,
                        matcher=matcher.StringMatcher(exact=spec.server_name),
                    )
                ],
            ),
            # Triton's gRPC port speaks HTTP/2 only; its REST port HTTP/1.1.
            alpn_protocols=["h2"] if grpc else ["http/1.1"],
        ),
        sni=spec.server_name,
    )
    return core.TransportSocket(name="envoy.transport_sockets.tls", typed_config=PbAny.pack(context))
