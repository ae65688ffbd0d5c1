"""Scorers: a cost per candidate host, lower is better. The scheduler normalises each scorer's costs to
[0, 1] over the candidates it compares and adds them up with the profile's weights.

A scorer reads a :class:`Candidate`: the host with what its telemetry says resolved once (see
:func:`prepare`), plus the host's in-flight count at the moment of the decision, the one input that moves
with every pick.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

from extproc.datapath.batch_cost import BatchCost, Batching, completion_ms, per_request
from extproc.datapath.datastore import HostState, drained_estimate
from extproc.datapath.scheduling import registry
from extproc.datapath.scheduling.registry import Context, Unit

# Per-request service time assumed when no host has been measured yet.
_UNMEASURED_SERVICE_MS: Final = 1.0


# Built for every host at each change (and per request for power_of_two's sample): not frozen (a frozen
# dataclass's __init__ is slower), and with a written __init__ (see docs/development.md).
@dataclass(slots=True, init=False)
class Candidate:
    """A host that passed the filters, with the telemetry its scores need, as of the last datastore change.

    ``batch`` and ``batching`` are set when the batch-aware estimate covers every candidate compared with
    this one (``batch``: a request's cost at the model's mean rows per request, see :func:`prepare`;
    ``per_batch``: the requests one execution holds); otherwise a request finishes after ``base_ms`` plus
    ``drain_ms`` per request in flight."""

    host: HostState
    base_ms: float
    drain_ms: float
    batch: BatchCost | None
    batching: Batching | None
    pending: float
    gpu_memory: float
    # Requests the host's in-flight estimate drains per second (HostState.drain_per_s; 0 when unmeasured).
    drain_per_s: float
    # The weighted, normalised sum of the static scorers (see :func:`prepare`).
    static_cost: float
    per_batch: float
    # The model's mean rows per request (averaged over the candidates compared together) where it batches
    # (max_batch over 1 on this host) and Triton has counted its rows, else 0: a request's size is then not
    # used. ``max_rows``: the most rows one request may have (max_batch).
    rows: float
    max_rows: float
    # The model the candidates are compared for (None: a request that names none).
    model: str | None
    # Triton's queue (``pending``) was scraped at ``pending_at`` (inf: never) and drains since at
    # ``pending_per_s`` requests a second (see HostState.in_flight).
    pending_at: float
    pending_per_s: float

    def __init__(
        self,
        host: HostState,
        base_ms: float,
        drain_ms: float,
        batch: BatchCost | None = None,
        batching: Batching | None = None,
        pending: float = 0.0,
        gpu_memory: float = 0.0,
        drain_per_s: float = 0.0,
        static_cost: float = 0.0,
        per_batch: float | None = None,
        rows: float = 0.0,
        max_rows: float = 1.0,
        model: str | None = None,
        pending_at: float = math.inf,
        pending_per_s: float = 0.0,
    ) -> None:
        self.host = host
        self.base_ms = base_ms
        self.drain_ms = drain_ms
        self.batch = batch
        self.batching = batching
        self.pending = pending
        self.gpu_memory = gpu_memory
        self.drain_per_s = drain_per_s
        self.static_cost = static_cost
        if per_batch is None:
            per_batch = float(batching.max_batch) if batching is not None else 1.0
        self.per_batch = per_batch
        self.rows = rows
        self.max_rows = max_rows
        self.model = model
        self.pending_at = pending_at
        self.pending_per_s = pending_per_s

    def in_flight(self, now: float) -> float:
        """:meth:`HostState.in_flight` from the telemetry resolved here: the one input read live, in one
        step, since every candidate of every decision needs it."""
        host = self.host
        at = host.estimate_at
        n = host.estimate
        if at is not None and now > at:
            # drained_estimate's count, inlined (see above)
            work = host.work_estimate
            left = work - (now - at) * self.drain_per_s
            n = left if work == n else (n * left / work if left > 0.0 else 0.0)
            if n < 1.0 and now < host.held_until:
                n = 1.0
        pending = self.pending
        if pending > 0.0 and now > self.pending_at:
            pending -= (now - self.pending_at) * self.pending_per_s
            if pending < 0.0:
                pending = 0.0
        # pending >= 0, so this is also the drained estimate's floor of 0.
        return n if n > pending else pending

    def excess_work(self, now: float) -> float:
        """The work of the host's in-flight estimate beyond its count (see :meth:`HostState.drained`): its
        picks of other than the mean size. Below 0 where they were small."""
        count, work = drained_estimate(self.host, now, self.drain_per_s)
        return work - count

    def completion_now(self, in_flight: float, own: float, now: float) -> float:
        """:meth:`completion_ms` behind the work ahead at ``now``: the host's ``in_flight`` count and the work its
        picks carry beyond it, of which, on a host that serves several models, the request's model's part
        (:meth:`HostState.model_part`)."""
        excess = self.excess_work(now)
        if self.model is not None:
            part = self.host.model_part(self.model, now)
            in_flight *= part
            excess *= part
        return self.completion_ms(in_flight, own, excess)

    def completion_ms(self, in_flight: float, own: float = 1.0, excess: float = 0.0) -> float:
        """When a request of ``own`` work (in requests of the model's mean size) sent now would finish here,
        with ``in_flight`` requests ahead of it that carry ``excess`` more work than their count."""
        if self.batching is not None and self.batch is not None:
            return completion_ms(self.batch, self.batching, in_flight, self.per_batch, own, excess)
        return self.base_ms + (in_flight + excess + own - 1.0) * self.drain_ms


# (service_ms, exec_ms, drain_ms, cost, rows_per_request) as in ModelTimes.
_Times = tuple[float | None, float | None, float | None, BatchCost | None, float | None]


def _times(host: HostState, model: str | None) -> _Times:
    """The model's times on the host where measured, else the host's over all its models."""
    times = host.load.models.get(model) if model is not None else None
    if times is None or times.service_ms is None:
        load = host.load
        return load.service_ms, load.exec_ms, load.drain_ms, None, None
    return times.service_ms, times.exec_ms, times.drain_ms, times.cost, times.rows_per_request


def _drain_ms(service_ms: float, drain_ms: float | None) -> float:
    """A queue drains at the best recent per-request time: the batcher forms bigger batches as it grows."""
    return min(service_ms, drain_ms or service_ms)


def prepare(hosts: Sequence[HostState], model: str | None, static: WeightedScorers = ()) -> list[Candidate]:
    """The hosts as candidates to be compared with one another for ``model``, with the weighted costs of
    the ``static`` scorers summed in ``static_cost`` (normalised over ``hosts``, so these candidates must be
    compared as one set, as :func:`cost` does).

    The expected completion time is estimated in one of two ways, the same for every candidate, never a
    mix: the batch-aware estimate is the cheaper for a host with a queue, so mixing would herd requests
    onto the fitted hosts.

    Where the model's batching is known on every host (model config) and its batch cost fitted on at least
    one, from the batch structure: running batches, queued full batches, and the batch the request joins
    (see :func:`extproc.datapath.batch_cost.completion_ms`): a host with a short queue costs a request little, since
    the batcher adds it to the next batch. The batch cost is fitted per row and ``max_batch`` counts rows:
    both are turned into requests at the model's mean rows per request (Triton's rows over its requests,
    averaged over the candidates), so a queue of multi-row requests fills more batches than its count
    suggests. A host without a fit of its own (too little traffic to vary its batch sizes) is given the
    fitted hosts' shape, scaled to its own mean batch time at its mean batch size: a slower GPU is slower
    at both the fixed and the per-item part.

    Otherwise one execution of its own (the host's mean batch time) after the requests in flight have
    drained at the host's per-request time (the best seen lately, since a deep queue is served in full
    batches): ``service_ms`` is a batch's time divided by its size, so the queue drains faster on a host
    that batches well, while ``exec_ms`` keeps a slow host from looking cheap when idle. An unmeasured
    host is assumed as fast as the fastest measured one, so a new host gets tried, until its first request
    has taken longer (see :func:`_unmeasured`).

    Triton's observed queue time is not used: queued requests are already in the in-flight count, and the
    observation is up to a scrape old, which would herd traffic away from whichever host queued last."""
    times = [_times(h, model) for h in hosts]
    costs = _batch_costs(hosts, times, model)
    drains = [None if service is None else _drain_ms(service, drain) for service, _, drain, _, _ in times]
    measured = [d for d in drains if d is not None]
    default_ms = min(measured) if measured else _UNMEASURED_SERVICE_MS
    executions = [t[1] for t in times if t[1] is not None]
    default_exec_ms = min(executions) if executions else default_ms
    out = []
    rows = _rows_per_request(times)
    for i, host in enumerate(hosts):
        exec_ms, drain = times[i][1], drains[i]
        if drain is None:
            exec_ms, drain_ms = _unmeasured(host, default_exec_ms, default_ms)
        else:
            drain_ms = drain
        load = host.load
        used, total = load.gpu_memory_used, load.gpu_memory_total
        cost: BatchCost | None = None
        batching: Batching | None = None
        per_batch = 1.0
        if costs is not None and model is not None:
            batching = host.batching[model]
            cost, per_batch = per_request(costs[i], batching, rows)
        configured = host.batching.get(model) if model is not None else None
        drain_per_s = host.drain_per_s()
        sized = configured is not None and configured.max_batch > 1 and times[i][4] is not None
        out.append(
            Candidate(
                host,
                exec_ms if exec_ms is not None else drain_ms,
                drain_ms,
                cost,
                batching,
                float(load.pending),
                used / total if used is not None and total else 0.0,
                drain_per_s,
                0.0,
                per_batch,
                rows if sized else 0.0,
                float(configured.max_batch) if configured is not None else 1.0,
                model,
                math.inf if host.metrics_at is None else host.metrics_at,
                drain_per_s / host.scale(),
            )
        )
    _add_static_costs(out, static)
    return out


def _unmeasured(host: HostState, exec_ms: float, drain_ms: float) -> tuple[float, float]:
    """The (execution, per-request) times of a host that Triton has not yet seen finish a request: those of
    the fastest measured host, so that a new host gets tried; but a host that has held this picker's
    requests since before its last scrape, and finished none, takes at least that long to execute one (and
    drains its queue that much slower), however fast the others are."""
    since, scraped = host.busy_since, host.metrics_at
    if since is None or scraped is None or scraped <= since:
        return exec_ms, drain_ms
    waited_ms = (scraped - since) * 1000.0
    if waited_ms <= exec_ms:
        return exec_ms, drain_ms
    return waited_ms, drain_ms * waited_ms / exec_ms


def _rows_per_request(times: list[_Times]) -> float:
    """The model's mean rows per request: the mean of the candidates' (else 1). The sizes of a model's
    requests are the clients', not the hosts': one host's mean over a scrape interval or two is noisy with
    mixed sizes (a few big requests swing it), and a noisy host would look cheaper or dearer than it is."""
    measured = [t[4] for t in times if t[4] is not None]
    return sum(measured) / len(measured) if measured else 1.0


def _batch_costs(hosts: Sequence[HostState], times: list[_Times], model: str | None) -> list[BatchCost] | None:
    """Each host's batch cost for the model, per row, or None where the batch-aware estimate cannot cover
    them all."""
    fitted = [t[3] for t in times if t[3] is not None]
    if not fitted or model is None or any(model not in h.batching for h in hosts):
        return None
    ratio = sum(c.fixed_ms / c.item_ms for c in fitted) / len(fitted)  # fixed time in per-row units
    rows = _rows_per_request(times)
    out = []
    for service_ms, exec_ms, _, cost, _ in times:
        if cost is not None:
            out.append(cost)
        elif exec_ms is None or not service_ms:
            return None  # never measured: nothing to scale the shape to
        else:
            # exec_ms / service_ms: mean batch size in requests; times rows per request, in rows.
            batch_rows = exec_ms / service_ms * rows
            item_ms = exec_ms / (ratio + batch_rows)
            out.append(BatchCost(ratio * item_ms, item_ms))
    return out


class Scorer(Unit):
    """A cost per candidate, lower is better; :func:`cost` normalises and weighs them."""

    # True: the costs move with every pick (they read ``in_flight``), so they are scored per request.
    # False: telemetry alone, scored once per plan by :func:`prepare` (``in_flight`` is then empty).
    per_request: ClassVar[bool] = True

    @abstractmethod
    def score(
        self, candidates: Sequence[Candidate], in_flight: list[float], own: float = 1.0, now: float = 0.0
    ) -> list[float]:
        """One cost per candidate; ``in_flight[i]`` is ``candidates[i]``'s in-flight count now, ``own`` the
        request's work (see :meth:`~extproc.datapath.scheduling.scheduler.Scheduler.work`), ``now`` the
        decision's time."""


