"""The route configuration: what Envoy answers itself (too large, compressed, closed APIs, not found) and each
tier's gRPC and REST routes to its clusters, with their retry policies."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence

from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.config.route import v3 as route
from envoy_data_plane.envoy.extensions.filters.http.buffer import v3 as buffer
from envoy_data_plane.envoy.extensions.filters.http.ext_proc import v3 as ext_proc
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts import v3 as previous_hosts
from envoy_data_plane.envoy.type import v3 as type_v3
from envoy_data_plane.envoy.type.matcher import v3 as matcher
from envoy_data_plane.google.protobuf import Any as PbAny

from extproc.client_api import (
    ENCODING_MESSAGE,
    FORBIDDEN_MESSAGE,
    GRPC_ALLOWED_METHODS,
    GRPC_ENCODING_MESSAGE,
    GRPC_PREFIX,
    GRPC_STATISTICS_METHOD,
    NOT_FOUND_MESSAGE,
    REST_INFER_REGEX,
    REST_OTHER_REGEX,
    REST_PREFIX,
    REST_STATISTICS_REGEX,
    STATISTICS_API,
    closed_apis,
)
from extproc.config import Fleet, Tier
from extproc.datapath.headers import TIER_HEADER, UPSTREAM_HOST_HEADER, cluster_name
from extproc.envoy_config.common import (
    BUFFER_FILTER,
    EXT_PROC_FILTER,
    ROUTE_CONFIG_NAME,
    UPSTREAM_HOST_FORMAT,
)

_NOT_FOUND_BODY = json.dumps({"error": NOT_FOUND_MESSAGE})
# gRPC status NOT_FOUND, as Triton sends it (trailers-only, so in the response headers) for a model it does
# not have (any more): see the retry policy.
_GRPC_NOT_FOUND = "5"
_GRPC_RESOURCE_EXHAUSTED = "8"
_GRPC_UNIMPLEMENTED = "12"


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


# On the routes where the picker reads the body (gRPC, REST inference) it gets it STREAMED: chunk by chunk,
# never buffered whole; it reads the head only (the model name, the tensors' shapes), then acknowledges each
# chunk. Note that ext_proc takes its per-route config from the route matched *before* the picker answers,
# i.e. a fallback route (the tier header is stripped), so the fallback routes must carry it too.
def _streamed_ext_proc(fleet: Fleet) -> PbAny:
    """With ``picker.fail_open_checked`` off, these routes also fail closed: while the picker does not
    answer, Envoy refuses their requests instead of sending them on without the picker's body checks (which
    a client could otherwise get past by keeping the picker busy)."""
    overrides = ext_proc.ExtProcOverrides(
        processing_mode=_processing_mode(ext_proc.ProcessingModeBodySendMode.STREAMED)
    )
    if not fleet.picker.fail_open_checked:
        overrides.failure_mode_allow = False
    return PbAny.pack(ext_proc.ExtProcPerRoute(overrides=overrides))


# Routes answered by Envoy itself; asking the picker first would only cost a round trip.
_NO_EXT_PROC = ext_proc.ExtProcPerRoute(disabled=True)

# Every REST call but inference carries no body worth the name; larger ones are refused (413) after this
# much is buffered, so no client can stream megabytes to a metadata endpoint.
_SMALL_BODY_BYTES = 64 * 1024
_FORBIDDEN_BODY = json.dumps({"error": FORBIDDEN_MESSAGE})
_ENCODING_BODY = json.dumps({"error": ENCODING_MESSAGE})


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
                GRPC_ENCODING_MESSAGE,
                [_set_header("grpc-status", _GRPC_UNIMPLEMENTED), _set_header("grpc-accept-encoding", "identity")],
            )
        )
    if not fleet.envoy.allow_statistics:
        # Every model's statistics; the REST routes below would take it for the metadata of a model "stats".
        refusal = json.dumps({"error": STATISTICS_API.message})
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
    for api in closed_apis(fleet.envoy.allow_statistics):
        # Envoy answers a gRPC client trailers-only, the body as grpc-message: plain text there.
        grpc_match = route.RouteMatch(
            safe_regex=matcher.RegexMatcher(regex=f"^{re.escape(GRPC_PREFIX)}({'|'.join(api.grpc_methods)})$")
        )
        routes.append(_direct_route(f"forbidden_grpc_{api.name}", grpc_match, 403, api.message))
        rest_match = route.RouteMatch(safe_regex=matcher.RegexMatcher(regex=api.rest_regex))
        routes.append(_direct_route(f"forbidden_{api.name}", rest_match, 403, json.dumps({"error": api.message})))
    routes += [
        _direct_route("forbidden_grpc", route.RouteMatch(prefix=GRPC_PREFIX), 403, FORBIDDEN_MESSAGE),
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
        fleet, tier, "grpc", _route_name("grpc", tier), match, {EXT_PROC_FILTER: _streamed_ext_proc(fleet)}
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
            per_filter[EXT_PROC_FILTER] = _streamed_ext_proc(fleet)
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
