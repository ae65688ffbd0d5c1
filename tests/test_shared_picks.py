"""Workers' shared picks (``extproc/datapath/shared_picks.py``): what one worker picks, the others count."""

from __future__ import annotations

import multiprocessing
import random
import struct
from collections import Counter
from pathlib import Path

import pytest

from extproc.config import Fleet
from extproc.datapath.datastore import Datastore
from extproc.datapath.scheduling.scheduler import Scheduler
from extproc.datapath.shared_picks import (
    LEADER_IDLE_AFTER_S,
    LEADER_IDLE_READ_S,
    LEADER_READ_S,
    SLOTS,
    RelayReads,
    SharedPicks,
    name_key,
    next_read_s,
    rows,
)
from extproc.roles import Worker, make_worker_picks, worker_picks_path
from tests.test_scheduler import fleet, frozen, http, live, names

POLLED = frozen() - 0.01  # Envoy's last poll: picks since are not in its count


def stores(n: int, base: Fleet | None = None) -> list[Datastore]:
    """``n`` workers' datastores over the same three idle GPU hosts serving ``embed``, Envoy's count of each
    read at POLLED."""
    out = []
    for _ in range(n):
        store = Datastore(base or fleet(), clock=frozen)
        live(store, {"g1": ["embed"], "g2": ["embed"], "g3": ["embed"]})
        for host in store.hosts.values():
            host.envoy_at = POLLED
        out.append(store)
    return out


def shared(n: int) -> list[SharedPicks]:
    buffer = memoryview(bytearray(SharedPicks.size(n)))
    return [SharedPicks(buffer, n, row) for row in range(n)]


def test_a_pick_counts_once_in_every_other_worker_with_its_model_and_work() -> None:
    a, b = stores(2)
    picks_a, picks_b = shared(2)
    picks_a.publish(a.hosts["g2"], "embed", 3.0, frozen())
    picks_b.catch_up(b, frozen())
    picks_b.catch_up(b, frozen())  # nothing new: nothing applied twice
    host = b.hosts["g2"]
    assert (host.estimate, host.work_estimate) == (1.0, 3.0)
    assert host.model_estimates["embed"][0] == 3.0
    assert all(b.hosts[h].estimate == 0.0 for h in ("g1", "g3"))
    picks_a.catch_up(a, frozen())  # a worker's own picks are not in what it catches up on
    assert a.hosts["g2"].estimate == 0.0
    assert picks_b.taken() == (1, 0) and picks_b.taken() == (0, 0)


def test_the_leader_reads_its_workers_picks_once_and_writes_the_other_replicas_for_them() -> None:
    """picker.replicas.share_load with workers: one more row, the leader's, which the workers read as another
    worker's; the leader reads theirs (never its own) to tell the other replicas."""
    a, b = stores(2)
    n = rows(2, share_load=True)
    assert (n, rows(2, share_load=False)) == (3, 2)
    buffer = memoryview(bytearray(SharedPicks.size(n)))
    worker_a, worker_b, leader = (SharedPicks(buffer, n, row) for row in range(n))
    worker_a.publish(a.hosts["g1"], "embed", 2.0, frozen())
    worker_b.publish(b.hosts["g2"], None, 1.0, frozen())
    assert leader.take() == [(name_key("g1"), name_key("embed"), 2.0), (name_key("g2"), 0, 1.0)]
    assert leader.take() == []
    leader.append(name_key("g3"), name_key("embed"), 4.0, frozen())  # another replica's, as it arrived
    assert leader.take() == []
    worker_a.catch_up(a, frozen())
    assert (a.hosts["g3"].estimate, a.hosts["g3"].work_estimate) == (1.0, 4.0)
    assert a.hosts["g3"].model_estimates["embed"][0] == 4.0
    assert a.hosts["g2"].estimate == 1.0 and a.hosts["g1"].estimate == 0.0
    worker_b.publish(b.hosts["g1"], None, float("nan"), frozen())
    assert leader.take() == [] and leader.taken() == (0, 1)


def test_the_leader_reads_often_while_the_workers_pick_and_backs_off_once_they_stop() -> None:
    assert next_read_s(LEADER_READ_S, LEADER_IDLE_AFTER_S / 2) == LEADER_READ_S  # a pick now and then
    waits = [LEADER_READ_S]
    for _ in range(8):
        waits.append(next_read_s(waits[-1], LEADER_IDLE_AFTER_S))
    assert waits[1] == 2 * LEADER_READ_S and waits[-1] == LEADER_IDLE_READ_S and waits == sorted(waits)
    assert next_read_s(LEADER_IDLE_READ_S, 0.0) == LEADER_READ_S  # picks again


