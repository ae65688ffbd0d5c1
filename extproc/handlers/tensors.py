"""Refuse a REST inference request whose tensor headers cannot be valid, before it reaches Triton.

Triton's HTTP frontend sizes a JSON-encoded input from its ``shape`` and allocates that much before it reads
``data``: ``{"inputs":[{"name":"INPUT","shape":[1,1000000000000],"datatype":"FP32","data":[1,2,3,4]}]}``
throws ``std::bad_alloc`` and the whole server exits (Triton 2.51). Its JSON parser (RapidJSON) also recurses
once per nesting level. :class:`TensorHeadReader` reads a KServe v2 request body as it streams past the
picker and refuses, with :class:`~extproc.handlers.parse.MalformedRequest` (a 400), inputs whose size the
body cannot back (JSON data needs a byte per element at least, binary data the exact size), requests over an
element cap or off the model's configuration, and JSON nested deeper than ``_MAX_DEPTH``, without ever
holding the body.

It also refuses what Triton 2.51 would read as JSON and then answer with a 500 (it calls any JSON it cannot
interpret an internal error; triton-inference-server/server#8773 calls that a bug): bytes after the top-level
object; a number its RapidJSON cannot hold (:func:`_fits_double`); an ``id`` that is no string; ``outputs``
that are not a list of objects with a string ``name``; the parameters Triton reads of the wrong JSON type
(the request's ``priority``, ``timeout``, ``sequence_id``, ``sequence_start``, ``sequence_end``,
``binary_data_output``; an input's ``binary_data_size`` and ``shared_memory_*``; an output's ``binary_data``,
``classification`` and ``shared_memory_*``); and ``data`` that is not a list, whose element count is not
the shape's (nesting aside: Triton counts the elements only), or whose elements are not of the JSON type the
datatype takes (numbers for FP*, integers within int64 for INT*, within uint64 for UINT*, true and false for
BOOL, strings for BYTES; null and objects for none). It is stricter than Triton where Triton does not read:
the data of an input of no element, an output's ``parameters`` that are no object.

It reads the JSON text (the whole body, or the ``Inference-Header-Content-Length`` bytes before the binary
tensors) one of two ways, with the same checks:

* a text of at most ``_WHOLE_BYTES`` (the JSON part of a tritonclient binary request, a small JSON request)
  is kept until it is complete, then parsed by one :func:`json.loads`, unless it has so many brackets that
  it could nest deeper than ``_MAX_DEPTH`` (json.loads would recurse): the scanner reads it then. The data
  elements are counted and checked one by one (:func:`_read_data`);
* a longer one (JSON tensor data) goes through an incremental scanner: a state machine over the
  request's structure (the top-level object, its ``inputs`` array, each input object) that hands every key
  and value to a value scanner. That one finds where the value ends (strings, escapes, nested brackets, with
  an explicit depth counter: no recursion) by regular expressions over the chunk, so tensor data costs one C
  call per chunk, nested or not (see ``_NESTED_LEVELS``). Every value but the inputs' ``data`` is kept and
  parsed by :func:`json.loads` when it ends, and gets the checks the first way gives it. ``data`` is
  skipped without being kept, and tallied as it passes by a few C calls over each run the scanner skips
  (:meth:`TensorHeadReader._tally`): its commas, empty arrays and strings give the element count, and which
  bytes it holds outside strings give the JSON types of its elements (``t`` or ``f``: true or false; ``n``:
  null; ``{``: an object; ``.``, ``e``, ``E``: a fraction or an exponent; ``-`` before a digit 1 to 9: a
  negative number). The numbers that may be too big are looked at one by one: those with an exponent of 290
  or more, and integers of 19 digits or more (past int64 maybe) in data without fractions. Skipped data is
  otherwise checked only as far as finding its end needs (the characters JSON allows there, strings' escapes
  and UTF-8), not token by token, so that Triton's parser still refuses with a 500: a number such as ``1-2``
  or a literal such as ``tru``; a number too big for a double whose integer part has 19 digits or more, in a
  run of data that also holds fractions, or that is over ``_CARRIED_BYTES`` long and cut by the chunks.
  Either way, a ``\\u`` escape of a lone UTF-16 surrogate (RapidJSON refuses it, Python takes it) is not
  looked for.

``max_head_bytes`` bounds the JSON the reader parses rather than skips as tensor data: everything but the
inputs' ``data`` values. Past it before the ``inputs`` array ends, the request is refused; past it after,
the reader stops with what it has (the tensors are checked; ``sequence_id`` is None unless already seen; the
values after it and the bytes after the JSON are not checked). The scanner goes on after ``inputs`` to the
end of the JSON text because tritonclient writes the request's ``parameters`` (and its ``sequence_id``) after
``inputs`` and ``outputs``.

The JSON must have unique keys in the objects the reader looks at: parsers disagree on which copy of a
repeated key counts (RapidJSON, in Triton, takes the first; Python's the last), so a repeated ``shape`` could
show the gateway one shape and Triton another.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, cast

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

# What JSON elements each datatype takes (Triton reads them with RapidJSON's IsNumber, IsInt64, IsUint64,
# IsBool, IsString), and what the reader calls it in its messages.
_K_FLOAT: Final = 0
_K_INT: Final = 1
_K_UINT: Final = 2
_K_BOOL: Final = 3
_K_BYTES: Final = 4
_K_UNKNOWN: Final = 5  # the input's datatype comes after its data
_KINDS: Final[dict[str, int]] = {
    "BOOL": _K_BOOL,
    "UINT8": _K_UINT,
    "UINT16": _K_UINT,
    "UINT32": _K_UINT,
    "UINT64": _K_UINT,
    "INT8": _K_INT,
    "INT16": _K_INT,
    "INT32": _K_INT,
    "INT64": _K_INT,
    "FP16": _K_FLOAT,
    "BF16": _K_FLOAT,
    "FP32": _K_FLOAT,
    "FP64": _K_FLOAT,
    "BYTES": _K_BYTES,
}
_TAKES: Final[dict[int, str]] = {
    _K_FLOAT: "numbers",
    _K_INT: "integers from -2^63 to 2^63-1",
    _K_UINT: "integers from 0 to 2^64-1",
    _K_BOOL: "true and false",
    _K_BYTES: "strings",
}
_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1
_UINT64_MAX: Final = (1 << 64) - 1
# What RapidJSON 1.1 (Triton's, with its default precision) makes of a number: see _fits_double.
_DOUBLE_MAX: Final = sys.float_info.max
_POW10: Final = tuple(float(f"1e{n}") for n in range(309))  # its table of powers of ten
_MAX_SIGNIFICAND: Final = (1 << 53) - 1
# A number of at most this many characters, and an exponent that with them makes at most 308, is held (Python's
# repr of a double takes 24): _fits_double need not run.
_SHORT_NUMBER: Final = 24
_MAX_EXPONENT: Final = 308
# An integer within this is held (one of 309 digits may not be).
_SURE_INTEGER: Final = 10**299
_SURE_INTEGER_DIGITS: Final = 299

# What a data element's JSON says of it (the scanner's tally and the json.loads walk agree on them).
_F_FRACTION: Final = 1  # a number with a fraction or an exponent (the scanner: a '.', 'e' or 'E' outside strings)
_F_NEGATIVE: Final = 2  # a negative number (-0 is none: RapidJSON reads it as the unsigned 0)
_F_OUTSIDE_INT64: Final = 4
_F_OUTSIDE_UINT64: Final = 8  # above 2^64-1 (below 0 is _F_NEGATIVE)

# The parameters Triton reads, by the JSON type its reader takes (a wrong one is a 500): the request's, an
# input's, an output's.
_P_BOOL: Final = 0
_P_UINT: Final = 1
_P_STRING: Final = 2
_P_UINT_OR_STRING: Final = 3
_P_TAKES: Final[dict[int, str]] = {
    _P_BOOL: "true or false",
    _P_UINT: "an integer from 0 to 2^64-1",
    _P_STRING: "a string",
    _P_UINT_OR_STRING: "an integer from 0 to 2^64-1 or a string",
}
_REQUEST_PARAMETERS: Final[dict[str, int]] = {
    "priority": _P_UINT,
    "timeout": _P_UINT,
    "binary_data_output": _P_BOOL,
    "sequence_id": _P_UINT_OR_STRING,
    "sequence_start": _P_BOOL,
    "sequence_end": _P_BOOL,
}
_INPUT_PARAMETERS: Final[dict[str, int]] = {
    "binary_data_size": _P_UINT,
    "shared_memory_region": _P_STRING,
    "shared_memory_offset": _P_UINT,
    "shared_memory_byte_size": _P_UINT,
}
_OUTPUT_PARAMETERS: Final[dict[str, int]] = {
    "binary_data": _P_BOOL,
    "classification": _P_UINT,
    "shared_memory_region": _P_STRING,
    "shared_memory_offset": _P_UINT,
    "shared_memory_byte_size": _P_UINT,
}

_QUOTE: Final = 0x22
_BACKSLASH: Final = 0x5C
_COMMA: Final = 0x2C
_COLON: Final = 0x3A
_LBRACKET: Final = 0x5B
_RBRACKET: Final = 0x5D
_LBRACE: Final = 0x7B
_RBRACE: Final = 0x7D
_SCALAR_START: Final = frozenset(b"-0123456789tfn")
_NUMBER_BYTES: Final = frozenset(b"-+.0123456789eE")
_NUMBER_START: Final = frozenset(b"-0123456789")
_ESCAPED: Final = frozenset(b'"\\/bfnrt')  # what may follow a backslash in a JSON string, but u and 4 hex digits
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_WHITESPACE_BYTES: Final = b" \t\r\n"

_WHITESPACE: Final = re.compile(rb"[ \t\r\n]*+")
# A string's content and escapes, up to its closing quote, a backslash the chunk cuts from what it escapes,
# or a byte JSON does not allow there (a control character, an unknown escape): RapidJSON refuses those.
_STRING_RUN: Final = re.compile(rb'(?:[^"\\\x00-\x1f]++|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*+')
_STRING_TEXT: Final = rb'"(?:[^"\\\x00-\x1f]++|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*+"'
_SCALAR_RUN: Final = re.compile(rb"[-+.0-9Eaeflnrstu]*+")
# Arrays and objects up to this deep inside a skipped value (nested tensor data: a level per dimension) are
# skipped by one regular expression. Deeper ones take a scanner step per run of opening or closing brackets:
# at worst two steps per 2 * 17 + 1 bytes of hostile JSON.
_NESTED_LEVELS: Final = 16

# The data tally's patterns (see TensorHeadReader._tally).
_SPACED_EMPTY: Final = re.compile(rb"\[[ \t\r\n]++\]")
_FEW_OPENS: Final = 32  # up to this many '[' in a run, each is looked at; past it, the empty arrays are counted
_NEGATIVE: Final = re.compile(rb"-[1-9]")
# Exponents of 290 and up, the only ones that may take a number with an integer part of under 19 digits past
# a double: literal-led, so that searching for them is one fast C scan.
_BIG_EXPONENT: Final = re.compile(rb"e\+?0*+(?:29|[3-9][0-9]|[1-9][0-9][0-9])[0-9]")
_BIG_EXPONENT_UPPER: Final = re.compile(rb"E\+?0*+(?:29|[3-9][0-9]|[1-9][0-9][0-9])[0-9]")
_DIGITS: Final = re.compile(rb"[0-9]*+")
_AS_ZEROS: Final = bytes.maketrans(b"123456789", b"000000000")
# An integer this long may be outside int64 (19 digits), or too big for a double (309 digits).
_INT64_DIGITS: Final = b"0" * 19
_DOUBLE_DIGITS: Final = b"0" * 309
# Where a token of tensor data (a number, a literal) ends, outside strings (a string is one '"' there).
_SEPARATORS: Final = (b",", b"[", b"]", b" ", b"\n", b"\t", b"\r", b'"')
# The end of a run of data that may go on in the next run (a number the chunks cut) is carried over to it, up
# to this long (no real number is longer): a longer one the chunks cut is not judged whole.
_CARRIED_BYTES: Final = 1024


def _container_run(levels: int) -> re.Pattern[bytes]:
    """Runs of what a skipped array or object holds: numbers, literals, separators, whole strings and whole
    arrays or objects up to ``levels`` deep. A run stops at any other bracket, at a string or an array the
    chunk cuts, or at a byte JSON does not allow there. Possessive throughout, so nothing backtracks."""
    flat = rb"[-+.,:0-9Eaeflnrstu \t\r\n]++|" + _STRING_TEXT
    item = flat
    for _ in range(levels):
        item = flat + rb"|[\[{](?:" + item + rb")*+[\]}]"
    return re.compile(rb"(?:" + item + rb")*+")


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
_S_END: Final = 15  # after the top-level object: whitespace only, to the end of the text

# What the value being scanned is, hence what happens to it.
_R_NONE: Final = 0  # between values
_R_DATA: Final = 1  # an input's data: skipped (tallied), and its bytes are not head bytes
_R_TOP_KEY: Final = 2
_R_INPUT_KEY: Final = 3
_R_TOP_VALUE: Final = 4  # a top-level value other than inputs
_R_NAME: Final = 5
_R_SHAPE: Final = 6
_R_DATATYPE: Final = 7
_R_INPUT_PARAMETERS: Final = 8
_R_INPUT_OTHER: Final = 9  # an input's member the reader does not know: only its numbers are checked
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
    """An input being read: what its JSON object has given so far, and what its data holds: ``leaves``
    elements (arrays aside), of which ``strings`` strings and ``bools`` true or false, and ``flags`` (_F_*)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.name: str | None = None
        self.datatype: str | None = None
        self.shape: tuple[int, ...] | None = None
        self.elements = 0
        self.binary_size: int | None = None
        self.shared_memory = False
        self.has_data = False
        self.leaves = 0
        self.strings = 0
        self.bools = 0
        self.flags = 0

    def label(self) -> str:
        return f"input {_quote(self.name)}" if self.name is not None else f"input #{self.index}"


