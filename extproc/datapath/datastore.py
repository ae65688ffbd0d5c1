"""Live state of the fleet: what each Triton host has loaded, how busy it is, and what Envoy thinks of it.

Telemetry collectors write here from their poll loops; the scheduler reads it on every request. Everything
runs on one event loop, so plain attribute updates are consistent without locks. Timestamps are
``time.monotonic()`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field, replace
from typing import Any, Final

import structlog

from extproc.config import Fleet, HostSpec, Tier
from extproc.datapath.batch_cost import BatchCost, Batching, LineFit

log = structlog.get_logger(__name__)


@dataclass(slots=True)  # not frozen: see extproc.datapath.batch_cost.BatchCost
class ModelTimes:
    """One model's smoothed per-request service time and execution (batch) time on a host, in ms."""

    service_ms: float | None = None
    exec_ms: float | None = None
    # The lowest per-request time seen lately (largest batches): how fast a deep queue drains, since the
    # dynamic batcher forms bigger batches as the queue grows.
    drain_ms: float | None = None
    # exec(rows) fitted over the scrape intervals (see extproc.datapath.batch_cost); None until batch sizes varied.
    fit: LineFit = field(default_factory=LineFit)
    cost: BatchCost | None = None
    # Mean rows (batch dimension) per request, smoothed: Δnv_inference_count / Δnv_inference_request_success.
    rows_per_request: float | None = None


@dataclass(slots=True)  # not frozen: see extproc.datapath.batch_cost.BatchCost
class TrafficShare:
    """What fraction of a host's requests went through this picker's Envoy: exponentially weighted sums of
    the requests of Envoy's that the host answered (``rq_total - rq_active``) and of those Triton completed,
    over scrape intervals (both count answers, so a queue that grows or drains does not skew the ratio).

    Several gateways (each an Envoy with its picker) route to the same hosts, and each Envoy's ``rq_active``
    counts only its own requests: the host's in-flight estimate is that count divided by the share (see
    ``TritonLoad.envoy_scale``). With one gateway the share is 1 and nothing changes."""

    answered_mark: int | None = None  # Envoy's answered count at the last scrape (None: not seen yet)
    answered: float = 0.0
    done: float = 0.0
    intervals: float = 0.0  # the scrape intervals counted, weighted as the sums are


@dataclass(slots=True)
class TritonLoad:
    """Derived from Triton's metrics endpoint: the counters are turned into rates between two scrapes."""

    pending: int = 0  # requests queued in Triton, not yet executing (all models)
    # The same per model (only models with requests queued at the last scrape).
    model_pending: dict[str, int] = field(default_factory=dict)
    # Mean queue wait and per-request service time over the last scrape interval, in ms; None until measured.
    queue_ms: float | None = None
    service_ms: float | None = None
    # Mean execution (batch) time in ms: what a request takes on this host even when nothing is queued.
    exec_ms: float | None = None
    drain_ms: float | None = None  # see ModelTimes
    # The same two times per model: a host's models can differ by orders of magnitude.
    models: dict[str, ModelTimes] = field(default_factory=dict)
    gpu_memory_used: int | None = None
    gpu_memory_total: int | None = None
    gpu_utilization: float | None = None
    # This gateway's share of the host's traffic (see TrafficShare), and 1 / share: how many requests in
    # flight to the host each request of this Envoy's (its live count, the picker's picks) stands for.
    share: TrafficShare = field(default_factory=TrafficShare)
    envoy_scale: float = 1.0


@dataclass(slots=True)
class EnvoyView:
    """One host as seen in Envoy's admin ``/clusters``, summed over the REST and gRPC clusters."""

    active: int = 0  # rq_active: requests Envoy has in flight to this host
    ejected: bool = False  # failed_outlier_check in any cluster
    unhealthy: bool = False  # failed active health check in any cluster
    routed: int | None = None  # rq_total: requests Envoy ever sent this host (None: not reported)

    def answered(self) -> int | None:
        """Requests Envoy sent the host that have been answered (or failed): ``rq_total - rq_active``."""
        return None if self.routed is None else self.routed - self.active


