"""The scheduler's decision → Envoy's answer (a ProcessingResponse), and what the picker records of it."""

from __future__ import annotations

import json
import time
from typing import Any, Final

import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from extproc.config import Tier
from extproc.datapath.headers import (
    ADMIN_KEY_GRPC_HEADER,
    ADMIN_KEY_HEADER,
    ENVOY_TIMEOUT_HEADER,
    EPP_DESTINATION_HEADER,
    EPP_NAMESPACE,
    HOSTS_HEADER,
    TIER_HEADER,
)
from extproc.datapath.metrics import PickerMetrics
from extproc.datapath.scheduling.types import Decision, InferenceRequest, Protocol, Reject, Route

log = structlog.get_logger(__name__)

_OVERWRITE: Final = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# HTTP status → gRPC status for answers to gRPC clients (grpc-status, as Triton itself would send).
_GRPC_STATUS: Final = {400: 3, 403: 7, 404: 5, 409: 9, 413: 8, 415: 12, 429: 8, 503: 14}
# Routing answers are reused per (tier, host list); the number of distinct lists is bounded by the fleet's
# size and max_hosts, but with many hosts it can be large, so the cache starts over when full.
_MAX_CACHED_ANSWERS: Final = 4096


_ADMISSION_OUTCOMES: Final = frozenset({"admitted", "overloaded", "fair_share"})
_REJECTIONS_LOGGED_PER_S: Final = 10
_MAX_LOGGED_TEXT: Final = 64
_MAX_LOGGED_MESSAGE: Final = 160


def clip(text: str | None, limit: int = _MAX_LOGGED_TEXT) -> str | None:
    """A client-chosen string as it may appear in a log line."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"...({len(text)} chars)"


class LogBudget:
    """At most ``per_s`` log lines a second, with a burst of as many; the caller learns how many lines were
    dropped since its last one."""

    def __init__(self, per_s: int) -> None:
        self._per_s = per_s
        self._tokens = float(per_s)
        self._at = 0.0
        self._dropped = 0

    def take(self, now: float) -> int:
        """-1: drop this line; otherwise log it, with the number of lines dropped before it."""
        self._tokens = min(float(self._per_s), self._tokens + (now - self._at) * self._per_s)
        self._at = now
        if self._tokens < 1.0:
            self._dropped += 1
            return -1
        self._tokens -= 1.0
        dropped, self._dropped = self._dropped, 0
        return dropped


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
    )


def routing_answer(tier: Tier, endpoints: str, timeout_ms: int | None = None) -> Any:
    """Envoy's answer for a routed request: the tier (which picks the route and cluster, hence the route
    cache is cleared), the hosts to try, best first (``ip:port`` list, for override_host), and the
    request's deadline as its route timeout."""
    headers = [_header(TIER_HEADER, tier.value), _header(HOSTS_HEADER, endpoints)]
    if timeout_ms is not None:
        headers.append(_header(ENVOY_TIMEOUT_HEADER, str(timeout_ms)))
    mutation = ep.HeaderMutation(set_headers=headers)
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=ep.CommonResponse(header_mutation=mutation, clear_route_cache=True))
    )


def epp_routing_answer(endpoints: str, rest: bool) -> Any:
    """A GIE gateway's answer for a routed request (Endpoint Picker Protocol): the hosts to try, best first,
    in the header and the dynamic metadata its override_host policy reads, with the same value (the
    protocol leaves the precedence to the gateway). No route timeout: gateways refuse the picker's changes
    to ``x-envoy-*`` headers, so the deadline is the HTTPRoute's. As our own Envoy routes do, it removes
    client copies of the admin key and (``rest``) the body's content type: Triton 2.51 crashes on a large
    form-encoded body."""
    removed = [ADMIN_KEY_HEADER, ADMIN_KEY_GRPC_HEADER, *(("content-type",) if rest else ())]
    mutation = ep.HeaderMutation(set_headers=[_header(EPP_DESTINATION_HEADER, endpoints)], remove_headers=removed)
    destination = struct_pb2.Struct()
    destination.fields[EPP_DESTINATION_HEADER].string_value = endpoints
    metadata = struct_pb2.Struct()
    metadata.fields[EPP_NAMESPACE].struct_value.CopyFrom(destination)
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=ep.CommonResponse(header_mutation=mutation)),
        dynamic_metadata=metadata,
    )