class _Float:
    """What :func:`_loads` gives for a JSON number with a fraction or exponent: never a dimension, a byte count
    or a sequence id, and mostly tensor data, which converting to float would cost more than the rest.

    Made for every such number the reader parses, so it is where one that RapidJSON cannot hold is refused
    (json.loads makes ``inf`` of ``1e400``); an integer is checked where the reader walks the values."""

    def __init__(self, text: str) -> None:
        self.text = text
        if (len(text) > _SHORT_NUMBER or "e" in text or "E" in text) and not _number_fits(text):
            raise _too_big(text)

    def __repr__(self) -> str:
        return self.text


class _DuplicateKey:
    """What :func:`_loads` gives for an object that repeats a key (see the module's docstring)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __repr__(self) -> str:  # as messages show a value
        return f"{{{self.key!r}: ..., {self.key!r}: ...}}"


class TensorHeadReader:
    """Checks one REST inference request body's tensor headers, fed chunk by chunk.

    ``body_length`` is the content-length (None when chunked), ``json_length`` the
    ``Inference-Header-Content-Length`` (None without one; 0 makes the body one raw tensor, nothing to
    check). ``max_elements`` caps the elements of all inputs together; ``spec`` adds the model
    configuration's checks. After the verdict, ``tensors`` holds the inputs in request order, ``elements``
    their total and ``sequence_id`` the request's ``parameters.sequence_id`` (None when absent, 0 or "").

    The verdict comes once the JSON text ends (for a binary request, before its tensors; for a chunked body
    whose JSON is longer than ``_WHOLE_BYTES``, at :meth:`finish`: whitespace only may follow the top-level
    object, to the end of the body), or once the inputs are checked and the JSON parsed is over
    ``max_head_bytes``. Raises MalformedRequest: from the constructor for lengths that contradict each other,
    otherwise from :meth:`feed` or :meth:`finish`.
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
        self._role = _R_NONE
        self._mode = _M_START
        self._depth = 0  # inside the current value
        self._value_depth = 0  # of the current value in the JSON text
        self._escape = False
        self._hex = 0  # hex digits still to come of a \u escape the chunks cut
        self._kept = bytearray()
        self._utf8: codecs.IncrementalDecoder | None = None  # for a non-ASCII string a chunk cuts
        # The tally of the data being skipped: its commas and empty arrays give its element count.
        self._commas = 0
        self._empties = 0
        self._after_open = False  # the last byte tallied, whitespace aside, is a '['
        self._carried = b""  # the last token tallied, which the next run may go on

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
        self._end_text()

    def _end_text(self) -> None:
        """The JSON text ended where the scanner is: after the top-level object, or too early."""
        if self._state != _S_END:
            raise MalformedRequest("the request body ended before its JSON did")
        self.done = True

    # -- json.loads of the whole text --

    def _parse(self, text: bytes) -> None:
        if text.count(b"[") + text.count(b"{") > _MAX_DEPTH:
            # Maybe nested deeper than _MAX_DEPTH: the scanner counts, where json.loads would recurse.
            self._scan(text)
            if not self.done:
                self._end_text()
            return
        root = _loads(text)  # refuses bytes after the top-level object, as RapidJSON does
        if isinstance(root, _DuplicateKey):
            raise _repeated("the request", root)
        if not isinstance(root, dict):
            raise MalformedRequest("the request body is not a JSON object")
        for key, value in root.items():
            if key == "inputs":
                self._read_inputs(value, len(text))
            else:
                self._read_top_member(key, value)
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
                role = _INPUT_ROLES.get(key, _R_INPUT_OTHER)
                if role == _R_DATA:
                    _read_data(head, member)
                    head.has_data = True
                else:
                    self._read_input_member(head, role, member)
            self._close_input(head, text_length)
        self._close_inputs()

    # -- the checks, for both ways --

    def _read_top_member(self, key: str, value: object) -> None:
        """A member of the request's object other than inputs."""
        if key == "parameters":
            self._read_parameters(value)
        elif key == "id":
            if not isinstance(value, str):
                raise MalformedRequest(f"the request's id {_show(value)} is not a string")
        elif key == "outputs":
            _read_outputs(value)
        else:
            _check_integers(value, f"the request's {_quote(key)}")

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
        elif role == _R_INPUT_PARAMETERS:
            if isinstance(value, _DuplicateKey):
                raise _repeated(f"the parameters of {label}", value)
            if not isinstance(value, dict):
                raise MalformedRequest(f"{label}: the parameters are not an object")
            _check_parameters(label, value, _INPUT_PARAMETERS)
            size = value.get("binary_data_size")
            if isinstance(size, int):  # an unsigned integer: _check_parameters says so
                head.binary_size = size
            head.shared_memory = "shared_memory_region" in value
        else:
            _check_integers(value, label)

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
            _check_data(head, label, datatype, shape)
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
        _check_parameters("the request's parameters", value, _REQUEST_PARAMETERS)
        self.parameters_read = True
        self.sequence_start = value.get("sequence_start") is True
        self.sequence_end = value.get("sequence_end") is True
        sequence_id = value.get("sequence_id")
        # An unsigned integer or a string (_check_parameters says so); 0 and "" mean "not part of a sequence".
        if sequence_id is None or sequence_id == 0 or sequence_id == "":
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
            if self._state == _S_END:
                # Whitespace only after the top-level object (RapidJSON refuses the rest): not head bytes.
                pos = _run_end(_WHITESPACE, chunk, pos)
                if pos < end:
                    raise MalformedRequest(
                        f"the request's JSON goes on after its top-level object (byte {self._seen + pos})"
                    )
                break
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
            if self._state == _S_END:
                self.done = True
            elif self._json_length is None:
                raise MalformedRequest("the request body ended before its JSON did")
            else:
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
            role = _INPUT_ROLES.get(self._key, _R_INPUT_OTHER)
            if role == _R_DATA:
                if byte != _LBRACKET:
                    raise MalformedRequest(f"{self._input.label()}: the data is not a list")
                self._data_start = at
                self._commas = 0
                self._empties = 0
                self._carried = b""
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
            self._begin_value(_R_TOP_VALUE, _TOP_DEPTH, _S_TOP_NEXT)
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
        self._state = _S_END
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
        tally = self._role == _R_DATA
        while pos < end:
            if mode == _M_CONTAINER:
                room = _MAX_DEPTH - self._value_depth - depth
                stop = _run_end(_CONTAINER_RUNS[min(room, _NESTED_LEVELS)], data, pos)
                if stop > pos:
                    if not self._ascii:
                        _check_utf8(data[pos:stop])
                    if tally:
                        self._tally(data, pos, stop)
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
                    if tally:
                        self._tally(data, pos, stop)
                    pos = stop
                elif byte in (_RBRACKET, _RBRACE):
                    stop = _run_end(_CLOSE_RUN, data, pos)
                    closes = data.count(b"]", pos, stop) + data.count(b"}", pos, stop)
                    if closes >= depth:  # the value ends within them
                        stop = _close_end(data, pos, depth)
                        if tally:
                            self._tally(data, pos, stop)
                        pos = stop
                        mode = _M_END
                        break
                    depth -= closes
                    if tally:
                        self._tally(data, pos, stop)
                    pos = stop
                else:
                    raise MalformedRequest(f"the request body is not valid JSON (byte {self._seen + pos})")
            elif mode == _M_STRING:
                # Non-ASCII bytes here, or a character an earlier chunk began: check UTF-8 across the cuts.
                utf8 = not self._ascii or self._utf8 is not None
                if self._escape or self._hex:
                    # What a backslash the chunks cut from its run escapes: one of _ESCAPED, or u and 4 hex digits.
                    byte = data[pos]
                    if self._hex:
                        self._hex -= 1
                        valid = byte in _HEX
                    elif byte == 0x75:  # u
                        self._hex = 4
                        valid = True
                    else:
                        valid = byte in _ESCAPED
                    self._escape = False
                    if not valid:
                        raise MalformedRequest(f"the request body is not valid JSON (byte {self._seen + pos})")
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
                if data[stop] != _QUOTE and data[stop] != _BACKSLASH:
                    raise MalformedRequest(f"the request body is not valid JSON (byte {self._seen + stop})")
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
                if tally:  # a string the chunks cut, which no run tallied
                    self._input.strings += 1
                    self._after_open = False
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
                    if tally:
                        self._after_open = True  # the data's own '[' (the only way data starts)
                elif byte in _SCALAR_START:
                    mode = _M_SCALAR
                else:
                    raise MalformedRequest(f"the request body is not valid JSON (byte {self._seen + pos})")
        self._mode, self._depth = mode, depth
        if self._role >= _R_TOP_KEY:
            self._kept += data[start:pos]
        return pos

    def _tally(self, data: bytes, start: int, stop: int) -> None:
        """Count and classify what ``data[start:stop]``, a run of an input's data the scanner skips, holds.

        A few C calls over the run: the element count is the data's commas + 1 - its empty arrays (an array
        of n > 0 elements or arrays has n - 1 commas), whatever the nesting; a string is one element, and the
        bytes outside strings say which JSON types the others are (see the module's docstring). What only a
        whole number says (its sign, its size) is looked for in the run's whole numbers; the one it ends with
        is carried to the next run, which may go on with it, and looked at there."""
        head = self._input
        text = data
        if data.find(b'"', start, stop) >= 0:
            # Each whole string (a run has no other) becomes one quote: what it holds is no structure. Once the
            # escaped backslashes and then the escaped quotes are gone (escapes pair backslashes from the left,
            # as these replacements do), every other piece between quotes is a string's.
            text = data[start:stop]
            if text.find(b"\\") >= 0:
                text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
            text = b'"'.join(text.split(b'"')[::2])
            start, stop = 0, len(text)
            head.strings += text.count(b'"')
        self._commas += text.count(b",", start, stop)
        # Empty arrays: a '[' whose next byte, whitespace aside, is a ']', in this run or the next one.
        first = _run_end(_WHITESPACE, text, start)
        if first < stop and self._after_open and text[first] == _RBRACKET:
            self._empties += 1
        at = text.find(b"[", start, stop)
        looked = 0
        while at >= 0:
            if looked == _FEW_OPENS:  # many: counted from here in two C calls
                self._empties += text.count(b"[]", at, stop) + len(_SPACED_EMPTY.findall(text, at, stop))
                break
            looked += 1
            after = _run_end(_WHITESPACE, text, at + 1)
            if after < stop and text[after] == _RBRACKET:
                self._empties += 1
            at = text.find(b"[", at + 1, stop)
        last = text[stop - 1]
        if last in _WHITESPACE_BYTES:
            rest = text[start:stop].rstrip(_WHITESPACE_BYTES)
            if not rest:
                return  # whitespace only
            last = rest[-1]
        self._after_open = last == _LBRACKET
        # What no datatype takes: refused at once.
        if text.find(b"n", start, stop) >= 0:
            raise MalformedRequest(f"{head.label()}: the data holds null")
        if text.find(b"{", start, stop) >= 0 or text.find(b"}", start, stop) >= 0 or text.find(b":", start, stop) >= 0:
            raise MalformedRequest(f"{head.label()}: the data holds an object")
        if text.find(b"t", start, stop) >= 0 or text.find(b"f", start, stop) >= 0:
            head.bools += text.count(b"t", start, stop) + text.count(b"f", start, stop)
        lower = text.find(b"e", start, stop) >= 0
        upper = text.find(b"E", start, stop) >= 0
        fraction = lower or upper or text.find(b".", start, stop) >= 0
        if fraction:
            head.flags |= _F_FRACTION
        # The whole numbers: past the one the last run carried, before the one this run may carry.
        begin = start
        if self._carried:
            begin = min(_run_end(_SCALAR_RUN, text, start), stop)
            token = self._carried + text[start:begin]
            if begin == stop:  # the run is one piece of a number: it may go on still
                self._carried = token[: _CARRIED_BYTES + 1]
                return
            self._carried = b""
            if len(token) <= _CARRIED_BYTES:  # (not a piece of an overlong one)
                head.flags |= _token_flags(token, head.label())
        end = stop
        if text[stop - 1] in _NUMBER_BYTES:
            # Its start: after the last separator, within _CARRIED_BYTES + 1 (more makes it overlong).
            window = max(begin, stop - _CARRIED_BYTES - 1)
            end = window
            for separator in _SEPARATORS:
                end = max(end, text.rfind(separator, window, stop) + 1)
            self._carried = text[end:stop]
        if begin >= end:
            return
        if lower:
            _check_exponents(text, begin, end, _BIG_EXPONENT, head.label())
        if upper:
            _check_exponents(text, begin, end, _BIG_EXPONENT_UPPER, head.label())
        if (
            not head.flags & _F_NEGATIVE
            and text.find(b"-", begin, end) >= 0
            and _NEGATIVE.search(text, begin, end) is not None
        ):
            head.flags |= _F_NEGATIVE
        if fraction:
            return  # no long integer to look for: an INT or UINT input is refused for the fraction already
        kind = _KINDS.get(head.datatype or "", _K_UNKNOWN)
        if kind in (_K_BOOL, _K_BYTES):
            return  # any number is refused
        # An integer of 19 digits may be outside int64, one of 309 outside ±1e308: only those are converted.
        digits = text[begin:end].translate(_AS_ZEROS)
        needle = _DOUBLE_DIGITS if kind == _K_FLOAT else _INT64_DIGITS
        at = digits.find(needle)
        while at >= 0:
            number_end = _run_end(_DIGITS, text, begin + at)
            number_start = begin + at - 1 if at > 0 and text[begin + at - 1] == 0x2D else begin + at  # '-'
            head.flags |= _token_flags(text[number_start:number_end], head.label())
            at = digits.find(needle, number_end - begin)

    def _utf8_part(self, data: bytes) -> None:
        if self._utf8 is None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")()
        try:
            self._utf8.decode(data)
        except UnicodeDecodeError:
            raise MalformedRequest("the request's JSON is not valid UTF-8") from None

    def _end_value(self, at: int) -> None:
        role = self._role
        self._role = _R_NONE
        self._state = self._after
        if role == _R_DATA:
            self._data_bytes += at - self._data_start
            self._input.has_data = True
            self._input.leaves = self._commas + 1 - self._empties
            return
        # A value that ends past the budget is not used, however the chunks cut it.
        if at - self._data_bytes > self._max_head_bytes:
            self._over_budget()
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
        elif role == _R_TOP_VALUE:
            self._read_top_member(self._key, value)
        else:
            self._read_input_member(self._input, role, value)


