"""Envoy's first ProcessingRequest of a stream, the request headers, read straight from its bytes.

Every request's stream starts with this message. Through the protobuf library, the picker paid for a Python
object per message, per header and per field read: 17k instructions for the three headers Envoy forwards,
more than the rest of the decision compiled (docs/design.md, "The wire reader"). Reading the few fields it uses from the
wire format costs a small part of that. Anything this reader does not expect (another kind of message, an
encoding Envoy does not produce, malformed bytes) gives None, and the caller parses the message with the
protobuf library instead, which also reports what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from extproc.datapath.headers import READ_HEADERS

# Field numbers (envoy/service/ext_proc/v3/external_processor.proto, envoy/config/core/v3/base.proto).
_REQUEST_HEADERS: Final = 2  # ProcessingRequest.request_headers: HttpHeaders, one of the `request` oneof (2..7)
_LAST_REQUEST_KIND: Final = 7
_PROTOCOL_CONFIG: Final = 11  # ProcessingRequest.protocol_config: ProtocolConfiguration
_HEADER_MAP: Final = 1  # HttpHeaders.headers: HeaderMap
_END_OF_STREAM: Final = 3  # HttpHeaders.end_of_stream
_HEADER: Final = 1  # HeaderMap.headers: repeated HeaderValue
# HeaderValue
_KEY: Final = 1
_VALUE: Final = 2
_RAW_VALUE: Final = 3
_REQUEST_BODY_MODE: Final = 1  # ProtocolConfiguration.request_body_mode
_STREAMED: Final = 1  # ProcessingMode.BodySendMode.STREAMED

# Wire types.
_VARINT: Final = 0
_FIXED64: Final = 1
_LEN: Final = 2
_FIXED32: Final = 5


@dataclass(slots=True, init=False)  # a written __init__: see extproc.datapath.scheduling.types.InferenceRequest
class RequestHeaders:
    """What the picker reads of the request-headers message."""

    # Only the headers the picker reads (READ_HEADERS): values from raw_value (latin-1), else value.
    headers: dict[str, str]
    end_of_stream: bool
    # ProtocolConfiguration.request_body_mode is STREAMED: the route streams the body to the picker.
    streamed_body: bool

    def __init__(self, headers: dict[str, str], end_of_stream: bool = False, streamed_body: bool = False) -> None:
        self.headers = headers
        self.end_of_stream = end_of_stream
        self.streamed_body = streamed_body


class _Unexpected(Exception):
    """Bytes this reader leaves to the protobuf library."""


def read_request_headers(data: bytes) -> RequestHeaders | None:
    """The request-headers message in ``data``, or None (see the module's docstring)."""
    try:
        return _read(data)
    except (_Unexpected, IndexError, UnicodeDecodeError):
        return None


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """The varint at ``i`` and the position after it."""
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise _Unexpected


def _tag(data: bytes, i: int) -> tuple[int, int, int]:
    """The field number and wire type of the tag at ``i``, and the position after it."""
    tag, i = _varint(data, i)
    if tag < 8:
        raise _Unexpected  # field number 0 is invalid
    return tag >> 3, tag & 7, i


def _skip(data: bytes, i: int, wire_type: int) -> int:
    """The position after a field's value that is not read."""
    if wire_type == _VARINT:
        return _varint(data, i)[1]
    if wire_type == _LEN:
        length, i = _varint(data, i)
        return _within(data, i + length)
    if wire_type == _FIXED64:
        return _within(data, i + 8)
    if wire_type == _FIXED32:
        return _within(data, i + 4)
    raise _Unexpected  # groups (3, 4) and the invalid types


def _within(data: bytes, end: int) -> int:
    if end > len(data):
        raise _Unexpected
    return end


def _read(data: bytes) -> RequestHeaders | None:
    i, end = 0, len(data)
    found: RequestHeaders | None = None
    while i < end:
        number, wire_type, i = _tag(data, i)
        if number == _REQUEST_HEADERS and wire_type == _LEN and found is None:
            length, i = _varint(data, i)
            stop = _within(data, i + length)
            found = _http_headers(data, i, stop)
            i = stop
        elif number == _PROTOCOL_CONFIG and wire_type == _LEN:
            if found is None:
                raise _Unexpected  # the config before the headers: valid protobuf, not what Envoy writes
            length, i = _varint(data, i)
            stop = _within(data, i + length)
            found.streamed_body = _streamed_body(data, i, stop)
            i = stop
        elif _REQUEST_HEADERS <= number <= _LAST_REQUEST_KIND:
            # Another kind of message, or the headers twice (merged, in protobuf's rules): not ours to read.
            raise _Unexpected
        else:
            i = _skip(data, i, wire_type)
    return found


def _http_headers(data: bytes, i: int, end: int) -> RequestHeaders:
    found = RequestHeaders({})
    while i < end:
        number, wire_type, i = _tag(data, i)
        if number == _HEADER_MAP and wire_type == _LEN:
            length, i = _varint(data, i)
            stop = _within(data, i + length)
            _header_map(data, i, stop, found.headers)
            i = stop
        elif number == _END_OF_STREAM and wire_type == _VARINT:
            value, i = _varint(data, i)
            found.end_of_stream = value != 0
        else:
            i = _skip(data, i, wire_type)
    if i != end:
        raise _Unexpected
    return found


def _header_map(data: bytes, i: int, end: int, out: dict[str, str]) -> None:
    while i < end:
        number, wire_type, i = _tag(data, i)
        if number == _HEADER and wire_type == _LEN:
            length, i = _varint(data, i)
            stop = _within(data, i + length)
            _header(data, i, stop, out)
            i = stop
        else:
            i = _skip(data, i, wire_type)
    if i != end:
        raise _Unexpected


def _header(data: bytes, i: int, end: int, out: dict[str, str]) -> None:
    key = value = ""
    raw = b""
    while i < end:
        number, wire_type, i = _tag(data, i)
        if wire_type == _LEN and _KEY <= number <= _RAW_VALUE:
            length, i = _varint(data, i)
            stop = _within(data, i + length)
            if number == _KEY:
                key = data[i:stop].decode()
            elif number == _VALUE:
                value = data[i:stop].decode()
            else:
                raw = data[i:stop]
            i = stop
        else:
            i = _skip(data, i, wire_type)
    if i != end:
        raise _Unexpected
    if key in READ_HEADERS:
        out[key] = raw.decode("latin-1") if raw else value


def _streamed_body(data: bytes, i: int, end: int) -> bool:
    mode = 0
    while i < end:
        number, wire_type, i = _tag(data, i)
        if number == _REQUEST_BODY_MODE and wire_type == _VARINT:
            mode, i = _varint(data, i)
        else:
            i = _skip(data, i, wire_type)
    if i != end:
        raise _Unexpected
    return mode == _STREAMED