def _verdict_changed(old: EnvoyView, new: EnvoyView) -> bool:
    """Envoy's ejection or health-check verdict on a host changed: a layout change (see Datastore.layout)."""
    return new.ejected != old.ejected or new.unhealthy != old.unhealthy


# The fields of HostState that make up what the picker knows about a host (its telemetry and the operator's
# drain flag): the one record that the leader sends its workers (extproc.sharing), that a reload carries over
# (Datastore.adopt) and that /status shows (host_status). The Datastore writes them (its set_* methods and
# update_index), so that whatever a scheduler prepared from the old values is out of date at once; nothing
# else in the package assigns them (tests/test_datastore.py checks both).
TELEMETRY_FIELDS: Final = (
    "load",
    "envoy",
    "ready",
    "known",
    "batching",
    "draining",
    "metrics_at",
    "index_at",
    "envoy_at",
)
# How often a process that decides beats (Datastore.beat), and the gap between two beats over which it was
# not running: stopped (SIGSTOP, a paused VM, CPU throttling) or its event loop held.
BEAT_S: Final = 0.1
PAUSE_S: Final = 1.0

# Picks whose work :meth:`HostState.picks_excess` remembers: requests in flight beyond them are taken to be of
# their model's mean size.
RECENT_PICKS: Final = 64
_RING: Final = RECENT_PICKS + 1  # the running sums before and after them

# The other fields: the host's identity, and the in-flight estimate, which every pick moves and every
# decision reads live (never prepared, so written without a generation change; only whether ``peer_count``
# is None is, and extproc.datapath.peer_load says when that changes).
IDENTITY_FIELDS: Final = ("spec", "http_endpoint", "grpc_endpoint")
ESTIMATE_FIELDS: Final = (
    "estimate",
    "estimate_at",
    "work_estimate",
    "picks_since_poll",
    "model_estimates",
    "recent_excess",
    "recent_picks",
    "sized_until",
    "pick_span",
    "peer_count",
    "held_until",
    "held_work",
    "busy_since",
)


def drained_estimate(host: HostState, now: float, per_s: float) -> tuple[float, float]:
    """``host``'s in-flight estimate (count, work) at ``now``, its work drained at ``per_s`` (see
    :meth:`HostState.drained`; the scorers pass the rate they prepared), never below its held pick."""
    count, work, at = host.estimate, host.work_estimate, host.estimate_at
    if at is None or now <= at:
        return count, work
    left = work - (now - at) * per_s
    if left <= 0.0:
        count = left = 0.0
    elif work != count:
        count = count * left / work
    else:
        count = left
    if now < host.held_until:
        if count < 1.0:
            count = 1.0
        if left < host.held_work:
            left = host.held_work
    return count, left


