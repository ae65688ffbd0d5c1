"""The incremental scanner of a request's JSON head (see :mod:`extproc.datapath.protocol.tensors`): where the reader is
in the request's structure, and where each key and value ends, chunk by chunk, without holding the body."""

from __future__ import annotations

import codecs
from typing import Final

from extproc.datapath.protocol.json_text import (
    BACKSLASH,
    CLOSE_RUN,
    COLON,
    COMMA,
    CONTAINER_RUNS,
    ESCAPED,
    HEX,
    LBRACE,
    LBRACKET,
    MAX_DEPTH,
    NESTED_LEVELS,
    OPEN_RUN,
    QUOTE,
    RBRACE,
    RBRACKET,
    SCALAR_RUN,
    SCALAR_START,
    STRING_RUN,
    WHITESPACE,
    DuplicateKey,
    check_utf8,
    close_end,
    parse_json,
    repeated,
    run_end,
    too_deep,
)
from extproc.datapath.protocol.parse import MalformedRequest
from extproc.datapath.protocol.tensor_checks import (
    INPUT_ROLES,
    R_DATA,
    R_INPUT_KEY,
    R_INPUT_OTHER,
    R_NONE,
    R_TOP_KEY,
    R_TOP_VALUE,
    HeadChecks,
    ModelInputs,
)
from extproc.datapath.protocol.tensor_data import InputHead, tally_run

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

# The value scanner's modes.
_M_START: Final = 0
_M_STRING: Final = 1
_M_CONTAINER: Final = 2
_M_SCALAR: Final = 3
_M_END: Final = 4

# Depth of the values in the top-level object and in an input object.
_TOP_DEPTH: Final = 1
_INPUT_DEPTH: Final = 3


