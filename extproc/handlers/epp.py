"""The picker as a Gateway API Inference Extension endpoint picker (GIE proposal 004, the Endpoint Picker
Protocol): what a stream of that dialect needs beyond the picker's own (:mod:`extproc.handlers.server`).

A GIE gateway asks its picker the same question over the same ext_proc stream, but:

- it may limit the choice to a subset of endpoints (filter metadata ``envoy.lb.subset_hint``); none of them
  usable is answered 503;
- it reads the answer from ``x-gateway-destination-endpoint`` (header and ``envoy.lb`` dynamic metadata),
  not from our tier and hosts headers (see :meth:`extproc.datapath.protocol.response.Responder.epp_answer`);
- its routes, not ours, put requests in front of the picker: the allow-list of client APIs and the strips
  that our Envoy config applies (:mod:`extproc.client_api`; a REST body's content type, client copies of
  the admin key) are the picker's to apply here;
- it streams both bodies in FULL_DUPLEX_STREAMED mode, where the picker owns them: every chunk it does not
  send back never reaches the host or the client, and the response phases (headers, body, trailers) come
  to the picker too, each waiting for an answer. The response headers carry the endpoint that served the
  request (``envoy.lb`` / ``x-gateway-destination-endpoint-served``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

import structlog
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.client_api import ClientApi
from extproc.datapath.headers import EPP_NAMESPACE, EPP_SERVED_KEY, EPP_SUBSET_KEY, EPP_SUBSET_NAMESPACE
from extproc.datapath.protocol.response import LogBudget
from extproc.datapath.scheduling.types import Reject

log = structlog.get_logger(__name__)

_FULL_DUPLEX: Final = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
_TRAILERS_DONE: Final = ep.TrailersResponse()
_HEADERS_DONE: Final = ep.HeadersResponse()


@dataclass(slots=True)
class EppStream:
    """What the first message of a GIE gateway's stream says beyond the request headers."""

    # The endpoints the gateway allows (``ip:port``); None: any of the picker's hosts.
    subset: frozenset[str] | None
    # FULL_DUPLEX_STREAMED bodies: each chunk is answered with itself (else with an empty acknowledgement).
    request_duplex: bool
    response_duplex: bool
    # The processor's budget for "served elsewhere" lines: retries and fail-open are normal, a line a
    # second says that they happen without flooding the log.
    served_log: LogBudget
    # Whose fair share the request counts against: the value of picker.overload.fairness_header (None:
    # not configured, or not sent). A GIE gateway passes the client's headers on as they are, so the
    # picker's own key header is not read from them.
    client: str | None = None
    # The endpoint the picker named first, to tell when another one served the request.
    picked: str | None = None
    # The answer to a request for an API the gateway does not offer (see extproc.client_api), or None.
    refusal: Reject | None = None

    def body_answer(self, message: ep.ProcessingRequest) -> ep.ProcessingResponse:
        """The answer to a request body chunk."""
        if not self.request_duplex:
            return ep.ProcessingResponse(request_body=ep.BodyResponse())
        chunk = message.request_body
        return ep.ProcessingResponse(request_body=_echo(chunk.body, chunk.end_of_stream))

    def answer(self, message: ep.ProcessingRequest) -> ep.ProcessingResponse | None:
        """The answer to any later message of the stream; None for one that needs none."""
        kind = message.WhichOneof("request")
        if kind == "request_body":
            return self.body_answer(message)
        if kind == "request_trailers":
            return ep.ProcessingResponse(request_trailers=_TRAILERS_DONE)
        if kind == "response_headers":
            self._served(message)
            return ep.ProcessingResponse(response_headers=_HEADERS_DONE)
        if kind == "response_body":
            if not self.response_duplex:
                return ep.ProcessingResponse(response_body=ep.BodyResponse())
            chunk = message.response_body
            return ep.ProcessingResponse(response_body=_echo(chunk.body, chunk.end_of_stream))
        if kind == "response_trailers":
            return ep.ProcessingResponse(response_trailers=_TRAILERS_DONE)
        return None

    async def rest(self, stream: AsyncIterator[ep.ProcessingRequest]) -> AsyncIterator[ep.ProcessingResponse]:
        """Answer what is left of the stream, to its end: the gateway holds the request and then the response
        at each message it sends until the answer comes."""
        async for message in stream:
            answer = self.answer(message)
            if answer is not None:
                yield answer

    def _served(self, message: ep.ProcessingRequest) -> None:
        """Log when the request was served by another endpoint than the picker's first (Envoy retried on the
        next one, or the gateway failed open); at debug, every served endpoint."""
        namespace = message.metadata_context.filter_metadata.get(EPP_NAMESPACE)
        if namespace is None or EPP_SERVED_KEY not in namespace.fields:
            return
        served = namespace.fields[EPP_SERVED_KEY].string_value
        if served == self.picked:
            log.debug("epp_served", served=served)
            return
        dropped = self.served_log.take(time.monotonic())
        if dropped >= 0:
            log.info("epp_served_elsewhere", picked=self.picked, served=served, suppressed_before=dropped)


def epp_stream(
    data: bytes, served_log: LogBudget, client_api: ClientApi, fairness_header: str | None = None
) -> EppStream:
    """The first message's subset hint, body modes, client key and, for an API the gateway does not offer,
    its refusal. Protobuf parses it a second time (the wire reader reads only the headers the picker's own
    Envoy forwards): the metadata is a nested Struct, worth no reader of its own."""
    message = ep.ProcessingRequest.FromString(data)
    config = message.protocol_config
    headers = _headers(message)
    return EppStream(
        _subset(message),
        config.request_body_mode == _FULL_DUPLEX,
        config.response_body_mode == _FULL_DUPLEX,
        served_log,
        headers.get(fairness_header) if fairness_header is not None else None,
        refusal=client_api.refusal(headers.get(":path", ""), headers),
    )


def _headers(message: ep.ProcessingRequest) -> dict[str, str]:
    """Every request header (Envoy sends the names in lower case); of a repeated one, the first."""
    headers: dict[str, str] = {}
    for header in message.request_headers.headers.headers:
        raw: bytes = header.raw_value
        headers.setdefault(header.key, raw.decode("latin-1") if raw else str(header.value))
    return headers


def _subset(message: ep.ProcessingRequest) -> frozenset[str] | None:
    namespace = message.metadata_context.filter_metadata.get(EPP_SUBSET_NAMESPACE)
    if namespace is None or EPP_SUBSET_KEY not in namespace.fields:
        return None
    value = namespace.fields[EPP_SUBSET_KEY]
    if value.WhichOneof("kind") == "list_value":
        return frozenset(v.string_value for v in value.list_value.values if v.string_value)
    # The protocol says a list; a gateway that writes one "ip:port,ip:port" string means the same. Anything
    # else names no endpoint, which the protocol answers 503.
    return frozenset(e for e in value.string_value.split(",") if e)


def _echo(body: bytes, end_of_stream: bool) -> ep.BodyResponse:
    """A FULL_DUPLEX_STREAMED chunk passed on unchanged."""
    streamed = ep.StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
    return ep.BodyResponse(response=ep.CommonResponse(body_mutation=ep.BodyMutation(streamed_response=streamed)))
