"""The listeners (plain and TLS) and the HTTP connection manager they share: early header mutation, then the
header_mutation, buffer, ext_proc (the picker) and router filters."""

from __future__ import annotations

import datetime as dt
from typing import Final

from envoy_data_plane.envoy.config.common.mutation_rules import v3 as mutation_rules
from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.config.listener import v3 as listener
from envoy_data_plane.envoy.extensions.filters.http.buffer import v3 as buffer
from envoy_data_plane.envoy.extensions.filters.http.ext_proc import v3 as ext_proc
from envoy_data_plane.envoy.extensions.filters.http.header_mutation import v3 as header_mutation
from envoy_data_plane.envoy.extensions.filters.http.router import v3 as router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager import v3 as hcm
from envoy_data_plane.envoy.extensions.http.early_header_mutation.header_mutation import v3 as early_mutation
from envoy_data_plane.envoy.type.matcher import v3 as matcher
from envoy_data_plane.google.protobuf import Any as PbAny

from extproc.config import Fleet
from extproc.datapath.headers import CLIENT_KEY_HEADER, PICKER_CLUSTER, READ_HEADERS, STRIPPED_HEADERS
from extproc.envoy_config.common import (
    BUFFER_FILTER,
    EXT_PROC_FILTER,
    HEADER_MUTATION_FILTER,
    ROUTER_FILTER,
    STAT_PREFIX,
    _socket_address,
)
from extproc.envoy_config.routes import _processing_mode, _route_configuration

# Seconds a client has to send its request line and headers (HCM request_headers_timeout).
REQUEST_HEADERS_TIMEOUT_S: Final = 10


def _listener(
    name: str,
    address: str,
    port: int,
    manager: hcm.HttpConnectionManager,
    transport_socket: core.TransportSocket | None = None,
) -> listener.Listener:
    return listener.Listener(
        name=name,
        address=_socket_address(address, port),
        filter_chains=[
            listener.FilterChain(
                filters=[
                    listener.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=PbAny.pack(manager)
                    )
                ],
                transport_socket=transport_socket,
            )
        ],
    )


def _http_connection_manager(fleet: Fleet) -> hcm.HttpConnectionManager:
    return hcm.HttpConnectionManager(
        # AUTO (the default, spelt out): HTTP/1.1 for REST clients, h2c (prior knowledge) for gRPC clients
        # on the same port.
        codec_type=hcm.HttpConnectionManagerCodecType.AUTO,
        stat_prefix=STAT_PREFIX,
        route_config=_route_configuration(fleet),
        http_filters=_http_filters(fleet),
        # Envoy is the edge: take the client address from the connection, not from a client-supplied
        # x-forwarded-for, and treat clients as external (their x-envoy-* control headers are not honoured).
        use_remote_address=True,
        # Routes match on path prefixes, so the path Envoy matches must be the path Triton serves:
        # RFC 3986 normalisation ("/v2/../x") and merged slashes ("//v2") close the gaps between the two.
        normalize_path=True,
        merge_slashes=True,
        # An escaped slash (%2F) would make Envoy, the picker (which reads the model name from the path) and
        # Triton disagree about the path. No legitimate Triton client sends one, so reject (400) rather than
        # UNESCAPE_AND_REDIRECT: a redirect answers with a different path, and inference clients do not
        # follow redirects of a POST anyway.
        path_with_escaped_slashes_action=hcm.HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST,
        # No overall request timeout (0 disables; also Envoy's default, spelt out): a long inference, or a
        # long gRPC stream, must not be cut by the listener. The route timeout governs inference.
        request_timeout=dt.timedelta(0),
        # Envoy's default is 5 min; spelt out because it is the only limit left on a stalled stream.
        stream_idle_timeout=dt.timedelta(seconds=300),
        # Off by default in Envoy: a client that sends its request headers a byte at a time would hold a
        # stream for the whole idle timeout per byte. Headers come at once from any real client.
        request_headers_timeout=dt.timedelta(seconds=REQUEST_HEADERS_TIMEOUT_S),
        # Envoy's default is 60 KiB; see envoy.max_request_headers_kb (431 above it).
        max_request_headers_kb=fleet.envoy.max_request_headers_kb,
        # Envoy's default is 1,024 streams per client connection, each holding memory here, in the picker and
        # in Triton.
        http2_protocol_options=core.Http2ProtocolOptions(max_concurrent_streams=fleet.envoy.max_streams_per_connection),
        # Default true, spelt out: the x-request-id ties Envoy's, the picker's and Triton's logs together.
        generate_request_id=True,
        # The client's copies of the routing headers go before anything looks at the request: Envoy may
        # select the route before the first HTTP filter runs (and keeps that choice unless the picker clears
        # the route cache), so with only the header_mutation filter a client's x-triton-lb-tier chose the
        # tier whenever the picker failed open.
        early_header_mutation_extensions=[
            core.TypedExtensionConfig(
                name="envoy.http.early_header_mutation.header_mutation",
                typed_config=PbAny.pack(
                    early_mutation.HeaderMutation(
                        mutations=[mutation_rules.HeaderMutation(remove=name) for name in STRIPPED_HEADERS]
                    )
                ),
            )
        ],
    )


