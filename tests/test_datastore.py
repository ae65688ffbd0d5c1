"""One record per host (extproc.datapath.datastore): every field of HostState is classified once, the record's fields
travel to workers, survive a reload and show in /status, and only the Datastore writes them, so that what a
scheduler prepared from old values is out of date as soon as they change."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog.testing

from benchmarks.decision import synthetic_fleet
from extproc.datapath.batch_cost import BatchCost, Batching
from extproc.datapath.datastore import (
    BEAT_S,
    ESTIMATE_FIELDS,
    IDENTITY_FIELDS,
    PAUSE_S,
    RECENT_PICKS,
    TELEMETRY_FIELDS,
    Datastore,
    EnvoyView,
    HostState,
    ModelTimes,
    TritonLoad,
    host_status,
)
from extproc.datapath.scheduling.scorers import prepare
from extproc.sharing import apply_snapshot, read_snapshot, snapshot

PACKAGE = Path(__file__).resolve().parent.parent / "extproc"

# One distinct change per field of the record, as its writer would make it.
CHANGES: dict[str, Callable[[Datastore, HostState], None]] = {
    "load": lambda d, h: d.set_load(h, TritonLoad(pending=7)),
    "envoy": lambda d, h: d.set_envoy(h, EnvoyView(active=3, ejected=True), d.now()),
    "ready": lambda d, h: d.update_index(h, {**h.ready, "extra": frozenset({"2"})}, h.known, _at(h.index_at)),
    "known": lambda d, h: d.update_index(h, h.ready, h.known | {"listed"}, _at(h.index_at)),
    "batching": lambda d, h: d.set_batching(h, {"mlp": Batching(8, 2)}),
    "draining": lambda d, h: d.set_draining(h, True),
    "metrics_at": lambda d, h: d.set_load(h, h.load, d.now() - 1.5),
    "index_at": lambda d, h: d.update_index(h, h.ready, h.known, d.now() - 2.5),
    "envoy_at": lambda d, h: d.set_envoy(h, h.envoy, d.now() - 0.5),
}


def _at(at: float | None) -> float:
    assert at is not None
    return at


def test_every_field_of_a_host_is_classified_once() -> None:
    fields = [f.name for f in dataclasses.fields(HostState)]
    classified = [*TELEMETRY_FIELDS, *IDENTITY_FIELDS, *ESTIMATE_FIELDS]
    assert sorted(classified) == sorted(fields)
    assert sorted(CHANGES) == sorted(TELEMETRY_FIELDS)  # a new field needs its row above


@pytest.mark.parametrize("name", TELEMETRY_FIELDS)
def test_each_write_invalidates_and_shows_in_status(name: str) -> None:
    _, store = synthetic_fleet(2)
    host, now = store.hosts["h1"], store.now()
    before, generation = host_status(host, now, store.stale_after_s), store.generation
    CHANGES[name](store, host)
    assert store.generation > generation
    assert host_status(host, now, store.stale_after_s) != before


def test_the_record_travels_to_workers_and_survives_a_reload() -> None:
    fleet, leader = synthetic_fleet(3)
    for name in TELEMETRY_FIELDS:
        CHANGES[name](leader, leader.hosts["h1"])
    leader.hosts["h1"].record_pick(leader.now())

    worker = Datastore(fleet)
    apply_snapshot(worker, read_snapshot(snapshot(leader, ())))
    reloaded = Datastore(fleet)
    reloaded.adopt(leader)
    for name, sent in leader.hosts.items():
        for got in (worker.hosts[name], reloaded.hosts[name]):
            assert [getattr(got, f) for f in TELEMETRY_FIELDS] == [getattr(sent, f) for f in TELEMETRY_FIELDS]
        assert [getattr(reloaded.hosts[name], f) for f in ESTIMATE_FIELDS] == [
            getattr(sent, f) for f in ESTIMATE_FIELDS
        ]
    assert {k: [h.name for h in v] for k, v in worker.serving.items()} == {
        k: [h.name for h in v] for k, v in leader.serving.items()
    }


def assignments_to_the_record(source: str) -> list[str]:
    """``obj.FIELD = ...`` (also augmented or in a tuple) for a field of the record, as ``LINE: FIELD``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if not isinstance(sub, ast.Attribute) or not isinstance(sub.ctx, ast.Store):
                    continue
                if sub.attr in TELEMETRY_FIELDS and not _on_self(sub):
                    found.append(f"{sub.lineno}: {sub.attr}")
    return found


