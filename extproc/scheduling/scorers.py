"""Scorers: a cost per candidate host, lower is better, each normalised to [0, 1] over the candidates."""

from __future__ import annotations

from collections.abc import Sequence

from extproc.datastore import HostState

# Per-request service time assumed for a host nobody has measured yet, relative to the measured ones.
_UNMEASURED_SERVICE_MS = 1.0


def expected_wait_ms(hosts: Sequence[HostState]) -> list[float]:
    """Time a new request would wait and run on each host: everything in flight there plus itself, times
    the host's measured per-request service time, plus the queue time Triton observed recently."""
    measured = [h.load.service_ms for h in hosts if h.load.service_ms is not None]
    # An unmeasured host is assumed as fast as the fastest measured one, so new hosts get tried.
    default_ms = min(measured) if measured else _UNMEASURED_SERVICE_MS
    out = []
    for h in hosts:
        service = h.load.service_ms if h.load.service_ms is not None else default_ms
        queue = h.load.queue_ms or 0.0
        out.append((h.in_flight() + 1) * service + queue)
    return out


def gpu_memory_pressure(hosts: Sequence[HostState]) -> list[float]:
    """Fraction of GPU memory in use (0 where unknown, e.g. CPU hosts): less headroom, higher cost."""
    out = []
    for h in hosts:
        used, total = h.load.gpu_memory_used, h.load.gpu_memory_total
        out.append(used / total if used is not None and total else 0.0)
    return out


def normalise(values: list[float]) -> list[float]:
    top = max(values, default=0.0)
    return [v / top for v in values] if top > 0 else [0.0] * len(values)
