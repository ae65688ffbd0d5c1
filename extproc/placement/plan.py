"""Placement decisions as a pure function: per model demand and capacity, per host memory and models, the
settings and the time in; the loads and unloads to make, each with its reason and numbers, out.

Why pure: the rules that keep a controller from hurting the fleet (hysteresis, cool-down, low demand
sustained over a window before a scale-down, the last copy of a model with traffic, memory budgets, pinned
placements, a cap on concurrent changes) are the part worth
testing exhaustively, and they need no Triton, picker or clock to be tested (tests/test_placement.py).
:mod:`extproc.placement.inputs` builds the inputs from a live picker; :mod:`extproc.placement.command`
carries the actions out through the fleet-wide model operations (:mod:`extproc.ops`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from extproc.config import PlacementSpec

__all__ = ["Action", "HostInput", "ModelDecision", "ModelInput", "Plan", "footprint", "plan"]


@dataclass(frozen=True, slots=True)
class ModelInput:
    """One managed model now."""

    name: str
    rate_rps: float | None  # requests per second asking for it (routed + refused for load); None: unknown
    capacity_rps: float | None  # what one copy serves at full load; None: unknown
    capacity_source: str = "unknown"  # declared, batch fit, service time, unknown
    copies: tuple[str, ...] = ()  # routable hosts where it is READY
    tiers: tuple[str, ...] | None = None  # allowed tiers, default first (None: any)
    queue_ms: float | None = None  # mean queue wait over its copies' hosts
    overloaded: bool = False  # the picker refused requests for it for load lately
    last_change: float | None = None  # when the controller last loaded or unloaded it (None: never)
    # Since when every round has wanted fewer copies than it had (None: the last round did not), and the
    # most copies any of those rounds wanted: what a scale-down goes to once that has lasted long enough.
    low_since: float | None = None
    low_most: int | None = None


@dataclass(frozen=True, slots=True)
class HostInput:
    """One host now."""

    name: str
    tier: str
    labels: Mapping[str, str] = field(default_factory=dict)
    budget_bytes: int | None = None  # None: no budget known, loads are not limited by memory
    used_bytes: int = 0
    memory_source: str = "none"  # gpu (telemetry), declared, none
    models: frozenset[str] = frozenset()  # READY
    available: frozenset[str] = frozenset()  # in its model repository (loadable)
    routable: bool = True
    in_flight: float = 0.0
    service_ms: float | None = None

    @property
    def headroom(self) -> int | None:
        return None if self.budget_bytes is None else self.budget_bytes - self.used_bytes


@dataclass(frozen=True, slots=True)
class Action:
    kind: Literal["load", "unload"]
    model: str
    host: str
    reason: str


@dataclass(frozen=True, slots=True)
class ModelDecision:
    model: str
    rate_rps: float | None
    capacity_rps: float | None
    capacity_source: str
    current: int
    desired: int
    utilization: float | None  # demand over the current copies' capacity
    reason: str
    actions: tuple[Action, ...] = ()
    held: str | None = None  # why the desired copies are not reached this round
    # Copies demand asks for (within min/max_copies) that no host can take: too few hosts of its tiers hold
    # it in their repository, or those that do are out of memory. The fleet needs more hosts for these.
    unplaced: int = 0
    # While the round wants fewer copies: since when every round has (the next round's ModelInput.low_since),
    # the most copies those rounds wanted, and for how long (seconds). None otherwise, and after a scale-down.
    low_since: float | None = None
    low_most: int | None = None
    low_for_s: float | None = None
    # What one copy takes in the memory budgets, and from where: declared, learned or default.
    footprint_bytes: int = 0
    footprint_source: str = "default"


@dataclass(frozen=True, slots=True)
class Plan:
    decisions: tuple[ModelDecision, ...]
    deferred: tuple[Action, ...] = ()  # over max_concurrent_changes: the next rounds'

    @property
    def actions(self) -> tuple[Action, ...]:
        return tuple(a for d in self.decisions for a in d.actions)


def footprint(settings: PlacementSpec, learned: Mapping[str, int], model: str) -> tuple[int, str]:
    """What one copy of ``model`` takes in a memory budget, and from where: its declared
    ``footprint_bytes``, else the footprint the controller learned at its loads
    (:mod:`extproc.placement.footprints`), else ``default_footprint_bytes``."""
    spec = settings.models.get(model)
    if spec is not None and spec.footprint_bytes is not None:
        return int(spec.footprint_bytes), "declared"
    if model in learned:
        return learned[model], "learned"
    return int(settings.default_footprint_bytes), "default"


def _desired(m: ModelInput, s: PlacementSpec) -> tuple[int, str]:
    """The model's desired copies before bounds and cool-down, and why."""
    current = len(m.copies)
    if m.rate_rps == 0 and current and not m.overloaded and s.scale_down_utilization > 0:
        # No demand needs no measured capacity to judge: utilization is 0 whatever a copy serves.
        return 0, f"no demand: below {s.scale_down_utilization:g} utilization"
    if m.rate_rps is None or m.capacity_rps is None:
        # A copy saturated from its first request runs only full batches, so the batch-cost fit that
        # measures its capacity never forms: the picker's refusals and the queue still say it is short.
        signal = _pressure(m, s)
        if signal is not None:
            return current + 1, signal
        missing = "demand" if m.rate_rps is None else "capacity per copy"
        return current, f"{missing} not measured yet: keep {current}"
    per_copy = m.capacity_rps * s.target_utilization
    need = math.ceil(m.rate_rps / per_copy - 1e-9) if m.rate_rps > 0 else 0
    numbers = f"{m.rate_rps:.1f} req/s / ({m.capacity_rps:.1f} x {s.target_utilization:g}) = {need}"
    if need > current:
        return need, f"above target: {numbers}"
    signal = _pressure(m, s)
    if signal is not None:
        return current + 1, signal
    utilization = m.rate_rps / (current * m.capacity_rps) if current else 0.0
    if need < current and utilization < s.scale_down_utilization:
        return need, f"below {s.scale_down_utilization:g} utilization: {numbers}"
    return current, f"within bounds: {numbers}"


