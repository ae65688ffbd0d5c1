"""The leader's telemetry snapshots for its workers (extproc.sharing), without processes: what the leader
has is what a worker gets, and a later snapshot carries only what changed."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from pathlib import Path

import pytest

from benchmarks.decision import synthetic_fleet
from extproc import sharing
from extproc.config import HostSpec
from extproc.datapath.batch_cost import BatchCost, Batching, LineFit
from extproc.datapath.datastore import Datastore, ModelTimes
from extproc.datapath.peer_load import PeerLoad
from extproc.datapath.shared_picks import SharedPicks
from extproc.sharing import (
    FRAME_RECORDS,
    Publisher,
    Snapshot,
    Subscriber,
    apply_snapshot,
    read_snapshot,
    snapshot,
)


def test_a_snapshot_carries_every_kind_of_telemetry() -> None:
    fleet, leader = synthetic_fleet(3)
    host = leader.hosts["h1"]
    fit = LineFit(2.0, 3.0, 5.0, 7.0, 11.0)
    host.load.models["mlp"] = ModelTimes(1.5, 4.0, 0.8, fit, BatchCost(0.3, 0.1))
    host.batching = {"mlp": Batching(8, 2)}
    host.envoy.ejected, host.draining = True, True
    worker = Datastore(fleet)

    shared = read_snapshot(snapshot(leader, ()))
    apply_snapshot(worker, shared)

    assert shared.discovered == ()
    for name, sent in leader.hosts.items():
        got = worker.hosts[name]
        assert (got.load, got.envoy, got.batching, got.draining) == (
            sent.load,
            sent.envoy,
            sent.batching,
            sent.draining,
        )
        assert (got.ready, got.known) == (sent.ready, sent.known)
        assert (got.metrics_at, got.index_at, got.envoy_at) == (sent.metrics_at, sent.index_at, sent.envoy_at)
    assert worker.hosts["h1"].load.models["mlp"].fit == fit
    assert {k: [h.name for h in v] for k, v in worker.serving.items()} == {
        k: [h.name for h in v] for k, v in leader.serving.items()
    }


async def _next(reader: asyncio.StreamReader) -> Snapshot:
    """One snapshot, from its frames."""
    merged = Snapshot({}, complete=False)
    while not merged.complete:
        (length,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), 5))
        frame = read_snapshot(await reader.readexactly(length))
        assert len(frame.records) <= FRAME_RECORDS
        merged.records |= frame.records
        merged.discovered = merged.discovered if frame.discovered is None else frame.discovered
        merged.envoy_at, merged.envoy_lagging, merged.complete = frame.envoy_at, frame.envoy_lagging, frame.complete
        merged.peer_counts = merged.peer_counts if frame.peer_counts is None else frame.peer_counts
    return merged


async def test_a_worker_gets_every_host_first_then_those_written_and_envoys_time(tmp_path: Path) -> None:
    """A large fleet's snapshot costs a worker the hosts that changed: an Envoy poll that finds a host as
    it was leaves its record out, and the poll's time alone restarts that host's in-flight estimate."""
    fleet, leader = synthetic_fleet(100)
    worker = Datastore(fleet)
    publisher = Publisher(leader, tmp_path / "share.sock", ())
    await publisher.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "share.sock"))
        first = await _next(reader)
        assert set(first.records) == set(leader.hosts) and first.discovered == ()
        apply_snapshot(worker, first)
        await asyncio.sleep(0.2)  # the pushes of what the publisher had before, if any, have gone

        picked = worker.hosts["h7"]
        picked.record_pick(worker.now(), weight=3)
        assert picked.in_flight(worker.now()) > picked.envoy_count(picked.envoy.active)
        polled_at = leader.now()
        for host in leader.hosts.values():  # as Envoy's poll writes it: h5 has one more in flight
            active = host.envoy.active + (host.name == "h5")
            leader.set_envoy(host, dataclasses.replace(host.envoy, active=active), polled_at)
        while (later := await _next(reader)).envoy_at != polled_at:
            pass
        assert set(later.records) == {"h5"} and later.discovered is None and later.envoy_lagging == {}

        apply_snapshot(worker, later)
        assert worker.hosts["h5"].envoy.active == leader.hosts["h5"].envoy.active
        assert all(host.envoy_at == polled_at for host in worker.hosts.values())
        assert picked.estimate == picked.envoy_count(picked.envoy.active) and picked.picks_since_poll == 0
        writer.close()
    finally:
        await publisher.stop()


async def test_an_envoy_poll_goes_to_the_workers_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The leader pushes Envoy's counts when they land, not at its next interval (here an hour away), and the
    worker learns which hosts' estimates restarted from them."""
    monkeypatch.setattr(sharing, "PUSH_INTERVAL_S", 3600.0)
    fleet, leader = synthetic_fleet(3)
    worker = Datastore(fleet)
    polled = asyncio.Event()
    publisher = Publisher(leader, tmp_path / "share.sock", (), polled)
    await publisher.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "share.sock"))
        apply_snapshot(worker, await _next(reader))
        polled_at = leader.now()
        for host in leader.hosts.values():
            active = host.envoy.active + (host.name == "h1")
            leader.set_envoy(host, dataclasses.replace(host.envoy, active=active), polled_at)
        polled.set()
        later = await asyncio.wait_for(_next(reader), 30)
        assert later.envoy_at == polled_at
        restarted = apply_snapshot(worker, later)
        assert sorted(h.name for h in restarted) == sorted(worker.hosts)
        writer.close()
    finally:
        await publisher.stop()


