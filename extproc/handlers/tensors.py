"""Refuse a REST inference request whose tensor headers cannot be valid, before it reaches Triton.

Triton's HTTP frontend sizes a JSON-encoded input from its ``shape`` and allocates that much before it reads
``data``: ``{"inputs":[{"name":"INPUT","shape":[1,1000000000000],"datatype":"FP32","data":[1,2,3,4]}]}``
throws ``std::bad_alloc`` and the whole server exits (Triton 2.51). Its JSON parser (RapidJSON) also recurses
once per nesting level. :class:`TensorHeadReader` reads a KServe v2 request body as it streams past the
picker and refuses, with :class:`~extproc.handlers.parse.MalformedRequest` (a 400), inputs whose size the
body cannot back (JSON data needs a byte per element at least, binary data the exact size), requests over an
element cap or off the model's configuration, and JSON nested deeper than ``_MAX_DEPTH``, without ever
holding the body.

It reads the JSON text (the whole body, or the ``Inference-Header-Content-Length`` bytes before the binary
tensors) one of two ways, with the same checks:

* a text of at most ``_WHOLE_BYTES`` (the JSON part of a tritonclient binary request, a small JSON request)
  is kept until it is complete, then parsed by one :func:`json.loads`, unless it has so many brackets that
  it could nest deeper than ``_MAX_DEPTH`` (json.loads would recurse): the scanner reads it then;
* a longer one (JSON tensor data) goes through an incremental scanner: a state machine over the
  request's structure (the top-level object, its ``inputs`` array, each input object) that hands every key
  and value to a value scanner. That one finds where the value ends (strings, escapes, nested brackets, with
  an explicit depth counter: no recursion) by regular expressions over the chunk, so tensor data costs one C
  call per chunk, nested or not (see ``_NESTED_LEVELS``). The values the reader needs (input ``name``,
  ``shape``, ``datatype``, ``parameters``; the top-level ``parameters``) are kept and parsed by
  :func:`json.loads` when they end; every other value, ``data`` included, is skipped without being kept.
  Skipped values are checked only as far as finding their end needs (the characters JSON allows there,
  UTF-8 in strings): Triton's parser refuses the rest before it allocates anything.

``max_head_bytes`` bounds the JSON the reader parses rather than skips as tensor data: everything but the
inputs' ``data`` values. Past it before the ``inputs`` array ends, the request is refused; past it after,
the reader stops with what it has (the tensors are checked; ``sequence_id`` is None unless already seen).
The scanner goes on after ``inputs`` to the end of the top-level object because tritonclient writes the
request's ``parameters`` (and its ``sequence_id``) after ``inputs`` and ``outputs``.

The JSON must have unique keys in the objects the reader looks at: parsers disagree on which copy of a
repeated key counts (RapidJSON, in Triton, takes the first; Python's the last), so a repeated ``shape`` could
show the gateway one shape and Triton another.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from extproc.handlers.parse import MalformedRequest

__all__ = ["InputSpec", "ModelInputs", "TensorHead", "TensorHeadReader"]

# Bytes per element of each KServe v2 datatype; 0 for BYTES, whose elements are 4-byte-length-prefixed
# strings of any size.
_ELEMENT_BYTES: Final[dict[str, int]] = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
    "BYTES": 0,
}
_BYTES_PREFIX: Final = 4  # the length prefix of each binary BYTES element
_MAX_RANK: Final = 32  # numpy 1.x's own limit: any array a Python client can build has at most this
_MAX_DIM: Final = (1 << 63) - 1  # Triton keeps dimensions as int64
# Nesting of the whole JSON text (the top-level object counts 1, an input's data array 4): real requests
# nest a handful of levels, RapidJSON recurses once per level.
_MAX_DEPTH: Final = 64
_SHOWN_CHARS: Final = 64  # of a client's string, in an error message
# json.loads converts every number of the tensor data, the scanner skips them: past about 4 KiB of JSON (200
# FP32 values) the scanner is the faster, and it keeps no body.
_WHOLE_BYTES: Final = 4096

_QUOTE: Final = 0x22
_BACKSLASH: Final = 0x5C
_COMMA: Final = 0x2C
_COLON: Final = 0x3A
_LBRACKET: Final = 0x5B
_RBRACKET: Final = 0x5D
_LBRACE: Final = 0x7B
_RBRACE: Final = 0x7D
_SCALAR_START: Final = frozenset(b"-0123456789tfn")

_WHITESPACE: Final = re.compile(rb"[ \t\r\n]*+")
# A string's content and escapes, up to its closing quote, or a backslash the chunk cuts from what it escapes.
_STRING_RUN: Final = re.compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)
_SCALAR_RUN: Final = re.compile(rb"[-+.0-9Eaeflnrstu]*+")
# Arrays and objects up to this deep inside a skipped value (nested tensor data: a level per dimension) are
# skipped by one regular expression. Deeper ones take a scanner step per run of opening or closing brackets:
# at worst two steps per 2 * 17 + 1 bytes of hostile JSON.
_NESTED_LEVELS: Final = 16


def _container_run(levels: int) -> re.Pattern[bytes]:
    """Runs of what a skipped array or object holds: numbers, literals, separators, whole strings and whole
    arrays or objects up to ``levels`` deep. A run stops at any other bracket, at a string or an array the
    chunk cuts, or at a byte JSON does not allow there. Possessive throughout, so nothing backtracks."""
    flat = rb'[-+.,:0-9Eaeflnrstu \t\r\n]++|"(?:[^"\\]++|\\.)*+"'
    item = flat
    for _ in range(levels):
        item = flat + rb"|[\[{](?:" + item + rb")*+[\]}]"
    return re.compile(rb"(?:" + item + rb")*+", re.DOTALL)


# By how many levels are left before _MAX_DEPTH: a run never takes the scanner past it unseen.
_CONTAINER_RUNS: Final = tuple(_container_run(levels) for levels in range(_NESTED_LEVELS + 1))
# Opening (closing) brackets with what JSON allows between them but strings: their count is the change of depth.
_OPEN_RUN: Final = re.compile(rb"[-+.,:0-9Eaeflnrstu \t\r\n\[{]*+")
_CLOSE_RUN: Final = re.compile(rb"[-+.,:0-9Eaeflnrstu \t\r\n\]}]*+")
_TO_CLOSE: Final = re.compile(rb"[^\]}]*+")

# Where the scanner is in the request's structure.
_S_ROOT: Final = 0  # before the top-level object
_S_TOP_FIRST: Final = 1  # after "{": a key or "}"
_S_TOP_KEY: Final = 2  # after ",": a key
_S_TOP_COLON: Final = 3
_S_TOP_VALUE: Final = 4
_S_TOP_NEXT: Final = 5  # "," or "}"
_S_INPUTS_FIRST: Final = 6  # after "inputs": [ : "{" or "]"
_S_INPUTS_ITEM: Final = 7  # after ",": "{"
_S_INPUTS_NEXT: Final = 8  # "," or "]"
_S_INPUT_FIRST: Final = 9
_S_INPUT_KEY: Final = 10
_S_INPUT_COLON: Final = 11
_S_INPUT_VALUE: Final = 12
_S_INPUT_NEXT: Final = 13
_S_VALUE: Final = 14  # inside a key or a value: the value scanner's

# What the value being scanned is, hence what happens to it.
_R_SKIP: Final = 0
_R_DATA: Final = 1  # an input's data: skipped, and its bytes are not head bytes
_R_TOP_KEY: Final = 2
_R_INPUT_KEY: Final = 3
_R_TOP_PARAMETERS: Final = 4
_R_NAME: Final = 5
_R_SHAPE: Final = 6
_R_DATATYPE: Final = 7
_R_INPUT_PARAMETERS: Final = 8
_R_KEPT: Final = 2  # this role and those after it are kept and parsed
_INPUT_ROLES: Final[dict[str, int]] = {
    "data": _R_DATA,
    "name": _R_NAME,
    "shape": _R_SHAPE,
    "datatype": _R_DATATYPE,
    "parameters": _R_INPUT_PARAMETERS,
}

# The value scanner's modes.
_M_START: Final = 0
_M_STRING: Final = 1
_M_CONTAINER: Final = 2
_M_SCALAR: Final = 3
_M_END: Final = 4

# Depth of the values in the top-level object and in an input object.
_TOP_DEPTH: Final = 1
_INPUT_DEPTH: Final = 3


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One input of a model's configuration: ``dims`` without the batch dimension, -1 for any size;
    ``datatype`` a KServe name (``FP32``, not the config's ``TYPE_FP32``)."""

    dims: tuple[int, ...]
    datatype: str


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """What a model's configuration says its requests may hold. With ``max_batch_size`` > 0 a request's
    shape is ``[batch] + dims``, 1 ≤ batch ≤ ``max_batch_size``; with 0 it is ``dims``."""

    max_batch_size: int
    inputs: Mapping[str, InputSpec]


