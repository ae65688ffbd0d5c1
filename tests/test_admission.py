"""Admission under overload: deadlines, limits per priority, refusals with a predicted retry-after, and fair
shares between clients, over a hand-built datastore (no servers). The real stack: tests/test_overload.py."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.config import ConfigError, Fleet, Tier
from extproc.datapath.datastore import Datastore, HostState
from extproc.datapath.protocol.request import grpc_timeout_ms, rest_request, rest_timeout_ms
from extproc.datapath.scheduling.admission import Admission
from extproc.datapath.scheduling.fairness import OVERFLOW_KEY, FairShares
from extproc.datapath.scheduling.scheduler import RESUME_S, Scheduler
from extproc.datapath.scheduling.types import InferenceRequest, Priority, Protocol, Reject, Route
from tests.test_scheduler import busy, fleet, frozen, live

# Each host takes 100 ms a request (no batching measured): n requests in flight -> (n + 1) x 100 ms.
SERVICE_MS = 100.0


def infer(
    model: str = "embed",
    priority: Priority = Priority.STANDARD,
    timeout_ms: float | None = None,
    client: str | None = None,
    size: int | None = None,
) -> InferenceRequest:
    return InferenceRequest(
        Protocol.HTTP, model, size_bytes=size, priority=priority, infer=True, timeout_ms=timeout_ms, client=client
    )


def queued(host: HostState, n: int, models: tuple[str, ...] = ("embed", "mlp")) -> None:
    """As if Envoy counted ``n`` requests in flight on ``host``, all of each of ``models`` (Triton's queue)."""
    busy(host, n)
    host.load.model_pending = dict.fromkeys(models, n)


MODELS = [
    {"name": "mlp", "tiers": ["cpu", "gpu"], "rules": [{"tier": "gpu", "min_bytes": 1000}]},
    {"name": "embed", "tiers": ["gpu"], "sequence": True, "deadline_ms": 2000},
]


def scheduler(in_flight: dict[str, int], **picker: Any) -> tuple[Scheduler, Datastore]:
    f = fleet(picker=picker, models=MODELS)
    s = Datastore(f, clock=frozen)
    live(s, {"g1": ["embed", "mlp"], "g2": ["embed"], "c1": ["mlp"]}, service_ms=SERVICE_MS)
    for name, n in in_flight.items():
        queued(s.hosts[name], n)
    return Scheduler(f, s), s


def refused(decision: Reject | Route, reason: str = "overloaded") -> Reject:
    assert isinstance(decision, Reject), decision
    assert decision.status == 429 and decision.reason == reason and decision.retry_after, decision
    return decision


def routed(decision: Reject | Route) -> Route:
    assert isinstance(decision, Route), decision
    return decision


# ------------------------------------------------------------------------------------------- deadlines


def test_the_deadline_is_the_clients_capped_by_the_models() -> None:
    admission = Admission(fleet(models=MODELS))
    assert admission.deadline_ms(infer()) == 2000  # models[].deadline_ms
    assert admission.deadline_ms(infer(timeout_ms=750.5)) == 750.5
    assert admission.deadline_ms(infer(timeout_ms=10_000)) == 2000  # never more than the model's
    assert admission.deadline_ms(infer("mlp", size=10)) == 60_000  # picker.overload.deadline_ms


def test_envoys_timeout_is_the_models_deadline_whatever_the_client_asks() -> None:
    """A client's shorter deadline is not Envoy's timeout: Envoy would count each one the host missed
    against it (3 in a row eject it), and a client choosing a deadline says nothing about the host."""
    sched, _ = scheduler({})
    assert routed(sched.decide(infer())).timeout_ms == 2000  # models[].deadline_ms
    assert routed(sched.decide(infer(timeout_ms=750.5))).timeout_ms == 2000
    assert routed(sched.decide(infer(timeout_ms=10_000))).timeout_ms == 2000
    assert routed(sched.decide(infer("mlp", size=10))).timeout_ms == 60_000  # picker.overload.deadline_ms
    # Only inference gets one: metadata and readiness keep the route's timeout.
    assert routed(sched.decide(InferenceRequest(Protocol.HTTP, "embed"))).timeout_ms is None


def test_client_deadline_headers() -> None:
    assert grpc_timeout_ms({"grpc-timeout": "2S"}) == 2000
    assert grpc_timeout_ms({"grpc-timeout": "1500m"}) == 1500
    assert grpc_timeout_ms({"grpc-timeout": "1M"}) == 60_000
    assert grpc_timeout_ms({"grpc-timeout": "99999999u"}) == pytest.approx(99_999.999)
    # Not a grpc-timeout: no deadline from the client (its model's applies).
    for bad in ("", "S", "2", "123456789S", "2s", "-1S", "0S", "1.5S", "²S"):
        assert grpc_timeout_ms({"grpc-timeout": bad}) is None, bad
    assert rest_timeout_ms({"x-triton-timeout-ms": "2000"}) == 2000
    for bad in ("", "0", "-5", "2e3", "1.5", " 20"):
        assert rest_timeout_ms({"x-triton-timeout-ms": bad}) is None, bad
    request = rest_request("/v2/models/embed/infer", {"x-triton-timeout-ms": "900", "x-triton-lb-client": "10.1.2.3"})
    assert request.infer and request.timeout_ms == 900 and request.client == "10.1.2.3"
    assert not rest_request("/v2/models/embed/versions/1/ready", {}).infer
    # x-triton-rows: the client's count of the request's rows, a positive integer within reason.
    assert rest_request("/v2/models/embed/infer", {"x-triton-rows": "24"}).rows == 24
    for bad in ("", "0", "-3", "2.5", " 4", "x", str(2**20 + 1), "9" * 30):
        assert rest_request("/v2/models/embed/infer", {"x-triton-rows": bad}).rows is None, bad
    assert rest_request("/v2/models/embed/versions/1/infer?x=1", {}).infer
    # Binary tensors: the bytes after the JSON part.
    binary = {"content-length": "4200", "inference-header-content-length": "200"}
    assert rest_request("/v2/models/embed/infer", binary).tensor_bytes == 4000
    for json_length in ("4200", "5000", "", "-1", "x"):
        lengths = {"content-length": "4200", "inference-header-content-length": json_length}
        assert rest_request("/v2/models/embed/infer", lengths).tensor_bytes is None, json_length
    assert rest_request("/v2/models/embed/infer", {"inference-header-content-length": "10"}).tensor_bytes is None
    assert rest_request("/v2/models/embed/infer", {"content-length": "4200"}).tensor_bytes is None


# ------------------------------------------------------------------------------------- limits by class


def test_standard_requests_are_refused_when_no_host_can_meet_half_their_deadline() -> None:
    # 2,000 ms deadline: standard may expect 1,000 ms, sheddable 500, critical 1,800.
    sched, _ = scheduler({"g1": 11, "g2": 11})  # 1,200 ms on either host
    refusal = refused(sched.decide(infer()))
    assert refusal.retry_after_s == 1  # the queue is 200 ms over the limit
    assert "within its deadline (2000 ms)" in refusal.message
    assert routed(sched.decide(infer(priority=Priority.CRITICAL))).timeout_ms == 2000
    refused(sched.decide(infer(priority=Priority.CRITICAL, timeout_ms=1000)))  # 900 ms allowed
    sched, _ = scheduler({"g1": 6, "g2": 6})  # 700 ms
    routed(sched.decide(infer()))
    refused(sched.decide(infer(priority=Priority.SHEDDABLE)))
    refused(sched.decide(infer(timeout_ms=1000)))  # a client deadline of 1 s leaves it 500 ms


def test_requests_that_waited_for_a_stopped_picker_are_admitted() -> None:
    """In the resumption after a stop (see Scheduler.resuming) the queues are this picker's picks of requests
    Envoy may already have sent on: nothing is refused as overload until it ends."""
    for resumed, admitted in ((frozen(), True), (frozen() - RESUME_S, False)):
        sched, store = scheduler({"g1": 11, "g2": 11})
        store.beat(resumed - 5.0)
        store.beat(resumed)
        decision = sched.decide(infer(priority=Priority.SHEDDABLE))
        assert routed(decision).hosts if admitted else refused(decision)


def test_retry_after_is_the_predicted_drain_time_capped() -> None:
    sched, _ = scheduler({"g1": 40, "g2": 40}, saturation={"max_in_flight": 1000})  # 4,100 ms: 3.1 s over
    assert refused(sched.decide(infer())).retry_after_s == 4
    sched, _ = scheduler({"g1": 400, "g2": 400}, saturation={"max_in_flight": 1000}, overload={"max_retry_after_s": 10})
    assert refused(sched.decide(infer())).retry_after_s == 10


def test_soft_limits_bind_standard_and_sheddable_but_not_critical() -> None:
    sched, _ = scheduler({"g1": 5, "g2": 5}, saturation={"max_in_flight": 4, "max_queue_ms": 10_000})
    refused(sched.decide(infer()))
    refused(sched.decide(infer(priority=Priority.SHEDDABLE)))
    routed(sched.decide(infer(priority=Priority.CRITICAL)))
    # max_queue_ms caps a long deadline's share for standard requests, not for critical ones.
    sched, _ = scheduler({"g1": 20, "g2": 20}, saturation={"max_queue_ms": 1000})  # 2,100 ms
    refused(sched.decide(infer("embed", timeout_ms=None)))
    f = fleet(picker={"saturation": {"max_queue_ms": 1000}}, models=[{"name": "embed", "deadline_ms": 60_000}])
    s = Datastore(f, clock=frozen)
    live(s, {"g1": ["embed"]}, service_ms=SERVICE_MS)
    queued(s.hosts["g1"], 20)
    refused(Scheduler(f, s).decide(infer()))
    routed(Scheduler(f, s).decide(infer(priority=Priority.CRITICAL)))


def test_another_models_queue_on_the_same_host_does_not_count() -> None:
    """Triton queues each model apart: g1 holds 50 embed requests (over every limit), and an mlp request
    sent there waits behind none of them."""
    sched, store = scheduler({})
    busy(store.hosts["g1"], 50)
    store.hosts["g1"].load.model_pending = {"embed": 50}
    busy(store.hosts["g2"], 50)
    store.hosts["g2"].load.model_pending = {"embed": 50}
    refused(sched.decide(infer("embed")))
    assert routed(sched.decide(infer("mlp", size=5000))).hosts[0].name == "g1"  # classified gpu
    # The picker's own picks count per model too, as Envoy's count only can per host.
    g1 = store.hosts["g1"]
    for _ in range(12):
        g1.record_pick(frozen(), model="mlp")
    assert routed(sched.decide(infer("mlp", size=5000))).tier is Tier.CPU  # g1 is over: c1 takes it


def test_a_tier_over_the_limit_spills_over_to_one_within_it() -> None:
    sched, store = scheduler({"c1": 30, "g1": 0})
    decision = routed(sched.decide(infer("mlp", size=10)))  # classified cpu, where c1 takes 3.1 s
    assert decision.tier is Tier.GPU and decision.reason == "spillover" and decision.hosts[0].name == "g1"
    queued(store.hosts["g1"], 30)
    refused(sched.decide(infer("mlp", size=10)))


def test_admission_off_keeps_the_least_busy_host_and_the_routes_timeout() -> None:
    sched, _ = scheduler({"g1": 50, "g2": 50}, overload={"admission": False})
    decision = routed(sched.decide(infer()))
    assert decision.reason == "saturated" and decision.timeout_ms is None
    assert isinstance(sched.decide(infer(priority=Priority.SHEDDABLE)), Reject)


def test_sequences_keep_their_host_whatever_the_load() -> None:
    sched, _ = scheduler({"g1": 50, "g2": 50})
    request = infer()
    request.sequence_id = "7"
    assert routed(sched.decide(request)).reason == "sequence"  # embed is a sequence model


# ------------------------------------------------------------------------------------------ fairness


def test_fair_shares() -> None:
    shares = FairShares(max_keys=3)
    now = 0.0
    assert not shares.over_share("m", "a", now)  # unknown
    for _ in range(8):
        shares.admitted("m", "a", now)
    assert not shares.over_share("m", "a", now)  # alone: no one to be fair to
    shares.admitted("m", "b", now)
    assert shares.over_share("m", "a", now) and not shares.over_share("m", "b", now)
    assert not shares.over_share("other", "a", now)  # per model
    # Keys beyond max_keys share one.
    for key in ("c", "d", "e", "f"):
        shares.admitted("m", key, now)
    assert shares.keys("m") == 4  # a, b, c and the overflow key that d, e and f share
    for _ in range(5):
        shares.admitted("m", "g", now)  # a minted key: into the overflow share too
    assert shares.over_share("m", "d", now) and shares.over_share("m", OVERFLOW_KEY, now)
    # A key that stops sending is forgotten; the others' counts decay.
    for _ in range(10):
        shares.admitted("m", "b", now + 7.0)
    assert not shares.over_share("m", "b", now + 7.0) and shares.keys("m") == 1


def test_a_client_over_its_share_is_refused_while_the_model_is_contended() -> None:
    sched, store = scheduler({"g1": 5, "g2": 5})  # 600 ms: over half of standard's 1,000 ms
    for _ in range(4):
        routed(sched.decide(infer(client="heavy")))
        queued(store.hosts["g1"], 5)
        queued(store.hosts["g2"], 5)
    routed(sched.decide(infer(client="light")))
    refusal = refused(sched.decide(infer(client="heavy")), "fair_share")
    assert refusal.retry_after_s == 1
    routed(sched.decide(infer(client="light")))  # below its share
    # Uncontended, a client takes what it wants.
    for name in ("g1", "g2"):
        queued(store.hosts[name], 0)
    routed(sched.decide(infer(client="heavy")))


def test_fleet_file_overload_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="fairness_header"):
        fleet(picker={"overload": {"fairness_header": "X Tenant"}})
    with pytest.raises(ConfigError, match="standard"):
        fleet(picker={"overload": {"deadline_shares": {"standard": 1.5}}})
    with pytest.raises(ConfigError, match="deadline_ms"):
        fleet(models=[{"name": "embed", "deadline_ms": 0}])
    f: Fleet = fleet(picker={"overload": {"fairness_header": "x-tenant"}})
    assert f.picker.overload.fairness_header == "x-tenant"


def test_a_client_that_stopped_no_longer_holds_a_share() -> None:
    """Three clients, then one stops: after a couple of seconds only the two still sending share the model,
    so the lighter one, below half, is not held to a third."""
    shares = FairShares(max_keys=16)
    for i in range(60):
        t = i * 0.05
        for _ in range(2):
            shares.admitted("m", "stopped", t)
            shares.admitted("m", "heavy", t)
        shares.admitted("m", "light", t)
    assert shares.over_share("m", "light", 3.0) is False
    for i in range(60, 120):  # "stopped" sends nothing from 3 s on; light now sends as much as heavy did
        t = i * 0.05
        for _ in range(2):
            shares.admitted("m", "heavy", t)
            shares.admitted("m", "light", t)
    assert shares.keys("m") == 3
    assert not shares.over_share("m", "light", 6.0)  # a third would be less than light's count
    assert shares.keys("m") == 2
