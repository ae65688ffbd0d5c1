"""A gateway-shaped Envoy configuration: the Envoy a Gateway API Inference Extension (GIE) gateway builds for an
HTTPRoute to an InferencePool whose endpoint picker is ours (``picker.epp``, docs/gateway-api.md).

Not shipped (GIE gateways render their own): it stands in for one where the picker's Endpoint Picker Protocol
listener is tested (tests/test_epp_gateway.py) and measured (``python -m benchmarks.overhead --epp``), so both
talk to the same shape of gateway. It is the shape Istio renders:

- the pool's endpoints in one cluster per protocol (every host's REST port, and its gRPC port over h2c, as
  two pools with ``appProtocol`` http and h2c), with the ``override_host`` load-balancing policy reading the
  picker's choice from the ``envoy.lb`` dynamic metadata and least request where there is none (fail-open);
- ext_proc to the picker with both bodies FULL_DUPLEX_STREAMED and every phase sent, fail-open
  (``failureMode: FailOpen``), the ``envoy.lb`` namespace received and forwarded;
- the endpoint that served each request reported back to the picker with the response (``envoy.lb`` /
  ``x-gateway-destination-endpoint-served``), read from a response header naming the upstream host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from extproc.datapath.headers import (
    EPP_DESTINATION_HEADER,
    EPP_NAMESPACE,
    EPP_SERVED_KEY,
    EPP_SUBSET_KEY,
    EPP_SUBSET_NAMESPACE,
)

# The upstream host that served a response, as the gateway adds it to every response: the tests' view of
# where a request went (like the conformance echo server's), and the source of the served endpoint.
SERVED_HEADER: Final = "x-gateway-upstream"
REST_CLUSTER: Final = "pool_rest"
GRPC_CLUSTER: Final = "pool_grpc"

_ANY: Final = "type.googleapis.com/"
_LEAST_REQUEST: Final = _ANY + "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest"
_HTTP_OPTIONS: Final = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# HTTP/2 to the upstream: gRPC hosts, and the endpoint picker itself.
_HTTP2: Final = {_HTTP_OPTIONS: {"@type": _ANY + _HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}}


def listen_address(listen: str) -> dict[str, Any]:
    """Envoy's address message (proto JSON) for a picker ``listen`` value: ``unix:PATH`` or ``IP:PORT``."""
    if listen.startswith("unix:"):
        return {"pipe": {"path": listen.removeprefix("unix:")}}
    host, _, port = listen.rpartition(":")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