@dataclass(slots=True)
class HostState:
    spec: HostSpec
    load: TritonLoad = field(default_factory=TritonLoad)
    envoy: EnvoyView = field(default_factory=EnvoyView)
    # Models READY on this host, by name → ready versions (strings, as Triton reports them).
    ready: dict[str, frozenset[str]] = field(default_factory=dict)
    # Every model the host's repository index lists, in any state.
    known: frozenset[str] = frozenset()
    # How each READY model batches, from its model config (read once per load).
    batching: dict[str, Batching] = field(default_factory=dict)
    # The in-flight estimate between two reads of Envoy's count: a queue that each pick adds to (so a burst
    # between two polls does not all land on the host that looked best at the last poll) and that drains
    # while it holds work. ``estimate`` is its count at ``estimate_at``, ``work_estimate`` its work (in
    # requests of their models' mean size; equal to the count while no pick of another size is in it). The
    # work drains at the host's measured service rate and the count in proportion to it: a big request
    # keeps its place in the count for as long as its work takes (see :meth:`drained`).
    estimate: float = 0.0
    estimate_at: float | None = None
    work_estimate: float = 0.0
    picks_since_poll: int = 0  # for /status: picks counted since the estimate was last reset
    # The same queue per model, from this picker's picks only: model → (estimate, its time). Triton
    # queues each model apart, so a request waits behind its own model's requests, not the host's.
    model_estimates: dict[str, tuple[float, float]] = field(default_factory=dict)
    # The work of this picker's last picks beyond their count, to size a fresh count (Envoy's polls carry
    # no sizes; see :meth:`picks_excess`): the running sum of each pick's work less 1 (in requests of its
    # model's mean size, so three 24-row requests weigh more than three 1-row ones), kept after each of the
    # last RECENT_PICKS picks at index ``picks % _RING``. A host finishes its requests in about the order
    # they came, so the requests in flight are the last picks, as many as the count says.
    recent_excess: list[float] = field(default_factory=lambda: [0.0] * _RING)
    recent_picks: int = 0
    # While recent_picks is below it, some remembered pick carried other than the mean work.
    sized_until: int = 0
    # Requests of the in-flight count one pick stands for (its weight, times the gateways' scale).
    pick_span: float = 1.0
    # The last pick (this picker's, or another worker's or replica's it applied) cannot have finished
    # before ``held_until``: a request is in flight for at least its own execution, alone on the host, from
    # when it was picked. Until then the drained estimate holds at least that request and its work
    # (``held_work``), so that a drain guessed from the host's rate cannot make a host picked a moment ago
    # look idle (see :meth:`_hold`).
    held_until: float = 0.0
    held_work: float = 0.0
    # When the first of the picks the host holds was made: the first since its in-flight count was last 0
    # (None while it is). A host that Triton has not seen finish a request since then has taken at least
    # that long over it (see extproc.datapath.scheduling.scorers.prepare, for a host not yet measured).
    busy_since: float | None = None
    # The other picker replicas' part of the host's in-flight count where they share their loads
    # (extproc.datapath.peer_load): their Envoys' last counts and their picks since. None while none does:
    # this picker's own counts and picks then stand for every gateway's by its traffic share.
    peer_count: float | None = None
    # Set by an operator (``POST /hosts/NAME/drain``): no new requests, e.g. before unloading a model.
    draining: bool = False
    metrics_at: float | None = None
    index_at: float | None = None
    envoy_at: float | None = None
    # Precomputed ``ip:port`` values for Envoy's override_host header.
    http_endpoint: str = ""
    grpc_endpoint: str = ""

    def __post_init__(self) -> None:
        self.http_endpoint = self.spec.http_endpoint
        self.grpc_endpoint = self.spec.grpc_endpoint

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tier(self) -> Tier:
        return self.spec.tier

    def scale(self) -> float:
        """Requests in flight to the host that one of this picker's Envoy's (or one of its picks) stands for:
        1 where the other replicas share their loads, else 1 / this gateway's share of the host's traffic."""
        return 1.0 if self.peer_count is not None else self.load.envoy_scale

    def drain_per_s(self) -> float:
        """Requests a busy host finishes per second (0: unmeasured): ``service_ms`` is one request's share
        of an execution's time, and its model's instances execute at once (the most of any of its models)."""
        service_ms = self.load.service_ms
        if not service_ms:
            return 0.0
        instances = 1
        for batching in self.batching.values():
            if batching.instances > instances:
                instances = batching.instances
        return 1000.0 * instances / service_ms

    def drained(self, now: float) -> tuple[float, float]:
        """The estimate's (count, work) at ``now``. A busy host finishes ``drain_per_s`` requests of the mean
        size a second, an empty one nothing; the requests it finishes are as big, on average, as those it
        holds, so the count falls in proportion to the work."""
        return drained_estimate(self, now, self.drain_per_s())

    def in_flight(self, now: float) -> float:
        """Best estimate of requests on this host now: the estimate queue (Envoy's last count, plus our
        picks since, both scaled to the whole host's traffic by ``load.envoy_scale``, drained at the
        measured rate), or Triton's queue if larger (requests that did not come through this Envoy)."""
        return max(self.drained(now)[0], self.pending_at(now))

    def work_in_flight(self, now: float) -> float:
        """:meth:`in_flight` weighed by the work of the picks in it (see :meth:`drained`), in requests of their
        models' mean size."""
        count, work = self.drained(now)
        return max(count, self.pending_at(now)) + work - count

    def pending_at(self, now: float) -> float:
        """Triton's queue, up to a scrape interval old, less what has been served since: the host drains it
        at its rate while the other gateways (whose picks this picker does not see) add their share of the
        host's traffic, so it drains at this gateway's share of the rate (all of it with one gateway)."""
        pending, at = float(self.load.pending), self.metrics_at
        if at is None or now <= at:
            return pending
        return max(0.0, pending - (now - at) * (self.drain_per_s() / self.scale()))

    def record_pick(
        self, now: float, weight: int = 1, model: str | None = None, work: float = 1.0, again: bool = False
    ) -> None:
        """A request sent to the host; ``work``: its size in requests of its model's mean size (the
        in-flight counts, Envoy's and Triton's, are read as requests of that size). ``again``: a pick
        counted before, which a count read before it replaced (see :meth:`reset_estimate`); it is among the
        last picks already."""
        # The other gateways send the host their share meanwhile, as they see what this picker sees.
        scale = weight * self.scale()
        count, held = self.drained(now)
        # Only this picker's own request has a known size: the others' (``scale`` counts them) are of the
        # mean size on average.
        extra = (work - 1.0) * weight
        self.estimate = count + scale
        self.work_estimate = held + scale + extra
        self.estimate_at = now
        self.picks_since_poll += weight
        if self.busy_since is None:
            self.busy_since = now
        if model is not None:
            self.model_estimates[model] = (self._model_drained(model, now) + scale + extra, now)
        if again:
            return
        self._remember(extra)
        self.pick_span = scale
        if model is not None:
            self._hold(now, model, work)

    def _hold(self, now: float, model: str, work: float) -> None:
        """Hold the pick of ``work`` just made for its own execution (see ``held_until``): its rows alone on
        the model's fitted batch cost, else the model's mean execution time on this host (unmeasured: not
        held). Only the last pick is held: holding each pick until its own end routed no better in the
        simulator, and needed a heap per host."""
        times = self.load.models.get(model)
        if times is None:
            return
        if times.cost is not None:
            exec_ms = times.cost.exec_ms(work * (times.rows_per_request or 1.0))
        elif times.exec_ms is not None:
            exec_ms = times.exec_ms
        else:
            return
        self.held_until = now + exec_ms / 1000.0
        self.held_work = work

    def remember_pick(self, work: float) -> None:
        """A pick that the count the estimate restarted from holds already, of ``work``, which this process
        had not counted (another worker's, read after that count): its work beyond its count joins the
        estimate's, and the last picks' (:meth:`picks_excess`)."""
        extra = work - 1.0
        self.work_estimate += extra
        self._remember(extra)

    def _remember(self, extra: float) -> None:
        picks = self.recent_picks
        ring = self.recent_excess
        ring[(picks + 1) % _RING] = ring[picks % _RING] + extra
        self.recent_picks = picks + 1
        if extra != 0.0:
            self.sized_until = picks + 1 + RECENT_PICKS

    def picks_excess(self, in_flight: float, newer: int = 0) -> float:
        """The work of ``in_flight`` requests beyond their count of mean-sized requests: what this picker's
        last picks carried beyond 1 each, over as many picks as the count holds of them (at most
        :data:`RECENT_PICKS`), before the ``newer`` latest (made after the count was read). Below 0 where
        they were small. This sizes a fresh count (Envoy's, Triton's), which carries none (see
        :meth:`reset_estimate`)."""
        if self.recent_picks >= self.sized_until:
            return 0.0
        picks = self.recent_picks - newer
        # As many picks as the count holds, of those the ring still has before the newer ones.
        m = min(int(in_flight / self.pick_span + 0.5), RECENT_PICKS - newer, picks)
        if m <= 0:
            return 0.0
        ring = self.recent_excess
        return ring[picks % _RING] - ring[(picks - m) % _RING]

    def model_in_flight(self, model: str, now: float) -> float:
        """Best estimate of ``model``'s work on this host now, in requests of its mean size: this picker's
        picks of it (each its work, see :meth:`record_pick`), drained at the model's measured rate, or
        Triton's queue of it if larger, never more than the host's :meth:`work_in_flight` (which Envoy's count
        keeps honest)."""
        own = max(self._model_drained(model, now), float(self.load.model_pending.get(model, 0)))
        host = self.work_in_flight(now)
        return min(own, host) if host > 0.0 else 0.0

    def model_part(self, model: str, now: float) -> float:
        """The part of the host's in-flight requests that are ``model``'s, by this picker's per-model
        estimates (each drained at its model's rate); 1 where they know no other model's, or none at all.
        The host's count (Envoy's, kept honest by its polls) times this part is the model's queue: Triton
        queues and executes each model apart, so a request waits behind its own model's requests only."""
        estimates = self.model_estimates
        if len(estimates) < 2:
            return 1.0
        mine = total = 0.0
        for name in estimates:
            value = self._model_drained(name, now)
            total += value
            if name == model:
                mine = value
        return mine / total if total > 0.0 else 1.0

    def _model_drained(self, model: str, now: float) -> float:
        estimate = self.model_estimates.get(model)
        if estimate is None:
            return 0.0
        value, at = estimate
        return max(0.0, value - (now - at) * self._model_rate(model))

    def _model_rate(self, model: str) -> float:
        """Requests of ``model`` the host finishes per second when busy (0: unmeasured). Read when the
        estimate is, not kept from the model's last pick: kept, it routed worse in the simulator
        (``two_models_shared_24``)."""
        times = self.load.models.get(model)
        service_ms = times.service_ms if times is not None else self.load.service_ms
        if not service_ms:
            return 0.0
        batching = self.batching.get(model)
        instances = batching.instances if batching is not None else 1
        return 1000.0 * instances / service_ms

    def reset_estimate(self, in_flight: float, now: float, newer: int = 0) -> None:
        """A fresh count of requests in flight (Envoy's poll, see :meth:`envoy_count`), read at ``now``,
        replaces the estimate; its work is that of the last picks before the ``newer`` latest, which were made
        after it was read (see :meth:`picks_excess`; they are counted again, see :meth:`record_pick`)."""
        count = float(in_flight)
        if count <= 0.0 and newer == 0:
            self.busy_since = None
        self.work_estimate = count + self.picks_excess(count, newer)
        self.estimate, self.estimate_at, self.picks_since_poll = count, now, 0

    def envoy_count(self, active: int) -> float:
        """Envoy's ``rq_active`` for this host as the host's whole in-flight count (every gateway's): plus the
        other replicas' part where they share their loads, else scaled by this gateway's traffic share."""
        peers = self.peer_count
        return active + peers if peers is not None else active * self.load.envoy_scale

    def serves(self, model: str, version: str | None) -> bool:
        versions = self.ready.get(model)
        if versions is None:
            return False
        return version is None or version in versions

    def fresh(self, now: float, max_age_s: float) -> bool:
        """Both the metrics and the repository index must be recent. Envoy's view is not required: the
        picker must keep routing well if Envoy's admin endpoint is unreachable."""
        metrics_at, index_at = self.metrics_at, self.index_at
        return (
            metrics_at is not None
            and index_at is not None
            and now - metrics_at <= max_age_s
            and now - index_at <= max_age_s
        )


