"""Classification, filtering, scoring and picking over a hand-built datastore (no servers)."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.config import Fleet, Tier, parse_fleet
from extproc.datapath.batch_cost import BatchCost, Batching
from extproc.datapath.datastore import Datastore, HostState, ModelTimes
from extproc.datapath.scheduling import registry
from extproc.datapath.scheduling.classify import classify
from extproc.datapath.scheduling.pickers import Argmax
from extproc.datapath.scheduling.scheduler import INLINE_PREPARE_HOSTS, RESUME_S, Scheduler
from extproc.datapath.scheduling.scorers import Candidate, prepare
from extproc.datapath.scheduling.types import InferenceRequest, Priority, Protocol, Reject, Route


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
            {"name": "embed", "tiers": ["gpu"], "sequence": True},
        ],
    }
    data.update(overrides)
    return parse_fleet(data)


def live(store: Datastore, models: dict[str, list[str]], service_ms: float = 2.0) -> None:
    """Mark hosts fresh with the given models READY (version "1")."""
    now = store.now()
    for name, host in store.hosts.items():
        ready = {m: frozenset({"1"}) for m in models.get(name, [])}
        store.update_index(host, ready, frozenset(ready), now)
        host.metrics_at = host.envoy_at = now
        host.load.service_ms = service_ms


def http(
    model: str | None, size: int | None = None, hint: Tier | None = None, version: str | None = None
) -> InferenceRequest:
    return InferenceRequest(Protocol.HTTP, model, version, size, hint)


def busy(host: HostState, in_flight: int) -> None:
    """As if Envoy's last poll counted ``in_flight`` requests on ``host``."""
    host.envoy.active = in_flight
    host.reset_estimate(in_flight, frozen())


def frozen() -> float:
    """The tests' clock: time stands still, so in-flight estimates do not drain while a test runs."""
    return 1000.0


@pytest.fixture
def store() -> Datastore:
    s = Datastore(fleet(), clock=frozen)
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
        # Each tier has one host with mlp; the other tier's follows it, for Envoy's retries (see below).
        assert names(scheduler.decide(http("mlp", size=5000))) == ["g1", "c1"]
        assert names(scheduler.decide(http("mlp", size=10))) == ["c1", "g1"]


def test_a_small_tier_names_its_spill_tiers_least_busy_hosts_last(store: Datastore) -> None:
    """Retry targets for a try that never reached its host (the host just died): another tier's hosts,
    in the tier's cluster at priority 1. The route stays the tier's and the pick its host's."""
    f = fleet(models=[{"name": "embed", "tiers": ["cpu", "gpu"]}])
    s = Datastore(f, clock=frozen)
    live(s, {"g1": ["embed"], "g2": ["embed"], "g3": ["embed"], "c1": ["embed"]})
    busy(s.hosts["g1"], 5)
    busy(s.hosts["g2"], 0)
    busy(s.hosts["g3"], 2)
    decision = route(Scheduler(f, s).decide(http("embed")))
    assert decision.tier is Tier.CPU and decision.reason == "classified"
    assert names(decision) == ["c1", "g2", "g3"]  # max_hosts 3
    assert s.hosts["c1"].estimate == 1 and s.hosts["g2"].estimate == 0  # only the first is picked
    one_tier = fleet(models=[{"name": "embed", "tiers": ["cpu"]}])
    s = Datastore(one_tier, clock=frozen)
    live(s, {"g1": ["embed"], "c1": ["embed"]})
    assert names(Scheduler(one_tier, s).decide(http("embed"))) == ["c1"]  # no other tier allowed
    no_spill = fleet(models=[{"name": "embed", "tiers": ["cpu", "gpu"]}], picker={"profile": {"spillover": False}})
    s = Datastore(no_spill, clock=frozen)
    live(s, {"g1": ["embed"], "c1": ["embed"]})
    assert names(Scheduler(no_spill, s).decide(http("embed"))) == ["c1"]


def test_least_expected_wait_first_and_ranked(store: Datastore) -> None:
    busy(store.hosts["g1"], 10)
    busy(store.hosts["g2"], 0)
    busy(store.hosts["g3"], 4)
    assert names(Scheduler(store.fleet, store).decide(http("embed"))) == ["g2", "g3", "g1"]


def test_slow_host_avoided_by_service_time(store: Datastore) -> None:
    store.hosts["g1"].load.service_ms = 8.0
    for h in ("g1", "g2", "g3"):
        busy(store.hosts[h], 2)
    first = names(Scheduler(store.fleet, store).decide(http("embed")))[0]
    assert first in {"g2", "g3"}


def test_an_unmeasured_host_is_as_fast_as_the_fastest_measured_one() -> None:
    """Its execution as long as the fastest host's execution, its queue draining at the fastest per-request
    time (not an execution as short as one request's share of a batch, which made a new host the cheapest
    of all even with a queue)."""
    measured, slower, new = (HostState(spec) for spec in fleet().hosts[:3])
    measured.load.service_ms, measured.load.exec_ms = 2.0, 10.0
    slower.load.service_ms, slower.load.exec_ms = 4.0, 12.0
    candidate = prepare([measured, slower, new], "embed")[2]
    assert (candidate.base_ms, candidate.drain_ms) == (10.0, 2.0)