class ExpectedCompletion(Scorer):
    """When a new request would finish on each host (see :func:`prepare` for the estimate)."""

    def score(
        self, candidates: Sequence[Candidate], in_flight: list[float], own: float = 1.0, now: float = 0.0
    ) -> list[float]:
        # Candidate.completion_now, with its commonest branch inlined: a method call per candidate was most
        # of this scorer's cost. The work ahead beyond the count (this picker's picks of sizes other than the
        # mean, see Candidate.excess_work) and the request's model's part of it are read only where they
        # can differ from the count.
        # zip without strict=: its keyword path costs a third of this loop, and the lengths match by
        # construction.
        if own == 1.0:
            return [
                (c.base_ms + n * c.drain_ms if c.batching is None else c.completion_ms(n))
                if c.host.work_estimate == c.host.estimate and len(c.host.model_estimates) < 2
                else c.completion_now(n, 1.0, now)
                for c, n in zip(candidates, in_flight)  # noqa: B905
            ]
        return [
            c.completion_now(n, own, now)
            for c, n in zip(candidates, in_flight)  # noqa: B905
        ]


class InFlight(Scorer):
    """Requests in flight: Envoy's live count, plus the picker's picks since, less estimated completions."""

    def score(
        self, candidates: Sequence[Candidate], in_flight: list[float], own: float = 1.0, now: float = 0.0
    ) -> list[float]:
        return in_flight


