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
from extproc.client_api import ClientApi
from extproc.config import Fleet
from extproc.datapath.headers import BINARY_HEADER, CLIENT_KEY_HEADER
from extproc.datapath.metrics import PickerMetrics
from extproc.datapath.protocol.grpc_body import GrpcBodyGuard
from extproc.datapath.protocol.parse import (
    NO_MODEL,
    MalformedRequest,
    RequestRejected,
    grpc_method,
    grpc_names_model,
    parse_grpc_frame,
)
from extproc.datapath.protocol.request import (
    decimal_length,
    grpc_timeout_ms,
    header_map,
    hint,
    priority,
    rest_request,
    rows_hint,
    sequence_id,
)
from extproc.datapath.protocol.response import LogBudget, Responder, clip
from extproc.datapath.protocol.tensors import TensorHeadReader
from extproc.datapath.protocol.wire import RequestHeaders, read_request_headers
from extproc.datapath.scheduling.quarantine import Quarantine
from extproc.datapath.scheduling.scheduler import Scheduler
from extproc.datapath.scheduling.types import Decision, InferenceRequest, Protocol, Reject, Route
from extproc.handlers.epp import EppStream, epp_stream
from extproc.handlers.hold import Hold
from extproc.handlers.streams import OpenStreams
from extproc.placement.wake import Waker, Waking

log = structlog.get_logger(__name__)

# Bytes of gRPC body we accept while looking for the model name before calling the request malformed.
_MAX_PEEK_BYTES = 64 * 1024
_BODY_ACK = ep.ProcessingResponse(request_body=ep.BodyResponse())
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# The wire reader pays only compiled: interpreted, its loop over the bytes costs 80k instructions a message
# against 23k for protobuf's parser and the header map (docs/design.md, "The wire reader").
_READ_WIRE = compiled()