def _read_data(head: _InputHead, value: object) -> None:
    """Count and classify the elements of an input's parsed data, as the scanner's tally does over its text:
    iteratively (a stack of the lists still to go through), not recursively. A list of numbers of one type
    (most tensor data) is classified by a few C calls, other lists element by element."""
    if not isinstance(value, list):
        raise MalformedRequest(f"{head.label()}: the data is not a list")
    leaves = strings = bools = flags = 0
    stack: list[list[object]] = [value]
    while stack:
        items = stack.pop()
        kinds = set(map(type, items))
        if len(kinds) == 1:
            if _Float in kinds:  # its range is checked as it is made
                leaves += len(items)
                flags |= _F_FRACTION
                continue
            if int in kinds:
                numbers = cast(list[int], items)
                leaves += len(items)
                flags |= _integer_flags(min(numbers), head) | _integer_flags(max(numbers), head)
                continue
        for item in items:
            if isinstance(item, list):
                stack.append(item)
                continue
            leaves += 1
            if isinstance(item, _Float):
                flags |= _F_FRACTION
            elif isinstance(item, bool):  # before int, which it is too
                bools += 1
            elif isinstance(item, int):
                flags |= _integer_flags(item, head)
            elif isinstance(item, str):
                strings += 1
            elif item is None:
                raise MalformedRequest(f"{head.label()}: the data holds null")
            else:
                raise MalformedRequest(f"{head.label()}: the data holds an object")
    head.leaves, head.strings, head.bools, head.flags = leaves, strings, bools, flags


