"""The ext_proc edge: Envoy's ProcessingRequest stream in, the scheduler's decision out as headers.

Only this module knows protobuf. One stream is one HTTP request:

- REST: the request-headers message carries the path, hence the model; answer it at once.
- gRPC: the model is inside the first message. The gRPC routes stream the body to us and Envoy sends the
  first chunk without waiting for our headers answer, so we hold that answer until the chunk arrives, read
  the model name from it, then answer the headers and acknowledge every chunk in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import duration_pb2

from extproc.build import compiled
from extproc.config import Fleet
from extproc.handlers.grpc_body import GrpcBodyGuard
from extproc.handlers.parse import (
    NO_MODEL,
    MalformedRequest,
    RequestRejected,
    grpc_method,
    grpc_names_model,
    parse_grpc_frame,
)
from extproc.handlers.request import decimal_length, header_map, hint, priority, rest_request, sequence_id
from extproc.handlers.response import LogBudget, Responder, clip
from extproc.handlers.tensors import TensorHeadReader
from extproc.handlers.wire import RequestHeaders, read_request_headers
from extproc.metrics import PickerMetrics
from extproc.scheduling.quarantine import Quarantine
from extproc.scheduling.scheduler import Scheduler
from extproc.scheduling.types import Decision, InferenceRequest, Protocol, Reject, Route

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
        self._error_log = LogBudget(1)
        spec = fleet.picker.quarantine
        self._quarantine = Quarantine(scheduler.datastore, metrics, spec.hold_s, spec.window_s)
        self.configure(fleet, scheduler)

    def configure(self, fleet: Fleet, scheduler: Scheduler) -> None:
        """Use a new fleet and scheduler from the next request on (config reload); streams in progress
        finish with what they started with."""
        self._scheduler = scheduler
        self._quarantine.use(scheduler.datastore)
        self._max_request_bytes = fleet.envoy.max_request_bytes
        self._max_tensor_elements = fleet.picker.max_tensor_elements
        # How long the first body chunk may take before the picker asks Envoy to wait longer for its answer.
        self._late_after_s = fleet.picker.message_timeout_ms / 2000
        self._extend = ep.ProcessingResponse(
            override_message_timeout=duration_pb2.Duration(
                seconds=fleet.picker.body_timeout_ms // 1000, nanos=fleet.picker.body_timeout_ms % 1000 * 1_000_000
            )
        )
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
        body = _messages(stream)
        pending: list[ep.ProcessingRequest] = []
        guard: GrpcBodyGuard | None = None
        reader: TensorHeadReader | None = None
        try:
            if method is None:
                request = rest_request(path, headers)
                reads_body = request.model is not None and self._scheduler.knows_model(request.model)
            else:
                request = InferenceRequest(Protocol.GRPC, tier_hint=hint(headers), priority=priority(headers))
                reads_body = grpc_names_model(method)
            if reads_body and first.streamed_body and not first.end_of_stream:
                # Envoy sends the first body chunk without waiting for our answer, usually with the headers.
                # A late one (a slow client) is waited for up to body_timeout_ms instead of letting Envoy
                # fail open onto a host the picker did not choose.
                read = asyncio.ensure_future(anext(body, None))
                if not (await asyncio.wait((read,), timeout=self._late_after_s))[0]:
                    yield self._extend
                body = _prepend(await read, body)
                if method is None:
                    request, pending, reader = await self._rest_body(request, headers, body)
                else:
                    guard = GrpcBodyGuard(headers.get("grpc-encoding"), self._max_request_bytes)
                    request, pending = await self._grpc_request(method, headers, body, guard)
            fingerprint = _fingerprint(request, pending)
            held = self._quarantine.refused_for(fingerprint) if fingerprint is not None else 0.0
            if held:
                decision: Decision = Reject(
                    503,
                    f"an identical request was in flight on a host that went down; it is refused for {held:.0f} s "
                    "more (a possible query of death)",
                    "quarantined",
                    retry_after=True,
                )
            else:
                decision = self._scheduler.decide(request)
                if fingerprint is not None and isinstance(decision, Route):
                    self._quarantine.routed(fingerprint, decision.hosts[0].name)
        except RequestRejected as exc:
            request = InferenceRequest(Protocol.GRPC if method else Protocol.HTTP)
            decision = Reject(exc.status, str(exc), exc.reason)
        except Exception as exc:
            # A bug, not the client's fault: counted and logged (a few a second at most), then the stream
            # fails and Envoy fails the request open, as when the picker is down.
            self._metrics.errors.labels(type(exc).__name__).inc()
            if self._error_log.take(time.monotonic()) >= 0:
                log.exception("picker_error", path=clip(path), error_type=type(exc).__name__)
            raise
        responder = self._responder
        yield responder.answer(decision, request)
        responder.record(decision, request, headers.get("x-request-id"), started)
        if isinstance(decision, Reject) or not first.streamed_body:
            # Nothing more will come on this stream (Envoy only streams bodies on routes set to): end it
            # now instead of waiting for Envoy to close it, which saves a wake-up per request.
            return
        for _ in pending:
            yield _BODY_ACK
        if _checked(reader, guard, method):
            # Nothing left to check: ending the stream now spares a message and its answer per request
            # (Envoy then passes the rest of the body without asking).
            return
        async for message in body:
            if not message.HasField("request_body"):
                continue
            try:
                if guard is not None:
                    guard.feed(message.request_body.body)
                elif (
                    reader is not None
                    and not reader.feed(message.request_body.body)
                    and message.request_body.end_of_stream
                ):
                    reader.finish()
            except RequestRejected as exc:
                # Mid-body: Envoy answers the client and resets the upstream request. Triton acts on a
                # request only once its body is complete, and the chunk that would complete it is the one
                # refused here.
                yield responder.answer(Reject(exc.status, str(exc), exc.reason), request)
                return
            yield _BODY_ACK
            if _checked(reader, guard, method):
                return

    async def _rest_body(
        self, request: InferenceRequest, headers: dict[str, str], stream: AsyncIterator[ep.ProcessingRequest]
    ) -> tuple[InferenceRequest, list[ep.ProcessingRequest], TensorHeadReader]:
        """Start checking a REST inference body's tensor headers (what cannot be valid is refused before
        Triton has the whole body: :class:`TensorHeadReader`), and read a sequence model's correlation id
        from it.

        The headers are answered after the first chunk, so that a large body is never held here: the rest is
        checked chunk by chunk as it passes (see :meth:`Process`). A sequence model's body is read until its
        ``parameters.sequence_id`` (tritonclient writes ``parameters`` after the tensors) or up to 64 KiB;
        beyond that such a request is routed without affinity rather than buffered."""
        header = headers.get("inference-header-content-length")
        json_length = decimal_length(header)
        if header is not None and json_length is None:
            raise MalformedRequest("Inference-Header-Content-Length is not a decimal length")
        reader = TensorHeadReader(
            body_length=request.size_bytes, json_length=json_length, max_elements=self._max_tensor_elements
        )
        pending: list[ep.ProcessingRequest] = []
        if reader.done:
            return request, pending, reader
        model = request.model or ""
        wants_sequence = self._scheduler.is_sequence_model(model)
        seen = 0
        async for message in stream:
            if not message.HasField("request_body"):
                continue
            pending.append(message)
            chunk = message.request_body.body
            seen += len(chunk)
            if reader.feed(chunk):
                break
            if message.request_body.end_of_stream:
                reader.finish()
                break
            if not wants_sequence or reader.parameters_read or seen >= _MAX_PEEK_BYTES:
                break
        if not wants_sequence:
            return request, pending, reader
        sequence = dataclasses.replace(
            request,
            sequence_id=request.sequence_id or reader.sequence_id,
            sequence_start=reader.sequence_start,
            sequence_end=reader.sequence_end,
        )
        return sequence, pending, reader

    async def _grpc_request(
        self,
        method: str,
        headers: dict[str, str],
        stream: AsyncIterator[ep.ProcessingRequest],
        guard: GrpcBodyGuard,
    ) -> tuple[InferenceRequest, list[ep.ProcessingRequest]]:
        """Read body chunks until the model name is known; return them too, they still need an answer."""
        pending: list[ep.ProcessingRequest] = []
        data = b""
        encoding = headers.get("grpc-encoding")
        async for message in stream:
            if not message.HasField("request_body"):
                continue
            pending.append(message)
            chunk = message.request_body.body
            guard.feed(chunk)
            data += chunk
            complete = message.request_body.end_of_stream or len(data) >= _MAX_PEEK_BYTES
            frame = parse_grpc_frame(data, encoding, complete=complete)
            if frame is None:
                continue
            target = frame.target
            if target is NO_MODEL and method in ("ModelInfer", "ModelStreamInfer"):
                raise MalformedRequest(f"{method} request names no model")
            request = InferenceRequest(
                Protocol.GRPC,
                target.model,
                target.version,
                frame.message_bytes,
                hint(headers),
                priority(headers),
                frame.sequence_id or sequence_id(headers),
                frame.sequence_start,
                frame.sequence_end,
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


async def _prepend(
    head: ep.ProcessingRequest | None, rest: AsyncIterator[ep.ProcessingRequest]
) -> AsyncIterator[ep.ProcessingRequest]:
    if head is None:
        return
    yield head
    async for message in rest:
        yield message


def _fingerprint(request: InferenceRequest, body: list[ep.ProcessingRequest]) -> int | None:
    """What identifies a request for the quarantine: its model, version and first body bytes (the whole
    body of most requests); None for a request without a body."""
    if not body or request.model is None:
        return None
    return hash((request.model, request.version, body[0].request_body.body[:_MAX_PEEK_BYTES]))


def _checked(reader: TensorHeadReader | None, guard: GrpcBodyGuard | None, method: str | None) -> bool:
    """Whether the rest of the body needs no look: the REST tensor headers have their verdict, or the one
    message of a unary gRPC call has passed whole (a stream's later messages are each checked)."""
    if reader is not None:
        return reader.done
    return guard is not None and method == "ModelInfer" and guard.between_messages
