"""Find the model a Triton request names: from the REST path, or from the first gRPC message's protobuf.

Pure functions over bytes and strings, so they can be unit- and fuzz-tested without a server.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from urllib.parse import unquote

GRPC_PREFIX = "/inference.GRPCInferenceService/"

# gRPC methods whose request message has the model name in field 1 and its version in field 2.
_MODEL_METHODS = frozenset(
    {"ModelInfer", "ModelStreamInfer", "ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"}
)
_MAX_NAME_BYTES = 1024


class MalformedRequest(ValueError):
    """The request cannot be a valid Triton call; the message is safe to show the client."""


@dataclass(frozen=True, slots=True)
class Target:
    """The model (and version) a request is for; ``model`` None means it names no model."""

    model: str | None = None
    version: str | None = None


NO_MODEL = Target()


def parse_rest_path(path: str) -> Target:
    """``/v2/models/{name}[/versions/{v}][/…]`` names a model; the other ``/v2`` paths do not."""
    path = path.split("?", 1)[0]
    parts = path.split("/")
    # ["", "v2", "models", name, ...]; "/v2/models/stats" is every model's statistics, not a model.
    if len(parts) < 4 or parts[1] != "v2" or parts[2] != "models" or (parts[3] == "stats" and len(parts) == 4):
        return NO_MODEL
    model = _decode_segment(parts[3], "model name")
    version = None
    if len(parts) >= 6 and parts[4] == "versions":
        version = _decode_segment(parts[5], "model version")
    return Target(model, version)


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
    if value in {".", ".."} or "/" in value or any(ord(c) < 0x20 or c == "\x7f" for c in value):
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
    fields = _string_fields(payload)
    model = fields.get(1)
    if model is None and not whole and not complete:
        return None
    if model is None:
        return GrpcFrame(NO_MODEL, length)
    _check_name(model, "model name")
    version = fields.get(2) or None
    if version is not None:
        _check_name(version, "model version")
    return GrpcFrame(Target(model, version), length)


def _decompress_prefix(payload: bytes, encoding: str | None) -> bytes:
    """Decompress as much of a (maybe partial) compressed message as the bytes allow."""
    wbits = {"gzip": 31, "deflate": 15}.get(encoding or "")
    if wbits is None:
        raise MalformedRequest(f"unsupported grpc-encoding {encoding!r} for a compressed message")
    try:
        return zlib.decompressobj(wbits).decompress(payload, 64 * 1024)
    except zlib.error:
        raise MalformedRequest("the compressed gRPC message is corrupt") from None


def _string_fields(buf: bytes) -> dict[int, str]:
    """Fields 1 and 2 of a protobuf message when they are length-delimited UTF-8; stops early once both
    are found or at the first truncated field (the rest of the message may not have arrived)."""
    found: dict[int, str] = {}
    pos, end = 0, len(buf)
    while pos < end and len(found) < 2:
        tag, pos = _varint(buf, pos)
        if tag is None:
            break
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise MalformedRequest("invalid protobuf field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
            if value is None:
                break
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if size is None or pos + size > end:
                break
            if number in (1, 2):
                try:
                    found[number] = buf[pos : pos + size].decode("utf-8")
                except UnicodeDecodeError:
                    raise MalformedRequest(f"protobuf field {number} is not valid UTF-8") from None
            pos += size
        else:
            raise MalformedRequest(f"unsupported protobuf wire type {wire}")
    return found


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
