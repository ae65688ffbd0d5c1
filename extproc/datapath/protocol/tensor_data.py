"""An input's data, as :mod:`extproc.datapath.protocol.tensors` reads it: counted and classified (the JSON types of
its elements, its integers outside int64 or uint64, its numbers RapidJSON cannot hold) from its parsed list
(:func:`read_data`) or, as the scanner skips it, from its text, run by run (:func:`tally_run`), then
checked against the input's shape and datatype (:func:`check_data`)."""

from __future__ import annotations

import re
from typing import Final, cast

from extproc.datapath.protocol.json_text import (
    INT64_MAX,
    INT64_MIN,
    LBRACKET,
    NUMBER_BYTES,
    NUMBER_START,
    RBRACKET,
    SCALAR_RUN,
    SURE_INTEGER,
    SURE_INTEGER_DIGITS,
    UINT64_MAX,
    WHITESPACE,
    WHITESPACE_BYTES,
    Float,
    fits_double,
    number_fits,
    quote,
    run_end,
    show,
    too_big,
)
from extproc.datapath.protocol.parse import MalformedRequest

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

# What a data element's JSON says of it (the scanner's tally and the json.loads walk agree on them).
_F_FRACTION: Final = 1  # a number with a fraction or an exponent (the scanner: a '.', 'e' or 'E' outside strings)
_F_NEGATIVE: Final = 2  # a negative number (-0 is none: RapidJSON reads it as the unsigned 0)
_F_OUTSIDE_INT64: Final = 4
_F_OUTSIDE_UINT64: Final = 8  # above 2^64-1 (below 0 is _F_NEGATIVE)

# The data tally's patterns (see tally_run).
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


class InputHead:
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
        # The tally of its data as the scanner skips it (an input has one data value: a repeated key is
        # refused): its commas and empty arrays give its element count.
        self.commas = 0
        self.empties = 0
        self.after_open = False  # the last byte tallied, whitespace aside, is a '['
        self.carried = b""  # the last token tallied, which the next run may go on

    def label(self) -> str:
        return f"input {quote(self.name)}" if self.name is not None else f"input #{self.index}"


def tally_run(head: InputHead, data: bytes, start: int, stop: int) -> None:
    """Count and classify what ``data[start:stop]``, a run of an input's data the scanner skips, holds.

    A few C calls over the run: the element count is the data's commas + 1 - its empty arrays (an array
    of n > 0 elements or arrays has n - 1 commas), whatever the nesting; a string is one element, and the
    bytes outside strings say which JSON types the others are (see :mod:`extproc.datapath.protocol.tensors`). What
    only a whole number says (its sign, its size) is looked for in the run's whole numbers; the one it ends
    with is carried to the next run (``head.carried``), which may go on with it, and looked at there."""
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
    head.commas += text.count(b",", start, stop)
    # Empty arrays: a '[' whose next byte, whitespace aside, is a ']', in this run or the next one.
    first = run_end(WHITESPACE, text, start)
    if first < stop and head.after_open and text[first] == RBRACKET:
        head.empties += 1
    at = text.find(b"[", start, stop)
    looked = 0
    while at >= 0:
        if looked == _FEW_OPENS:  # many: counted from here in two C calls
            head.empties += text.count(b"[]", at, stop) + len(_SPACED_EMPTY.findall(text, at, stop))
            break
        looked += 1
        after = run_end(WHITESPACE, text, at + 1)
        if after < stop and text[after] == RBRACKET:
            head.empties += 1
        at = text.find(b"[", at + 1, stop)
    last = text[stop - 1]
    if last in WHITESPACE_BYTES:
        rest = text[start:stop].rstrip(WHITESPACE_BYTES)
        if not rest:
            return  # whitespace only
        last = rest[-1]
    head.after_open = last == LBRACKET
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
    if head.carried:
        begin = min(run_end(SCALAR_RUN, text, start), stop)
        token = head.carried + text[start:begin]
        if begin == stop:  # the run is one piece of a number: it may go on still
            head.carried = token[: _CARRIED_BYTES + 1]
            return
        head.carried = b""
        if len(token) <= _CARRIED_BYTES:  # (not a piece of an overlong one)
            head.flags |= _token_flags(token, head.label())
    end = stop
    if text[stop - 1] in NUMBER_BYTES:
        # Its start: after the last separator, within _CARRIED_BYTES + 1 (more makes it overlong).
        window = max(begin, stop - _CARRIED_BYTES - 1)
        end = window
        for separator in _SEPARATORS:
            end = max(end, text.rfind(separator, window, stop) + 1)
        head.carried = text[end:stop]
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
        number_end = run_end(_DIGITS, text, begin + at)
        number_start = begin + at - 1 if at > 0 and text[begin + at - 1] == 0x2D else begin + at  # '-'
        head.flags |= _token_flags(text[number_start:number_end], head.label())
        at = digits.find(needle, number_end - begin)


