"""Finding the model in REST paths and in the first gRPC message, including hostile input."""

from __future__ import annotations

import gzip
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from extproc.datapath.protocol.parse import (
    NO_MODEL,
    MalformedRequest,
    Target,
    grpc_method,
    parse_grpc_frame,
    parse_rest_path,
)


def frame(message: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">BI", 1 if compressed else 0, len(message)) + message


def infer_request(model: str, version: str = "", tensor_bytes: int = 64) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version, id="req-1")
    request.raw_input_contents.append(b"\0" * tensor_bytes)
    return bytes(request.SerializeToString())


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/v2/models/mlp/infer", Target("mlp")),
        ("/v2/models/mlp/versions/3/infer", Target("mlp", "3")),
        ("/v2/models/mlp", Target("mlp")),
        ("/v2/models/mlp/ready?x=1", Target("mlp")),
        ("/v2/models/my%20model/infer", Target("my model")),
        ("/v2/models/stats", NO_MODEL),
        ("/v2/models/mlp/stats", Target("mlp")),
        ("/v2/health/ready", NO_MODEL),
        ("/v2", NO_MODEL),
        ("/v2/repository/index", NO_MODEL),
    ],
)
def test_rest_paths(path: str, target: Target) -> None:
    assert parse_rest_path(path) == target


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models//infer",
        "/v2/models/%2e%2e/infer",
        "/v2/models/a%2fb/infer",
        "/v2/models/%ff%fe/infer",
        "/v2/models/a%00b/infer",
        "/v2/models/" + "x" * 2000 + "/infer",
        "/v2/models/mlp/versions//infer",
    ],
)
def test_hostile_rest_paths_are_malformed(path: str) -> None:
    with pytest.raises(MalformedRequest):
        parse_rest_path(path)


def test_grpc_method() -> None:
    assert grpc_method("/inference.GRPCInferenceService/ModelInfer") == "ModelInfer"
    assert grpc_method("/v2/models/x/infer") is None


def test_grpc_model_and_version() -> None:
    parsed = parse_grpc_frame(frame(infer_request("embed", "2")), None, complete=True)
    assert parsed is not None
    assert parsed.target == Target("embed", "2")
    assert parsed.message_bytes == len(infer_request("embed", "2"))


def test_grpc_first_chunk_is_enough_and_short_chunks_wait() -> None:
    data = frame(infer_request("embed", tensor_bytes=100_000))
    assert parse_grpc_frame(data[:200], None, complete=False) == parse_grpc_frame(data, None, complete=True)
    assert parse_grpc_frame(data[:3], None, complete=False) is None
    assert parse_grpc_frame(data[:8], None, complete=False) is None  # name not yet complete
    with pytest.raises(MalformedRequest):
        parse_grpc_frame(data[:3], None, complete=True)


def test_grpc_compressed_prefix() -> None:
    message = infer_request("mlp_classifier", tensor_bytes=200_000)
    data = frame(gzip.compress(message), compressed=True)
    parsed = parse_grpc_frame(data[:300], "gzip", complete=False)
    assert parsed is not None and parsed.target == Target("mlp_classifier")
    with pytest.raises(MalformedRequest, match="unsupported grpc-encoding"):
        parse_grpc_frame(data, "snappy", complete=True)


def test_grpc_without_model_name() -> None:
    empty = service_pb2.ModelStatisticsRequest().SerializeToString()
    parsed = parse_grpc_frame(frame(empty), None, complete=True)
    assert parsed is not None and parsed.target is NO_MODEL


@pytest.mark.parametrize(
    "data",
    [
        b"\x02\x00\x00\x00\x01\x0a",  # bad compression flag
        frame(b"\x0a\x02\xff\xfe"),  # name not UTF-8
        frame(b"\x0a\x02.."),  # path trick
        frame(b"\x03"),  # field number 0
        frame(b"\x0f\x00"),  # wire type 7
        frame(b"\x0a" + b"\xff" * 11),  # endless varint
    ],
)
def test_garbage_grpc_frames_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedRequest):
        parse_grpc_frame(data, None, complete=True)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([None, "gzip", "deflate", "identity"]), st.booleans())