def test_a_new_host_that_finishes_nothing_is_not_piled_on(store: Datastore) -> None:
    """A host that Triton has not seen finish a request is tried as if fast; once it has held a request since
    before a scrape that still counts nothing finished, it takes at least that long, until Envoy reads it
    empty."""
    g3 = store.hosts["g3"]
    g3.load.service_ms = None
    for name in ("g1", "g2"):
        store.hosts[name].load.exec_ms = 8.0
        busy(store.hosts[name], 2)
    busy(g3, 0)
    scheduler = Scheduler(store.fleet, store)
    assert names(scheduler.decide(http("embed")))[0] == "g3", "tried: as fast as the fastest"
    assert g3.busy_since == frozen()
    g3.metrics_at = frozen() + 0.5  # scraped: still nothing finished
    store.changed()
    assert names(scheduler.decide(http("embed")))[-1] == "g3", "a first request that takes 500 ms and more"
    (candidate,) = [c for c in prepare(list(store.hosts.values())[:3], "embed") if c.host is g3]
    assert candidate.base_ms == pytest.approx(500.0)
    busy(g3, 0)  # Envoy reads it empty: whatever it held is done
    assert g3.busy_since is None
    store.changed()
    assert names(scheduler.decide(http("embed")))[0] == "g3"


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


def test_unknown_model_is_404_and_known_unready_404_or_503(store: Datastore) -> None:
    scheduler = Scheduler(store.fleet, store)
    unknown = scheduler.decide(http("nope"))
    assert isinstance(unknown, Reject) and unknown.status == 404
    assert unknown.message == "Request for unknown model: 'nope' is not found"  # Triton's words
    g2 = store.hosts["g2"]
    store.update_index(g2, g2.ready, frozenset({"embed", "sleepy"}), store.now())  # listed, never READY
    unready = scheduler.decide(http("sleepy"))
    # Every host has reported and none has it ready: Triton's answer for a model it has not loaded.
    assert isinstance(unready, Reject) and (unready.status, unready.reason) == (404, "model_not_ready")
    assert unready.message == "Request for unknown model: 'sleepy' is not found"
    # A host that has not reported lately may have it: the gateway's own answer, worth a retry.
    store.hosts["c1"].index_at = store.now() - 60
    unready = scheduler.decide(http("sleepy"))
    assert isinstance(unready, Reject) and unready.status == 503 and unready.retry_after


def test_unknown_version_is_404(store: Datastore) -> None:
    decision = Scheduler(store.fleet, store).decide(http("embed", version="7"))
    assert isinstance(decision, Reject) and decision.status == 404 and decision.reason == "unknown_version"
    assert decision.message == "Request for unknown model: 'embed' version 7 is not found"  # Triton's words
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
    c1 = store.hosts["c1"]
    store.update_index(c1, {**c1.ready, "extra": frozenset({"1"})}, frozenset({*c1.known, "extra"}), store.now())
    decision = route(Scheduler(store.fleet, store).decide(http("extra")))
    assert decision.tier is Tier.CPU and names(decision) == ["c1"]


def test_model_not_in_fleet_file_follows_where_it_is_loaded(store: Datastore) -> None:
    # The scheduler keeps an unlisted model's tiers between decisions; a change of where it is loaded must
    # reach the next decision all the same.
    scheduler = Scheduler(store.fleet, store)
    c1, g2 = store.hosts["c1"], store.hosts["g2"]
    store.update_index(c1, {**c1.ready, "extra": frozenset({"1"})}, frozenset({*c1.known, "extra"}), store.now())
    assert names(scheduler.decide(http("extra"))) == ["c1"]
    assert names(scheduler.decide(http("extra"))) == ["c1"]
    store.update_index(g2, {**g2.ready, "extra": frozenset({"1"})}, frozenset({*g2.known, "extra"}), store.now())
    store.update_index(c1, {"mlp": frozenset({"1"})}, frozenset({"mlp", "extra"}), store.now())
    decision = route(scheduler.decide(http("extra")))
    assert decision.tier is Tier.GPU and names(decision) == ["g2"]


def test_max_hosts_bounds_the_retry_list() -> None:
    f = fleet(picker={"max_hosts": 2})
    s = Datastore(f, clock=frozen)
    live(s, {"g1": ["embed"], "g2": ["embed"], "g3": ["embed"]})
    assert len(names(Scheduler(f, s).decide(http("embed")))) == 2


def test_prepared_candidates_follow_datastore_changes_and_telemetry_age() -> None:
    """The scheduler prepares a model's candidates once per datastore change: a write the datastore is
    told of reaches the next decision, and a host whose telemetry ages past stale_after drops out as time
    passes, with no write at all."""
    clock = [1000.0]
    f = fleet()
    s = Datastore(f, clock=lambda: clock[0])
    live(s, {"g1": ["embed"], "g2": ["embed"], "g3": ["embed"]})
    s.hosts["g2"].metrics_at = clock[0] - s.stale_after_s / 2
    s.changed()
    scheduler = Scheduler(f, s)
    assert sorted(names(scheduler.decide(http("embed")))) == ["g1", "g2", "g3"]
    s.hosts["g1"].envoy.ejected = True
    s.changed()
    assert sorted(names(scheduler.decide(http("embed")))) == ["g2", "g3"]
    clock[0] += s.stale_after_s * 0.75  # g2's metrics are now 1.25 x stale_after old, g3's 0.75 x
    assert names(scheduler.decide(http("embed"))) == ["g3"]


def test_in_flight_estimate_uses_triton_queue_when_larger() -> None:
    host = HostState(fleet().hosts[0])
    host.reset_estimate(2, 0.0)
    host.record_pick(0.0)
    host.load.pending = 7
    assert host.in_flight(0.0) == 7
    host.load.pending = 0
    assert host.in_flight(0.0) == 3


