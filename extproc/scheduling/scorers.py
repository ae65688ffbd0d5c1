"""Scorers: a cost per candidate host, lower is better. The scheduler normalises each scorer's costs to
[0, 1] over the candidates it compares and adds them up with the profile's weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from extproc.config import ScorerName
from extproc.datastore import HostState, ModelTimes

# (candidates, now, the request's model or None) → a cost per candidate.
Scorer = Callable[[Sequence[HostState], float, str | None], list[float]]

# Per-request service time assumed when no host has been measured yet.
_UNMEASURED_SERVICE_MS = 1.0


def _times(host: HostState, model: str | None) -> tuple[float | None, float | None]:
    """(per-request drain time, exec_ms) of the model on the host, else the host's over all its models.
    A queue drains at the best recent per-request time: the batcher forms bigger batches as it grows."""
    times = host.load.models.get(model) if model is not None else None
    if times is None or times.service_ms is None:
        times = ModelTimes(host.load.service_ms, host.load.exec_ms, host.load.drain_ms)
    if times.service_ms is None:
        return None, times.exec_ms
    return min(times.service_ms, times.drain_ms or times.service_ms), times.exec_ms


def expected_completion_ms(hosts: Sequence[HostState], now: float, model: str | None = None) -> list[float]:
    """When a new request would finish on each host: one execution of its own (the host's mean batch
    time) after the requests in flight there have drained at the host's per-request time (the best seen
    lately, since a deep queue is served in full batches).

    ``service_ms`` is a batch's time divided by its size, so the queue drains faster on a host that batches
    well (batch-aware), while ``exec_ms`` keeps a slow host from looking cheap when idle. Triton's observed
    queue time is not added: queued requests are already in the in-flight count, and the observation is up
    to a scrape old, which would herd traffic away from whichever host queued last. The times are the
    request's model's on that host where measured."""
    times = [_times(h, model) for h in hosts]
    measured = [service for service, _ in times if service is not None]
    # An unmeasured host is assumed as fast as the fastest measured one, so a new host gets tried.
    default_ms = min(measured) if measured else _UNMEASURED_SERVICE_MS
    out = []
    for h, (service, execution) in zip(hosts, times, strict=True):
        service = service if service is not None else default_ms
        out.append((execution if execution is not None else service) + h.in_flight(now) * service)
    return out


def pending_queue(hosts: Sequence[HostState], now: float, model: str | None = None) -> list[float]:
    """Requests waiting in Triton's queues (all models), as Triton last reported."""
    return [float(h.load.pending) for h in hosts]


def in_flight(hosts: Sequence[HostState], now: float, model: str | None = None) -> list[float]:
    """Requests in flight: Envoy's live count, plus the picker's picks since, less estimated completions."""
    return [h.in_flight(now) for h in hosts]


def gpu_memory(hosts: Sequence[HostState], now: float, model: str | None = None) -> list[float]:
    """Fraction of GPU memory in use (0 where unknown, e.g. CPU hosts): less headroom, higher cost."""
    out = []
    for h in hosts:
        used, total = h.load.gpu_memory_used, h.load.gpu_memory_total
        out.append(used / total if used is not None and total else 0.0)
    return out


SCORERS: dict[ScorerName, Scorer] = {
    ScorerName.EXPECTED_COMPLETION: expected_completion_ms,
    ScorerName.PENDING_QUEUE: pending_queue,
    ScorerName.IN_FLIGHT: in_flight,
    ScorerName.GPU_MEMORY: gpu_memory,
}


def normalise(values: list[float]) -> list[float]:
    top = max(values, default=0.0)
    return [v / top for v in values] if top > 0 else [0.0] * len(values)


def cost(
    hosts: Sequence[HostState], weights: dict[ScorerName, float], now: float, model: str | None = None
) -> list[float]:
    total = [0.0] * len(hosts)
    for name, weight in weights.items():
        if weight:
            for i, value in enumerate(normalise(SCORERS[name](hosts, now, model))):
                total[i] += weight * value
    return total
