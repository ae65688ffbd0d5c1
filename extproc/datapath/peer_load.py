"""Loads that picker replicas tell each other (``picker.replicas.share_load``): their Envoys' counts and picks.

Several picker replicas, each beside its own Envoy, route to the same hosts. Alone, a replica sees only its
Envoy's in-flight counts and its own picks, and scales both by its share of each host's traffic: that stands
for the other replicas' requests on average, but not for where they went, so every replica piles onto the
host that looked best at its last poll. Sharing loads, each replica tells the others every pick it makes
(host, model, work) as it makes it, and its Envoy's counts after each poll; each replica then

- applies another replica's pick to its in-flight estimates as it arrives, as it does its own;
- keeps, per other replica and host, that replica's last Envoy count and the number of its picks that arrived
  after that count (a replica's messages arrive in the order it sent them, so those are the picks the count
  does not hold): their sum over the other replicas is the host's :attr:`~HostState.peer_count`;
- restarts a host's estimate at each poll of its own Envoy from its own count plus that part
  (:meth:`HostState.envoy_count`), and counts every pick once (:meth:`HostState.scale` is 1) while it hears
  any other replica.

A replica whose Envoy's counts have not come for ``silent_after_s`` is forgotten (its part leaves the counts):
its Envoy stopped or cannot be read (its picks alone would pile up in its part), or the channel broke. With
none left, counts and picks scale by the traffic share again. The channel between
replicas is :mod:`extproc.replicas`; this module is what the messages mean.

**The messages.** A batch of events, each a kind byte and a record: a pick (``p``: the keys of its host and
model, :func:`~extproc.datapath.shared_picks.name_key`, and its work) or a poll (``c``: the number of hosts,
then each host's key and Envoy count, for every host whose count is not 0: each poll tells the whole
count, so that a replica that starts, or whose connection broke, is right from the next one). A batch that
does not parse is dropped whole, and a pick for a host this replica does not know or with impossible work
is skipped: the next poll of each Envoy corrects what a lost message leaves.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from extproc.config import Fleet
from extproc.datapath.datastore import Datastore, HostState
from extproc.datapath.shared_picks import KeyedFleet

__all__ = ["PeerLoad", "PeerLoadError", "silent_after_s"]

_PICK: Final = struct.Struct("<QQd")  # host key, model key (0: none), work
_POLL: Final = struct.Struct("<I")  # hosts named
_COUNT: Final = struct.Struct("<QI")  # host key, Envoy's rq_active
_PICK_KIND: Final = b"p"[0]
_POLL_KIND: Final = b"c"[0]
# A pick's work is in requests of its model's mean size: far above this is no pick a replica made.
_MAX_WORK: Final = 1e6


def silent_after_s(fleet: Fleet) -> float:
    """How long a replica may go unheard before it is forgotten: it tells its counts at every poll of its
    Envoy, at least every ``poll.idle_envoy_admin_ms``, so three of those."""
    return 3 * fleet.picker.poll.idle_envoy_admin_ms / 1000


class PeerLoadError(ValueError):
    """A batch of events that does not parse (dropped whole)."""


class _Peer:
    """One other replica: when its Envoy's counts last came (or it was first heard), and per host key its
    Envoy's last count and its picks since."""

    __slots__ = ("counts", "heard_at", "picks")

    def __init__(self, now: float) -> None:
        self.heard_at = now
        self.counts: dict[int, int] = {}
        self.picks: dict[int, int] = {}


