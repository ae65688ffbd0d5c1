"""The pipeline: classify → candidates (filters) → scores → pick, over the live datastore.

Per request: the model's tier comes from the fleet file's rules; the scheduling profile (filters,
weighted scorers, picker) from the model, else its tier, else the picker's default. A tier with no
candidate, or a saturated one, spills over to the model's other tiers where it is loaded. When every
allowed tier is saturated, sheddable requests get 429 and the others go to the least-bad host.
"""

from __future__ import annotations

import random

from extproc.config import Fleet, ModelSpec, PickerName, Profile, ScorerName, Tier
from extproc.datastore import Datastore, HostState
from extproc.scheduling import filters
from extproc.scheduling.affinity import rendezvous
from extproc.scheduling.classify import classify
from extproc.scheduling.pickers import Ranker
from extproc.scheduling.scorers import expected_completion_ms
from extproc.scheduling.types import Decision, InferenceRequest, Priority, Reject, Route

# Above this many hosts, power_of_two filters a random sample instead of the whole list.
_LAZY_FILTER_MIN_HOSTS = 16


class Scheduler:
    """Decides one request at a time; cheap enough to run inline on the picker's event loop."""

    def __init__(
        self, fleet: Fleet, datastore: Datastore, rng: random.Random | None = None, pick_weight: int = 1
    ) -> None:
        """``pick_weight``: how many requests one pick stands for in the optimistic in-flight count; a
        worker process that sees 1/N of the traffic counts each of its picks N times."""
        self._pick_weight = pick_weight
        self._fleet = fleet
        self._store = datastore
        self._specs = {m.name: m for m in fleet.models}
        self._saturation = fleet.picker.saturation
        self._rng = rng or random.Random()
        self._ranker = Ranker(fleet.picker.max_hosts, self._rng)

    def has_telemetry(self) -> bool:
        """Whether any host's repository index has arrived; before that every model would look unknown."""
        return bool(self._store.known_models)

    def decide(self, request: InferenceRequest) -> Decision:
        model = request.model
        if model is None:
            return self._any_host(request)
        if not self._store.model_known(model):
            return Reject(404, f"model '{model}' is not served by any host of this fleet", "unknown_model")
        spec = self._specs.get(model) or self._implicit_spec(model)
        now = self._store.now()
        tier = classify(request, spec)
        profile = self._fleet.profile(spec, tier)
        tiers = (tier, *(t for t in spec.tiers if t is not tier)) if profile.spillover else (tier,)
        decision: Decision | None
        if request.sequence_id is not None:
            decision = self._sequence(request, spec, tiers, now)
        else:
            decision = self._balance(request, spec, tiers, now)
        if decision is None:
            return self._no_route(request)
        return self._commit(decision) if isinstance(decision, Route) else decision

    def _balance(
        self, request: InferenceRequest, spec: ModelSpec, tiers: tuple[Tier, ...], now: float
    ) -> Decision | None:
        model, version = request.model or "", request.version
        saturated: Route | None = None
        for candidate_tier in tiers:
            profile = self._fleet.profile(spec, candidate_tier)
            candidates = self._candidates(self._loaded(candidate_tier, model, version), profile, now)
            if not candidates:
                continue
            ranked = self._ranker.rank(profile.picker, candidates, profile.scorers, now, model)
            reason = "classified" if candidate_tier is tiers[0] else "spillover"
            if not self._is_saturated(ranked[0], now, model):
                return Route(candidate_tier, tuple(ranked), reason)
            saturated = saturated or Route(candidate_tier, tuple(ranked), "saturated")
        if saturated is not None and request.priority is Priority.SHEDDABLE:
            return Reject(429, f"model '{model}' is saturated; sheddable request refused", "shed", retry_after=True)
        return saturated

    def _sequence(
        self, request: InferenceRequest, spec: ModelSpec, tiers: tuple[Tier, ...], now: float
    ) -> Route | None:
        """The sequence's home among the first tier with candidates; load and saturation do not move it."""
        model, sequence_id = request.model or "", request.sequence_id or ""
        for candidate_tier in tiers:
            profile = self._fleet.profile(spec, candidate_tier)
            loaded = self._loaded(candidate_tier, model, request.version)
            max_age = self._store.stale_after_s
            candidates = [h for h in loaded if filters.passes(h, profile.filters, now, max_age)]
            if candidates:
                ranked = rendezvous(candidates, model, sequence_id)[: self._fleet.picker.max_hosts]
                return Route(candidate_tier, tuple(ranked), "sequence")
        return None

    def _no_route(self, request: InferenceRequest) -> Reject:
        model, version = request.model or "", request.version
        if (
            version is not None
            and self._store.tiers_serving(model, None)
            and not self._store.tiers_serving(model, version)
        ):
            # Other versions are ready, this one nowhere: a client error, not a transient outage.
            return Reject(404, f"version '{version}' of model '{model}' is not ready on any host", "unknown_version")
        return Reject(503, f"model '{model}' has no ready host right now", "no_ready_host", retry_after=True)

    def _loaded(self, tier: Tier, model: str, version: str | None) -> tuple[HostState, ...]:
        """model_ready, from the datastore's (tier, model) index."""
        loaded = self._store.serving.get((tier, model), ())
        return loaded if version is None else tuple(filters.with_version(loaded, model, version))

    def _candidates(self, hosts: tuple[HostState, ...], profile: Profile, now: float) -> list[HostState]:
        max_age = self._store.stale_after_s
        if profile.picker is PickerName.POWER_OF_TWO and len(hosts) >= _LAZY_FILTER_MIN_HOSTS:
            # Draw hosts at random until enough pass for the two-choice pick and the retry list: the first
            # that pass are a uniform sample of those that pass, and a large fleet costs no more than a small
            # one. Too many failures (a mostly ejected or stale tier): filter them all.
            want = max(2, self._fleet.picker.max_hosts)
            n, draw = len(hosts), self._rng.randrange
            passing: list[HostState] = []
            tried: set[int] = set()
            for _ in range(4 * want):
                i = draw(n)
                if i in tried:
                    continue
                tried.add(i)
                if filters.passes(hosts[i], profile.filters, now, max_age):
                    passing.append(hosts[i])
                    if len(passing) == want:
                        return passing
        return [h for h in hosts if filters.passes(h, profile.filters, now, max_age)]

    def _is_saturated(self, best: HostState, now: float, model: str) -> bool:
        """The best candidate is over a limit, so every candidate is (for argmax; nearly so for samples)."""
        if best.in_flight(now) >= self._saturation.max_in_flight:
            return True
        return expected_completion_ms([best], now, model)[0] >= self._saturation.max_queue_ms

    def _commit(self, route: Route) -> Route:
        # Optimistic accounting until Envoy's next in-flight poll reconciles it.
        route.hosts[0].record_pick(self._store.now(), self._pick_weight)
        return route

    def _any_host(self, request: InferenceRequest) -> Decision:
        """Health, metadata and repository calls: any live host of the hinted (else fallback) tier."""
        tier = request.tier_hint or self._fleet.envoy.fallback_tier
        now, max_age = self._store.now(), self._store.stale_after_s
        profile = self._fleet.profile(None, tier)
        candidates = [h for h in self._store.by_tier[tier] if filters.passes(h, profile.filters, now, max_age)]
        if not candidates:
            return Reject(503, f"no {tier.value} host is ready right now", "no_ready_host", retry_after=True)
        ranked = self._ranker.rank(PickerName.ARGMAX, candidates, {ScorerName.IN_FLIGHT: 1.0}, now)
        return self._commit(Route(tier, tuple(ranked), "no_model"))

    def _implicit_spec(self, model: str) -> ModelSpec:
        """A model the fleet file does not list is served from whichever tiers have it loaded."""
        tiers = tuple(t for t in self._fleet.tiers if t in self._store.tiers_serving(model, None))
        return ModelSpec(name=model, tiers=tiers or self._fleet.tiers)
