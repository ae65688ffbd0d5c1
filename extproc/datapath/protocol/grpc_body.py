"""Watch a gRPC request body as it streams through the picker, message by message, and refuse what Triton
must not get.

The picker reads only the first message's head to route (:func:`extproc.datapath.protocol.parse.parse_grpc_frame`);
the rest of the body passes through it chunk by chunk, and each chunk reaches Triton only once the picker
has acknowledged it. :class:`GrpcBodyGuard` follows the gRPC framing across those chunks and raises
:class:`~extproc.datapath.protocol.parse.RequestRejected` before the chunk that would let through:

- a compressed message that inflates past ``max_message_bytes``: Triton inflates a message whole and
  without a limit of its own (1 MB of gzip became 2.5 GB of its memory, and stayed), so the inflated size
  counts against the same limit as an uncompressed message;
- a message whose model name or version (fields 1 and 2) appears twice, or whose fields 1, 2 or 4 come
  after the tensors: protobuf keeps the last value of a repeated field, so Triton would run another model
  than the one the picker routed by;
- on a stream (``ModelStreamInfer``), a message naming another model or version than the first: the whole
  stream goes to the host picked for the first message, where another model may be missing or outside its
  tier's rules.

Only the field tags and the model's name and version are read (other values are skipped, never copied),
and a compressed message is inflated in bounded steps whose output is scanned and dropped, so the picker's
memory does not grow with the body.
"""

from __future__ import annotations

import zlib
from typing import Final

from extproc.datapath.protocol.parse import MalformedRequest, RequestTooLarge

__all__ = ["GrpcBodyGuard"]

_WBITS: Final = {"gzip": 31, "deflate": 15}
# Inflated bytes produced per step: bounded so that a bomb costs the picker at most this much memory at once.
_INFLATE_STEP: Final = 256 * 1024
# The fields the picker routes by: model_name, model_version; and parameters (sequence_id).
_NAME_FIELDS: Final = (1, 2)
_ROUTING_FIELDS: Final = (1, 2, 4)

# Longer than any model name or version Triton loads (a path component): refused rather than copied.
_MAX_NAME_BYTES: Final = 1024

# Scanner states: where in a message's top-level fields the next byte belongs.
_TAG: Final = 0
_VARINT: Final = 1
_LENGTH: Final = 2
_SKIP: Final = 3
_NAME: Final = 4  # inside field 1 or 2's value, kept


class _FieldScanner:
    """Top-level protobuf field tags of one message, fed in pieces of any size."""

    def __init__(self) -> None:
        self._state = _TAG
        self._value = 0
        self._shift = 0
        self._skip = 0
        self._field = 0
        self._seen_names = 0  # bit per field in _NAME_FIELDS already seen
        self._after_tensors = False
        self.name = b""  # field 1, the model's name
        self.version = b""  # field 2

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._state == _SKIP:
                step = min(self._skip, end - pos)
                pos += step
                self._skip -= step
                if self._skip == 0:
                    self._state = _TAG
                continue
            if self._state == _NAME:
                step = min(self._skip, end - pos)
                if self._field == 1:
                    self.name += data[pos : pos + step]
                else:
                    self.version += data[pos : pos + step]
                pos += step
                self._skip -= step
                if self._skip == 0:
                    self._state = _TAG
                continue
            byte = data[pos]
            pos += 1
            self._value |= (byte & 0x7F) << self._shift
            if byte & 0x80:
                self._shift += 7
                if self._shift > 63:
                    raise MalformedRequest("protobuf varint is too long")
                continue
            value, self._value, self._shift = self._value, 0, 0
            if self._state == _TAG:
                self._tag(value)
            elif self._state == _LENGTH:
                self._skip = value
                if self._field in _NAME_FIELDS and value:
                    if value > _MAX_NAME_BYTES:
                        raise MalformedRequest(f"protobuf field {self._field} (the model name or version) is too long")
                    self._state = _NAME
                else:
                    self._state = _SKIP if value else _TAG
            else:
                self._state = _TAG

    def _tag(self, tag: int) -> None:
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise MalformedRequest("invalid protobuf field number 0")
        if number in _ROUTING_FIELDS and self._after_tensors:
            raise MalformedRequest(f"protobuf field {number} comes after the tensors")
        if number > _ROUTING_FIELDS[-1]:
            self._after_tensors = True
        self._field = number
        if number in _NAME_FIELDS:
            bit = 1 << number
            if self._seen_names & bit:
                raise MalformedRequest(f"protobuf field {number} (the model name or version) is repeated")
            self._seen_names |= bit
        if wire == 0:
            self._state = _VARINT
        elif wire == 1:
            self._skip, self._state = 8, _SKIP
        elif wire == 5:
            self._skip, self._state = 4, _SKIP
        elif wire == 2:
            self._state = _LENGTH
        else:
            raise MalformedRequest(f"unsupported protobuf wire type {wire}")

    def finish(self) -> None:
        if self._state != _TAG or self._shift:
            raise MalformedRequest("the gRPC message ends inside a protobuf field")


