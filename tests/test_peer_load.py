"""Loads that picker replicas share (``extproc/datapath/peer_load.py``): what one replica's Envoy counts and
what it picks, the others count, once."""

from __future__ import annotations

import random
import struct
from collections import Counter

import pytest

from extproc.datapath.datastore import Datastore
from extproc.datapath.peer_load import PeerLoad, PeerLoadError
from extproc.datapath.scheduling.scheduler import Scheduler
from extproc.datapath.shared_picks import SharedPicks, name_key, rows
from tests.test_scheduler import frozen, http, names
from tests.test_shared_picks import stores

A, B = b"replica-a", b"replica-b"


def loads(n: int) -> tuple[list[Datastore], list[PeerLoad]]:
    """``n`` replicas' datastores (see :func:`tests.test_shared_picks.stores`) and their peer loads."""
    datastores = stores(n)
    return datastores, [PeerLoad(store, silent_after_s=3.0) for store in datastores]


def test_a_pick_counts_once_in_every_other_replica_with_its_model_and_work() -> None:
    (_, b), (load_a, load_b) = loads(2)
    host = b.hosts["g2"]
    host.load.envoy_scale = 2.0  # alone, b scales its own counts and picks by its traffic share
    assert host.peer_count is None and host.scale() == 2.0
    load_a.picked(load_a.store.hosts["g2"], "embed", 3.0)
    load_b.receive(A, load_a.take(), frozen())
    assert load_a.take() == b""  # taken once
    assert (host.estimate, host.work_estimate) == (1.0, 3.0)
    assert host.model_estimates["embed"][0] == 3.0
    # Another replica heard: every host's counts and picks stand for themselves alone.
    assert host.peer_count == 1.0 and host.scale() == 1.0
    assert [b.hosts[h].peer_count for h in ("g1", "g3")] == [0.0, 0.0]
    assert load_b.peers == 1 and load_b.taken() == (1, 0) and load_b.taken() == (0, 0)


def test_a_replicas_count_replaces_its_picks_and_an_own_poll_adds_the_others_part() -> None:
    (a, b), (load_a, load_b) = loads(2)
    for _ in range(3):
        load_a.picked(a.hosts["g1"], None, 1.0)
    load_b.receive(A, load_a.take(), frozen())
    assert b.hosts["g1"].peer_count == 3.0
    # a's Envoy holds 2 of them now (one done): its poll says so, and its picks before are in that count.
    a.hosts["g1"].envoy.active = 2
    load_a.polled()
    load_a.picked(a.hosts["g1"], None, 1.0)  # after the poll: not in its count
    load_b.receive(A, load_a.take(), frozen())
    assert b.hosts["g1"].peer_count == 3.0
    # b polls its own Envoy (1 of its own in flight): the host's count is both Envoys' and a's pick since.
    assert b.hosts["g1"].envoy_count(1) == 4.0
    # Each poll tells the whole count again, which replaces a's picks since the last.
    load_a.polled()
    load_b.receive(A, load_a.take(), frozen())
    assert b.hosts["g1"].peer_count == 2.0
    # A replica that starts now (or whose connection broke) has the whole count from a's next poll.
    (late,) = stores(1)
    load_late = PeerLoad(late, silent_after_s=3.0)
    load_a.polled()
    load_late.receive(A, load_a.take(), frozen())
    assert late.hosts["g1"].peer_count == 2.0
    # A count back to 0 leaves the next poll out: it is 0 then.
    a.hosts["g1"].envoy.active = 0
    load_a.polled()
    load_b.receive(A, load_a.take(), frozen())
    assert b.hosts["g1"].peer_count == 0.0


def test_a_silent_replica_is_forgotten() -> None:
    (a, b), (load_a, load_b) = loads(2)
    b.hosts["g3"].load.envoy_scale = 3.0
    a.hosts["g3"].envoy.active = 4
    load_a.polled()
    load_b.receive(A, load_a.take(), 100.0)
    assert b.hosts["g3"].envoy_count(1) == 5.0
    load_a.picked(a.hosts["g3"], None, 1.0)  # picks alone, its counts stopped: not heard
    load_b.receive(A, load_a.take(), 102.0)
    load_b.expire(102.9)
    assert load_b.peers == 1
    generation = b.generation
    load_b.expire(103.1)
    assert load_b.peers == 0 and b.generation > generation  # prepared plans hold the scale: redone
    assert b.hosts["g3"].peer_count is None and b.hosts["g3"].envoy_count(1) == 3.0


def test_two_replicas_parts_add_up() -> None:
    (a, b, c), (load_a, load_b, load_c) = loads(3)
    a.hosts["g1"].envoy.active, b.hosts["g1"].envoy.active = 2, 5
    load_a.polled()
    load_b.polled()
    load_b.picked(b.hosts["g1"], None, 1.0)
    load_c.receive(A, load_a.take(), frozen())
    load_c.receive(B, load_b.take(), frozen())
    assert c.hosts["g1"].peer_count == 8.0 and load_c.peers == 2