class PeerLoad:
    """One replica's side: what it tells the others (:meth:`picked`, :meth:`polled`, :meth:`take`) and what
    they told it (:meth:`receive`, :meth:`expire`). :attr:`store` may be replaced (a switch of fleet)."""

    def __init__(self, store: Datastore, silent_after_s: float) -> None:
        self.store = store
        self.silent_after_s = silent_after_s
        # Set by the channel: called when the outbox, empty until then, gets an event, to send it soon.
        self.on_ready: Callable[[], None] | None = None
        # Set by a leader (picker.workers > 1): each other replica's pick applied here, by the keys of its host
        # and model, with its work and time, for the workers (extproc.datapath.shared_picks).
        self.on_pick: Callable[[int, int, float, float], None] | None = None
        # Each host's peer_count as of this replica's last Envoy poll (polled()), by name; None before one.
        self.at_poll: dict[str, float | None] | None = None
        self._outbox = bytearray()
        self._peers: dict[bytes, _Peer] = {}
        self._fleet = KeyedFleet()
        # Since the last taken(): the other replicas' picks applied, and those skipped or in dropped batches.
        self._applied = 0
        self._lost = 0

    @property
    def peers(self) -> int:
        """The other replicas heard (and not forgotten)."""
        return len(self._peers)

    def taken(self) -> tuple[int, int]:
        """The other replicas' picks (applied, lost) since the last call."""
        counts = self._applied, self._lost
        self._applied = self._lost = 0
        return counts

    # --- what this replica tells ------------------------------------------------------------------------

    def picked(self, host: HostState, model: str | None, work: float) -> None:
        """This replica sent a request of ``work`` to ``host``."""
        key = self._fleet.key
        model_key = key(model) if model is not None else 0
        self.picked_keys(key(host.name), model_key, work)

    def picked_keys(self, host_key: int, model_key: int, work: float) -> None:
        """:meth:`picked` by the keys of the host and model: one of a leader's workers' picks."""
        self._append(b"p" + _PICK.pack(host_key, model_key, work))

    def polled(self) -> None:
        """This replica's Envoy was just read into :attr:`store`: tell its counts (those not 0), and keep each
        host's :attr:`~HostState.peer_count` at this moment (:attr:`at_poll`), which a leader's workers add
        to this poll's counts."""
        hosts = self.store.hosts.items()
        key = self._fleet.key
        counts = [_COUNT.pack(key(name), host.envoy.active) for name, host in hosts if host.envoy.active]
        self._append(b"c" + _POLL.pack(len(counts)) + b"".join(counts))
        self.at_poll = {name: host.peer_count for name, host in hosts}

    def take(self) -> bytes:
        """The events to send, since the last call."""
        events = bytes(self._outbox)
        self._outbox.clear()
        return events

    def _append(self, event: bytes) -> None:
        ready = not self._outbox
        self._outbox += event
        if ready and self.on_ready is not None:
            self.on_ready()

    # --- what the others tell ---------------------------------------------------------------------------

    def receive(self, peer: bytes, events: bytes, now: float) -> None:
        """Apply a batch of ``peer``'s events (see the module docstring), received at ``now``. Raises
        :class:`PeerLoadError`, having applied nothing, for a batch that does not parse."""
        parsed = _parse(events)
        self._follow()
        state = self._peers.get(peer)
        if state is None:
            state = self._peers[peer] = _Peer(now)
            if len(self._peers) == 1:
                self._recount()
        hosts, models = self._fleet.hosts, self._fleet.models
        for event in parsed:
            if isinstance(event, tuple):
                host_key, model_key, work = event
                host = hosts.get(host_key)
                if host is None or not 0.0 <= work <= _MAX_WORK:
                    self._lost += 1
                    continue
                host.record_pick(now, 1, models.get(model_key), work)
                state.picks[host_key] = state.picks.get(host_key, 0) + 1
                host.peer_count = (host.peer_count or 0.0) + 1.0
                self._applied += 1
                if self.on_pick is not None:
                    self.on_pick(host_key, model_key, work, now)
            else:
                self._count(state, event)
                state.heard_at = now

    def _count(self, state: _Peer, counts: dict[int, int]) -> None:
        """A poll of ``state``'s Envoy, ``counts`` the hosts' not 0: they replace its counts and its picks so
        far (which they hold)."""
        hosts = self._fleet.hosts
        changes: dict[int, int] = {key: -picks for key, picks in state.picks.items()}
        state.picks.clear()
        for key, active in state.counts.items():
            changes[key] = changes.get(key, 0) - active
        for key, active in counts.items():
            changes[key] = changes.get(key, 0) + active
        state.counts = {key: active for key, active in counts.items() if active}
        for key, change in changes.items():
            host = hosts.get(key)
            if change and host is not None and host.peer_count is not None:
                host.peer_count += change

    def expire(self, now: float) -> None:
        """Forget the replicas whose Envoy's counts have not come for ``silent_after_s``."""
        self._follow()
        silent = [peer for peer, state in self._peers.items() if now - state.heard_at > self.silent_after_s]
        if not silent:
            return
        for peer in silent:
            del self._peers[peer]
        self._recount()

    def _follow(self) -> None:
        """Index :attr:`store`'s hosts and models by key; made again (a new datastore, a changed layout), count
        the hosts' parts afresh."""
        if self._fleet.follow(self.store):
            self._recount()

    def _recount(self) -> None:
        """Each host's :attr:`~HostState.peer_count` from the other replicas' parts (None with none heard).
        The scale of the host's counts follows, which prepared plans hold: a change."""
        self.store.changed()
        peers = self._peers.values()
        for key, host in self._fleet.hosts.items():
            if not peers:
                host.peer_count = None
                continue
            total = 0
            for state in peers:
                total += state.counts.get(key, 0) + state.picks.get(key, 0)
            host.peer_count = float(total)


def _parse(events: bytes) -> list[tuple[int, int, float] | dict[int, int]]:
    """The events of a batch, in order: a pick as (host key, model key, work), a poll as its counts by host key."""
    parsed: list[tuple[int, int, float] | dict[int, int]] = []
    i, end = 0, len(events)
    try:
        while i < end:
            kind = events[i]
            i += 1
            if kind == _PICK_KIND:
                host_key, model_key, work = _PICK.unpack_from(events, i)
                parsed.append((host_key, model_key, work))
                i += _PICK.size
            elif kind == _POLL_KIND:
                (n,) = _POLL.unpack_from(events, i)
                i += _POLL.size
                if i + n * _COUNT.size > end:
                    raise PeerLoadError(f"a poll of {n} hosts in {end - i} bytes")
                counts: dict[int, int] = {}
                for _ in range(n):
                    key, active = _COUNT.unpack_from(events, i)
                    counts[key] = active
                    i += _COUNT.size
                parsed.append(counts)
            else:
                raise PeerLoadError(f"an event of kind {kind} at byte {i - 1}")
    except struct.error as exc:
        raise PeerLoadError(f"an event cut short at byte {i}: {exc}") from None
    return parsed
