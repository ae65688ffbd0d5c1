"""A request held while its model loads (scale from zero, ``hold`` mode), with its body still coming.

Envoy gives every message it sends the picker a new message timeout, including a body chunk that arrives
while the picker holds the request's headers; the picker's earlier request for more time covered only the
message pending then. So each chunk that arrives during the hold is answered with another request for
time (Envoy honours one per message), and kept for the stream's later reading, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.datapath.scheduling.types import Decision

__all__ = ["Hold"]


class Hold:
    """The wait for a held request's decision, and the body messages that arrive meanwhile."""

    def __init__(self, decision: Awaitable[Decision], body: AsyncIterator[ep.ProcessingRequest]) -> None:
        self._decision = asyncio.ensure_future(decision)
        self._body = body
        self._arrived: list[ep.ProcessingRequest] = []
        # A read of the body's next message, started and not yet finished when the decision came.
        self._reading: asyncio.Future[ep.ProcessingRequest | None] | None = None
        # The body's last message has arrived (or the stream ended): nothing more to read.
        self._ended = False

    async def arrivals(self) -> AsyncIterator[ep.ProcessingRequest]:
        """Each body message that arrives before the decision; the caller asks Envoy for more time."""
        while not self._ended:
            if self._reading is None:
                self._reading = asyncio.ensure_future(anext(self._body, None))
                # Left unread when the decision ends the stream, it fails then ("RPC already finished").
                self._reading.add_done_callback(_retrieve)
            done, _ = await asyncio.wait((self._decision, self._reading), return_when=asyncio.FIRST_COMPLETED)
            if self._reading not in done:
                return
            message, self._reading = self._reading.result(), None
            if message is None:
                self._ended = True
                return
            self._arrived.append(message)
            self._ended = message.HasField("request_body") and message.request_body.end_of_stream
            yield message

    async def decision(self) -> Decision:
        return await self._decision

    def cancel(self) -> None:
        """The stream ended first (Envoy gave up, or the client left): stop waiting for the model."""
        self._decision.cancel()

    def body(self) -> AsyncIterator[ep.ProcessingRequest]:
        """The body's messages from where the hold found it: those that arrived during it, then the rest."""
        return _rest(self._arrived, self._reading, None if self._ended else self._body)


def _retrieve(read: asyncio.Future[ep.ProcessingRequest | None]) -> None:
    if not read.cancelled():
        read.exception()


async def _rest(
    arrived: list[ep.ProcessingRequest],
    reading: asyncio.Future[ep.ProcessingRequest | None] | None,
    body: AsyncIterator[ep.ProcessingRequest] | None,
) -> AsyncIterator[ep.ProcessingRequest]:
    for message in arrived:
        yield message
    if reading is not None:
        message = await reading
        if message is None:
            return
        yield message
    if body is not None:
        async for message in body:
            yield message
