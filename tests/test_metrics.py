"""The picker's decision series: tallied per request, published by flush()."""

from __future__ import annotations

from prometheus_client import generate_latest

from extproc.config import Tier, parse_fleet
from extproc.datastore import Datastore
from extproc.metrics import DECISION_BUCKETS, PickerMetrics

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
