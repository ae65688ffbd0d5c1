"""Filters: which hosts may take a request at all. Each keeps the hosts that pass, in order."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from extproc.config import FilterName
from extproc.datastore import HostState


def with_version(hosts: Iterable[HostState], model: str, version: str | None) -> list[HostState]:
    """model_ready: the model (and version) is READY per Triton's repository index. The datastore keeps
    the hosts per (tier, model), so only a version needs checking here."""
    if version is None:
        return list(hosts)
    return [h for h in hosts if version in h.ready.get(model, ())]


def healthy(host: HostState) -> bool:
    """Not ejected by Envoy's outlier detection, not failing its active health check. override_host would
    use a named host even if ejected, so this filter is what carries Envoy's verdict into the pick."""
    return not (host.envoy.ejected or host.envoy.unhealthy)


def passes(host: HostState, filters: Sequence[FilterName], now: float, max_age_s: float) -> bool:
    """The per-host filters (model_ready is applied through the datastore's index, before this). A host an
    operator is draining never passes, whatever the profile. ``fresh``: telemetry still refreshing, since
    otherwise we cannot tell whether the host is loaded, or even alive."""
    if host.draining:
        return False
    if FilterName.HEALTHY in filters and not healthy(host):
        return False
    return FilterName.FRESH not in filters or host.fresh(now, max_age_s)


def passing(hosts: Iterable[HostState], filters: Sequence[FilterName], now: float, max_age_s: float) -> list[HostState]:
    """The hosts that pass (see :func:`passes`), in order."""
    return [h for h in hosts if passes(h, filters, now, max_age_s)]
