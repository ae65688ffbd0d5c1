"""Telemetry shared between picker replicas (extproc.replicas), without servers: the frames' authentication,
what a follower keeps of its own, the takeover and the fleet file's ``picker.replicas``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.decision import synthetic_fleet
from benchmarks.ports import free_ports
from extproc.config import ConfigError, Fleet, parse_fleet
from extproc.datapath.datastore import Datastore, EnvoyView, TritonLoad
from extproc.datapath.peer_load import PeerLoad
from extproc.datapath.shared_picks import name_key
from extproc.replicas import (
    HEADER,
    LOADS,
    MAC_BYTES,
    MAGIC,
    MAX_FRAME_AGE_S,
    NONCE_BYTES,
    ORIGIN_BYTES,
    SNAPSHOT,
    FrameError,
    Opener,
    ReplicaFollower,
    ReplicaPublisher,
    Session,
    follow_snapshot,
    read_replica_token,
)
from extproc.sharing import read_snapshot, snapshot
from extproc.telemetry.collector import ENVOY, TelemetryCollector

SECRET = b"s3cret-shared-by-every-replica"
UNPICKLED: list[str] = []


def _record(note: str) -> str:
    UNPICKLED.append(note)
    return note


class _Bomb:
    """A payload whose unpickling is seen: it must never happen for a frame that fails its checks."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_record, ("unpickled",))


BOMB = pickle.dumps(_Bomb())


@pytest.fixture(autouse=True)
def _no_unpickling() -> Any:
    UNPICKLED.clear()
    yield
    UNPICKLED.clear()


def _session(secret: bytes = SECRET) -> Session:
    return Session(secret, b"f" * NONCE_BYTES + b"p" * NONCE_BYTES)


def _frame(session: Session, sequence: int, clock: float, payload: bytes) -> tuple[bytes, bytes]:
    frame = session.seal(sequence, clock, payload)
    return frame[: HEADER.size + MAC_BYTES], frame[HEADER.size + MAC_BYTES :]


def _open(opener: Opener, head: bytes, payload: bytes, now: float) -> Any:
    return pickle.loads(opener.open(head, payload, now))


def test_a_good_frame_opens() -> None:
    opener = Opener(_session(), hello_at=100.0)
    assert _open(opener, *_frame(_session(), 0, 5000.0, pickle.dumps({"a": 1})), now=100.01) == {"a": 1}
    # The publisher's clock maps onto the follower's: its frame 1 s later is 1 s later here.
    assert opener.offset == pytest.approx(100.0 - 5000.0)
    assert _open(opener, *_frame(_session(), 1, 5001.0, pickle.dumps(2)), now=101.02) == 2