def test_in_flight_estimate_drains_at_the_measured_service_rate() -> None:
    host = HostState(fleet().hosts[0])
    host.load.service_ms = 5.0
    host.reset_estimate(4, 100.0)
    host.record_pick(100.0, weight=6)
    assert host.in_flight(100.0) == 10
    assert host.in_flight(100.02) == pytest.approx(6)  # 20 ms at 5 ms a request: 4 done
    assert host.in_flight(101.0) == 0
    # An idle host drains nothing: new picks count from zero, not from a debt of past idle time.
    host.record_pick(101.0)
    host.record_pick(101.0)
    assert host.in_flight(101.0) == 2
    assert host.in_flight(101.005) == pytest.approx(1)


def test_in_flight_estimate_drains_at_every_instances_rate() -> None:
    """``service_ms`` is one request's share of an execution, and a model's instances execute at once: a
    busy host with two instances finishes two requests per ``service_ms``."""
    host = HostState(fleet().hosts[0])
    host.load.service_ms = 5.0
    host.batching = {"embed": Batching(max_batch=8, instances=2), "mlp": Batching(max_batch=8)}
    host.reset_estimate(10, 100.0)
    assert host.in_flight(100.01) == pytest.approx(6)  # 10 ms: 2 x 2 done
    assert host.in_flight(100.025) == 0
    host.record_pick(100.025, weight=4, model="embed")
    assert host.model_in_flight("embed", 100.03) == pytest.approx(2)


@pytest.mark.parametrize("envoy_scale", [1.0, 4.0])
def test_triton_queue_drains_since_its_scrape_at_this_gateways_share(envoy_scale: float) -> None:
    """Triton's queue is up to a scrape interval old: as a floor under the estimate it drains since the
    scrape, at this gateway's share of the host's rate (the other gateways keep adding theirs)."""
    host = HostState(fleet().hosts[0])
    host.load.service_ms, host.load.pending, host.load.envoy_scale, host.metrics_at = 5.0, 8, envoy_scale, 100.0
    assert host.in_flight(100.0) == 8
    assert host.in_flight(100.02) == pytest.approx(8 - 4 / envoy_scale)
    assert host.in_flight(100.2) == 0


# --- profiles, pickers, saturation, sequences ------------------------------------------------------------


@pytest.mark.parametrize("service_ms", [None, 0.0, 5.0])
@pytest.mark.parametrize("pending", [0, 3])
@pytest.mark.parametrize("scraped_at", [None, 100.0])
@pytest.mark.parametrize(("instances", "envoy_scale"), [(1, 1.0), (2, 3.0)])
def test_a_candidate_reads_the_same_in_flight_as_its_host(
    service_ms: float | None, pending: int, scraped_at: float | None, instances: int, envoy_scale: float
) -> None:
    """Candidates resolve the drain rate and Triton's queue once; the live estimate must read the same."""
    host = HostState(fleet().hosts[0])
    host.load.service_ms, host.load.pending, host.load.envoy_scale = service_ms, pending, envoy_scale
    host.metrics_at, host.batching = scraped_at, {"embed": Batching(max_batch=4, instances=instances)}
    (candidate,) = prepare([host], "embed")
    at = [100.0, 100.001, 100.01, 100.05, 101.0]
    assert [candidate.in_flight(t) for t in at] == [host.in_flight(t) for t in at], "no estimate yet"
    host.reset_estimate(4, 100.0)
    for t in at:
        host.record_pick(t, weight=2)
        assert candidate.in_flight(t + 0.002) == pytest.approx(host.in_flight(t + 0.002)), t


def firsts(scheduler: Scheduler, request: InferenceRequest, n: int) -> Counter[str]:
    return Counter(names(scheduler.decide(request))[0] for _ in range(n))


def test_profile_resolution_model_then_tier_then_default() -> None:
    f = fleet(
        picker={"profile": {"picker": "argmax"}, "tiers": {"gpu": {"picker": "round_robin"}}},
        models=[
            {"name": "mlp", "tiers": ["cpu", "gpu"]},
            {"name": "embed", "tiers": ["gpu"], "profile": {"picker": "power_of_two"}},
        ],
    )
    mlp, embed = f.model("mlp"), f.model("embed")
    assert f.profile(embed, Tier.GPU).picker == "power_of_two"
    assert f.profile(mlp, Tier.GPU).picker == "round_robin"
    assert f.profile(mlp, Tier.CPU).picker == "argmax"


@pytest.mark.parametrize("picker", registry.PICKERS.names())
def test_every_picker_routes_only_to_candidates(picker: str) -> None:
    f = fleet(picker={"profile": {"picker": picker}})
    s = Datastore(f, clock=frozen)
    live(s, {"g1": ["embed"], "g2": ["embed"], "g3": ["mlp"]})
    s.hosts["g2"].envoy.ejected = True
    scheduler = Scheduler(f, s, random.Random(1))
    assert firsts(scheduler, http("embed"), 50) == {"g1": 50}


def test_round_robin_ignores_load() -> None:
    f = fleet(picker={"profile": {"picker": "round_robin"}})
    s = Datastore(f, clock=frozen)
    live(s, {"g1": ["embed"], "g2": ["embed"], "g3": ["embed"]})
    busy(s.hosts["g1"], 50)
    assert set(firsts(Scheduler(f, s), http("embed"), 30).values()) == {10}


