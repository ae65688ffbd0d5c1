"""Telemetry shared from one leader process to the picker's worker processes (``picker.workers > 1``).

The leader runs the only telemetry collector, so Triton and Envoy are scraped once per host whatever the
number of workers, and pushes snapshots to each worker over a Unix socket (owner-only, in the runtime
directory) every ``PUSH_INTERVAL_S``: a worker's first holds every host's record, each later one the records
the leader's datastore has written since the one before (:class:`Written`) and the time of the leader's
latest Envoy poll, which every host left out takes (:meth:`~extproc.datapath.datastore.Datastore.envoy_polled`):
a large fleet's snapshot then costs a worker, which decides on the same event loop, the hosts that changed
rather than all of them. Workers apply snapshots to their own datastore and keep their own picks-since-poll
accounting between Envoy polls. The leader alone resolves the fleet's pools; a snapshot carries the hosts
they resolved to when those changed, so that every worker routes over the same hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from extproc.config import HostSpec
from extproc.datapath.datastore import TELEMETRY_FIELDS, Datastore, HostState
from extproc.datapath.peer_load import PeerLoad
from extproc.datapath.shared_picks import SharedPicks
from extproc.parts import cancel

log = structlog.get_logger(__name__)

PUSH_INTERVAL_S = 0.05
# The most host records in one frame of a snapshot (see frames()).
FRAME_RECORDS: Final = 16
_LENGTH = struct.Struct(">I")


Discovered = tuple[HostSpec, ...]


@dataclass(slots=True)
class Snapshot:
    """What one push carries (see the module's docstring)."""

    records: dict[str, tuple[Any, ...]]  # by host name: Datastore.telemetry's record
    discovered: Discovered | None = None  # None: the same as in the last snapshot
    # The leader's latest Envoy poll (None: none yet, or not carried), and the hosts whose Envoy time is
    # another (Envoy does not list them), with theirs.
    envoy_at: float | None = None
    envoy_lagging: dict[str, float | None] = field(default_factory=dict)
    complete: bool = True  # the last frame of a snapshot (see frames())
    # Each host's HostState.peer_count at that Envoy poll (picker.replicas.share_load; see
    # PeerLoad.at_poll), which a worker adds to the poll's counts; None: not carried.
    peer_counts: dict[str, float | None] | None = None


def records(datastore: Datastore) -> dict[str, tuple[Any, ...]]:
    return {name: datastore.telemetry(host) for name, host in datastore.hosts.items()}


def snapshot(datastore: Datastore, discovered: Discovered) -> bytes:
    """Every host's record, for a worker or a follower that has none yet."""
    return pack(Snapshot(records(datastore), discovered))


def pack(snapshot: Snapshot) -> bytes:
    return pickle.dumps(
        (
            snapshot.records,
            snapshot.discovered,
            snapshot.envoy_at,
            snapshot.envoy_lagging,
            snapshot.complete,
            snapshot.peer_counts,
        ),
        protocol=pickle.HIGHEST_PROTOCOL,
    )


def read_snapshot(data: bytes) -> Snapshot:
    # Only our own leader writes to this socket (owner-only permissions), so unpickling is safe.
    state, discovered, envoy_at, lagging, complete, peer_counts = pickle.loads(data)
    assert discovered is None or all(isinstance(h, HostSpec) for h in discovered)
    return Snapshot(state, discovered, envoy_at, lagging, complete, peer_counts)


def apply_snapshot(datastore: Datastore, snapshot: Snapshot) -> list[HostState]:
    """Write the snapshot into ``datastore``; returns the hosts whose in-flight estimate restarted from the
    leader's Envoy count (read at the leader's poll, before now)."""
    # A host our (older or newer) fleet file does not have is skipped.
    if snapshot.peer_counts is not None:
        datastore.set_peer_counts(snapshot.peer_counts)
    restarted = datastore.set_records(snapshot.records)
    if snapshot.envoy_at is not None:
        restarted += datastore.envoy_polled(snapshot.envoy_at, snapshot.envoy_lagging, snapshot.records)
    return restarted


def frames(snapshot: Snapshot) -> bytes:
    """The snapshot as length-prefixed frames of at most :data:`FRAME_RECORDS` records each: the first with
    the discovered hosts and the other replicas' counts (before any estimate restarts), the last with
    Envoy's time. A worker applies one frame at a time and lets its
    requests through in between, so that a snapshot of many hosts never holds a decision up for long."""
    names = list(snapshot.records)
    chunks = [names[i : i + FRAME_RECORDS] for i in range(0, len(names), FRAME_RECORDS)] or [[]]
    out = []
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        data = pack(
            Snapshot(
                {name: snapshot.records[name] for name in chunk},
                snapshot.discovered if i == 0 else None,
                snapshot.envoy_at if last else None,
                snapshot.envoy_lagging if last else {},
                last,
                snapshot.peer_counts if i == 0 else None,
            )
        )
        out += [_LENGTH.pack(len(data)), data]
    return b"".join(out)


class Written:
    """Which hosts' records a datastore has written since the last :meth:`take`, by the fields at
    ``positions`` of the record. The datastore replaces a field's value whenever it writes one (never
    changes it in place; an Envoy view equal to the last keeps the last's object), so a value that is the
    same object is unchanged."""

    def __init__(self, positions: tuple[int, ...]) -> None:
        self._positions = positions
        self._sent: dict[str, tuple[Any, ...]] = {}

    @property
    def last(self) -> dict[str, tuple[Any, ...]]:
        """Every host's record as the last :meth:`take` read it."""
        return self._sent

    def take(self, datastore: Datastore) -> dict[str, tuple[Any, ...]]:
        """The records of the hosts written since the last call, by name (every host at the first)."""
        sent, positions = self._sent, self._positions
        now = self._sent = records(datastore)
        return {
            name: record
            for name, record in now.items()
            if (last := sent.get(name)) is None or any(record[i] is not last[i] for i in positions)
        }


# Every field but Envoy's time, which each push carries once for all hosts (Snapshot.envoy_at).
_ENVOY_AT: Final = TELEMETRY_FIELDS.index("envoy_at")
_WORKER_FIELDS: Final = tuple(i for i in range(len(TELEMETRY_FIELDS)) if i != _ENVOY_AT)


def envoy_times(state: dict[str, tuple[Any, ...]]) -> tuple[float | None, dict[str, float | None]]:
    """The latest Envoy time of the hosts' records, and the hosts with another, with theirs."""
    times = {name: record[_ENVOY_AT] for name, record in state.items()}
    latest = max((t for t in times.values() if t is not None), default=None)
    return latest, {name: t for name, t in times.items() if t != latest}


class Publisher:
    """The leader's side: accepts worker connections and pushes snapshots to all of them, every
    ``PUSH_INTERVAL_S`` and as soon as ``envoy_polled`` is set (see :meth:`_push_forever`); with
    ``peer_load``, each Envoy poll's snapshot carries the other replicas' counts at that poll."""

    def __init__(
        self,
        datastore: Datastore,
        path: Path,
        discovered: Discovered,
        envoy_polled: asyncio.Event | None = None,
        peer_load: PeerLoad | None = None,
    ) -> None:
        self.datastore = datastore
        self._peer_load = peer_load
        self.discovered = discovered
        self._envoy_polled = envoy_polled or asyncio.Event()
        self._path = path
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._written = Written(_WORKER_FIELDS)
        self._sent_discovered: Discovered | None = None
        self._sent_envoy_at: float | None = None

    async def start(self) -> None:
        self._path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._accept, path=str(self._path))
        self._path.chmod(0o600)
        self._task = asyncio.create_task(self._push_forever(), name="telemetry-publisher")

    async def _accept(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        state = records(self.datastore)
        envoy_at, lagging = envoy_times(state)
        snapshot = Snapshot(state, self.discovered, envoy_at, lagging, peer_counts=self._peer_counts())
        with contextlib.suppress(ConnectionError):
            await self._push(writer, frames(snapshot))

    def _peer_counts(self) -> dict[str, float | None] | None:
        return None if self._peer_load is None else self._peer_load.at_poll

    async def _push(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        try:
            writer.write(data)
            await writer.drain()
        except ConnectionError:
            self._writers.discard(writer)
            writer.close()

    async def _push_forever(self) -> None:
        # Envoy's counts go out as soon as they are read: a worker's in-flight estimates restart from the
        # count as of the poll, so each pick made between the poll and the snapshot's arrival is counted
        # again (SharedPicks.replay) or lost; the shorter that window, the less either costs.
        polled = self._envoy_polled
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(polled.wait(), PUSH_INTERVAL_S)
            polled.clear()
            # Taken whether or not a worker listens: a worker that connects gets every record first.
            written = self._written.take(self.datastore)
            envoy_at, lagging = envoy_times(self._written.last)
            discovered = None if self.discovered is self._sent_discovered else self.discovered
            if not self._writers or (not written and discovered is None and envoy_at == self._sent_envoy_at):
                continue
            peer_counts = self._peer_counts() if envoy_at != self._sent_envoy_at else None
            self._sent_discovered, self._sent_envoy_at = self.discovered, envoy_at
            data = frames(Snapshot(written, discovered, envoy_at, lagging, peer_counts=peer_counts))
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
    ``on_hosts`` gets the discovered hosts of each snapshot first, and may replace :attr:`datastore`. With
    ``shared_picks``, the other workers' picks are caught up on before each snapshot (a count restarts an
    estimate sized by the host's last picks, which must hold them), and those made since the leader's Envoy
    poll count again where its count replaced a host's estimate (see
    :meth:`~extproc.datapath.shared_picks.SharedPicks.replay`)."""

    def __init__(
        self,
        datastore: Datastore,
        path: Path,
        on_hosts: Callable[[Discovered], Awaitable[None]],
        shared_picks: SharedPicks | None = None,
    ) -> None:
        self.datastore = datastore
        self._path = path
        self._on_hosts = on_hosts
        self._shared_picks = shared_picks
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
                    snapshot = read_snapshot(await reader.readexactly(length))
                    if snapshot.discovered is not None:
                        await self._on_hosts(snapshot.discovered)
                    if self._shared_picks is not None:
                        # Every pick made so far among the last picks, in order, before a count they size.
                        self._shared_picks.catch_up(self.datastore, self.datastore.now())
                    restarted = apply_snapshot(self.datastore, snapshot)
                    if restarted and self._shared_picks is not None:
                        self._shared_picks.replay(self.datastore, restarted, self.datastore.now())
                    if snapshot.complete:  # a worker serves once it has every host, not a frame's worth
                        self.received.set()
                    await asyncio.sleep(0)  # the requests waiting meanwhile go first (see frames())
            except (asyncio.IncompleteReadError, ConnectionError):
                log.warning("telemetry_leader_lost", note="reconnecting; routing on the last snapshot meanwhile")
            finally:
                writer.close()