def _integer_flags(number: int, head: _InputHead) -> int:
    """The _F_* flags of an integer of an input's parsed data; raises for one RapidJSON cannot hold."""
    if _INT64_MIN <= number <= _INT64_MAX:
        return _F_NEGATIVE if number < 0 else 0
    flags = _F_OUTSIDE_INT64
    if number < 0:
        flags |= _F_NEGATIVE
    elif number > _UINT64_MAX:
        flags |= _F_OUTSIDE_UINT64
        if number > _SURE_INTEGER and not _fits_double(str(number)):
            raise _too_big(str(number), head.label())
    if number < -_SURE_INTEGER and not _fits_double(str(number)):
        raise _too_big(str(number), head.label())
    return flags


def _check_data(head: _InputHead, label: str, datatype: str, shape: tuple[int, ...]) -> None:
    """An input's data against its shape and datatype, from what the tally or the walk found in it."""
    if head.leaves != head.elements:
        raise MalformedRequest(
            f"{label}: the data holds {head.leaves} elements; shape {_show(list(shape))} takes {head.elements}"
        )
    kind = _KINDS[datatype]
    numbers = head.leaves - head.strings - head.bools
    fault = ""
    if head.strings and kind != _K_BYTES:
        fault = "a string"
    elif head.bools and kind != _K_BOOL:
        fault = "true or false"
    elif numbers > 0 and kind in (_K_BOOL, _K_BYTES):
        fault = "a number"
    elif kind in (_K_INT, _K_UINT):
        flags = head.flags
        if flags & _F_FRACTION:
            fault = "a number with a fraction or an exponent"
        elif kind == _K_UINT and flags & _F_NEGATIVE:
            fault = "a negative number"
        elif kind == _K_INT and flags & _F_OUTSIDE_INT64:
            fault = "an integer outside int64"
        elif kind == _K_UINT and flags & _F_OUTSIDE_UINT64:
            fault = "an integer over 2^64-1"
    if fault:
        raise MalformedRequest(f"{label}: the data holds {fault}; {datatype} takes {_TAKES[kind]}")