def _on_self(node: ast.Attribute) -> bool:
    """``self.FIELD``: another class's own attribute of the same name (e.g. an index's ``ready``)."""
    return isinstance(node.value, ast.Name) and node.value.id == "self"


def test_only_the_datastore_writes_the_record() -> None:
    modules = [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "datastore.py"]
    assert len(modules) > 20
    found = [f"{p.relative_to(PACKAGE.parent)}:{a}" for p in modules for a in assignments_to_the_record(p.read_text())]
    assert found == []


def test_the_check_sees_direct_writes() -> None:
    assert assignments_to_the_record(
        "host.load = x\na.b.draining = True\nh.envoy, h.ready = e, r\nself.ready = 1\n"
    ) == [
        "1: load",
        "2: draining",
        "3: envoy",
        "3: ready",
    ]


def test_the_work_in_flight_is_that_of_the_last_picks() -> None:
    """A pick of other than the mean size carries its excess work for as long as it is among the requests
    in flight: a host finishes them in about the order they came, so those are the last picks, as many as
    the count (Envoy's, or the drained estimate) says. Small picks weigh less than their count."""
    host = next(iter(synthetic_fleet(1)[1].hosts.values()))
    host.load.service_ms = 10.0
    host.record_pick(0.0, model="m", work=4.0)
    host.record_pick(0.0, model="m", work=0.5)
    assert host.in_flight(0.0) == pytest.approx(2.0)
    assert host.picks_excess(2.0) == pytest.approx(3.0 - 0.5)
    assert host.model_in_flight("m", 0.0) == pytest.approx(4.5)
    host.reset_estimate(1, 0.005)  # Envoy's poll: the older, big request is done
    assert host.picks_excess(host.in_flight(0.005)) == pytest.approx(-0.5)
    assert host.model_in_flight("m", 0.005) == pytest.approx(0.5)
    assert host.picks_excess(0.0) == 0.0
    assert host.picks_excess(5.0) == pytest.approx(2.5), "requests beyond the picks are of the mean size"


def test_a_big_pick_stays_in_the_count_for_as_long_as_its_work() -> None:
    """The work in flight drains at the host's rate (here 100 mean-sized requests a second) and the count
    with it, in proportion: a request of 4 units is still counted (in part) after a mean one would be
    done, and both are gone once their work is."""
    host = next(iter(synthetic_fleet(1)[1].hosts.values()))
    host.load.service_ms = 10.0
    host.record_pick(0.0, work=4.0)
    assert host.drained(0.0) == pytest.approx((1.0, 4.0))
    assert host.drained(0.02) == pytest.approx((0.5, 2.0))
    assert host.in_flight(0.03) == pytest.approx(0.25)
    assert host.drained(0.04) == (0.0, 0.0)
    mean = next(iter(synthetic_fleet(1)[1].hosts.values()))
    mean.load.service_ms = 10.0
    mean.record_pick(0.0)
    assert mean.drained(0.005) == pytest.approx((0.5, 0.5))
    assert mean.in_flight(0.01) == 0.0
    status = host_status(host, 0.02, 3.0)
    assert (status["in_flight"], status["work_in_flight"]) == (0.5, 2.0)
    host.record_pick(0.02, work=0.5)  # on top of what is left: 0.5 requests of 2 units
    assert host.drained(0.02) == pytest.approx((1.5, 2.5))
    host.reset_estimate(2, 0.021)  # Envoy's count: sized by the last two picks
    assert host.drained(0.021) == pytest.approx((2.0, 2.0 + 3.0 - 0.5))


