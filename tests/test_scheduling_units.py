"""The scheduling units (filters, scorers, pickers): their registry, the fleet file's names, and each unit
on its own."""

from __future__ import annotations

import random
from typing import Any

import pytest

from extproc.config import ConfigError, Fleet, parse_fleet
from extproc.datapath.datastore import Datastore
from extproc.datapath.scheduling import registry
from extproc.datapath.scheduling.filters import Filter, Fresh, Healthy
from extproc.datapath.scheduling.pickers import Argmax, Picker, PowerOfTwo
from extproc.datapath.scheduling.scheduler import Scheduler
from extproc.datapath.scheduling.scorers import Candidate, Scorer
from extproc.datapath.scheduling.types import InferenceRequest, Protocol, Route

NOW = 1000.0


def fleet(n: int = 3, **profile: Any) -> Fleet:
    hosts = [{"name": f"g{i}", "address": f"10.0.0.{i + 1}", "tier": "gpu"} for i in range(n)]
    return parse_fleet({"hosts": hosts, "models": [{"name": "m"}], "picker": {"profile": profile}}, "fleet.yaml")


def live(f: Fleet) -> Datastore:
    """Every host fresh, healthy and idle, with model ``m`` READY."""
    store = Datastore(f, clock=lambda: NOW)
    for host in store.hosts.values():
        store.update_index(host, {"m": frozenset({"1"})}, frozenset({"m"}), NOW)
        host.metrics_at = NOW
        host.load.service_ms = 2.0
    store.changed()
    return store


def context(max_hosts: int = 3, seed: int = 1) -> registry.Context:
    return registry.Context(max_hosts, 3.0, random.Random(seed))


@pytest.mark.parametrize(
    ("units", "contract", "key", "profile"),
    [
        (registry.FILTERS, Filter, "filters[1]", lambda name: {"filters": ["model_ready", name]}),
        (registry.SCORERS, Scorer, "scorers.{name}", lambda name: {"scorers": {name: 1}}),
        (registry.PICKERS, Picker, "picker", lambda name: {"picker": name}),
    ],
)
def test_the_fleet_file_names_the_registered_units(units: Any, contract: type, key: str, profile: Any) -> None:
    """Every registered unit is accepted by name and built from the context; any other name is refused, the
    key named and the registered names listed."""
    assert units.names()
    for name in units.names():
        if name != "model_ready":  # listed once only
            fleet(**profile(name))
        assert isinstance(units.build(name, context()), contract)
    with pytest.raises(ConfigError) as info:
        fleet(**profile("speed"))
    assert f"fleet.yaml: key picker.profile.{key.format(name='speed')}: Input should be " in str(info.value)
    assert all(repr(name) in str(info.value) for name in units.names())


def test_a_name_is_registered_once() -> None:
    units: registry.Registry[Filter] = registry.Registry("filter")
    units.register("healthy", Healthy)
    with pytest.raises(ValueError, match="'healthy' is registered twice"):
        units.register("healthy", Fresh)
    with pytest.raises(KeyError, match="no filter called 'fresh'"):
        units.unit("fresh")


def test_fresh_holds_until_the_oldest_telemetry_ages_out() -> None:
    store = live(fleet())
    g0, g1, _ = store.hosts.values()
    g0.metrics_at, g1.index_at = NOW - 1.0, NOW - 2.0
    fresh = Fresh(context())
    assert fresh.passes(g1, NOW) and not fresh.passes(g1, NOW + 1.01)
    assert fresh.holds_until([g0, g1]) == NOW - 2.0 + 3.0
    assert Healthy(context()).holds_until([g0, g1]) == float("inf")


def test_power_of_two_samples_hosts_that_pass_and_leaves_a_small_tier_to_the_plan() -> None:
    store = live(fleet(20))
    hosts = tuple(store.hosts.values())
    for host in hosts[::2]:
        host.envoy.ejected = True
    picker = PowerOfTwo(context(max_hosts=3))
    checks = (Healthy(context()),)
    for _ in range(50):
        sample = picker.sample(hosts, checks, NOW)
        assert sample is not None and len(sample) == 3 and len(set(map(id, sample))) == 3
        assert not any(h.envoy.ejected for h in sample)
    assert picker.sample(hosts[:3], checks, NOW) is None


def test_gpu_utilization_prefers_the_idler_gpu() -> None:
    f = fleet(scorers={"gpu_utilization": 1})
    store = live(f)
    for host, utilization in zip(store.hosts.values(), (0.9, 0.2, None), strict=True):
        host.load.gpu_utilization = utilization
    decision = Scheduler(f, store).decide(InferenceRequest(Protocol.HTTP, "m"))
    assert isinstance(decision, Route)
    assert [h.name for h in decision.hosts] == ["g2", "g1", "g0"]  # unknown (no GPU) counts as idle


def test_model_queue_counts_only_the_requests_own_models_queue() -> None:
    """Triton queues each model apart: g0 is busier, but with another model's requests, g1 with this
    model's. By the host's count (in_flight) g1 comes first; by the model's queue g0 is free."""
    hosts = [{"name": f"g{i}", "address": f"10.0.0.{i + 1}", "tier": "gpu"} for i in range(2)]
    f = parse_fleet(
        {
            "hosts": hosts,
            "models": [{"name": "m"}, {"name": "other"}],
            "picker": {"profile": {"scorers": {"model_queue": 1}}},
        },
        "fleet.yaml",
    )
    store = Datastore(f, clock=lambda: NOW)
    for host in store.hosts.values():
        models = {"m": frozenset({"1"}), "other": frozenset({"1"})}
        store.update_index(host, models, frozenset(models), NOW)
        host.metrics_at = NOW
        host.load.service_ms = 2.0
    store.changed()
    g0, g1 = store.hosts.values()
    g0.load.model_pending, g0.load.pending = {"other": 8}, 8
    g1.load.model_pending, g1.load.pending = {"m": 6}, 6
    store.changed()
    decision = Scheduler(f, store).decide(InferenceRequest(Protocol.HTTP, "m"))
    assert isinstance(decision, Route)
    assert [h.name for h in decision.hosts] == ["g0", "g1"]


def test_independent_schedulers_rotate_their_ties_from_different_hosts() -> None:
    """Workers and replicas each have their scheduler: over an idle tier, each walks its equal choices from
    its own random host, so that they do not pick the same hosts in step."""
    store = live(fleet(100))
    candidates = [Candidate(host, 1.0, 1.0) for host in store.hosts.values()]
    firsts = {Argmax(context(seed=seed)).pick(candidates, (), NOW)[0].host.name for seed in range(8)}
    assert len(firsts) > 4, firsts