class PendingQueue(Scorer):
    """Requests waiting in Triton's queues (all models), as Triton last reported."""

    per_request = False

    def score(
        self, candidates: Sequence[Candidate], in_flight: list[float], own: float = 1.0, now: float = 0.0
    ) -> list[float]:
        return [c.pending for c in candidates]


class GpuMemory(Scorer):
    """Fraction of GPU memory in use (0 where unknown, e.g. CPU hosts): less headroom, higher cost."""

    per_request = False

    def score(
        self, candidates: Sequence[Candidate], in_flight: list[float], own: float = 1.0, now: float = 0.0
    ) -> list[float]:
        return [c.gpu_memory for c in candidates]


class GpuUtilization(Scorer):
    """Fraction of GPU compute in use (Triton's nv_gpu_utilization, mean over the host's GPUs; 0 where
    unknown, e.g. CPU hosts): a GPU busy with other models' work serves the next request later."""

    per_request = False

    def score(
        self, candidates: Sequence[Candidate], in_flight: list[float], own: float = 1.0, now: float = 0.0
    ) -> list[float]:
        return [c.host.load.gpu_utilization or 0.0 for c in candidates]


class ModelQueue(Scorer):
    """The request's model's work in flight on each host (:meth:`HostState.model_in_flight`: this picker's
    picks of it drained at the model's rate, or Triton's queue of it if larger): Triton queues each model
    apart, so on a host that serves several a request waits behind its own model's requests, which the
    host's whole count (``in_flight``) overstates. A request that names no model is scored by the host's."""

    def score(
        self, candidates: Sequence[Candidate], in_flight: list[float], own: float = 1.0, now: float = 0.0
    ) -> list[float]:
        return [
            n if c.model is None else c.host.model_in_flight(c.model, now)
            for c, n in zip(candidates, in_flight)  # noqa: B905
        ]