def _read_outputs(value: object) -> None:
    """The request's outputs, as Triton reads them: a list of objects, each with a string name, and the
    parameters it reads of the types it takes."""
    if not isinstance(value, list):
        raise MalformedRequest("the request's outputs are not a list")
    for index, item in enumerate(value):
        label = f"output #{index}"
        if isinstance(item, _DuplicateKey):
            raise _repeated(label, item)
        if not isinstance(item, dict):
            raise MalformedRequest(f"{label} is not an object")
        name = item.get("name")
        if name is None:
            raise MalformedRequest(f"{label} has no name")
        if not isinstance(name, str):
            raise MalformedRequest(f"{label}: the name is not a string")
        label = f"output {_quote(name)}"
        if "parameters" in item:
            parameters = item["parameters"]
            if isinstance(parameters, _DuplicateKey):
                raise _repeated(f"the parameters of {label}", parameters)
            if not isinstance(parameters, dict):
                raise MalformedRequest(f"{label}: the parameters are not an object")
            _check_parameters(label, parameters, _OUTPUT_PARAMETERS)
        _check_integers(item, label)


def _check_parameters(label: str, parameters: dict[str, object], types: Mapping[str, int]) -> None:
    """The parameters Triton reads of ``types``'s JSON types (any other is its 500), and the integers of all."""
    for key, kind in types.items():
        if key not in parameters:
            continue
        value = parameters[key]
        if kind == _P_BOOL:
            fits = isinstance(value, bool)
        elif kind == _P_STRING:
            fits = isinstance(value, str)
        else:
            fits = (isinstance(value, str) and kind == _P_UINT_OR_STRING) or (
                isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _UINT64_MAX
            )
        if not fits:
            raise MalformedRequest(f"{label}: {key} {_show(value)} is not {_P_TAKES[kind]}")
    _check_integers(parameters, label)