class Processor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # xds-protos ships no stubs
    def __init__(self, fleet: Fleet, scheduler: Scheduler, metrics: PickerMetrics, waker: Waker | None = None) -> None:
        """``waker``: scale from zero (``placement.scale_from_zero``); None where this process cannot load
        models."""
        self._metrics = metrics
        self._waker = waker
        self._error_log = LogBudget(1)
        self._served_log = LogBudget(1)
        spec = fleet.picker.quarantine
        self._quarantine = Quarantine(scheduler.datastore, metrics, spec.hold_s, spec.window_s)
        self._streams = OpenStreams(fleet.picker.max_streams_per_client)
        self.configure(fleet, scheduler)

    def configure(self, fleet: Fleet, scheduler: Scheduler) -> None:
        """Use a new fleet and scheduler from the next request on (config reload); streams in progress
        finish with what they started with."""
        self._scheduler = scheduler
        if self._waker is not None:
            self._waker.configure(fleet)
        self._quarantine.use(scheduler.datastore)
        self._streams.per_client = fleet.picker.max_streams_per_client
        self._max_request_bytes = fleet.envoy.max_request_bytes
        self._fairness_header = fleet.picker.overload.fairness_header
        self._client_api = ClientApi(
            allow_statistics=fleet.envoy.allow_statistics, allow_grpc_compression=fleet.envoy.allow_grpc_compression
        )
        self._max_tensor_elements = fleet.picker.max_tensor_elements
        # How long the first body chunk may take before the picker asks Envoy to wait longer for its answer.
        self._late_after_s = fleet.picker.message_timeout_ms / 2000
        self._body_timeout_s = fleet.picker.body_timeout_ms / 1000
        self._extend = ep.ProcessingResponse(
            override_message_timeout=duration_pb2.Duration(
                seconds=fleet.picker.body_timeout_ms // 1000, nanos=fleet.picker.body_timeout_ms % 1000 * 1_000_000
            )
        )
        self._responder = Responder(self._metrics, fleet.picker.retry_after_s, fleet.picker.log_level == "debug")

    async def ProcessEpp(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ep.ProcessingResponse]:
        """One HTTP request's stream from a GIE gateway (the Endpoint Picker Protocol, see
        :mod:`extproc.handlers.epp`)."""
        async for answer in self.Process(request_iterator, context, epp=True):
            yield answer

    async def Process(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any], epp: bool = False
    ) -> AsyncIterator[ep.ProcessingResponse]:
        """One HTTP request's stream; its messages arrive as bytes (see :func:`add_to_server`). ``epp``: in
        the Endpoint Picker Protocol."""
        stream = aiter(request_iterator)
        try:
            data = await anext(stream)
        except StopAsyncIteration:
            return
        first = _first_message(data)
        if first is None:
            return
        headers = first.headers
        path = headers.get(":path", "")
        method = grpc_method(path)
        gie: EppStream | None = None
        if epp:
            gie = epp_stream(data, self._served_log, self._client_api, self._fairness_header)
            if gie.refusal is not None:
                # Before anything else: not a request this gateway serves (see extproc.client_api).
                refused = InferenceRequest(Protocol.GRPC if method is not None else Protocol.HTTP)
                yield self._responder.answer(gie.refusal, refused)
                self._responder.refused(gie.refusal, refused, headers.get("x-request-id"))
                return
        # Before the beat task can run, if the process was just stopped.
        self._metrics.beat(self._scheduler.datastore)
        if not self._scheduler.has_telemetry():
            # Just started: no repository index yet, so every model would look unknown (404). Failing the
            # stream makes Envoy fail open to its own load balancer until the first telemetry is in.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the picker has no telemetry yet")
        started = time.perf_counter()
        # A GIE gateway forwards the client's own headers: there the key is the operator's header, read by
        # epp_stream, never the client's copy of ours.
        client = (gie.client if gie is not None else headers.get(CLIENT_KEY_HEADER)) or ""
        counted = method == "ModelStreamInfer"
        if counted:
            refusal = self._streams.open(client)
            if refusal is not None:
                refused = InferenceRequest(Protocol.GRPC)
                yield self._responder.answer(refusal, refused)
                self._responder.refused(refusal, refused, headers.get("x-request-id"))
                return
        try:
            body = _messages(stream)
            pending: list[ep.ProcessingRequest] = []
            guard: GrpcBodyGuard | None = None
            reader: TensorHeadReader | None = None
            # The quarantine's fingerprint of a REST request answered before its body: taken at the first chunk.
            fingerprint_due = False
            # When the picker asked Envoy to wait longer for its answer (it may ask once per message).
            extended_at: float | None = None
            try:
                streams = (first.streamed_body or (gie is not None and gie.request_duplex)) and not first.end_of_stream
                if method is None:
                    request = rest_request(path, headers)
                    model = request.model
                    if streams and model is not None and self._scheduler.knows_model(model):
                        reader = self._tensor_reader(request, headers)
                        sequence = self._scheduler.is_sequence_model(model)
                        if sequence or self._quarantine.holding():
                            # The body decides: a sequence's correlation id is in it, and while requests are
                            # quarantined an identical one is refused before any host has even its headers.
                            read, late = await self._first_body(body)
                            if late:
                                extended_at = time.monotonic()
                                yield self._extend
                            body = _prepend(await read, body)
                            if sequence:
                                request, pending = await self._rest_sequence(request, reader, body)
                            else:
                                pending = await _first_chunk(reader, body)
                        else:
                            # The path names the model: routed now; the body is checked as it passes.
                            fingerprint_due = True
                else:
                    request = InferenceRequest(Protocol.GRPC, tier_hint=hint(headers), priority=priority(headers))
                    if streams and grpc_names_model(method):
                        read, late = await self._first_body(body)
                        if late:
                            extended_at = time.monotonic()
                            yield self._extend
                        body = _prepend(await read, body)
                        guard = GrpcBodyGuard(headers.get("grpc-encoding"), self._max_request_bytes)
                        request, pending = await self._grpc_request(method, headers, body, guard)
                fingerprint = _fingerprint(request, pending)
                held = self._quarantine.refused_for(fingerprint) if fingerprint is not None else 0.0
                if held:
                    decision: Decision = _quarantined(held)
                else:
                    if gie is not None:
                        request.allowed = gie.subset
                        request.client = gie.client
                    decision = self._scheduler.decide(request)
                    waker = self._waker
                    if waker is not None and _not_loaded(decision, request, method):
                        waking = waker.wake(request.model or "", self._scheduler.datastore)
                        if waking is not None:
                            # No hold behind a GIE gateway: its wait for the picker is its own.
                            if waker.mode == "hold" and extended_at is None and gie is None:
                                extended_at = time.monotonic()
                                yield self._extend
                            waiting = self._after_waking(request, method, waking, extended_at)
                            if extended_at is None:
                                decision = await waiting
                            else:
                                hold = Hold(waiting, body)
                                try:
                                    async for _ in hold.arrivals():
                                        yield self._extend
                                    decision = await hold.decision()
                                except BaseException:
                                    hold.cancel()
                                    raise
                                body = hold.body()
                    if isinstance(decision, Reject) and _host_answers(decision, method, path):
                        # A Triton host writes this answer (see _host_answers): any live host, as for a request
                        # that names no model (which also keeps client-chosen names out of the routing metrics).
                        request = InferenceRequest(
                            request.protocol, tier_hint=request.tier_hint, allowed=request.allowed
                        )
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
            answer = responder.answer(decision, request) if gie is None else responder.epp_answer(decision, request)
            answered = time.perf_counter()
            yield answer
            if gie is not None and isinstance(decision, Route):
                best = decision.hosts[0]
                gie.picked = best.grpc_endpoint if request.protocol is Protocol.GRPC else best.http_endpoint
            responder.record(decision, request, headers.get("x-request-id"), started, answered)
            if self._scheduler.refresh_due:
                # After the answer, so that no decision waits for a large plan's preparation (see Scheduler).
                asyncio.get_running_loop().call_soon(self._scheduler.refresh)
            if isinstance(decision, Reject) or (gie is None and not first.streamed_body):
                # Nothing more will come on this stream (Envoy only streams bodies on routes set to): end it
                # now instead of waiting for Envoy to close it, which saves a wake-up per request.
                return
            for message in pending:
                yield _BODY_ACK if gie is None else gie.body_answer(message)
            seen = sum(len(m.request_body.body) for m in pending)
            if not fingerprint_due and _checked(reader, guard, method, seen, request.size_bytes):
                # Nothing left to check: ending the stream now spares a message and its answer per request
                # (Envoy then passes the rest of the body without asking). A GIE gateway asks anyway.
                if gie is not None:
                    async for answer in gie.rest(body):
                        yield answer
                return
            async for message in body:
                if not message.HasField("request_body"):
                    later = None if gie is None else gie.answer(message)
                    if later is not None:
                        yield later
                    continue
                chunk = message.request_body.body
                seen += len(chunk)
                try:
                    if fingerprint_due:
                        fingerprint_due = False
                        refusal = self._quarantine_check(request, chunk, decision)
                        if refusal is not None:
                            yield responder.answer(refusal, request)
                            responder.refused(refusal, request, headers.get("x-request-id"))
                            return
                    if guard is not None:
                        guard.feed(chunk)
                    elif reader is not None and not reader.done:
                        # The end of the body settles what the head left open (a tensor's data not seen whole).
                        done = reader.feed(chunk) or not message.request_body.end_of_stream
                        if not done:
                            reader.finish()
                except RequestRejected as exc:
                    # Mid-body: Envoy answers the client and resets the upstream request. Triton acts on a
                    # request only once its body is complete, and the chunk that would complete it is the one
                    # refused here.
                    refusal = Reject(exc.status, str(exc), exc.reason)
                    yield responder.answer(refusal, request)
                    responder.refused(refusal, request, headers.get("x-request-id"))
                    return
                yield _BODY_ACK if gie is None else gie.body_answer(message)
                if message.request_body.end_of_stream or _checked(reader, guard, method, seen, request.size_bytes):
                    if gie is not None:
                        async for answer in gie.rest(body):
                            yield answer
                    return
        finally:
            if counted:
                self._streams.close(client)
            if reader is not None and reader.done:
                # What the body check read teaches the scheduler the model's sizes (see
                # extproc.datapath.scheduling.work): what a JSON body's length says of its tensors.
                self._scheduler.learn_size(request, reader.elements)

    async def _after_waking(
        self, request: InferenceRequest, method: str | None, waking: Waking, extended_at: float | None
    ) -> Decision:
        """The answer to a request whose model is being loaded (scale from zero): in ``hold`` mode, the
        route once the model is READY, if it is before the hold (and Envoy's wait) ends; else 503 and
        retry-after."""
        assert self._waker is not None
        model = request.model or ""
        if self._waker.mode == "hold" and extended_at is not None:
            # Envoy waits body_timeout_ms from the extension, and not a moment more.
            left_s = self._body_timeout_s - (time.monotonic() - extended_at) - 0.2
            if await self._waker.ready(model, lambda: self._scheduler.datastore, min(self._waker.hold_s, left_s)):
                decision = self._scheduler.decide(request)
                if not _not_loaded(decision, request, method):
                    return decision
        return _loading(model, waking.host)

    async def _first_body(self, body: AsyncIterator[ep.ProcessingRequest]) -> tuple[asyncio.Task[Any], bool]:
        """Start reading the body's first message, which Envoy sends without waiting for our answer (usually
        with the headers), and say whether it is late: not there within half of Envoy's message timeout. The
        caller then asks Envoy to wait up to body_timeout_ms (a slow client) rather than fail open onto a host
        the picker did not choose. Only where the body decides the route: it costs a task."""
        read = asyncio.ensure_future(anext(body, None))
        done, _ = await asyncio.wait((read,), timeout=self._late_after_s)
        return read, not done

    def _quarantine_check(self, request: InferenceRequest, chunk: bytes, decision: Decision) -> Reject | None:
        """At the first body chunk of a request routed on its headers: refuse it if it is quarantined,
        otherwise remember where it went."""
        fingerprint = _chunk_fingerprint(request, chunk)
        held = self._quarantine.refused_for(fingerprint)
        if held:
            return _quarantined(held)
        if isinstance(decision, Route):
            self._quarantine.routed(fingerprint, decision.hosts[0].name)
        return None

    def _tensor_reader(self, request: InferenceRequest, headers: dict[str, str]) -> TensorHeadReader:
        header = headers.get(BINARY_HEADER)
        json_length = decimal_length(header)
        if header is not None and json_length is None:
            raise MalformedRequest("Inference-Header-Content-Length is not a decimal length")
        return TensorHeadReader(
            body_length=request.size_bytes, json_length=json_length, max_elements=self._max_tensor_elements
        )

    async def _rest_sequence(
        self, request: InferenceRequest, reader: TensorHeadReader, stream: AsyncIterator[ep.ProcessingRequest]
    ) -> tuple[InferenceRequest, list[ep.ProcessingRequest]]:
        """Read a sequence model's REST body until its ``parameters`` (the correlation id and the start and
        end flags; tritonclient writes them after the tensors) or up to 64 KiB, checking the tensor headers on
        the way; beyond that the request is routed without affinity rather than buffered. The rest of the body
        is checked as it passes (see :meth:`Process`)."""
        pending: list[ep.ProcessingRequest] = []
        seen = 0
        if not reader.done:
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
                if reader.parameters_read or seen >= _MAX_PEEK_BYTES:
                    break
        sequence = dataclasses.replace(
            request,
            sequence_id=request.sequence_id or reader.sequence_id,
            sequence_start=reader.sequence_start,
            sequence_end=reader.sequence_end,
        )
        return sequence, pending

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
                infer=method == "ModelInfer",
                timeout_ms=grpc_timeout_ms(headers),
                client=headers.get(CLIENT_KEY_HEADER),
                # The client's hint, else the first input's leading dimension (a unary call's only).
                rows=rows_hint(headers) or (frame.rows if method == "ModelInfer" else None),
            )
            return request, pending
        raise MalformedRequest("the gRPC request ended before its first message")


