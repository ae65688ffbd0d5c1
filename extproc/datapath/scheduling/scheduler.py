"""The pipeline: classify → candidates (filters) → scores → pick, over the live datastore.

Per request: the model's tier comes from the fleet file's rules; the scheduling profile (filters,
weighted scorers, picker) from the model, else its tier, else the picker's default. A tier with no
candidate, or one whose best host cannot take the request, spills over to the model's other tiers where it
is loaded. Inference requests are admitted by their deadline (:mod:`extproc.datapath.scheduling.admission`): when no
allowed tier can serve one in time, it is refused (429). Other requests that name a model (metadata,
readiness) are never refused for load, except sheddable ones when every tier is saturated.

Most of a decision only changes when telemetry does: which hosts pass the filters, their measured times,
batch costs, GPU memory. The scheduler prepares that once per (tier, model, version) and datastore
generation, as a plan of candidates; per request it reads only the hosts' in-flight counts (which every
pick moves), scores and picks. Preparing costs time in proportion to the plan's hosts, and a large fleet's
telemetry changes between almost any two requests: a plan of more than :data:`INLINE_PREPARE_HOSTS` hosts
is prepared again after the decision that found it out of date (:meth:`Scheduler.refresh`, which the edge
calls once it has answered), so that decision ranks on scores one telemetry change old. Never on an old
layout: a change of which hosts may be candidates at all (a model or version loaded or unloaded, a
drain, an ejection) drops the plans before the next decision (``Datastore.layout``), as does a host's
telemetry going stale (``_Plan.stale_at``).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from extproc.config import Fleet, ModelSpec, Profile, Tier
from extproc.datapath.datastore import Datastore, HostState
from extproc.datapath.peer_load import PeerLoad
from extproc.datapath.scheduling import filters, registry, scorers
from extproc.datapath.scheduling.admission import Admission
from extproc.datapath.scheduling.affinity import rendezvous
from extproc.datapath.scheduling.classify import classify
from extproc.datapath.scheduling.filters import Filters
from extproc.datapath.scheduling.pickers import Argmax, Picker
from extproc.datapath.scheduling.scorers import Candidate, WeightedScorers, prepare
from extproc.datapath.scheduling.sequences import OpenSequences
from extproc.datapath.scheduling.types import Decision, InferenceRequest, Priority, Protocol, Reject, Route
from extproc.datapath.scheduling.work import RequestSizes
from extproc.datapath.shared_picks import SharedPicks

# Triton's own answers (2.51) to a model or version it does not serve, where the picker answers for it: the
# same status (REST 404, gRPC NOT_FOUND) and words, so that a client that tells errors by their message
# (Triton's examples do) sees no difference; tests/test_triton_contract.py holds them to a real Triton's.
# Readiness probes and streams of such a model are answered by a host instead (see extproc.handlers.server).


def unknown_model_message(model: str) -> str:
    """Triton's words for a model it has not loaded: never loaded, or not in its repository at all. (One
    that it loaded and then unloaded "has no available versions" there: the picker does not know which.)"""
    return f"Request for unknown model: '{model}' is not found"


def unknown_version_message(model: str, version: int) -> str:
    return f"Request for unknown model: '{model}' version {version} is not found"


# What Triton reads of a gRPC version string: std::stol, i.e. leading blanks, a sign and the leading digits.
_STOL_PREFIX = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")
_INT64_MAX = 2**63 - 1


def triton_version(version: str, protocol: Protocol) -> int | Reject:
    """The version number Triton reads from a request's version string, or its answer where it reads none:
    a REST path names a version in ASCII digits only (Triton has no route for any other: 404 "Not Found");
    gRPC's is parsed like std::stol, and must not be negative."""
    if protocol is Protocol.HTTP and not (version.isascii() and version.isdigit()):
        return Reject(404, "Not Found", "unknown_version")
    match = _STOL_PREFIX.match(version)
    number = int(match.group()) if match is not None else None
    if number is None or not -_INT64_MAX - 1 <= number <= _INT64_MAX:
        return Reject(
            400,
            f"failed to get model version from specified version string '{version}' (details: stol), version "
            "should be an integral value > 0",
            "unknown_version",
        )
    if number < 0:
        return Reject(
            400,
            f"invalid model version specified '{version}' , version should be an integral value > 0",
            "unknown_version",
        )
    return number