registry.SCORERS.register("expected_completion", ExpectedCompletion)
registry.SCORERS.register("pending_queue", PendingQueue)
registry.SCORERS.register("in_flight", InFlight)
registry.SCORERS.register("gpu_memory", GpuMemory)
registry.SCORERS.register("gpu_utilization", GpuUtilization)
registry.SCORERS.register("model_queue", ModelQueue)

# A profile's scorers with their weights (above 0), built once per profile (see :func:`build`).
WeightedScorers = tuple[tuple[Scorer, float], ...]


def build(weights: Mapping[str, float], context: Context) -> tuple[WeightedScorers, WeightedScorers]:
    """A profile's scorers, in its order, without those weighted 0: (those :func:`prepare` sums once per
    plan, those :func:`cost` runs per request)."""
    scorers = [(registry.SCORERS.build(name, context), weight) for name, weight in weights.items() if weight]
    static = tuple([(s, w) for s, w in scorers if not s.per_request])
    return static, tuple([(s, w) for s, w in scorers if s.per_request])


def _add_static_costs(candidates: list[Candidate], static: WeightedScorers) -> None:
    for scorer, weight in static:
        values = scorer.score(candidates, [])
        top = max(values, default=0.0)
        if top > 0:
            scale = weight / top
            for c, v in zip(candidates, values, strict=True):
                c.static_cost += v * scale


def cost(candidates: Sequence[Candidate], scorers: WeightedScorers, now: float, own: float = 1.0) -> list[float]:
    """Each scorer's costs normalised to [0, 1] (divided by the highest; all 0 if none is above 0), weighted
    and summed, for a request of ``own`` work (see :meth:`~extproc.datapath.scheduling.scheduler.Scheduler.work`).
    The static scorers' part was summed by :func:`prepare` over the candidates prepared together, which are
    the ones compared here."""
    in_flight = [c.in_flight(now) for c in candidates]
    total: list[float] | None = None
    for scorer, weight in scorers:
        values = scorer.score(candidates, in_flight, own, now)
        top = max(values)  # max(..., default=) takes the slow, keyword path: 2x the cost here
        if top > 0:
            scale = weight / top
            # zip without strict=, as in ExpectedCompletion: one value per candidate, by construction.
            if total is None:
                total = [c.static_cost + v * scale for c, v in zip(candidates, values)]  # noqa: B905
            else:
                total = [t + v * scale for t, v in zip(total, values)]  # noqa: B905
    return [c.static_cost for c in candidates] if total is None else total
