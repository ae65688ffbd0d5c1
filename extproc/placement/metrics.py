"""The placement controller's Prometheus series (``extproc placement run --metrics-port``): per (model, tier)
its demand, capacity per copy and copies (now and desired), as the plan's decisions have them; per model its
footprint; per tier the demand, the capacity and the hosts it needs; and counters of rounds and actions.
Listed in docs/reference/metrics.md.

Why the controller exports the per-tier autoscaling signal and not the picker: only the controller knows
whether more demand can be met by loading copies on hosts the tier already has (memory headroom, model
repositories, min/max copies); a busy tier with room is the controller's to fix, not a reason to add hosts.
The picker sees demand per host, not which copies could still be placed, and each picker replica sees only
its share of it.

Why a registry of its own, in this module rather than :mod:`extproc.datapath.metrics`: the controller is its own
process (not the picker), and the gauges are the last round's plan (a :class:`RoundSeries` collector reads
it at scrape time), so a model dropped from ``placement.models`` loses its series with the next round.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from extproc.config import PlacementSpec
from extproc.placement.plan import Action, HostInput, Plan

__all__ = ["PlacementMetrics", "TierSignal", "tier_signals"]


@dataclass(frozen=True, slots=True)
class TierSignal:
    """One tier's load and whether it needs more hosts."""

    tier: str
    hosts: int  # hosts of the tier the controller sees (routable or not)
    full_hosts: int  # hosts with a memory budget and no room for the default footprint
    demand_rps: float  # managed models' demand on the tier
    capacity_rps: float  # managed copies on the tier x their capacity per copy (where measured)
    unplaced: int  # copies demand asks for that no host of the tier can take
    hosts_wanted: int  # hosts + those the unplaced copies need

    @property
    def hosts_needed(self) -> int:
        return self.hosts_wanted - self.hosts


def tier_signals(result: Plan, hosts: Sequence[HostInput], settings: PlacementSpec) -> list[TierSignal]:
    """Per tier (those of the hosts, and those with unplaced copies), sorted by name, from the plan's
    (model, tier) decisions (but those of a model no host has: no tier to count them on).

    The hosts a tier needs beyond its own: each new host takes at most one copy of a model, so at least the
    largest number of one model's unplaced copies; and where the tier's hosts have memory budgets, enough
    of the mean budget to hold the unplaced copies' footprints."""
    demand: dict[str, float] = {}
    capacity: dict[str, float] = {}
    unplaced: dict[str, dict[str, int]] = {}
    footprints: dict[str, int] = {}
    for d in result.decisions:
        if not d.tier:
            continue
        if d.rate_rps is not None:
            demand[d.tier] = demand.get(d.tier, 0.0) + d.rate_rps
        if d.capacity_rps is not None:
            capacity[d.tier] = capacity.get(d.tier, 0.0) + d.capacity_rps * d.current
        if d.unplaced:
            unplaced.setdefault(d.tier, {})[d.model] = d.unplaced
            footprints[d.model] = d.footprint_bytes
    signals = []
    for tier in sorted({h.tier for h in hosts} | set(unplaced)):
        members = [h for h in hosts if h.tier == tier]
        short = unplaced.get(tier, {})
        needed = max(short.values(), default=0)
        budgets = [h.budget_bytes for h in members if h.budget_bytes]
        if short and budgets:
            total = sum(footprints[model] * n for model, n in short.items())
            needed = max(needed, math.ceil(total / (sum(budgets) / len(budgets))))
        full = sum(1 for h in members if h.headroom is not None and h.headroom < settings.default_footprint_bytes)
        signals.append(
            TierSignal(
                tier=tier,
                hosts=len(members),
                full_hosts=full,
                demand_rps=demand.get(tier, 0.0),
                capacity_rps=capacity.get(tier, 0.0),
                unplaced=sum(short.values()),
                hosts_wanted=len(members) + needed,
            )
        )
    return signals


@dataclass(frozen=True, slots=True)
class _Snapshot:
    plan: Plan
    hosts: tuple[HostInput, ...]
    settings: PlacementSpec
    paused: bool
    at: float