def test_an_envoy_view_equal_to_the_last_keeps_its_object_and_the_layout() -> None:
    _, store = synthetic_fleet(2)
    host = store.hosts["h1"]
    view, layout, generation = host.envoy, store.layout, store.generation
    store.set_envoy(host, dataclasses.replace(view), store.now())
    assert host.envoy is view and store.layout == layout and store.generation > generation
    store.set_envoy(host, dataclasses.replace(view, active=view.active + 1), store.now())
    assert host.envoy is not view and store.layout == layout
    store.set_envoy(host, dataclasses.replace(view, ejected=True), store.now())
    assert store.layout > layout, "an ejection changes which hosts may be candidates"


async def test_a_worker_is_told_it_has_telemetry_once_it_has_every_host(tmp_path: Path) -> None:
    """A worker starts serving once its subscriber has received a snapshot: every frame of it, not the
    first alone (a model on a host of a later frame would look unknown, 404)."""
    fleet, leader = synthetic_fleet(5 * FRAME_RECORDS)
    path = tmp_path / "share.sock"
    publisher = Publisher(leader, path, ())
    await publisher.start()
    worker = Datastore(fleet)
    seen: list[int] = []

    async def on_hosts(_: tuple[HostSpec, ...]) -> None:
        pass

    subscriber = Subscriber(worker, path, on_hosts)
    task = asyncio.create_task(subscriber.run())
    try:
        while not subscriber.received.is_set():
            seen.append(sum(h.metrics_at is not None for h in worker.hosts.values()))
            await asyncio.sleep(0)
        assert all(h.metrics_at is not None for h in worker.hosts.values())
        assert any(0 < n < len(worker.hosts) for n in seen), "applied frame by frame, with requests between"
    finally:
        task.cancel()
        await publisher.stop()


async def test_an_envoy_polls_snapshot_carries_the_other_replicas_counts_at_that_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """picker.replicas.share_load with workers: the leader hears the other replicas; each of its Envoy polls
    goes to the workers with the others' part of each host's count at that poll, which their estimates
    restart from with the poll's count, unscaled; once no other replica is heard, the scale is back."""
    monkeypatch.setattr(sharing, "PUSH_INTERVAL_S", 3600.0)
    fleet, leader = synthetic_fleet(3)
    _, other = synthetic_fleet(3)
    worker = Datastore(fleet)
    peer_load, other_load = PeerLoad(leader, silent_after_s=3.0), PeerLoad(other, silent_after_s=3.0)
    polled = asyncio.Event()
    publisher = Publisher(leader, tmp_path / "share.sock", (), polled, peer_load)
    await publisher.start()

    async def poll(active: dict[str, int]) -> Snapshot:
        polled_at = leader.now()
        for host in leader.hosts.values():
            leader.set_envoy(host, dataclasses.replace(host.envoy, active=active.get(host.name, 0)), polled_at)
        peer_load.polled()
        polled.set()
        while (later := await asyncio.wait_for(_next(reader), 30)).envoy_at != polled_at:
            pass
        return later

    leader.hosts["h1"].load.envoy_scale = 2.0  # the traffic share, which another replica heard replaces
    try:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "share.sock"))
        first = await _next(reader)
        assert first.peer_counts is None  # no poll of the leader's yet
        apply_snapshot(worker, first)
        for _ in range(2):
            other_load.picked(other.hosts["h1"], None, 1.0)
        peer_load.receive(b"other", other_load.take(), leader.now())
        host = worker.hosts["h1"]

        later = await poll({"h1": 1})
        assert later.peer_counts == {"h0": 0.0, "h1": 2.0, "h2": 0.0}
        apply_snapshot(worker, later)
        assert (host.peer_count, host.estimate, host.scale()) == (2.0, 3.0, 1.0)

        peer_load.expire(leader.now() + 10.0)  # the other replica went silent
        apply_snapshot(worker, await poll({"h1": 1}))
        assert (host.peer_count, host.estimate, host.scale()) == (None, 2.0, 2.0)
        writer.close()
    finally:
        await publisher.stop()


async def test_a_worker_catches_up_on_the_others_picks_before_a_count_restarts_its_estimate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A count of one request in flight is sized by the host's last pick: here another worker's (1 row),
    made before the leader's poll, which this worker had not caught up on, not its own older one (8 rows)."""
    monkeypatch.setattr(sharing, "PUSH_INTERVAL_S", 3600.0)
    fleet, leader = synthetic_fleet(3)
    worker = Datastore(fleet)
    buffer = memoryview(bytearray(SharedPicks.size(2)))
    own, other = SharedPicks(buffer, 2, 0), SharedPicks(buffer, 2, 1)
    polled = asyncio.Event()
    publisher = Publisher(leader, tmp_path / "share.sock", (), polled)
    await publisher.start()

    async def on_hosts(_: tuple[HostSpec, ...]) -> None:
        pass

    subscriber = Subscriber(worker, tmp_path / "share.sock", on_hosts, own)
    task = asyncio.create_task(subscriber.run())
    try:
        await asyncio.wait_for(subscriber.received.wait(), 30)
        host = worker.hosts["h1"]
        host.record_pick(worker.now(), 1, None, 8.0)  # this worker's own, which has finished since
        own.publish(host, None, 8.0, worker.now())
        other.publish(leader.hosts["h1"], None, 1.0, worker.now())
        polled_at = leader.now()
        for state in leader.hosts.values():
            leader.set_envoy(state, dataclasses.replace(state.envoy, active=int(state.name == "h1")), polled_at)
        polled.set()
        for _ in range(3000):  # the snapshot of the poll, within 30 s
            if host.envoy_at == polled_at:
                break
            await asyncio.sleep(0.01)
        assert (host.estimate, host.work_estimate) == (1.0, 1.0)
    finally:
        task.cancel()
        await publisher.stop()