# Built per input of every request: a written __init__ and not frozen, as scheduling.types.InferenceRequest.
@dataclass(slots=True, init=False)
class TensorHead:
    """An input tensor as the request declares it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    elements: int

    def __init__(self, name: str, datatype: str, shape: tuple[int, ...], elements: int) -> None:
        self.name = name
        self.datatype = datatype
        self.shape = shape
        self.elements = elements


class _InputHead:
    """An input being read: what its JSON object has given so far."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.name: str | None = None
        self.datatype: str | None = None
        self.shape: tuple[int, ...] | None = None
        self.elements = 0
        self.binary_size: int | None = None
        self.shared_memory = False
        self.has_data = False

    def label(self) -> str:
        return f"input {_quote(self.name)}" if self.name is not None else f"input #{self.index}"


class _Float:
    """What :func:`_loads` gives for a JSON number with a fraction or exponent: never a dimension, a byte count
    or a sequence id, and mostly tensor data, which converting to float would cost more than the rest."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


class _DuplicateKey:
    """What :func:`_loads` gives for an object that repeats a key (see the module's docstring)."""

    def __init__(self, key: str) -> None:
        self.key = key


class TensorHeadReader:
    """Checks one REST inference request body's tensor headers, fed chunk by chunk.

    ``body_length`` is the content-length (None when chunked), ``json_length`` the
    ``Inference-Header-Content-Length`` (None without one; 0 makes the body one raw tensor, nothing to
    check). ``max_elements`` caps the elements of all inputs together; ``spec`` adds the model
    configuration's checks. After the verdict, ``tensors`` holds the inputs in request order, ``elements``
    their total and ``sequence_id`` the request's ``parameters.sequence_id`` (None when absent, 0 or "").

    The verdict comes once the JSON text's top-level object ends (for a binary request, before its tensors),
    or once the inputs are checked and the JSON parsed is over ``max_head_bytes``. Raises MalformedRequest:
    from the constructor for lengths that contradict each other, otherwise from :meth:`feed` or
    :meth:`finish`.
    """

    def __init__(
        self,
        *,
        body_length: int | None,
        json_length: int | None,
        max_elements: int,
        max_head_bytes: int = 64 * 1024,
        spec: ModelInputs | None = None,
    ) -> None:
        if json_length is not None and (json_length < 0 or (body_length is not None and json_length > body_length)):
            raise MalformedRequest(
                f"Inference-Header-Content-Length {json_length} is not within the body's {body_length} bytes"
            )
        self.tensors: list[TensorHead] = []
        self.elements = 0
        self.sequence_id: str | None = None
        self.sequence_start = False
        self.sequence_end = False
        self.parameters_read = False  # the request's parameters were seen (sequence_id and flags are final)
        self._body_length = body_length
        self._json_length = json_length
        # Without Inference-Header-Content-Length the JSON is the whole body; an empty JSON part (header 0, or
        # an empty body) makes Triton take the body as one raw input tensor.
        self._text_length = json_length if json_length is not None else body_length
        self.done = self._text_length == 0
        self._max_elements = max_elements
        self._max_head_bytes = max_head_bytes
        self._spec = spec
        self._names: set[str] = set()
        self._json_elements = 0  # of inputs whose elements are in "data"
        self._binary_bytes = 0
        self._inputs_closed = False
        # Kept whole for one json.loads while short enough; the scanner takes over otherwise.
        self._whole_bytes = min(_WHOLE_BYTES, max_head_bytes)
        self._whole = self._text_length is None or self._text_length <= self._whole_bytes
        self._buffer = bytearray()
        # The scanner's state.
        self._seen = 0  # bytes of the JSON text scanned before the current chunk
        self._data_bytes = 0  # of those, in inputs' data values
        self._data_start = 0
        self._ascii = True  # the current chunk is ASCII: no UTF-8 to check
        self._state = _S_ROOT
        self._after = _S_ROOT  # the state once the current value ends
        self._key = ""  # the key whose value comes next
        self._top_keys: set[str] = set()
        self._input_keys: set[str] = set()
        self._input = _InputHead(0)
        self._role = _R_SKIP
        self._mode = _M_START
        self._depth = 0  # inside the current value
        self._value_depth = 0  # of the current value in the JSON text
        self._escape = False
        self._kept = bytearray()
        self._utf8: codecs.IncrementalDecoder | None = None  # for a non-ASCII string a chunk cuts

    def feed(self, chunk: bytes) -> bool:
        """Read the next body bytes; True once the verdict is known (the reader wants no more bytes), False
        while more are needed. Raises MalformedRequest as soon as the request cannot be valid."""
        if self.done:
            return True
        if not self._whole:
            return self._scan(chunk)
        length = self._text_length
        if length is None:
            self._buffer += chunk
            if len(self._buffer) > self._whole_bytes:
                self._whole = False
                text = bytes(self._buffer)
                self._buffer = bytearray()
                return self._scan(text)
            return False
        if not self._buffer and len(chunk) >= length:
            self._parse(chunk[:length] if len(chunk) > length else chunk)
        else:
            self._buffer += chunk
            if len(self._buffer) >= length:
                self._parse(bytes(self._buffer[:length]))
                self._buffer = bytearray()
        return self.done

    def finish(self) -> None:
        """The body ended: give the verdict on what came (raises MalformedRequest if the JSON is incomplete)."""
        if self.done:
            return
        if self._whole and self._text_length is None:
            if self._buffer:
                self._parse(bytes(self._buffer))
            else:
                self.done = True  # an empty body: a raw input tensor, as with a content-length of 0
            return
        raise MalformedRequest("the request body ended before its JSON did")

    # -- json.loads of the whole text --

    def _parse(self, text: bytes) -> None:
        if text.count(b"[") + text.count(b"{") > _MAX_DEPTH:
            # Maybe nested deeper than _MAX_DEPTH: the scanner counts, where json.loads would recurse.
            self._scan(text)
            if not self.done:
                raise MalformedRequest("the request body ended before its JSON did")
            return
        root = _loads(text)
        if isinstance(root, _DuplicateKey):
            raise _repeated("the request", root)
        if not isinstance(root, dict):
            raise MalformedRequest("the request body is not a JSON object")
        for key, value in root.items():
            if key == "inputs":
                self._read_inputs(value, len(text))
            elif key == "parameters":
                self._read_parameters(value)
        if not self._inputs_closed:
            raise MalformedRequest("the request has no inputs")
        self.done = True

    def _read_inputs(self, value: object, text_length: int) -> None:
        if not isinstance(value, list):
            raise MalformedRequest("the request's inputs are not a list")
        for index, item in enumerate(value):
            head = _InputHead(index)
            if isinstance(item, _DuplicateKey):
                raise _repeated(head.label(), item)
            if not isinstance(item, dict):
                raise MalformedRequest(f"{head.label()} is not an object")
            for key, member in item.items():
                role = _INPUT_ROLES.get(key, _R_SKIP)
                if role == _R_DATA:
                    head.has_data = True
                elif role != _R_SKIP:
                    self._read_input_member(head, role, member)
            self._close_input(head, text_length)
        self._close_inputs()

    # -- the checks, for both ways --

    def _read_input_member(self, head: _InputHead, role: int, value: object) -> None:
        label = head.label()
        if role == _R_NAME:
            if not isinstance(value, str):
                raise MalformedRequest(f"{label}: the name is not a string")
            head.name = value
        elif role == _R_DATATYPE:
            if not isinstance(value, str) or value not in _ELEMENT_BYTES:
                raise MalformedRequest(f"{label} has an unknown datatype {_show(value)}")
            head.datatype = value
        elif role == _R_SHAPE:
            self._read_shape(head, label, value)
        else:
            if isinstance(value, _DuplicateKey):
                raise _repeated(f"the parameters of {label}", value)
            if not isinstance(value, dict):
                raise MalformedRequest(f"{label}: the parameters are not an object")
            if "binary_data_size" in value:
                size = value["binary_data_size"]
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise MalformedRequest(f"{label}: binary_data_size {_show(size)} is not a byte count")
                head.binary_size = size
            head.shared_memory = "shared_memory_region" in value

    def _read_shape(self, head: _InputHead, label: str, value: object) -> None:
        if not isinstance(value, list):
            raise MalformedRequest(f"{label}: the shape is not a list")
        if len(value) > _MAX_RANK:
            raise MalformedRequest(f"{label}: the shape has {len(value)} dimensions, more than {_MAX_RANK}")
        for dim in value:
            if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= _MAX_DIM:
                raise MalformedRequest(
                    f"{label}: the shape has the dimension {_show(dim)}: dimensions are integers from 0 to 2^63-1"
                )
        shape: tuple[int, ...] = tuple(value)
        room = self._max_elements - self.elements
        elements = 1
        if 0 in shape:
            elements = 0
        else:
            for dim in shape:
                elements *= dim
                if elements > room:
                    raise MalformedRequest(
                        f"{label}: shape {_show(list(shape))} takes the request over its limit of "
                        f"{self._max_elements} elements"
                    )
        head.shape = shape
        head.elements = elements

    def _close_input(self, head: _InputHead, text_length: int) -> None:
        """``text_length``: the JSON text's length, or as much of it as comes before the input's end."""
        label = head.label()
        name, datatype, shape = head.name, head.datatype, head.shape
        if name is None:
            raise MalformedRequest(f"{label} has no name")
        if datatype is None:
            raise MalformedRequest(f"{label} has no datatype")
        if shape is None:
            raise MalformedRequest(f"{label} has no shape")
        # As Triton asks: the elements come from exactly one place.
        if int(head.has_data) + int(head.binary_size is not None) + int(head.shared_memory) != 1:
            raise MalformedRequest(
                f"{label} must have exactly one of data, parameters.binary_data_size and "
                "parameters.shared_memory_region"
            )
        if name in self._names:
            raise MalformedRequest(f"the request has {label} twice")
        self._names.add(name)
        if self._spec is not None:
            _check_spec(self._spec, label, name, datatype, shape)
        elements = head.elements
        if head.binary_size is not None:
            self._check_binary(label, datatype, shape, elements, head.binary_size)
        elif head.has_data:
            # Each element of JSON data takes a byte at least: more elements than bytes is a shape the data
            # cannot fill, which Triton would still allocate for.
            self._json_elements += elements
            if self._json_elements > text_length:
                raise MalformedRequest(
                    f"{label}: shape {_show(list(shape))} has more elements than the request's "
                    f"{text_length} bytes of JSON can hold"
                )
        self.elements += elements
        self.tensors.append(TensorHead(name, datatype, shape, elements))

    def _check_binary(self, label: str, datatype: str, shape: tuple[int, ...], elements: int, size: int) -> None:
        if size and self._json_length is None:
            raise MalformedRequest(f"{label} has binary data but the request has no Inference-Header-Content-Length")
        element_bytes = _ELEMENT_BYTES[datatype]
        if element_bytes and size != elements * element_bytes:
            raise MalformedRequest(
                f"{label} has {size} bytes of binary data; shape {_show(list(shape))} of {datatype} takes "
                f"{elements * element_bytes}"
            )
        if not element_bytes and size < elements * _BYTES_PREFIX:
            raise MalformedRequest(
                f"{label} has {size} bytes of binary data, too few for {elements} BYTES elements "
                f"({_BYTES_PREFIX} bytes each at least)"
            )
        self._binary_bytes += size

    def _close_inputs(self) -> None:
        if not self.tensors:
            raise MalformedRequest("the request has no inputs")
        if self._json_length is not None and self._body_length is not None:
            binary = self._body_length - self._json_length
            if binary != self._binary_bytes:
                raise MalformedRequest(
                    f"the request has {binary} bytes after its JSON part but its inputs' binary_data_size "
                    f"add up to {self._binary_bytes}"
                )
        self._inputs_closed = True

    def _read_parameters(self, value: object) -> None:
        if isinstance(value, _DuplicateKey):
            raise _repeated("the request's parameters", value)
        if not isinstance(value, dict):
            raise MalformedRequest("the request's parameters are not an object")
        self.parameters_read = True
        # Triton takes only JSON booleans for these.
        self.sequence_start = value.get("sequence_start") is True
        self.sequence_end = value.get("sequence_end") is True
        sequence_id = value.get("sequence_id")
        # As Triton reads it: an unsigned integer or a string; 0 and "" mean "not part of a sequence".
        if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str) or sequence_id in (0, ""):
            self.sequence_id = None
        else:
            self.sequence_id = str(sequence_id)

    # -- the scanner --

    def _scan(self, chunk: bytes) -> bool:
        length = self._text_length
        if length is not None and len(chunk) > length - self._seen:
            chunk = chunk[: length - self._seen]
        self._ascii = chunk.isascii()
        pos, end = 0, len(chunk)
        while pos < end and not self.done:
            if self._role != _R_DATA and self._seen + pos - self._data_bytes > self._max_head_bytes:
                self._over_budget()
                break
            if self._state == _S_VALUE:
                pos = self._scan_value(chunk, pos)
                if self._mode == _M_END:
                    self._end_value(self._seen + pos)
                continue
            pos = _run_end(_WHITESPACE, chunk, pos)
            if pos < end:
                pos += self._step(chunk[pos], self._seen + pos)
        self._seen += pos
        if not self.done and length is not None and self._seen >= length:
            if self._json_length is None:
                raise MalformedRequest("the request body ended before its JSON did")
            raise MalformedRequest("the request's JSON is longer than its Inference-Header-Content-Length")
        return self.done

    def _over_budget(self) -> None:
        if not self._inputs_closed:
            raise MalformedRequest(
                f"the request's JSON, tensor data aside, is over {self._max_head_bytes} bytes before its inputs end"
            )
        self.done = True  # the tensors are checked; only a later sequence_id is given up

    def _step(self, byte: int, at: int) -> int:
        """One structural byte at offset ``at`` of the JSON text; returns how many bytes it took (0 when it
        starts a key or value, which the value scanner reads)."""
        state = self._state
        if state == _S_INPUT_VALUE:
            role = _INPUT_ROLES.get(self._key, _R_SKIP)
            if role == _R_DATA:
                self._data_start = at
            self._begin_value(role, _INPUT_DEPTH, _S_INPUT_NEXT)
            return 0
        if state in (_S_INPUT_KEY, _S_INPUT_FIRST):
            if byte == _QUOTE:
                self._begin_value(_R_INPUT_KEY, _INPUT_DEPTH, _S_INPUT_COLON)
                return 0
            if byte == _RBRACE and state == _S_INPUT_FIRST:
                return self._end_input(at)
        elif state == _S_INPUT_COLON:
            if byte == _COLON:
                self._state = _S_INPUT_VALUE
                return 1
        elif state == _S_INPUT_NEXT:
            if byte == _COMMA:
                self._state = _S_INPUT_KEY
                return 1
            if byte == _RBRACE:
                return self._end_input(at)
        elif state in (_S_INPUTS_FIRST, _S_INPUTS_ITEM):
            if byte == _LBRACE:
                self._input = _InputHead(len(self.tensors))
                self._input_keys.clear()
                self._state = _S_INPUT_FIRST
                return 1
            if byte != _RBRACKET:
                raise MalformedRequest(f"input #{len(self.tensors)} is not an object")
            if state == _S_INPUTS_FIRST:
                raise MalformedRequest("the request has no inputs")
        elif state == _S_INPUTS_NEXT:
            if byte == _COMMA:
                self._state = _S_INPUTS_ITEM
                return 1
            if byte == _RBRACKET:
                self._close_inputs()
                self._state = _S_TOP_NEXT
                return 1
        elif state == _S_TOP_VALUE:
            if self._key == "inputs":
                if byte != _LBRACKET:
                    raise MalformedRequest("the request's inputs are not a list")
                self._state = _S_INPUTS_FIRST
                return 1
            self._begin_value(_R_TOP_PARAMETERS if self._key == "parameters" else _R_SKIP, _TOP_DEPTH, _S_TOP_NEXT)
            return 0
        elif state in (_S_TOP_KEY, _S_TOP_FIRST):
            if byte == _QUOTE:
                self._begin_value(_R_TOP_KEY, _TOP_DEPTH, _S_TOP_COLON)
                return 0
            if byte == _RBRACE and state == _S_TOP_FIRST:
                return self._end_root()
        elif state == _S_TOP_COLON:
            if byte == _COLON:
                self._state = _S_TOP_VALUE
                return 1
        elif state == _S_TOP_NEXT:
            if byte == _COMMA:
                self._state = _S_TOP_KEY
                return 1
            if byte == _RBRACE:
                return self._end_root()
        elif state == _S_ROOT:
            if byte != _LBRACE:
                raise MalformedRequest("the request body is not a JSON object")
            self._state = _S_TOP_FIRST
            return 1
        raise MalformedRequest(f"the request body is not valid JSON (byte {at})")

    def _end_input(self, at: int) -> int:
        self._close_input(self._input, self._text_length if self._text_length is not None else at)
        self._state = _S_INPUTS_NEXT
        return 1

    def _end_root(self) -> int:
        if not self._inputs_closed:
            raise MalformedRequest("the request has no inputs")
        self.done = True
        return 1

    def _begin_value(self, role: int, depth: int, after: int) -> None:
        self._state = _S_VALUE
        self._role = role
        self._value_depth = depth
        self._after = after
        self._mode = _M_START
        self._depth = 0
        self._kept.clear()

    def _scan_value(self, data: bytes, pos: int) -> int:
        """Go through the current key or value from ``data[pos]``; return where it stopped: past the value's
        end (mode ``_M_END``) or at the end of ``data``."""
        start, end = pos, len(data)
        mode, depth = self._mode, self._depth
        while pos < end:
            if mode == _M_CONTAINER:
                room = _MAX_DEPTH - self._value_depth - depth
                stop = _run_end(_CONTAINER_RUNS[min(room, _NESTED_LEVELS)], data, pos)
                if not self._ascii and stop > pos:
                    _check_utf8(data[pos:stop])
                pos = stop
                if pos == end:
                    break
                byte = data[pos]
                if byte == _QUOTE:
                    mode = _M_STRING
                    pos += 1
                elif byte in (_LBRACKET, _LBRACE):
                    # Nesting deeper than the run takes: one step for a whole run of opening brackets.
                    stop = _run_end(_OPEN_RUN, data, pos)
                    depth += data.count(b"[", pos, stop) + data.count(b"{", pos, stop)
                    if self._value_depth + depth > _MAX_DEPTH:
                        raise _too_deep()
                    pos = stop
                elif byte in (_RBRACKET, _RBRACE):
                    stop = _run_end(_CLOSE_RUN, data, pos)
                    closes = data.count(b"]", pos, stop) + data.count(b"}", pos, stop)
                    if closes >= depth:  # the value ends within them
                        pos = _close_end(data, pos, depth)
                        mode = _M_END
                        break
                    depth -= closes
                    pos = stop
                else:
                    raise MalformedRequest(f"the request body is not valid JSON (byte {self._seen + pos})")
            elif mode == _M_STRING:
                # Non-ASCII bytes here, or a character an earlier chunk began: check UTF-8 across the cuts.
                utf8 = not self._ascii or self._utf8 is not None
                if self._escape:
                    self._escape = False
                    if utf8:
                        self._utf8_part(data[pos : pos + 1])
                    pos += 1
                    continue
                stop = _run_end(_STRING_RUN, data, pos)
                if stop == end:
                    if utf8:
                        self._utf8_part(data[pos:stop])
                    pos = stop
                    break
                if utf8:
                    # With the quote or backslash that ends the run: a character it cuts short is invalid.
                    self._utf8_part(data[pos : stop + 1])
                pos = stop + 1
                if data[stop] == _BACKSLASH:
                    self._escape = True
                    continue
                self._utf8 = None
                if depth == 0:
                    mode = _M_END
                    break
                mode = _M_CONTAINER
            elif mode == _M_SCALAR:
                pos = _run_end(_SCALAR_RUN, data, pos)
                if pos < end:  # a scalar ends at the first byte that cannot continue it
                    mode = _M_END
                break
            else:
                byte = data[pos]
                if byte == _QUOTE:
                    mode = _M_STRING
                    pos += 1
                elif byte in (_LBRACKET, _LBRACE):
                    depth = 1  # values start at most _INPUT_DEPTH deep: no limit to check yet
                    mode = _M_CONTAINER
                    pos += 1
                elif byte in _SCALAR_START:
                    mode = _M_SCALAR
                else:
                    raise MalformedRequest(f"the request body is not valid JSON (byte {self._seen + pos})")
        self._mode, self._depth = mode, depth
        if self._role >= _R_KEPT:
            self._kept += data[start:pos]
        return pos

    def _utf8_part(self, data: bytes) -> None:
        if self._utf8 is None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")()
        try:
            self._utf8.decode(data)
        except UnicodeDecodeError:
            raise MalformedRequest("the request's JSON is not valid UTF-8") from None

    def _end_value(self, at: int) -> None:
        role = self._role
        self._role = _R_SKIP
        self._state = self._after
        if role == _R_DATA:
            self._data_bytes += at - self._data_start
            self._input.has_data = True
            return
        # A value that ends past the budget is not used, however the chunks cut it.
        if at - self._data_bytes > self._max_head_bytes:
            self._over_budget()
            return
        if role == _R_SKIP:
            return
        value = _loads(bytes(self._kept))
        if role in (_R_TOP_KEY, _R_INPUT_KEY):
            keys = self._top_keys if role == _R_TOP_KEY else self._input_keys
            key = str(value)  # already a str: the scanner read a JSON string
            if key in keys:
                where = "the request" if role == _R_TOP_KEY else self._input.label()
                raise _repeated(where, _DuplicateKey(key))
            keys.add(key)
            self._key = key
        elif role == _R_TOP_PARAMETERS:
            self._read_parameters(value)
        else:
            self._read_input_member(self._input, role, value)