@dataclass(frozen=True, slots=True)
class _Units:
    """A profile's units, built once from the fleet file (see :mod:`extproc.datapath.scheduling.registry`)."""

    filters: Filters
    static: WeightedScorers  # summed once per plan (see scorers.prepare)
    scorers: WeightedScorers  # scored per request, by the picker
    picker: Picker


# One tier a request may go to, with its profile's units.
_Step = tuple[Tier, _Units]


# The most hosts a plan may have and still be prepared again within the decision that finds it out of date.
INLINE_PREPARE_HOSTS: Final = 64

# The least time after a resumption in which no request is refused as overload (see Scheduler.resuming):
# the backlog that built up while the process was stopped takes a while to read, longer on a busy machine.
RESUME_S: Final = 1.0


@dataclass(slots=True)
class _Plan:
    """One (tier, model, version): the tier's hosts with the model (version), and those that pass the
    profile's filters, prepared as candidates (when first needed). Valid until the datastore's layout
    changes; the candidates until its generation does (see :meth:`Scheduler.refresh` for large plans), and
    until ``stale_at``, when the first of them may stop passing (see Filter.holds_until)."""

    hosts: tuple[HostState, ...]
    candidates: tuple[Candidate, ...] = ()
    stale_at: float = -math.inf  # not prepared yet
    generation: int = -1  # the datastore's, when prepared
    due: bool = False  # waits in Scheduler._due for refresh()


