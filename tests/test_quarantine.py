"""The quarantine of requests in flight on a host that went down, over a hand-built datastore (no servers)."""

from __future__ import annotations

import dataclasses

import pytest

from extproc.config import parse_fleet
from extproc.datapath.datastore import Datastore
from extproc.datapath.metrics import PickerMetrics
from extproc.datapath.scheduling.quarantine import Quarantine

HOLD_S = 60.0
WINDOW_S = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> Datastore:
    fleet = parse_fleet({"hosts": [{"name": f"g{i}", "address": f"10.0.0.{i}", "tier": "gpu"} for i in (1, 2, 3)]})
    return Datastore(fleet, clock=clock)


@pytest.fixture
def quarantine(store: Datastore) -> Quarantine:
    return Quarantine(store, PickerMetrics(store), HOLD_S, WINDOW_S)


def down(store: Datastore, host: str, unhealthy: bool = True, ejected: bool = False) -> None:
    """As Envoy's admin poll writes it."""
    state = store.hosts[host]
    store.set_envoy(state, dataclasses.replace(state.envoy, unhealthy=unhealthy, ejected=ejected), store.now())


def test_a_request_in_flight_on_a_host_that_goes_down_is_refused_for_a_while(
    store: Datastore, quarantine: Quarantine, clock: Clock
) -> None:
    quarantine.routed(1, "g1")
    quarantine.routed(2, "g2")
    clock.now += 1.0
    down(store, "g1")
    assert quarantine.refused_for(1) == pytest.approx(HOLD_S)
    assert quarantine.refused_for(2) == 0.0  # on another host
    assert quarantine.refused_for(3) == 0.0  # never seen
    # Still refused once its host is back: the hold is about the request, not the host.
    clock.now += 30.0
    down(store, "g1", unhealthy=False)
    assert quarantine.refused_for(1) == pytest.approx(HOLD_S - 30.0)
    clock.now += 31.0
    assert quarantine.refused_for(1) == 0.0


def test_holding_while_any_request_is_refused(store: Datastore, quarantine: Quarantine, clock: Clock) -> None:
    quarantine.routed(1, "g1")
    assert not quarantine.holding()
    down(store, "g1")
    assert quarantine.holding()
    clock.now += HOLD_S + 1
    assert not quarantine.holding()


def test_only_requests_of_the_window_before_the_host_went_down(
    store: Datastore, quarantine: Quarantine, clock: Clock
) -> None:
    quarantine.routed(1, "g1")
    clock.now += WINDOW_S + 1.0
    quarantine.routed(2, "g1")
    down(store, "g1")
    assert quarantine.refused_for(1) == 0.0
    assert quarantine.refused_for(2) > 0.0


def test_a_request_that_ran_on_a_host_still_up_is_no_suspect(
    store: Datastore, quarantine: Quarantine, clock: Clock
) -> None:
    """Every client sends the same request: a host that dies for another reason must not stop the model."""
    for host in ("g1", "g2"):
        quarantine.routed(7, host)
        clock.now += 0.1
    down(store, "g1")
    assert quarantine.refused_for(7) == 0.0
    # Had it gone only to hosts that all went down, it would be.
    quarantine.routed(8, "g2")
    quarantine.routed(8, "g3")
    down(store, "g2")
    down(store, "g3")
    assert quarantine.refused_for(8) > 0.0


def test_a_request_routed_again_and_again_is_no_suspect(store: Datastore, quarantine: Quarantine, clock: Clock) -> None:
    """A tier of one host whose clients all send the same request: the host dies for another reason, and the
    request must not be refused when it spills over to another tier."""
    for _ in range(3):
        quarantine.routed(9, "g1")
        clock.now += 0.05
    quarantine.routed(10, "g1")
    down(store, "g1")
    assert quarantine.refused_for(9) == 0.0
    assert quarantine.refused_for(10) > 0.0


def test_an_ejected_host_counts_as_down(store: Datastore, quarantine: Quarantine) -> None:
    quarantine.routed(1, "g3")
    down(store, "g3", unhealthy=False, ejected=True)
    assert quarantine.refused_for(1) > 0.0


def test_hold_zero_refuses_nothing(store: Datastore) -> None:
    quarantine = Quarantine(store, PickerMetrics(store), 0.0, WINDOW_S)
    quarantine.routed(1, "g1")
    down(store, "g1")
    assert quarantine.refused_for(1) == 0.0


def test_the_count_is_exported(store: Datastore) -> None:
    metrics = PickerMetrics(store)
    quarantine = Quarantine(store, metrics, HOLD_S, WINDOW_S)
    for fingerprint in range(5):
        quarantine.routed(fingerprint, "g2")
    down(store, "g2")
    quarantine.refused_for(0)
    assert metrics.registry.get_sample_value("extproc_quarantined_total") == 5