class GrpcBodyGuard:
    """Follows one gRPC request body's frames (5-byte prefix: compressed flag and length, then the message)."""

    def __init__(self, encoding: str | None, max_message_bytes: int) -> None:
        self._encoding = encoding
        self._max = max_message_bytes
        self._prefix = b""
        self._remaining = 0  # bytes of the current message still to come; 0 between messages
        self._in_message = False
        self._messages = 0  # passed whole
        self._scanner = _FieldScanner()
        self._model: tuple[bytes, bytes] | None = None  # the first message's name and version
        self._inflater: zlib._Decompress | None = None
        self._inflated = 0

    @property
    def between_messages(self) -> bool:
        """At least one message has passed whole and no other has begun."""
        return self._messages > 0 and not self._in_message and not self._prefix

    def feed(self, chunk: bytes) -> None:
        """Check the next chunk of the body; raises RequestRejected before a chunk Triton must not get."""
        pos, end = 0, len(chunk)
        while pos < end:
            if not self._in_message:
                need = 5 - len(self._prefix)
                self._prefix += chunk[pos : pos + need]
                pos += min(need, end - pos)
                if len(self._prefix) == 5:
                    self._start(self._prefix)
                    self._prefix = b""
                continue
            step = min(self._remaining, end - pos)
            self._message_bytes(chunk[pos : pos + step])
            pos += step
            self._remaining -= step
            if self._remaining == 0:
                self._end_message()

    def finish(self) -> None:
        """The body ended: a message cut short is Triton's to refuse (its own error), not ours to guess."""

    def _start(self, prefix: bytes) -> None:
        flag, length = prefix[0], int.from_bytes(prefix[1:5], "big")
        if flag not in (0, 1):
            raise MalformedRequest(f"invalid gRPC frame flag {flag}")
        if length > self._max:
            raise RequestTooLarge(f"the gRPC message of {length} bytes is over the limit of {self._max}")
        self._scanner = _FieldScanner()
        self._inflated = 0
        if flag == 1:
            wbits = _WBITS.get(self._encoding or "")
            if wbits is None:
                raise MalformedRequest(f"unsupported grpc-encoding {self._encoding!r} for a compressed message")
            self._inflater = zlib.decompressobj(wbits)
        else:
            self._inflater = None
        self._remaining = length
        self._in_message = True
        if length == 0:
            self._end_message()

    def _message_bytes(self, data: bytes) -> None:
        inflater = self._inflater
        if inflater is None:
            self._scanner.feed(data)
            return
        while True:
            try:
                out = inflater.decompress(data, _INFLATE_STEP)
            except zlib.error:
                raise MalformedRequest("the compressed gRPC message is corrupt") from None
            self._inflated += len(out)
            if self._inflated > self._max:
                raise RequestTooLarge(f"the gRPC message inflates to more than the limit of {self._max} bytes")
            self._scanner.feed(out)
            data = inflater.unconsumed_tail
            # A full step may leave output inside zlib even when the input is all taken: ask again.
            if not data and len(out) < _INFLATE_STEP:
                return

    def _end_message(self) -> None:
        scanner = self._scanner
        scanner.finish()
        model = (scanner.name, scanner.version)
        if self._model is None:
            self._model = model
        elif model != self._model:
            first, this = self._model[0].decode(errors="replace"), scanner.name.decode(errors="replace")
            raise MalformedRequest(
                f"a stream serves one model (open a stream per model): the first message named {first!r}, "
                f"this one {this!r}"
            )
        self._messages += 1
        self._in_message = False
        self._inflater = None
