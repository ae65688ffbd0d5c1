"""The picker's decision series: tallied per request, published by flush()."""

from __future__ import annotations

from prometheus_client import generate_latest

from extproc.config import Tier, parse_fleet
from extproc.datapath.datastore import Datastore
from extproc.datapath.metrics import DECISION_BUCKETS, PickerMetrics

FLEET = parse_fleet({"hosts": [{"name": "g1", "address": "10.0.0.1", "tier": "gpu"}], "models": [{"name": "m"}]})
# On a bound (a Histogram counts it in that bound's bucket), between bounds, above the last, and zero.
TIMES = [DECISION_BUCKETS[0], 30e-6, DECISION_BUCKETS[-1], 0.2, 0.0, 1e-3, 30e-6]
KEYS = [("m", "gpu", "g1", "classified"), ("m", "cpu", "c1", "spillover")]


def _decision_lines(metrics: PickerMetrics) -> list[str]:
    text = generate_latest(metrics.registry).decode()
    # *_created holds each series' creation time, which differs between the two registries.
    return [line for line in text.splitlines() if line.startswith("extproc_decision") and "_created" not in line]


def test_a_flush_publishes_what_observe_and_inc_would_have() -> None:
    """Guards the Histogram internals flush() writes to: a prometheus_client that changes them fails here."""
    direct, tallied = PickerMetrics(Datastore(FLEET)), PickerMetrics(Datastore(FLEET))
    for i, elapsed in enumerate(TIMES):
        key = KEYS[i % 2]
        direct.decisions.labels(*key).inc()
        direct.decision_seconds.observe(elapsed)
        tallied.routed((key[0], Tier(key[1]), key[2], key[3]), elapsed)
    tallied.flush()
    tallied.flush()  # a second flush adds nothing
    assert _decision_lines(tallied) == _decision_lines(direct)
    assert 'extproc_decisions_total{host="g1",model="m",reason="classified",tier="gpu"} 4.0' in _decision_lines(tallied)


def test_routed_requests_wait_for_the_flush() -> None:
    metrics = PickerMetrics(Datastore(FLEET))
    metrics.routed(KEYS[0], 1e-4)
    assert "extproc_decision_seconds_count 0.0" in _decision_lines(metrics)
    metrics.flush()
    assert "extproc_decision_seconds_count 1.0" in _decision_lines(metrics)


def test_admissions_are_counted_per_model_priority_and_outcome() -> None:
    """Inference requests only, and only the load verdicts (an unknown model's 404 is not one)."""
    from extproc.datapath.protocol.response import Responder
    from extproc.datapath.scheduling.types import InferenceRequest, Priority, Protocol, Reject, Route

    store = Datastore(FLEET)
    metrics = PickerMetrics(store)
    responder = Responder(metrics, 1, debug=False)
    host = store.hosts["g1"]

    def infer(model: str, priority: Priority = Priority.STANDARD) -> InferenceRequest:
        return InferenceRequest(Protocol.HTTP, model, priority=priority, infer=True)

    responder.record(Route(Tier.GPU, (host,), "classified"), infer("m"), None, 0.0)
    responder.record(Route(Tier.GPU, (host,), "classified"), InferenceRequest(Protocol.HTTP, "m"), None, 0.0)
    responder.record(Reject(429, "", "overloaded"), infer("m", Priority.SHEDDABLE), None, 0.0)
    responder.record(Reject(429, "", "fair_share"), infer("m"), None, 0.0)
    responder.record(Reject(404, "", "unknown_model"), infer("nope"), None, 0.0)
    metrics.flush()
    text = generate_latest(metrics.registry).decode()
    lines = sorted(line for line in text.splitlines() if line.startswith("extproc_admissions_total"))
    assert lines == [
        'extproc_admissions_total{model="m",outcome="admitted",priority="standard"} 1.0',
        'extproc_admissions_total{model="m",outcome="fair_share",priority="standard"} 1.0',
        'extproc_admissions_total{model="m",outcome="overloaded",priority="sheddable"} 1.0',
    ]