def add_to_server(processor: Processor, server: grpc.aio.Server, epp: bool = False) -> None:
    """Serve ``processor`` as Envoy's ExternalProcessor on ``server`` (``epp``: in the Endpoint Picker
    Protocol, for GIE gateways). Unlike the generated ``add_ExternalProcessorServicer_to_server``, messages
    reach it as bytes: it reads the first one itself (:mod:`extproc.datapath.protocol.wire`) and parses the others
    with protobuf."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Process": grpc.stream_stream_rpc_method_handler(
            processor.ProcessEpp if epp else processor.Process,
            response_serializer=ep.ProcessingResponse.SerializeToString,
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


async def _first_chunk(
    reader: TensorHeadReader, stream: AsyncIterator[ep.ProcessingRequest]
) -> list[ep.ProcessingRequest]:
    """The body's first chunk, its tensor headers checked as far as it holds them."""
    async for message in stream:
        if not message.HasField("request_body"):
            continue
        if not reader.feed(message.request_body.body) and message.request_body.end_of_stream:
            reader.finish()
        return [message]
    return []


def _fingerprint(request: InferenceRequest, body: list[ep.ProcessingRequest]) -> int | None:
    """The quarantine's fingerprint of a request whose first body chunk was read before routing; None when
    none was."""
    if not body or request.model is None:
        return None
    return _chunk_fingerprint(request, body[0].request_body.body)