def test_power_of_two_and_weighted_random_prefer_idle_hosts() -> None:
    for picker in ("power_of_two", "weighted_random"):
        f = fleet(picker={"profile": {"picker": picker}})
        s = Datastore(f, clock=frozen)
        live(s, {"g1": ["embed"], "g2": ["embed"], "g3": ["embed"]})
        busy(s.hosts["g1"], 40)
        busy(s.hosts["g2"], 40)
        scheduler, counts = Scheduler(f, s, random.Random(7)), Counter[str]()
        for _ in range(300):
            counts[names(scheduler.decide(http("embed")))[0]] += 1
            for host in s.hosts.values():
                busy(host, host.envoy.active)  # as if Envoy's poll came in after every pick
        # Each host is idle or busy for the whole run: the idle one should win most of the time.
        assert counts["g3"] > 200, (picker, counts)


@pytest.mark.parametrize("n", [5, 200])
def test_power_of_two_draws_its_sample_lazily_but_correctly(n: int) -> None:
    hosts = [{"name": f"h{i}", "address": f"10.1.{i // 256}.{i % 256}", "tier": "gpu"} for i in range(n)]
    f = parse_fleet({"hosts": hosts, "models": [{"name": "m"}], "picker": {"profile": {"picker": "power_of_two"}}})
    s = Datastore(f, clock=frozen)
    live(s, {f"h{i}": ["m"] for i in range(n)})
    for i in range(0, n, 2):
        s.hosts[f"h{i}"].envoy.ejected = True
    scheduler = Scheduler(f, s, random.Random(3))
    chosen = {h for _ in range(300) for h in names(scheduler.decide(http("m")))}
    assert chosen and all(int(h[1:]) % 2 == 1 for h in chosen)


def test_scorer_weights_change_the_order(store: Datastore) -> None:
    store.hosts["g1"].load.pending = 9
    busy(store.hosts["g2"], 9)
    in_flight = fleet(picker={"profile": {"scorers": {"in_flight": 1}}})
    pending = fleet(picker={"profile": {"scorers": {"pending_queue": 1}}})
    # in_flight counts Triton's queue too (it is in flight), so g1 and g2 are both busy there.
    assert names(Scheduler(in_flight, store).decide(http("embed")))[0] == "g3"
    assert names(Scheduler(pending, store).decide(http("embed")))[-1] == "g1"


def saturated_store(**picker: Any) -> tuple[Fleet, Datastore]:
    f = fleet(picker={"saturation": {"max_in_flight": 4}, **picker})
    s = Datastore(f, clock=frozen)
    live(s, {"g1": ["embed", "mlp"], "g2": ["embed"], "c1": ["mlp"]})
    for name in ("g1", "g2", "c1"):
        busy(s.hosts[name], 5)
    return f, s


def test_saturation_sheds_sheddable_requests_only() -> None:
    f, s = saturated_store()
    scheduler = Scheduler(f, s)
    shed = scheduler.decide(InferenceRequest(Protocol.HTTP, "embed", priority=Priority.SHEDDABLE))
    assert isinstance(shed, Reject) and shed.status == 429 and shed.retry_after
    standard = route(scheduler.decide(http("embed")))
    assert standard.reason == "saturated" and standard.hosts
    critical = scheduler.decide(InferenceRequest(Protocol.HTTP, "embed", priority=Priority.CRITICAL))
    assert isinstance(critical, Route)


def test_no_request_is_shed_in_the_second_after_the_process_resumes() -> None:
    """After a stop (no beat for 10 s) the requests that waited for the picker arrive at once, some already
    sent on by Envoy, so the picker's own picks overcount: for RESUME_S it routes even sheddable requests
    to the classified tier; after that it sheds again."""
    f, s = saturated_store()
    s.beat(frozen() - 10.0)
    s.beat(frozen())
    scheduler = Scheduler(f, s)
    assert scheduler.resuming(frozen())
    sheddable = route(scheduler.decide(InferenceRequest(Protocol.HTTP, "embed", priority=Priority.SHEDDABLE)))
    assert sheddable.reason == "classified"
    assert route(scheduler.decide(http("mlp", size=10))).tier is Tier.CPU  # no spillover either
    f, s = saturated_store()
    s.beat(frozen() - RESUME_S - 10.0)
    s.beat(frozen() - RESUME_S)
    scheduler = Scheduler(f, s)
    assert not scheduler.resuming(frozen())
    shed = scheduler.decide(InferenceRequest(Protocol.HTTP, "embed", priority=Priority.SHEDDABLE))
    assert isinstance(shed, Reject) and shed.status == 429


def test_the_resumption_lasts_at_least_a_message_timeout() -> None:
    f, s = saturated_store(message_timeout_ms=2500)
    s.beat(frozen() - 12.0)
    s.beat(frozen() - 2.0)
    assert Scheduler(f, s).resuming(frozen())


def test_another_models_queue_does_not_saturate_a_shared_host() -> None:
    """max_queue_ms reads the expected completion as the scorer does: on g1, which also serves mlp, an embed
    request waits behind embed's part of the count (1 of 21 requests: 2 ms at 2 ms a request), not behind
    all of it (42 ms); g2, with 40 embed requests, is over the limit."""
    f = fleet(picker={"saturation": {"max_in_flight": 100, "max_queue_ms": 30}})
    s = Datastore(f, clock=frozen)
    live(s, {"g1": ["embed", "mlp"], "g2": ["embed"]})
    g1 = s.hosts["g1"]
    busy(g1, 0)
    for model in ["mlp"] * 20 + ["embed"]:
        g1.record_pick(frozen(), model=model)
    busy(s.hosts["g2"], 40)
    sheddable = InferenceRequest(Protocol.HTTP, "embed", priority=Priority.SHEDDABLE)
    assert names(route(Scheduler(f, s).decide(sheddable))) == ["g1", "g2"]
    g1.record_pick(frozen(), weight=20, model="embed")  # now 21 of 41 are embed's: 42 ms
    assert isinstance(Scheduler(f, s).decide(sheddable), Reject)


