"""The pipeline: classify → filter → score → pick, over the live datastore."""

from __future__ import annotations

import itertools

from extproc.config import Fleet, ModelSpec, Tier
from extproc.datastore import Datastore, HostState
from extproc.scheduling import filters, scorers
from extproc.scheduling.classify import classify
from extproc.scheduling.types import Decision, InferenceRequest, Reject, Route


class Scheduler:
    """Decides one request at a time; cheap enough to run inline on the picker's event loop."""

    def __init__(self, fleet: Fleet, datastore: Datastore) -> None:
        self._fleet = fleet
        self._store = datastore
        self._weights = fleet.picker.weights
        self._max_hosts = fleet.picker.max_hosts
        self._specs = {m.name: m for m in fleet.models}
        # Rotates which of several equally good hosts comes first, so ties do not herd onto one host.
        self._tiebreak = itertools.count()

    def decide(self, request: InferenceRequest) -> Decision:
        if request.model is None:
            return self._any_host(request)
        model, version = request.model, request.version
        if not self._store.model_known(model):
            return Reject(404, f"model '{model}' is not served by any host of this fleet", "unknown_model")
        spec = self._specs.get(model) or self._implicit_spec(model)
        tier = classify(request, spec)
        # The classified tier first, then spillover to the model's other tiers where it is loaded.
        tiers = (tier, *(t for t in spec.tiers if t is not tier))
        now = self._store.now()
        for candidate_tier in tiers:
            loaded = filters.serving(self._store.by_tier[candidate_tier], model, version)
            candidates = filters.healthy(filters.fresh(loaded, now, self._store.stale_after_s))
            if candidates:
                reason = "classified" if candidate_tier is tier else "spillover"
                return self._pick(candidate_tier, candidates, reason)
        if (
            version is not None
            and self._store.tiers_serving(model, None)
            and not self._store.tiers_serving(model, version)
        ):
            # Other versions are ready, this one nowhere: a client error, not a transient outage.
            return Reject(
                404, f"version '{version}' of model '{model}' is not ready on any host", "unknown_version"
            )
        return Reject(503, f"model '{model}' has no ready host right now", "no_ready_host", retry_after=True)

    def _any_host(self, request: InferenceRequest) -> Decision:
        """Health, metadata and repository calls: any live host of the hinted (else fallback) tier."""
        tier = request.tier_hint or self._fleet.envoy.fallback_tier
        hosts = self._store.by_tier[tier]
        candidates = filters.healthy(filters.fresh(hosts, self._store.now(), self._store.stale_after_s))
        if not candidates:
            return Reject(503, f"no {tier.value} host is ready right now", "no_ready_host", retry_after=True)
        return self._pick(tier, candidates, "no_model")

    def _implicit_spec(self, model: str) -> ModelSpec:
        """A model the fleet file does not list is served from whichever tiers have it loaded."""
        tiers = tuple(t for t in self._fleet.tiers if t in self._store.tiers_serving(model, None))
        return ModelSpec(name=model, tiers=tiers or self._fleet.tiers)

    def _pick(self, tier: Tier, candidates: list[HostState], reason: str) -> Route:
        if len(candidates) == 1:
            ranked = candidates
        else:
            wait = scorers.normalise(scorers.expected_wait_ms(candidates))
            cost = [self._weights.expected_wait * w for w in wait]
            if tier is Tier.GPU and self._weights.gpu_memory:
                pressure = scorers.gpu_memory_pressure(candidates)
                cost = [c + self._weights.gpu_memory * p for c, p in zip(cost, pressure, strict=True)]
            n = len(candidates)
            start = next(self._tiebreak) % n
            order = sorted(range(n), key=lambda i: (cost[i], (i - start) % n))
            ranked = [candidates[i] for i in order[: self._max_hosts]]
        ranked[0].picks_since_poll += 1
        return Route(tier, tuple(ranked[: self._max_hosts]), reason)
