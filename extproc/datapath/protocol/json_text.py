"""The JSON text of a request's head as Triton's parser, RapidJSON 1.1, reads it (see
:mod:`extproc.datapath.protocol.tensors`): the bytes and regular expressions the scanner finds the end of a value by
(strings and their escapes, scalars, nesting: with a depth counter, no recursion), the numbers RapidJSON
holds (:func:`fits_double`), :func:`parse_json` for the JSON the reader keeps, and how its messages show
the client's JSON."""

from __future__ import annotations

import json
import re
import sys
from typing import Final

from extproc.datapath.protocol.parse import MalformedRequest

# Nesting of the whole JSON text (the top-level object counts 1, an input's data array 4): real requests
# nest a handful of levels, RapidJSON recurses once per level.
MAX_DEPTH: Final = 64
_SHOWN_CHARS: Final = 64  # of a client's string, in an error message

INT64_MIN: Final = -(1 << 63)
INT64_MAX: Final = (1 << 63) - 1
UINT64_MAX: Final = (1 << 64) - 1
# What RapidJSON 1.1 (Triton's, with its default precision) makes of a number: see fits_double.
_DOUBLE_MAX: Final = sys.float_info.max
_POW10: Final = tuple(float(f"1e{n}") for n in range(309))  # its table of powers of ten
_MAX_SIGNIFICAND: Final = (1 << 53) - 1
# A number of at most this many characters, and an exponent that with them makes at most 308, is held (Python's
# repr of a double takes 24): fits_double need not run.
_SHORT_NUMBER: Final = 24
_MAX_EXPONENT: Final = 308
# An integer within this is held (one of 309 digits may not be).
SURE_INTEGER: Final = 10**299
SURE_INTEGER_DIGITS: Final = 299

QUOTE: Final = 0x22
BACKSLASH: Final = 0x5C
COMMA: Final = 0x2C
COLON: Final = 0x3A
LBRACKET: Final = 0x5B
RBRACKET: Final = 0x5D
LBRACE: Final = 0x7B
RBRACE: Final = 0x7D
SCALAR_START: Final = frozenset(b"-0123456789tfn")
NUMBER_BYTES: Final = frozenset(b"-+.0123456789eE")
NUMBER_START: Final = frozenset(b"-0123456789")
ESCAPED: Final = frozenset(b'"\\/bfnrt')  # what may follow a backslash in a JSON string, but u and 4 hex digits
HEX: Final = frozenset(b"0123456789abcdefABCDEF")
WHITESPACE_BYTES: Final = b" \t\r\n"

WHITESPACE: Final = re.compile(rb"[ \t\r\n]*+")
# A string's content and escapes, up to its closing quote, a backslash the chunk cuts from what it escapes,
# or a byte JSON does not allow there (a control character, an unknown escape): RapidJSON refuses those.
STRING_RUN: Final = re.compile(rb'(?:[^"\\\x00-\x1f]++|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*+')
_STRING_TEXT: Final = rb'"(?:[^"\\\x00-\x1f]++|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*+"'
SCALAR_RUN: Final = re.compile(rb"[-+.0-9Eaeflnrstu]*+")
# Arrays and objects up to this deep inside a skipped value (nested tensor data: a level per dimension) are
# skipped by one regular expression. Deeper ones take a scanner step per run of opening or closing brackets:
# at worst two steps per 2 * 17 + 1 bytes of hostile JSON.
NESTED_LEVELS: Final = 16


def _container_run(levels: int) -> re.Pattern[bytes]:
    """Runs of what a skipped array or object holds: numbers, literals, separators, whole strings and whole
    arrays or objects up to ``levels`` deep. A run stops at any other bracket, at a string or an array the
    chunk cuts, or at a byte JSON does not allow there. Possessive throughout, so nothing backtracks."""
    flat = rb"[-+.,:0-9Eaeflnrstu \t\r\n]++|" + _STRING_TEXT
    item = flat
    for _ in range(levels):
        item = flat + rb"|[\[{](?:" + item + rb")*+[\]}]"
    return re.compile(rb"(?:" + item + rb")*+")