def test_saturated_tier_spills_over_to_a_free_one() -> None:
    f, s = saturated_store()
    busy(s.hosts["g1"], 0)
    decision = route(Scheduler(f, s).decide(http("mlp", size=10)))  # classified cpu, c1 is saturated
    assert decision.tier is Tier.GPU and decision.reason == "spillover" and names(decision) == ["g1", "c1"]


def test_spillover_can_be_turned_off() -> None:
    f, s = saturated_store(profile={"spillover": False})
    busy(s.hosts["g1"], 0)
    decision = route(Scheduler(f, s).decide(http("mlp", size=10)))
    assert decision.tier is Tier.CPU and decision.reason == "saturated"


def sequence(model: str, sequence_id: str, start: bool = False) -> InferenceRequest:
    return InferenceRequest(Protocol.GRPC, model, sequence_id=sequence_id, sequence_start=start)


def test_sequences_stay_on_one_host_whatever_the_load(store: Datastore) -> None:
    scheduler = Scheduler(store.fleet, store)
    homes = {}
    for seq in map(str, range(40)):
        homes[seq] = names(scheduler.decide(sequence("embed", seq)))[0]
    assert len(set(homes.values())) == 3  # spread over the hosts
    for name in ("g1", "g2", "g3"):
        busy(store.hosts[name], 30 if name == homes["0"] else 0)
    for seq, home in homes.items():
        assert names(scheduler.decide(sequence("embed", seq)))[0] == home
    # Another picker process (another replica) agrees without shared state.
    assert names(Scheduler(store.fleet, store).decide(sequence("embed", "0")))[0] == homes["0"]


def test_sequences_move_only_when_their_host_dies(store: Datastore) -> None:
    scheduler = Scheduler(store.fleet, store)
    homes = {seq: names(scheduler.decide(sequence("embed", seq)))[0] for seq in map(str, range(60))}
    store.hosts["g2"].envoy.ejected = True
    store.changed()  # as Envoy's poll does
    lost = {seq for seq, home in homes.items() if home == "g2"}
    for seq, home in homes.items():
        decision = scheduler.decide(sequence("embed", seq))
        if seq in lost:
            # Its state stayed on g2: the client is told to start it again, not sent to a host that would
            # refuse it for lacking the START flag.
            assert isinstance(decision, Reject) and decision.status == 409, decision
        else:
            assert names(decision)[0] == home
    restarted = {seq: names(scheduler.decide(sequence("embed", seq, start=True)))[0] for seq in lost}
    assert lost and "g2" not in restarted.values()


def test_a_correlation_id_pins_only_sequence_models(store: Datastore) -> None:
    """A client cannot choose the host of a model that keeps no sequence state by sending a correlation id:
    such requests are balanced (and shed) like any other."""
    scheduler = Scheduler(store.fleet, store)
    for name in ("g1", "g2", "g3"):
        busy(store.hosts[name], 0)
    home = names(scheduler.decide(sequence("embed", "7")))[0]
    busy(store.hosts[home], 40)
    store.changed()
    assert names(scheduler.decide(sequence("embed", "7")))[0] == home  # a sequence model: pinned
    store.hosts["g1"].batching["mlp"] = Batching(max_batch=8)
    busy(store.hosts["c1"], 40)
    busy(store.hosts["g1"], 0)
    store.changed()
    f = fleet(models=[{"name": "mlp", "tiers": ["cpu", "gpu"]}])
    mlp = InferenceRequest(Protocol.HTTP, "mlp", None, 10, sequence_id="7")
    decision = route(Scheduler(f, store).decide(mlp))
    assert decision.reason != "sequence"
    # An unlisted model is a sequence model when a host serves it with a sequence batcher.
    store.hosts["g1"].batching["mlp"] = Batching(max_batch=8, sequence=True)
    store.changed()
    assert route(Scheduler(f, store).decide(mlp)).reason == "sequence"


def test_draining_host_gets_nothing_new_whatever_the_profile(store: Datastore) -> None:
    store.hosts["g1"].draining = True
    for profile in ({}, {"filters": ["model_ready"]}):
        f = fleet(picker={"profile": profile})
        assert "g1" not in {h for _ in range(20) for h in names(Scheduler(f, store).decide(http("embed")))}
        assert "g1" not in names(Scheduler(f, store).decide(sequence("embed", "5")))


def test_expected_completion_uses_the_models_own_times(store: Datastore) -> None:
    """g1 is quick on average (its other models are fast) but slow for embed; g2 is the reverse."""
    g1, g2 = store.hosts["g1"], store.hosts["g2"]
    g1.load.service_ms, g1.load.exec_ms = 1.0, 1.0
    g2.load.service_ms, g2.load.exec_ms = 10.0, 10.0
    g1.load.models = {"embed": ModelTimes(service_ms=40.0, exec_ms=40.0)}
    g2.load.models = {"embed": ModelTimes(service_ms=5.0, exec_ms=5.0)}
    busy(store.hosts["g3"], 50)
    assert names(Scheduler(store.fleet, store).decide(http("embed")))[0] == "g2"