def routable(host: HostState, now: float, max_age_s: float) -> bool:
    """What the scheduler's filters require of a candidate, besides having the model READY."""
    return (
        host.fresh(now, max_age_s)
        and not host.draining
        and not host.envoy.ejected
        and not host.envoy.unhealthy
        and host.envoy_at is not None
    )


def host_status(host: HostState, now: float, max_age_s: float) -> dict[str, object]:
    """One host as JSON-friendly data, for the picker's ``/status`` endpoint."""

    def age(at: float | None) -> float | None:
        return None if at is None else round(now - at, 3)

    return {
        "tier": host.tier.value,
        "fresh": host.fresh(now, max_age_s),
        "routable": routable(host, now, max_age_s),
        "ready": {model: sorted(versions) for model, versions in sorted(host.ready.items())},
        # Every model the repository index lists, ready or not.
        "known": sorted(host.known),
        "batching": {
            model: {"max_batch": b.max_batch, "instances": b.instances}
            | ({"sequence_slots": b.sequence_slots, "sequence_idle_s": b.sequence_idle_s} if b.sequence else {})
            for model, b in sorted(host.batching.items())
        },
        "batch_cost_ms": {
            model: {"fixed": round(t.cost.fixed_ms, 3), "per_item": round(t.cost.item_ms, 3)}
            for model, t in sorted(host.load.models.items())
            if t.cost is not None
        },
        "in_flight": round(host.in_flight(now), 2),
        "work_in_flight": round(host.work_in_flight(now), 2),
        "envoy_active": host.envoy.active,
        "traffic_share": round(1.0 / host.load.envoy_scale, 3),
        "peer_in_flight": None if host.peer_count is None else round(host.peer_count, 2),
        "picks_since_poll": host.picks_since_poll,
        "pending": host.load.pending,
        "service_ms": host.load.service_ms,
        "queue_ms": host.load.queue_ms,
        "exec_ms": host.load.exec_ms,
        "gpu_memory_used": host.load.gpu_memory_used,
        "gpu_memory_total": host.load.gpu_memory_total,
        "draining": host.draining,
        "ejected": host.envoy.ejected,
        "unhealthy": host.envoy.unhealthy,
        "age_s": {"metrics": age(host.metrics_at), "index": age(host.index_at), "envoy": age(host.envoy_at)},
    }


