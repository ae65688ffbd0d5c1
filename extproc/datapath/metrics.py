"""The picker's own Prometheus metrics: what it decided, how fast, and how old its telemetry is."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from extproc.datapath.datastore import Datastore
from extproc.datapath.peer_load import PeerLoad
from extproc.datapath.shared_picks import SharedPicks
from extproc.discovery import Discovery

# Upper bounds of the decision-time histogram, in seconds.
DECISION_BUCKETS: Final = (25e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3)
# (model, tier, first-choice host, reason): the labels of extproc_decisions.
RouteKey = tuple[str, str, str, str]
# (model, priority, outcome): the labels of extproc_admissions.
AdmissionKey = tuple[str, str, str]


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
        self.errors = Counter(
            "extproc_errors",
            "ext_proc streams the picker failed on (an exception it did not expect; Envoy fails them open), by "
            "exception type.",
            ["type"],
            registry=decision_registry,
        )
        self.quarantined = Counter(
            "extproc_quarantined",
            "Request fingerprints refused for a while because the request was in flight on a host that went "
            "down (a possible query of death).",
            registry=decision_registry,
        )
        self.not_running = Counter(
            "extproc_not_running_seconds",
            "Seconds this picker process was not running (stopped, or its event loop held over a second); its "
            "hosts' telemetry is given that time back.",
            registry=decision_registry,
        )
        self.scale_from_zero = Counter(
            "extproc_scale_from_zero_loads",
            "Loads the picker made of a model no host had READY, asked for by a request (placement."
            "scale_from_zero), by model and outcome (started, done, failed).",
            ["model", "outcome"],
            registry=decision_registry,
        )
        self.admissions = Counter(
            "extproc_admissions",
            "Inference requests admitted or refused for load, by model, priority and outcome (admitted, "
            "overloaded, fair_share).",
            ["model", "priority", "outcome"],
            registry=decision_registry,
        )
        # When a model last refused a request for load: `extproc status` names the models that did lately.
        # A leader reads its workers' values and keeps the latest.
        self.overload_refused_at = Gauge(
            "extproc_overload_refused_at_seconds",
            "Unix time of the last inference request refused for load (overloaded, fair_share), by model.",
            ["model"],
            registry=decision_registry,
            multiprocess_mode="max",
        )
        self.worker_picks = Counter(
            "extproc_worker_picks",
            "Other workers' picks this worker took into its in-flight estimates (applied; with "
            "picker.replicas.share_load also the other replicas' picks its leader passed on), or skipped (lost: "
            "fallen behind, or for a host it does not know); picker.share_worker_picks.",
            ["outcome"],
            registry=decision_registry,
        )
        self._shared_picks: SharedPicks | None = None
        # The process that holds the replicas' channel counts them (a leader too, whose workers have none).
        self.peer_picks = Counter(
            "extproc_peer_picks",
            "Other picker replicas' picks this replica took into its in-flight estimates (applied), or skipped "
            "(lost: for a host it does not know, or in a message it could not read); picker.replicas.share_load.",
            ["outcome"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "extproc_decision_seconds",
            "Time from the request's headers (or first gRPC body chunk) to the picker's answer.",
            buckets=DECISION_BUCKETS,
            registry=decision_registry,
        )
        # Routed requests are tallied in plain Python and added to the two series above by flush(): a
        # labelled Counter's inc and a Histogram's observe take a lock each and cost ~14k instructions
        # a request together, the tally ~3k.
        self._routed: dict[RouteKey, int] = {}
        self._times = [0] * (len(DECISION_BUCKETS) + 1)  # the last: +Inf
        self._time_sum = 0.0
        self._counters: dict[RouteKey, Counter] = {}
        self._admitted: dict[AdmissionKey, int] = {}
        self._refused_at: dict[str, float] = {}
        self._admission_counters: dict[AdmissionKey, Counter] = {}
        self._telemetry = _TelemetryAge(datastore)
        self.registry.register(self._telemetry)
        self._pools = _PoolHosts()
        self.registry.register(self._pools)
        self._following = _Following()
        self.registry.register(self._following)
        self._peers = _PeersHeard()
        self.registry.register(self._peers)

    def routed(self, key: RouteKey, elapsed_s: float) -> None:
        """Count one routed request that took ``elapsed_s`` to decide (published at the next flush)."""
        routed = self._routed
        routed[key] = routed.get(key, 0) + 1
        # The histogram's first bucket whose bound is >= the time, as Histogram.observe picks it.
        self._times[bisect_left(DECISION_BUCKETS, elapsed_s)] += 1
        self._time_sum += elapsed_s

    def admission(self, key: AdmissionKey) -> None:
        """Count one inference request admitted or refused for load (published at the next flush)."""
        admitted = self._admitted
        admitted[key] = admitted.get(key, 0) + 1
        if key[2] != "admitted":
            self._refused_at[key[0]] = time.time()

    def beat(self, datastore: Datastore) -> None:
        """:meth:`Datastore.beat <extproc.datapath.datastore.Datastore.beat>` now, counting the seconds it
        gave back to the hosts' telemetry."""
        if not_running := datastore.beat(datastore.now()):
            self.not_running.inc(not_running)

    def flush(self) -> None:
        """Add the routed requests tallied since the last flush to the Prometheus series: before every
        scrape of this process's registry, and periodically in a worker (whose series the leader reads from
        the multiprocess directory)."""
        for key, count in self._routed.items():
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = self.decisions.labels(*key)
            counter.inc(count)
        self._routed = {}
        for admission, count in self._admitted.items():
            counter = self._admission_counters.get(admission)
            if counter is None:
                counter = self._admission_counters[admission] = self.admissions.labels(*admission)
            counter.inc(count)
        self._admitted = {}
        for model, at in self._refused_at.items():
            self.overload_refused_at.labels(model).set(at)
        self._refused_at = {}
        # prometheus_client has no way to add n observations at once; its buckets hold per-bucket counts
        # (cumulated when exported), which is what the tally keeps. tests/test_metrics.py checks the result
        # against observe().
        histogram = self.decision_seconds
        for bucket, count in zip(histogram._buckets, self._times, strict=True):
            if count:
                bucket.inc(count)
        if self._time_sum:
            histogram._sum.inc(self._time_sum)
        self._times = [0] * len(self._times)
        self._time_sum = 0.0
        if self._shared_picks is not None:
            applied, lost = self._shared_picks.taken()
            self.worker_picks.labels("applied").inc(applied)
            self.worker_picks.labels("lost").inc(lost)
        if self._peers.peer_load is not None:
            applied, lost = self._peers.peer_load.taken()
            self.peer_picks.labels("applied").inc(applied)
            self.peer_picks.labels("lost").inc(lost)

    def use(self, datastore: Datastore) -> None:
        """Report on a new datastore (config reload); the decision counters carry on."""
        self._telemetry.store = datastore

    def following(self, following: bool) -> None:
        """A follower replica (``picker.replicas.follow``) follows its publisher's telemetry, or scrapes itself."""
        self._following.value = following

    def use_shared_picks(self, shared_picks: SharedPicks | None) -> None:
        """Count the other workers' picks this worker applies (None: it does not share them)."""
        self._shared_picks = shared_picks

    def use_peer_load(self, peer_load: PeerLoad | None) -> None:
        """Count the other replicas heard and their picks applied (None: this replica shares no loads)."""
        self._peers.peer_load = peer_load

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


class _Following(Collector):
    """Whether a follower replica routes on its publisher's telemetry (1) or on its own scrapes (0); absent
    on a picker that follows no other."""

    def __init__(self) -> None:
        self.value: bool | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.value is not None:
            yield GaugeMetricFamily(
                "extproc_telemetry_following",
                "1 while this follower replica routes on the telemetry its publisher sends (picker.replicas), "
                "0 while it scrapes the hosts itself.",
                value=float(self.value),
            )


class _PeersHeard(Collector):
    """The other picker replicas whose loads this one hears (``picker.replicas.share_load``); absent where it
    shares none."""

    def __init__(self) -> None:
        self.peer_load: PeerLoad | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.peer_load is not None:
            yield GaugeMetricFamily(
                "extproc_peer_replicas",
                "Other picker replicas whose picks and Envoy counts this replica hears (picker.replicas.share_load).",
                value=float(self.peer_load.peers),
            )
