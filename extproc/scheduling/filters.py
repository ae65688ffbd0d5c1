"""Filters: which hosts may take a request at all."""

from __future__ import annotations

from collections.abc import Iterable

from extproc.datastore import HostState


def serving(hosts: Iterable[HostState], model: str | None, version: str | None) -> list[HostState]:
    """Hosts where the model (and version) is READY, per Triton's repository index. Requests that name no
    model may go to any host whose index we have."""
    if model is None:
        return [h for h in hosts if h.index_at is not None]
    return [h for h in hosts if h.serves(model, version)]


def healthy(hosts: Iterable[HostState]) -> list[HostState]:
    """Drop hosts Envoy has ejected (outlier detection) or found unhealthy (active health check).
    override_host would use a named host even if ejected, so this filter is what keeps Envoy's verdict."""
    return [h for h in hosts if not (h.envoy.ejected or h.envoy.unhealthy)]


def fresh(hosts: Iterable[HostState], now: float, max_age_s: float) -> list[HostState]:
    """Drop hosts whose telemetry stopped refreshing: we cannot tell whether they are loaded or alive."""
    return [h for h in hosts if h.fresh(now, max_age_s)]
