"""Placement decisions as a pure function: per model and tier demand and capacity, per host memory and
models, the settings and the time in; the loads and unloads to make, each with its reason and numbers, out.

Why per (model, tier): a copy on a GPU host and one on a CPU host serve different requests (the picker
classifies each request to a tier) at a different rate, so one count of copies over all tiers would load
GPU copies for CPU demand. Each (model, tier) decides its copies from that tier's demand and capacity per
copy, loads and unloads on that tier's hosts only, and has its own cool-down and scale-down window; the
model's ``min_copies``/``max_copies`` bound its copies over all its tiers, and the last copy of a model
with traffic stays wherever it is.

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

__all__ = ["Action", "HostInput", "ModelDecision", "ModelInput", "Plan", "TierInput", "footprint", "home_tier", "plan"]


@dataclass(frozen=True, slots=True)
class TierInput:
    """One managed model's demand and capacity on one tier now, and the controller's memory of that tier."""

    tier: str
    rate_rps: float | None  # requests that ran on the tier per second (+ its refusals for load); None: unknown
    capacity_rps: float | None  # what one copy on the tier serves at full load; None: unknown
    capacity_source: str = "unknown"
    queue_ms: float | None = None  # mean queue wait over its copies' hosts of the tier
    overloaded: bool = False  # the picker refused requests for it for load lately (counted on its home tier)
    spilled_rps: float = 0.0  # requests meant for this tier that ran on another one (spillover), per second
    last_change: float | None = None
    low_since: float | None = None
    low_most: int | None = None


@dataclass(frozen=True, slots=True)
class ModelInput:
    """One managed model now. ``by_tier`` holds its demand per tier; without it (a caller that measures
    demand per model only), the model-level numbers stand for every tier: the demand split over the tiers
    of its copies (none: all on its home tier, :func:`home_tier`), the refusals on its home tier, the
    cool-down and the window memory on each tier (``low_most``, the model's, is at least what any tier
    wanted: a window ends in no fewer copies on a tier than it would per tier)."""

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
    by_tier: tuple[TierInput, ...] = ()


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
    # The tier these copies are on (every number above is the tier's); one decision per (model, tier).
    tier: str = ""


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


def home_tier(m: ModelInput, hosts: Sequence[HostInput]) -> str | None:
    """Where ``m``'s requests go first: its default tier, else the tier most of the hosts that have it in
    their repository are of (ties: by name); None where no host has it. Its refusals for load (which name no
    tier) ask for copies there, and new hosts for it belong there."""
    if m.tiers:
        return m.tiers[0]
    tally = Counter(h.tier for h in hosts if m.name in h.available or m.name in h.models)
    if not tally:
        return None
    return min(tally, key=lambda t: (-tally[t], t))


def _scopes(m: ModelInput, tier_of: Mapping[str, str], home: str | None) -> list[TierInput]:
    """The tiers to decide ``m`` on: ``by_tier``, and a tier of unknown demand for any other tier it has
    copies on; without ``by_tier``, the model-level numbers per tier (see :class:`ModelInput`)."""
    copies = Counter(tier_of[h] for h in m.copies if h in tier_of)
    if m.by_tier:
        given = {t.tier for t in m.by_tier}
        return [*m.by_tier, *(TierInput(t, None, None) for t in sorted(copies) if t not in given)]
    tiers = sorted(copies)
    if not tiers or (home is not None and home not in copies):
        tiers.append(home or "")  # "": no host has it, nothing to place it on
    total = sum(copies.values())
    scopes = []
    for tier in tiers:
        rate = m.rate_rps
        if rate is not None and total:
            rate = rate * copies[tier] / total
        scopes.append(
            TierInput(
                tier, rate, m.capacity_rps, m.capacity_source,
                queue_ms=m.queue_ms if copies[tier] else None, overloaded=m.overloaded and tier == home,
                last_change=m.last_change, low_since=m.low_since, low_most=m.low_most,
            )
        )  # fmt: skip
    return scopes


def _desired(t: TierInput, current: int, s: PlacementSpec) -> tuple[int, str]:
    """The tier's desired copies before bounds and cool-down, and why."""
    if t.rate_rps == 0 and current and _pressure(t, current, s) is None and s.scale_down_utilization > 0:
        # No demand needs no measured capacity to judge: utilization is 0 whatever a copy serves.
        return 0, f"no demand: below {s.scale_down_utilization:g} utilization"
    if t.rate_rps is None or t.capacity_rps is None:
        # A copy saturated from its first request runs only full batches, so the batch-cost fit that
        # measures its capacity never forms: the picker's refusals and the queue still say it is short.
        signal = _pressure(t, current, s)
        if signal is not None:
            return current + 1, signal
        missing = "demand" if t.rate_rps is None else "capacity per copy"
        return current, f"{missing} not measured yet: keep {current}"
    per_copy = t.capacity_rps * s.target_utilization
    need = math.ceil(t.rate_rps / per_copy - 1e-9) if t.rate_rps > 0 else 0
    numbers = f"{t.rate_rps:.1f} req/s / ({t.capacity_rps:.1f} x {s.target_utilization:g}) = {need}"
    if need > current:
        return need, f"above target: {numbers}"
    signal = _pressure(t, current, s)
    if signal is not None:
        return current + 1, signal
    utilization = t.rate_rps / (current * t.capacity_rps) if current else 0.0
    if need < current and utilization < s.scale_down_utilization:
        return need, f"below {s.scale_down_utilization:g} utilization: {numbers}"
    return current, f"within bounds: {numbers}"