def _measured(cost: BatchCost | None, exec_ms: float | None = None) -> HostState:
    """A host draining 500 requests a second, whose model "m" takes ``cost`` per batch (rows)."""
    host = next(iter(synthetic_fleet(1)[1].hosts.values()))
    host.load.service_ms = 2.0
    host.load.models["m"] = ModelTimes(service_ms=2.0, exec_ms=exec_ms, cost=cost, rows_per_request=2.0)
    return host


def test_the_last_pick_stays_in_flight_for_at_least_its_own_execution() -> None:
    """The drain is the host's rate when busy, a guess: alone it would empty the estimate of a pick within
    2 ms, where the request executes for at least 8 + 1 x 2 rows = 10 ms (12 ms for twice the work). Until
    then the estimate holds the host's last pick, its count and its work, also through an Envoy count that
    has not seen it yet, and the candidates read the same."""
    host = _measured(BatchCost(8.0, 1.0))
    host.record_pick(0.0, model="m")
    assert host.drained(0.005) == pytest.approx((1.0, 1.0))
    assert host.drained(0.0101) == (0.0, 0.0)
    host.record_pick(0.011, model="m", work=2.0)
    host.reset_estimate(0, 0.012)  # Envoy's count, read before the pick reached it
    assert host.in_flight(0.014) == 1.0
    assert host.work_in_flight(0.014) == pytest.approx(2.0)
    candidate = prepare([host], "m")[0]
    for at in (0.014, 0.0229, 0.0231):
        assert candidate.in_flight(at) == pytest.approx(host.in_flight(at))
    assert host.in_flight(0.0229) == 1.0
    assert host.in_flight(0.0231) == 0.0, "12 ms from 11 ms: done"


def test_a_pick_is_held_for_the_models_mean_execution_until_its_cost_is_fitted() -> None:
    host = _measured(None, exec_ms=6.0)
    host.record_pick(0.0, model="m", work=3.0)
    assert host.work_in_flight(0.0059) == pytest.approx(3.0)
    assert host.work_in_flight(0.0061) == 0.0
    unmeasured = next(iter(synthetic_fleet(1)[1].hosts.values()))
    unmeasured.load.service_ms = 2.0
    unmeasured.record_pick(0.0, model="m")
    assert unmeasured.in_flight(0.001) == pytest.approx(0.5), "nothing to hold it by: the drain alone"


def test_only_the_last_picks_are_remembered() -> None:
    host = next(iter(synthetic_fleet(1)[1].hosts.values()))
    host.record_pick(0.0, work=3.0)
    for _ in range(RECENT_PICKS):
        host.record_pick(0.0, work=1.5)
    assert host.picks_excess(1000.0) == pytest.approx(0.5 * RECENT_PICKS)
    for _ in range(RECENT_PICKS):
        host.record_pick(0.0)
    assert host.picks_excess(1000.0) == 0.0
    assert host.recent_picks >= host.sized_until, "the scorer's cheap path: no remembered pick was sized"


def test_only_the_pickers_own_request_carries_a_known_size() -> None:
    """With several gateways (envoy_scale 4: three other requests come meanwhile, of unknown size, so of the
    mean), a 4-unit pick adds 3 units of excess, not 12, and small picks weigh less only by their own."""
    host = next(iter(synthetic_fleet(1)[1].hosts.values()))
    host.load.service_ms = 10.0
    host.load.envoy_scale = 4.0
    host.record_pick(0.0, model="m", work=4.0)
    assert host.in_flight(0.0) == pytest.approx(4.0)
    assert host.picks_excess(4.0) == pytest.approx(3.0)
    assert host.model_in_flight("m", 0.0) == pytest.approx(4.0 + 3.0)
    other = next(iter(synthetic_fleet(1)[1].hosts.values()))
    other.load.service_ms = 10.0
    other.load.envoy_scale = 4.0
    for _ in range(5):
        other.record_pick(0.0, model="m", work=0.25)
    assert other.in_flight(0.0) == pytest.approx(20.0)
    assert other.picks_excess(20.0) == pytest.approx(5 * -0.75)