def _chunk_fingerprint(request: InferenceRequest, chunk: bytes) -> int:
    """What identifies a request for the quarantine: its model, version and first body bytes (the whole
    body of most requests)."""
    return hash((request.model, request.version, chunk[:_MAX_PEEK_BYTES]))


# The picker's refusals of a model that Triton would also refuse: the model is unknown, this version is, or
# no host has the model ready.
_TRITON_REFUSALS = frozenset({"unknown_model", "unknown_version", "model_not_ready"})


def _host_answers(reject: Reject, method: str | None, path: str) -> bool:
    """Whether a Triton host, not the picker, answers a request the picker would refuse as ``reject``: where
    Triton's answer is one the picker cannot write. Envoy turns the picker's own answer to a gRPC client into
    a status without a message body (trailers only), so:

    - a readiness probe (gRPC ``ModelReady``, REST ``…/ready``) of a model that no host has ready: Triton
      answers not ready (gRPC ``ready: false``, REST 400), not an error, and so does any host;
    - a ``ModelStreamInfer`` stream of a model Triton would refuse: Triton answers each message in the stream
      (``error_message``) and keeps the stream open, where the picker could only end it.

    Any other refusal (inference, metadata, config) the picker answers itself, in Triton's words."""
    if method == "ModelReady" or (method is None and _is_ready_path(path)):
        return reject.reason in _TRITON_REFUSALS or reject.reason == "no_ready_host"
    return method == "ModelStreamInfer" and reject.reason in _TRITON_REFUSALS


