"""Header names shared by the picker, the Envoy config and the tests."""

from typing import Final

# Set by the picker only; Envoy strips any client copy before the picker runs.
TIER_HEADER: Final = "x-triton-lb-tier"  # which tier's cluster the route picks
HOSTS_HEADER: Final = "x-triton-lb-hosts"  # override_host: ranked "ip:port,ip:port,..." list
ROUTING_HEADERS: Final = (TIER_HEADER, HOSTS_HEADER)
# The fleet's admin key (extproc.admin_key), as Triton's restricted REST and gRPC APIs read it. Only the
# fleet's own tooling sends it, straight to the hosts; Envoy strips any client copy, so that a leaked key
# still opens nothing through the gateway.
ADMIN_KEY_HEADER: Final = "extproc-admin-key"
ADMIN_KEY_GRPC_HEADER: Final = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"
# Set by Envoy only, from the connection or the header the fleet file names (picker.overload.
# fairness_header): whose share of a model's capacity the request counts against.
CLIENT_KEY_HEADER: Final = "x-triton-lb-client"
# Envoy's own per-request controls: the picker sets the route timeout from the request's deadline, and a
# client must not be able to lift it (or ask for retries).
ENVOY_TIMEOUT_HEADER: Final = "x-envoy-upstream-rq-timeout-ms"
ENVOY_CONTROL_HEADERS: Final = (
    ENVOY_TIMEOUT_HEADER,
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-max-retries",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-hedge-on-per-try-timeout",
)
# Every request header Envoy removes from what a client sends, before anything else looks at the request.
STRIPPED_HEADERS: Final = (
    *ROUTING_HEADERS,
    ADMIN_KEY_HEADER,
    ADMIN_KEY_GRPC_HEADER,
    CLIENT_KEY_HEADER,
    *ENVOY_CONTROL_HEADERS,
)

# Sent by clients.
TIER_HINT_HEADER: Final = "x-triton-tier-hint"  # optional: "cpu" or "gpu", honoured where the model allows
PRIORITY_HEADER: Final = "x-triton-priority"  # "critical", "standard" (default) or "sheddable"
# Correlation id of a Triton sequence, for REST clients (gRPC clients' ModelInferRequest.parameters
# ["sequence_id"] is read from the body).
SEQUENCE_HEADER: Final = "x-triton-sequence-id"
# A REST client's deadline, in milliseconds (gRPC clients' is the standard grpc-timeout).
TIMEOUT_HEADER: Final = "x-triton-timeout-ms"
# The client's count of a request's rows (its batch dimension): how much work it is (see Scheduler.work).
ROWS_HEADER: Final = "x-triton-rows"
GRPC_TIMEOUT_HEADER: Final = "grpc-timeout"
BINARY_HEADER: Final = "inference-header-content-length"  # REST: the JSON part's length when tensors follow in binary

# Every request header the picker reads; the others are not even decoded (and Envoy does not send them,
# see the ext_proc filter's forward_rules).
READ_HEADERS: Final = frozenset(
    {
        ":path",
        "content-length",
        "grpc-encoding",
        BINARY_HEADER,
        "x-request-id",
        TIER_HINT_HEADER,
        PRIORITY_HEADER,
        SEQUENCE_HEADER,
        TIMEOUT_HEADER,
        ROWS_HEADER,
        GRPC_TIMEOUT_HEADER,
        CLIENT_KEY_HEADER,
    }
)

# The Gateway API Inference Extension's Endpoint Picker Protocol (GIE proposal 004), for gateways that call
# the picker as an InferencePool's endpoint picker (extproc/handlers/epp.py).
# Set by the picker: the ranked "ip:port,ip:port,..." list, as a request header and as dynamic metadata
# under EPP_NAMESPACE (the same value: the protocol leaves the precedence to each gateway).
EPP_DESTINATION_HEADER: Final = "x-gateway-destination-endpoint"
EPP_NAMESPACE: Final = "envoy.lb"
# Sent by the gateway in the request's filter metadata: the endpoints the picker may choose from.
EPP_SUBSET_NAMESPACE: Final = "envoy.lb.subset_hint"
EPP_SUBSET_KEY: Final = "x-gateway-destination-endpoint-subset"
# Sent by the gateway with the response, under EPP_NAMESPACE: the endpoint that served the request.
EPP_SERVED_KEY: Final = "x-gateway-destination-endpoint-served"

# Added to responses when envoy.expose_upstream_host is on: the upstream that served the request.
UPSTREAM_HOST_HEADER: Final = "x-triton-host"


def cluster_name(tier: str, protocol: str) -> str:
    """Envoy cluster of one tier and protocol (``http`` or ``grpc``)."""
    return f"triton_{tier}_{protocol}"


PICKER_CLUSTER: Final = "extproc_picker"