def _check_integers(value: object, where: str) -> None:
    """Refuse an integer anywhere in ``value`` that RapidJSON cannot hold (json.loads makes it an int, where a
    number with a fraction or an exponent is a _Float, checked as it is made). Iterative."""
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, int) and not -_SURE_INTEGER <= item <= _SURE_INTEGER and not _fits_double(str(item)):
            raise _too_big(str(item), where)


def _check_exponents(text: bytes, start: int, stop: int, pattern: re.Pattern[bytes], where: str) -> None:
    """Refuse a number of ``text[start:stop]`` (whole numbers of tensor data, outside strings) that RapidJSON
    cannot hold, among those whose exponent (``pattern``: 290 or more) may put them past a double."""
    for match in pattern.finditer(text, start, stop):
        begin = _token_start(text, start, match.start())
        number = text[begin : _run_end(_SCALAR_RUN, text, match.start())].decode("ascii")
        if not _number_fits(number):
            raise _too_big(number, where)


def _token_start(text: bytes, start: int, at: int) -> int:
    """Where the token of tensor data holding ``text[at]`` starts, at ``start`` the earliest: after the last
    separator before it, looked for _CARRIED_BYTES at a time (a C call each)."""
    stop = at
    while True:
        window = max(start, stop - _CARRIED_BYTES)
        found = -1
        for separator in _SEPARATORS:
            found = max(found, text.rfind(separator, window, stop))
        if found >= 0:
            return found + 1
        if window == start:
            return start
        stop = window


