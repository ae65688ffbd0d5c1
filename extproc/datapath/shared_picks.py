"""Picks that the worker processes of one picker (``picker.workers > 1``) tell each other at once.

Each worker decides on its own in-flight estimates, which Envoy's count resets at each poll. Between two polls
a worker alone sees only its own picks: counting each one N times (for N workers) stands for the others'
picks on average, but not for where they went, so several workers pile onto the host that looked best at the
last poll. Here each worker appends every pick (host, model, work) to its own row of a buffer they all map
(a file in the runtime directory, which the leader makes before it starts them), and before each decision
applies the picks the other workers appended since its last one, except those made before the Envoy poll
its estimate of the host last restarted from (the count has them): every worker then decides on every pick
made before it, as a single process would, with no message and no system call. A count reaches a worker a
little after its leader's poll, as of the poll: the picks made since that it had counted, it counts again
(:meth:`SharedPicks.replay`).

**The buffer.** One row per worker; a row is the count of picks its worker appended so far, then a ring of
its last :data:`SLOTS` picks, each the keys of its host and model (:func:`name_key`: names are the same in
every worker, hosts and models may be listed in another order), its work and its time. A worker writes its own row
only (the pick, then the count), so no lock is needed; the count is one aligned native 8-byte write, which
a reader sees whole. A reader that fell further behind than the ring skips what it lost, and a pick it
cannot make sense of (a host or model it does not know, work out of range) is skipped too: the next Envoy
poll corrects whatever a lost pick leaves in the estimates.

**The other replicas' picks** (``picker.replicas.share_load``, :mod:`extproc.datapath.peer_load`). The leader
holds the channel to the other picker replicas. It appends each pick they tell it to one more row, the last
(:func:`rows`), stamped with the time it arrived, which every worker applies as another worker's pick; and it
reads the workers' rows (:meth:`SharedPicks.take`) to tell the other replicas its workers' picks.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import Final

from extproc.datapath.datastore import Datastore, HostState

__all__ = [
    "LEADER_IDLE_AFTER_S",
    "LEADER_IDLE_READ_S",
    "LEADER_READ_S",
    "SLOTS",
    "KeyedFleet",
    "RelayReads",
    "SharedPicks",
    "name_key",
    "next_read_s",
    "rows",
]

# Picks one row remembers: far more than a worker decides between two decisions of another.
SLOTS: Final = 1024
# How often a leader reads its workers' rows to tell the other replicas (picker.replicas.share_load): a
# worker's pick waits up to this long on top of the replicas' channel. Once the workers have made no pick
# for LEADER_IDLE_AFTER_S the wait doubles at each read that finds none, up to LEADER_IDLE_READ_S, so that
# an idle leader does not wake up a thousand times a second; backing off sooner would delay the picks of
# a lightly loaded gateway, whose share of the fleet's requests the others then do not see in time.
LEADER_READ_S: Final = 0.001
LEADER_IDLE_AFTER_S: Final = 1.0
LEADER_IDLE_READ_S: Final = 0.032
_COUNT: Final = struct.Struct("@Q")
_PICK: Final = struct.Struct("@QQdd")  # host key, model key (0: none), work, time
_ROW_BYTES: Final = _COUNT.size + SLOTS * _PICK.size
# A pick's work is in requests of its model's mean size: far above this is no pick a worker made.
_MAX_WORK: Final = 1e6


def _possible(work: float) -> bool:
    """Whether a pick's work read from the buffer is one a worker made (NaN is not)."""
    return 0.0 <= work <= _MAX_WORK


def rows(workers: int, share_load: bool) -> int:
    """The rows of the buffer: one per worker, and the leader's of the other replicas' picks where they share
    their loads (its index is ``workers``)."""
    return workers + 1 if share_load else workers


def next_read_s(previous_s: float, idle_s: float) -> float:
    """How long a leader waits before it reads its workers' rows again, having waited ``previous_s``, its
    workers' last pick ``idle_s`` ago (see :data:`LEADER_READ_S`)."""
    if idle_s < LEADER_IDLE_AFTER_S:
        return LEADER_READ_S
    return min(2 * previous_s, LEADER_IDLE_READ_S)


