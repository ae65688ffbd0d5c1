"""Which of Triton's APIs a client may call through the gateway, and the answer to the others.

Clients get inference, metadata, config and readiness (and statistics where the operator allows them).
Triton's control APIs (model repository load/unload/index, shared memory, logging, tracing) are refused
before any host is picked: through them a client could unload models fleet-wide or load its own code onto
a host, and each acts on one host, picked like any request, where a client means the fleet.

Two places enforce these tables: the Envoy routes that ``extproc envoy-config`` renders
(:mod:`extproc.envoy_config.routes`, answered by Envoy without asking the picker), and the picker itself on
its Endpoint Picker listener (:class:`ClientApi`), where a Gateway API gateway's own routes, not ours, put
every request of the pool in front of it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from extproc.datapath.protocol.parse import GRPC_PREFIX
from extproc.datapath.scheduling.types import Reject

__all__ = [
    "CLOSED_APIS",
    "ENCODING_MESSAGE",
    "FORBIDDEN_MESSAGE",
    "GRPC_ALLOWED_METHODS",
    "GRPC_ENCODING_MESSAGE",
    "GRPC_PREFIX",
    "GRPC_STATISTICS_METHOD",
    "NOT_FOUND_MESSAGE",
    "REST_INFER_REGEX",
    "REST_OTHER_REGEX",
    "REST_PREFIX",
    "REST_STATISTICS_REGEX",
    "STATISTICS_API",
    "ClientApi",
    "ClosedApi",
    "closed_apis",
]

REST_PREFIX: Final = "/v2"

GRPC_ALLOWED_METHODS: Final = (
    "ModelInfer",
    "ModelStreamInfer",
    "ModelMetadata",
    "ModelConfig",
    "ModelReady",
    "ServerLive",
    "ServerReady",
    "ServerMetadata",
)
GRPC_STATISTICS_METHOD: Final = "ModelStatistics"
# Paths as Envoy matches them (the query string is not part of a regex match). A model or version segment
# is anything but a slash; the picker checks the names themselves.
_MODEL_PATH: Final = r"/v2/models/[^/]+(/versions/[^/]+)?"
REST_INFER_REGEX: Final = f"^{_MODEL_PATH}/infer$"
REST_OTHER_REGEX: Final = f"^/v2(/health/(live|ready))?$|^{_MODEL_PATH}(/ready|/config)?$"
REST_STATISTICS_REGEX: Final = r"^/v2/models(/[^/]+(/versions/[^/]+)?)?/stats$"


@dataclass(frozen=True, slots=True)
class ClosedApi:
    """One of Triton's APIs that the gateway does not offer, refused (403, gRPC PERMISSION_DENIED) with what it
    is and why, so that a client learns it from the answer."""

    name: str  # the route's and the refusal's name
    what: str
    why: str
    rest_regex: str
    grpc_methods: tuple[str, ...]

    @property
    def message(self) -> str:
        return f"the gateway does not offer {self.what}: {self.why}"


CLOSED_APIS: Final = (
    ClosedApi(
        "repository",
        "Triton's model repository API (index, load, unload)",
        "it would load or unload a model on one host of the fleet; operators use extproc models, which acts on "
        "every host",
        r"^/v2/repository(/.*)?$",
        ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"),
    ),
    ClosedApi(
        "shared_memory",
        "Triton's shared-memory API (system and CUDA)",
        "a region registered through it would exist on one host only, and the next request may run on another; "
        "send tensors in the request body",
        r"^/v2/(system|cuda)sharedmemory(/.*)?$",
        tuple(f"{kind}SharedMemory{op}" for kind in ("System", "Cuda") for op in ("Status", "Register", "Unregister")),
    ),
    ClosedApi(
        "logging",
        "Triton's logging API",
        "log settings are per host; operators set them on each host's own port with the admin key",
        r"^/v2/logging(/.*)?$",
        ("LogSettings",),
    ),
    ClosedApi(
        "trace",
        "Triton's trace API",
        "trace settings are per host; operators set them on each host's own port with the admin key",
        rf"^/v2/trace(/.*)?$|^{_MODEL_PATH}/trace/setting$",
        ("TraceSetting",),
    ),
)
# Closed unless the operator allows statistics (envoy.allow_statistics).
STATISTICS_API: Final = ClosedApi(
    "statistics",
    "Triton's statistics API",
    "statistics list every model of the fleet and its traffic, and this fleet does not allow them "
    "(envoy.allow_statistics)",
    REST_STATISTICS_REGEX,
    (GRPC_STATISTICS_METHOD,),
)

# Any other path under /v2, or another gRPC method.
FORBIDDEN_MESSAGE: Final = (
    "the gateway does not offer this API: it serves Triton's inference, metadata, config, readiness and health APIs"
)
NOT_FOUND_MESSAGE: Final = f"no route for this path (Triton REST: {REST_PREFIX}/..., gRPC: {GRPC_PREFIX}...)"
GRPC_ENCODING_MESSAGE: Final = (
    "compressed gRPC messages (grpc-encoding) are not accepted by this gateway; send them uncompressed "
    "(envoy.allow_grpc_compression)"
)
ENCODING_MESSAGE: Final = "compressed REST bodies (content-encoding) are not accepted; send the body uncompressed"
# Envoy's listeners reject these before routing (an escaped slash or backslash, a NUL) or merge and resolve
# them (dot segments): a gateway that does not would hand Triton a path that the allow-list did not see.
_AMBIGUOUS_PATH: Final = re.compile(r"%(2f|5c|00)|(^|/)\.\.?(/|$)|//", re.IGNORECASE)
_AMBIGUOUS_MESSAGE: Final = (
    "the request path has an escaped slash, a NUL, an empty or a dot segment; send it normalised"
)


def closed_apis(allow_statistics: bool) -> tuple[ClosedApi, ...]:
    """The APIs refused with their reason, for a fleet that does or does not allow statistics."""
    return CLOSED_APIS if allow_statistics else (*CLOSED_APIS, STATISTICS_API)


class ClientApi:
    """The allow-list as the picker applies it to a request's headers (its Endpoint Picker listener: see the
    module's docstring), with the answers Envoy gives where our routes apply it."""

    def __init__(self, *, allow_statistics: bool, allow_grpc_compression: bool) -> None:
        methods = GRPC_ALLOWED_METHODS + ((GRPC_STATISTICS_METHOD,) if allow_statistics else ())
        self._grpc_methods = frozenset(methods)
        rest = f"{REST_INFER_REGEX}|{REST_OTHER_REGEX}"
        self._rest = re.compile(rest + (f"|{REST_STATISTICS_REGEX}" if allow_statistics else ""))
        self._closed = [(api, re.compile(api.rest_regex)) for api in closed_apis(allow_statistics)]
        self._grpc_compression = allow_grpc_compression

    def refusal(self, path: str, headers: Mapping[str, str]) -> Reject | None:
        """The answer to a request the gateway does not serve (``headers`` with lower-case names), or None;
        in the order of our Envoy's listener checks and route table."""
        route_path = path.partition("?")[0]
        if _AMBIGUOUS_PATH.search(route_path) or "\\" in route_path:
            return Reject(400, _AMBIGUOUS_MESSAGE, "malformed")
        if headers.get("content-encoding", "identity").lower() != "identity":
            return Reject(415, ENCODING_MESSAGE, "compressed")
        if path.startswith(GRPC_PREFIX):
            if not self._grpc_compression and headers.get("grpc-encoding", "identity").lower() != "identity":
                return Reject(415, GRPC_ENCODING_MESSAGE, "compressed")
            method = path[len(GRPC_PREFIX) :]
            # Only real gRPC goes to a host's gRPC port.
            if method in self._grpc_methods and headers.get("content-type", "").startswith("application/grpc"):
                return None
            return Reject(403, self._grpc_refusal(method), "closed_api")
        # The closed APIs first: /v2/models/stats would otherwise pass for the metadata of a model "stats".
        for api, regex in self._closed:
            if regex.match(route_path):
                return Reject(403, api.message, "closed_api")
        if self._rest.match(route_path):
            return None
        if route_path == REST_PREFIX or route_path.startswith(REST_PREFIX + "/"):
            return Reject(403, FORBIDDEN_MESSAGE, "closed_api")
        return Reject(404, NOT_FOUND_MESSAGE, "no_route")

    def _grpc_refusal(self, method: str) -> str:
        for api, _ in self._closed:
            if method in api.grpc_methods:
                return api.message
        return FORBIDDEN_MESSAGE
