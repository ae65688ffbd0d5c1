"""What the scheduler is asked and what it answers."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from extproc.config import Tier
from extproc.datapath.datastore import HostState


class Protocol(StrEnum):
    HTTP = "http"
    GRPC = "grpc"


class Priority(StrEnum):
    """From the client's ``x-triton-priority`` header; absent or unknown means standard."""

    CRITICAL = "critical"
    STANDARD = "standard"
    SHEDDABLE = "sheddable"  # may get 429 when its tier is saturated


# Built for every request, hence not frozen and with a written __init__: compiled, a dataclass's generated
# __init__ stays interpreted (docs/development.md). The dataclass still gives eq, repr and
# dataclasses.replace.
@dataclass(slots=True, init=False)
class InferenceRequest:
    """One request as the picker understands it, parsed from Envoy's headers (and, for gRPC, the first body
    chunk). ``model`` is None for requests that name no model (health, server metadata, repository)."""

    protocol: Protocol
    model: str | None
    version: str | None
    size_bytes: int | None  # content-length, or the gRPC message length
    tier_hint: Tier | None
    priority: Priority
    # Triton correlation id: every request of the sequence must reach the same host.
    sequence_id: str | None
    # The request's sequence_start / sequence_end flags (where the picker read them: the body's parameters).
    sequence_start: bool
    sequence_end: bool
    # A unary inference call (REST .../infer, gRPC ModelInfer): the requests that get a deadline and are
    # admitted by it.
    infer: bool
    # The deadline the client asked for, in ms (gRPC grpc-timeout, REST x-triton-timeout-ms).
    timeout_ms: float | None
    # Whose share of a model's capacity the request counts against (see OverloadSpec.fairness_header).
    client: str | None
    # The only endpoints ("ip:port" of the request's protocol) it may go to, where its gateway says so (a GIE
    # gateway's subset hint); None: any.
    allowed: frozenset[str] | None
    # The request's rows (its batch dimension), where known: a gRPC ModelInfer's first input's leading
    # dimension, or the client's x-triton-rows hint. None: estimated from its bytes, else the model's mean.
    rows: int | None
    # A REST body's binary tensor data (content-length less Inference-Header-Content-Length), where its
    # tensors come in binary: bytes in proportion to its elements, without the JSON around them.
    tensor_bytes: int | None

    def __init__(
        self,
        protocol: Protocol,
        model: str | None = None,
        version: str | None = None,
        size_bytes: int | None = None,
        tier_hint: Tier | None = None,
        priority: Priority = Priority.STANDARD,
        sequence_id: str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
        infer: bool = False,
        timeout_ms: float | None = None,
        client: str | None = None,
        allowed: frozenset[str] | None = None,
        rows: int | None = None,
        tensor_bytes: int | None = None,
    ) -> None:
        self.protocol = protocol
        self.model = model
        self.version = version
        self.size_bytes = size_bytes
        self.tier_hint = tier_hint
        self.priority = priority
        self.sequence_id = sequence_id
        self.sequence_start = sequence_start
        self.sequence_end = sequence_end
        self.infer = infer
        self.timeout_ms = timeout_ms
        self.client = client
        self.allowed = allowed
        self.rows = rows
        self.tensor_bytes = tensor_bytes


@dataclass(slots=True, init=False)  # as InferenceRequest
class Route:
    """Send the request to ``tier``'s cluster, trying ``hosts`` in order (best first)."""

    tier: Tier
    hosts: tuple[HostState, ...]
    reason: str
    # The request's deadline in ms, for Envoy's route timeout (None: the route's own).
    timeout_ms: int | None
    # The request's work in requests of its model's mean size (see Scheduler.work): what its pick adds to the
    # host's in-flight estimate.
    work: float

    def __init__(
        self,
        tier: Tier,
        hosts: tuple[HostState, ...],
        reason: str,
        timeout_ms: int | None = None,
        work: float = 1.0,
    ) -> None:
        self.tier = tier
        self.hosts = hosts
        self.reason = reason
        self.timeout_ms = timeout_ms
        self.work = work


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer the client directly: 404 (no such model), 503 (nothing ready), 429 (shed), 400 (malformed)."""

    status: int
    message: str
    reason: str
    retry_after: bool = False
    # Seconds for retry-after where the picker predicts when the request would be admitted (else
    # picker.retry_after_s).
    retry_after_s: int | None = None


Decision = Route | Reject