def _client_key(fleet: Fleet) -> mutation_rules.HeaderMutation:
    """Whose share of a model's capacity a request counts against, for the picker: the header the fleet
    file names, else the client's address (the connection's: Envoy is the edge). Set after the client's
    copy is removed, so that a client can only be what its header or address says."""
    header = fleet.picker.overload.fairness_header
    value = f"%REQ({header})%" if header is not None else "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"
    return mutation_rules.HeaderMutation(
        append=core.HeaderValueOption(
            header=core.HeaderValue(key=CLIENT_KEY_HEADER, value=value),
            append_action=core.HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    )


def _http_filters(fleet: Fleet) -> list[hcm.HttpFilter]:
    strip_routing_headers = header_mutation.HeaderMutation(
        mutations=header_mutation.Mutations(
            request_mutations=[mutation_rules.HeaderMutation(remove=name) for name in STRIPPED_HEADERS]
            + [_client_key(fleet)]
        )
    )
    picker = ext_proc.ExternalProcessor(
        grpc_service=core.GrpcService(envoy_grpc=core.GrpcServiceEnvoyGrpc(cluster_name=PICKER_CLUSTER)),
        # Fail open: if the picker is down, slow or errors, the request continues unchanged and takes the
        # fallback routes (least request over envoy.fallback_tier) instead of failing with a 500/504.
        failure_mode_allow=True,
        # The picker sets x-envoy-upstream-rq-timeout-ms (the request's deadline), which ext_proc may not
        # touch by default; the client's copy is stripped on arrival (STRIPPED_HEADERS).
        mutation_rules=mutation_rules.HeaderMutationRules(allow_envoy=True),
        # Envoy's default is 200 ms; the fleet file decides how long a request may wait for the picker
        # before failing open.
        message_timeout=dt.timedelta(milliseconds=fleet.picker.message_timeout_ms),
        # The most the picker may extend one wait to (override_message_timeout): it does so only while a
        # request's body, which it must read to route, has not arrived.
        max_message_timeout=dt.timedelta(milliseconds=fleet.picker.body_timeout_ms),
        # One round trip per request: the picker only needs the request headers. Responses and trailers are
        # not sent (each enabled phase costs another round trip). gRPC routes override the body mode, see
        # _streamed_ext_proc.
        processing_mode=_processing_mode(ext_proc.ProcessingModeBodySendMode.NONE),
        # With a STREAMED body (gRPC routes), send the first body chunk without waiting for the picker's
        # answer to the headers: the picker holds that answer until it has read the model name from the
        # ModelInfer body, so Envoy never buffers the (possibly large) request.
        send_body_without_waiting_for_header_response=True,
        # Only the headers the picker reads: fewer bytes to encode, send and parse on every request.
        forward_rules=ext_proc.HeaderForwardingRules(
            allowed_headers=matcher.ListStringMatcher(
                patterns=[matcher.StringMatcher(exact=name) for name in sorted(READ_HEADERS)]
            )
        ),
    )
    return [
        # First: nothing a client sends may reach the route or the load balancer as a routing header.
        hcm.HttpFilter(name=HEADER_MUTATION_FILTER, typed_config=PbAny.pack(strip_routing_headers)),
        # Off except on the REST routes for bodies without a content-length (see _route_configuration): there
        # it is the only way to cap the body size, everything else streams. Before the picker: its per-route
        # config must come from the route matched on arrival (the picker's answer changes the route, and body
        # bytes that arrive while the picker thinks would otherwise pass unbuffered), and the picker is asked
        # only about bodies that fit.
        hcm.HttpFilter(
            name=BUFFER_FILTER,
            typed_config=PbAny.pack(buffer.Buffer(max_request_bytes=fleet.envoy.max_request_bytes)),
            disabled=True,
        ),
        hcm.HttpFilter(name=EXT_PROC_FILTER, typed_config=PbAny.pack(picker)),
        hcm.HttpFilter(name=ROUTER_FILTER, typed_config=PbAny.pack(router.Router())),
    ]
