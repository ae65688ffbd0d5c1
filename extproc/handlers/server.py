"""The ext_proc edge: Envoy's ProcessingRequest stream in, the scheduler's decision out as headers.

Only this module knows protobuf. One stream is one HTTP request:

- REST: the request-headers message carries the path, hence the model; answer it at once.
- gRPC: the model is inside the first message. The gRPC routes stream the body to us and Envoy sends the
  first chunk without waiting for our headers answer, so we hold that answer until the chunk arrives, read
  the model name from it, then answer the headers and acknowledge every chunk in order.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2

from extproc.config import Fleet, Tier
from extproc.handlers.parse import (
    NO_MODEL,
    MalformedRequest,
    RequestRejected,
    RequestTooLarge,
    grpc_method,
    grpc_names_model,
    parse_grpc_frame,
    parse_rest_path,
    rest_sequence_id,
)
from extproc.headers import (
    HOSTS_HEADER,
    PRIORITY_HEADER,
    READ_HEADERS,
    SEQUENCE_HEADER,
    TIER_HEADER,
    TIER_HINT_HEADER,
)
from extproc.metrics import PickerMetrics
from extproc.scheduling.scheduler import Scheduler
from extproc.scheduling.types import Decision, InferenceRequest, Priority, Protocol, Reject, Route

log = structlog.get_logger(__name__)

# Bytes of gRPC body we accept while looking for the model name before calling the request malformed.
_MAX_PEEK_BYTES = 64 * 1024
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_TIERS = {t.value: t for t in Tier}
_PRIORITIES = {p.value: p for p in Priority}
# HTTP status → gRPC status for answers to gRPC clients (grpc-status, as Triton itself would send).
_GRPC_STATUS = {400: 3, 404: 5, 413: 8, 429: 8, 503: 14}
_BODY_ACK = ep.ProcessingResponse(request_body=ep.BodyResponse())
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
# Routing answers are reused per (tier, host list); the number of distinct lists is bounded by the fleet's
# size and max_hosts, but with many hosts it can be large, so the cache starts over when full.
_MAX_CACHED_ANSWERS = 4096


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
    )


def routing_answer(tier: Tier, endpoints: str) -> ep.ProcessingResponse:
    """Envoy's answer for a routed request: the tier (which picks the route and cluster, hence the route
    cache is cleared) and the hosts to try, best first (``ip:port`` list, for override_host)."""
    mutation = ep.HeaderMutation(set_headers=[_header(TIER_HEADER, tier.value), _header(HOSTS_HEADER, endpoints)])
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=ep.CommonResponse(header_mutation=mutation, clear_route_cache=True))
    )


class Processor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # xds-protos ships no stubs
    def __init__(self, fleet: Fleet, scheduler: Scheduler, metrics: PickerMetrics) -> None:
        self._metrics = metrics
        self._answers: dict[tuple[Tier, str], ep.ProcessingResponse] = {}
        self.configure(fleet, scheduler)

    def configure(self, fleet: Fleet, scheduler: Scheduler) -> None:
        """Use a new fleet and scheduler from the next request on (config reload); streams in progress
        finish with what they started with."""
        self._scheduler = scheduler
        self._max_request_bytes = fleet.envoy.max_request_bytes
        self._sequence_models = frozenset(m.name for m in fleet.models if m.sequence)
        self._retry_after = str(fleet.picker.retry_after_s)
        self._debug = fleet.picker.log_level == "debug"

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ep.ProcessingResponse]:
        stream = aiter(request_iterator)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            return
        if not first.HasField("request_headers"):
            # Only request headers are configured to reach us first; anything else is a config mismatch.
            log.warning("unexpected_first_message", kind=first.WhichOneof("request"))
            return
        if not self._scheduler.has_telemetry():
            # Just started: no repository index yet, so every model would look unknown (404). Failing the
            # stream makes Envoy fail open to its own load balancer until the first telemetry is in.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the picker has no telemetry yet")
        started = time.perf_counter()
        headers = _header_map(first.request_headers.headers.headers)
        path = headers.get(":path", "")
        method = grpc_method(path)
        pending: list[ep.ProcessingRequest] = []
        try:
            if method is None:
                request = self._rest_request(path, headers)
                if self._needs_rest_body(request, first):
                    request, pending = await self._rest_sequence(request, headers, stream)
            elif first.request_headers.end_of_stream or not grpc_names_model(method):
                request = InferenceRequest(Protocol.GRPC, tier_hint=_hint(headers), priority=_priority(headers))
            else:
                request, pending = await self._grpc_request(method, headers, stream)
            decision = self._scheduler.decide(request)
        except RequestRejected as exc:
            request = InferenceRequest(Protocol.GRPC if method else Protocol.HTTP)
            decision = Reject(exc.status, str(exc), exc.reason)
        yield self._answer(decision, request, headers)
        self._record(decision, request, headers, started)
        if isinstance(decision, Reject) or first.protocol_config.request_body_mode != _STREAMED:
            # Nothing more will come on this stream (Envoy only streams bodies on routes set to): end it
            # now instead of waiting for Envoy to close it, which saves a wake-up per request.
            return
        for _ in pending:
            yield _BODY_ACK
        async for message in stream:
            if message.HasField("request_body"):
                yield _BODY_ACK

    def _rest_request(self, path: str, headers: dict[str, str]) -> InferenceRequest:
        target = parse_rest_path(path)
        return InferenceRequest(
            Protocol.HTTP,
            target.model,
            target.version,
            _content_length(headers),
            _hint(headers),
            _priority(headers),
            _sequence_id(headers),
        )

    def _needs_rest_body(self, request: InferenceRequest, first: ep.ProcessingRequest) -> bool:
        """A sequence model's REST call whose body Envoy streams to us (the route says so in
        ``protocol_config``) and whose correlation id is not already in a header."""
        return (
            request.model in self._sequence_models
            and request.sequence_id is None
            and not first.request_headers.end_of_stream
            and first.protocol_config.request_body_mode == _STREAMED
        )

    async def _rest_sequence(
        self, request: InferenceRequest, headers: dict[str, str], stream: AsyncIterator[ep.ProcessingRequest]
    ) -> tuple[InferenceRequest, list[ep.ProcessingRequest]]:
        """Read the JSON part of a REST body (tritonclient puts ``parameters`` there, before any binary
        tensor) and take the correlation id from it."""
        header_length = headers.get("inference-header-content-length", "")
        json_length = int(header_length) if header_length.isdigit() else request.size_bytes
        pending: list[ep.ProcessingRequest] = []
        data = b""
        async for message in stream:
            if not message.HasField("request_body"):
                continue
            pending.append(message)
            data += message.request_body.body
            if message.request_body.end_of_stream or (json_length is not None and len(data) >= json_length):
                break
            if len(data) > _MAX_PEEK_BYTES:
                return request, pending  # a huge JSON tensor: routed without affinity rather than buffered
        sequence_id = rest_sequence_id(data[:json_length] if json_length is not None else data)
        return dataclasses.replace(request, sequence_id=sequence_id), pending

    async def _grpc_request(
        self, method: str, headers: dict[str, str], stream: AsyncIterator[ep.ProcessingRequest]
    ) -> tuple[InferenceRequest, list[ep.ProcessingRequest]]:
        """Read body chunks until the model name is known; return them too, they still need an answer."""
        pending: list[ep.ProcessingRequest] = []
        data = b""
        encoding = headers.get("grpc-encoding")
        async for message in stream:
            if not message.HasField("request_body"):
                continue
            pending.append(message)
            data += message.request_body.body
            complete = message.request_body.end_of_stream or len(data) >= _MAX_PEEK_BYTES
            frame = parse_grpc_frame(data, encoding, complete=complete)
            if frame is None:
                continue
            target = frame.target
            if target is NO_MODEL and method in ("ModelInfer", "ModelStreamInfer"):
                raise MalformedRequest(f"{method} request names no model")
            if frame.message_bytes > self._max_request_bytes:
                raise RequestTooLarge(
                    f"the gRPC message of {frame.message_bytes} bytes is over the limit of {self._max_request_bytes}"
                )
            request = InferenceRequest(
                Protocol.GRPC,
                target.model,
                target.version,
                frame.message_bytes,
                _hint(headers),
                _priority(headers),
                frame.sequence_id or _sequence_id(headers),
            )
            return request, pending
        raise MalformedRequest("the gRPC request ended before its first message")

    def _answer(self, decision: Decision, request: InferenceRequest, headers: dict[str, str]) -> ep.ProcessingResponse:
        if isinstance(decision, Route):
            if request.protocol is Protocol.GRPC:
                endpoints = ",".join([h.grpc_endpoint for h in decision.hosts])
            else:
                endpoints = ",".join([h.http_endpoint for h in decision.hosts])
            key = (decision.tier, endpoints)
            answer = self._answers.get(key)
            if answer is None:
                if len(self._answers) >= _MAX_CACHED_ANSWERS:
                    self._answers.clear()
                answer = self._answers[key] = routing_answer(decision.tier, endpoints)
            return answer
        return self._immediate(decision, request)

    def _immediate(self, reject: Reject, request: InferenceRequest) -> ep.ProcessingResponse:
        set_headers = [_header("content-type", "application/json")]
        if reject.retry_after:
            set_headers.append(_header("retry-after", self._retry_after))
        immediate = ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=reject.status),
            headers=ep.HeaderMutation(set_headers=set_headers),
            details=reject.reason,
        )
        if request.protocol is Protocol.GRPC:
            immediate.grpc_status.status = _GRPC_STATUS.get(reject.status, 2)
            immediate.body = reject.message.encode()
        else:
            immediate.body = json.dumps({"error": reject.message}).encode()
        return ep.ProcessingResponse(immediate_response=immediate)

    def _record(self, decision: Decision, request: InferenceRequest, headers: dict[str, str], started: float) -> None:
        elapsed = time.perf_counter() - started
        model = request.model or ""
        if isinstance(decision, Route):
            # Tier is a StrEnum: its member is its label value, without the enum's slow .value lookup.
            self._metrics.routed((model, decision.tier, decision.hosts[0].name, decision.reason), elapsed)
            if self._debug:
                log.debug(
                    "routed",
                    request_id=headers.get("x-request-id"),
                    model=model,
                    version=request.version,
                    protocol=request.protocol.value,
                    tier=decision.tier.value,
                    hosts=[h.name for h in decision.hosts],
                    reason=decision.reason,
                    sequence_id=request.sequence_id,
                    decision_us=round(elapsed * 1e6, 1),
                )
        else:
            self._metrics.decision_seconds.observe(elapsed)
            self._metrics.rejections.labels(str(decision.status), decision.reason).inc()
            log.info(
                "rejected",
                request_id=headers.get("x-request-id"),
                model=model,
                status=decision.status,
                reason=decision.reason,
                message=decision.message,
            )


def _header_map(values: Iterable[Any]) -> dict[str, str]:
    """The headers the picker reads (never our routing headers: Envoy strips client copies before us, and
    one that got through is not read). Envoy sends values in ``raw_value``; latin-1 keeps any byte
    sequence decodable."""
    out: dict[str, str] = {}
    for h in values:
        key = h.key
        if key in READ_HEADERS:
            raw = h.raw_value
            out[key] = raw.decode("latin-1") if raw else h.value
    return out


def _content_length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _priority(headers: dict[str, str]) -> Priority:
    value = headers.get(PRIORITY_HEADER)
    return _PRIORITIES.get(value.strip().lower(), Priority.STANDARD) if value else Priority.STANDARD


def _sequence_id(headers: dict[str, str]) -> str | None:
    value = headers.get(SEQUENCE_HEADER, "").strip()
    # Triton treats 0 (or empty) as "no sequence"; an absurdly long id is not one a client meant.
    return value if value and value != "0" and len(value) <= 256 else None


def _hint(headers: dict[str, str]) -> Tier | None:
    value = headers.get(TIER_HINT_HEADER)
    return _TIERS.get(value.strip().lower()) if value else None