def override_host_cluster(name: str, endpoints: Sequence[tuple[str, int]], http2: bool) -> dict[str, Any]:
    """An InferencePool's cluster as the gateway renders it: every endpoint of the pool, the EPP's choice
    read from the dynamic metadata, least request where there is none (fail-open)."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}}}
                        for a, p in endpoints
                    ]
                }
            ],
        },
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "envoy.load_balancing_policies.override_host",
                        "typed_config": {
                            "@type": _ANY + "envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                            "override_host_sources": [
                                {"metadata": {"key": EPP_NAMESPACE, "path": [{"key": EPP_DESTINATION_HEADER}]}}
                            ],
                            "fallback_policy": {
                                "policies": [
                                    {
                                        "typed_extension_config": {
                                            "name": "envoy.load_balancing_policies.least_request",
                                            "typed_config": {"@type": _LEAST_REQUEST},
                                        }
                                    }
                                ]
                            },
                        },
                    }
                }
            ]
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = _HTTP2
    return cluster


def pool_listener(name: str, port: int, epp_cluster: str, subset: Sequence[str] | None = None) -> dict[str, Any]:
    """The gateway's listener (stat prefix ``name``): gRPC inference to the gRPC pool, the rest to the REST
    pool, ext_proc to ``epp_cluster``; ``subset`` (``ip:port`` endpoints), when given, is passed to the
    picker as the subset hint."""
    filters: list[dict[str, Any]] = []
    forwarded = [EPP_NAMESPACE]
    if subset is not None:
        # How a gateway passes a subset hint: filter metadata in the request's metadata_context.
        forwarded.append(EPP_SUBSET_NAMESPACE)
        filters.append(
            {
                "name": "envoy.filters.http.set_metadata",
                "typed_config": {
                    "@type": _ANY + "envoy.extensions.filters.http.set_metadata.v3.Config",
                    "metadata": [{"metadata_namespace": EPP_SUBSET_NAMESPACE, "value": {EPP_SUBSET_KEY: list(subset)}}],
                },
            }
        )
    filters += [
        {
            "name": "envoy.filters.http.ext_proc",
            "typed_config": {
                "@type": _ANY + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                "grpc_service": {"envoy_grpc": {"cluster_name": epp_cluster}, "timeout": "10s"},
                "failure_mode_allow": True,  # the InferencePool's endpointPickerRef.failureMode: FailOpen
                "message_timeout": "1s",
                "processing_mode": {
                    "request_header_mode": "SEND",
                    "response_header_mode": "SEND",
                    "request_trailer_mode": "SEND",
                    "response_trailer_mode": "SEND",
                    "request_body_mode": "FULL_DUPLEX_STREAMED",
                    "response_body_mode": "FULL_DUPLEX_STREAMED",
                },
                "metadata_options": {
                    "receiving_namespaces": {"untyped": [EPP_NAMESPACE]},
                    "forwarding_namespaces": {"untyped": forwarded},
                },
            },
        },
        {
            # The served endpoint, reported back with the response (the filters see a response in reverse
            # order: this one before ext_proc).
            "name": "envoy.filters.http.header_to_metadata",
            "typed_config": {
                "@type": _ANY + "envoy.extensions.filters.http.header_to_metadata.v3.Config",
                "response_rules": [
                    {
                        "header": SERVED_HEADER,
                        "on_header_present": {
                            "metadata_namespace": EPP_NAMESPACE,
                            "key": EPP_SERVED_KEY,
                            "type": "STRING",
                        },
                    }
                ],
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": _ANY + "envoy.extensions.filters.http.router.v3.Router"},
        },
    ]
    routes = [
        {"match": {"prefix": "/inference.GRPCInferenceService/"}, "route": {"cluster": GRPC_CLUSTER, "timeout": "0s"}},
        {"match": {"prefix": "/"}, "route": {"cluster": REST_CLUSTER, "timeout": "0s"}},
    ]
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": _ANY
                            + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": name,
                            "codec_type": "AUTO",
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "pool",
                                        "domains": ["*"],
                                        "routes": routes,
                                        "response_headers_to_add": [
                                            {"header": {"key": SERVED_HEADER, "value": "%UPSTREAM_HOST%"}}
                                        ],
                                    }
                                ]
                            },
                            "http_filters": filters,
                        },
                    }
                ]
            }
        ],
    }


def epp_cluster(name: str, listen: str, tls: bool = True) -> dict[str, Any]:
    """The endpoint picker's Service at ``listen`` (``IP:PORT`` or ``unix:PATH``): gRPC, over TLS whose
    certificate is not verified (as Istio and the GIE charts connect to it) unless ``tls`` is false."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": listen_address(listen)}}]}],
        },
        "typed_extension_protocol_options": _HTTP2,
    }
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _ANY + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"alpn_protocols": ["h2"]},
            },
        }
    return cluster


def gateway_bootstrap(
    admin_port: int,
    listeners: Sequence[dict[str, Any]],
    rest: Sequence[tuple[str, int]],
    grpc: Sequence[tuple[str, int]],
    pickers: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The whole bootstrap: ``listeners`` (:func:`pool_listener`), the pool's REST and gRPC endpoints
    (``(address, port)``), and the endpoint pickers' clusters (:func:`epp_cluster`)."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": list(listeners),
            "clusters": [
                override_host_cluster(REST_CLUSTER, rest, http2=False),
                override_host_cluster(GRPC_CLUSTER, grpc, http2=True),
                *pickers,
            ],
        },
    }
