"""Find the model a Triton request names: from the REST path, or from the first gRPC message's protobuf.

Pure functions over bytes and strings, so they can be unit- and fuzz-tested without a server.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Final
from urllib.parse import unquote

GRPC_PREFIX: Final = "/inference.GRPCInferenceService/"

# gRPC methods whose request message has the model name in field 1 and its version in field 2.
_MODEL_METHODS: Final = frozenset(
    {"ModelInfer", "ModelStreamInfer", "ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"}
)
_MAX_NAME_BYTES: Final = 1024
_MAX_CACHED_PATH: Final = 512
# What a Triton model name (a directory name) cannot contain: a slash or a control character.
_BAD_NAME_CHARS: Final = re.compile(r"[/\x00-\x1f\x7f]")


class RequestRejected(ValueError):
    """A request the picker answers itself; the message is safe to show the client."""

    # ClassVar: compiled, a plain class attribute here would be an instance attribute
    # that an exception's __init__ never sets.
    status: ClassVar[int] = 400
    reason: ClassVar[str] = "malformed"


class MalformedRequest(RequestRejected):
    """The request cannot be a valid Triton call."""


class RequestTooLarge(RequestRejected):
    """A gRPC message over ``envoy.max_request_bytes`` (Envoy caps REST bodies by content-length itself)."""

    status: ClassVar[int] = 413
    reason: ClassVar[str] = "too_large"


@dataclass(frozen=True, slots=True)
class Target:
    """The model (and version) a request is for; ``model`` None means it names no model."""

    model: str | None = None
    version: str | None = None


NO_MODEL: Final = Target()


def parse_rest_path(path: str) -> Target:
    """``/v2/models/{name}[/versions/{v}][/…]`` names a model; the other ``/v2`` paths do not."""
    path = path.split("?", 1)[0]
    # A client chooses the path: only short ones (every real one) are cached, and by the path alone, so no
    # client can fill the cache with long paths or query strings.
    return _cached_parse(path) if len(path) <= _MAX_CACHED_PATH else _parse_path(path)


def _parse_path(path: str) -> Target:
    parts = path.split("/")
    # ["", "v2", "models", name, ...]; "/v2/models/stats" is every model's statistics, not a model.
    if len(parts) < 4 or parts[1] != "v2" or parts[2] != "models" or (parts[3] == "stats" and len(parts) == 4):
        return NO_MODEL
    model = _decode_segment(parts[3], "model name")
    version = None
    if len(parts) >= 6 and parts[4] == "versions":
        version = _decode_segment(parts[5], "model version")
    return Target(model, version)


# A fleet serves few models, so few distinct paths: parsing each once saves a few µs on every request.
_cached_parse: Final = functools.lru_cache(maxsize=4096)(_parse_path)


def _decode_segment(raw: str, what: str) -> str:
    try:
        value = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise MalformedRequest(f"the {what} in the path is not valid UTF-8") from None
    _check_name(value, what)
    return value


def _check_name(value: str, what: str) -> None:
    if not value:
        raise MalformedRequest(f"the {what} is empty")
    if len(value.encode()) > _MAX_NAME_BYTES:
        raise MalformedRequest(f"the {what} is longer than {_MAX_NAME_BYTES} bytes")
    if value in {".", ".."} or _BAD_NAME_CHARS.search(value):
        raise MalformedRequest(f"the {what} contains characters a Triton model name cannot have")


def grpc_method(path: str) -> str | None:
    """The method of a Triton gRPC call, or None when ``path`` is not one."""
    if not path.startswith(GRPC_PREFIX):
        return None
    return path[len(GRPC_PREFIX) :]


def grpc_names_model(method: str) -> bool:
    return method in _MODEL_METHODS


@dataclass(frozen=True, slots=True)
class GrpcFrame:
    """What the first body bytes of a gRPC call tell us, once enough of them have arrived."""

    target: Target
    message_bytes: int  # the length prefix: the size of the (possibly compressed) message
    # ModelInferRequest.parameters["sequence_id"], as tritonclient sends it (int64, uint64 or string).
    sequence_id: str | None = None
    # parameters["sequence_start"] / ["sequence_end"] (bool_param).
    sequence_start: bool = False
    sequence_end: bool = False
    # The first input's leading dimension (its batch dimension, for a model that batches), where the first
    # input tensor's head is within the bytes read.
    rows: int | None = None


def parse_grpc_frame(data: bytes, encoding: str | None, *, complete: bool) -> GrpcFrame | None:
    """Read the model name (field 1) and version (field 2) from the first gRPC message in ``data``.

    Returns None when more bytes are needed and ``complete`` is false; a message without field 1 gives
    ``NO_MODEL`` (the caller knows whether its method needs one). Raises MalformedRequest for bytes that
    cannot be a request message.
    """
    if len(data) < 5:
        if complete:
            raise MalformedRequest("the gRPC body is shorter than its 5-byte frame header")
        return None
    flag, length = data[0], int.from_bytes(data[1:5], "big")
    if flag not in (0, 1):
        raise MalformedRequest(f"invalid gRPC frame flag {flag}")
    payload = data[5 : 5 + length]
    whole = len(payload) == length
    if flag == 1:
        payload = _decompress_prefix(payload, encoding)
    fields = _request_fields(payload)
    model = fields.model
    if model is None and not whole and not complete:
        return None
    if model is None:
        return GrpcFrame(NO_MODEL, length)
    _check_name(model, "model name")
    version = fields.version or None
    if version is not None:
        _check_name(version, "model version")
    return GrpcFrame(
        Target(model, version), length, fields.sequence_id, fields.sequence_start, fields.sequence_end, fields.rows
    )


def _decompress_prefix(payload: bytes, encoding: str | None) -> bytes:
    """Decompress as much of a (maybe partial) compressed message as the bytes allow."""
    wbits = {"gzip": 31, "deflate": 15}.get(encoding or "")
    if wbits is None:
        raise MalformedRequest(f"unsupported grpc-encoding {encoding!r} for a compressed message")
    try:
        return zlib.decompressobj(wbits).decompress(payload, 64 * 1024)
    except zlib.error:
        raise MalformedRequest("the compressed gRPC message is corrupt") from None


@dataclass(slots=True)
class _Fields:
    model: str | None = None
    version: str | None = None
    sequence_id: str | None = None
    sequence_start: bool = False
    sequence_end: bool = False
    rows: int | None = None


# Fields up to ModelInferRequest.inputs (5); real encoders write fields in number order, so the outputs (6)
# and the raw tensor contents (7) come after everything we need.
_LAST_FIELD: Final = 5
_INPUTS: Final = 5
_SHAPE: Final = 3  # InferInputTensor.shape: repeated int64
# More rows than any request holds: such a leading dimension is not read as rows.
_MAX_ROWS: Final = 1 << 31


def _request_fields(buf: bytes) -> _Fields:
    """Fields 1 (model), 2 (version), the ``sequence_id`` parameter and the first input's leading
    dimension of a request message, as far as the bytes go: parsing stops at the first truncated field
    (the rest has not arrived), and after the first input."""
    found = _Fields()
    for number, value in _fields(buf, stop_after=_LAST_FIELD):
        if number == _INPUTS:
            if isinstance(value, bytes):
                found.rows = _leading_dimension(value)
            break
        if number in (1, 2) and isinstance(value, bytes):
            text = _utf8(value, f"protobuf field {number}")
            if number == 1:
                found.model = text
            else:
                found.version = text
        elif number == 4 and isinstance(value, bytes):
            _sequence_parameter(value, found)
    return found


def _sequence_parameter(entry: bytes, found: _Fields) -> None:
    """One ``map<string, InferParameter>`` entry: key (1) and value (2). ``sequence_id``: the value's int64
    (2), string (3) or uint64 (5) form; ``sequence_start`` / ``sequence_end``: its bool (1)."""
    key: bytes | None = None
    parameter: bytes | None = None
    for number, value in _fields(entry):
        if number == 1 and isinstance(value, bytes):
            key = value
        elif number == 2 and isinstance(value, bytes):
            parameter = value
    if parameter is None:
        return
    if key in (b"sequence_start", b"sequence_end"):
        flag = any(number == 1 and isinstance(value, int) and value != 0 for number, value in _fields(parameter))
        if key == b"sequence_start":
            found.sequence_start = flag
        else:
            found.sequence_end = flag
        return
    if key != b"sequence_id":
        return
    for number, value in _fields(parameter):
        if number in (2, 5) and isinstance(value, int):
            # int64 is two's complement in a varint; 0 means "not a sequence" to Triton.
            signed = value - (1 << 64) if number == 2 and value >= 1 << 63 else value
            found.sequence_id = str(signed) if signed else None
            return
        if number == 3 and isinstance(value, bytes):
            found.sequence_id = _utf8(value, "sequence_id") or None
            return


def _leading_dimension(tensor: bytes) -> int | None:
    """An ``InferInputTensor``'s first dimension (``shape``, packed or not), or None where it has none or
    one that cannot be a count of rows (0, negative, absurd). Malformed bytes are Triton's to refuse."""
    try:
        for number, value in _fields(tensor, stop_after=_SHAPE):
            if number != _SHAPE:
                continue
            # Packed: the varints one after another.
            first = _varint(value, 0)[0] if isinstance(value, bytes) else value
            return first if first is not None and 0 < first < _MAX_ROWS else None
    except MalformedRequest:
        return None
    return None


def _utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequest(f"{what} is not valid UTF-8") from None


def _fields(buf: bytes, stop_after: int | None = None) -> Iterator[tuple[int, int | bytes]]:
    """(field number, varint or bytes) for each complete field; fixed-width fields are skipped."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        if tag is None:
            return
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise MalformedRequest("invalid protobuf field number 0")
        if stop_after is not None and number > stop_after:
            return
        if wire == 0:
            value, pos = _varint(buf, pos)
            if value is None:
                return
            yield number, value
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if size is None or pos + size > end:
                return
            yield number, buf[pos : pos + size]
            pos += size
        else:
            raise MalformedRequest(f"unsupported protobuf wire type {wire}")


def _varint(buf: bytes, pos: int) -> tuple[int | None, int]:
    result = shift = 0
    while pos < len(buf):
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise MalformedRequest("protobuf varint is too long")
    return None, pos