def _pressure(t: TierInput, current: int, s: PlacementSpec) -> str | None:
    if t.overloaded:
        return "refusing requests for load: one more copy"
    if t.spilled_rps > 0:
        return f"{t.spilled_rps:.1f} req/s spilled over to other tiers: one more copy"
    if s.queue_ms is not None and t.queue_ms is not None and t.queue_ms > s.queue_ms and current:
        return f"queue wait {t.queue_ms:.0f} ms above {s.queue_ms:g} ms: one more copy"
    return None


def _cooling(t: TierInput, s: PlacementSpec, up: bool, now: float) -> str | None:
    if t.last_change is None:
        return None
    wait = s.up_cooldown_s if up else s.cooldown_s
    left = t.last_change + wait - now
    return f"cool-down: {left:.0f} s left" if left > 0 else None


def _low(t: TierInput, current: int, desired: int, now: float) -> tuple[float, int] | None:
    """Since when every round has wanted fewer copies on the tier than it has, counting this one, and the
    most copies those rounds wanted; None when this round does not want fewer."""
    if desired >= current:
        return None
    if t.low_since is None or t.low_most is None:
        return now, desired
    return t.low_since, max(t.low_most, desired)


@dataclass(slots=True)
class _Draft:
    """One (model, tier) while the plan decides it."""

    m: ModelInput
    t: TierInput
    copies: tuple[str, ...]
    eligible: int  # hosts of the tier with it READY, or that could load it (memory aside)
    rank: int  # the tier's place in the model's preference (0: its home tier)
    desired: int
    why: str
    held: str | None = None
    unplaced: int = 0
    low: tuple[float, int] | None = None
    waiting: bool = False  # held for the scale-down window

    @property
    def current(self) -> int:
        return len(self.copies)


def _traffic(scopes: Sequence[TierInput]) -> bool:
    """Whether the model has traffic (or may have: demand not measured) on any tier."""
    return any(t.rate_rps is None or t.rate_rps > 0 or t.overloaded or t.spilled_rps > 0 for t in scopes)


def _cap(drafts: list[_Draft], high: int | None) -> None:
    """``max_copies`` over the model's tiers: the least preferred tiers give up copies first."""
    excess = 0 if high is None else sum(d.desired for d in drafts) - high
    for d in sorted(drafts, key=lambda d: -d.rank):
        if excess <= 0:
            return
        cut = min(excess, d.desired)
        if cut:
            d.desired -= cut
            d.why += f"; max {high} over its tiers"
            excess -= cut


