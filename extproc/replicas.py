"""Telemetry shared between picker replicas (``picker.replicas``): one replica scrapes, the others follow.

Several picker replicas (pods, each an Envoy with its picker, or gateways) that each scraped every Triton
host would multiply the scrape load on every host. So one replica **publishes** (``replicas.publish``): it
scrapes as a lone picker does and pushes its hosts' telemetry, over TCP, to the replicas that **follow** it
(``replicas.follow``): a follower's first snapshot holds every host, each later one the hosts whose
record the publisher's datastore has written since the one before (a scrape, an index read), so that an
idle host costs its followers one record per scrape rather than one per push. A follower keeps polling its
own Envoy (its in-flight counts and ejections are its own) and takes the rest from the snapshots; when none
has come for ``takeover_after_ms`` it scrapes the hosts itself (``telemetry_leader_lost``), and it follows
again once the publisher's snapshots have come without a break for as long again
(``telemetry_leader_back``).

**The channel.** Every replica holds the same secret (``replicas.token_file``). A follower connects and
sends a fresh nonce; the publisher answers with its own; the follower proves that it holds the secret with
an HMAC-SHA256 of both nonces (the publisher sends nothing to a follower that does not). Each snapshot then
travels in a frame: a sequence number, the publisher's clock and the payload's length, then an HMAC-SHA256
of both nonces, that header and the payload. The follower checks the MAC (constant time), that the
sequence number is the next one, and that the frame is at most ``MAX_FRAME_AGE_S`` old, before it reads
anything of the payload: a frame from another connection, replayed, reordered, tampered with or made
without the secret is dropped (and the connection with it) unread. The payload is a pickle
(:func:`extproc.sharing.snapshot`), so the secret is what makes unpickling safe: whoever holds it can make
a follower run code, as whoever can write to a worker's Unix socket can. The channel is not encrypted: the
telemetry (load, models, the publisher's Envoy view) is readable on the network.

**Clocks.** Telemetry timestamps are ``time.monotonic()`` seconds, which differ between machines. A follower
maps the publisher's clock onto its own: at first from its hello (which precedes the first frame, so a
frame's age is never under-estimated), then from whichever frame arrived fastest, allowing for a drift of
``_DRIFT`` between the two clocks. The snapshot's timestamps are moved by that offset; a frame older than
``MAX_FRAME_AGE_S`` by it is refused.

**Loads** (``share_load``, :mod:`extproc.datapath.peer_load`). Each replica that shares them sends its picks
and Envoy counts, once per turn of its event loop, in frames of their own on the same connections: a
follower's go up to the publisher (sealed with another label than the publisher's, so that no frame can be
sent back where it came from), which applies them and relays them, as they are, to the other followers,
and sends its own to all. Their payload is a fixed binary format, never unpickled, and names the replica
that told them (a random id per process). A publisher that shares no loads relays none, unless it only
relays them (``relay_loads``: it routes nothing, and the Envoy it polls is some follower's).

**What a follower keeps of its own.** Envoy's view of each host (``envoy``, ``envoy_at``), the drain flag
(drain and undrain apply per replica) and its gateway's share of each host's traffic (its Envoy's answers
against the completions the publisher saw, see :class:`~extproc.datapath.datastore.TrafficShare`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import os
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from extproc.admin_key import read_secret_file
from extproc.config import Fleet
from extproc.datapath.datastore import TELEMETRY_FIELDS, Datastore, HostState, TrafficShare, TritonLoad
from extproc.datapath.peer_load import PeerLoad, PeerLoadError
from extproc.parts import cancel
from extproc.sharing import PUSH_INTERVAL_S, Snapshot, Written, pack, read_snapshot, snapshot
from extproc.telemetry.triton_metrics import SHARE_FORGET, traffic_share

__all__ = [
    "MAX_FRAME_AGE_S",
    "FrameError",
    "Opener",
    "ReplicaFollower",
    "ReplicaPublisher",
    "Session",
    "follow_snapshot",
    "read_replica_token",
]

log = structlog.get_logger(__name__)

MAGIC: Final = b"EXTPROC-REPLICA/2\n"
NONCE_BYTES: Final = 16
MAC_BYTES: Final = hashlib.sha256().digest_size
# sequence number, the sender's clock (monotonic seconds), the payload's length
HEADER: Final = struct.Struct(">QdI")
# A payload's first byte: a snapshot (the publisher's telemetry), or a replica's loads (share_load: an
# ORIGIN_BYTES id of the replica that told them, then its events, see extproc.datapath.peer_load).
SNAPSHOT: Final = b"S"
LOADS: Final = b"L"
ORIGIN_BYTES: Final = 8
# The MAC's label for each direction, so that no frame can be sent back to where it came from.
DOWN: Final = b"frame"
UP: Final = b"report"
MAX_PAYLOAD: Final = 256 * 1024 * 1024
# A frame older than this (by the follower's mapping of the publisher's clock) is refused.
MAX_FRAME_AGE_S: Final = 5.0
# Without a change of telemetry the publisher still sends a snapshot this often: that it is alive.
HEARTBEAT_S: Final = 0.25
# The handshake's time limit, each side; and how long a follower waits between two connection attempts.
HANDSHAKE_TIMEOUT_S: Final = 5.0
RECONNECT_S: Final = 0.2
# How far the two machines' monotonic clocks may drift apart, per second (0.1 %: far above a real clock's).
_DRIFT: Final = 1e-3
# A follower the publisher cannot write to (its socket buffer this full) is dropped.
_MAX_BUFFERED: Final = 64 * 1024 * 1024
# ...or that takes this long to take in a snapshot (the others wait meanwhile).
_DRAIN_TIMEOUT_S: Final = 1.0


class FrameError(Exception):
    """A frame that a follower refuses (unread)."""


def read_replica_token(fleet: Fleet) -> bytes | None:
    """The secret ``picker.replicas.token_file`` holds, or None where the fleet shares no telemetry. Raises
    :class:`~extproc.config.ConfigError` naming the file, the key and the problem."""
    name = fleet.picker.replicas.token_file
    if name is None or not fleet.picker.replicas.enabled:
        return None
    return read_secret_file(Path(name), f"{fleet.source}: key picker.replicas.token_file", "token").encode()


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


@dataclass(frozen=True)
class Session:
    """One connection's keys: the shared secret and both ends' nonces (follower's first)."""

    secret: bytes
    nonces: bytes

    def proof(self) -> bytes:
        """What the follower sends to show it holds the secret."""
        return _mac(self.secret, b"follower", self.nonces)

    def proves(self, proof: bytes) -> bool:
        return hmac.compare_digest(proof, self.proof())

    def seal(self, sequence: int, clock: float, payload: bytes, label: bytes = DOWN) -> bytes:
        """A frame: header, MAC, payload. ``label``: its direction (the publisher's :data:`DOWN`, a
        follower's :data:`UP`)."""
        header = HEADER.pack(sequence, clock, len(payload))
        return header + _mac(self.secret, label, self.nonces, header, payload) + payload


class Opener:
    """The receiving side of one connection, one direction (``label``, see :meth:`Session.seal`): checks each
    frame before handing its payload out. ``hello_at``: when (by the receiver's clock) it sent its nonce."""

    def __init__(self, session: Session, hello_at: float, label: bytes = DOWN) -> None:
        self._session = session
        self._hello_at = hello_at
        self._label = label
        self._next = 0
        # Receiver's clock minus the sender's; None until the first frame.
        self.offset: float | None = None
        self._offset_at = hello_at

    def length(self, head: bytes) -> int:
        """The payload length a frame's header announces (checked for size only: the MAC comes later)."""
        (_, _, length) = HEADER.unpack_from(head)
        if length > MAX_PAYLOAD:
            raise FrameError(f"a frame of {length} bytes")
        return int(length)

    def open(self, head: bytes, payload: bytes, now: float) -> bytes:
        """The payload of a frame (``head``: its header and MAC) received at ``now``; raises
        :class:`FrameError` for a frame to refuse, having read nothing of the payload."""
        header, mac = head[: HEADER.size], head[HEADER.size :]
        expected = _mac(self._session.secret, self._label, self._session.nonces, header, payload)
        if not hmac.compare_digest(mac, expected):
            raise FrameError("a frame whose MAC does not verify (another secret, or tampered with)")
        sequence, clock, _ = HEADER.unpack(header)
        if sequence != self._next:
            raise FrameError(f"frame {sequence} where {self._next} was due (replayed or reordered)")
        if self.offset is None:
            offset = self._hello_at - clock
        else:
            offset = min(self.offset + (now - self._offset_at) * _DRIFT, now - clock)
        age = now - clock - offset
        if age > MAX_FRAME_AGE_S:
            raise FrameError(f"a frame {age:.1f} s old")
        self._next += 1
        self.offset, self._offset_at = offset, now
        return payload


# --- applying a snapshot -----------------------------------------------------------------------------------

# The fields of a host's record that stay the follower's own, and those that are timestamps to move onto its
# clock (every other ``*_at``).
_OWN_FIELDS: Final = ("envoy", "envoy_at", "draining")
# The positions of the others in a record: what the publisher compares to tell a written record.
_SHARED: Final = tuple(i for i, key in enumerate(TELEMETRY_FIELDS) if key not in _OWN_FIELDS)


@dataclass
class _Seen:
    """The publisher's last record of a host, as far as the follower's traffic share needs it."""

    metrics_at: float | None
    share: TrafficShare


def follow_snapshot(
    datastore: Datastore, state: dict[str, tuple[Any, ...]], offset: float, seen: dict[str, _Seen]
) -> None:
    """Apply a publisher's ``state`` (see :func:`extproc.sharing.snapshot`) to a follower's datastore: its
    own Envoy view, drain flag and traffic share kept, the timestamps moved by ``offset`` (follower's clock
    minus the publisher's). ``seen``: what the previous snapshots said, by host (updated)."""
    records: dict[str, tuple[Any, ...]] = {}
    for name, record in state.items():
        host = datastore.hosts.get(name)
        if host is None:  # a host this replica's fleet does not have (yet)
            continue
        values = dict(zip(TELEMETRY_FIELDS, record, strict=True))
        metrics_at = values["metrics_at"]  # on the publisher's clock: it only tells scrapes apart
        for key in _OWN_FIELDS:
            if key in values:
                values[key] = getattr(host, key)
        for key, value in values.items():
            if key.endswith("_at") and key not in _OWN_FIELDS and value is not None:
                values[key] = value + offset
        values["load"] = _own_share(datastore, host, values["load"], metrics_at, seen)
        records[name] = tuple(values[key] for key in TELEMETRY_FIELDS)
    datastore.set_records(records)


def _own_share(
    datastore: Datastore, host: HostState, load: TritonLoad, metrics_at: float | None, seen: dict[str, _Seen]
) -> TritonLoad:
    """The publisher's load with this gateway's traffic share instead of the publisher's. At each new scrape
    the requests Triton completed in the interval are what the publisher's share added to its weighted sum
    of completions; a scrape the follower did not see (or a share that restarted) starts its count again."""
    own, scale = host.load.share, host.load.envoy_scale
    last = seen.get(host.name)
    if last is None or metrics_at != last.metrics_at:
        now = datastore.now()
        envoy_fresh = host.envoy_at is not None and now - host.envoy_at <= datastore.stale_after_s
        answered = host.envoy.answered() if envoy_fresh else None
        theirs = load.share
        one_more = last is not None and abs(theirs.intervals - (SHARE_FORGET * last.share.intervals + 1.0)) < 1e-9
        if one_more and answered is not None:
            assert last is not None
            own, scale = traffic_share(own, answered, theirs.done - SHARE_FORGET * last.share.done)
        elif answered is not None:  # count Envoy's answers from here
            own = TrafficShare(answered, own.answered, own.done, own.intervals)
        seen[host.name] = _Seen(metrics_at, theirs)
    return dataclasses.replace(load, share=own, envoy_scale=scale)


# --- the publisher -----------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Follower:
    writer: asyncio.StreamWriter
    session: Session
    peer: str
    sequence: int = 0


def _loads(payload: bytes) -> tuple[bytes, bytes] | None:
    """A :data:`LOADS` payload's (origin, events), or None for any other payload."""
    if len(payload) < 1 + ORIGIN_BYTES or payload[:1] != LOADS:
        return None
    return payload[1 : 1 + ORIGIN_BYTES], payload[1 + ORIGIN_BYTES :]


class _Telling:
    """A replica's side of ``share_load``: its :class:`PeerLoad` (None: it shares no loads), its id, and the
    events sent once per turn of the event loop, with whatever else that turn told."""

    def __init__(self, peer_load: PeerLoad | None, send: Callable[[bytes], None]) -> None:
        self.peer_load = peer_load
        self.origin = os.urandom(ORIGIN_BYTES)
        self._send = send
        self._due = False
        self._problem: str | None = None  # the last batch refused, logged once
        if peer_load is not None:
            peer_load.on_ready = self._soon

    def _soon(self) -> None:
        if not self._due:
            self._due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._due = False
        if self.peer_load is not None:
            events = self.peer_load.take()
            if events:
                self._send(LOADS + self.origin + events)

    def heard(self, origin: bytes, events: bytes, peer: str) -> None:
        """Another replica's events, received (from ``peer``)."""
        if self.peer_load is None or origin == self.origin:
            return
        try:
            self.peer_load.receive(origin, events, self.peer_load.store.now())
        except PeerLoadError as exc:
            if str(exc) != self._problem:
                self._problem = str(exc)
                log.warning("replica_loads_refused", peer=peer, problem=str(exc))


class ReplicaPublisher:
    """The publishing replica's side: authenticates followers and pushes snapshots to all of them; with
    ``peer_load`` (``share_load``), tells them its loads and relays each follower's to the others; with
    ``relay`` (``relay_loads``), only relays."""

    def __init__(
        self,
        datastore: Datastore,
        address: str,
        secret: bytes,
        peer_load: PeerLoad | None = None,
        relay: bool = False,
    ) -> None:
        self.datastore = datastore
        self._relays = relay or peer_load is not None
        host, _, port = address.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        self._secret = secret
        self._followers: set[_Follower] = set()
        # Each host's record as the last push read it: the next push sends the hosts written since.
        self._written = Written(_SHARED)
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._telling = _Telling(peer_load, self._relay)

    @property
    def followers(self) -> int:
        return len(self._followers)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._host, self._port)
        self._task = asyncio.create_task(self._push_forever(), name="replica-publisher")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername"))
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                hello = await reader.readexactly(len(MAGIC) + NONCE_BYTES)
                if not hello.startswith(MAGIC):
                    raise FrameError("not a picker replica")
                ours = os.urandom(NONCE_BYTES)
                writer.write(ours)
                hello_at = loop.time()
                await writer.drain()
                session = Session(self._secret, hello[len(MAGIC) :] + ours)
                if not session.proves(await reader.readexactly(MAC_BYTES)):
                    raise FrameError("its proof of the secret does not verify (another token_file?)")
        except (OSError, TimeoutError, asyncio.IncompleteReadError, FrameError) as exc:
            log.warning("telemetry_follower_refused", peer=peer, reason=str(exc) or type(exc).__name__)
            writer.close()
            return
        follower = _Follower(writer, session, peer)
        self._followers.add(follower)
        log.info("telemetry_follower_joined", peer=peer, followers=len(self._followers))
        await self._push(follower, SNAPSHOT + snapshot(self.datastore, ()))
        await self._hear(follower, reader, Opener(session, hello_at, UP))

    async def _hear(self, follower: _Follower, reader: asyncio.StreamReader, opener: Opener) -> None:
        """A follower's loads, until its connection ends: relayed to the other followers if this replica shares
        loads or relays them, and applied here if it shares them (else the followers that share hear none,
        and scale their own as alone)."""
        loop = asyncio.get_running_loop()
        try:
            while follower in self._followers:
                head = await reader.readexactly(HEADER.size + MAC_BYTES)
                payload = opener.open(head, await reader.readexactly(opener.length(head)), loop.time())
                loads = _loads(payload)
                if loads is None:
                    raise FrameError("a follower's frame that holds no loads")
                if self._relays:
                    self._relay(payload, follower)
                    self._telling.heard(*loads, follower.peer)
        except (OSError, asyncio.IncompleteReadError, FrameError) as exc:
            self._drop(follower, str(exc) or type(exc).__name__)

    def _relay(self, payload: bytes, source: _Follower | None = None) -> None:
        """Send ``payload`` to every follower but ``source``, without waiting: one that cannot take it in is
        dropped."""
        now = time.monotonic()
        for follower in list(self._followers):
            if follower is source:
                continue
            try:
                if follower.writer.transport.get_write_buffer_size() > _MAX_BUFFERED:
                    raise ConnectionError("it reads too slowly")
                follower.writer.write(follower.session.seal(follower.sequence, now, payload))
                follower.sequence += 1
            except (ConnectionError, RuntimeError) as exc:
                self._drop(follower, str(exc) or type(exc).__name__)

    def _drop(self, follower: _Follower, reason: str) -> None:
        if follower in self._followers:
            self._followers.discard(follower)
            log.info("telemetry_follower_left", peer=follower.peer, reason=reason)
        follower.writer.close()

    async def _push(self, follower: _Follower, payload: bytes) -> None:
        writer = follower.writer
        try:
            if writer.transport.get_write_buffer_size() > _MAX_BUFFERED:
                raise ConnectionError("it reads too slowly")
            writer.write(follower.session.seal(follower.sequence, time.monotonic(), payload))
            follower.sequence += 1
            async with asyncio.timeout(_DRAIN_TIMEOUT_S):
                await writer.drain()
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            self._drop(follower, str(exc) or type(exc).__name__)

    async def _push_forever(self) -> None:
        generation, sent_at = -1, 0.0
        while True:
            await asyncio.sleep(PUSH_INTERVAL_S)
            now = time.monotonic()
            if not self._followers or (self.datastore.generation == generation and now - sent_at < HEARTBEAT_S):
                continue
            generation, sent_at = self.datastore.generation, now
            payload = SNAPSHOT + pack(Snapshot(self._written.take(self.datastore)))
            await asyncio.gather(*(self._push(f, payload) for f in list(self._followers)))

    async def stop(self) -> None:
        await cancel(self._task)
        for follower in self._followers:
            follower.writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# --- the follower ------------------------------------------------------------------------------------------


