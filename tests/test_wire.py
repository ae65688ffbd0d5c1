"""The request-headers reader (extproc.datapath.protocol.wire) against the protobuf library: the same answer for
every message Envoy could send, and None (never a wrong answer or an exception) for anything else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import overhead as ov
from benchmarks.decision import rest_request_bytes
from benchmarks.overhead.server import picker_servicer
from extproc.datapath.headers import READ_HEADERS
from extproc.datapath.protocol.wire import read_request_headers
from extproc.handlers.server import Processor, request_headers_of

# Header names the picker reads, and some it does not (Envoy's forward_rules keep those away, but the
# reader must not depend on it).
KEYS = [*sorted(READ_HEADERS), ":method", "content-type", "x-triton-lb-hosts", "user-agent"]


header_values = st.builds(
    lambda key, value, raw: base_pb2.HeaderValue(key=key, value=value, raw_value=raw),
    st.sampled_from(KEYS),
    st.text(max_size=20),
    st.one_of(st.just(b""), st.binary(max_size=300)),
)


@st.composite
def request_headers(draw: st.DrawFn) -> Any:
    message = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=draw(st.lists(header_values, max_size=8))),
            end_of_stream=draw(st.booleans()),
        )
    )
    if draw(st.booleans()):
        message.protocol_config.request_body_mode = draw(st.integers(min_value=0, max_value=5))
        message.protocol_config.send_body_without_waiting_for_header_response = draw(st.booleans())
    if draw(st.booleans()):
        message.request_headers.attributes["envoy.filters.http.ext_proc"].CopyFrom(
            struct_pb2.Struct(fields={"request.path": struct_pb2.Value(string_value="/v2")})
        )
    if draw(st.booleans()):
        message.observability_mode = True
    return message


@given(request_headers())
@settings(max_examples=300)
def test_reads_request_headers_as_protobuf_does(message: Any) -> None:
    assert read_request_headers(message.SerializeToString()) == request_headers_of(message)


def test_reads_the_benchmarks_request_as_protobuf_does() -> None:
    data = rest_request_bytes("mlp")
    found = read_request_headers(data)
    assert found is not None and found == request_headers_of(ep.ProcessingRequest.FromString(data))
    assert found.headers[":path"] == "/v2/models/mlp/infer"


def test_other_messages_are_left_to_protobuf() -> None:
    body = ep.ProcessingRequest(request_body=ep.HttpBody(body=b"{}", end_of_stream=True))
    trailers = ep.ProcessingRequest(request_trailers=ep.HttpTrailers())
    headers = ep.ProcessingRequest(request_headers=ep.HttpHeaders(end_of_stream=True)).SerializeToString()
    for data in (body.SerializeToString(), trailers.SerializeToString(), b"", headers + headers):
        assert read_request_headers(data) is None


def protobufs_answer_or_none(data: bytes) -> None:
    """The reader never raises, and where protobuf parses the bytes it gives protobuf's answer or None.
    Where protobuf rejects them, the reader may still answer: it checks what it reads, not the fields it
    skips (e.g. invalid UTF-8 in an attribute's Struct value); Envoy writes neither kind of damage."""
    found = read_request_headers(data)
    if found is None:
        return
    try:
        message = ep.ProcessingRequest.FromString(data)
    except DecodeError:
        return
    assert message.HasField("request_headers") and found == request_headers_of(message)


@given(st.binary(max_size=200))
@settings(max_examples=500)
def test_any_bytes_give_protobufs_answer_or_none(data: bytes) -> None:
    protobufs_answer_or_none(data)


@given(request_headers(), st.integers(min_value=1, max_value=40), st.binary(max_size=3))
def test_damaged_messages_give_protobufs_answer_or_none(message: Any, cut: int, tail: bytes) -> None:
    data = message.SerializeToString()
    protobufs_answer_or_none(data[: max(0, len(data) - cut)] + tail)


async def _answers(processor: Processor, data: bytes) -> list[Any]:
    async def requests() -> AsyncIterator[bytes]:
        yield data

    return [r async for r in processor.Process(requests(), None)]  # type: ignore[arg-type]  # no context used


async def test_the_picker_answers_what_the_reader_leaves_as_it_answers_the_rest() -> None:
    fleet = ov.bench_fleet([18001], [18101, 18102], "unix:/tmp/w.sock", 18080, 18090)
    processor, _ = picker_servicer(fleet)
    headers = ep.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":path", raw_value=b"/v2/models/mlp/infer")])
    )
    usual = ep.ProcessingRequest(request_headers=headers).SerializeToString()
    # Valid protobuf, but the protocol config ahead of the headers: Envoy never writes it so, the reader
    # leaves it, and protobuf parses it.
    config = ep.ProcessingRequest(protocol_config=ep.ProtocolConfiguration(request_body_mode=0))
    unusual = config.SerializeToString() + usual
    assert read_request_headers(usual) is not None and read_request_headers(unusual) is None
    (routed,) = await _answers(processor, usual)
    assert routed.request_headers.response.header_mutation.set_headers
    assert await _answers(processor, unusual) == [routed]
    # Not the request headers at all: no answer, the stream ends (and a warning is logged).
    body = ep.ProcessingRequest(request_body=ep.HttpBody(body=b"{}")).SerializeToString()
    assert await _answers(processor, body) == []
