"""Long-lived streams per client (extproc.handlers.streams), without servers; the real stack:
tests/test_edge_security.py (H4)."""

from __future__ import annotations

from extproc.handlers.streams import OpenStreams


def test_a_client_holds_at_most_its_streams_and_closing_one_makes_room() -> None:
    streams = OpenStreams(per_client=2)
    assert streams.open("a") is None and streams.open("a") is None
    refused = streams.open("a")
    assert refused is not None and refused.status == 429 and refused.reason == "streams_per_client"
    assert refused.retry_after and "2 inference streams open" in refused.message
    assert streams.open("b") is None  # per client
    streams.close("a")
    assert streams.open("a") is None
    # A reload that lowers the limit leaves open streams alone and refuses new ones until they close.
    streams.per_client = 1
    assert streams.open("b") is not None
    streams.close("b")
    assert streams.open("b") is None
