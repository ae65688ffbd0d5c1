"""The placement plan's inputs from a live fleet: the pickers' ``/status`` and ``/metrics`` (read through
:class:`~extproc.ops.status.PickerApi`, as ``extproc status`` and ``extproc models`` read them) and the fleet
file.

Why here and not in the planner: demand is a rate, so it needs two looks at the pickers' counters
(:class:`DemandMeter` keeps the previous one), and capacity and memory come from telemetry that may be
missing; this module turns both into plain numbers (or None, said as such) so that the planner stays pure.

- Demand per (model, tier): requests the pickers routed to the tier (``extproc_decisions_total`` by its
  ``tier`` label: where they ran, spillover included), per second between two looks, summed over the
  pickers (each replica sees its share). Refusals for load (``extproc_admissions_total``, outcome not
  admitted) carry no tier (admission tried every tier the request may use): they count on the model's home
  tier (:func:`~extproc.placement.plan.home_tier`), where they ask for copies. Requests that spilled over
  (reason ``spillover``) also ask for one more copy on the tier they were meant for: the first of the
  model's tiers other than the one they ran on (the label says where they ran, not where they were
  classified; with two tiers that is exact).
- Capacity per copy on a tier: declared (``placement.models.NAME.capacity_rps``, one number or one per
  tier), else from the batch-cost fit at a full batch (instances x max_batch / exec(max_batch), one row
  per request), else from the host's per-request service time (instances / service_ms) where the model is
  the host's only READY one (the service time is the host's, over all its models); the mean over the
  tier's copies that have one.
- Memory per host: Triton's GPU memory telemetry where the picker has it, else the declared budget with
  the footprints (declared, else learned, else the default) of the models READY there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from extproc.config import Fleet, HostSpec
from extproc.ops.plans import allowed_tiers
from extproc.ops.status import PickerHost, PickerStatus
from extproc.placement.plan import HostInput, ModelInput, TierInput, footprint, home_tier

__all__ = ["Demand", "DemandMeter", "build_inputs", "copy_capacity"]

# (kind, model, tier) of a counter the meter follows: routed and spilled by tier, refused with tier "".
_Key = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class Demand:
    """Requests per second between two looks, summed over the pickers."""

    routed: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (model, tier it ran on)
    spilled: Mapping[tuple[str, str], float] = field(default_factory=dict)  # of those, spilled over to it
    untiered: Mapping[str, float] = field(default_factory=dict)  # by model, tier unknown (refused for load)


@dataclass
class DemandMeter:
    """Requests per second per (model, tier) between two looks at the pickers' counters."""

    last: dict[str, tuple[float, dict[_Key, float]]] = field(default_factory=dict)  # picker url -> (time, counts)

    def update(self, statuses: Sequence[PickerStatus], now: float) -> Demand | None:
        """The rates since the previous look (None at the first look, or when a picker is new)."""
        rates: dict[_Key, float] = {}
        complete = True
        for status in statuses:
            counts: dict[_Key, float] = {}
            for m, load in status.overload.items():
                counts[("refused", m, "")] = load.refused
                counts |= {("routed", m, t): n for t, n in load.routed_by_tier.items()}
                counts |= {("spilled", m, t): n for t, n in load.spilled_by_tier.items()}
            before = self.last.get(status.url)
            self.last[status.url] = (now, counts)
            if before is None or now <= before[0]:
                complete = False
                continue
            elapsed = now - before[0]
            for key, count in counts.items():
                previous = before[1].get(key, 0.0)
                delta = count - previous if count >= previous else count  # a restarted picker counts afresh
                rates[key] = rates.get(key, 0.0) + delta / elapsed
        if not complete or not statuses:
            return None
        return Demand(
            routed={(m, t): r for (kind, m, t), r in rates.items() if kind == "routed"},
            spilled={(m, t): r for (kind, m, t), r in rates.items() if kind == "spilled"},
            untiered={m: r for (kind, m, _), r in rates.items() if kind == "refused"},
        )


def copy_capacity(model: str, host: PickerHost) -> tuple[float | None, str]:
    """What one copy of ``model`` on ``host`` serves at full load (req/s), and from what.

    The host's service time is over all its models' requests (the picker's ``/status`` has no per-model
    one), so it stands for the model's only where the model is the host's one READY model: elsewhere it is
    another model's time as much as this one's (a busy model would lend its speed to an idle one)."""
    batching = host.batching.get(model)
    instances = 1 if batching is None else batching.instances
    if batching is not None and batching.fixed_ms is not None and batching.item_ms is not None:
        batch = batching.max_batch
        exec_ms = batching.fixed_ms + batching.item_ms * batch
        if exec_ms > 0:
            return instances * batch * 1000.0 / exec_ms, "batch fit"
    if host.service_ms and set(host.ready) == {model}:
        return instances * 1000.0 / host.service_ms, "service time"
    return None, "unknown"


def _capacity(fleet: Fleet, model: str, tier: str, copies: Sequence[PickerHost]) -> tuple[float | None, str]:
    spec = fleet.placement.models.get(model)
    declared = None if spec is None else spec.capacity(tier)
    if declared is not None:
        return declared, "declared"
    measured = [copy_capacity(model, h) for h in copies]
    values = [c for c, _ in measured if c is not None]
    if not values:
        return None, "unknown"
    sources = sorted({s for c, s in measured if c is not None})
    return sum(values) / len(values), "+".join(sources)


