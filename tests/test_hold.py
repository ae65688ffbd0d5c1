"""extproc.handlers.hold: the body messages that arrive while a request is held, asked for once each and
kept in order for the rest of the stream (no servers; the real stack: tests/test_scale_from_zero.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.datapath.scheduling.types import Decision, Reject
from extproc.handlers.hold import Hold

REFUSED = Reject(503, "loading", "loading")


def chunk(data: bytes, end: bool = False) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=end))


async def body(chunks: list[ep.ProcessingRequest], gap_s: float) -> AsyncIterator[ep.ProcessingRequest]:
    for message in chunks:
        await asyncio.sleep(gap_s)
        yield message


async def decided_after(seconds: float) -> Decision:
    await asyncio.sleep(seconds)
    return REFUSED


async def run(chunks: list[ep.ProcessingRequest], gap_s: float, decide_s: float) -> tuple[int, list[bytes]]:
    hold = Hold(decided_after(decide_s), body(chunks, gap_s))
    arrivals = [m async for m in hold.arrivals()]
    assert await hold.decision() is REFUSED
    rest = [m.request_body.body async for m in hold.body()]
    return len(arrivals), rest


def test_chunks_that_arrive_during_the_hold_are_each_announced_and_kept_in_order() -> None:
    chunks = [chunk(b"a"), chunk(b"b"), chunk(b"c"), chunk(b"d", end=True)]
    announced, rest = asyncio.run(run(chunks, gap_s=0.05, decide_s=0.12))
    assert announced == 2  # a and b came before the decision
    assert rest == [b"a", b"b", b"c", b"d"]


def test_a_body_complete_before_the_decision_is_not_read_further() -> None:
    announced, rest = asyncio.run(run([chunk(b"a", end=True)], gap_s=0.0, decide_s=0.05))
    assert (announced, rest) == (1, [b"a"])


def test_cancel_stops_the_wait() -> None:
    async def cancelled() -> bool:
        hold = Hold(decided_after(10.0), body([], 0.0))
        [m async for m in hold.arrivals()]
        hold.cancel()
        try:
            await hold.decision()
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(cancelled())