def test_each_read_tells_the_workers_new_picks_and_paces_the_next() -> None:
    (a,) = stores(1)
    buffer = memoryview(bytearray(SharedPicks.size(2)))
    worker, leader = (SharedPicks(buffer, 2, row) for row in range(2))
    told: list[tuple[int, int, float]] = []
    reads = RelayReads(leader, lambda h, m, w: told.append((h, m, w)), 0.0)
    worker.publish(a.hosts["g1"], "embed", 2.0, frozen())
    assert reads.read(0.5) == LEADER_READ_S
    assert told == [(name_key("g1"), name_key("embed"), 2.0)]
    assert reads.read(0.5 + LEADER_IDLE_AFTER_S / 2) == LEADER_READ_S  # picked lately
    assert reads.read(0.5 + LEADER_IDLE_AFTER_S) == 2 * LEADER_READ_S  # idle: backs off
    worker.publish(a.hosts["g2"], None, 1.0, frozen())
    assert reads.read(2.0) == LEADER_READ_S and len(told) == 2


def test_workers_that_share_picks_spread_a_burst_as_one_process_does() -> None:
    """Between two Envoy polls, workers taking turns spread a burst over the hosts; each counting only its
    own picks (N times), they pile onto the hosts that looked best to each."""
    for sharing in (True, False):
        workers = stores(3)
        picks: list[SharedPicks | None] = list(shared(3)) if sharing else [None] * 3
        # Alike, so that alone they would break their ties alike (as they may, starting from random hosts).
        schedulers = [
            Scheduler(s.fleet, s, rng=random.Random(0), pick_weight=3, shared_picks=p)
            for s, p in zip(workers, picks, strict=True)
        ]
        firsts = Counter(names(schedulers[i % 3].decide(http("embed")))[0] for i in range(3))
        if sharing:
            assert sorted(firsts.values()) == [1, 1, 1], firsts
        else:
            assert max(firsts.values()) > 1, firsts


def test_a_pick_made_before_envoys_last_count_is_not_counted_again() -> None:
    a, b = stores(2)
    picks_a, picks_b = shared(2)
    picks_a.publish(a.hosts["g1"], None, 1.0, POLLED - 0.001)
    picks_a.publish(a.hosts["g2"], None, 1.0, POLLED + 0.001)
    picks_b.catch_up(b, frozen())
    assert (b.hosts["g1"].estimate, b.hosts["g2"].estimate) == (0.0, 1.0)
    assert picks_b.taken() == (1, 0)


def test_the_size_of_a_pick_the_count_holds_still_counts() -> None:
    """A pick another worker made before Envoy's last count, read after it: the count holds it as a request
    of the mean size; its work beyond that joins the estimate's, and sizes the next count."""
    a, b = stores(2)
    picks_a, picks_b = shared(2)
    host = b.hosts["g1"]
    host.reset_estimate(1, POLLED)  # Envoy counted it: one request in flight
    picks_a.publish(a.hosts["g1"], None, 4.0, POLLED - 0.001)
    picks_b.catch_up(b, frozen())
    assert (host.estimate, host.work_estimate) == (1.0, 4.0)
    host.reset_estimate(1, frozen())  # the next count: the same request, still in flight
    assert (host.estimate, host.work_estimate) == (1.0, 4.0)


def test_a_worker_that_fell_behind_the_ring_applies_the_last_picks_and_counts_the_rest_lost() -> None:
    a, b = stores(2)
    picks_a, picks_b = shared(2)
    for _ in range(SLOTS + 10):
        picks_a.publish(a.hosts["g1"], None, 1.0, frozen())
    picks_b.catch_up(b, frozen())
    assert b.hosts["g1"].estimate == SLOTS
    assert picks_b.taken() == (SLOTS, 10)


def test_a_pick_for_an_unknown_host_or_of_impossible_work_is_skipped() -> None:
    b = stores(1)[0]
    buffer = memoryview(bytearray(SharedPicks.size(2)))
    picks_b = SharedPicks(buffer, 2, 1)
    pick = struct.Struct("@QQdd")
    for i, (host, work) in enumerate([("nowhere", 1.0), ("g1", float("nan")), ("g1", -1.0), ("g1", 1e12), ("g3", 2.0)]):
        pick.pack_into(buffer, 8 + i * pick.size, name_key(host), 0, work, frozen())
    struct.pack_into("@Q", buffer, 0, 5)
    picks_b.catch_up(b, frozen())
    assert picks_b.taken() == (1, 4)
    assert (b.hosts["g3"].estimate, b.hosts["g3"].work_estimate) == (1.0, 2.0)
    assert b.hosts["g1"].estimate == 0.0


def test_a_restarted_worker_goes_on_from_its_count_and_skips_the_others_history() -> None:
    a, b = stores(2)
    buffer = memoryview(bytearray(SharedPicks.size(2)))
    SharedPicks(buffer, 2, 0).publish(a.hosts["g1"], None, 1.0, frozen())
    SharedPicks(buffer, 2, 1).publish(b.hosts["g1"], None, 1.0, frozen())
    restarted = SharedPicks(buffer, 2, 1)  # the others' earlier picks are in Envoy's next count
    restarted.catch_up(b, frozen())
    assert b.hosts["g1"].estimate == 0.0
    again = SharedPicks(buffer, 2, 0)
    again.publish(a.hosts["g2"], None, 1.0, frozen())  # after its first pick, not over it
    restarted.catch_up(b, frozen())
    assert b.hosts["g2"].estimate == 1.0 and b.hosts["g1"].estimate == 0.0


