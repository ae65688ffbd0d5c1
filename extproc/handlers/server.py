"""The ext_proc edge: Envoy's ProcessingRequest stream in, the scheduler's decision out as headers.

Only this module knows protobuf. One stream is one HTTP request:

- REST: the request-headers message carries the path, hence the model; answer it at once.
- gRPC: the model is inside the first message. The gRPC routes stream the body to us and Envoy sends the
  first chunk without waiting for our headers answer, so we hold that answer until the chunk arrives, read
  the model name from it, then answer the headers and acknowledge every chunk in order.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.build import compiled
from extproc.config import Fleet
from extproc.handlers.parse import (
    NO_MODEL,
    MalformedRequest,
    RequestRejected,
    RequestTooLarge,
    grpc_method,
    grpc_names_model,
    parse_grpc_frame,
    rest_sequence_id,
)
from extproc.handlers.request import header_map, hint, priority, rest_request, sequence_id
from extproc.handlers.response import Responder
from extproc.handlers.wire import RequestHeaders, read_request_headers
from extproc.metrics import PickerMetrics
from extproc.scheduling.scheduler import Scheduler
from extproc.scheduling.types import InferenceRequest, Protocol, Reject

log = structlog.get_logger(__name__)

# Bytes of gRPC body we accept while looking for the model name before calling the request malformed.
_MAX_PEEK_BYTES = 64 * 1024
_BODY_ACK = ep.ProcessingResponse(request_body=ep.BodyResponse())
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# The wire reader pays only compiled: interpreted, its loop over the bytes costs 80k instructions a message
# against 23k for protobuf's parser and the header map (README, "Performance").
_READ_WIRE = compiled()


class Processor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # xds-protos ships no stubs
    def __init__(self, fleet: Fleet, scheduler: Scheduler, metrics: PickerMetrics) -> None:
        self._metrics = metrics
        self.configure(fleet, scheduler)

    def configure(self, fleet: Fleet, scheduler: Scheduler) -> None:
        """Use a new fleet and scheduler from the next request on (config reload); streams in progress
        finish with what they started with."""
        self._scheduler = scheduler
        self._max_request_bytes = fleet.envoy.max_request_bytes
        self._sequence_models = frozenset(m.name for m in fleet.models if m.sequence)
        self._responder = Responder(self._metrics, fleet.picker.retry_after_s, fleet.picker.log_level == "debug")

    async def Process(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ep.ProcessingResponse]:
        """One HTTP request's stream; its messages arrive as bytes (see :func:`add_to_server`)."""
        stream = aiter(request_iterator)
        try:
            first = _first_message(await anext(stream))
        except StopAsyncIteration:
            return
        if first is None:
            return
        if not self._scheduler.has_telemetry():
            # Just started: no repository index yet, so every model would look unknown (404). Failing the
            # stream makes Envoy fail open to its own load balancer until the first telemetry is in.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the picker has no telemetry yet")
        started = time.perf_counter()
        headers = first.headers
        path = headers.get(":path", "")
        method = grpc_method(path)
        pending: list[ep.ProcessingRequest] = []
        try:
            if method is None:
                request = rest_request(path, headers)
                if self._needs_rest_body(request, first):
                    request, pending = await self._rest_sequence(request, headers, _messages(stream))
            elif first.end_of_stream or not grpc_names_model(method):
                request = InferenceRequest(Protocol.GRPC, tier_hint=hint(headers), priority=priority(headers))
            else:
                request, pending = await self._grpc_request(method, headers, _messages(stream))
            decision = self._scheduler.decide(request)
        except RequestRejected as exc:
            request = InferenceRequest(Protocol.GRPC if method else Protocol.HTTP)
            decision = Reject(exc.status, str(exc), exc.reason)
        responder = self._responder
        yield responder.answer(decision, request)
        responder.record(decision, request, headers.get("x-request-id"), started)
        if isinstance(decision, Reject) or not first.streamed_body:
            # Nothing more will come on this stream (Envoy only streams bodies on routes set to): end it
            # now instead of waiting for Envoy to close it, which saves a wake-up per request.
            return
        for _ in pending:
            yield _BODY_ACK
        async for message in _messages(stream):
            if message.HasField("request_body"):
                yield _BODY_ACK

    def _needs_rest_body(self, request: InferenceRequest, first: RequestHeaders) -> bool:
        """A sequence model's REST call whose body Envoy streams to us (the route says so in
        ``protocol_config``) and whose correlation id is not already in a header."""
        return (
            request.model in self._sequence_models
            and request.sequence_id is None
            and not first.end_of_stream
            and first.streamed_body
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
        correlation_id = rest_sequence_id(data[:json_length] if json_length is not None else data)
        return dataclasses.replace(request, sequence_id=correlation_id), pending

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
                hint(headers),
                priority(headers),
                frame.sequence_id or sequence_id(headers),
            )
            return request, pending
        raise MalformedRequest("the gRPC request ended before its first message")


def add_to_server(processor: Processor, server: grpc.aio.Server) -> None:
    """Serve ``processor`` as Envoy's ExternalProcessor on ``server``. Unlike the generated
    ``add_ExternalProcessorServicer_to_server``, messages reach it as bytes: it reads the first one itself
    (:mod:`extproc.handlers.wire`) and parses the others with protobuf."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Process": grpc.stream_stream_rpc_method_handler(
            processor.Process, response_serializer=ep.ProcessingResponse.SerializeToString
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _first_message(data: bytes) -> RequestHeaders | None:
    """The stream's first message, which Envoy's config makes the request headers; None (logged) if not."""
    first = read_request_headers(data) if _READ_WIRE else None
    if first is not None:
        return first
    # Anything the wire reader leaves: protobuf parses it (and raises DecodeError for bytes that are none).
    message = ep.ProcessingRequest.FromString(data)
    if not message.HasField("request_headers"):
        log.warning("unexpected_first_message", kind=message.WhichOneof("request"))
        return None
    return request_headers_of(message)


def request_headers_of(message: ep.ProcessingRequest) -> RequestHeaders:
    """What the picker reads of a request-headers message that protobuf parsed: the same as the wire reader
    reads from its bytes (tests/test_wire.py holds them to it)."""
    return RequestHeaders(
        header_map(message.request_headers.headers.headers),
        message.request_headers.end_of_stream,
        message.protocol_config.request_body_mode == _STREAMED,
    )


async def _messages(stream: AsyncIterator[bytes]) -> AsyncIterator[ep.ProcessingRequest]:
    """The stream's further messages (body chunks), parsed."""
    async for data in stream:
        yield ep.ProcessingRequest.FromString(data)