def _floor(drafts: list[_Draft], low: int, s: PlacementSpec, now: float) -> None:
    """``min_copies`` over the model's tiers, and never its last copy while it has traffic: first no
    unload leaves fewer READY copies than that (a copy loading elsewhere serves nothing yet), the most
    preferred tiers keeping theirs; then copies to load, the most preferred tiers first."""
    kept = sum(min(d.current, d.desired) for d in drafts)
    want = min(low, sum(d.current for d in drafts))
    for d in sorted(drafts, key=lambda d: d.rank):
        if kept >= want:
            break
        # Held scale-downs too: what a tier shows it wants is what it will go to once they end.
        back = min(want - kept, max(0, d.current - d.desired))
        if back:
            d.desired += back
            kept += back
            d.why += f"; min {low} over its tiers"
    short = low - sum(d.desired for d in drafts)
    for d in sorted(drafts, key=lambda d: d.rank):
        if short <= 0:
            return
        room = max(d.eligible, d.current) - d.desired
        more = min(short, room)
        if more > 0:
            d.desired += more
            short -= more
            d.why += f"; min {low} over its tiers"
            d.held = d.held or _cooling(d.t, s, True, now)
    if short > 0 and drafts:
        first = min(drafts, key=lambda d: d.rank)
        first.unplaced += short


def _matches(host: HostInput, model: str, s: PlacementSpec) -> bool:
    spec = s.models.get(model)
    labels = {} if spec is None else spec.labels
    return all(host.labels.get(k) == v for k, v in labels.items())


def _load_targets(
    model: str, tier: str, count: int, hosts: Sequence[HostInput], used: dict[str, int], s: PlacementSpec, size: int
) -> tuple[list[HostInput], str | None]:
    """The ``count`` best hosts of ``tier`` to load ``model`` (``size`` bytes a copy) on: the most memory
    headroom (hosts with a known budget before those without), then fewest models, then name."""
    candidates: list[HostInput] = []
    full = 0
    for host in hosts:
        if host.tier != tier or model in host.models or model not in host.available or not host.routable:
            continue
        if not _matches(host, model, s):
            continue
        if host.budget_bytes is not None and used[host.name] + size > host.budget_bytes:
            full += 1
            continue
        candidates.append(host)

    def key(h: HostInput) -> tuple[int, int, int, str]:
        headroom = None if h.budget_bytes is None else h.budget_bytes - used[h.name]
        return (0 if headroom is not None else 1, -(headroom or 0), len(h.models), h.name)

    chosen = sorted(candidates, key=key)[:count]
    short = None
    if len(chosen) < count:
        short = f"only {len(chosen)} of {count} hosts can take it" + (f" ({full} over memory budget)" if full else "")
    return chosen, short


def _unload_victims(
    model: str, copies: Sequence[str], count: int, hosts: Mapping[str, HostInput], s: PlacementSpec
) -> list[HostInput]:
    """The ``count`` copies of ``copies`` (one tier's) to unload: never pinned ones; those on hosts that hold
    another model's only routable copy last (an unload drains its host for every model there, and the model
    operations refuse to strand one); then the least loaded, then the slowest."""
    spec = s.models.get(model)
    pinned = set() if spec is None else set(spec.pinned)
    candidates = [hosts[h] for h in copies if h in hosts and h not in pinned]
    routable = Counter(other for h in hosts.values() if h.routable for other in h.models)

    def key(h: HostInput) -> tuple[bool, float, float, str]:
        strands = any(routable[other] <= 1 for other in h.models if other != model)
        return (strands, h.in_flight, -(h.service_ms or 0.0), h.name)

    return sorted(candidates, key=key)[:count]


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _drafts(m: ModelInput, hosts: Sequence[HostInput], s: PlacementSpec, now: float) -> list[_Draft]:
    """The model's (model, tier) decisions before actions: desired copies per tier from the tier's demand,
    bounded by the tier's hosts, ``max_copies`` and ``min_copies`` over its tiers, cool-downs and windows."""
    tier_of = {h.name: h.tier for h in hosts}
    home = home_tier(m, hosts)
    scopes = _scopes(m, tier_of, home)
    preference = list(m.tiers or ())
    drafts: list[_Draft] = []
    for t in scopes:
        copies = tuple(h for h in m.copies if tier_of.get(h) == t.tier)
        eligible = sum(
            1
            for h in hosts
            if h.tier == t.tier
            and (m.name in h.models or (m.name in h.available and h.routable and _matches(h, m.name, s)))
        )
        rank = preference.index(t.tier) if t.tier in preference else (0 if t.tier == home else len(preference) + 1)
        wanted, why = _desired(t, len(copies), s)
        drafts.append(_Draft(m, t, copies, eligible, rank, wanted, why))
    spec = s.models.get(m.name)
    _cap(drafts, None if spec is None else spec.max_copies)
    for d in drafts:
        most = max(d.eligible, d.current)
        if d.desired > most:
            d.unplaced = d.desired - most
            d.desired = most
            d.why += f"; max {most} (hosts of {d.t.tier} that have it)"
        if d.desired != d.current:
            d.held = _cooling(d.t, s, d.desired > d.current, now)
        d.low = _low(d.t, d.current, d.desired, now)
        if d.low is not None and d.held is None:
            window = s.scale_down_window_s
            since, wanted_most = d.low
            if now - since < window:
                d.held = f"scale-down after {window:g} s of low demand: low for {now - since:.0f} s"
                d.waiting = True
            else:
                # Never below what a round of the window wanted.
                d.why += f"; low for {now - since:.0f} s, at most {wanted_most} wanted"
                d.desired = min(d.current, wanted_most)
    low = 1 if spec is None else spec.min_copies
    if _traffic(scopes):
        low = max(low, 1)  # never the last copy of a model with traffic (or unknown traffic)
    _floor(drafts, low, s, now)
    for d in drafts:
        if d.low is not None and d.desired >= d.current:
            # The bounds keep every copy of the tier: it wants no fewer, and waits for no window.
            d.low = None
            d.held = None if d.waiting else d.held
    return drafts