def _read_at(store: Datastore, host: HostState, at: float) -> None:
    """The host's metrics and index, read at ``at``."""
    store.set_load(host, host.load, at)
    store.update_index(host, host.ready, host.known, at)


def test_a_pause_of_the_process_gives_its_time_back_to_what_was_read_before_it() -> None:
    """Stopped for 5 s (no beat): hosts read before the stop are as fresh after it as they were at its start,
    whatever the stale limit (3 s here); a host read after it keeps its time; the layout changes, so no plan
    judges freshness on the old times."""
    _, store = synthetic_fleet(2)
    before, after = store.hosts["h0"], store.hosts["h1"]
    _read_at(store, before, 100.0)
    store.beat(100.5)
    _read_at(store, after, 105.2)  # a poll that answered between the resumption and the next beat
    layout = store.layout
    with structlog.testing.capture_logs() as logs:
        assert store.beat(105.5) == 5.0
    assert [(e["event"], e["seconds"]) for e in logs] == [("picker_was_not_running", 5.0)]
    assert (before.metrics_at, before.index_at) == (105.0, 105.0)
    assert before.fresh(105.5, store.stale_after_s)
    assert (after.metrics_at, after.index_at) == (105.2, 105.2)
    assert store.layout > layout


def test_a_running_process_lets_unanswered_telemetry_turn_stale() -> None:
    """Beats every BEAT_S: a host that stopped answering turns stale at the limit, and nothing is moved."""
    _, store = synthetic_fleet(1)
    host = store.hosts["h0"]
    _read_at(store, host, 100.0)
    layout, at = store.layout, 100.0
    while at < 100.0 + store.stale_after_s + 0.5:
        at += BEAT_S
        store.beat(at)
    assert host.metrics_at == 100.0 and store.layout == layout
    assert not host.fresh(at, store.stale_after_s)


def test_a_gap_up_to_the_pause_limit_is_not_a_pause() -> None:
    _, store = synthetic_fleet(1)
    host = store.hosts["h0"]
    _read_at(store, host, 100.0)
    store.beat(100.0)
    assert store.beat(100.0 + PAUSE_S) == 0.0
    assert host.metrics_at == 100.0


def _queued(hosts: int, service_ms: float) -> tuple[Datastore, HostState]:
    """A store whose first host had 40 requests queued (30 of m0, 10 of m1) at a scrape at 100 s."""
    _, store = synthetic_fleet(hosts)
    host = store.hosts["h0"]
    host.batching.clear()
    host.load.service_ms = service_ms
    host.load.pending, host.load.model_pending = 40, {"m0": 30, "m1": 10}
    _read_at(store, host, 100.0)
    return store, host


def test_a_pause_drains_the_queues_read_before_it_as_the_clock_would() -> None:
    """400 requests a second drained: after a 5 s stop the queue counts as empty, per model too (not 40
    requests 5 s old taken for now, which read as overload), as the clock alone has it where nothing was
    moved."""
    store, stopped = _queued(1, 2.5)
    _, clocked = _queued(1, 2.5)
    store.beat(100.0)
    assert store.beat(105.0) == 5.0
    assert stopped.load.pending == 0 and stopped.load.model_pending == {}
    assert stopped.in_flight(105.0) == clocked.in_flight(105.0) == 0.0
    # A shorter stop leaves part of the queue, in proportion per model: 20 a second drain 30 of 40 in 1.5 s.
    store, host = _queued(1, 50.0)
    store.beat(100.0)
    assert store.beat(101.5) == 1.5
    assert (host.load.pending, host.load.model_pending) == (10, {"m0": 7, "m1": 2})
    assert host.metrics_at == 101.5
