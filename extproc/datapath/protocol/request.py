"""Envoy's request headers → what the scheduler is asked (:class:`InferenceRequest`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from extproc.config import Tier
from extproc.datapath.headers import (
    BINARY_HEADER,
    CLIENT_KEY_HEADER,
    GRPC_TIMEOUT_HEADER,
    PRIORITY_HEADER,
    READ_HEADERS,
    ROWS_HEADER,
    SEQUENCE_HEADER,
    TIER_HINT_HEADER,
    TIMEOUT_HEADER,
)
from extproc.datapath.protocol.parse import parse_rest_path
from extproc.datapath.scheduling.types import InferenceRequest, Priority, Protocol

_TIERS: Final = {t.value: t for t in Tier}
_PRIORITIES: Final = {p.value: p for p in Priority}
# grpc-timeout's units (gRPC over HTTP/2: "Timeout → TimeoutValue TimeoutUnit"), in milliseconds.
_GRPC_TIMEOUT_UNITS: Final = {"H": 3_600_000.0, "M": 60_000.0, "S": 1000.0, "m": 1.0, "u": 1e-3, "n": 1e-6}


def header_map(values: Iterable[Any]) -> dict[str, str]:
    """The headers the picker reads (never our routing headers: Envoy strips client copies before us, and
    one that got through is not read), from the request-headers message's ``HeaderValue`` list. Envoy
    sends values in ``raw_value``; latin-1 keeps any byte sequence decodable."""
    out: dict[str, str] = {}
    for h in values:
        key: str = h.key
        if key in READ_HEADERS:
            raw: bytes = h.raw_value
            out[key] = raw.decode("latin-1") if raw else h.value
    return out


def rest_request(path: str, headers: dict[str, str]) -> InferenceRequest:
    """A REST call: the model from the path, the rest from headers."""
    target = parse_rest_path(path)
    length = content_length(headers)
    return InferenceRequest(
        Protocol.HTTP,
        target.model,
        target.version,
        length,
        hint(headers),
        priority(headers),
        sequence_id(headers),
        infer=target.model is not None and path.split("?", 1)[0].endswith("/infer"),
        timeout_ms=rest_timeout_ms(headers),
        client=headers.get(CLIENT_KEY_HEADER),
        rows=rows_hint(headers),
        tensor_bytes=tensor_bytes(length, headers),
    )


def tensor_bytes(length: int | None, headers: dict[str, str]) -> int | None:
    """The bytes of a REST body's binary tensors: what follows the JSON part whose length
    Inference-Header-Content-Length gives (None without binary tensors, or with lengths that do not add up:
    the body check refuses those)."""
    json_length = decimal_length(headers.get(BINARY_HEADER))
    if length is None or json_length is None or not json_length < length:
        return None
    return length - json_length


def rest_timeout_ms(headers: dict[str, str]) -> float | None:
    """x-triton-timeout-ms: a positive decimal number of milliseconds; anything else is no deadline."""
    value = decimal_length(headers.get(TIMEOUT_HEADER))
    return float(value) if value else None


def grpc_timeout_ms(headers: dict[str, str]) -> float | None:
    """grpc-timeout: up to 8 digits and a unit; anything else is no deadline (as gRPC servers read it)."""
    value = headers.get(GRPC_TIMEOUT_HEADER)
    if value is None or not 2 <= len(value) <= 9:
        return None
    digits, unit = value[:-1], _GRPC_TIMEOUT_UNITS.get(value[-1])
    if unit is None or not digits.isascii() or not digits.isdigit():
        return None
    ms = int(digits) * unit
    return ms if ms > 0 else None


# The most rows x-triton-rows may claim (the scheduler also caps it at the model's max_batch_size).
MAX_ROWS_HINT: Final = 1 << 20


def rows_hint(headers: dict[str, str]) -> int | None:
    """x-triton-rows: a positive decimal integer, at most MAX_ROWS_HINT; anything else is no hint."""
    value = decimal_length(headers.get(ROWS_HEADER))
    return value if value is not None and 0 < value <= MAX_ROWS_HINT else None


def content_length(headers: dict[str, str]) -> int | None:
    return decimal_length(headers.get("content-length"))


def decimal_length(value: str | None) -> int | None:
    """A length header's value; None for anything but ASCII digits (``isdigit`` alone takes '²', which
    ``int`` refuses), or for more of them than any body could need."""
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 18:
        return None
    return int(value)


def priority(headers: dict[str, str]) -> Priority:
    value = headers.get(PRIORITY_HEADER)
    return _PRIORITIES.get(value.strip().lower(), Priority.STANDARD) if value else Priority.STANDARD


def sequence_id(headers: dict[str, str]) -> str | None:
    value = headers.get(SEQUENCE_HEADER, "").strip()
    # Triton treats 0 (or empty) as "no sequence"; an absurdly long id is not one a client meant.
    return value if value and value != "0" and len(value) <= 256 else None


def hint(headers: dict[str, str]) -> Tier | None:
    value = headers.get(TIER_HINT_HEADER)
    return _TIERS.get(value.strip().lower()) if value else None