def name_key(name: str) -> int:
    """A host's or model's key in the buffer: the same in every process (unlike ``hash``), never 0."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") or 1


class KeyedFleet:
    """A datastore's hosts and models by :func:`name_key`, as another process names them; made again whenever
    the datastore (or its layout: a host may have been replaced by another of the same name) changes."""

    def __init__(self) -> None:
        self._keys: dict[str, int] = {}
        self.hosts: dict[int, HostState] = {}
        self.models: dict[int, str] = {}
        self._store: Datastore | None = None
        self._layout = -1

    def key(self, name: str) -> int:
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = name_key(name)
        return key

    def follow(self, store: Datastore) -> bool:
        """Index ``store``; whether it was made again (a new datastore or layout)."""
        if store is self._store and store.layout == self._layout:
            return False
        self._store, self._layout = store, store.layout
        self.hosts = {self.key(name): host for name, host in store.hosts.items()}
        self.models = {self.key(model): model for model in store.known_models}
        return True


class SharedPicks:
    """One worker's view of the buffer: it appends to row ``row`` of ``rows`` and reads the others."""

    def __init__(self, buffer: memoryview, rows: int, row: int) -> None:
        if len(buffer) < self.size(rows) or not 0 <= row < rows:
            raise ValueError(f"a buffer of {len(buffer)} bytes holds no row {row} of {rows}")
        self._buffer = buffer
        self._row = row
        self._offsets = [r * _ROW_BYTES for r in range(rows)]
        self._peers = [r for r in range(rows) if r != row]
        # A restarted worker goes on from its own count, and leaves the others' earlier picks alone: Envoy's
        # next count has them.
        self._written = self._count(row)
        self._seen = [self._count(r) for r in range(rows)]
        self._fleet = KeyedFleet()
        # Since the last taken(): the other workers' picks applied to this worker's estimates, and those
        # skipped (fallen behind the ring, or not understood).
        self._applied = 0
        self._lost = 0

    @staticmethod
    def size(rows: int) -> int:
        """Bytes of a buffer for ``rows`` workers."""
        return rows * _ROW_BYTES

    def taken(self) -> tuple[int, int]:
        """The picks (applied, lost) since the last call."""
        counts = self._applied, self._lost
        self._applied = self._lost = 0
        return counts

    def _count(self, row: int) -> int:
        count: int = _COUNT.unpack_from(self._buffer, self._offsets[row])[0]
        return count

    def publish(self, host: HostState, model: str | None, work: float, now: float) -> None:
        """Append this worker's pick, made at ``now`` (``time.monotonic()``, one clock for every process of
        the machine), for the others."""
        model_key = self._fleet.key(model) if model is not None else 0
        self.append(self._fleet.key(host.name), model_key, work, now)

    def append(self, host_key: int, model_key: int, work: float, now: float) -> None:
        """:meth:`publish` by keys: the leader's row of the other replicas' picks (see :func:`rows`)."""
        written = self._written
        base = self._offsets[self._row]
        slot = base + _COUNT.size + (written % SLOTS) * _PICK.size
        _PICK.pack_into(self._buffer, slot, host_key, model_key, work, now)
        self._written = written + 1
        _COUNT.pack_into(self._buffer, base, written + 1)

    def take(self) -> list[tuple[int, int, float]]:
        """The picks (host key, model key, work) the other rows appended since the last call, in each row's
        order: the leader's, to tell the other replicas its workers' picks (see :func:`rows`)."""
        taken: list[tuple[int, int, float]] = []
        for row in self._peers:
            start, end = self._unread(row)
            base = self._offsets[row] + _COUNT.size
            for i in range(start, end):
                host_key, model_key, work, _ = _PICK.unpack_from(self._buffer, base + (i % SLOTS) * _PICK.size)
                if _possible(work):
                    taken.append((host_key, model_key, work))
                else:
                    self._lost += 1
        return taken

    def catch_up(self, store: Datastore, now: float) -> None:
        """Apply to ``store``'s in-flight estimates the picks the other workers appended since the last call."""
        for row in self._peers:
            start, end = self._unread(row)
            if end > start:
                self._apply(store, row, start, end, now)

    def _unread(self, row: int) -> tuple[int, int]:
        """The picks of ``row`` appended since the last read, as (start, end), now read; those the ring no
        longer holds are counted lost."""
        count = self._count(row)
        start = self._seen[row]
        if count <= start:
            return start, start
        if count - start > SLOTS:
            self._lost += count - start - SLOTS
            start = count - SLOTS
        self._seen[row] = count
        return start, count

    def replay(self, store: Datastore, restarted: Sequence[HostState], now: float) -> None:
        """Envoy's count has just replaced the estimates of ``restarted`` (in ``store``), as of its poll, before
        ``now``: a worker gets its leader's poll with the next snapshot. The picks made since the poll that
        this worker had counted (its own, and the others' it caught up on) are not in that count: count them
        again. The others' picks it has not caught up on yet, :meth:`catch_up` applies as usual."""
        polled = [host.envoy_at for host in restarted if host.envoy_at is not None]
        if not polled:
            return
        since = min(polled)
        self._fleet.follow(store)
        hosts = {self._fleet.key(host.name): host for host in restarted}
        models = self._fleet.models
        again: dict[int, list[tuple[float, str | None, float]]] = {}
        for row, offset in enumerate(self._offsets):
            end = self._written if row == self._row else self._seen[row]
            base = offset + _COUNT.size
            i = end - 1
            while i >= 0 and i >= end - SLOTS:
                host_key, model_key, work, at = _PICK.unpack_from(self._buffer, base + (i % SLOTS) * _PICK.size)
                if at <= since:
                    break  # a row's picks are in the order of their times
                i -= 1
                host = hosts.get(host_key)
                if host is None or not _possible(work):
                    continue
                envoy_at = host.envoy_at
                if envoy_at is None or at > envoy_at:
                    again.setdefault(host_key, []).append((at, models.get(model_key), work))
        for host_key, picks in again.items():
            host = hosts[host_key]
            # The count is sized by the host's picks before these, which its last picks hold after them.
            count, at = host.estimate, host.estimate_at
            host.reset_estimate(count, at if at is not None else now, newer=len(picks))
            for _, model, work in sorted(picks, key=lambda pick: pick[0]):
                host.record_pick(now, 1, model, work, again=True)

    def _apply(self, store: Datastore, row: int, start: int, end: int, now: float) -> None:
        self._fleet.follow(store)
        base = self._offsets[row] + _COUNT.size
        hosts, models = self._fleet.hosts, self._fleet.models
        for i in range(start, end):
            host_key, model_key, work, at = _PICK.unpack_from(self._buffer, base + (i % SLOTS) * _PICK.size)
            host = hosts.get(host_key)
            if host is None or not _possible(work):
                self._lost += 1
                continue
            envoy_at = host.envoy_at
            if envoy_at is not None and at <= envoy_at:
                # Envoy's count, which this worker's estimate restarted from since, holds it; not its size.
                host.remember_pick(work)
                continue
            host.record_pick(now, 1, models.get(model_key), work)  # key 0 (no model) is no model's
            self._applied += 1


class RelayReads:
    """A leader's reads of its workers' rows for the other replicas (``picker.replicas.share_load``): each
    read hands the workers' new picks to ``tell`` (host key, model key, work) and says how long to wait for
    the next (:func:`next_read_s`); the first read is :data:`LEADER_READ_S` after ``now``."""

    def __init__(self, picks: SharedPicks, tell: Callable[[int, int, float], None], now: float) -> None:
        self._picks = picks
        self._tell = tell
        self._wait_s = LEADER_READ_S
        self._picked_at = now

    def read(self, now: float) -> float:
        """Read and tell the workers' picks appended since the last read, at ``now``; the wait before the next."""
        taken = self._picks.take()
        if taken:
            self._picked_at = now
        tell = self._tell
        for host_key, model_key, work in taken:
            tell(host_key, model_key, work)
        self._wait_s = next_read_s(self._wait_s, now - self._picked_at)
        return self._wait_s