def _token_flags(token: bytes, where: str) -> int:
    """The _F_* flags of one whole token of tensor data (a number, or a literal); raises for a number RapidJSON
    cannot hold."""
    if not token or token[0] not in _NUMBER_START:
        return 0  # a literal (or no JSON, which Triton's parser refuses)
    if token.find(b"e") >= 0 or token.find(b"E") >= 0:
        if not _number_fits(token.decode("ascii")):
            raise _too_big(token.decode("ascii"), where)
        return _F_FRACTION
    if token.find(b".") >= 0:
        return _F_FRACTION
    digits = token[1:] if token.startswith(b"-") else token
    if not digits.isdigit():
        return 0  # no JSON, which Triton's parser refuses
    if len(digits) > _SURE_INTEGER_DIGITS and not _fits_double(token.decode("ascii")):
        raise _too_big(token.decode("ascii"), where)
    if len(digits) > 20:  # no need to convert
        return _F_OUTSIDE_INT64 | (_F_NEGATIVE if token.startswith(b"-") else _F_OUTSIDE_UINT64)
    number = int(token)
    flags = _F_NEGATIVE if number < 0 else 0
    if not _INT64_MIN <= number <= _INT64_MAX:
        flags |= _F_OUTSIDE_INT64
    if number > _UINT64_MAX:
        flags |= _F_OUTSIDE_UINT64
    return flags


