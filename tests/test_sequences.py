"""Open-sequence accounting (extproc.datapath.scheduling.sequences) over hand-built hosts, and through the scheduler."""

from __future__ import annotations

from extproc.config import parse_fleet
from extproc.datapath.batch_cost import Batching
from extproc.datapath.datastore import Datastore, HostState
from extproc.datapath.scheduling.scheduler import Scheduler
from extproc.datapath.scheduling.sequences import OpenSequences
from extproc.datapath.scheduling.types import InferenceRequest, Protocol, Reject, Route

SLOTS = 4
IDLE_S = 10.0


def host() -> HostState:
    fleet = parse_fleet({"hosts": [{"name": "g1", "address": "10.0.0.1", "tier": "gpu"}]})
    state = Datastore(fleet).hosts["g1"]
    state.batching["seq"] = Batching(8, 1, sequence=True, sequence_slots=SLOTS, sequence_idle_s=IDLE_S)
    return state


def seq(sequence_id: str, start: bool = False, end: bool = False) -> InferenceRequest:
    return InferenceRequest(Protocol.GRPC, "seq", sequence_id=sequence_id, sequence_start=start, sequence_end=end)


def test_new_sequences_are_refused_while_every_slot_is_taken() -> None:
    g1, open_ = host(), OpenSequences()
    for i in range(SLOTS):
        assert open_.admit(g1, seq(str(i), start=True), 0.0) is None
    refused = open_.admit(g1, seq("new", start=True), 1.0)
    assert refused is not None and f"all {SLOTS} sequence slots" in refused.message
    assert refused.status == 429 and refused.reason == "sequence_slots" and refused.retry_after
    # Sequences already open go on; one that ends frees its slot.
    assert open_.admit(g1, seq("2"), 1.0) is None
    assert open_.admit(g1, seq("2", end=True), 1.0) is None
    assert open_.admit(g1, seq("new", start=True), 1.0) is None


def test_idle_sequences_free_their_slot_as_triton_does() -> None:
    g1, open_ = host(), OpenSequences()
    for i in range(SLOTS):
        open_.admit(g1, seq(str(i), start=True), float(i))
    assert open_.admit(g1, seq("new", start=True), IDLE_S) is not None
    # Sequence 0 (last seen at 0) is idle past IDLE_S at IDLE_S + 0.5: its slot is free again.
    assert open_.admit(g1, seq("new", start=True), IDLE_S + 0.5) is None


def test_a_continuation_whose_start_was_not_seen_counts_too() -> None:
    """Its start went through another picker (a restart, another replica): it holds a slot all the same."""
    g1, open_ = host(), OpenSequences()
    for i in range(SLOTS):
        open_.admit(g1, seq(str(i)), 0.0)
    assert open_.admit(g1, seq("new", start=True), 0.0) is not None


