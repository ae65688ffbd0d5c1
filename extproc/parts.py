"""What a picker process runs, piece by piece: the :class:`Part` contract its roles (:mod:`extproc.roles`)
compose, and :func:`cancel` for the parts that run a task."""

from __future__ import annotations

import asyncio
import contextlib

from extproc.config import Fleet
from extproc.datapath.datastore import Datastore

__all__ = ["Part", "cancel"]


async def cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Part:
    """One piece of a running picker; every hook does nothing unless the part needs it."""

    async def start(self) -> None:
        """In the role's order: telemetry before the gRPC server, so the first requests route on data."""

    async def reload(self, config: Fleet) -> None:
        """A new fleet file (under the picker's switching lock), before the picker switches to it."""

    def switch(self, fleet: Fleet, datastore: Datastore) -> None:
        """The picker now routes over ``fleet`` and ``datastore`` (config reload or new pool hosts). Runs
        between two requests for every part (it must not await); :meth:`settle` then follows."""

    async def settle(self) -> None:
        """After every part switched: let go of what served the previous fleet."""

    async def stop(self) -> None:
        """In the reverse of the role's order."""
