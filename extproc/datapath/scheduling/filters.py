"""Filters: which hosts may take a request at all. Each keeps the hosts that pass, in order."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from operator import attrgetter
from typing import ClassVar, Final

from extproc.datapath.datastore import HostState
from extproc.datapath.scheduling import registry
from extproc.datapath.scheduling.registry import Context, Unit

_METRICS_AT: Final = attrgetter("metrics_at")
_INDEX_AT: Final = attrgetter("index_at")


class Filter(Unit):
    """Whether a host may take the profile's requests. The scheduler keeps what passed (prepared as
    candidates) until the datastore changes or :meth:`holds_until`; on a large plan, until the edge has
    answered the decision that found a change (see :mod:`~extproc.datapath.scheduling.scheduler`), unless
    the change was to the datastore's layout."""

    # Applied by the scheduler through the datastore's (tier, model) index, before the other filters:
    # :meth:`passes` is never called.
    indexed: ClassVar[bool] = False

    @abstractmethod
    def passes(self, host: HostState, now: float) -> bool: ...

    def holds_until(self, hosts: Sequence[HostState]) -> float:
        """When the first of ``hosts``, which all pass at this datastore generation, may stop passing
        without a datastore change (``inf``: only through one)."""
        return math.inf


class ModelReady(Filter):
    """The model (and version) is READY per Triton's repository index. Every profile has it: the
    scheduler asks the datastore for the hosts per (tier, model), then :func:`with_version`."""

    indexed = True

    def passes(self, host: HostState, now: float) -> bool:
        return True


class Healthy(Filter):
    """Not ejected by Envoy's outlier detection, not failing its active health check. override_host would
    use a named host even if ejected, so this filter is what carries Envoy's verdict into the pick."""

    def passes(self, host: HostState, now: float) -> bool:
        return not (host.envoy.ejected or host.envoy.unhealthy)


class Fresh(Filter):
    """Telemetry still refreshing (younger than poll.stale_after_ms), since otherwise we cannot tell
    whether the host is loaded, or even alive."""

    def __init__(self, context: Context) -> None:
        self.max_age_s = context.stale_after_s

    def passes(self, host: HostState, now: float) -> bool:
        return host.fresh(now, self.max_age_s)

    def holds_until(self, hosts: Sequence[HostState]) -> float:
        # Every host that passed has both timestamps; map and attrgetter keep a large tier quick.
        oldest: float = min(min(map(_METRICS_AT, hosts)), min(map(_INDEX_AT, hosts)))
        return oldest + self.max_age_s


registry.FILTERS.register("model_ready", ModelReady)
registry.FILTERS.register("healthy", Healthy)
registry.FILTERS.register("fresh", Fresh)

Filters = tuple[Filter, ...]


def build(names: Iterable[str], context: Context) -> Filters:
    """A profile's filters, in its order, less the indexed ones (see :attr:`Filter.indexed`)."""
    built = [registry.FILTERS.build(name, context) for name in names]
    return tuple([f for f in built if not f.indexed])


def with_version(hosts: Iterable[HostState], model: str, version: str | None) -> list[HostState]:
    """model_ready for a version: the datastore keeps the hosts per (tier, model), so only a version needs
    checking here."""
    if version is None:
        return list(hosts)
    return [h for h in hosts if version in h.ready.get(model, ())]


def passes(host: HostState, filters: Filters, now: float) -> bool:
    """Whether ``host`` passes every filter. A host an operator is draining never passes, whatever the
    profile."""
    if host.draining:
        return False
    for f in filters:  # noqa: SIM110 (all() of a generator: twice the cost, uncompiled)
        if not f.passes(host, now):
            return False
    return True


def passing(hosts: Iterable[HostState], filters: Filters, now: float) -> list[HostState]:
    """The hosts that pass (see :func:`passes`), in order."""
    return [h for h in hosts if passes(h, filters, now)]


def holds_until(filters: Filters, hosts: Sequence[HostState]) -> float:
    """When the first of ``hosts`` (which all pass) may stop passing without a datastore change."""
    until = math.inf
    if not hosts:
        return until
    for f in filters:
        until = min(until, f.holds_until(hosts))
    return until