def _number_fits(text: str) -> bool:
    """Whether RapidJSON, in Triton, holds the JSON number ``text`` (one with a fraction or an exponent): at
    once for a short one whose exponent keeps it under 1e308, else as _fits_double says."""
    at = text.find("e")
    if at < 0:
        at = text.find("E")
    if 0 <= at <= _SHORT_NUMBER and len(text) - at <= 8:
        try:
            if at + int(text[at + 1 :]) <= _MAX_EXPONENT:
                return True  # a mantissa of `at` characters is under 10**at
        except ValueError:  # no exponent: not JSON
            return False
    try:
        return _fits_double(text)
    except IndexError:  # cut short: not JSON
        return False


def _fits_double(text: str) -> bool:
    """Whether RapidJSON 1.1, as Triton 2.51 parses requests (its default precision), takes the JSON number
    ``text`` as a finite double: its Reader::ParseNumber and StrtodNormalPrecision, step by step, where they
    decide. It refuses a number (kParseErrorNumberTooBig, a 500 from Triton) whose integer part grows past
    1.8e307 before its last digit, or whose positive exponent is over 308 plus its digits after the point;
    one it rounds past the double's maximum it takes as infinity, which the reader refuses too (a newer
    RapidJSON refuses it). Checked against RapidJSON itself over 600,000 numbers."""
    n = len(text)
    pos = 1 if text.startswith("-") else 0
    limit = (1 << 63) if pos else _UINT64_MAX  # the largest integer it keeps exact
    integer = 0
    digits = 0  # its significandDigit
    exact = True  # the significand is an integer still (its i64), not a double
    value = 0.0
    if text[pos] == "0":
        pos += 1
    else:
        while pos < n and "0" <= text[pos] <= "9":
            digit = ord(text[pos]) - 48
            if exact:
                if integer * 10 + digit > limit:
                    exact = False
                    value = float(integer)
                    continue  # the digit again, as a double's
                if integer:
                    digits += 1
                integer = integer * 10 + digit
            else:
                if value >= 1.7976931348623157e307:
                    return False
                value = value * 10 + digit
            pos += 1
    exp_frac = 0
    if pos < n and text[pos] == ".":
        pos += 1
        if exact:
            while pos < n and "0" <= text[pos] <= "9" and integer <= _MAX_SIGNIFICAND:
                integer = integer * 10 + ord(text[pos]) - 48
                exp_frac -= 1
                if integer:
                    digits += 1
                pos += 1
            value = float(integer)
            exact = False
        while pos < n and "0" <= text[pos] <= "9":
            if digits < 17:
                value = value * 10.0 + (ord(text[pos]) - 48)
                exp_frac -= 1
                if value > 0.0:
                    digits += 1
            pos += 1
    exponent = 0
    if pos < n and text[pos] in "eE":
        pos += 1
        if exact:
            value = float(integer)
            exact = False
        negative = text[pos] == "-"
        if text[pos] in "+-":
            pos += 1
        if negative:
            return True  # it consumes any negative exponent; the value only shrinks
        most = _MAX_EXPONENT - exp_frac
        exponent = ord(text[pos]) - 48
        pos += 1
        while pos < n and "0" <= text[pos] <= "9":
            exponent = exponent * 10 + ord(text[pos]) - 48
            pos += 1
            if exponent > most:
                return False
    if exact:
        return True  # an integer it keeps as one
    power = exponent + exp_frac
    if power < -_MAX_EXPONENT:
        value /= _POW10[_MAX_EXPONENT]
        power += _MAX_EXPONENT
    if power < -_MAX_EXPONENT:
        value = 0.0
    elif power >= 0:
        value *= _POW10[power]
    else:
        value /= _POW10[-power]
    return value <= _DOUBLE_MAX


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
    except MalformedRequest:  # from _Float: a number RapidJSON cannot hold
        raise
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


def _too_big(number: str, where: str = "the request") -> MalformedRequest:
    return MalformedRequest(f"{where} holds the number {_cut(number)}, too big for a double")


def _repeated(where: str, duplicate: _DuplicateKey) -> MalformedRequest:
    return MalformedRequest(f"the key {_quote(duplicate.key)} comes twice in {where}")


def _cut(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def _quote(text: str) -> str:
    return repr(_cut(text))


def _show(value: object) -> str:
    return _cut(repr(value))