class Scheduler:
    """Decides one request at a time; cheap enough to run inline on the picker's event loop."""

    def __init__(
        self,
        fleet: Fleet,
        datastore: Datastore,
        rng: random.Random | None = None,
        pick_weight: int = 1,
        shared_picks: SharedPicks | None = None,
        peer_load: PeerLoad | None = None,
    ) -> None:
        """``pick_weight``: how many requests one pick stands for; a worker process that sees 1/N of the
        traffic counts each of its picks N times, in its open sequences and, unless it has ``shared_picks``
        (the other workers' picks, see :mod:`extproc.datapath.shared_picks`), in its in-flight count.
        ``peer_load``: where each pick is told to the other picker replicas (see
        :mod:`extproc.datapath.peer_load`)."""
        self._pick_weight = 1 if shared_picks is not None else pick_weight
        self._shared_picks = shared_picks
        self._peer_load = peer_load
        self._fleet = fleet
        self._store = datastore
        self._specs = {m.name: m for m in fleet.models}
        self._saturation = fleet.picker.saturation
        self._admission = Admission(fleet)
        self._resume_s = max(RESUME_S, fleet.picker.message_timeout_ms / 1000)
        self._context = registry.Context(fleet.picker.max_hosts, datastore.stale_after_s, rng or random.Random())
        self._plans: dict[tuple[Tier, str, str | None], _Plan] = {}
        # Each profile's units, by the profile's id: the fleet holds every profile for as long as this lives.
        self._units: dict[int, _Units] = {}
        # Requests that name no model go to the live host with the fewest requests in flight.
        self._argmax = Argmax(self._context)
        self._any_host_scorers = scorers.build({"in_flight": 1.0}, self._context)[1]
        # Per listed model and classified tier: the tiers to try, in order, each with its profile.
        self._orders = {(m.name, tier): self._order(m, tier) for m in fleet.models for tier in m.tiers}
        # The same for models the fleet file does not list, until the datastore changes (see _implicit_order).
        self._implicit_orders: dict[tuple[str, Tier], tuple[_Step, ...]] = {}
        self._implicit_specs: dict[str, ModelSpec] = {}
        self._open_sequences = OpenSequences(pick_weight, fleet.picker.overload.max_sequence_share)
        # Whether a model keeps a sequence on one host, until the datastore changes (see is_sequence_model).
        self._sequence_models: dict[str, bool] = {}
        # The datastore layout the plans and the unlisted models' orders were made from.
        self._layout = -1
        # Large plans decided on out of date, with what refresh() prepares them with.
        self._due: list[tuple[_Plan, str, _Units]] = []
        self._sizes = RequestSizes()

    @property
    def datastore(self) -> Datastore:
        return self._store

    def has_telemetry(self) -> bool:
        """Whether any host's repository index has arrived; before that every model would look unknown."""
        return bool(self._store.known_models)

    def knows_model(self, model: str) -> bool:
        """Some host lists the model (in any state); an unknown model is answered 404 whatever its body."""
        return self._store.model_known(model)

    def decide(self, request: InferenceRequest) -> Decision:
        model = request.model
        if model is None:
            return self._any_host(request)
        if not self._store.model_known(model):
            return self._unknown_model(request, model)
        self._follow_datastore()
        spec = self._specs.get(model)
        order = self._implicit_order(model, request) if spec is None else self._orders[model, classify(request, spec)]
        now = self._store.now()
        if self._shared_picks is not None:
            self._shared_picks.catch_up(self._store, now)
        self._sizes.observe(request, model)
        decision: Decision | None
        if request.sequence_id is not None and self.is_sequence_model(model):
            decision = self._sequence(request, order, now)
        else:
            decision = self._balance(request, order, now)
            if isinstance(decision, Route) and len(order) > 1 and len(decision.hosts) < self._context.max_hosts:
                decision = self._with_spill_hosts(decision, order, request, now)
        if decision is None:
            return self._no_route(request)
        if isinstance(decision, Route):
            if request.infer and self._admission.enabled:
                decision.timeout_ms = math.ceil(self._admission.allowed_ms(request))
            return self._commit(decision, now, model)
        return decision

    def _with_spill_hosts(self, route: Route, order: tuple[_Step, ...], request: InferenceRequest, now: float) -> Route:
        """A route to a tier of fewer than ``max_hosts`` candidates names, after them, the candidates of the
        model's other tiers with the fewest requests in flight. Envoy tries them only where a try cannot
        have reached its host (connect failure, refused stream, reset before the request; see
        :mod:`extproc.envoy_config`): the tier's clusters hold the spill tiers' hosts for that, so a request
        the picker sent to a host that has just died is served by another tier instead of failing."""
        model = request.model or ""
        room = self._context.max_hosts - len(route.hosts)
        spill: list[HostState] = []
        for tier, units in order:
            if tier is route.tier:
                continue
            plan = self._plan(tier, model, request.version)
            if plan is None:
                continue
            ready = _allowed(request, self._prepared(plan, model, units, now))
            spill += [c.host for c in heapq.nsmallest(room - len(spill), ready, key=lambda c: c.in_flight(now))]
            if len(spill) >= room:
                break
        return Route(route.tier, route.hosts + tuple(spill), route.reason, work=route.work) if spill else route

    def _follow_datastore(self) -> None:
        """Drop what was derived from an older datastore layout."""
        if self._layout != self._store.layout:
            self._plans.clear()
            self._due.clear()
            self._implicit_specs.clear()
            self._implicit_orders.clear()
            self._sequence_models.clear()
            self._layout = self._store.layout

    @property
    def refresh_due(self) -> bool:
        """Some large plan was decided on out of date: :meth:`refresh` would prepare it again."""
        return bool(self._due)

    def refresh(self) -> None:
        """Prepare again the large plans that decisions found out of date, off those decisions' time: the
        edge calls it once it has answered (the simulator after each decision)."""
        due, self._due = self._due, []
        if due and self._layout == self._store.layout:
            now = self._store.now()
            for plan, model, units in due:
                plan.due = False
                if plan.generation != self._store.generation:
                    self._prepare(plan, model, units, now)

    def is_sequence_model(self, model: str) -> bool:
        """Marked ``sequence`` in the fleet file, or served with a sequence batcher by some host. Only such a
        model's correlation id pins a request to a host: for any other model a client could otherwise pick
        the host itself and skip load balancing, spillover and shedding."""
        spec = self._specs.get(model)
        if spec is not None and spec.sequence:
            return True
        self._follow_datastore()
        known = self._sequence_models.get(model)
        if known is None:
            batchings = [host.batching.get(model) for host in self._store.hosts.values()]
            known = self._sequence_models[model] = any(b is not None and b.sequence for b in batchings)
        return known

    def _order(self, spec: ModelSpec, tier: Tier) -> tuple[_Step, ...]:
        """The tiers a request of ``spec`` classified into ``tier`` may go to, in order, with their profiles:
        its own, then (if its profile spills over) the model's other tiers."""
        first = self._fleet.profile(spec, tier)
        others = [t for t in spec.tiers if t is not tier] if first.spillover else []
        return tuple(self._step(t, self._fleet.profile(spec, t)) for t in (tier, *others))

    def _step(self, tier: Tier, profile: Profile) -> _Step:
        return tier, self._profile_units(profile)

    def _profile_units(self, profile: Profile) -> _Units:
        units = self._units.get(id(profile))
        if units is None:
            context = self._context
            static, per_request = scorers.build(profile.scorers, context)
            picker = registry.PICKERS.build(profile.picker, context)
            units = _Units(filters.build(profile.filters, context), static, per_request, picker)
            self._units[id(profile)] = units
        return units

    def _balance(self, request: InferenceRequest, order: tuple[_Step, ...], now: float) -> Decision | None:
        if request.infer and self._admission.enabled:
            return self._admit(request, order, now)
        model = request.model or ""
        saturated: Route | None = None
        resuming = self.resuming(now)
        for candidate_tier, units in order:
            ranked, own = self._ranked(request, candidate_tier, units, now)
            if not ranked:
                continue
            hosts = tuple([c.host for c in ranked])
            reason = "classified" if candidate_tier is order[0][0] else "spillover"
            if resuming or not self._is_saturated(ranked[0], now, own):
                return Route(candidate_tier, hosts, reason, work=own)
            saturated = saturated or Route(candidate_tier, hosts, "saturated", work=own)
        if saturated is not None and request.priority is Priority.SHEDDABLE:
            return Reject(
                429,
                f"model '{model}' is saturated: every host that serves it is at its limit, and this request is "
                "sheddable (x-triton-priority); retry after the delay in retry-after",
                "shed",
                retry_after=True,
            )
        return saturated

    def _admit(self, request: InferenceRequest, order: tuple[_Step, ...], now: float) -> Decision | None:
        """The first tier whose best candidate can serve the request within its limit (see
        :mod:`extproc.datapath.scheduling.admission`), unless the client is over its share; else refused."""
        admission = self._admission
        model = request.model or ""
        deadline = admission.deadline_ms(request)
        limit = admission.limit_ms(request, deadline)
        least_over: float | None = None
        resuming = self.resuming(now)
        for candidate_tier, units in order:
            ranked, own = self._ranked(request, candidate_tier, units, now)
            if not ranked:
                continue
            if not resuming:
                fraction, over = admission.load(request, ranked[0], model, limit, now, own)
                if fraction > 1:
                    least_over = over if least_over is None else min(least_over, over)
                    continue
                refused = admission.fair(request, fraction, now)
                if refused is not None:
                    return refused
            reason = "classified" if candidate_tier is order[0][0] else "spillover"
            return Route(candidate_tier, tuple([c.host for c in ranked]), reason, work=own)
        return None if least_over is None else admission.refuse(request, least_over, deadline)

    def _sequence(self, request: InferenceRequest, order: tuple[_Step, ...], now: float) -> Decision | None:
        """The sequence's home among the first tier with candidates; load and saturation do not move it, but
        a new sequence is refused while every sequence slot of its home (or its client's share) is taken, and
        a request for another client's open sequence is refused (see extproc.datapath.scheduling.sequences)."""
        model, sequence_id = request.model or "", request.sequence_id or ""
        for candidate_tier, units in order:
            plan = self._plan(candidate_tier, model, request.version)
            candidates = () if plan is None else _allowed(request, self._prepared(plan, model, units, now))
            if candidates:
                ranked = rendezvous([c.host for c in candidates], model, sequence_id)[: self._fleet.picker.max_hosts]
                refused = self._open_sequences.admit(ranked[0], request, now)
                if refused is not None:
                    return refused
                return Route(candidate_tier, tuple(ranked), "sequence", work=self.work(request, candidates[0]))
        return None

    def _unknown_model(self, request: InferenceRequest, model: str) -> Reject:
        """No host lists the model. Triton reads the version first."""
        if request.version is not None:
            number = triton_version(request.version, request.protocol)
            if isinstance(number, Reject):
                return number
        return Reject(404, unknown_model_message(model), "unknown_model")

    def _no_route(self, request: InferenceRequest) -> Decision:
        """Why no host can take a request for a model that some host lists: Triton's answer where Triton
        would refuse it too (a version Triton cannot read; other versions ready and this one nowhere; every
        host has reported and none has the model ready), else the gateway's own (503 and retry-after: its
        hosts are down, draining, ejected or not reporting). A version Triton reads as another ("01") is
        decided as that one."""
        model, version = request.model or "", request.version
        number: int | None = None
        if version is not None:
            read = triton_version(version, request.protocol)
            if isinstance(read, Reject):
                return read
            number = read
            if str(number) != version:
                # Triton reads "01" (gRPC also " +1") as version 1, which the hosts report as "1".
                return self.decide(dataclasses.replace(request, version=str(number)))
        if not self._store.tiers_serving(model, None):
            # Ready nowhere: a host that has not reported lately may have it (it may be starting).
            if self._every_index_fresh():
                return Reject(404, unknown_model_message(model), "model_not_ready")
        elif number is not None and not self._store.tiers_serving(model, version):
            # Other versions are ready, this one nowhere: a client error, not a transient outage.
            return Reject(404, unknown_version_message(model, number), "unknown_version")
        return Reject(
            503,
            f"model '{model}' has no ready host right now: the hosts that serve it are down, draining or not "
            "reporting; retry after the delay in retry-after",
            "no_ready_host",
            retry_after=True,
        )

    def _every_index_fresh(self) -> bool:
        """Every host's repository index is recent: the picker knows where each model is ready."""
        now = self._store.now()
        limit = self._store.stale_after_s
        return all(h.index_at is not None and now - h.index_at <= limit for h in self._store.hosts.values())

    def _loaded(self, tier: Tier, model: str, version: str | None) -> tuple[HostState, ...]:
        """model_ready, from the datastore's (tier, model) index."""
        loaded = self._store.serving.get((tier, model), ())
        return loaded if version is None else tuple(filters.with_version(loaded, model, version))

    def _plan(self, tier: Tier, model: str, version: str | None) -> _Plan | None:
        """The plan of (tier, model, version), kept until the datastore changes (see :meth:`decide`); None
        where no host of the tier has the model (version)."""
        key = (tier, model, version)
        plan = self._plans.get(key)
        if plan is None:
            loaded = self._loaded(tier, model, version)
            if not loaded:
                return None  # not kept: clients choose the versions they ask for, so these keys are unbounded
            plan = self._plans[key] = _Plan(loaded)
        return plan

    def _prepared(self, plan: _Plan, model: str, units: _Units, now: float) -> tuple[Candidate, ...]:
        """Every host of the plan that passes the profile's filters, prepared (again once stale or, for a
        small plan, out of date; a large one is left to :meth:`refresh`)."""
        if now > plan.stale_at:
            self._prepare(plan, model, units, now)
        elif plan.generation != self._store.generation:
            if len(plan.hosts) <= INLINE_PREPARE_HOSTS:
                self._prepare(plan, model, units, now)
            elif not plan.due:
                plan.due = True
                self._due.append((plan, model, units))
        return plan.candidates

    def _prepare(self, plan: _Plan, model: str, units: _Units, now: float) -> None:
        passing = filters.passing(plan.hosts, units.filters, now)
        plan.candidates = tuple(prepare(passing, model, units.static))
        plan.stale_at = filters.holds_until(units.filters, passing)
        plan.generation = self._store.generation

    def _ranked(
        self, request: InferenceRequest, tier: Tier, units: _Units, now: float
    ) -> tuple[Sequence[Candidate], float]:
        """The tier's candidates the request may go to, best first (none: the tier cannot take it), and the
        request's work among them (see :meth:`work`)."""
        candidates = _allowed(request, self._candidates(tier, request.model or "", request.version, units, now))
        if not candidates:
            return candidates, 1.0
        own = self.work(request, candidates[0])
        return (units.picker.pick(candidates, units.scorers, now, own) if len(candidates) > 1 else candidates), own

    def work(self, request: InferenceRequest, candidate: Candidate) -> float:
        """The request's work, in requests of its model's mean size (see
        :meth:`~extproc.datapath.scheduling.work.RequestSizes.work`)."""
        return self._sizes.work(request, candidate)

    def learn_size(self, request: InferenceRequest, elements: int) -> None:
        """A routed REST request's elements, from its body's tensor headers (see
        :meth:`~extproc.datapath.scheduling.work.RequestSizes.learn`)."""
        self._sizes.learn(request, elements)

    def _candidates(
        self, tier: Tier, model: str, version: str | None, units: _Units, now: float
    ) -> Sequence[Candidate]:
        """The plan's candidates, or those of the sample the picker draws from the plan's hosts."""
        plan = self._plan(tier, model, version)
        if plan is None:
            return ()
        sample = units.picker.sample(plan.hosts, units.filters, now)
        if sample is not None:
            return prepare(sample, model, units.static)
        return self._prepared(plan, model, units, now)

    def resuming(self, now: float) -> bool:
        """Whether the process resumed after a gap (see :meth:`Datastore.beat`) less than a message timeout
        ago (at least :data:`RESUME_S`). Meanwhile no request is refused or spilled over as overload: the
        requests that waited for the picker arrive at once, and those older than Envoy's message timeout
        were already sent on without it, so this picker's own picks of them count work that is not there.
        Envoy's next in-flight poll corrects the count."""
        resumed_at = self._store.resumed_at
        return resumed_at is not None and now - resumed_at < self._resume_s

    def _is_saturated(self, best: Candidate, now: float, own: float = 1.0) -> bool:
        """The best candidate is over a limit, so every candidate is (for argmax; nearly so for samples)."""
        in_flight = best.in_flight(now)
        return (
            in_flight >= self._saturation.max_in_flight
            or best.completion_now(in_flight, own, now) >= self._saturation.max_queue_ms
        )

    def _commit(self, route: Route, now: float, model: str | None = None) -> Route:
        # Optimistic accounting until Envoy's next in-flight poll reconciles it.
        host = route.hosts[0]
        host.record_pick(now, self._pick_weight, model, route.work)
        if self._shared_picks is not None:
            self._shared_picks.publish(host, model, route.work, now)
        if self._peer_load is not None:
            self._peer_load.picked(host, model, route.work)
        return route

    def _any_host(self, request: InferenceRequest) -> Decision:
        """Health, metadata and repository calls: any live host of the hinted (else fallback) tier."""
        tier = request.tier_hint or self._fleet.envoy.fallback_tier
        now = self._store.now()
        units = self._profile_units(self._fleet.profile(None, tier))
        passing = filters.passing(self._store.by_tier[tier], units.filters, now)
        allowed = request.allowed
        if allowed is not None:
            passing = [h for h in passing if _endpoint(h, request.protocol) in allowed]
        if not passing:
            return Reject(
                503,
                f"no {tier.value} host is ready right now; retry after the delay in retry-after",
                "no_ready_host",
                retry_after=True,
            )
        candidates = prepare(passing, None)
        ranked = self._argmax.pick(candidates, self._any_host_scorers, now) if len(candidates) > 1 else candidates
        return self._commit(Route(tier, tuple([c.host for c in ranked]), "no_model"), now)

    def _implicit_order(self, model: str, request: InferenceRequest) -> tuple[_Step, ...]:
        """The tiers to try for a model the fleet file does not list. Its spec depends on where it is loaded,
        so spec and orders are kept until the datastore changes: building them took more than the rest of
        the decision. Only models some host knows get here, so the repositories bound these keys."""
        spec = self._implicit_specs.get(model)
        if spec is None:
            spec = self._implicit_specs[model] = self._implicit_spec(model)
        key = (model, classify(request, spec))
        order = self._implicit_orders.get(key)
        if order is None:
            order = self._implicit_orders[key] = self._order(spec, key[1])
        return order

    def _implicit_spec(self, model: str) -> ModelSpec:
        """A model the fleet file does not list is served from whichever tiers have it loaded."""
        tiers = tuple(t for t in self._fleet.tiers if t in self._store.tiers_serving(model, None))
        return ModelSpec(name=model, tiers=tiers or self._fleet.tiers)


def _endpoint(host: HostState, protocol: Protocol) -> str:
    return host.grpc_endpoint if protocol is Protocol.GRPC else host.http_endpoint


def _allowed(request: InferenceRequest, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
    """The candidates at the endpoints the request may go to (:attr:`InferenceRequest.allowed`)."""
    allowed = request.allowed
    if allowed is None:
        return candidates
    protocol = request.protocol
    return [c for c in candidates if _endpoint(c.host, protocol) in allowed]