def test_fuzz_grpc_parser_only_returns_or_raises_malformed(data: bytes, encoding: str | None, complete: bool) -> None:
    try:
        result = parse_grpc_frame(data, encoding, complete=complete)
    except MalformedRequest:
        return
    assert result is None or result.target.model is None or 0 < len(result.target.model.encode()) <= 1024


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_rest_parser_only_returns_or_raises_malformed(suffix: str) -> None:
    try:
        target = parse_rest_path("/v2/models/" + suffix)
    except MalformedRequest:
        return
    if target.model is not None:
        assert target.model not in {".", ".."} and "/" not in target.model


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=100).filter(lambda s: "/" not in s and s not in {".", ".."}), st.integers(0, 5000))
def test_fuzz_grpc_roundtrip(model: str, tensor_bytes: int) -> None:
    if any(ord(c) < 0x20 or c == "\x7f" for c in model):
        return
    parsed = parse_grpc_frame(frame(infer_request(model, tensor_bytes=tensor_bytes)), None, complete=True)
    assert parsed is not None and parsed.target.model == model


def sequence_request(sequence_id: int | str, start: bool = True) -> bytes:
    request = service_pb2.ModelInferRequest(model_name="seq_accumulate", id="r")
    if isinstance(sequence_id, int):
        request.parameters["sequence_id"].int64_param = sequence_id
    else:
        request.parameters["sequence_id"].string_param = sequence_id
    request.parameters["sequence_start"].bool_param = start
    request.raw_input_contents.append(b"\0" * 4096)
    return bytes(request.SerializeToString())


@pytest.mark.parametrize(("sequence_id", "expected"), [(42, "42"), (-7, "-7"), ("user-9", "user-9"), (0, None)])
def test_grpc_sequence_id_from_parameters(sequence_id: int | str, expected: str | None) -> None:
    data = frame(sequence_request(sequence_id))
    parsed = parse_grpc_frame(data[:200], None, complete=False)
    assert parsed is not None and parsed.target == Target("seq_accumulate")
    assert parsed.sequence_id == expected


def test_grpc_uint64_sequence_id() -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    request.parameters["sequence_id"].uint64_param = 2**63 + 5
    parsed = parse_grpc_frame(frame(request.SerializeToString()), None, complete=True)
    assert parsed is not None and parsed.sequence_id == str(2**63 + 5)


def test_grpc_sequence_flags_from_parameters() -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    request.parameters["sequence_id"].int64_param = 5
    request.parameters["sequence_start"].bool_param = True
    request.parameters["sequence_end"].bool_param = False
    parsed = parse_grpc_frame(frame(request.SerializeToString()), None, complete=True)
    assert parsed is not None and (parsed.sequence_id, parsed.sequence_start, parsed.sequence_end) == ("5", True, False)
    request.parameters["sequence_end"].bool_param = True
    parsed = parse_grpc_frame(frame(request.SerializeToString()), None, complete=True)
    assert parsed is not None and parsed.sequence_end


def test_grpc_rows_from_the_first_inputs_leading_dimension() -> None:
    """The first input's batch dimension, packed or not, as far as the first chunk goes; nothing where the
    shape cannot be a count of rows or the input has not arrived."""
    request = service_pb2.ModelInferRequest(model_name="m")
    first = request.inputs.add(name="INPUT0", datatype="FP32", shape=[24, 16])
    request.inputs.add(name="INPUT1", datatype="FP32", shape=[3, 16])
    request.raw_input_contents.append(b"\0" * 64)
    data = frame(request.SerializeToString())
    parsed = parse_grpc_frame(data, None, complete=True)
    assert parsed is not None and parsed.rows == 24
    parsed = parse_grpc_frame(data[:12], None, complete=False)  # the model name, not the inputs yet
    assert parsed is not None and parsed.target.model == "m" and parsed.rows is None
    # Unpacked shape (some encoders write repeated scalars one by one): field 3, varint, per dimension.
    tensor = b"\x0a\x01x" + b"\x18\x05" + b"\x18\x10"
    unpacked = b"\x0a\x01m" + b"\x2a" + bytes([len(tensor)]) + tensor
    parsed = parse_grpc_frame(frame(unpacked), None, complete=True)
    assert parsed is not None and parsed.rows == 5
    for shape in ([0, 16], [-1, 16], []):
        del first.shape[:]
        first.shape.extend(shape)
        parsed = parse_grpc_frame(frame(request.SerializeToString()), None, complete=True)
        assert parsed is not None and parsed.rows is None, shape
    no_inputs = parse_grpc_frame(frame(infer_request("m")), None, complete=True)
    assert no_inputs is not None and no_inputs.rows is None
