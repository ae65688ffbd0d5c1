"""The placement plan's inputs from a live fleet: the pickers' ``/status`` and ``/metrics`` (read through
:class:`~extproc.ops.status.PickerApi`, as ``extproc status`` and ``extproc models`` read them) and the fleet
file.

Why here and not in the planner: demand is a rate, so it needs two looks at the pickers' counters
(:class:`DemandMeter` keeps the previous one), and capacity and memory come from telemetry that may be
missing; this module turns both into plain numbers (or None, said as such) so that the planner stays pure.

- Demand per model: requests the pickers routed (``extproc_decisions_total``) plus those they refused for
  load (``extproc_admissions_total``, outcome not admitted), per second between two looks, summed over the
  pickers (each replica sees its share).
- Capacity per copy: declared (``placement.models.NAME.capacity_rps``), else from the batch-cost fit at a
  full batch (instances x max_batch / exec(max_batch), one row per request), else from the host's
  per-request service time (instances / service_ms) where the model is the host's only READY one (the
  service time is the host's, over all its models); the mean over the copies that have one.
- Memory per host: Triton's GPU memory telemetry where the picker has it, else the declared budget with
  the footprints (declared, else learned, else the default) of the models READY there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from extproc.config import Fleet, HostSpec
from extproc.ops.plans import allowed_tiers
from extproc.ops.status import PickerHost, PickerStatus
from extproc.placement.plan import HostInput, ModelInput, footprint

__all__ = ["DemandMeter", "build_inputs", "copy_capacity"]


@dataclass
class DemandMeter:
    """Requests per second per model between two looks at the pickers' counters."""

    # picker url -> (time, model -> routed + refused count)
    last: dict[str, tuple[float, dict[str, float]]] = field(default_factory=dict)

    def update(self, statuses: Sequence[PickerStatus], now: float) -> dict[str, float] | None:
        """The rates since the previous look (None at the first look, or when a picker is new)."""
        rates: dict[str, float] = {}
        complete = True
        for status in statuses:
            counts = {m: load.routed + load.refused for m, load in status.overload.items()}
            before = self.last.get(status.url)
            self.last[status.url] = (now, counts)
            if before is None or now <= before[0]:
                complete = False
                continue
            elapsed = now - before[0]
            for model, count in counts.items():
                previous = before[1].get(model, 0.0)
                delta = count - previous if count >= previous else count  # a restarted picker counts afresh
                rates[model] = rates.get(model, 0.0) + delta / elapsed
        return rates if complete and statuses else None


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


def _capacity(fleet: Fleet, model: str, copies: Sequence[PickerHost]) -> tuple[float | None, str]:
    spec = fleet.placement.models.get(model)
    if spec is not None and spec.capacity_rps is not None:
        return spec.capacity_rps, "declared"
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


def build_inputs(
    fleet: Fleet,
    view: Mapping[str, PickerHost],
    statuses: Sequence[PickerStatus],
    rates: Mapping[str, float] | None,
    *,
    now_unix: float,
    last_change: Mapping[str, float] | None = None,
    low: Mapping[str, tuple[float, int]] | None = None,
    learned: Mapping[str, int] | None = None,
) -> tuple[list[ModelInput], list[HostInput]]:
    """The inputs of :func:`~extproc.placement.plan.plan` for the models ``placement.models`` lists.

    ``view``: the pickers' merged view (:func:`extproc.ops.plans.merged_view`); ``rates``: from a
    :class:`DemandMeter` (None: not measured yet); ``last_change``: the controller's memory of its changes;
    ``low``: of the low demand its last plan saw (:attr:`~extproc.placement.plan.ModelInput.low_since`);
    ``learned``: the footprints it learned (:mod:`extproc.placement.footprints`).
    """
    hosts = [_host_input(fleet, spec, view.get(spec.name), learned or {}) for spec in fleet.hosts]
    # Refused for load lately, as ``extproc status`` says it (``OVERLOADED_S``).
    overloaded = {m for status in statuses for m in status.overloaded(now_unix)}
    models: list[ModelInput] = []
    for name in sorted(fleet.placement.models):
        copies = [v for v in view.values() if v.routable and name in v.ready]
        capacity, source = _capacity(fleet, name, copies)
        queues = [v.queue_ms for v in copies if v.queue_ms is not None]
        tiers = allowed_tiers(fleet, name)
        since, most = (None, None) if low is None or name not in low else low[name]
        models.append(
            ModelInput(
                name=name,
                rate_rps=None if rates is None else rates.get(name, 0.0),
                capacity_rps=capacity,
                capacity_source=source,
                copies=tuple(sorted(v.name for v in copies)),
                tiers=None if tiers is None else tuple(t.value for t in tiers),
                queue_ms=sum(queues) / len(queues) if queues else None,
                overloaded=name in overloaded,
                last_change=None if last_change is None else last_change.get(name),
                low_since=since,
                low_most=most,
            )
        )
    return models, hosts
