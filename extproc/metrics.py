"""The picker's own Prometheus metrics: what it decided, how fast, and how old its telemetry is."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from extproc.datastore import Datastore
from extproc.discovery import Discovery


class PickerMetrics:
    """All series live in one registry owned by this object (no process-wide globals)."""

    def __init__(self, datastore: Datastore, *, decisions: bool = True) -> None:
        """``decisions=False`` for a leader process, whose workers' decision series it sums instead."""
        self.registry = CollectorRegistry()
        # A leader keeps its (unused) decision series out of its own registry: they come from the workers.
        decision_registry = self.registry if decisions else CollectorRegistry()
        self.decisions = Counter(
            "extproc_decisions",
            "Requests routed, by model, tier, first-choice host and reason.",
            ["model", "tier", "host", "reason"],
            registry=decision_registry,
        )
        self.rejections = Counter(
            "extproc_rejections",
            "Requests answered by the picker itself, by HTTP status and reason.",
            ["status", "reason"],
            registry=decision_registry,
        )
        self.decision_seconds = Histogram(
            "extproc_decision_seconds",
            "Time from the request's headers (or first gRPC body chunk) to the picker's answer.",
            buckets=(25e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3),
            registry=decision_registry,
        )
        self._telemetry = _TelemetryAge(datastore)
        self.registry.register(self._telemetry)
        self._pools = _PoolHosts()
        self.registry.register(self._pools)

    def use(self, datastore: Datastore) -> None:
        """Report on a new datastore (config reload); the decision counters carry on."""
        self._telemetry.store = datastore

    def use_discovery(self, discovery: Discovery | None) -> None:
        """Report the hosts of this discovery's pools (None: no pools, or a worker whose leader reports them)."""
        self._pools.discovery = discovery


class _TelemetryAge(Collector):
    """Per host, seconds since each telemetry source last refreshed (read at scrape time)."""

    def __init__(self, datastore: Datastore) -> None:
        self.store = datastore

    def collect(self) -> Iterator[GaugeMetricFamily]:
        age = GaugeMetricFamily(
            "extproc_telemetry_age_seconds",
            "Seconds since the source last refreshed; absent until its first success.",
            labels=["host", "source"],
        )
        in_flight = GaugeMetricFamily(
            "extproc_host_in_flight", "The picker's estimate of requests in flight per host.", labels=["host"]
        )
        now = self.store.now()
        for host in self.store.hosts.values():
            for source, at in (("metrics", host.metrics_at), ("index", host.index_at), ("envoy", host.envoy_at)):
                if at is not None:
                    age.add_metric([host.name, source], now - at)
            in_flight.add_metric([host.name], host.in_flight(now))
        yield age
        yield in_flight


class _PoolHosts(Collector):
    """Per pool, the hosts its DNS name resolved to last (read at scrape time)."""

    def __init__(self) -> None:
        self.discovery: Discovery | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        hosts = GaugeMetricFamily(
            "extproc_pool_hosts", "Hosts discovered by DNS per pool (the fleet file's pools:).", labels=["pool"]
        )
        if self.discovery is not None:
            for pool, count in self.discovery.counts.items():
                hosts.add_metric([pool], count)
        yield hosts