def _check_spec(spec: ModelInputs, label: str, name: str, datatype: str, shape: tuple[int, ...]) -> None:
    expected = spec.inputs.get(name)
    if expected is None:
        raise MalformedRequest(f"the model has no {label}")
    if datatype != expected.datatype:
        raise MalformedRequest(f"{label} is {datatype}; the model takes {expected.datatype}")
    batch = spec.max_batch_size
    dims = shape
    if batch > 0:
        if not shape or not 1 <= shape[0] <= batch:
            raise MalformedRequest(
                f"{label} has shape {_show(list(shape))}; the model takes [batch] + {list(expected.dims)} "
                f"with a batch of 1 to {batch}"
            )
        dims = shape[1:]
    if not _dims_fit(dims, expected.dims):
        takes = f"[batch] + {list(expected.dims)}" if batch > 0 else str(list(expected.dims))
        raise MalformedRequest(f"{label} has shape {_show(list(shape))}; the model takes {takes}")


def _dims_fit(dims: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(dims) == len(expected) and all(want in (-1, got) for got, want in zip(dims, expected, strict=True))


def _close_end(data: bytes, pos: int, count: int) -> int:
    """Where the ``count``-th closing bracket from ``pos`` ends (they are there: the caller counted them)."""
    for _ in range(count):
        pos = _run_end(_TO_CLOSE, data, pos) + 1
    return pos


def _run_end(pattern: re.Pattern[bytes], data: bytes, pos: int) -> int:
    match = pattern.match(data, pos)
    return match.end() if match is not None else pos


def _loads(text: bytes) -> object:
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequest("the request's JSON is not valid UTF-8") from None
    try:
        value: object = _DECODER.decode(decoded)
    except ValueError:
        raise MalformedRequest("the request body is not valid JSON") from None
    return value


def _object(pairs: list[tuple[str, object]]) -> dict[str, object] | _DuplicateKey:
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                return _DuplicateKey(key)
            seen.add(key)
    return value


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # NaN and ±Infinity: Python accepts them, RapidJSON does not


# Made once: json.loads with arguments makes a decoder per call, which costs as much as decoding a small request.
_DECODER: Final = json.JSONDecoder(object_pairs_hook=_object, parse_float=_Float, parse_constant=_no_constant)


def _check_utf8(data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequest("the request's JSON is not valid UTF-8") from None


def _too_deep() -> MalformedRequest:
    return MalformedRequest(f"the request's JSON is nested more than {_MAX_DEPTH} levels deep")


def _repeated(where: str, duplicate: _DuplicateKey) -> MalformedRequest:
    return MalformedRequest(f"the key {_quote(duplicate.key)} comes twice in {where}")


def _quote(text: str) -> str:
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."
