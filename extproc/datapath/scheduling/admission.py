"""Admission under overload: each inference request's deadline, and whether the best host can meet it.

A request's deadline is the client's (gRPC ``grpc-timeout``, REST ``x-triton-timeout-ms``) capped by its
model's (``models[].deadline_ms``, else ``picker.overload.deadline_ms``). The picker sends a request only
where its expected completion on the best candidate (the queue ahead of it included) is within its class's
share of that deadline, and, for standard and sheddable requests, within the soft limits
(``picker.saturation``); critical requests may exceed those, never their share of the deadline. What is not
admitted is refused at once (429 and a ``retry-after`` from the predicted drain time), never queued where
its caller will have left before it is served: a queue past the deadline only grows.

Under contention (the best host over half full for the request) each client key gets an equal share of the
model's admissions (:mod:`extproc.datapath.scheduling.fairness`): a client over its share is refused there, so the
rest of the room is left to the clients below theirs.
"""

from __future__ import annotations

import math
from typing import Final

from extproc.config import Fleet
from extproc.datapath.scheduling.fairness import FairShares
from extproc.datapath.scheduling.scorers import Candidate
from extproc.datapath.scheduling.types import InferenceRequest, Priority, Reject

__all__ = ["Admission"]

# Requests without a fairness key (no address, no header) share this one.
_NO_KEY: Final = ""


class Admission:
    """The overload settings of one fleet config, and the fair shares they keep."""

    def __init__(self, fleet: Fleet) -> None:
        spec = fleet.picker.overload
        self.enabled = spec.admission
        self._deadlines = {m.name: float(m.deadline_ms or spec.deadline_ms) for m in fleet.models}
        self._default_deadline = float(spec.deadline_ms)
        shares = spec.deadline_shares
        self._shares = {
            Priority.CRITICAL: shares.critical,
            Priority.STANDARD: shares.standard,
            Priority.SHEDDABLE: shares.sheddable,
        }
        self._max_queue_ms = fleet.picker.saturation.max_queue_ms
        self._max_in_flight = fleet.picker.saturation.max_in_flight
        self._max_retry_after_s = spec.max_retry_after_s
        self._fair = FairShares(spec.max_fairness_keys)

    def deadline_ms(self, request: InferenceRequest) -> float:
        """The request's deadline: the client's where it asks for less than its model allows."""
        allowed = self.allowed_ms(request)
        asked = request.timeout_ms
        return asked if asked is not None and asked < allowed else allowed

    def allowed_ms(self, request: InferenceRequest) -> float:
        """The longest deadline the request's model allows: Envoy's timeout for it. Not the client's shorter
        one: Envoy counts each timeout against the host (outlier detection ejects after 3 in a row), and a
        deadline the client chose says nothing about the host; the client keeps its own deadline."""
        return self._deadlines.get(request.model or "", self._default_deadline)

    def limit_ms(self, request: InferenceRequest, deadline_ms: float) -> float:
        """The most expected completion the request may be sent with."""
        share = self._shares[request.priority] * deadline_ms
        return share if request.priority is Priority.CRITICAL else min(share, self._max_queue_ms)

    def load(
        self, request: InferenceRequest, best: Candidate, model: str, limit_ms: float, now: float, own: float = 1.0
    ) -> tuple[float, float]:
        """How full the best candidate is for this request, as a fraction of what it may be sent with (over
        1: refused), and how far its expected completion is past ``limit_ms`` (ms), for the retry-after.
        Standard and sheddable requests are also held to the soft limit on requests in flight. Both count
        the model's requests on the host only: Triton queues each model apart, so another model's queue on
        the same host does not delay this one (its execution shares the device, which the model's measured
        times reflect). Both are work, in requests of the model's mean size: the model's picks count their
        sizes, and the request's own is ``own`` (see :meth:`Scheduler.work`)."""
        in_flight = best.host.model_in_flight(model, now)
        completion = best.completion_ms(in_flight, own)
        fraction = completion / limit_ms
        if request.priority is not Priority.CRITICAL:
            fraction = max(fraction, in_flight / self._max_in_flight)
        return fraction, completion - limit_ms

    def refuse(self, request: InferenceRequest, over_ms: float, deadline_ms: float) -> Reject:
        """The answer to a request no candidate can take in time: 429, retry once the queue has drained
        by ``over_ms``."""
        retry_after = min(self._max_retry_after_s, max(1, math.ceil(over_ms / 1000)))
        return Reject(
            429,
            f"model '{request.model}' is overloaded: no host can serve this {request.priority.value} request "
            f"within its deadline ({deadline_ms:.0f} ms) or the fleet's queue limits; retry after the delay in "
            "retry-after",
            "overloaded",
            retry_after=True,
            retry_after_s=retry_after,
        )

    def fair(self, request: InferenceRequest, fraction: float, now: float) -> Reject | None:
        """Count an admitted request against its client's share, or refuse it (429) while the model is
        contended (its best host over half full for the request, see :meth:`load`) and the client has had
        more than its share: the other half is left to the clients below theirs."""
        model = request.model or ""
        key = request.client or _NO_KEY
        if fraction > 0.5 and self._fair.over_share(model, key, now):
            return Reject(
                429,
                f"model '{model}' is overloaded and this client has had more than its share of it; retry after "
                "the delay in retry-after",
                "fair_share",
                retry_after=True,
                retry_after_s=1,
            )
        self._fair.admitted(model, key, now)
        return None