class Responder:
    """Answers and records decisions for one fleet config."""

    def __init__(self, metrics: PickerMetrics, retry_after_s: int, debug: bool) -> None:
        self._metrics = metrics
        self._retry_after = str(retry_after_s)
        self._debug = debug
        self._answers: dict[tuple[Tier, str, int | None], Any] = {}
        self._epp_answers: dict[str, Any] = {}
        self._log_budget = LogBudget(_REJECTIONS_LOGGED_PER_S)

    def answer(self, decision: Decision, request: InferenceRequest) -> Any:
        """The ProcessingResponse for ``decision``: routing headers, or Envoy's own answer to the client."""
        if isinstance(decision, Route):
            if request.protocol is Protocol.GRPC:
                endpoints = ",".join([h.grpc_endpoint for h in decision.hosts])
            else:
                endpoints = ",".join([h.http_endpoint for h in decision.hosts])
            timeout = decision.timeout_ms
            key = (decision.tier, endpoints, timeout)
            answer = self._answers.get(key)
            if answer is None:
                if len(self._answers) >= _MAX_CACHED_ANSWERS:
                    self._answers.clear()
                answer = self._answers[key] = routing_answer(decision.tier, endpoints, timeout)
            return answer
        return self._immediate(decision, request)

    def epp_answer(self, decision: Decision, request: InferenceRequest) -> Any:
        """:meth:`answer` in the Endpoint Picker Protocol (see :func:`epp_routing_answer`); refusals are the
        same immediate answers."""
        if isinstance(decision, Route):
            if request.protocol is Protocol.GRPC:
                endpoints = ",".join([h.grpc_endpoint for h in decision.hosts])
            else:
                endpoints = ",".join([h.http_endpoint for h in decision.hosts])
            # The endpoints' ports tell the protocols apart.
            answer = self._epp_answers.get(endpoints)
            if answer is None:
                if len(self._epp_answers) >= _MAX_CACHED_ANSWERS:
                    self._epp_answers.clear()
                rest = request.protocol is not Protocol.GRPC
                answer = self._epp_answers[endpoints] = epp_routing_answer(endpoints, rest)
            return answer
        return self._immediate(decision, request)

    def _immediate(self, reject: Reject, request: InferenceRequest) -> Any:
        set_headers = [_header("content-type", "application/json")]
        if reject.retry_after:
            seconds = reject.retry_after_s
            set_headers.append(_header("retry-after", self._retry_after if seconds is None else str(seconds)))
        immediate = ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=reject.status),
            headers=ep.HeaderMutation(set_headers=set_headers),
            details=reject.reason,
        )
        if request.protocol is Protocol.GRPC:
            immediate.grpc_status.status = _GRPC_STATUS.get(reject.status, 2)
            immediate.body = reject.message.encode()
        else:
            # Triton's error body, byte for byte: {"error":"…"}, without spaces.
            immediate.body = json.dumps({"error": reject.message}, separators=(",", ":"), ensure_ascii=False).encode()
        return ep.ProcessingResponse(immediate_response=immediate)

    def record(
        self,
        decision: Decision,
        request: InferenceRequest,
        request_id: str | None,
        started: float,
        answered: float | None = None,
    ) -> None:
        """Count the decision in the picker's metrics (and log it: every rejection, routes at debug);
        ``started`` is when the request reached the picker, ``answered`` when its answer was ready, before
        gRPC sent it (``time.perf_counter()``): the time between is the picker's work, the rest sending the
        answer and waiting for the process's turn (a busy machine)."""
        now = time.perf_counter()
        elapsed = now - started
        model = request.model or ""
        if request.infer:
            # Only models some host lists get an admission verdict: the label's values are bounded.
            outcome = "admitted" if isinstance(decision, Route) else decision.reason
            if outcome in _ADMISSION_OUTCOMES:
                self._metrics.admission((model, request.priority, outcome))
        if isinstance(decision, Route):
            # Tier is a StrEnum: its member is its label value, without the enum's slow .value lookup.
            self._metrics.routed((model, decision.tier, decision.hosts[0].name, decision.reason), elapsed)
            if self._debug:
                log.debug(
                    "routed",
                    request_id=request_id,
                    model=model,
                    version=request.version,
                    protocol=request.protocol.value,
                    tier=decision.tier.value,
                    hosts=[h.name for h in decision.hosts],
                    reason=decision.reason,
                    sequence_id=request.sequence_id,
                    decision_us=round(elapsed * 1e6, 1),
                    answer_us=round(((answered if answered is not None else now) - started) * 1e6, 1),
                )
        else:
            self._metrics.decision_seconds.observe(elapsed)
            self.refused(decision, request, request_id)

    def refused(self, reject: Reject, request: InferenceRequest, request_id: str | None) -> None:
        """Count and log a rejection: at the decision (:meth:`record`), or of a body already routed whose
        later part was refused."""
        self._metrics.rejections.labels(str(reject.status), reject.reason).inc()
        # Clients choose what is rejected, and how often: a short line, at most a few a second (the counter
        # above counts them all), and never more of a client's text than a name needs.
        suppressed = self._log_budget.take(time.monotonic())
        if suppressed >= 0:
            log.info(
                "rejected",
                request_id=clip(request_id),
                model=clip(request.model or ""),
                status=reject.status,
                reason=reject.reason,
                message=clip(reject.message, _MAX_LOGGED_MESSAGE),
                suppressed_before=suppressed,
            )