def plan(
    models: Sequence[ModelInput],
    hosts: Sequence[HostInput],
    settings: PlacementSpec,
    now: float,
    learned: Mapping[str, int] | None = None,
) -> Plan:
    """Decide every (model, tier)'s desired copies and the actions to get there; at most
    ``settings.max_concurrent_changes`` actions, the rest ``deferred`` (scale-ups first, by shortfall).
    ``learned``: the footprints the controller learned, by model (see :func:`footprint`)."""
    by_name = {h.name: h for h in hosts}
    used = {h.name: h.used_bytes for h in hosts}
    drafts = [d for m in models for d in _drafts(m, hosts, settings, now)]
    # Scale-ups first, the largest relative shortfall first, so that a cap on changes goes where it helps.
    order = sorted(drafts, key=lambda d: (-(d.desired - d.current) / max(d.current, 1), d.m.name, d.t.tier))
    budget = settings.max_concurrent_changes
    decided: list[ModelDecision] = []
    deferred: list[Action] = []
    for d in order:
        m, t, current, desired, why, held, low = d.m, d.t, d.current, d.desired, d.why, d.held, d.low
        unplaced = d.unplaced
        actions: list[Action] = []
        size, size_source = footprint(settings, learned or {}, m.name)
        if held is None and desired > current:
            targets, short = _load_targets(m.name, t.tier, desired - current, hosts, used, settings, size)
            unplaced += desired - current - len(targets)
            for host in targets:
                used[host.name] += size
                room = "" if host.budget_bytes is None else f", {_fmt_bytes(host.budget_bytes - used[host.name])} left"
                actions.append(
                    Action("load", m.name, host.name, f"{t.tier}: {current} -> {desired} copies ({why}){room}")
                )
            held = short
        elif held is None and desired < current:
            victims = _unload_victims(m.name, d.copies, current - desired, by_name, settings)
            for host in victims:
                actions.append(
                    Action(
                        "unload",
                        m.name,
                        host.name,
                        f"{t.tier}: {current} -> {desired} copies ({why}); least loaded copy",
                    )
                )
            if len(victims) < current - desired:
                held = "the other copies are pinned"
        taken, rest = actions[:budget], actions[budget:]
        budget -= len(taken)
        if rest:
            deferred.extend(rest)
            held = f"max_concurrent_changes {settings.max_concurrent_changes}: {len(rest)} deferred"
        utilization = None
        if t.rate_rps is not None and t.capacity_rps is not None and current:
            utilization = t.rate_rps / (current * t.capacity_rps)
        if any(a.kind == "unload" for a in taken):
            low = None  # the next scale-down waits for a window of its own
        decided.append(
            ModelDecision(
                m.name, t.rate_rps, t.capacity_rps, t.capacity_source, current, desired, utilization, why,
                tuple(taken), held, max(unplaced, 0),
                low_since=None if low is None else low[0], low_most=None if low is None else low[1],
                low_for_s=None if low is None else now - low[0], footprint_bytes=size, footprint_source=size_source,
                tier=t.tier,
            )
        )  # fmt: skip
    return Plan(tuple(sorted(decided, key=lambda d: (d.model, d.tier))), tuple(deferred))