def _flip(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


@pytest.mark.parametrize(
    ("secret", "spoil"),
    [
        pytest.param(b"another-secret-of-16-chars", lambda h, p: (h, p), id="wrong-secret"),
        pytest.param(SECRET, lambda h, p: (h, _flip(p)), id="tampered-payload"),
        pytest.param(SECRET, lambda h, p: (_flip(h), p), id="tampered-mac"),
        pytest.param(SECRET, lambda h, p: (h, p + b"x"), id="longer-payload"),
    ],
)
def test_a_frame_that_does_not_verify_is_never_unpickled(secret: bytes, spoil: Any) -> None:
    head, payload = spoil(*_frame(_session(secret), 0, 10.0, BOMB))
    with pytest.raises(FrameError, match="MAC"):
        Opener(_session(), hello_at=10.0).open(head, payload, 10.01)
    assert UNPICKLED == []


def test_a_frame_of_another_connection_is_refused() -> None:
    other = Session(SECRET, b"x" * NONCE_BYTES + b"p" * NONCE_BYTES)
    with pytest.raises(FrameError, match="MAC"):
        Opener(_session(), hello_at=10.0).open(*_frame(other, 0, 10.0, BOMB), 10.01)
    assert UNPICKLED == []


def test_replayed_and_reordered_frames_are_refused() -> None:
    opener = Opener(_session(), hello_at=10.0)
    first = _frame(_session(), 0, 10.0, pickle.dumps(0))
    assert _open(opener, *first, now=10.01) == 0
    with pytest.raises(FrameError, match="replayed"):
        opener.open(*_frame(_session(), 0, 10.05, BOMB), 10.06)
    with pytest.raises(FrameError, match="replayed"):
        opener.open(*_frame(_session(), 2, 10.05, BOMB), 10.06)
    assert UNPICKLED == []


def test_an_old_frame_is_refused() -> None:
    opener = Opener(_session(), hello_at=10.0)
    assert _open(opener, *_frame(_session(), 0, 500.0, pickle.dumps(0)), now=10.01) == 0
    # Sent at the publisher's 501 s (11 s here), received more than MAX_FRAME_AGE_S later.
    with pytest.raises(FrameError, match="old"):
        opener.open(*_frame(_session(), 1, 501.0, BOMB), 11.0 + MAX_FRAME_AGE_S + 0.5)
    assert UNPICKLED == []


def test_a_frame_too_large_is_refused_before_it_is_read() -> None:
    head = HEADER.pack(0, 0.0, 2**31) + b"\0" * MAC_BYTES
    with pytest.raises(FrameError, match="bytes"):
        Opener(_session(), hello_at=0.0).length(head)


# --- applying the publisher's snapshot ---------------------------------------------------------------------


def test_a_follower_keeps_its_envoy_view_drain_and_clock() -> None:
    fleet, publisher = synthetic_fleet(3)
    follower = Datastore(fleet)
    mine = follower.hosts["h1"]
    mine.envoy.active, mine.envoy.ejected, mine.envoy_at, mine.draining = 42, True, 7.0, True
    theirs = publisher.hosts["h1"]
    theirs.metrics_at = 1000.0
    state = read_snapshot(snapshot(publisher, ())).records
    follow_snapshot(follower, state, offset=-900.0, seen={})
    assert (mine.envoy.active, mine.envoy.ejected, mine.envoy_at, mine.draining) == (42, True, 7.0, True)
    assert mine.ready == theirs.ready and mine.known == theirs.known
    assert mine.load.service_ms == theirs.load.service_ms and mine.load.pending == theirs.load.pending
    assert mine.metrics_at == pytest.approx(100.0)  # moved onto the follower's clock
    assert theirs.index_at is not None and mine.index_at == pytest.approx(theirs.index_at - 900.0)
    assert {k: [h.name for h in v] for k, v in follower.serving.items()} == {
        k: [h.name for h in v] for k, v in publisher.serving.items()
    }


# --- over TCP ----------------------------------------------------------------------------------------------


async def _connect(port: int, secret: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Session]:
    """A follower's connection to the publisher on ``port``, the handshake done with ``secret``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ours = os.urandom(NONCE_BYTES)
    writer.write(MAGIC + ours)
    session = Session(secret, ours + await reader.readexactly(NONCE_BYTES))
    writer.write(session.proof())
    return reader, writer, session


async def _handshake(port: int, secret: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer, _ = await _connect(port, secret)
    return reader, writer


async def test_a_follower_without_the_secret_gets_nothing() -> None:
    _, store = synthetic_fleet(2)
    (port,) = free_ports(1)
    publisher = ReplicaPublisher(store, f"127.0.0.1:{port}", SECRET)
    await publisher.start()
    try:
        reader, writer = await _handshake(port, b"not-the-secret-at-all")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing sent
        writer.close()
        reader, writer = await _handshake(port, SECRET)
        head = await asyncio.wait_for(reader.readexactly(HEADER.size + MAC_BYTES), 5)
        assert HEADER.unpack_from(head)[0] == 0
        writer.close()
    finally:
        await publisher.stop()


async def _next_state(reader: asyncio.StreamReader) -> dict[str, tuple[Any, ...]]:
    head = await asyncio.wait_for(reader.readexactly(HEADER.size + MAC_BYTES), 5)
    (_, _, length) = HEADER.unpack_from(head)
    payload = await reader.readexactly(length)
    assert payload[:1] == SNAPSHOT
    return read_snapshot(payload[1:]).records


async def test_a_publisher_sends_every_host_first_then_those_written() -> None:
    """A follower's first snapshot holds every host; later ones only the hosts whose shared fields the
    datastore wrote since the push before (not its Envoy view, which each replica keeps its own)."""
    _, store = synthetic_fleet(3)
    (port,) = free_ports(1)
    publisher = ReplicaPublisher(store, f"127.0.0.1:{port}", SECRET)
    await publisher.start()
    try:
        reader, writer = await _handshake(port, SECRET)
        assert set(await _next_state(reader)) == {"h0", "h1", "h2"}
        await asyncio.sleep(0.3)  # the publisher's first push, with every host, has gone
        while await _next_state(reader):
            pass
        store.set_envoy(store.hosts["h0"], EnvoyView(active=3), store.now())
        store.set_load(store.hosts["h1"], TritonLoad(pending=5), store.now())
        state = await _next_state(reader)
        assert set(state) == {"h1"} and state["h1"][0].pending == 5
        assert await _next_state(reader) == {}  # a heartbeat
        writer.close()
    finally:
        await publisher.stop()


async def test_a_forged_publisher_is_never_unpickled() -> None:
    """A publisher without the secret: its frames are refused unread, and the follower takes over."""
    fleet, _ = synthetic_fleet(2)

    async def forger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await reader.readexactly(len(MAGIC) + NONCE_BYTES)
        writer.write(b"p" * NONCE_BYTES)
        await reader.readexactly(MAC_BYTES)
        session = Session(b"a-guessed-secret-of-some-length", hello[len(MAGIC) :] + b"p" * NONCE_BYTES)
        for sequence in range(20):
            writer.write(session.seal(sequence, 0.0, BOMB))
            await asyncio.sleep(0.02)
        writer.close()

    server = await asyncio.start_server(forger, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    modes: list[bool] = []

    async def on_following(following: bool) -> None:
        modes.append(following)

    follower = ReplicaFollower(Datastore(fleet), f"127.0.0.1:{port}", SECRET, 0.5, on_following)
    task = asyncio.create_task(follower.run())
    try:
        await asyncio.sleep(1.0)
    finally:
        task.cancel()
        server.close()
    assert UNPICKLED == []
    assert modes == [False] and not follower.following


async def test_a_follower_follows_takes_over_and_follows_again() -> None:
    fleet, published = synthetic_fleet(3)
    published.hosts["h0"].load.pending = 17
    published.changed()
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    modes: list[bool] = []

    async def on_following(following: bool) -> None:
        modes.append(following)

    store = Datastore(fleet)
    follower = ReplicaFollower(store, address, SECRET, 0.5, on_following)
    task = asyncio.create_task(follower.run())
    publisher = ReplicaPublisher(published, address, SECRET)
    await publisher.start()
    try:
        await asyncio.wait_for(follower.received.wait(), 5)
        assert follower.following and store.hosts["h0"].load.pending == 17
        await publisher.stop()
        for _ in range(40):
            await asyncio.sleep(0.05)
            if modes:
                break
        assert modes == [False] and not follower.following
        publisher = ReplicaPublisher(published, address, SECRET)
        await publisher.start()
        # Back once the snapshots have come for takeover_after again, not at the first.
        await asyncio.sleep(0.3)
        assert modes == [False]
        for _ in range(40):
            await asyncio.sleep(0.05)
            if len(modes) == 2:
                break
        assert modes == [False, True] and follower.following
    finally:
        task.cancel()
        await publisher.stop()


async def test_a_collector_that_follows_polls_envoy_only() -> None:
    fleet, store = synthetic_fleet(2)
    collector = TelemetryCollector(fleet, store, scraping=False)
    try:
        await collector.refresh_once()
        polled = {name for name, ok in collector.health().items() if ok is not None}
        assert polled == {f"{ENVOY}/envoy"}
        collector.set_scraping(True)
        assert collector.scraping
    finally:
        await collector.aclose()


# --- the fleet file ----------------------------------------------------------------------------------------


def _fleet(tmp_path: Path, **replicas: Any) -> Fleet:
    data = {
        "hosts": [{"name": "a", "address": "10.0.0.1", "tier": "gpu"}],
        "picker": {"replicas": replicas},
    }
    return parse_fleet(data, str(tmp_path / "fleet.yaml"))


@pytest.mark.parametrize(
    ("replicas", "problem"),
    [
        ({"publish": "0.0.0.0:9006", "follow": "leader:9006", "token_file": "t"}, "exclude each other"),
        ({"follow": "leader:9006"}, "need token_file"),
        ({"publish": "9006", "token_file": "t"}, "is not HOST:PORT"),
        ({"follow": "leader:9006", "token_file": "t", "takeover_after_ms": 2500}, "stale"),
        ({"follow": "leader:9006", "token_file": "t", "takeover_after_ms": 100}, "greater than or equal to 500"),
        ({"share_load": True}, "share_load needs publish or follow"),
        ({"follow": "leader:9006", "token_file": "t", "relay_loads": True}, "relay_loads needs publish"),
        (
            {"publish": "0.0.0.0:9006", "token_file": "t", "relay_loads": True, "share_load": True},
            "relay_loads and share_load exclude each other",
        ),
    ],
)
def test_invalid_replicas_settings(tmp_path: Path, replicas: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        _fleet(tmp_path, **replicas)


def test_replicas_with_workers_share_loads_through_the_workers_picks(tmp_path: Path) -> None:
    sharing = {"follow": "leader:9006", "token_file": "t", "share_load": True}
    assert _fleet(tmp_path, **sharing).picker.replicas.share_load
    hosts = [{"name": "a", "address": "10.0.0.1", "tier": "gpu"}]
    data: dict[str, Any] = {"hosts": hosts, "picker": {"replicas": sharing, "workers": 2}}
    assert parse_fleet(data, str(tmp_path / "fleet.yaml")).picker.workers == 2
    data["picker"]["share_worker_picks"] = False
    with pytest.raises(
        ConfigError, match=r"fleet.yaml: .*replicas.share_load with workers: 2 needs share_worker_picks"
    ):
        parse_fleet(data, str(tmp_path / "fleet.yaml"))


def test_no_replicas_no_token(tmp_path: Path) -> None:
    assert read_replica_token(_fleet(tmp_path)) is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "cannot read"), ("", "is empty"), ("short", "16 to 4096"), ("a token with spaces!", "16 to 4096")],
)
def test_a_bad_token_file_refuses_the_start(tmp_path: Path, content: str | None, problem: str) -> None:
    token = tmp_path / "token"
    if content is not None:
        token.write_text(content)
    fleet = _fleet(tmp_path, follow="leader:9006", token_file=str(token))
    with pytest.raises(ConfigError) as info:
        read_replica_token(fleet)
    assert str(info.value).startswith(f"{tmp_path / 'fleet.yaml'}: key picker.replicas.token_file: ")
    assert problem in str(info.value)


def test_a_good_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("x" * 32 + "\n")
    assert read_replica_token(_fleet(tmp_path, publish="127.0.0.1:9006", token_file=str(token))) == b"x" * 32


# --- loads shared between replicas (share_load) ------------------------------------------------------------


async def _until(check: Callable[[], bool]) -> None:
    for _ in range(100):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not within 2 s")


@contextlib.asynccontextmanager
async def _two_followers(
    fleet: Fleet, published: Datastore, ours: PeerLoad | None, relay: bool = False
) -> AsyncIterator[tuple[ReplicaPublisher, list[Datastore], list[PeerLoad]]]:
    """A publisher of ``published`` (sharing loads with ``ours``, or none; relaying them, with ``relay``) and
    two followers that share theirs, all connected and following; their datastores and peer loads."""
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    publisher = ReplicaPublisher(published, address, SECRET, ours, relay)
    await publisher.start()
    stores = [Datastore(fleet) for _ in range(2)]
    theirs = [PeerLoad(store, 3.0) for store in stores]

    async def on_following(_: bool) -> None:
        return None

    followers = [ReplicaFollower(s, address, SECRET, 2.0, on_following, p) for s, p in zip(stores, theirs, strict=True)]
    tasks = [asyncio.create_task(f.run()) for f in followers]
    try:
        await _until(lambda: publisher.followers == 2 and all(f.received.is_set() for f in followers))
        yield publisher, stores, theirs
    finally:
        for task in tasks:
            task.cancel()
        await publisher.stop()


async def test_replicas_tell_each_other_their_picks_and_counts_through_the_publisher() -> None:
    fleet, published = synthetic_fleet(3)
    ours = PeerLoad(published, 3.0)
    async with _two_followers(fleet, published, ours) as (_, stores, theirs):
        # A follower's pick reaches the publisher and, relayed, the other follower; never itself.
        theirs[0].picked(stores[0].hosts["h1"], None, 2.0)
        await _until(lambda: published.hosts["h1"].peer_count == 1.0 and stores[1].hosts["h1"].peer_count == 1.0)
        assert stores[0].hosts["h1"].peer_count is None and stores[1].hosts["h1"].work_estimate >= 2.0
        # The publisher's own pick and its Envoy's counts reach both.
        ours.picked(published.hosts["h2"], None, 1.0)
        for name, active in (("h0", 4), ("h1", 0), ("h2", 0)):
            published.hosts[name].envoy.active = active
        ours.polled()
        await _until(lambda: all(s.hosts["h0"].peer_count == 4.0 and s.hosts["h2"].peer_count == 0.0 for s in stores))
        assert stores[1].hosts["h1"].peer_count == 1.0  # the first follower's part, and the publisher's
        assert [p.peers for p in (ours, *theirs)] == [1, 1, 2]  # the second follower told nothing


async def test_a_frame_sent_back_the_way_it_came_is_refused() -> None:
    """A follower's frames are sealed for their direction: the publisher's own frame, sent back to it as a
    follower's, does not verify, and the connection ends with nothing applied."""
    _, published = synthetic_fleet(2)
    (port,) = free_ports(1)
    publisher = ReplicaPublisher(published, f"127.0.0.1:{port}", SECRET, PeerLoad(published, 3.0))
    await publisher.start()
    try:
        reader, writer, session = await _connect(port, SECRET)
        await _next_state(reader)
        pick = b"p" + struct.pack("<QQd", name_key("h0"), 0, 1.0)
        writer.write(session.seal(0, time.monotonic(), LOADS + b"o" * ORIGIN_BYTES + pick))  # sealed DOWN
        await _until(lambda: publisher.followers == 0)
        assert published.hosts["h0"].peer_count is None
        writer.close()
    finally:
        await publisher.stop()


async def test_a_publisher_that_routes_nothing_relays_its_followers_loads_and_tells_none() -> None:
    """relay_loads: a telemetry publisher of its own (whose Envoy is some follower's) passes each follower's
    picks and counts to the others, and adds none of its own."""
    fleet, published = synthetic_fleet(2)
    published.hosts["h1"].envoy.active = 5  # the Envoy it polls: a follower's, which tells its own counts
    async with _two_followers(fleet, published, None, relay=True) as (_, stores, theirs):
        theirs[0].picked(stores[0].hosts["h1"], None, 1.0)
        stores[0].hosts["h1"].envoy.active = 2
        theirs[0].polled()
        await _until(lambda: theirs[1].peers == 1 and stores[1].hosts["h1"].peer_count == 2.0)
        await asyncio.sleep(0.3)
        assert theirs[1].peers == 1 and stores[1].hosts["h1"].peer_count == 2.0
        assert theirs[0].peers == 0  # its own loads do not come back, and the publisher tells none


async def test_a_publisher_that_shares_no_loads_relays_none() -> None:
    """Replicas must all share their loads or none: followers that do, behind a publisher that does not, hear
    nobody (and scale their own counts by their traffic share, as alone), rather than miss its requests."""
    fleet, published = synthetic_fleet(2)
    async with _two_followers(fleet, published, None) as (publisher, stores, theirs):
        theirs[0].picked(stores[0].hosts["h1"], None, 1.0)
        theirs[0].polled()
        await asyncio.sleep(0.3)
        assert stores[1].hosts["h1"].peer_count is None and theirs[1].peers == 0
        assert publisher.followers == 2  # their loads are read and dropped, not refused