def test_a_worker_counts_each_sequence_for_the_workers_it_stands_for() -> None:
    g1, open_ = host(), OpenSequences(weight=2)
    for i in range(SLOTS // 2):
        open_.admit(g1, seq(str(i), start=True), 0.0)
    assert open_.admit(g1, seq("new", start=True), 0.0) is not None


def test_a_model_whose_slots_are_unknown_is_never_refused() -> None:
    g1, open_ = host(), OpenSequences()
    del g1.batching["seq"]
    for i in range(100):
        assert open_.admit(g1, seq(str(i), start=True), 0.0) is None


def test_the_scheduler_answers_429_for_a_start_that_would_wait() -> None:
    fleet = parse_fleet(
        {
            "hosts": [{"name": "g1", "address": "10.0.0.1", "tier": "gpu"}],
            "models": [{"name": "seq", "tiers": ["gpu"], "sequence": True}],
            # One client here: its share is every slot.
            "picker": {"overload": {"max_sequence_share": 1.0}},
        }
    )
    store = Datastore(fleet, clock=lambda: 100.0)
    g1 = store.hosts["g1"]
    store.update_index(g1, {"seq": frozenset({"1"})}, frozenset({"seq"}), 100.0)
    g1.metrics_at = g1.envoy_at = 100.0
    g1.batching["seq"] = Batching(8, 1, sequence=True, sequence_slots=SLOTS, sequence_idle_s=IDLE_S)
    scheduler = Scheduler(fleet, store)
    for i in range(SLOTS):
        assert isinstance(scheduler.decide(seq(str(i), start=True)), Route)
    refused = scheduler.decide(seq("new", start=True))
    assert isinstance(refused, Reject) and refused.status == 429 and refused.retry_after
    assert isinstance(scheduler.decide(seq("1")), Route)


def test_a_sequence_whose_host_went_away_gets_a_clear_answer() -> None:
    """Its state stayed on the old host: the next request says so rather than reaching a host that answers
    "must specify the START flag"; a new start of the same id is served on the new host."""
    fleet = parse_fleet({"hosts": [{"name": f"g{i}", "address": f"10.0.0.{i}", "tier": "gpu"} for i in (1, 2)]})
    store = Datastore(fleet)
    g1, g2 = store.hosts["g1"], store.hosts["g2"]
    open_ = OpenSequences()
    assert open_.admit(g1, seq("7", start=True), 0.0) is None
    assert open_.admit(g1, seq("7"), 0.1) is None
    moved = open_.admit(g2, seq("7"), 0.2)  # g1 is gone: rendezvous now names g2
    assert moved is not None and "start it again" in moved.message and moved.status == 409
    assert open_.admit(g2, seq("7", start=True), 0.3) is None
    assert open_.admit(g2, seq("7"), 0.4) is None


def test_the_scheduler_answers_409_for_a_sequence_that_moved() -> None:
    fleet = parse_fleet(
        {
            "hosts": [{"name": f"g{i}", "address": f"10.0.0.{i}", "tier": "gpu"} for i in (1, 2)],
            "models": [{"name": "seq", "tiers": ["gpu"], "sequence": True}],
            # One client here: its share is every slot.
            "picker": {"overload": {"max_sequence_share": 1.0}},
        }
    )
    store = Datastore(fleet, clock=lambda: 100.0)
    for host in store.hosts.values():
        store.update_index(host, {"seq": frozenset({"1"})}, frozenset({"seq"}), 100.0)
        host.metrics_at = host.envoy_at = 100.0
    scheduler = Scheduler(fleet, store)
    first = scheduler.decide(seq("s", start=True))
    assert isinstance(first, Route)
    store.hosts[first.hosts[0].name].envoy.ejected = True
    store.changed()
    moved = scheduler.decide(seq("s"))
    assert isinstance(moved, Reject) and moved.status == 409 and moved.reason == "sequence_moved"


def test_one_client_holds_at_most_its_share_of_the_slots() -> None:
    """A client that starts sequences and never ends them takes its share (half) of the slots; the others
    stay for other clients. Its sequences already open go on."""
    g1, open_ = host(), OpenSequences(max_share=0.5)

    def send(sequence_id: str, client: str, start: bool = True, end: bool = False, at: float = 0.0) -> Reject | None:
        request = seq(sequence_id, start=start, end=end)
        request.client = client
        return open_.admit(g1, request, at)

    assert send("a1", "attacker") is None and send("a2", "attacker") is None
    refused = send("a3", "attacker")
    assert refused is not None and "holds 2 of the 4 sequence slots" in refused.message
    assert send("v1", "victim") is None and send("v2", "victim") is None
    assert send("a1", "attacker", start=False) is None  # a continuation of the attacker's
    # An ended sequence frees its client's share.
    assert send("a1", "attacker", start=False, end=True) is None
    assert send("a3", "attacker") is None
    # Idle sequences expire from their client's share as from the host's slots.
    assert send("a4", "attacker") is not None
    assert send("a5", "attacker", at=IDLE_S + 1.0) is None


def test_a_sequence_open_for_one_client_is_refused_to_another() -> None:
    """Triton's sequence ids are one namespace per host: another client could add to a sequence, end it, or
    restart it. Its own client goes on; once it ends (or idles out) the id is free."""
    g1, open_ = host(), OpenSequences()

    def send(client: str, start: bool = False, end: bool = False, at: float = 0.0) -> object:
        request = seq("42", start=start, end=end)
        request.client = client
        return open_.admit(g1, request, at)

    assert send("owner", start=True) is None
    for kind in ({}, {"end": True}, {"start": True}):
        refused = send("other", **kind)
        assert isinstance(refused, Reject) and refused.status == 403 and refused.reason == "sequence_owner", kind
    assert send("owner") is None and send("owner", end=True) is None
    assert send("other", start=True) is None  # ended: free
    assert send("owner", at=IDLE_S + 1.0) is None  # "other"'s sequence idled out: free again