class ReplicaFollower:
    """A following replica's side: keeps its datastore on the publisher's telemetry while that comes, and
    says when to scrape the hosts itself instead (``on_following(False)``) and when to follow again
    (``on_following(True)``); with ``peer_load`` (``share_load``), tells the publisher its loads and hears
    the other replicas'. :attr:`datastore` may be replaced (a switch of fleet)."""

    def __init__(
        self,
        datastore: Datastore,
        address: str,
        secret: bytes,
        takeover_after_s: float,
        on_following: Callable[[bool], Awaitable[None]],
        peer_load: PeerLoad | None = None,
    ) -> None:
        self.datastore = datastore
        self.address = address
        host, _, port = address.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        self._secret = secret
        self._takeover_after_s = takeover_after_s
        self._on_following = on_following
        self.following = True
        self.received = asyncio.Event()  # a first valid snapshot
        self._last_frame_at: float | None = None  # the last valid frame
        self._streak_since: float | None = None  # the first valid frame of an unbroken run of them
        self._seen: dict[str, _Seen] = {}
        self._problem: str | None = None  # the last connection problem logged
        # The connection's writer, session and next sequence number for this replica's loads (None: not
        # connected; they are dropped meanwhile, and the others forget this replica's part).
        self._up: tuple[asyncio.StreamWriter, Session] | None = None
        self._up_sequence = 0
        self._telling = _Telling(peer_load, self._tell)

    async def run(self) -> None:
        """Follow (reconnecting) and watch for silence, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._connect_forever(), name="replica-follower")
            group.create_task(self._watch(), name="replica-watch")

    async def _connect_forever(self) -> None:
        while True:
            try:
                await self._follow_once()
            except (OSError, TimeoutError, asyncio.IncompleteReadError, FrameError) as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if problem != self._problem:
                    log.warning("telemetry_leader_unreachable", leader=self.address, problem=problem)
                    self._problem = problem
            self._streak_since = None
            await asyncio.sleep(RECONNECT_S)

    async def _follow_once(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(self._host, self._port)
        try:
            ours = os.urandom(NONCE_BYTES)
            hello_at = loop.time()
            writer.write(MAGIC + ours)
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                theirs = await reader.readexactly(NONCE_BYTES)
            session = Session(self._secret, ours + theirs)
            writer.write(session.proof())
            self._up, self._up_sequence = (writer, session), 0
            opener = Opener(session, hello_at)
            # A publisher that sends nothing for this long is gone, even if its connection stays open.
            silence_s = max(self._takeover_after_s, 2 * HEARTBEAT_S)
            while True:
                async with asyncio.timeout(silence_s):
                    head = await reader.readexactly(HEADER.size + MAC_BYTES)
                    payload = await reader.readexactly(opener.length(head))
                verified = opener.open(head, payload, loop.time())
                loads = _loads(verified)
                if loads is not None:
                    self._telling.heard(*loads, self.address)
                    continue
                if verified[:1] != SNAPSHOT:
                    raise FrameError("a frame that holds neither a snapshot nor loads")
                assert opener.offset is not None
                await self._frame(read_snapshot(verified[1:]).records, opener.offset, loop.time())
        finally:
            self._up = None
            writer.close()

    def _tell(self, payload: bytes) -> None:
        if self._up is None:
            return
        writer, session = self._up
        if writer.transport.get_write_buffer_size() > _MAX_BUFFERED:
            return  # the publisher reads too slowly: its silence will end the connection
        writer.write(session.seal(self._up_sequence, time.monotonic(), payload, UP))
        self._up_sequence += 1

    async def _frame(self, state: dict[str, tuple[Any, ...]], offset: float, now: float) -> None:
        if self._problem is not None:
            log.info("telemetry_leader_reachable", leader=self.address)
            self._problem = None
        self._last_frame_at = now
        if self._streak_since is None:
            self._streak_since = now
        if not self.following and now - self._streak_since >= self._takeover_after_s:
            self.following = True
            log.warning("telemetry_leader_back", leader=self.address, note="following its telemetry again")
            await self._on_following(True)
        if self.following:
            follow_snapshot(self.datastore, state, offset, self._seen)
            if not self.received.is_set():
                log.info("telemetry_following", leader=self.address)
                self.received.set()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            await asyncio.sleep(min(0.1, self._takeover_after_s / 10))
            now = loop.time()
            last = self._last_frame_at if self._last_frame_at is not None else started
            if now - last < self._takeover_after_s:
                continue
            self._streak_since = None
            if self.following:
                self.following = False
                log.warning(
                    "telemetry_leader_lost",
                    leader=self.address,
                    silent_s=round(now - last, 3),
                    note="scraping the hosts itself until the leader's snapshots resume",
                )
                self.received.set()  # whoever waits for telemetry: it comes from this replica's scrapes now
                await self._on_following(False)