def read_data(head: InputHead, value: object) -> None:
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
            if Float in kinds:  # its range is checked as it is made
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
            if isinstance(item, Float):
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


def _integer_flags(number: int, head: InputHead) -> int:
    """The _F_* flags of an integer of an input's parsed data; raises for one RapidJSON cannot hold."""
    if INT64_MIN <= number <= INT64_MAX:
        return _F_NEGATIVE if number < 0 else 0
    flags = _F_OUTSIDE_INT64
    if number < 0:
        flags |= _F_NEGATIVE
    elif number > UINT64_MAX:
        flags |= _F_OUTSIDE_UINT64
        if number > SURE_INTEGER and not fits_double(str(number)):
            raise too_big(str(number), head.label())
    if number < -SURE_INTEGER and not fits_double(str(number)):
        raise too_big(str(number), head.label())
    return flags


def check_data(head: InputHead, label: str, datatype: str, shape: tuple[int, ...]) -> None:
    """An input's data against its shape and datatype, from what the tally or the walk found in it."""
    if head.leaves != head.elements:
        raise MalformedRequest(
            f"{label}: the data holds {head.leaves} elements; shape {show(list(shape))} takes {head.elements}"
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


def _check_exponents(text: bytes, start: int, stop: int, pattern: re.Pattern[bytes], where: str) -> None:
    """Refuse a number of ``text[start:stop]`` (whole numbers of tensor data, outside strings) that RapidJSON
    cannot hold, among those whose exponent (``pattern``: 290 or more) may put them past a double."""
    for match in pattern.finditer(text, start, stop):
        begin = _token_start(text, start, match.start())
        number = text[begin : run_end(SCALAR_RUN, text, match.start())].decode("ascii")
        if not number_fits(number):
            raise too_big(number, where)


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
    if not token or token[0] not in NUMBER_START:
        return 0  # a literal (or no JSON, which Triton's parser refuses)
    if token.find(b"e") >= 0 or token.find(b"E") >= 0:
        if not number_fits(token.decode("ascii")):
            raise too_big(token.decode("ascii"), where)
        return _F_FRACTION
    if token.find(b".") >= 0:
        return _F_FRACTION
    digits = token[1:] if token.startswith(b"-") else token
    if not digits.isdigit():
        return 0  # no JSON, which Triton's parser refuses
    if len(digits) > SURE_INTEGER_DIGITS and not fits_double(token.decode("ascii")):
        raise too_big(token.decode("ascii"), where)
    if len(digits) > 20:  # no need to convert
        return _F_OUTSIDE_INT64 | (_F_NEGATIVE if token.startswith(b"-") else _F_OUTSIDE_UINT64)
    number = int(token)
    flags = _F_NEGATIVE if number < 0 else 0
    if not INT64_MIN <= number <= INT64_MAX:
        flags |= _F_OUTSIDE_INT64
    if number > UINT64_MAX:
        flags |= _F_OUTSIDE_UINT64
    return flags
