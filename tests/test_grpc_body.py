"""The gRPC body guard (extproc.datapath.protocol.grpc_body), fed as Envoy feeds the picker: in chunks of any size."""

from __future__ import annotations

import gzip
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from extproc.datapath.protocol.grpc_body import GrpcBodyGuard
from extproc.datapath.protocol.parse import MalformedRequest, RequestRejected, RequestTooLarge

LIMIT = 1024 * 1024


def frame(message: bytes, compressed: bool = False) -> bytes:
    return bytes([1 if compressed else 0]) + len(message).to_bytes(4, "big") + message


def infer(model: str = "m", raw: bytes = b"\0" * 64, sequence_id: int | None = None) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model, model_version="1", id="x")
    if sequence_id is not None:
        request.parameters["sequence_id"].int64_param = sequence_id
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, len(raw) // 4])
    request.raw_input_contents.append(raw)
    return bytes(request.SerializeToString())


def feed(body: bytes, cuts: list[int], encoding: str | None = None, limit: int = LIMIT) -> None:
    guard = GrpcBodyGuard(encoding, limit)
    start = 0
    for cut in sorted(cuts):
        guard.feed(body[start:cut])
        start = cut
    guard.feed(body[start:])


def field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    st.sampled_from([None, "gzip", "deflate"]),
    st.data(),
)
def test_valid_messages_pass_whatever_the_chunking(
    raws: list[bytes], encoding: str | None, data: st.DataObject
) -> None:
    """A stream of real ModelInferRequest messages, each compressed or not, cut anywhere."""
    body = b""
    for i, raw in enumerate(raws):
        message = infer("m" * 300, raw.ljust(4, b"\0"), sequence_id=i or None)
        if encoding is not None and data.draw(st.booleans()):
            packed = gzip.compress(message) if encoding == "gzip" else zlib.compress(message)
            body += frame(packed, compressed=True)
        else:
            body += frame(message)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=8))
    feed(body, cuts, encoding)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_message_that_inflates_past_the_limit_is_refused(encoding: str) -> None:
    message = infer(raw=b"\0" * (4 * LIMIT))
    packed = gzip.compress(message) if encoding == "gzip" else zlib.compress(message)
    assert len(packed) < LIMIT // 10
    body = frame(packed, compressed=True)
    with pytest.raises(RequestTooLarge, match="inflates"):
        feed(body, list(range(0, len(body), 1000)), encoding)


def test_a_message_over_the_limit_is_refused_by_its_length_prefix() -> None:
    with pytest.raises(RequestTooLarge):
        GrpcBodyGuard(None, LIMIT).feed(bytes([0]) + (LIMIT + 1).to_bytes(4, "big"))


def test_the_limit_applies_to_every_message_of_a_stream() -> None:
    ok = frame(infer())
    big = frame(gzip.compress(infer(raw=b"\0" * (2 * LIMIT))), compressed=True)
    guard = GrpcBodyGuard("gzip", LIMIT)
    guard.feed(ok)
    guard.feed(ok)
    with pytest.raises(RequestTooLarge):
        guard.feed(big)


@pytest.mark.parametrize(
    "message",
    [
        # A second model name after the tensors: protobuf keeps the last, Triton would run it.
        field(1, b"a") + field(5, b"") + field(1, b"b"),
        field(1, b"a") + field(1, b"b"),
        field(1, b"a") + field(2, b"1") + field(2, b"2"),
        field(1, b"a") + field(7, b"\0") + field(4, b""),
        field(1, b"a") + field(5, b"") + field(2, b"9"),
    ],
)
def test_routing_fields_must_be_single_and_before_the_tensors(message: bytes) -> None:
    with pytest.raises(MalformedRequest):
        feed(frame(message), [1, 7])


def test_the_same_checks_inside_a_compressed_message() -> None:
    message = field(1, b"a") + field(5, b"") + field(1, b"b")
    with pytest.raises(MalformedRequest):
        feed(frame(gzip.compress(message), compressed=True), [], "gzip")


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (bytes([2, 0, 0, 0, 1, 0]), None),  # frame flag 2
        (frame(b"\x0a\x01a", compressed=True), None),  # compressed without an encoding
        (frame(b"not gzip at all", compressed=True), "gzip"),
        (frame(b"\x0b"), None),  # wire type 3
        (frame(b"\x02"), None),  # field number 0
        (frame(b"\x0a\x05ab"), None),  # a field longer than its message
    ],
)
def test_bytes_that_are_no_request_are_refused(body: bytes, encoding: str | None) -> None:
    with pytest.raises(RequestRejected):
        feed(body, [3], encoding)


def test_a_body_cut_short_is_left_to_triton() -> None:
    """The guard only sees what has arrived: an unfinished message is not an error yet."""
    body = frame(infer())
    GrpcBodyGuard(None, LIMIT).feed(body[: len(body) // 2])


@pytest.mark.parametrize(
    "later",
    [
        infer("other"),
        service_pb2.ModelInferRequest(model_name="m", model_version="2").SerializeToString(),
        service_pb2.ModelInferRequest(id="no model").SerializeToString(),
    ],
)
def test_every_message_of_a_stream_names_the_first_ones_model_and_version(later: bytes) -> None:
    """The stream's host was picked for its first message's model."""
    guard = GrpcBodyGuard("gzip", LIMIT)
    guard.feed(frame(infer()))
    guard.feed(frame(gzip.compress(infer()), compressed=True))
    body = frame(later)
    guard.feed(body[:-1])  # refused by the byte that completes the message, so Triton never has it whole
    with pytest.raises(MalformedRequest, match="stream"):
        guard.feed(body[-1:])


def test_a_model_name_longer_than_any_model_is_refused() -> None:
    with pytest.raises(MalformedRequest, match="too long"):
        feed(frame(infer("m" * 2000)), [10, 1000])
