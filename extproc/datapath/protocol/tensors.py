"""Refuse a REST inference request whose tensor headers cannot be valid, before it reaches Triton.

Triton's HTTP frontend sizes a JSON-encoded input from its ``shape`` and allocates that much before it reads
``data``: ``{"inputs":[{"name":"INPUT","shape":[1,1000000000000],"datatype":"FP32","data":[1,2,3,4]}]}``
throws ``std::bad_alloc`` and the whole server exits (Triton 2.51). Its JSON parser (RapidJSON) also recurses
once per nesting level. :class:`TensorHeadReader` reads a KServe v2 request body as it streams past the
picker and refuses, with :class:`~extproc.datapath.protocol.parse.MalformedRequest` (a 400), inputs whose size the
body cannot back (JSON data needs a byte per element at least, binary data the exact size), requests over an
element cap or off the model's configuration, and JSON nested deeper than ``json_text.MAX_DEPTH``,
without ever holding the body.

It also refuses what Triton 2.51 would read as JSON and then answer with a 500 (it calls any JSON it cannot
interpret an internal error; triton-inference-server/server#8773 calls that a bug): bytes after the top-level
object; a number its RapidJSON cannot hold (``json_text.fits_double``); an ``id`` that is no string; ``outputs``
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
  it could nest deeper than ``MAX_DEPTH`` (json.loads would recurse): the scanner reads it then. The data
  elements are counted and checked one by one (``tensor_data.read_data``);
* a longer one (JSON tensor data) goes through an incremental scanner: a state machine over the
  request's structure (the top-level object, its ``inputs`` array, each input object) that hands every key
  and value to a value scanner. That one finds where the value ends (strings, escapes, nested brackets, with
  an explicit depth counter: no recursion) by regular expressions over the chunk, so tensor data costs one C
  call per chunk, nested or not (see ``json_text.NESTED_LEVELS``). Every value but the inputs' ``data`` is
  kept and parsed by :func:`json.loads` when it ends, and gets the checks the first way gives it. ``data``
  is skipped without being kept, and tallied as it passes by a few C calls over each run the scanner skips
  (``tensor_data.tally_run``): its commas, empty arrays and strings give the element count, and which
  bytes it holds outside strings give the JSON types of its elements (``t`` or ``f``: true or false; ``n``:
  null; ``{``: an object; ``.``, ``e``, ``E``: a fraction or an exponent; ``-`` before a digit 1 to 9: a
  negative number). The numbers that may be too big are looked at one by one: those with an exponent of 290
  or more, and integers of 19 digits or more (past int64 maybe) in data without fractions. Skipped data is
  otherwise checked only as far as finding its end needs (the characters JSON allows there, strings' escapes
  and UTF-8), not token by token, so that Triton's parser still refuses with a 500: a number such as ``1-2``
  or a literal such as ``tru``; a number too big for a double whose integer part has 19 digits or more, in a
  run of data that also holds fractions, or that is over ``tensor_data._CARRIED_BYTES`` long and cut by
  the chunks. Either way, a ``\\u`` escape of a lone UTF-16 surrogate (RapidJSON refuses it, Python takes
  it) is not looked for.

``max_head_bytes`` bounds the JSON the reader parses rather than skips as tensor data: everything but the
inputs' ``data`` values. Past it before the ``inputs`` array ends, the request is refused; past it after,
the reader stops with what it has (the tensors are checked; ``sequence_id`` is None unless already seen; the
values after it and the bytes after the JSON are not checked). The scanner goes on after ``inputs`` to the
end of the JSON text because tritonclient writes the request's ``parameters`` (and its ``sequence_id``) after
``inputs`` and ``outputs``.

The JSON must have unique keys in the objects the reader looks at: parsers disagree on which copy of a
repeated key counts (RapidJSON, in Triton, takes the first; Python's the last), so a repeated ``shape`` could
show the gateway one shape and Triton another.

The reader is split by job, each part in its module under ``extproc.handlers``: ``json_text``, the JSON
layer (the scanner's bytes and regular expressions, numbers as RapidJSON reads them, the parse of a kept
value); ``tensor_data``, an input's data (counted and classified, parsed or skipped, and checked against
its shape and datatype); ``tensor_checks``, the checks of the head's tensors and parameters, and
``HeadChecks``, which keeps what they find; ``head_scanner``, the incremental scanner (``HeadScanner``, on
``HeadChecks``); and here ``TensorHeadReader`` (on ``HeadScanner``), which takes the chunks and picks the
way.
"""

from __future__ import annotations

from typing import Final

from extproc.datapath.protocol.head_scanner import HeadScanner
from extproc.datapath.protocol.json_text import MAX_DEPTH, DuplicateKey, parse_json, repeated
from extproc.datapath.protocol.parse import MalformedRequest
from extproc.datapath.protocol.tensor_checks import (
    INPUT_ROLES,
    R_DATA,
    R_INPUT_OTHER,
    InputSpec,
    ModelInputs,
    TensorHead,
)
from extproc.datapath.protocol.tensor_data import InputHead, read_data

__all__ = ["InputSpec", "ModelInputs", "TensorHead", "TensorHeadReader"]

# json.loads converts every number of the tensor data, the scanner skips them: past about 4 KiB of JSON (200
# FP32 values) the scanner is the faster, and it keeps no body.
_WHOLE_BYTES: Final = 4096


class TensorHeadReader(HeadScanner):
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
        super().__init__(body_length, json_length, max_elements, max_head_bytes, spec)
        # Kept whole for one json.loads while short enough; the scanner takes over otherwise.
        self._whole_bytes = min(_WHOLE_BYTES, max_head_bytes)
        self._whole = self._text_length is None or self._text_length <= self._whole_bytes
        self._buffer = bytearray()

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

    def _parse(self, text: bytes) -> None:
        if text.count(b"[") + text.count(b"{") > MAX_DEPTH:
            # Maybe nested deeper than MAX_DEPTH: the scanner counts, where json.loads would recurse.
            self._scan(text)
            if not self.done:
                self._end_text()
            return
        root = parse_json(text)  # refuses bytes after the top-level object, as RapidJSON does
        if isinstance(root, DuplicateKey):
            raise repeated("the request", root)
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
            head = InputHead(index)
            if isinstance(item, DuplicateKey):
                raise repeated(head.label(), item)
            if not isinstance(item, dict):
                raise MalformedRequest(f"{head.label()} is not an object")
            for key, member in item.items():
                role = INPUT_ROLES.get(key, R_INPUT_OTHER)
                if role == R_DATA:
                    read_data(head, member)
                    head.has_data = True
                else:
                    self._read_input_member(head, role, member)
            self._close_input(head, text_length)
        self._close_inputs()