def test_a_buffer_too_small_for_the_row_is_refused() -> None:
    with pytest.raises(ValueError, match="holds no row 2 of 2"):
        SharedPicks(memoryview(bytearray(SharedPicks.size(2))), 2, 2)
    with pytest.raises(ValueError, match="holds no row"):
        SharedPicks(memoryview(bytearray(SharedPicks.size(1))), 2, 0)


def _publish_in_a_worker(config: Fleet, picks: int) -> None:
    store = stores(1, config)[0]
    worker = Worker(0).shared_picks(config)
    assert worker is not None
    for _ in range(picks):
        worker.publish(store.hosts["g3"], "embed", 1.0, frozen())


def test_worker_processes_share_picks_through_the_leaders_file(tmp_path: Path) -> None:
    config = fleet(runtime_dir=str(tmp_path), picker={"workers": 2})
    make_worker_picks(config)
    assert worker_picks_path(config).stat().st_mode & 0o777 == 0o600
    child = multiprocessing.get_context("spawn").Process(target=_publish_in_a_worker, args=(config, 5))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    reader = Worker(1).shared_picks(config)
    assert reader is not None
    store = stores(1, config)[0]
    reader.catch_up(store, frozen())  # the picks before it mapped the buffer are history
    assert store.hosts["g3"].estimate == 0.0
    child = multiprocessing.get_context("spawn").Process(target=_publish_in_a_worker, args=(config, 5))
    child.start()
    child.join(30)
    reader.catch_up(store, frozen())
    assert store.hosts["g3"].estimate == 5.0


def test_a_worker_without_the_file_or_with_sharing_off_counts_its_own_picks(tmp_path: Path) -> None:
    config = fleet(runtime_dir=str(tmp_path), picker={"workers": 2})
    assert Worker(1).shared_picks(config) is None  # no leader made the buffer
    make_worker_picks(config)
    off = fleet(runtime_dir=str(tmp_path), picker={"workers": 2, "share_worker_picks": False})
    assert Worker(1).shared_picks(off) is None


def test_picks_since_the_poll_count_again_when_a_late_snapshot_restarts_the_estimate() -> None:
    """A worker gets its leader's Envoy poll after the poll: the count replaces the estimate as of the poll,
    and the picks made since that this worker had counted (its own, the others' it caught up on) count
    again; the others' it had not caught up on count once, at the next catch-up."""
    a, b = stores(2)
    picks_a, picks_b = shared(2)
    poll = frozen() - 0.005
    picks_b.publish(b.hosts["g1"], None, 1.0, poll - 0.001)  # before the poll: in its count
    b.hosts["g1"].record_pick(frozen(), 1, None, 1.0)
    picks_b.publish(b.hosts["g2"], "embed", 2.0, poll + 0.001)  # its own, since the poll
    b.hosts["g2"].record_pick(frozen(), 1, "embed", 2.0)
    picks_a.publish(a.hosts["g3"], None, 1.0, poll + 0.002)  # another worker's, caught up on
    picks_b.catch_up(b, frozen())
    picks_a.publish(a.hosts["g3"], None, 1.0, poll + 0.003)  # another worker's, not yet caught up on
    for host in b.hosts.values():  # the snapshot: Envoy counted nothing in flight at the poll
        host.envoy_at = poll
        host.reset_estimate(0, poll)
    picks_b.replay(b, list(b.hosts.values()), frozen())
    in_flight = {name: (b.hosts[name].estimate, b.hosts[name].work_estimate) for name in ("g1", "g2", "g3")}
    assert in_flight == {"g1": (0.0, 0.0), "g2": (1.0, 2.0), "g3": (1.0, 1.0)}
    picks_b.catch_up(b, frozen())
    assert (b.hosts["g3"].estimate, b.hosts["g2"].estimate) == (2.0, 1.0)
    picks_b.replay(b, [b.hosts["g1"]], frozen())  # only the hosts whose estimate restarted
    assert b.hosts["g2"].estimate == 1.0


def test_a_late_count_is_sized_by_the_picks_before_its_poll() -> None:
    """Envoy counted the two 4-row-sized picks in flight at its poll; the small pick since is not in the
    count. The count's work comes from the picks before the poll, and the pick since counts again."""
    (b,) = stores(1)
    (picks,) = shared(1)
    host = b.hosts["g1"]
    host.load.service_ms = 0.0  # nothing drains while the test's clock stands still
    poll = frozen() - 0.005
    for at, work in ((poll - 0.002, 4.0), (poll - 0.001, 4.0), (poll + 0.001, 1.0)):
        host.record_pick(frozen(), 1, "embed", work)
        picks.publish(host, "embed", work, at)
    host.envoy_at = poll
    host.reset_estimate(2, poll)  # as the snapshot does: sized by the last two picks, one of them too new
    assert host.work_estimate == 2 + 3.0 + 0.0
    picks.replay(b, [host], frozen())
    assert (host.estimate, host.work_estimate) == (3.0, 9.0)
    host.reset_estimate(3, frozen())  # a later poll that holds all three: the ring was not written twice
    assert host.work_estimate == 3 + 3.0 + 3.0 + 0.0