def test_expected_completion_counts_the_requests_own_models_part_of_a_shared_host(store: Datastore) -> None:
    """g1 serves mlp and embed: of its 7 requests in flight 6 are mlp's, which Triton queues and runs apart
    from embed's, so an embed request waits behind 1 there and behind 3 on g2 (which serves embed only)."""
    g1, g2 = store.hosts["g1"], store.hosts["g2"]
    busy(g1, 0)
    for model in ["mlp"] * 6 + ["embed"]:
        g1.record_pick(frozen(), model=model)
    busy(g2, 3)
    busy(store.hosts["g3"], 100)
    assert g1.in_flight(frozen()) == 7
    assert g1.model_part("embed", frozen()) == pytest.approx(1 / 7)
    assert names(Scheduler(store.fleet, store).decide(http("embed")))[0] == "g1"
    # Where the picker knows of one model's requests only, the host's whole count is that model's.
    g1.model_estimates.pop("embed")
    assert g1.model_part("embed", frozen()) == 1.0
    assert names(Scheduler(store.fleet, store).decide(http("embed")))[0] == "g2"


def test_a_deep_queue_on_a_batching_host_drains_at_its_best_rate(store: Datastore) -> None:
    """g1 batches well under load (3 ms a request at full batches, 10 ms now at small ones): with 6 in flight
    it still beats an idle host whose single execution takes 40 ms."""
    g1, g2 = store.hosts["g1"], store.hosts["g2"]
    g1.load.models = {"embed": ModelTimes(service_ms=10.0, exec_ms=12.0, drain_ms=3.0)}
    g2.load.models = {"embed": ModelTimes(service_ms=40.0, exec_ms=40.0, drain_ms=40.0)}
    busy(g1, 6)
    busy(store.hosts["g3"], 100)
    assert names(Scheduler(store.fleet, store).decide(http("embed")))[0] == "g1"


def test_a_short_queue_joins_the_next_batch_on_a_fitted_host(store: Datastore) -> None:
    """With exec(b) = 8 + 2b ms and batches of up to 8, a request behind 9 others finishes in ~24 ms (the
    running batch half done, then a batch of two): sooner than alone on a 4x slower idle host (40 ms),
    although the per-request average would say otherwise (43 ms). Without the fit or the model config the
    scorer falls back to the per-request estimate and prefers the idle host."""
    g1, g2 = store.hosts["g1"], store.hosts["g2"]
    fast, slow = BatchCost(8.0, 2.0), BatchCost(32.0, 8.0)
    g1.load.models = {"embed": ModelTimes(service_ms=4.0, exec_ms=16.0, drain_ms=3.0, cost=fast)}
    g2.load.models = {"embed": ModelTimes(service_ms=40.0, exec_ms=40.0, drain_ms=40.0, cost=slow)}
    busy(g1, 9)
    store.hosts["g3"].load.models = dict(g2.load.models)
    busy(store.hosts["g3"], 100)
    decide = Scheduler(store.fleet, store).decide
    assert names(decide(http("embed")))[0] == "g2", "no model config read yet: per-request estimate"
    for host in store.hosts.values():
        host.batching = {"embed": Batching(max_batch=8, instances=1)}
    store.changed()  # as the collector does after reading model configs
    assert names(decide(http("embed")))[0] == "g1"
    busy(g1, 24)  # three full batches ahead: now the idle slow host is sooner
    assert names(decide(http("embed")))[0] == "g2"


def test_an_unfitted_host_gets_the_fitted_shape_scaled_to_its_speed(store: Datastore) -> None:
    """g2 only ever ran batches of one (40 ms): no fit of its own. Scaled from g1's shape (fixed = 4 x
    per-item) it is 4x slower in both parts, so it is used only once g1 has a full batch queued."""
    g1, g2 = store.hosts["g1"], store.hosts["g2"]
    g1.load.models = {"embed": ModelTimes(service_ms=4.0, exec_ms=16.0, drain_ms=3.0, cost=BatchCost(8.0, 2.0))}
    g2.load.models = {"embed": ModelTimes(service_ms=40.0, exec_ms=40.0, drain_ms=40.0)}
    for host in store.hosts.values():
        host.batching = {"embed": Batching(max_batch=8, instances=1)}
    store.hosts["g3"].load.models = dict(g2.load.models)
    busy(store.hosts["g3"], 100)
    decide = Scheduler(store.fleet, store).decide
    busy(g1, 12)  # a running batch of 8 (24 ms, half done), then a batch of 5: 30 ms
    assert names(decide(http("embed")))[0] == "g1"
    busy(g1, 16)  # ... then a full batch, then alone: 46 ms
    assert names(decide(http("embed")))[0] == "g2"
    costs = [c.completion_ms(c.in_flight(frozen())) for c in prepare([g1, g2], "embed")]
    assert costs[1] == pytest.approx(20.0 + 40.0), "the request just sent there, half done, then its own"


def test_multi_row_requests_fill_batches_sooner(store: Datastore) -> None:
    """max_batch counts rows: with 4-row requests a batch of 8 rows holds two of them, so 6 requests queued
    on the fast host are three batches (not one), and the idle host that is 2x slower per row is sooner."""
    assert store.hosts["g3"].tier is store.hosts["g1"].tier
    g1, g2 = store.hosts["g1"], store.hosts["g2"]
    g1.load.models = {
        "embed": ModelTimes(
            service_ms=12.0, exec_ms=24.0, drain_ms=12.0, cost=BatchCost(8.0, 2.0), rows_per_request=4.0
        )
    }
    g2.load.models = {
        "embed": ModelTimes(
            service_ms=24.0, exec_ms=48.0, drain_ms=24.0, cost=BatchCost(16.0, 4.0), rows_per_request=4.0
        )
    }
    for host in store.hosts.values():
        host.batching = {"embed": Batching(max_batch=8, instances=1)}
    store.hosts["g3"].load.models = dict(g2.load.models)
    busy(store.hosts["g3"], 100)
    busy(g1, 6)
    g2_cost, g1_cost = (c.completion_ms(c.in_flight(frozen())) for c in prepare([g2, g1], "embed"))
    assert g1_cost == pytest.approx(24.0 / 2 + 2 * 24.0 + 16.0)
    assert g2_cost == pytest.approx(16.0 + 4.0 * 4)  # idle: alone, at once
    assert names(Scheduler(store.fleet, store).decide(http("embed")))[0] == "g2"
    for host in (g1, g2):  # the same queue, of one-row requests (g3 shares g2's times): one batch
        host.load.models["embed"].rows_per_request = 1.0
    store.changed()
    assert names(Scheduler(store.fleet, store).decide(http("embed")))[0] == "g1"