def test_replicas_that_share_loads_spread_a_burst_as_one_picker_does() -> None:
    """Between two Envoy polls, replicas taking turns spread a burst over the hosts; alone, each scales its
    own picks by its traffic share, and they pile onto the hosts that looked best to each."""
    for sharing in (True, False):
        datastores, peer_loads = loads(3)
        for store in datastores:
            for host in store.hosts.values():
                host.load.envoy_scale = 3.0
        # Alike, so that alone they would break their ties alike (as they may, starting from random hosts).
        schedulers = [
            Scheduler(s.fleet, s, rng=random.Random(0), peer_load=p if sharing else None)
            for s, p in zip(datastores, peer_loads, strict=True)
        ]
        firsts: Counter[str] = Counter()
        for i in range(3):
            firsts[names(schedulers[i].decide(http("embed")))[0]] += 1
            events = peer_loads[i].take()
            for j, other in enumerate(peer_loads):
                if j != i and sharing:
                    other.receive(bytes([i]), events, frozen())
        if sharing:
            assert sorted(firsts.values()) == [1, 1, 1], firsts
        else:
            assert max(firsts.values()) > 1, firsts


def test_what_cannot_be_read_is_dropped_or_skipped() -> None:
    (_, b), (_, load_b) = loads(2)
    pick = b"p" + struct.pack("<QQd", name_key("g1"), 0, 1.0)
    for garbage in (b"x", pick[:-1], b"c" + struct.pack("<I", 5) + b"\0" * 12):
        with pytest.raises(PeerLoadError):
            load_b.receive(A, pick + garbage, frozen())
    assert b.hosts["g1"].estimate == 0.0 and load_b.peers == 0  # a batch that does not parse: nothing of it
    unknown = b"p" + struct.pack("<QQd", name_key("nowhere"), 0, 1.0)
    impossible = [b"p" + struct.pack("<QQd", name_key("g1"), 0, w) for w in (float("nan"), -1.0, 1e9)]
    load_b.receive(A, unknown + b"".join(impossible) + pick, frozen())
    assert b.hosts["g1"].estimate == 1.0 and load_b.taken() == (1, 4)


def test_a_new_datastore_counts_the_parts_afresh() -> None:
    """A switch of fleet (a reload, a pool's new hosts) gives the replica new host records: the other
    replicas' parts carry over to them."""
    (a, _), (load_a, load_b) = loads(2)
    a.hosts["g2"].envoy.active = 6
    load_a.polled()
    load_b.receive(A, load_a.take(), frozen())
    (fresh,) = stores(1)
    load_b.store = fresh
    assert fresh.hosts["g2"].peer_count is None
    load_b.expire(frozen())  # as after each poll of its Envoy
    assert fresh.hosts["g2"].peer_count == 6.0


def test_a_leader_passes_the_other_replicas_picks_to_its_workers_and_theirs_to_the_others() -> None:
    """With workers the leader holds the channel (extproc.roles): each pick another replica tells it goes to
    its workers' buffer, by keys, stamped with its arrival; its workers' picks go out by their keys, as its
    own would; each of its polls keeps the other replicas' part of each count for the workers."""
    (a, leader, w0, w1), (load_a, load_leader, _, _) = loads(4)
    n = rows(2, share_load=True)
    buffer = memoryview(bytearray(SharedPicks.size(n)))
    picks_w0, picks_w1, picks_leader = (SharedPicks(buffer, n, row) for row in range(n))
    arrivals: list[tuple[int, int, float, float]] = []

    def on_pick(host_key: int, model_key: int, work: float, at: float) -> None:
        arrivals.append((host_key, model_key, work, at))
        picks_leader.append(host_key, model_key, work, at)

    load_leader.on_pick = on_pick

    for _ in range(2):
        load_a.picked(a.hosts["g1"], "embed", 1.5)
    load_leader.receive(A, load_a.take(), frozen())
    assert arrivals == [(name_key("g1"), name_key("embed"), 1.5, frozen())] * 2
    picks_w0.catch_up(w0, frozen())
    assert (w0.hosts["g1"].estimate, w0.hosts["g1"].work_estimate) == (2.0, 3.0)

    picks_w1.publish(w1.hosts["g2"], None, 1.0, frozen())
    for host_key, model_key, work in picks_leader.take():
        load_leader.picked_keys(host_key, model_key, work)
    load_a.receive(B, load_leader.take(), frozen())
    assert (a.hosts["g2"].estimate, a.hosts["g2"].peer_count) == (1.0, 1.0)

    before_poll = load_leader.at_poll
    assert before_poll is None
    leader.hosts["g1"].envoy.active = 1
    load_leader.polled()
    counts = load_leader.at_poll
    assert counts == {"g1": 2.0, "g2": 0.0, "g3": 0.0, "c1": 0.0}
    w0.set_peer_counts(counts)
    assert w0.hosts["g1"].envoy_count(1) == 3.0 and w0.hosts["g1"].scale() == 1.0
