"""The leader's telemetry snapshot for its workers (extproc.sharing), without processes: what the leader
has is what a worker gets."""

from __future__ import annotations

from benchmarks.decision import synthetic_fleet
from extproc.datapath.batch_cost import BatchCost, BatchFit, Batching
from extproc.datapath.datastore import Datastore, ModelTimes
from extproc.sharing import apply_snapshot, read_snapshot, snapshot


def test_a_snapshot_carries_every_kind_of_telemetry() -> None:
    fleet, leader = synthetic_fleet(3)
    host = leader.hosts["h1"]
    fit = BatchFit(2.0, 3.0, 5.0, 7.0, 11.0)
    host.load.models["mlp"] = ModelTimes(1.5, 4.0, 0.8, fit, BatchCost(0.3, 0.1))
    host.batching = {"mlp": Batching(8, 2)}
    host.envoy.ejected, host.draining = True, True
    worker = Datastore(fleet)

    discovered, state = read_snapshot(snapshot(leader, ()))
    apply_snapshot(worker, state)

    assert discovered == ()
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
