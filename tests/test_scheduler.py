"""Classification, filtering, scoring and picking over a hand-built datastore (no servers)."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.config import Fleet, Tier, parse_fleet
from extproc.datastore import Datastore, HostState
from extproc.scheduling.classify import classify
from extproc.scheduling.scheduler import Scheduler
from extproc.scheduling.types import InferenceRequest, Protocol, Reject, Route


def fleet(**overrides: Any) -> Fleet:
    data: dict[str, Any] = {
        "hosts": [
            {"name": "g1", "address": "10.0.0.1", "tier": "gpu"},
            {"name": "g2", "address": "10.0.0.2", "tier": "gpu"},
            {"name": "g3", "address": "10.0.0.3", "tier": "gpu"},
            {"name": "c1", "address": "10.0.1.1", "tier": "cpu"},
        ],
        "models": [
            {"name": "mlp", "tiers": ["cpu", "gpu"], "rules": [{"tier": "gpu", "min_bytes": 1000}]},
            {"name": "embed", "tiers": ["gpu"]},
        ],
    }
    data.update(overrides)
    return parse_fleet(data)


def live(store: Datastore, models: dict[str, list[str]], service_ms: float = 2.0) -> None:
    """Mark hosts fresh with the given models READY (version "1")."""
    now = store.now()
    for name, host in store.hosts.items():
        host.ready = {m: frozenset({"1"}) for m in models.get(name, [])}
        host.known = frozenset(host.ready)
        host.metrics_at = host.index_at = host.envoy_at = now
        host.load.service_ms = service_ms


def http(
    model: str | None, size: int | None = None, hint: Tier | None = None, version: str | None = None
) -> InferenceRequest:
    return InferenceRequest(Protocol.HTTP, model, version, size, hint)


@pytest.fixture
def store() -> Datastore:
    s = Datastore(fleet())
    live(s, {"g1": ["embed", "mlp"], "g2": ["embed"], "g3": ["embed"], "c1": ["mlp"]})
    return s


def route(decision: Reject | Route) -> Route:
    assert isinstance(decision, Route), decision
    return decision


def names(decision: Reject | Route) -> list[str]:
    return [h.name for h in route(decision).hosts]


def test_classify_rules_hint_and_default() -> None:
    spec = fleet().model("mlp")
    assert spec is not None
    assert classify(http("mlp", size=10), spec) is Tier.CPU
    assert classify(http("mlp", size=5000), spec) is Tier.GPU
    assert classify(http("mlp"), spec) is Tier.CPU  # no size: rule cannot match
    assert classify(http("mlp", size=5000, hint=Tier.CPU), spec) is Tier.CPU
    embed = fleet().model("embed")
    assert embed is not None
    assert classify(http("embed", hint=Tier.CPU), embed) is Tier.GPU  # hint outside allowed tiers


def test_model_only_where_loaded(store: Datastore) -> None:
    scheduler = Scheduler(store.fleet, store)
    for _ in range(20):
        assert names(scheduler.decide(http("mlp", size=5000))) == ["g1"]
        assert names(scheduler.decide(http("mlp", size=10))) == ["c1"]


def test_least_expected_wait_first_and_ranked(store: Datastore) -> None:
    store.hosts["g1"].envoy.active = 10
    store.hosts["g2"].envoy.active = 0
    store.hosts["g3"].envoy.active = 4
    assert names(Scheduler(store.fleet, store).decide(http("embed"))) == ["g2", "g3", "g1"]


def test_slow_host_avoided_by_service_time(store: Datastore) -> None:
    store.hosts["g1"].load.service_ms = 8.0
    for h in ("g1", "g2", "g3"):
        store.hosts[h].envoy.active = 2
    first = names(Scheduler(store.fleet, store).decide(http("embed")))[0]
    assert first in {"g2", "g3"}


def test_burst_between_polls_is_spread(store: Datastore) -> None:
    scheduler = Scheduler(store.fleet, store)
    firsts = [names(scheduler.decide(http("embed")))[0] for _ in range(30)]
    assert {firsts.count(h) for h in ("g1", "g2", "g3")} == {10}


def test_gpu_memory_pressure_breaks_even_load(store: Datastore) -> None:
    for name, used in (("g1", 90), ("g2", 10), ("g3", 50)):
        store.hosts[name].load.gpu_memory_used = used
        store.hosts[name].load.gpu_memory_total = 100
    assert names(Scheduler(store.fleet, store).decide(http("embed"))) == ["g2", "g3", "g1"]


def test_ejected_unhealthy_and_stale_hosts_are_dropped(store: Datastore) -> None:
    store.hosts["g1"].envoy.ejected = True
    store.hosts["g2"].envoy.unhealthy = True
    assert names(Scheduler(store.fleet, store).decide(http("embed"))) == ["g3"]
    store.hosts["g3"].metrics_at = store.now() - 60
    decision = Scheduler(store.fleet, store).decide(http("embed"))
    assert isinstance(decision, Reject) and decision.status == 503 and decision.retry_after


def test_unknown_model_is_404_and_known_unready_503(store: Datastore) -> None:
    scheduler = Scheduler(store.fleet, store)
    unknown = scheduler.decide(http("nope"))
    assert isinstance(unknown, Reject) and unknown.status == 404 and "nope" in unknown.message
    store.hosts["g2"].known = frozenset({"embed", "sleepy"})  # listed, never READY
    unready = scheduler.decide(http("sleepy"))
    assert isinstance(unready, Reject) and unready.status == 503


def test_unknown_version_is_404(store: Datastore) -> None:
    decision = Scheduler(store.fleet, store).decide(http("embed", version="7"))
    assert isinstance(decision, Reject) and decision.status == 404 and decision.reason == "unknown_version"
    assert names(Scheduler(store.fleet, store).decide(http("embed", version="1")))


def test_spillover_to_another_allowed_tier(store: Datastore) -> None:
    store.hosts["c1"].envoy.ejected = True
    decision = route(Scheduler(store.fleet, store).decide(http("mlp", size=10)))
    assert decision.tier is Tier.GPU and decision.reason == "spillover" and names(decision) == ["g1"]


def test_requests_without_model_go_to_the_fallback_or_hinted_tier(store: Datastore) -> None:
    scheduler = Scheduler(store.fleet, store)
    assert route(scheduler.decide(http(None))).tier is Tier.GPU
    assert names(scheduler.decide(http(None, hint=Tier.CPU))) == ["c1"]


def test_model_not_in_fleet_file_served_where_loaded(store: Datastore) -> None:
    store.hosts["c1"].ready["extra"] = frozenset({"1"})
    store.hosts["c1"].known = frozenset(store.hosts["c1"].ready)
    decision = route(Scheduler(store.fleet, store).decide(http("extra")))
    assert decision.tier is Tier.CPU and names(decision) == ["c1"]


def test_max_hosts_bounds_the_retry_list() -> None:
    f = fleet(picker={"max_hosts": 2})
    s = Datastore(f)
    live(s, {"g1": ["embed"], "g2": ["embed"], "g3": ["embed"]})
    assert len(names(Scheduler(f, s).decide(http("embed")))) == 2


def test_in_flight_estimate_uses_triton_queue_when_larger() -> None:
    host = HostState(fleet().hosts[0])
    host.envoy.active, host.picks_since_poll, host.load.pending = 2, 1, 7
    assert host.in_flight() == 7
    host.load.pending = 0
    assert host.in_flight() == 3
