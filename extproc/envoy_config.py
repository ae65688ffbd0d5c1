"""Envoy's bootstrap, rendered from the fleet file with envoy-data-plane's typed config objects.

``extproc envoy-config`` writes :func:`render_yaml`'s output; ``envoy/envoy.yaml`` is that output for
``deploy/local/fleet.yaml``. Every Envoy message below is a typed betterproto2 dataclass, and typed extension
configs are packed with ``Any.pack``, so a misspelt field fails here rather than in Envoy, and
``to_dict`` writes each ``@type`` itself.

What the config does, in request order:

0. Envoy answers itself, before any host is picked: 431 for headers over ``envoy.max_request_headers_kb``;
   413 for a ``content-length`` over ``envoy.max_request_bytes`` (route ``too_large``; a REST inference body
   without one, chunked, is buffered up to that size by the ``buffer`` filter, then 413; every other
   inference body streams); 415 for a compressed REST body; 403 (gRPC: PERMISSION_DENIED) for anything but
   the client APIs (inference, metadata, readiness, statistics if allowed: :data:`GRPC_ALLOWED_METHODS`,
   :data:`REST_INFER_REGEX`, :data:`REST_OTHER_REGEX`), naming the API and why the gateway does not offer it
   (:data:`_CLOSED_APIS`); 404 outside Triton's API.
1. The HTTP connection manager's early header mutation strips the routing headers and the admin key's
   (:data:`~extproc.headers.STRIPPED_HEADERS`) from the client's request before the route is selected, so only
   the picker can choose a tier or a host, even when the picker fails open; the ``header_mutation`` filter
   strips them again.
2. ``ext_proc`` asks the picker (cluster :data:`~extproc.headers.PICKER_CLUSTER`), which answers with the tier
   header (selects the route, hence the tier's cluster) and the hosts header (read by the cluster's
   ``override_host`` load-balancing policy). If the picker does not answer, the request goes on unchanged
   (fail open) and takes the fallback routes to ``envoy.fallback_tier``, whose clusters balance by least
   request.
3. The router sends it to the cluster of the matched route, without the REST body's content type, and
   retries only where the request cannot have reached the host (or the host said it could not serve it).

Settings that differ from Envoy's defaults carry a comment saying why.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import betterproto2
import yaml
from envoy_data_plane.envoy.config.bootstrap import v3 as bootstrap
from envoy_data_plane.envoy.config.cluster import v3 as cluster
from envoy_data_plane.envoy.config.common.mutation_rules import v3 as mutation_rules
from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.config.endpoint import v3 as endpoint
from envoy_data_plane.envoy.config.listener import v3 as listener
from envoy_data_plane.envoy.config.overload import v3 as overload
from envoy_data_plane.envoy.config.route import v3 as route
from envoy_data_plane.envoy.extensions.clusters.common.dns import v3 as dns_common
from envoy_data_plane.envoy.extensions.clusters.dns import v3 as dns_cluster
from envoy_data_plane.envoy.extensions.filters.http.buffer import v3 as buffer
from envoy_data_plane.envoy.extensions.filters.http.ext_proc import v3 as ext_proc
from envoy_data_plane.envoy.extensions.filters.http.header_mutation import v3 as header_mutation
from envoy_data_plane.envoy.extensions.filters.http.router import v3 as router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager import v3 as hcm
from envoy_data_plane.envoy.extensions.http.early_header_mutation.header_mutation import v3 as early_mutation
from envoy_data_plane.envoy.extensions.load_balancing_policies.least_request import v3 as least_request
from envoy_data_plane.envoy.extensions.load_balancing_policies.override_host import v3 as override_host
from envoy_data_plane.envoy.extensions.network.dns_resolver.cares import v3 as cares
from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections import (
    v3 as downstream_connections,
)
from envoy_data_plane.envoy.extensions.resource_monitors.fixed_heap import v3 as fixed_heap
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts import v3 as previous_hosts
from envoy_data_plane.envoy.extensions.transport_sockets.tls import v3 as tls
from envoy_data_plane.envoy.extensions.upstreams.http import v3 as upstream_http
from envoy_data_plane.envoy.type import v3 as type_v3
from envoy_data_plane.envoy.type.matcher import v3 as matcher
from envoy_data_plane.google.protobuf import Any as PbAny
from envoy_data_plane.google.protobuf import Struct

from extproc.config import Fleet, PoolSpec, Tier, TlsSpec, UpstreamTlsSpec, resolver_address
from extproc.headers import (
    HOSTS_HEADER,
    PICKER_CLUSTER,
    READ_HEADERS,
    STRIPPED_HEADERS,
    TIER_HEADER,
    UPSTREAM_HOST_HEADER,
    cluster_name,
)

# Stats of the HTTP connection manager (both listeners) are under ``http.<STAT_PREFIX>.``, e.g.
# ``http.ingress.ext_proc.streams_started``.
STAT_PREFIX = "ingress"
ROUTE_CONFIG_NAME = "triton"
HTTP_LISTENER = "http"
HTTPS_LISTENER = "https"

# Filter names: the HCM looks up per-route configs (typed_per_filter_config) by these.
HEADER_MUTATION_FILTER = "envoy.filters.http.header_mutation"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
BUFFER_FILTER = "envoy.filters.http.buffer"
ROUTER_FILTER = "envoy.filters.http.router"

GRPC_PREFIX = "/inference.GRPCInferenceService/"
REST_PREFIX = "/v2"
REST_HEALTH_PATH = "/v2/health/ready"
# The substitution formatter for the response header of ``expose_upstream_host``: the address of the host
# the router picked, ``ip:port`` — the same form as the override_host list the picker sends.
UPSTREAM_HOST_FORMAT = "%UPSTREAM_HOST%"

_NOT_FOUND_BODY = json.dumps(
    {"error": f"no route for this path (Triton REST: {REST_PREFIX}/..., gRPC: {GRPC_PREFIX}...)"}
)
# gRPC status NOT_FOUND, as Triton sends it (trailers-only, so in the response headers) for a model it does
# not have (any more): see the retry policy.
_GRPC_NOT_FOUND = "5"
_GRPC_RESOURCE_EXHAUSTED = "8"
_GRPC_UNIMPLEMENTED = "12"

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

_UPSTREAM_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# Envoy's runtime flags, set in the bootstrap's static layer. By default Envoy ends each ext_proc stream with a
# half-close *and* a reset, so the picker sees every stream CANCELLED; grpc.aio leaks a failed or cancelled
# batch's op array on that path (grpc/grpc#43360: ~116 bytes a request measured for a processor that reads
# its stream to the end, RSS +19 % over 200k requests). With the graceful close Envoy half-closes and waits
# for the picker's status: a clean end, RSS flat (1.4 bytes a request).
RUNTIME_FLAGS = {"envoy.reloadable_features.ext_proc_graceful_grpc_close": True}


def _proto_field_name(name: str) -> str:
    return name


# betterproto2's ``Casing.SNAKE`` re-snake-cases the (already snake_case) Python field names and so turns
# ``consecutive_5xx`` into ``consecutive_5_xx``, which Envoy rejects; ``Casing.CAMEL`` gives
# ``consecutive5Xx``, equally wrong. The generated Python field names *are* the proto field names, so an
# identity function gives exactly what Envoy's docs show. ``to_dict`` only calls ``casing(name)``; the cast
# satisfies its ``Casing`` annotation.
_PROTO_NAMES = cast(betterproto2.Casing, _proto_field_name)


def render_bootstrap(fleet: Fleet) -> dict[str, Any]:
    """The Envoy bootstrap for ``fleet``, as proto JSON (snake_case field names, ``@type`` on every Any)."""
    return build_bootstrap(fleet).to_dict(casing=_PROTO_NAMES)


def render_yaml(fleet: Fleet) -> str:
    """The bootstrap as YAML with a do-not-edit header; the same fleet always gives the same bytes."""
    header = (
        f"# Generated by `extproc envoy-config` from the fleet file {_display_source(fleet.source)}.\n"
        "# Do not edit: change the fleet file and run `make envoy-config` (or `extproc envoy-config`).\n"
    )
    body = yaml.safe_dump(
        render_bootstrap(fleet), sort_keys=False, default_flow_style=False, width=4096, allow_unicode=True
    )
    return header + body


def _display_source(source: str) -> str:
    # A path under the working directory is shown relative to it, so the file does not depend on where the
    # checkout lives.
    path = Path(source)
    if path.is_absolute():
        try:
            return path.relative_to(Path.cwd()).as_posix()
        except ValueError:
            return source
    return path.as_posix()


def build_bootstrap(fleet: Fleet) -> bootstrap.Bootstrap:
    """The typed bootstrap message (see :func:`render_bootstrap` for its JSON form)."""
    shared_hcm = _http_connection_manager(fleet)
    listeners = [_listener(HTTP_LISTENER, fleet.envoy.listener.address, fleet.envoy.listener.port, shared_hcm)]
    if fleet.envoy.tls is not None:
        listeners.append(
            _listener(
                HTTPS_LISTENER,
                fleet.envoy.listener.address,
                fleet.envoy.tls.port,
                shared_hcm,
                transport_socket=_downstream_tls(fleet.envoy.tls),
            )
        )
    clusters = [_picker_cluster(fleet)]
    for tier in fleet.tiers:
        clusters.append(_triton_cluster(fleet, tier, "http"))
        clusters.append(_triton_cluster(fleet, tier, "grpc"))
    return bootstrap.Bootstrap(
        admin=bootstrap.Admin(address=_socket_address(fleet.envoy.admin.address, fleet.envoy.admin.port)),
        static_resources=bootstrap.BootstrapStaticResources(listeners=listeners, clusters=clusters),
        layered_runtime=bootstrap.LayeredRuntime(
            layers=[
                bootstrap.RuntimeLayer(name="static", static_layer=Struct.from_dict(RUNTIME_FLAGS)),
                # Kept as Envoy has it without a layered_runtime: /runtime_modify still overrides a flag.
                bootstrap.RuntimeLayer(name="admin", admin_layer=bootstrap.RuntimeLayerAdminLayer()),
            ]
        ),
        overload_manager=_overload_manager(fleet),
    )


def _overload_manager(fleet: Fleet) -> overload.OverloadManager:
    heap = "envoy.resource_monitors.fixed_heap"
    return overload.OverloadManager(
        # Streams are charged for the bytes they buffer from 1 MiB up, so the heap action below can find the
        # streams that hold the most.
        buffer_factory_config=overload.BufferFactoryConfig(minimum_account_to_track_power_of_two=20),
        resource_monitors=[
            # A global cap on downstream connections: without one Envoy accepts connections until it runs
            # out of file descriptors. Far above what a fleet needs.
            overload.ResourceMonitor(
                name="envoy.resource_monitors.global_downstream_max_connections",
                typed_config=PbAny.pack(
                    downstream_connections.DownstreamConnectionsConfig(max_active_downstream_connections=50_000)
                ),
            ),
            overload.ResourceMonitor(
                name=heap,
                typed_config=PbAny.pack(
                    fixed_heap.FixedHeapConfig(max_heap_size_bytes=fleet.envoy.max_heap_mb * 1024 * 1024)
                ),
            ),
        ],
        actions=[
            # Streams held open or bodies buffered by clients grow the heap; from 90 % the streams that buffer
            # the most are reset (more of them as it fills), at 95 % new requests are refused (503) until
            # memory is back, instead of Envoy growing until the kernel kills it.
            overload.OverloadAction(
                name="envoy.overload_actions.reset_high_memory_stream",
                triggers=[
                    overload.Trigger(
                        name=heap,
                        scaled=overload.ScaledTrigger(scaling_threshold=0.90, saturation_threshold=0.95),
                    )
                ],
            ),
            overload.OverloadAction(
                name="envoy.overload_actions.stop_accepting_requests",
                triggers=[overload.Trigger(name=heap, threshold=overload.ThresholdTrigger(value=0.95))],
            ),
        ],
    )


# ---------------------------------------------------------------------------------------------- listeners


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


def _http_filters(fleet: Fleet) -> list[hcm.HttpFilter]:
    strip_routing_headers = header_mutation.HeaderMutation(
        mutations=header_mutation.Mutations(
            request_mutations=[mutation_rules.HeaderMutation(remove=name) for name in STRIPPED_HEADERS]
        )
    )
    picker = ext_proc.ExternalProcessor(
        grpc_service=core.GrpcService(envoy_grpc=core.GrpcServiceEnvoyGrpc(cluster_name=PICKER_CLUSTER)),
        # Fail open: if the picker is down, slow or errors, the request continues unchanged and takes the
        # fallback routes (least request over envoy.fallback_tier) instead of failing with a 500/504.
        failure_mode_allow=True,
        # Envoy's default is 200 ms; the fleet file decides how long a request may wait for the picker
        # before failing open.
        message_timeout=dt.timedelta(milliseconds=fleet.picker.message_timeout_ms),
        # The most the picker may extend one wait to (override_message_timeout): it does so only while a
        # request's body, which it must read to route, has not arrived.
        max_message_timeout=dt.timedelta(milliseconds=fleet.picker.body_timeout_ms),
        # One round trip per request: the picker only needs the request headers. Responses and trailers are
        # not sent (each enabled phase costs another round trip). gRPC routes override the body mode, see
        # _STREAMED_EXT_PROC.
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


def _processing_mode(request_body: ext_proc.ProcessingModeBodySendMode) -> ext_proc.ProcessingMode:
    # Every field is set: a per-route override replaces the whole ProcessingMode, it is not merged.
    return ext_proc.ProcessingMode(
        request_header_mode=ext_proc.ProcessingModeHeaderSendMode.SEND,
        response_header_mode=ext_proc.ProcessingModeHeaderSendMode.SKIP,
        request_body_mode=request_body,
        response_body_mode=ext_proc.ProcessingModeBodySendMode.NONE,
        request_trailer_mode=ext_proc.ProcessingModeHeaderSendMode.SKIP,
        response_trailer_mode=ext_proc.ProcessingModeHeaderSendMode.SKIP,
    )


# ------------------------------------------------------------------------------------------------- routes

# On the routes where the picker reads the body (gRPC, REST inference) it gets it STREAMED: chunk by chunk,
# never buffered whole; it reads the head only (the model name, the tensors' shapes), then acknowledges each
# chunk. Note that ext_proc takes its per-route config from the route matched *before* the picker answers,
# i.e. a fallback route (the tier header is stripped), so the fallback routes must carry it too.
_STREAMED_EXT_PROC = ext_proc.ExtProcPerRoute(
    overrides=ext_proc.ExtProcOverrides(processing_mode=_processing_mode(ext_proc.ProcessingModeBodySendMode.STREAMED))
)
# Routes answered by Envoy itself; asking the picker first would only cost a round trip.
_NO_EXT_PROC = ext_proc.ExtProcPerRoute(disabled=True)

# What a client may call: inference, metadata, readiness and (where the operator allows) statistics. Triton's
# control APIs (model repository load/unload/index, shared memory registration, logging, tracing) are
# refused before any host is picked: through them a client could unload models fleet-wide or load its own
# code onto a host.
GRPC_ALLOWED_METHODS = (
    "ModelInfer",
    "ModelStreamInfer",
    "ModelMetadata",
    "ModelConfig",
    "ModelReady",
    "ServerLive",
    "ServerReady",
    "ServerMetadata",
)
GRPC_STATISTICS_METHOD = "ModelStatistics"
# Paths as Envoy matches them (the query string is not part of a regex match). A model or version segment
# is anything but a slash; the picker checks the names themselves.
_MODEL_PATH = r"/v2/models/[^/]+(/versions/[^/]+)?"
REST_INFER_REGEX = f"^{_MODEL_PATH}/infer$"
REST_OTHER_REGEX = f"^/v2(/health/(live|ready))?$|^{_MODEL_PATH}(/ready|/config)?$"
REST_STATISTICS_REGEX = r"^/v2/models(/[^/]+(/versions/[^/]+)?)?/stats$"
# Every REST call but inference carries no body worth the name; larger ones are refused (413) after this
# much is buffered, so no client can stream megabytes to a metadata endpoint.
_SMALL_BODY_BYTES = 64 * 1024

# Triton's APIs that the gateway does not offer, each refused (403, gRPC PERMISSION_DENIED) with what it is
# and why, so that a client learns it from the answer: (route name, what, why, REST paths, gRPC methods).
# They act on one host, picked like any request, where a client means the fleet: a model loaded or a shared
# memory region registered through the gateway would exist on one host, and the next request may run on
# another. Statistics are closed unless the operator allows them (envoy.allow_statistics).
_ClosedApi = tuple[str, str, str, str, tuple[str, ...]]  # the REST paths as a regex
_CLOSED_APIS: tuple[_ClosedApi, ...] = (
    (
        "repository",
        "Triton's model repository API (index, load, unload)",
        "it would load or unload a model on one host of the fleet; operators use extproc models, which acts on "
        "every host",
        r"^/v2/repository(/.*)?$",
        ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"),
    ),
    (
        "shared_memory",
        "Triton's shared-memory API (system and CUDA)",
        "a region registered through it would exist on one host only, and the next request may run on another; "
        "send tensors in the request body",
        r"^/v2/(system|cuda)sharedmemory(/.*)?$",
        tuple(f"{kind}SharedMemory{op}" for kind in ("System", "Cuda") for op in ("Status", "Register", "Unregister")),
    ),
    (
        "logging",
        "Triton's logging API",
        "log settings are per host; operators set them on each host's own port with the admin key",
        r"^/v2/logging(/.*)?$",
        ("LogSettings",),
    ),
    (
        "trace",
        "Triton's trace API",
        "trace settings are per host; operators set them on each host's own port with the admin key",
        rf"^/v2/trace(/.*)?$|^{_MODEL_PATH}/trace/setting$",
        ("TraceSetting",),
    ),
)
_STATISTICS_CLOSED = (
    "statistics",
    "Triton's statistics API",
    "statistics list every model of the fleet and its traffic, and this fleet does not allow them "
    "(envoy.allow_statistics)",
)


def closed_api_message(what: str, why: str) -> str:
    """The refusal of an API the gateway does not offer: which API, and why."""
    return f"the gateway does not offer {what}: {why}"


# Any other path under /v2, or another gRPC method.
_FORBIDDEN_MESSAGE = (
    "the gateway does not offer this API: it serves Triton's inference, metadata, config, readiness and health APIs"
)
_FORBIDDEN_BODY = json.dumps({"error": _FORBIDDEN_MESSAGE})
_GRPC_ENCODING_MESSAGE = (
    "compressed gRPC messages (grpc-encoding) are not accepted by this gateway; send them uncompressed "
    "(envoy.allow_grpc_compression)"
)
_ENCODING_BODY = json.dumps(
    {"error": "compressed REST bodies (content-encoding) are not accepted; send the body uncompressed"}
)


def _route_configuration(fleet: Fleet) -> route.RouteConfiguration:
    limit = fleet.envoy.max_request_bytes
    too_long = route.HeaderMatcher(
        name="content-length", range_match=type_v3.Int64Range(start=limit + 1, end=2**63 - 1)
    )
    too_large_body = json.dumps({"error": f"the request body is larger than {limit} bytes"})
    # First: a body announced larger than the limit is refused before Envoy reads it or asks the picker.
    routes: list[route.Route] = [
        # Envoy maps an HTTP 413 to UNKNOWN for a gRPC client; RESOURCE_EXHAUSTED is gRPC's word for it (a
        # grpc-status the route sets is kept in the trailers-only answer Envoy makes).
        _direct_route(
            "too_large_grpc",
            route.RouteMatch(prefix=GRPC_PREFIX, headers=[too_long]),
            413,
            too_large_body,
            [_set_header("grpc-status", _GRPC_RESOURCE_EXHAUSTED)],
        ),
        _direct_route("too_large", route.RouteMatch(prefix="/", headers=[too_long]), 413, too_large_body),
        # Triton inflates a compressed REST body whole and without a limit (a 2 MB gzip body became 2 GB of
        # its memory, and kept it): refused here. gRPC compression is per message (grpc-encoding): refused
        # below unless envoy.allow_grpc_compression, and then the picker bounds what it inflates.
        _direct_route(
            "compressed",
            route.RouteMatch(
                prefix="/",
                headers=[
                    route.HeaderMatcher(
                        name="content-encoding",
                        string_match=matcher.StringMatcher(exact="identity", ignore_case=True),
                        invert_match=True,
                    )
                ],
            ),
            415,
            _ENCODING_BODY,
        ),
    ]
    if not fleet.envoy.allow_grpc_compression:
        # UNIMPLEMENTED with the encodings the server accepts: gRPC's answer to a compression it does not
        # support (a client that compresses every call, e.g. tritonclient's compression_algorithm, is told).
        routes.append(
            _direct_route(
                "compressed_grpc",
                route.RouteMatch(
                    prefix=GRPC_PREFIX,
                    headers=[
                        route.HeaderMatcher(
                            name="grpc-encoding",
                            string_match=matcher.StringMatcher(exact="identity", ignore_case=True),
                            invert_match=True,
                        )
                    ],
                ),
                415,
                _GRPC_ENCODING_MESSAGE,
                [_set_header("grpc-status", _GRPC_UNIMPLEMENTED), _set_header("grpc-accept-encoding", "identity")],
            )
        )
    if not fleet.envoy.allow_statistics:
        # Every model's statistics; the REST routes below would take it for the metadata of a model "stats".
        refusal = json.dumps({"error": closed_api_message(*_STATISTICS_CLOSED[1:])})
        routes.append(
            _direct_route("forbidden_all_statistics", route.RouteMatch(path="/v2/models/stats"), 403, refusal)
        )
    # None: fail open, no tier header (the picker did not answer, or the request reached Envoy before it did).
    # Without the REST body checks only sequence models' bodies go to the picker (for their correlation ids).
    streamed_models = (
        [None] if fleet.picker.check_rest_bodies else [*(m.name for m in fleet.models if m.sequence), None]
    )
    for tier in (*fleet.tiers, None):
        routes.append(_grpc_route(fleet, tier))
        for model in streamed_models:
            routes.append(_rest_route(fleet, tier, "infer", sized=False, model=model))
            routes.append(_rest_route(fleet, tier, "infer", model=model))
        routes.append(_rest_route(fleet, tier, "other"))
    # After the routes that serve: the refusals of the APIs the gateway does not offer, each with its reason.
    closed = list(_CLOSED_APIS)
    if not fleet.envoy.allow_statistics:
        closed.append((*_STATISTICS_CLOSED, REST_STATISTICS_REGEX, (GRPC_STATISTICS_METHOD,)))
    for name, what, why, rest_regex, methods in closed:
        message = closed_api_message(what, why)
        # Envoy answers a gRPC client trailers-only, the body as grpc-message: plain text there.
        grpc_match = route.RouteMatch(
            safe_regex=matcher.RegexMatcher(regex=f"^{re.escape(GRPC_PREFIX)}({'|'.join(methods)})$")
        )
        routes.append(_direct_route(f"forbidden_grpc_{name}", grpc_match, 403, message))
        rest_match = route.RouteMatch(safe_regex=matcher.RegexMatcher(regex=rest_regex))
        routes.append(_direct_route(f"forbidden_{name}", rest_match, 403, json.dumps({"error": message})))
    routes += [
        _direct_route("forbidden_grpc", route.RouteMatch(prefix=GRPC_PREFIX), 403, _FORBIDDEN_MESSAGE),
        _direct_route("forbidden", route.RouteMatch(path_separated_prefix=REST_PREFIX), 403, _FORBIDDEN_BODY),
        _direct_route("not_found", route.RouteMatch(prefix="/"), 404, _NOT_FOUND_BODY),
    ]
    return route.RouteConfiguration(
        name=ROUTE_CONFIG_NAME,
        virtual_hosts=[route.VirtualHost(name="triton", domains=["*"], routes=routes)],
    )


def _direct_route(
    name: str,
    match: route.RouteMatch,
    status: int,
    body: str,
    extra_headers: Sequence[core.HeaderValueOption] = (),
) -> route.Route:
    """Envoy answers itself, with a JSON error (for a gRPC client Envoy turns the status into a grpc-status:
    403 → PERMISSION_DENIED)."""
    return route.Route(
        name=name,
        match=match,
        direct_response=route.DirectResponseAction(status=status, body=core.DataSource(inline_string=body)),
        response_headers_to_add=[_set_header("content-type", "application/json"), *extra_headers],
        typed_per_filter_config={EXT_PROC_FILTER: PbAny.pack(_NO_EXT_PROC)},
    )


def _tier_headers(tier: Tier | None) -> list[route.HeaderMatcher]:
    if tier is None:
        return []
    return [route.HeaderMatcher(name=TIER_HEADER, string_match=matcher.StringMatcher(exact=tier.value))]


def _route_name(protocol: str, tier: Tier | None) -> str:
    return f"{protocol}_{tier.value}" if tier is not None else f"{protocol}_fallback"


def _grpc_route(fleet: Fleet, tier: Tier | None) -> route.Route:
    """The gRPC route of one tier (``tier=None``: the fallback route, no tier header), for the allowed
    methods only; the picker reads the first message of the body (the model name)."""
    methods = GRPC_ALLOWED_METHODS + ((GRPC_STATISTICS_METHOD,) if fleet.envoy.allow_statistics else ())
    match = route.RouteMatch(
        safe_regex=matcher.RegexMatcher(regex=f"^{re.escape(GRPC_PREFIX)}({'|'.join(methods)})$"),
        headers=_tier_headers(tier),
        # Only real gRPC (content-type application/grpc*) goes to the HTTP/2 gRPC cluster.
        grpc=route.RouteMatchGrpcRouteMatchOptions(),
    )
    return _cluster_route(
        fleet, tier, "grpc", _route_name("grpc", tier), match, {EXT_PROC_FILTER: PbAny.pack(_STREAMED_EXT_PROC)}
    )


def _rest_route(
    fleet: Fleet, tier: Tier | None, kind: str, *, sized: bool = True, model: str | None = None
) -> route.Route:
    """A REST route of one tier (``tier=None``: the fallback route).

    ``kind="infer"``: inference, whose body the picker reads (the tensors' shapes and datatypes, a sequence
    model's correlation id) before it answers; with ``picker.check_rest_bodies`` off, only for ``model`` (a
    sequence model's own route) and headers only on the route for every model. ``sized=False`` is the
    route for bodies without a content-length (chunked): their size is unknown until the end, so the
    buffer filter collects them up to ``envoy.max_request_bytes`` (413 beyond) and the picker gets them
    whole.

    ``kind="other"``: metadata, readiness and (if allowed) statistics: no body worth reading; one over
    64 KiB is refused.
    """
    headers = _tier_headers(tier)
    name = _route_name("http", tier)
    per_filter: dict[str, PbAny] = {}
    if kind == "infer":
        regex = REST_INFER_REGEX
        name += "_infer"
        if model is not None:
            regex = f"^/v2/models/{re.escape(model)}(/versions/[^/]+)?/infer$"
            name += f"_sequence_{model}"
        if model is not None or fleet.picker.check_rest_bodies:
            per_filter[EXT_PROC_FILTER] = PbAny.pack(_STREAMED_EXT_PROC)
        if not sized:
            headers.append(route.HeaderMatcher(name="content-length", present_match=False))
            name += "_unsized"
            per_filter[BUFFER_FILTER] = _buffer(fleet.envoy.max_request_bytes)
    else:
        regex = REST_OTHER_REGEX + (f"|{REST_STATISTICS_REGEX}" if fleet.envoy.allow_statistics else "")
        per_filter[BUFFER_FILTER] = _buffer(_SMALL_BODY_BYTES)
    match = route.RouteMatch(safe_regex=matcher.RegexMatcher(regex=regex), headers=headers)
    return _cluster_route(fleet, tier, "http", name, match, per_filter)


def _buffer(limit: int) -> PbAny:
    return PbAny.pack(buffer.BufferPerRoute(buffer=buffer.Buffer(max_request_bytes=limit)))


def _cluster_route(
    fleet: Fleet, tier: Tier | None, protocol: str, name: str, match: route.RouteMatch, per_filter: dict[str, PbAny]
) -> route.Route:
    target = tier if tier is not None else fleet.envoy.fallback_tier
    return route.Route(
        name=name,
        match=match,
        route=_route_action(
            fleet, protocol, cluster_name(target.value, protocol), infer=protocol == "grpc" or "_infer" in name
        ),
        typed_per_filter_config=per_filter,
        # Triton 2.51's HTTP server crashes (SIGSEGV) on a form-encoded body of about 4 MB, whatever the path,
        # and `curl -d` sends that content type by default. Triton reads REST bodies as they are and never
        # needs the content type, so it does not get one.
        request_headers_to_remove=["content-type"] if protocol == "http" else [],
        # OVERWRITE: a Triton (or anything behind it) cannot fake the header.
        response_headers_to_add=(
            [_set_header(UPSTREAM_HOST_HEADER, UPSTREAM_HOST_FORMAT)] if fleet.envoy.expose_upstream_host else []
        ),
    )


def _route_action(fleet: Fleet, protocol: str, target_cluster: str, *, infer: bool) -> route.RouteAction:
    # Retry only where the request cannot have reached the host (no connection, refused stream, reset before
    # the request was sent) or the host said it cannot serve it now (503, gRPC UNAVAILABLE). Never after a
    # reset once the request was sent: a request that crashed one host would crash the next (a query of
    # death), and a client could take a whole tier down with one request.
    retry_on = ["connect-failure", "refused-stream", "reset-before-request", "retriable-status-codes"]
    retriable_headers = []
    if protocol == "grpc":
        retry_on += ["unavailable", "retriable-headers"]
        # NOT_FOUND, trailers-only as Triton sends it: see 404 below (inference is all the picker routes by
        # model on the gRPC routes that carry one).
        retriable_headers.append(
            route.HeaderMatcher(name="grpc-status", string_match=matcher.StringMatcher(exact=_GRPC_NOT_FOUND))
        )
    per_try = fleet.envoy.per_try_timeout_s
    return route.RouteAction(
        cluster=target_cluster,
        # Envoy's default route timeout is 15 s (retries included): far too short for some inference. The
        # fleet file decides; 0 disables it.
        timeout=dt.timedelta(seconds=fleet.envoy.route_timeout_s),
        retry_policy=route.RetryPolicy(
            retry_on=",".join(retry_on),
            # 404 on inference: the picker only routes a model to hosts whose repository index says READY and
            # answers 404 itself for models no host has, so a 404 from Triton means the model left that host
            # since the picker's last poll (unloaded, or the server is shutting down): another host may have
            # it. Elsewhere a 404 is the answer (a path Triton does not serve), and retrying it would only
            # cost the hosts more requests and connections.
            retriable_status_codes=[503, 404] if infer else [503],
            retriable_headers=retriable_headers,
            # Envoy's default is 1; the picker ranks up to picker.max_hosts (default 3) hosts, so 2 retries
            # let a request try each of them.
            num_retries=2,
            per_try_timeout=dt.timedelta(seconds=per_try) if per_try > 0 else None,
            # Never retry on a host this request already tried (the override_host list also moves on to
            # its next host on each retry; with the fallback policy this is what avoids the same host).
            retry_host_predicate=[
                route.RetryPolicyRetryHostPredicate(
                    name="envoy.retry_host_predicates.previous_hosts",
                    typed_config=PbAny.pack(previous_hosts.PreviousHostsPredicate()),
                )
            ],
            # Envoy's default is one re-selection, after which the request goes to a host it already tried;
            # a few more attempts are cheap.
            host_selection_retry_max_attempts=5,
        ),
    )


def _set_header(key: str, value: str) -> core.HeaderValueOption:
    return core.HeaderValueOption(
        header=core.HeaderValue(key=key, value=value),
        append_action=core.HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
    )


# ----------------------------------------------------------------------------------------------- clusters


def _triton_cluster(fleet: Fleet, tier: Tier, protocol: str) -> cluster.Cluster:
    name = cluster_name(tier.value, protocol)
    grpc = protocol == "grpc"
    hosts = [h for h in fleet.hosts if h.tier is tier]
    pools = [p for p in fleet.pools if p.tier is tier]
    # The hosts of the tiers this tier's models spill over to, at priority 1: the picker names them last in
    # a request's host list, so a try that cannot have reached its host (connect failure, refused stream) is
    # retried there when the tier's own hosts are gone; Envoy's own balancing (the picker not answering)
    # uses them only while no host of the tier is healthy. Envoy sums a host's counts over its clusters.
    spill = spill_tiers(fleet, tier)
    spill_hosts = [h for h in fleet.hosts if h.tier in spill]
    spill_pools = [p for p in fleet.pools if p.tier in spill]
    upstream_tls = fleet.envoy.upstream_tls
    if grpc:
        # Triton's gRPC port speaks HTTP/2 only (h2c); the health check is grpc.health.v1.Health/Check,
        # SERVING iff Triton is ready.
        protocol_options = core.Http2ProtocolOptions()
        health_check = core.HealthCheck(grpc_health_check=core.HealthCheckGrpcHealthCheck())
    else:
        protocol_options = None
        health_check = core.HealthCheck(http_health_check=core.HealthCheckHttpHealthCheck(path=REST_HEALTH_PATH))
    # Required, no default: a probe that takes over a second counts as a miss.
    health_check.timeout = dt.timedelta(seconds=1)
    # Envoy has no default interval. 1 s: a host that stops being ready leaves the rotation within ~2 s.
    health_check.interval = dt.timedelta(seconds=1)
    # Two misses (not one) so a single slow probe on a busy host does not take it out.
    health_check.unhealthy_threshold = 2
    # One success is enough to come back: readiness is a strong signal, and a starting fleet fills faster.
    health_check.healthy_threshold = 1
    # Envoy's default is 60 s for a cluster that has not carried traffic yet. The picker reads health from
    # Envoy's admin API and a Triton that starts after Envoy must be seen within a second, traffic or not.
    health_check.no_traffic_interval = dt.timedelta(seconds=1)

    triton = cluster.Cluster(
        name=name,
        # Envoy's default is 5 s; Triton hosts are on the local network, and a connect failure is retried
        # on another host, so fail fast.
        connect_timeout=dt.timedelta(seconds=1),
        load_assignment=endpoint.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint.LocalityLbEndpoints(
                    # A pool's name becomes one endpoint per A record: the addresses the picker names.
                    lb_endpoints=[_lb_endpoint(h.address, h.grpc_port if grpc else h.http_port) for h in hosts]
                    + [_lb_endpoint(p.dns, p.grpc_port if grpc else p.http_port) for p in pools]
                ),
                *(
                    [
                        endpoint.LocalityLbEndpoints(
                            priority=1,
                            lb_endpoints=[
                                _lb_endpoint(h.address, h.grpc_port if grpc else h.http_port) for h in spill_hosts
                            ]
                            + [_lb_endpoint(p.dns, p.grpc_port if grpc else p.http_port) for p in spill_pools],
                        )
                    ]
                    if spill_hosts or spill_pools
                    else []
                ),
            ],
        ),
        typed_extension_protocol_options={
            _UPSTREAM_PROTOCOL_OPTIONS: PbAny.pack(
                upstream_http.HttpProtocolOptions(
                    explicit_http_config=(
                        upstream_http.HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=protocol_options)
                        if grpc
                        # HTTP/1.1 is the default, spelt out: Triton's REST port.
                        else upstream_http.HttpProtocolOptionsExplicitHttpConfig(
                            http_protocol_options=core.Http1ProtocolOptions()
                        )
                    )
                )
            )
        },
        transport_socket=_upstream_tls(upstream_tls, grpc) if upstream_tls is not None else None,
        load_balancing_policy=_override_host_policy(),
        health_checks=[health_check],
        outlier_detection=_outlier_detection(),
        common_lb_config=cluster.ClusterCommonLbConfig(
            # Envoy's default panic threshold is 50 %: in a tier of 2 hosts one unhealthy host would make
            # Envoy ignore health and send half the traffic to the dead one. 0 disables panic mode: only
            # healthy, non-ejected hosts are used (an empty tier answers 503 at once).
            healthy_panic_threshold=type_v3.Percent(value=0.0),
        ),
        circuit_breakers=_circuit_breakers(
            # Defaults are 1024 connections/pending/requests and 3 (!) concurrent retries, so a burst of
            # failures would stop retrying at once. Limits far above a fleet's capacity: admission control is
            # the picker's job (it answers 503/429), not Envoy's.
            max_connections=10_000,
            max_pending_requests=10_000,
            max_requests=10_000,
            max_retries=1_000,
        ),
    )
    if pools or spill_pools:
        # Static IP hosts of the tier stay in the same cluster: an IP literal resolves to itself.
        triton.cluster_type = _dns_cluster(pools + spill_pools, fleet.dns_resolvers)
    else:
        triton.type = cluster.ClusterDiscoveryType.STATIC
    return triton


def spill_tiers(fleet: Fleet, tier: Tier) -> tuple[Tier, ...]:
    """The other tiers that a model served from ``tier`` may also be served from, in the fleet's order."""
    spill = {t for m in fleet.models if tier in m.tiers for t in m.tiers if t is not tier}
    return tuple(t for t in fleet.tiers if t in spill)


def _dns_cluster(pools: list[PoolSpec], resolvers: tuple[str, ...] | None) -> cluster.ClusterCustomClusterType:
    """Strict DNS: every A record of a pool's name is an endpoint, re-resolved every ``refresh_s``.

    A name that does not exist or has no address empties its endpoints (as in the picker); a failed
    resolution keeps them. An endpoint that leaves DNS but still passes its health check stays until it
    fails one (Envoy's eventually consistent discovery): requests in flight to it finish, and the picker no
    longer names it.
    """
    dns = dns_cluster.DnsCluster(
        # One clock per cluster: the tier's most frequent pool's. respect_dns_ttl stays off (the default):
        # the picker re-resolves every refresh_s too, so both follow the same clock whatever the TTL.
        dns_refresh_rate=dt.timedelta(seconds=min(p.refresh_s for p in pools)),
        # The picker reads A records only (the pool's hosts are IPv4 addresses); AUTO would prefer AAAA.
        dns_lookup_family=dns_common.DnsLookupFamily.V4_ONLY,
    )
    if resolvers is not None:
        cares_config = cares.CaresDnsResolverConfig(
            resolvers=[_socket_address(*resolver_address(r)) for r in resolvers],
            # The picker asks these servers and ignores /etc/resolv.conf: no search domains here either.
            dns_resolver_options=core.DnsResolverOptions(no_default_search_domain=True),
        )
        dns.typed_dns_resolver_config = core.TypedExtensionConfig(
            name="envoy.network.dns_resolver.cares", typed_config=PbAny.pack(cares_config)
        )
    return cluster.ClusterCustomClusterType(name="envoy.clusters.dns", typed_config=PbAny.pack(dns))


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


def _lb_endpoint(address: str, port: int) -> endpoint.LbEndpoint:
    return endpoint.LbEndpoint(endpoint=endpoint.Endpoint(address=_socket_address(address, port)))


def _override_host_policy() -> cluster.LoadBalancingPolicy:
    """The picker's choice (``x-triton-lb-hosts: ip:port[,ip:port...]``), least request when there is none.

    override_host only uses hosts of this cluster, so health checks, outlier detection and circuit breakers
    still apply; a header naming a foreign address falls through to the fallback policy.
    """
    fallback = cluster.LoadBalancingPolicy(
        policies=[
            cluster.LoadBalancingPolicyPolicy(
                typed_extension_config=core.TypedExtensionConfig(
                    name="envoy.load_balancing_policies.least_request",
                    typed_config=PbAny.pack(least_request.LeastRequest()),
                )
            )
        ]
    )
    policy = override_host.OverrideHost(
        override_host_sources=[override_host.OverrideHostOverrideHostSource(header=HOSTS_HEADER)],
        fallback_policy=fallback,
    )
    return cluster.LoadBalancingPolicy(
        policies=[
            cluster.LoadBalancingPolicyPolicy(
                typed_extension_config=core.TypedExtensionConfig(
                    name="envoy.load_balancing_policies.override_host", typed_config=PbAny.pack(policy)
                )
            )
        ]
    )


def _outlier_detection() -> cluster.OutlierDetection:
    return cluster.OutlierDetection(
        # Envoy's default is 5; a host that fails 3 requests in a row is out. 5xx and gateway failures here
        # count only responses the host sent (see split_external_local_origin_errors).
        consecutive_5xx=3,
        # ...but a 500 alone does not eject: Triton answers 500 to a malformed request (a JSON body it cannot
        # parse, a 'data' array that does not match its 'shape'), so any client could eject every healthy
        # host, one after the other, with a few bad requests. Gateway failures (502/503/504), connect
        # failures, resets and timeouts still eject.
        enforcing_consecutive_5xx=0,
        # Envoy's default enforcement for gateway failures (502/503/504) is 0 %, i.e. only counted.
        consecutive_gateway_failure=3,
        enforcing_consecutive_gateway_failure=100,
        # Connect failures, resets and timeouts are counted on their own (Envoy's default mixes them into
        # the 5xx count): 3 in a row eject the host even if it never answers with a status.
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=3,
        enforcing_consecutive_local_origin_failure=100,
        # Envoy's defaults: evaluated every 10 s, ejected for 30 s (growing to 300 s). A fleet of a few
        # hosts cannot spare one for that long, nor keep a failing one for 10 s.
        interval=dt.timedelta(seconds=1),
        base_ejection_time=dt.timedelta(seconds=5),
        max_ejection_time=dt.timedelta(seconds=30),
        # Envoy ejects only while 100 * (ejected + 1) / hosts <= max_ejection_percent; the default 10 means
        # *never* in a fleet under 10 hosts. 50 % plus always_eject_one_host: at least one host can always
        # be ejected (also in a tier of 1 or 2), and never more than half of a larger tier, so a failure
        # that is not the hosts' fault (a bad model, a bad client) cannot empty a tier.
        max_ejection_percent=50,
        always_eject_one_host=True,
        # Envoy's default (true) puts an ejected host back as soon as it passes an active health check,
        # i.e. within a second here, although a host that is "ready" but failing requests is exactly what
        # outlier detection is for. Ejections last their ejection time.
        successful_active_health_check_uneject_host=False,
    )


def _circuit_breakers(
    *, max_connections: int, max_pending_requests: int, max_requests: int, max_retries: int
) -> cluster.CircuitBreakers:
    return cluster.CircuitBreakers(
        thresholds=[
            cluster.CircuitBreakersThresholds(
                priority=core.RoutingPriority.DEFAULT,
                max_connections=max_connections,
                max_pending_requests=max_pending_requests,
                max_requests=max_requests,
                max_retries=max_retries,
            )
        ]
    )


def _picker_cluster(fleet: Fleet) -> cluster.Cluster:
    # One endpoint per picker worker socket (a TCP port shared by the workers is listed once).
    addresses = [_picker_address(listen) for listen in dict.fromkeys(fleet.picker.listen_addresses)]
    discovery = addresses[0][1]
    return cluster.Cluster(
        name=PICKER_CLUSTER,
        type=discovery,
        # The picker is local (a Unix socket by default); if it cannot be reached within 250 ms the request
        # should fail open rather than wait out Envoy's 5 s default.
        connect_timeout=dt.timedelta(milliseconds=250),
        load_assignment=endpoint.ClusterLoadAssignment(
            cluster_name=PICKER_CLUSTER,
            endpoints=[
                endpoint.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint.LbEndpoint(endpoint=endpoint.Endpoint(address=address)) for address, _ in addresses
                    ]
                )
            ],
        ),
        typed_extension_protocol_options={
            _UPSTREAM_PROTOCOL_OPTIONS: PbAny.pack(
                upstream_http.HttpProtocolOptions(
                    explicit_http_config=upstream_http.HttpProtocolOptionsExplicitHttpConfig(
                        # gRPC needs HTTP/2. Keepalive pings notice a dead picker connection (TCP picker on
                        # another machine) instead of letting requests time out on it one by one.
                        http2_protocol_options=core.Http2ProtocolOptions(
                            connection_keepalive=core.KeepaliveSettings(
                                interval=dt.timedelta(seconds=30), timeout=dt.timedelta(seconds=5)
                            )
                        )
                    )
                )
            )
        },
        circuit_breakers=_circuit_breakers(
            # ext_proc opens one gRPC stream per HTTP request, and over HTTP/2 max_requests (default 1024)
            # is the limit that binds: above it every request would fail open. Never let Envoy be the limit.
            max_connections=1_024,
            max_pending_requests=1_000_000,
            max_requests=1_000_000,
            # The ext_proc client does not retry; Envoy's default.
            max_retries=3,
        ),
    )


def _picker_address(listen: str) -> tuple[core.Address, cluster.ClusterDiscoveryType]:
    """``unix:PATH`` → a pipe address; ``HOST:PORT`` → a socket address (resolved by DNS unless an IP)."""
    if listen.startswith("unix:"):
        # Relative paths stay relative: they resolve against Envoy's working directory, as the picker's do.
        return core.Address(pipe=core.Pipe(path=listen.removeprefix("unix:"))), cluster.ClusterDiscoveryType.STATIC
    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        # A hostname: STATIC clusters take IP literals only.
        return _socket_address(host, int(port)), cluster.ClusterDiscoveryType.STRICT_DNS
    return _socket_address(host, int(port)), cluster.ClusterDiscoveryType.STATIC


def _socket_address(address: str, port: int) -> core.Address:
    return core.Address(socket_address=core.SocketAddress(address=address, port_value=port))