@given(
    costs=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=2, max_size=12),
    turn=st.integers(min_value=0, max_value=50),
    keep=st.integers(min_value=1, max_value=8),
)
def test_argmax_ranks_as_a_stable_sort_from_the_turns_host(costs: list[float], turn: int, keep: int) -> None:
    """The cheapest ``max_hosts`` in order of cost, ties in turn order starting at this turn's host."""
    store = Datastore(fleet())
    host = store.hosts["g1"]
    # Distinct base_ms only to tell the candidates apart (no scorer reads it: the costs are the static ones).
    candidates = [Candidate(host, float(i), 1.0, static_cost=c) for i, c in enumerate(costs)]
    context = registry.Context(keep, 3.0, random.Random())
    context._turn = turn
    n = len(costs)
    start = (turn + 1) % n
    walk = [*range(start, n), *range(start)]
    expected = sorted(walk, key=costs.__getitem__)[:keep]
    ranked = Argmax(context).pick(candidates, (), 0.0)
    assert [candidates.index(c) for c in ranked] == expected


def test_only_allowed_endpoints_are_candidates(store: Datastore) -> None:
    """A gateway's subset hint (InferenceRequest.allowed): the pick is among those endpoints only, ranked
    there, and counted on the host picked; none usable: no route (503)."""
    f = fleet(picker={"max_hosts": 1})
    busy(store.hosts["g2"], 9)
    busy(store.hosts["g3"], 5)
    request = InferenceRequest(Protocol.HTTP, "embed", allowed=frozenset({"10.0.0.2:8000", "10.0.0.3:8000"}))
    assert names(Scheduler(f, store).decide(request)) == ["g3"]  # g1, the least busy, is not allowed
    assert store.hosts["g3"].estimate == 6 and store.hosts["g1"].estimate == 0
    grpc = InferenceRequest(Protocol.GRPC, "embed", allowed=frozenset({"10.0.0.2:8001"}))
    assert names(Scheduler(f, store).decide(grpc)) == ["g2"]  # the endpoint of the request's protocol
    wrong_port = InferenceRequest(Protocol.HTTP, "embed", allowed=frozenset({"10.0.0.2:8001"}))
    decision = Scheduler(f, store).decide(wrong_port)
    assert isinstance(decision, Reject) and decision.status == 503
    health = InferenceRequest(Protocol.HTTP, allowed=frozenset({"10.0.0.3:8000"}))
    assert names(Scheduler(f, store).decide(health)) == ["g3"]  # requests that name no model too


def sized_store() -> Datastore:
    """g1 and g2 serve "embed" at exec(rows) = 4 + 1 ms per row, up to 32 rows a batch, and Triton counted 4
    rows per request on average; g3 is out of the way."""
    s = Datastore(fleet(), clock=frozen)
    live(s, {"g1": ["embed"], "g2": ["embed"], "g3": ["embed"]})
    for host in s.hosts.values():
        host.load.models = {
            "embed": ModelTimes(
                service_ms=4.0, exec_ms=12.0, drain_ms=4.0, cost=BatchCost(4.0, 1.0), rows_per_request=4.0
            )
        }
        host.batching = {"embed": Batching(max_batch=32, instances=1)}
    busy(s.hosts["g3"], 100)
    s.changed()
    return s


def grpc(model: str, rows: int | None = None, size: int | None = None) -> InferenceRequest:
    return InferenceRequest(Protocol.GRPC, model, size_bytes=size, rows=rows)


def test_requests_in_flight_count_their_work() -> None:
    """A host with one 24-row request in flight is busier than one with three 1-row requests: the picks
    carry their work (in requests of the model's mean size), and the scorer charges the request its own."""
    store = sized_store()
    decide = Scheduler(store.fleet, store).decide
    big = route(decide(grpc("embed", rows=24)))
    assert big.work == pytest.approx(24 / 4), "against Triton's mean rows until the picker has seen enough"
    busy_host = big.hosts[0].name
    small = [names(decide(grpc("embed", rows=1)))[0] for _ in range(3)]
    assert busy_host not in small, "the same count in flight, a sixth of the work"
    g1, g2 = store.hosts["g1"], store.hosts["g2"]
    assert g1.in_flight(frozen()) + g2.in_flight(frozen()) == pytest.approx(4.0), "counts are still requests"
    heavy, light = (store.hosts[busy_host], g2 if busy_host == "g1" else g1)
    assert heavy.picks_excess(heavy.in_flight(frozen())) == pytest.approx(6.0 - 1.0)
    assert light.picks_excess(light.in_flight(frozen())) == pytest.approx(3 * (1 / 4 - 1)), "a sixth of the work"
    assert heavy.drained(frozen()) == pytest.approx((1.0, 6.0)), "the estimate's (count, work)"
    assert light.drained(frozen()) == pytest.approx((3.0, 3 / 4))
    # The request's own size: a full batch's worth is dearer than a row wherever it goes.
    (candidate,) = prepare([store.hosts["g3"]], "embed")
    assert candidate.completion_ms(0.0, 32 / 4) == pytest.approx(4.0 + 32.0)
    assert candidate.completion_ms(0.0, 1 / 4) == pytest.approx(4.0 + 1.0)