# By how many levels are left before MAX_DEPTH: a run never takes the scanner past it unseen.
CONTAINER_RUNS: Final = tuple(_container_run(levels) for levels in range(NESTED_LEVELS + 1))
# Opening (closing) brackets with what JSON allows between them but strings: their count is the change of depth.
OPEN_RUN: Final = re.compile(rb"[-+.,:0-9Eaeflnrstu \t\r\n\[{]*+")
CLOSE_RUN: Final = re.compile(rb"[-+.,:0-9Eaeflnrstu \t\r\n\]}]*+")
_TO_CLOSE: Final = re.compile(rb"[^\]}]*+")


class Float:
    """What :func:`parse_json` gives for a JSON number with a fraction or exponent: never a dimension, a byte count
    or a sequence id, and mostly tensor data, which converting to float would cost more than the rest.

    Made for every such number the reader parses, so it is where one that RapidJSON cannot hold is refused
    (json.loads makes ``inf`` of ``1e400``); an integer is checked where the reader walks the values."""

    def __init__(self, text: str) -> None:
        self.text = text
        if (len(text) > _SHORT_NUMBER or "e" in text or "E" in text) and not number_fits(text):
            raise too_big(text)

    def __repr__(self) -> str:
        return self.text


class DuplicateKey:
    """What :func:`parse_json` gives for an object that repeats a key (see :mod:`extproc.datapath.protocol.tensors`)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __repr__(self) -> str:  # as messages show a value
        return f"{{{self.key!r}: ..., {self.key!r}: ...}}"


def number_fits(text: str) -> bool:
    """Whether RapidJSON, in Triton, holds the JSON number ``text`` (one with a fraction or an exponent): at
    once for a short one whose exponent keeps it under 1e308, else as fits_double says."""
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
        return fits_double(text)
    except IndexError:  # cut short: not JSON
        return False


def fits_double(text: str) -> bool:
    """Whether RapidJSON 1.1, as Triton 2.51 parses requests (its default precision), takes the JSON number
    ``text`` as a finite double: its Reader::ParseNumber and StrtodNormalPrecision, step by step, where they
    decide. It refuses a number (kParseErrorNumberTooBig, a 500 from Triton) whose integer part grows past
    1.8e307 before its last digit, or whose positive exponent is over 308 plus its digits after the point;
    one it rounds past the double's maximum it takes as infinity, which the reader refuses too (a newer
    RapidJSON refuses it). Checked against RapidJSON itself over 600,000 numbers."""
    n = len(text)
    pos = 1 if text.startswith("-") else 0
    limit = (1 << 63) if pos else UINT64_MAX  # the largest integer it keeps exact
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


def close_end(data: bytes, pos: int, count: int) -> int:
    """Where the ``count``-th closing bracket from ``pos`` ends (they are there: the caller counted them)."""
    for _ in range(count):
        pos = run_end(_TO_CLOSE, data, pos) + 1
    return pos


def run_end(pattern: re.Pattern[bytes], data: bytes, pos: int) -> int:
    match = pattern.match(data, pos)
    return match.end() if match is not None else pos


def parse_json(text: bytes) -> object:
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequest("the request's JSON is not valid UTF-8") from None
    try:
        value: object = _DECODER.decode(decoded)
    except MalformedRequest:  # from Float: a number RapidJSON cannot hold
        raise
    except ValueError:
        raise MalformedRequest("the request body is not valid JSON") from None
    return value


def _object(pairs: list[tuple[str, object]]) -> dict[str, object] | DuplicateKey:
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                return DuplicateKey(key)
            seen.add(key)
    return value


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # NaN and ±Infinity: Python accepts them, RapidJSON does not


# Made once: json.loads with arguments makes a decoder per call, which costs as much as decoding a small request.
_DECODER: Final = json.JSONDecoder(object_pairs_hook=_object, parse_float=Float, parse_constant=_no_constant)


def check_utf8(data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequest("the request's JSON is not valid UTF-8") from None


def too_deep() -> MalformedRequest:
    return MalformedRequest(f"the request's JSON is nested more than {MAX_DEPTH} levels deep")


def too_big(number: str, where: str = "the request") -> MalformedRequest:
    return MalformedRequest(f"{where} holds the number {_cut(number)}, too big for a double")


def repeated(where: str, duplicate: DuplicateKey) -> MalformedRequest:
    return MalformedRequest(f"the key {quote(duplicate.key)} comes twice in {where}")


def _cut(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def quote(text: str) -> str:
    return repr(_cut(text))


def show(value: object) -> str:
    return _cut(repr(value))