def _queues_drained(load: TritonLoad, pending: float) -> TritonLoad:
    """``load`` with its queue down to ``pending`` requests, and each model's queue down in proportion."""
    if load.pending <= 0:
        return load
    kept = pending / load.pending
    models = {m: int(n * kept) for m, n in load.model_pending.items() if int(n * kept) > 0}
    return replace(load, pending=int(pending), model_pending=models)


class Datastore:
    """All hosts of one fleet, by name and by tier."""

    def __init__(self, fleet: Fleet, clock: Callable[[], float] = time.monotonic) -> None:
        self.fleet = fleet
        self.now = clock
        self.hosts: dict[str, HostState] = {h.name: HostState(h) for h in fleet.hosts}
        self.by_tier: dict[Tier, tuple[HostState, ...]] = {
            tier: tuple(s for s in self.hosts.values() if s.tier is tier) for tier in Tier
        }
        self.stale_after_s = fleet.picker.poll.stale_after_ms / 1000
        # (tier, model) → hosts where the model is READY: the model-ready filter without a scan.
        self.serving: dict[tuple[Tier, str], tuple[HostState, ...]] = {}
        # Every model any host lists (in any state): tells an unknown model (404) from an unready one.
        self.known_models: frozenset[str] = frozenset()
        # Counts the changes to the hosts' telemetry and flags: what a scheduler prepared from them before
        # a change is out of date after it (see :meth:`changed`).
        self.generation = 0
        # Counts the changes among them that decide which hosts may be candidates at all: a model's READY
        # hosts, a drain, a model's batching, Envoy's ejections and failed health checks (see
        # :meth:`relaid`). A scheduler may rank on scores a few changes old, never on such a change.
        self.layout = 0
        # When this process last showed it was running, and when it last resumed after a gap (see
        # :meth:`beat`).
        self.beat_at: float | None = None
        self.resumed_at: float | None = None

    def changed(self) -> None:
        """Say that some host's telemetry (:data:`TELEMETRY_FIELDS`) was just written: the writers below
        call it; only the in-flight estimate (read live by every decision) is exempt."""
        self.generation += 1

    def relaid(self) -> None:
        """Say that a write changed which hosts may be candidates (see :attr:`layout`); also a change."""
        self.layout += 1
        self.changed()

    def beat(self, now: float) -> float:
        """The process is running: called every :data:`BEAT_S` and as each request arrives. After a gap of
        more than :data:`PAUSE_S` since the last beat, the hosts' metrics and indexes read before it are
        given the gap back: they aged while the picker could not poll, and judging them stale would refuse
        the first requests after it (503) until the next polls answer. Triton's queues read before it are
        drained to now first, as they would have been by the clock (:meth:`HostState.in_flight`): the hosts
        served them meanwhile, and taking them for current would refuse requests as overload (429). What
        was read after the gap, and Envoy's counts (their in-flight estimates drain by the clock), are left
        as they are. The resumption's time is kept in :attr:`resumed_at` (see :meth:`Scheduler.resuming`).
        Returns the seconds given back (0 without a gap)."""
        last, self.beat_at = self.beat_at, now
        if last is None or now - last <= PAUSE_S:
            return 0.0
        gap = now - last
        self.resumed_at = now
        log.warning("picker_was_not_running", seconds=round(gap, 3))
        for host in self.hosts.values():
            if host.metrics_at is not None and host.metrics_at <= last:
                host.load = _queues_drained(host.load, host.pending_at(now))
                host.metrics_at += gap
            if host.index_at is not None and host.index_at <= last:
                host.index_at += gap
        self.relaid()
        return gap

    def set_load(self, host: HostState, load: TritonLoad, scraped_at: float | None = None) -> None:
        """The host's load: from a scrape of its metrics (``scraped_at``), or with other readings (NVML)."""
        host.load = load
        if scraped_at is not None:
            host.metrics_at = scraped_at
        self.changed()

    def set_envoy(self, host: HostState, view: EnvoyView | None, now: float) -> None:
        """Envoy's view of the host (None: Envoy does not list it; its last view's time is kept). A view
        equal to the last keeps the last's object, so that a worker's snapshot leaves the host out (see
        :mod:`extproc.sharing`)."""
        if view is None:
            view = EnvoyView()
        else:
            host.envoy_at = now
        old = host.envoy
        if view != old:
            host.envoy = view
            if _verdict_changed(old, view):
                self.relaid()
                return
        self.changed()

    def set_batching(self, host: HostState, batching: dict[str, Batching]) -> None:
        relaid = batching != host.batching
        host.batching = batching
        if relaid:
            self.relaid()
        else:
            self.changed()

    def set_draining(self, host: HostState, draining: bool) -> None:
        host.draining = draining
        self.relaid()

    def telemetry(self, host: HostState) -> tuple[Any, ...]:
        """The host's record (:data:`TELEMETRY_FIELDS`, in that order), for :meth:`set_records`."""
        return tuple(getattr(host, name) for name in TELEMETRY_FIELDS)

    def set_records(self, records: dict[str, tuple[Any, ...]]) -> list[HostState]:
        """Write each named host's whole record, as :meth:`telemetry` read it (from another process); a host
        this datastore does not have is skipped. A host's in-flight estimate restarts from Envoy's count
        when that count is newer; the (tier, model) index is rebuilt once at the end, not after each host.
        Returns the hosts whose estimate restarted."""
        reindex = relaid = False
        restarted: list[HostState] = []
        for name, record in records.items():
            host = self.hosts.get(name)
            if host is None:
                continue
            values = dict(zip(TELEMETRY_FIELDS, record, strict=True))
            envoy, envoy_at = values["envoy"], values["envoy_at"]
            assert isinstance(values["load"], TritonLoad) and isinstance(envoy, EnvoyView)
            previous_envoy_at, previous_envoy = host.envoy_at, host.envoy
            if values["ready"].keys() != host.ready.keys() or values["known"] != host.known:
                reindex = True
            elif not relaid:
                relaid = (
                    values["ready"] != host.ready
                    or values["draining"] != host.draining
                    or values["batching"] != host.batching
                    or _verdict_changed(previous_envoy, envoy)
                )
            for field_name, value in values.items():
                setattr(host, field_name, value)
            if envoy_at is not None and envoy_at != previous_envoy_at:
                host.reset_estimate(host.envoy_count(envoy.active), envoy_at)
                restarted.append(host)
        if reindex:
            self._reindex()
        elif relaid:
            self.relaid()
        else:
            self.changed()
        return restarted

    def set_peer_counts(self, counts: dict[str, float | None]) -> None:
        """A worker's share of the other replicas' counts at its leader's Envoy poll (see
        :attr:`HostState.peer_count`; a host not named has none). Whether a host has any sets the scale of its
        counts, which prepared plans hold: a change where that changes."""
        scaled = False
        for name, host in self.hosts.items():
            count = counts.get(name)
            scaled = scaled or (count is None) != (host.peer_count is None)
            host.peer_count = count
        if scaled:
            self.changed()

    def envoy_polled(self, at: float, lagging: dict[str, float | None], written: Container[str]) -> list[HostState]:
        """A worker's share of its leader's latest Envoy poll, made at ``at``: a host that the snapshot left
        out (not in ``written``: its Envoy view is the same object as before) takes the poll's time (or its
        own, in ``lagging``, where Envoy does not list it), and its in-flight estimate restarts from Envoy's
        count at that time. Envoy's time is read by no prepared state: no change. Returns the hosts whose
        estimate restarted."""
        restarted: list[HostState] = []
        for name, host in self.hosts.items():
            if name in written:
                continue
            host_at = lagging.get(name, at)
            if host_at is not None and host_at != host.envoy_at:
                host.envoy_at = host_at
                host.reset_estimate(host.envoy_count(host.envoy.active), host_at)
                restarted.append(host)
        return restarted

    def adopt(self, old: Datastore) -> None:
        """Carry live state over from the datastore of the previous config (reload): hosts with the same name
        and endpoints keep their record and in-flight estimate; new hosts start unknown."""
        for name, host in self.hosts.items():
            before = old.hosts.get(name)
            if before is None or before.spec.model_dump(exclude={"labels", "launch"}) != host.spec.model_dump(
                exclude={"labels", "launch"}
            ):
                continue
            for field_name in (*TELEMETRY_FIELDS, *ESTIMATE_FIELDS):
                setattr(host, field_name, getattr(before, field_name))
        self._reindex()

    def update_index(
        self, host: HostState, ready: dict[str, frozenset[str]], known: frozenset[str], now: float
    ) -> None:
        """Apply one host's repository index; rebuilds the (tier, model) index only when READY sets change,
        and changes the layout when READY versions do (a scheduler's plans are per version)."""
        changed = ready.keys() != host.ready.keys() or known != host.known
        versions = ready != host.ready
        host.ready, host.known, host.index_at = ready, known, now
        if changed:
            self._reindex()
        elif versions:
            self.relaid()
        else:
            self.changed()

    def confirm_index(self, host: HostState, now: float) -> None:
        """The host's metrics page lists exactly the model versions its index has READY: the index still
        holds (Triton adds a model's series when it loads it, and drops them when it unloads it)."""
        host.index_at = now
        self.changed()

    def _reindex(self) -> None:
        serving: dict[tuple[Tier, str], list[HostState]] = {}
        for host in self.hosts.values():
            for model in host.ready:
                serving.setdefault((host.tier, model), []).append(host)
        self.serving = {key: tuple(hosts) for key, hosts in serving.items()}
        self.known_models = frozenset().union(*(h.known for h in self.hosts.values()))
        self.relaid()

    def model_known(self, model: str) -> bool:
        """Whether any host lists the model at all (loaded or not)."""
        return model in self.known_models

    def tiers_serving(self, model: str, version: str | None) -> set[Tier]:
        return {h.tier for h in self.hosts.values() if h.serves(model, version)}

    def status(self) -> dict[str, dict[str, object]]:
        now = self.now()
        return {name: host_status(h, now, self.stale_after_s) for name, h in self.hosts.items()}