def test_request_work_from_rows_hint_bytes_or_the_mean() -> None:
    """Rows where the request has them (capped at max_batch); a REST request's size against the mean size
    of the model's REST requests, once the picker has seen enough of them; else the mean (1)."""
    store = sized_store()
    scheduler = Scheduler(store.fleet, store)
    (candidate,) = prepare([store.hosts["g1"]], "embed")
    assert scheduler.work(http("embed", 1000), candidate) == 1.0, "no sizes seen yet"
    for _ in range(20):
        scheduler.decide(http("embed", 1000))
    assert scheduler.work(http("embed", 3000), candidate) == pytest.approx(3.0)
    assert scheduler.work(http("embed", 10**9), candidate) == pytest.approx(32 / 4), "at most max_batch rows"
    assert scheduler.work(http("embed", 1), candidate) == pytest.approx(1 / 4), "at least one row"
    assert scheduler.work(grpc("embed", size=3000), candidate) == 1.0, "gRPC sizes are averaged apart"
    assert scheduler.work(grpc("embed", rows=8), candidate) == pytest.approx(8 / 4)
    assert scheduler.work(grpc("embed", rows=1000), candidate) == pytest.approx(32 / 4)
    for _ in range(20):
        scheduler.decide(grpc("embed", rows=2))
    assert scheduler.work(grpc("embed", rows=8), candidate) == pytest.approx(8 / 2), "the picker's own mean"
    # REST bodies with binary tensors: their tensor bytes against those of the model's other such requests
    # (the JSON around a tensor's numbers is no part of its size).
    binary = InferenceRequest(Protocol.HTTP, "embed", size_bytes=3200, tensor_bytes=3000)
    assert scheduler.work(binary, candidate) == 1.0, "no binary sizes seen yet"
    for _ in range(20):
        scheduler.decide(InferenceRequest(Protocol.HTTP, "embed", size_bytes=1200, tensor_bytes=1000))
    assert scheduler.work(binary, candidate) == pytest.approx(3.0)
    assert scheduler.work(http("embed", 3000), candidate) == pytest.approx(3.0), "JSON bodies averaged apart"
    for host in store.hosts.values():  # a model that does not batch: sizes are not used
        host.batching = {"embed": Batching(max_batch=1, instances=1)}
    store.changed()
    (candidate,) = prepare([store.hosts["g1"]], "embed")
    assert scheduler.work(grpc("embed", rows=8), candidate) == 1.0


@pytest.mark.parametrize("hosts", [INLINE_PREPARE_HOSTS, INLINE_PREPARE_HOSTS + 1])
def test_a_large_plan_is_prepared_again_after_the_decision_never_on_an_old_layout(hosts: int) -> None:
    """A plan of more than INLINE_PREPARE_HOSTS hosts ranks on the scores it has until refresh(), which
    the edge calls once it has answered; a smaller one is prepared again within the decision. Either
    drops a drained host at once."""
    data = {
        "hosts": [{"name": f"g{i}", "address": f"10.0.{i // 256}.{i % 256}", "tier": "gpu"} for i in range(hosts)],
        "models": [{"name": "mlp", "tiers": ["gpu"]}],
    }
    store = Datastore(parse_fleet(data), clock=frozen)
    live(store, {f"g{i}": ["mlp"] for i in range(hosts)})
    target = store.hosts["g5"]
    target.load.service_ms = 1000.0
    scheduler = Scheduler(store.fleet, store)
    assert names(scheduler.decide(http("mlp")))[0] != "g5"

    for host in store.hosts.values():  # a scrape: now every host but g5 is slow
        store.set_load(host, dataclasses.replace(host.load, service_ms=2.0 if host is target else 1000.0))
    second = names(scheduler.decide(http("mlp")))[0]
    if hosts > INLINE_PREPARE_HOSTS:
        assert second != "g5" and scheduler.refresh_due
        scheduler.refresh()
    assert not scheduler.refresh_due
    assert names(scheduler.decide(http("mlp")))[0] == "g5"

    store.set_draining(target, True)
    assert "g5" not in names(scheduler.decide(http("mlp")))


@pytest.mark.parametrize("hosts", [INLINE_PREPARE_HOSTS, INLINE_PREPARE_HOSTS + 1])
def test_a_version_unloaded_leaves_its_plan_at_once(hosts: int) -> None:
    """A host whose model changes versions (the same model READY, another version) changes the layout:
    a request for the version it no longer has never goes there, even on a large plan's old scores."""
    data = {
        "hosts": [{"name": f"g{i}", "address": f"10.0.{i // 256}.{i % 256}", "tier": "gpu"} for i in range(hosts)],
        "models": [{"name": "mlp", "tiers": ["gpu"]}],
    }
    store = Datastore(parse_fleet(data), clock=frozen)
    live(store, {f"g{i}": ["mlp"] for i in range(hosts)}, service_ms=1000.0)
    target = store.hosts["g5"]
    target.load.service_ms = 2.0
    scheduler = Scheduler(store.fleet, store)
    assert names(scheduler.decide(http("mlp", version="1")))[0] == "g5"
    store.update_index(target, {"mlp": frozenset({"2"})}, target.known, store.now())
    assert "g5" not in names(scheduler.decide(http("mlp", version="1")))
    assert names(scheduler.decide(http("mlp", version="2"))) == ["g5"]