def _host_input(fleet: Fleet, spec: HostSpec, view: PickerHost | None, learned: Mapping[str, int]) -> HostInput:
    settings = fleet.placement
    ready = frozenset(() if view is None else view.ready)
    budget: int | None
    if view is not None and view.gpu_memory_total:
        budget, used, source = view.gpu_memory_total, view.gpu_memory_used or 0, "gpu"
    else:
        budget = settings.budget(spec.name, spec.tier)
        used = sum(footprint(settings, learned, m)[0] for m in ready)
        source = "none" if budget is None else "declared"
    return HostInput(
        name=spec.name,
        tier=spec.tier.value,
        labels=spec.labels,
        budget_bytes=budget,
        used_bytes=used,
        memory_source=source,
        models=ready,
        available=frozenset(() if view is None else view.known),
        routable=view is not None and view.routable,
        in_flight=0.0 if view is None else view.in_flight,
        service_ms=None if view is None else view.service_ms,
    )


def _spill_target(tier: str, order: Sequence[str]) -> str | None:
    """The tier requests that spilled over to ``tier`` were meant for: the first other one of ``order``."""
    return next((t for t in order if t != tier), None)


def build_inputs(
    fleet: Fleet,
    view: Mapping[str, PickerHost],
    statuses: Sequence[PickerStatus],
    rates: Demand | Mapping[str, float] | None,
    *,
    now_unix: float,
    last_change: Mapping[tuple[str, str], float] | None = None,
    low: Mapping[tuple[str, str], tuple[float, int]] | None = None,
    learned: Mapping[str, int] | None = None,
) -> tuple[list[ModelInput], list[HostInput]]:
    """The inputs of :func:`~extproc.placement.plan.plan` for the models ``placement.models`` lists, each
    with its demand and capacity per tier (``ModelInput.by_tier``).

    ``view``: the pickers' merged view (:func:`extproc.ops.plans.merged_view`); ``rates``: from a
    :class:`DemandMeter` (None: not measured yet), or requests per second by model of no known tier (they
    count on its home tier); ``last_change``: the controller's memory of its changes, by (model, tier);
    ``low``: of the low demand its last plan saw, by (model, tier)
    (:attr:`~extproc.placement.plan.TierInput.low_since`); ``learned``: the footprints it learned
    (:mod:`extproc.placement.footprints`).
    """
    hosts = [_host_input(fleet, spec, view.get(spec.name), learned or {}) for spec in fleet.hosts]
    tier_of = {h.name: h.tier for h in hosts}
    demand = Demand(untiered=rates) if rates is not None and not isinstance(rates, Demand) else rates
    # Refused for load lately, as ``extproc status`` says it (``OVERLOADED_S``).
    overloaded = {m for status in statuses for m in status.overloaded(now_unix)}
    models: list[ModelInput] = []
    for name in sorted(fleet.placement.models):
        copies = [v for v in view.values() if v.routable and name in v.ready]
        allowed = allowed_tiers(fleet, name)
        tiers = None if allowed is None else tuple(t.value for t in allowed)
        base = ModelInput(name, None, None, copies=tuple(sorted(v.name for v in copies)), tiers=tiers)
        home = home_tier(base, hosts)
        held = {h.tier for h in hosts if name in h.available or name in h.models}
        scope = sorted(
            {t for t in held if tiers is None or t in tiers}
            | {tier_of.get(v.name, v.tier) for v in copies}
            | ({home} if home is not None else set())
        )
        order = list(tiers) if tiers is not None else sorted(scope, key=lambda t: (t != home, t))
        spilled: dict[str, float] = {}
        for tier in scope:
            spill = 0.0 if demand is None else demand.spilled.get((name, tier), 0.0)
            target = _spill_target(tier, order)
            if spill > 0 and target is not None:
                spilled[target] = spilled.get(target, 0.0) + spill
        by_tier = []
        for tier in scope:
            here = [v for v in copies if tier_of.get(v.name, v.tier) == tier]
            capacity, source = _capacity(fleet, name, tier, here)
            queues = [v.queue_ms for v in here if v.queue_ms is not None]
            rate: float | None = None
            if demand is not None:
                rate = demand.routed.get((name, tier), 0.0) + (demand.untiered.get(name, 0.0) if tier == home else 0.0)
            since, most = (None, None) if low is None or (name, tier) not in low else low[(name, tier)]
            by_tier.append(
                TierInput(
                    tier, rate, capacity, source,
                    queue_ms=sum(queues) / len(queues) if queues else None,
                    overloaded=name in overloaded and tier == home, spilled_rps=spilled.get(tier, 0.0),
                    last_change=None if last_change is None else last_change.get((name, tier)),
                    low_since=since, low_most=most,
                )
            )  # fmt: skip
        rated = [t.rate_rps for t in by_tier if t.rate_rps is not None]
        models.append(
            ModelInput(
                name=name,
                rate_rps=None if demand is None else sum(rated),
                capacity_rps=None,
                copies=base.copies,
                tiers=tiers,
                overloaded=name in overloaded,
                by_tier=tuple(by_tier),
            )
        )
    return models, hosts