class RoundSeries(Collector):
    """The last round's gauges, read at scrape time; nothing before the first round."""

    def __init__(self) -> None:
        self.last: _Snapshot | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=list(labels))

        paused = gauge(
            "extproc_placement_paused",
            "1 while the controller only plans (placement.enabled false, or the pause file exists), else 0.",
        )
        last_round = gauge("extproc_placement_last_round_timestamp_seconds", "Unix time of the last round's plan.")
        demand = gauge(
            "extproc_placement_demand_rps", "Requests per second for a managed model on a tier.", ["model", "tier"]
        )
        capacity = gauge(
            "extproc_placement_capacity_per_copy_rps",
            "Requests per second one copy of a managed model on a tier serves at full load (declared or measured).",
            ["model", "tier"],
        )
        copies = gauge(
            "extproc_placement_copies", "Routable copies (READY) of a managed model on a tier.", ["model", "tier"]
        )
        desired = gauge(
            "extproc_placement_desired_copies",
            "Copies of a managed model on a tier the last plan wants, with its bounds (min/max copies, hosts).",
            ["model", "tier"],
        )
        footprint = gauge(
            "extproc_placement_model_footprint_bytes",
            "Memory one copy of a managed model takes in the budgets, by source (declared; learned from the "
            "memory change at the controller's loads; default: placement.default_footprint_bytes).",
            ["model", "source"],
        )
        unplaced = gauge(
            "extproc_placement_unplaced_copies",
            "Copies demand asks for that no host of the tier can take (too few hosts, or no memory left on them).",
            ["model", "tier"],
        )
        deferred = gauge(
            "extproc_placement_deferred_actions", "Actions the last plan left to later rounds (max_concurrent_changes)."
        )
        tier_hosts = gauge("extproc_placement_tier_hosts", "Hosts of the tier the controller sees.", ["tier"])
        tier_full = gauge(
            "extproc_placement_tier_full_hosts",
            "Hosts of the tier with a memory budget and no room for placement.default_footprint_bytes.",
            ["tier"],
        )
        tier_demand = gauge(
            "extproc_placement_tier_demand_rps",
            "Managed models' requests per second on the tier.",
            ["tier"],
        )
        tier_capacity = gauge(
            "extproc_placement_tier_capacity_rps",
            "Requests per second the managed copies on the tier serve at full load (where measured).",
            ["tier"],
        )
        tier_unplaced = gauge(
            "extproc_placement_tier_unplaced_copies", "Copies no host of the tier can take.", ["tier"]
        )
        tier_wanted = gauge(
            "extproc_placement_tier_hosts_wanted",
            "Hosts the tier should have for the copies demand asks for: its hosts plus those its unplaced "
            "copies need (the autoscaling signal: a StatefulSet's desired replicas).",
            ["tier"],
        )
        snap = self.last
        if snap is not None:
            paused.add_metric([], float(snap.paused))
            last_round.add_metric([], snap.at)
            deferred.add_metric([], float(len(snap.plan.deferred)))
            for d in snap.plan.decisions:
                labels = [d.model, d.tier]
                if d.rate_rps is not None:
                    demand.add_metric(labels, d.rate_rps)
                if d.capacity_rps is not None:
                    capacity.add_metric(labels, d.capacity_rps)
                copies.add_metric(labels, float(d.current))
                desired.add_metric(labels, float(d.desired))
                unplaced.add_metric(labels, float(d.unplaced))
            for d in {d.model: d for d in snap.plan.decisions}.values():
                footprint.add_metric([d.model, d.footprint_source], float(d.footprint_bytes))
            for s in tier_signals(snap.plan, snap.hosts, snap.settings):
                tier_hosts.add_metric([s.tier], float(s.hosts))
                tier_full.add_metric([s.tier], float(s.full_hosts))
                tier_demand.add_metric([s.tier], s.demand_rps)
                tier_capacity.add_metric([s.tier], s.capacity_rps)
                tier_unplaced.add_metric([s.tier], float(s.unplaced))
                tier_wanted.add_metric([s.tier], float(s.hosts_wanted))
        yield from (paused, last_round, demand, capacity, copies, desired, unplaced, footprint, deferred)
        yield from (tier_hosts, tier_full, tier_demand, tier_capacity, tier_unplaced, tier_wanted)


class PlacementMetrics:
    """All series live in one registry owned by this object (no process-wide globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.actions = Counter(
            "extproc_placement_actions",
            "Loads and unloads the controller planned, by model, action and outcome (done, failed, paused, dry_run).",
            ["model", "action", "outcome"],
            registry=self.registry,
        )
        self.rounds = Counter(
            "extproc_placement_rounds",
            "Rounds of the controller, by outcome (ok; failed: an action failed or a picker did not answer).",
            ["outcome"],
            registry=self.registry,
        )
        self._round = RoundSeries()
        self.registry.register(self._round)

    def planned(
        self,
        result: Plan,
        hosts: Sequence[HostInput],
        settings: PlacementSpec,
        *,
        paused: bool,
        at: float,
    ) -> None:
        """Publish a round's plan (the gauges show it until the next one)."""
        self._round.last = _Snapshot(result, tuple(hosts), settings, paused, at)

    def acted(self, action: Action, outcome: str) -> None:
        self.actions.labels(action.model, action.kind, outcome).inc()

    def round_ended(self, ok: bool) -> None:
        self.rounds.labels("ok" if ok else "failed").inc()