def _pressure(m: ModelInput, s: PlacementSpec) -> str | None:
    if m.overloaded:
        return "refusing requests for load: one more copy"
    if s.queue_ms is not None and m.queue_ms is not None and m.queue_ms > s.queue_ms and m.copies:
        return f"queue wait {m.queue_ms:.0f} ms above {s.queue_ms:g} ms: one more copy"
    return None


def _bounded(m: ModelInput, s: PlacementSpec, desired: int, hosts: int) -> tuple[int, str | None]:
    spec = s.models.get(m.name)
    low = 1 if spec is None else spec.min_copies
    high = hosts if spec is None or spec.max_copies is None else min(spec.max_copies, hosts)
    if m.rate_rps is None or m.rate_rps > 0 or m.overloaded:
        low = max(low, 1)  # never the last copy of a model with traffic (or unknown traffic)
    bounded = max(low, min(high, desired))
    if bounded > desired:
        return bounded, f"min {low}"
    if bounded < desired:
        return bounded, f"max {high}"
    return bounded, None


def _cooling(m: ModelInput, s: PlacementSpec, up: bool, now: float) -> str | None:
    if m.last_change is None:
        return None
    wait = s.up_cooldown_s if up else s.cooldown_s
    left = m.last_change + wait - now
    return f"cool-down: {left:.0f} s left" if left > 0 else None


def _low(m: ModelInput, desired: int, now: float) -> tuple[float, int] | None:
    """Since when every round has wanted fewer copies than it has, counting this one, and the most copies
    those rounds wanted; None when this round does not want fewer."""
    if desired >= len(m.copies):
        return None
    if m.low_since is None or m.low_most is None:
        return now, desired
    return m.low_since, max(m.low_most, desired)


def _matches(host: HostInput, m: ModelInput, s: PlacementSpec) -> bool:
    spec = s.models.get(m.name)
    labels = {} if spec is None else spec.labels
    return all(host.labels.get(k) == v for k, v in labels.items())


def _load_targets(
    m: ModelInput, count: int, hosts: Sequence[HostInput], used: dict[str, int], s: PlacementSpec, footprint: int
) -> tuple[list[HostInput], str | None]:
    """The ``count`` best hosts to load ``m`` (``footprint`` bytes a copy) on: its default tier first, then
    the most memory headroom (hosts with a known budget before those without), then fewest models, then name."""
    candidates: list[HostInput] = []
    full = 0
    for host in hosts:
        if m.name in host.models or m.name not in host.available or not host.routable:
            continue
        if m.tiers is not None and host.tier not in m.tiers:
            continue
        if not _matches(host, m, s):
            continue
        if host.budget_bytes is not None and used[host.name] + footprint > host.budget_bytes:
            full += 1
            continue
        candidates.append(host)

    def key(h: HostInput) -> tuple[int, int, int, int, str]:
        tier = m.tiers.index(h.tier) if m.tiers is not None else 0
        headroom = None if h.budget_bytes is None else h.budget_bytes - used[h.name]
        return (tier, 0 if headroom is not None else 1, -(headroom or 0), len(h.models), h.name)

    chosen = sorted(candidates, key=key)[:count]
    short = None
    if len(chosen) < count:
        short = f"only {len(chosen)} of {count} hosts can take it" + (f" ({full} over memory budget)" if full else "")
    return chosen, short


