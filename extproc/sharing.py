"""Telemetry shared from one leader process to the picker's worker processes (``picker.workers > 1``).

The leader runs the only telemetry collector, so Triton and Envoy are scraped once per host whatever the
number of workers, and pushes a snapshot of every host's live state to each worker over a Unix socket
(owner-only, in the runtime directory) every ``PUSH_INTERVAL_S``. Workers apply it to their own datastore
and keep their own picks-since-poll accounting between Envoy polls. The leader alone resolves the fleet's
pools; each snapshot carries the hosts they resolved to, so that every worker routes over the same hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from extproc.config import HostSpec
from extproc.datapath.datastore import Datastore
from extproc.parts import cancel

log = structlog.get_logger(__name__)

PUSH_INTERVAL_S = 0.05
_LENGTH = struct.Struct(">I")


Discovered = tuple[HostSpec, ...]


def snapshot(datastore: Datastore, discovered: Discovered) -> bytes:
    return pack(discovered, {name: datastore.telemetry(host) for name, host in datastore.hosts.items()})


def pack(discovered: Discovered, state: dict[str, tuple[Any, ...]]) -> bytes:
    """A snapshot of the hosts in ``state`` alone (their :meth:`~Datastore.telemetry` records), for
    :func:`read_snapshot`."""
    return pickle.dumps((discovered, state), protocol=pickle.HIGHEST_PROTOCOL)


def read_snapshot(data: bytes) -> tuple[Discovered, dict[str, tuple[Any, ...]]]:
    # Only our own leader writes to this socket (owner-only permissions), so unpickling is safe.
    discovered, state = pickle.loads(data)
    assert all(isinstance(h, HostSpec) for h in discovered)
    return discovered, state


def apply_snapshot(datastore: Datastore, state: dict[str, tuple[Any, ...]]) -> None:
    for name, record in state.items():
        host = datastore.hosts.get(name)
        if host is not None:  # else a host our (older or newer) fleet file does not have
            datastore.set_telemetry(host, record)


class Publisher:
    """The leader's side: accepts worker connections and pushes snapshots to all of them."""

    def __init__(self, datastore: Datastore, path: Path, discovered: Discovered) -> None:
        self.datastore = datastore
        self.discovered = discovered
        self._path = path
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._accept, path=str(self._path))
        self._path.chmod(0o600)
        self._task = asyncio.create_task(self._push_forever(), name="telemetry-publisher")

    async def _accept(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        with contextlib.suppress(ConnectionError):
            await self._push(writer, snapshot(self.datastore, self.discovered))

    async def _push(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        try:
            writer.write(_LENGTH.pack(len(data)) + data)
            await writer.drain()
        except ConnectionError:
            self._writers.discard(writer)
            writer.close()

    async def _push_forever(self) -> None:
        while True:
            await asyncio.sleep(PUSH_INTERVAL_S)
            if self._writers:
                data = snapshot(self.datastore, self.discovered)
                await asyncio.gather(*(self._push(w, data) for w in list(self._writers)))

    async def stop(self) -> None:
        await cancel(self._task)
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._path.unlink(missing_ok=True)


class Subscriber:
    """A worker's side: keeps its datastore in step with the leader's, reconnecting if the leader restarts.
    ``on_hosts`` gets the discovered hosts of each snapshot first, and may replace :attr:`datastore`."""

    def __init__(self, datastore: Datastore, path: Path, on_hosts: Callable[[Discovered], Awaitable[None]]) -> None:
        self.datastore = datastore
        self._path = path
        self._on_hosts = on_hosts
        self.received = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self._path))
            except OSError:
                await asyncio.sleep(0.1)
                continue
            try:
                while True:
                    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                    discovered, state = read_snapshot(await reader.readexactly(length))
                    await self._on_hosts(discovered)
                    apply_snapshot(self.datastore, state)
                    self.received.set()
            except (asyncio.IncompleteReadError, ConnectionError):
                log.warning("telemetry_leader_lost", note="reconnecting; routing on the last snapshot meanwhile")
            finally:
                writer.close()