def _is_ready_path(path: str) -> bool:
    """``/v2/models/{m}[/versions/{v}]/ready``."""
    parts = path.split("?", 1)[0].split("/")
    return len(parts) in (5, 7) and parts[-1] == "ready"


def _not_loaded(decision: Decision, request: InferenceRequest, method: str | None) -> bool:
    """An inference request (REST or gRPC, unary or a stream) refused because no host has its model READY:
    what scale from zero answers (a readiness probe or a metadata call never loads a model)."""
    if not isinstance(decision, Reject) or decision.reason not in ("model_not_ready", "no_ready_host"):
        return False
    return request.infer or method == "ModelStreamInfer"


def _loading(model: str, host: str) -> Reject:
    return Reject(
        503,
        f"model '{model}' is not loaded on any host; the fleet is loading it (on {host}): retry after the delay "
        "in retry-after",
        "loading",
        retry_after=True,
    )


def _quarantined(held_s: float) -> Reject:
    return Reject(
        503,
        f"an identical request was in flight on a host that went down; it is refused for {held_s:.0f} s more "
        "(a possible query of death)",
        "quarantined",
        retry_after=True,
    )


def _checked(
    reader: TensorHeadReader | None, guard: GrpcBodyGuard | None, method: str | None, seen: int, length: int | None
) -> bool:
    """Whether the picker may end the stream: the REST tensor headers have their verdict and every byte of
    the body (``length``, its content-length) has passed, or the one message of a unary gRPC call has passed
    whole (a stream's later messages are each checked). Not before the body has passed: Envoy mishandles a
    stream that ends while body chunks it sent are unanswered (it sent one of them upstream twice)."""
    if reader is not None:
        return reader.done and length is not None and seen >= length
    return guard is not None and method == "ModelInfer" and guard.between_messages