def _unload_victims(m: ModelInput, count: int, hosts: Mapping[str, HostInput], s: PlacementSpec) -> list[HostInput]:
    """The ``count`` copies to unload: never pinned ones; those on hosts that hold another model's only
    routable copy last (an unload drains its host for every model there, and the model operations refuse
    to strand one); then those of the model's least preferred tier first (the reverse of where loads go, so
    its default tier keeps its copies), then the least loaded, then the slowest."""
    spec = s.models.get(m.name)
    pinned = set() if spec is None else set(spec.pinned)
    copies = [hosts[h] for h in m.copies if h in hosts and h not in pinned]
    routable = Counter(model for h in hosts.values() if h.routable for model in h.models)

    def key(h: HostInput) -> tuple[bool, int, float, float, str]:
        strands = any(routable[other] <= 1 for other in h.models if other != m.name)
        tiers = m.tiers or ()
        preference = tiers.index(h.tier) if h.tier in tiers else len(tiers)
        return (strands, -preference, h.in_flight, -(h.service_ms or 0.0), h.name)

    return sorted(copies, key=key)[:count]


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def plan(
    models: Sequence[ModelInput],
    hosts: Sequence[HostInput],
    settings: PlacementSpec,
    now: float,
    learned: Mapping[str, int] | None = None,
) -> Plan:
    """Decide every model's desired copies and the actions to get there; at most
    ``settings.max_concurrent_changes`` actions, the rest ``deferred`` (scale-ups first, by shortfall).
    ``learned``: the footprints the controller learned, by model (see :func:`footprint`)."""
    by_name = {h.name: h for h in hosts}
    used = {h.name: h.used_bytes for h in hosts}
    drafts: list[tuple[ModelInput, int, int, str, str | None, int, tuple[float, int] | None]] = []
    for m in models:
        eligible = sum(
            1 for h in hosts if (m.name in h.available or m.name in h.models) and (m.tiers is None or h.tier in m.tiers)
        )
        wanted, why = _desired(m, settings)
        desired, bound = _bounded(m, settings, wanted, max(eligible, len(m.copies)))
        if bound is not None:
            why += f"; {bound}"
        # The same bounds without the hosts there are now: what more hosts would let it have.
        unbounded, _ = _bounded(m, settings, wanted, max(wanted, eligible, len(m.copies)))
        current = len(m.copies)
        held = None if desired == current else _cooling(m, settings, desired > current, now)
        low = _low(m, desired, now)
        if low is not None and held is None:
            window = settings.scale_down_window_s
            since, most = low
            if now - since < window:
                held = f"scale-down after {window:g} s of low demand: low for {now - since:.0f} s"
            else:
                # Never below what a round of the window wanted.
                why += f"; low for {now - since:.0f} s, at most {most} wanted"
                desired = min(current, most)
        drafts.append((m, current, desired, why, held, unbounded - desired, low))
    # Scale-ups first, the largest relative shortfall first, so that a cap on changes goes where it helps.
    order = sorted(drafts, key=lambda d: (-(d[2] - d[1]) / max(d[1], 1), d[0].name))
    budget = settings.max_concurrent_changes
    decided: dict[str, ModelDecision] = {}
    deferred: list[Action] = []
    for m, current, desired, why, held, unplaced, low in order:
        actions: list[Action] = []
        size, size_source = footprint(settings, learned or {}, m.name)
        if held is None and desired > current:
            targets, short = _load_targets(m, desired - current, hosts, used, settings, size)
            unplaced += desired - current - len(targets)
            for host in targets:
                used[host.name] += size
                room = "" if host.budget_bytes is None else f", {_fmt_bytes(host.budget_bytes - used[host.name])} left"
                actions.append(Action("load", m.name, host.name, f"{current} -> {desired} copies ({why}){room}"))
            held = short
        elif held is None and desired < current:
            victims = _unload_victims(m, current - desired, by_name, settings)
            for host in victims:
                which = "least loaded copy"
                if m.tiers and host.tier != m.tiers[0]:
                    which = f"a copy outside its default tier ({m.tiers[0]})"
                actions.append(Action("unload", m.name, host.name, f"{current} -> {desired} copies ({why}); {which}"))
            if len(victims) < current - desired:
                held = "the other copies are pinned"
        taken, rest = actions[:budget], actions[budget:]
        budget -= len(taken)
        if rest:
            deferred.extend(rest)
            held = f"max_concurrent_changes {settings.max_concurrent_changes}: {len(rest)} deferred"
        utilization = None
        if m.rate_rps is not None and m.capacity_rps is not None and current:
            utilization = m.rate_rps / (current * m.capacity_rps)
        if any(a.kind == "unload" for a in taken):
            low = None  # the next scale-down waits for a window of its own
        decided[m.name] = ModelDecision(
            m.name, m.rate_rps, m.capacity_rps, m.capacity_source, current, desired, utilization, why,
            tuple(taken), held, max(unplaced, 0),
            low_since=None if low is None else low[0], low_most=None if low is None else low[1],
            low_for_s=None if low is None else now - low[0], footprint_bytes=size, footprint_source=size_source,
        )  # fmt: skip
    return Plan(tuple(decided[m.name] for m in sorted(models, key=lambda m: m.name)), tuple(deferred))