class HeadScanner(HeadChecks):
    """The incremental scanner of :mod:`extproc.datapath.protocol.tensors` (see there): a state machine over the
    request's structure (the top-level object, its ``inputs`` array, each input object) that hands every key
    and value to a value scanner (:meth:`_scan_value`), which finds where the value ends, keeps it for
    :func:`~extproc.datapath.protocol.json_text.parse_json` or, for an input's data, tallies it
    (:func:`~extproc.datapath.protocol.tensor_data.tally_run`). The base of
    :class:`~extproc.datapath.protocol.tensors.TensorHeadReader`, which feeds it the text it does not parse whole."""

    def __init__(
        self,
        body_length: int | None,
        json_length: int | None,
        max_elements: int,
        max_head_bytes: int,
        spec: ModelInputs | None,
    ) -> None:
        super().__init__(body_length, json_length, max_elements, spec)
        # Without Inference-Header-Content-Length the JSON is the whole body; an empty JSON part (header 0, or
        # an empty body) makes Triton take the body as one raw input tensor.
        self._text_length = json_length if json_length is not None else body_length
        self.done = self._text_length == 0
        self._max_head_bytes = max_head_bytes
        self._seen = 0  # bytes of the JSON text scanned before the current chunk
        self._data_bytes = 0  # of those, in inputs' data values
        self._data_start = 0
        self._ascii = True  # the current chunk is ASCII: no UTF-8 to check
        self._state = _S_ROOT
        self._after = _S_ROOT  # the state once the current value ends
        self._key = ""  # the key whose value comes next
        self._top_keys: set[str] = set()
        self._input_keys: set[str] = set()
        self._input = InputHead(0)  # the input being read, with the tally of its data
        self._role = R_NONE
        self._mode = _M_START
        self._depth = 0  # inside the current value
        self._value_depth = 0  # of the current value in the JSON text
        self._escape = False
        self._hex = 0  # hex digits still to come of a \u escape the chunks cut
        self._kept = bytearray()
        self._utf8: codecs.IncrementalDecoder | None = None  # for a non-ASCII string a chunk cuts

    def _end_text(self) -> None:
        """The JSON text ended where the scanner is: after the top-level object, or too early."""
        if self._state != _S_END:
            raise MalformedRequest("the request body ended before its JSON did")
        self.done = True

    def _scan(self, chunk: bytes) -> bool:
        length = self._text_length
        if length is not None and len(chunk) > length - self._seen:
            chunk = chunk[: length - self._seen]
        self._ascii = chunk.isascii()
        pos, end = 0, len(chunk)
        while pos < end and not self.done:
            if self._state == _S_END:
                # Whitespace only after the top-level object (RapidJSON refuses the rest): not head bytes.
                pos = run_end(WHITESPACE, chunk, pos)
                if pos < end:
                    raise MalformedRequest(
                        f"the request's JSON goes on after its top-level object (byte {self._seen + pos})"
                    )
                break
            if self._role != R_DATA and self._seen + pos - self._data_bytes > self._max_head_bytes:
                self._over_budget()
                break
            if self._state == _S_VALUE:
                pos = self._scan_value(chunk, pos)
                if self._mode == _M_END:
                    self._end_value(self._seen + pos)
                continue
            pos = run_end(WHITESPACE, chunk, pos)
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
            role = INPUT_ROLES.get(self._key, R_INPUT_OTHER)
            if role == R_DATA:
                if byte != LBRACKET:
                    raise MalformedRequest(f"{self._input.label()}: the data is not a list")
                self._data_start = at
            self._begin_value(role, _INPUT_DEPTH, _S_INPUT_NEXT)
            return 0
        if state in (_S_INPUT_KEY, _S_INPUT_FIRST):
            if byte == QUOTE:
                self._begin_value(R_INPUT_KEY, _INPUT_DEPTH, _S_INPUT_COLON)
                return 0
            if byte == RBRACE and state == _S_INPUT_FIRST:
                return self._end_input(at)
        elif state == _S_INPUT_COLON:
            if byte == COLON:
                self._state = _S_INPUT_VALUE
                return 1
        elif state == _S_INPUT_NEXT:
            if byte == COMMA:
                self._state = _S_INPUT_KEY
                return 1
            if byte == RBRACE:
                return self._end_input(at)
        elif state in (_S_INPUTS_FIRST, _S_INPUTS_ITEM):
            if byte == LBRACE:
                self._input = InputHead(len(self.tensors))
                self._input_keys.clear()
                self._state = _S_INPUT_FIRST
                return 1
            if byte != RBRACKET:
                raise MalformedRequest(f"input #{len(self.tensors)} is not an object")
            if state == _S_INPUTS_FIRST:
                raise MalformedRequest("the request has no inputs")
        elif state == _S_INPUTS_NEXT:
            if byte == COMMA:
                self._state = _S_INPUTS_ITEM
                return 1
            if byte == RBRACKET:
                self._close_inputs()
                self._state = _S_TOP_NEXT
                return 1
        elif state == _S_TOP_VALUE:
            if self._key == "inputs":
                if byte != LBRACKET:
                    raise MalformedRequest("the request's inputs are not a list")
                self._state = _S_INPUTS_FIRST
                return 1
            self._begin_value(R_TOP_VALUE, _TOP_DEPTH, _S_TOP_NEXT)
            return 0
        elif state in (_S_TOP_KEY, _S_TOP_FIRST):
            if byte == QUOTE:
                self._begin_value(R_TOP_KEY, _TOP_DEPTH, _S_TOP_COLON)
                return 0
            if byte == RBRACE and state == _S_TOP_FIRST:
                return self._end_root()
        elif state == _S_TOP_COLON:
            if byte == COLON:
                self._state = _S_TOP_VALUE
                return 1
        elif state == _S_TOP_NEXT:
            if byte == COMMA:
                self._state = _S_TOP_KEY
                return 1
            if byte == RBRACE:
                return self._end_root()
        elif state == _S_ROOT:
            if byte != LBRACE:
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
        tally = self._role == R_DATA
        while pos < end:
            if mode == _M_CONTAINER:
                room = MAX_DEPTH - self._value_depth - depth
                stop = run_end(CONTAINER_RUNS[min(room, NESTED_LEVELS)], data, pos)
                if stop > pos:
                    if not self._ascii:
                        check_utf8(data[pos:stop])
                    if tally:
                        tally_run(self._input, data, pos, stop)
                pos = stop
                if pos == end:
                    break
                byte = data[pos]
                if byte == QUOTE:
                    mode = _M_STRING
                    pos += 1
                elif byte in (LBRACKET, LBRACE):
                    # Nesting deeper than the run takes: one step for a whole run of opening brackets.
                    stop = run_end(OPEN_RUN, data, pos)
                    depth += data.count(b"[", pos, stop) + data.count(b"{", pos, stop)
                    if self._value_depth + depth > MAX_DEPTH:
                        raise too_deep()
                    if tally:
                        tally_run(self._input, data, pos, stop)
                    pos = stop
                elif byte in (RBRACKET, RBRACE):
                    stop = run_end(CLOSE_RUN, data, pos)
                    closes = data.count(b"]", pos, stop) + data.count(b"}", pos, stop)
                    if closes >= depth:  # the value ends within them
                        stop = close_end(data, pos, depth)
                        if tally:
                            tally_run(self._input, data, pos, stop)
                        pos = stop
                        mode = _M_END
                        break
                    depth -= closes
                    if tally:
                        tally_run(self._input, data, pos, stop)
                    pos = stop
                else:
                    raise MalformedRequest(f"the request body is not valid JSON (byte {self._seen + pos})")
            elif mode == _M_STRING:
                # Non-ASCII bytes here, or a character an earlier chunk began: check UTF-8 across the cuts.
                utf8 = not self._ascii or self._utf8 is not None
                if self._escape or self._hex:
                    # What a backslash the chunks cut from its run escapes: one of ESCAPED, or u and 4 hex digits.
                    byte = data[pos]
                    if self._hex:
                        self._hex -= 1
                        valid = byte in HEX
                    elif byte == 0x75:  # u
                        self._hex = 4
                        valid = True
                    else:
                        valid = byte in ESCAPED
                    self._escape = False
                    if not valid:
                        raise MalformedRequest(f"the request body is not valid JSON (byte {self._seen + pos})")
                    if utf8:
                        self._utf8_part(data[pos : pos + 1])
                    pos += 1
                    continue
                stop = run_end(STRING_RUN, data, pos)
                if stop == end:
                    if utf8:
                        self._utf8_part(data[pos:stop])
                    pos = stop
                    break
                if data[stop] != QUOTE and data[stop] != BACKSLASH:
                    raise MalformedRequest(f"the request body is not valid JSON (byte {self._seen + stop})")
                if utf8:
                    # With the quote or backslash that ends the run: a character it cuts short is invalid.
                    self._utf8_part(data[pos : stop + 1])
                pos = stop + 1
                if data[stop] == BACKSLASH:
                    self._escape = True
                    continue
                self._utf8 = None
                if depth == 0:
                    mode = _M_END
                    break
                mode = _M_CONTAINER
                if tally:  # a string the chunks cut, which no run tallied
                    self._input.strings += 1
                    self._input.after_open = False
            elif mode == _M_SCALAR:
                pos = run_end(SCALAR_RUN, data, pos)
                if pos < end:  # a scalar ends at the first byte that cannot continue it
                    mode = _M_END
                break
            else:
                byte = data[pos]
                if byte == QUOTE:
                    mode = _M_STRING
                    pos += 1
                elif byte in (LBRACKET, LBRACE):
                    depth = 1  # values start at most _INPUT_DEPTH deep: no limit to check yet
                    mode = _M_CONTAINER
                    pos += 1
                    if tally:
                        self._input.after_open = True  # the data's own '[' (the only way data starts)
                elif byte in SCALAR_START:
                    mode = _M_SCALAR
                else:
                    raise MalformedRequest(f"the request body is not valid JSON (byte {self._seen + pos})")
        self._mode, self._depth = mode, depth
        if self._role >= R_TOP_KEY:
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
        self._role = R_NONE
        self._state = self._after
        if role == R_DATA:
            self._data_bytes += at - self._data_start
            head = self._input
            head.has_data = True
            head.leaves = head.commas + 1 - head.empties
            return
        # A value that ends past the budget is not used, however the chunks cut it.
        if at - self._data_bytes > self._max_head_bytes:
            self._over_budget()
            return
        value = parse_json(bytes(self._kept))
        if role in (R_TOP_KEY, R_INPUT_KEY):
            keys = self._top_keys if role == R_TOP_KEY else self._input_keys
            key = str(value)  # already a str: the scanner read a JSON string
            if key in keys:
                where = "the request" if role == R_TOP_KEY else self._input.label()
                raise repeated(where, DuplicateKey(key))
            keys.add(key)
            self._key = key
        elif role == R_TOP_VALUE:
            self._read_top_member(self._key, value)
        else:
            self._read_input_member(self._input, role, value)
