"""The poll loops that keep the :class:`~extproc.datapath.datastore.Datastore` current, off the request path.

One :class:`TelemetryCollector` per picker process, on the picker's event loop:

- per host, Triton's ``/metrics`` every ``poll.triton_metrics_ms`` → ``HostState.load``, ``metrics_at``;
  an idle host (nothing in flight by the picker's estimate, its counters unchanged at its last scrape)
  only every ``poll.idle_metrics_ms``;
- per host, Triton's repository index (gRPC) every ``poll.repository_ms`` → ``ready``, ``known``,
  ``index_at``; while the host's metrics page lists exactly the model versions its index has READY, each
  scrape confirms the index (``index_at``), and the index is read only every
  ``poll.confirmed_repository_ms``: a model loaded or unloaded shows on the page, and the next tick reads
  the index;
- Envoy's admin every ``poll.envoy_admin_ms`` (by default by the fleet's size, see
  :meth:`~extproc.config.picker.PollSpec.envoy_admin_s`): its per-endpoint stats, and its
  ``/clusters?format=json`` where those do not say everything (a host unhealthy or not listed, or no
  per-endpoint stats; see :mod:`.envoy_admin`) → every host's ``envoy``,
  ``envoy_at``, and restarts each host's in-flight estimate from Envoy's count; while the fleet is idle
  (Envoy's last two polls alike with nothing in flight, and no host with anything in flight by the
  picker's estimate or counters that moved at its last scrape; a follower, which scrapes nothing, goes by
  the first two alone) only every ``poll.idle_envoy_admin_ms``;
- with ``picker.nvml_host`` set, NVML every ``poll.nvml_ms`` → that host's GPU memory (in a thread).

A follower of another picker replica (``picker.replicas.follow``, see :mod:`extproc.replicas`) takes the
hosts' telemetry from the replica it follows: while :attr:`TelemetryCollector.scraping` is off only the Envoy
poll runs, and the hosts' loops skip their ticks until it is on again (the follower took over).

Where ``envoy.upstream_tls`` says the hosts speak TLS, the metrics page is read over HTTPS and the index
over gRPC with TLS, checked against its CA and server name (:mod:`.tls`); Envoy's admin stays plaintext.

Every request has a timeout of ``poll.request_timeout_ms``. A failed poll changes nothing, so the host's
``*_at`` timestamp ages and the scheduler's staleness filter drops it after ``poll.stale_after_ms``.
Failures are logged when a poll starts failing and when it recovers, not on every attempt.

Each loop runs its polls one at a time on a fixed grid (``start + k x period``): a poll that overruns
its period skips the ticks it missed instead of starting a second poll or bursting to catch up, and a
slow poll does not shift the phase of later ones. Loops of one kind are spread over ``_PHASES`` phases
of the period so that the hosts are not all scraped in the same millisecond, while the loops of one phase
wake together: one pass of the event loop runs them all, and their answers come back together, where a
phase per loop would cost a pass (an ``epoll_wait``, the timer heap) per loop and tick.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Final, Self

import structlog
from tritonclient.utils import InferenceServerException

from extproc.config import Fleet
from extproc.datapath.datastore import Datastore, HostState, TritonLoad
from extproc.telemetry.envoy_admin import (
    STATS_QUERY,
    EndpointStats,
    EndpointStatus,
    apply_envoy_view,
    parse_clusters,
    parse_endpoint_stats,
)
from extproc.telemetry.http import HttpError, PageClient, Target
from extproc.telemetry.nvml import GpuReading, NvmlReader
from extproc.telemetry.repository import RepositoryClient, apply_index
from extproc.telemetry.tls import TritonTls
from extproc.telemetry.triton_metrics import TritonSnapshot, derive_load, parse_metrics

log = structlog.get_logger(__name__)

METRICS: Final = "triton_metrics"
REPOSITORY: Final = "repository"
ENVOY: Final = "envoy_admin"
NVML: Final = "nvml"
# How long an Envoy whose stats held no per-endpoint stats is read through /clusters alone before they are
# looked for again (its clusters may be replaced by ones that keep them).
_ENVOY_STATS_RETRY_S: Final = 30.0

_MAX_ERROR_CHARS: Final = 300
# Phases per period of the loops of one kind (fewer where fewer loops).
_PHASES: Final = 10


class _Disabled(Exception):
    """Raised by a poll whose source is permanently unavailable (NVML without a driver)."""


@dataclass(eq=False)
class _Job:
    kind: str
    target: str  # host name, or "envoy"
    period_s: float
    poll: Callable[[], Awaitable[None]]
    # Whether this tick polls (None: every tick); a skipped tick keeps the grid.
    due: Callable[[], bool] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ok: bool | None = None  # None until the first poll ends
    failures: int = 0  # consecutive
    stopped: bool = False


@dataclass(eq=False)
class _Host:
    state: HostState
    repository: RepositoryClient
    metrics: Target
    snapshot: TritonSnapshot | None = None  # the last successful scrape
    # Whether its counters moved between its last two scrapes: traffic, even when none is in flight now.
    moved: bool = True
    # Whether its last scrape listed exactly the model versions its index has READY.
    confirmed: bool = False
    # When the index itself was last read; None while its last read failed (nothing left to confirm).
    indexed_at: float | None = None
    # The READY versions each ``state.batching`` entry was read for: a reload with new versions re-reads.
    config_versions: dict[str, frozenset[str]] = field(default_factory=dict)


def _endpoint(address: str, port: int) -> str:
    if address in ("0.0.0.0", "::"):  # a wildcard listener is reachable on loopback
        address = "127.0.0.1"
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


class TelemetryCollector:
    """Polls Triton, Envoy and NVML into ``datastore``.

    Usage: ``await collector.refresh_once()`` (optional, fills the datastore before serving), then
    ``task = asyncio.create_task(collector.run())``; at shutdown cancel the task and ``await
    collector.aclose()``. Also an async context manager that closes on exit.
    """

    def __init__(
        self,
        fleet: Fleet,
        datastore: Datastore,
        *,
        nvml: NvmlReader | None = None,
        admin_key: str | None = None,
        tls: TritonTls | None = None,
        scraping: bool = True,
        on_envoy_poll: Callable[[], None] | None = None,
    ) -> None:
        """``admin_key``: the fleet's key for Triton's restricted APIs (see extproc/admin_key.py).
        ``tls``: the hosts speak TLS (``envoy.upstream_tls``, see :mod:`.tls`); None: plaintext.
        ``scraping``: off, only Envoy is polled (see :meth:`set_scraping`). ``on_envoy_poll``: called once
        each Envoy poll is in the datastore (a leader pushes it to its workers at once)."""
        poll = fleet.picker.poll
        self._scraping = scraping
        self._datastore = datastore
        self._timeout_s = poll.request_timeout_ms / 1000
        # A tick comes at most half a period early: due when the interval has passed, less that.
        self._idle_metrics_s = (poll.idle_metrics_ms - poll.triton_metrics_ms / 2) / 1000
        self._confirmed_index_s = (poll.confirmed_repository_ms - poll.repository_ms / 2) / 1000
        envoy_s = poll.envoy_admin_s(len(datastore.hosts))
        self._idle_envoy_s = poll.idle_envoy_admin_ms / 1000 - envoy_s / 2
        self._pages = PageClient()
        self._hosts = [
            _Host(
                state,
                RepositoryClient(state.spec.grpc_endpoint, admin_key, tls),
                Target.parse(state.spec.metrics_url)
                if tls is None
                else Target.parse(tls.metrics_url(state.spec), tls.context, tls.server_name),
            )
            for state in datastore.hosts.values()
        ]
        admin = fleet.envoy.admin
        envoy_admin = f"http://{_endpoint(admin.address, admin.port)}"
        self.envoy_url = f"{envoy_admin}/clusters?format=json"
        self._envoy = Target.parse(self.envoy_url)
        self._envoy_stats = Target.parse(envoy_admin + STATS_QUERY)
        # Until when only /clusters is read: Envoy's last stats had no per-endpoint stats in them.
        self._envoy_stats_after = -math.inf
        # The last stats read and what they said (an idle fleet's are the same each time), and the ip:port
        # of each endpoint as the stats spell it.
        self._envoy_stats_body = b""
        self._envoy_stats_view: EndpointStats | None = None
        self._envoy_endpoint_keys: dict[str, str] = {}
        self._envoy_missing: frozenset[str] = frozenset()
        self._on_envoy_poll = on_envoy_poll
        # Envoy's last answer, and when it came (None: its last poll failed), and whether it was the same
        # as the one before with nothing in flight.
        self._envoy_endpoints: dict[str, EndpointStatus] | None = None
        self._envoy_polled_at: float | None = None
        self._envoy_quiet = False

        self._jobs: list[_Job] = []
        for host in self._hosts:
            self._jobs.append(
                _Job(
                    METRICS,
                    host.state.name,
                    poll.triton_metrics_ms / 1000,
                    partial(self._poll_metrics, host),
                    partial(self._metrics_due, host),
                )
            )
        for host in self._hosts:
            self._jobs.append(
                _Job(
                    REPOSITORY,
                    host.state.name,
                    poll.repository_ms / 1000,
                    partial(self._poll_repository, host),
                    partial(self._index_due, host),
                )
            )
        self._jobs.append(_Job(ENVOY, "envoy", envoy_s, self._poll_envoy, self._envoy_due))

        self._nvml_host: HostState | None = None
        self._nvml: NvmlReader | None = None
        self._nvml_read: asyncio.Future[GpuReading | None] | None = None
        self._gpu: GpuReading | None = None  # the last NVML reading while NVML works
        if fleet.picker.nvml_host is not None:
            self._nvml_host = datastore.hosts[fleet.picker.nvml_host]
            self._nvml = nvml if nvml is not None else NvmlReader()
            self._jobs.append(_Job(NVML, self._nvml_host.name, poll.nvml_ms / 1000, self._poll_nvml))
        self._running = False
        self._closed = False

    # -- public API -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run every poll loop until cancelled."""
        if self._running:
            raise RuntimeError("TelemetryCollector.run() is already running")
        if self._closed:
            raise RuntimeError("TelemetryCollector is closed")
        self._running = True
        try:
            async with asyncio.TaskGroup() as group:
                for job, offset in self._offsets():
                    group.create_task(self._loop(job, offset), name=f"telemetry:{job.kind}:{job.target}")
        finally:
            self._running = False

    async def refresh_once(self) -> None:
        """Run one round of every poll now, concurrently; returns when all have ended (each within the
        request timeout). Waits for a poll of the same source that is already under way to finish first."""
        if self._closed:
            raise RuntimeError("TelemetryCollector is closed")
        await asyncio.gather(*(self._run_job(job) for job in self._jobs if not job.stopped and self._polls(job)))

    @property
    def scraping(self) -> bool:
        """Whether the hosts (Triton, NVML) are polled; Envoy always is."""
        return self._scraping

    def set_scraping(self, scraping: bool) -> None:
        """Start or stop polling the hosts (a follower taking over from, or handing back to, the replica
        it follows). Stopping forgets the last scrapes, so that a later start derives no rates across the
        gap; whatever the datastore holds meanwhile comes from elsewhere."""
        if scraping == self._scraping:
            return
        self._scraping = scraping
        if not scraping:
            for host in self._hosts:
                host.snapshot, host.moved, host.confirmed, host.indexed_at = None, True, False, None

    def _polls(self, job: _Job) -> bool:
        return self._scraping or job.kind == ENVOY

    def health(self) -> dict[str, bool | None]:
        """``"kind/target"`` → whether its last poll succeeded (``None``: not polled yet or disabled)."""
        return {f"{j.kind}/{j.target}": (None if j.stopped else j.ok) for j in self._jobs}

    async def aclose(self) -> None:
        """Close the HTTP connections, the gRPC channels and NVML. Cancel :meth:`run` first."""
        if self._closed:
            return
        self._closed = True
        await self._pages.aclose()
        await asyncio.gather(*(host.repository.aclose() for host in self._hosts), return_exceptions=True)
        if self._nvml is not None and (self._nvml_read is None or self._nvml_read.done()):
            await asyncio.to_thread(self._nvml.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- scheduling -----------------------------------------------------------------------------------

    def _offsets(self) -> list[tuple[_Job, float]]:
        """Each job with its start delay: jobs of one kind spread evenly over ``_PHASES`` phases of their
        period."""
        by_kind: dict[str, list[_Job]] = {}
        for job in self._jobs:
            if not job.stopped:
                by_kind.setdefault(job.kind, []).append(job)
        out = []
        for jobs in by_kind.values():
            phases = min(_PHASES, len(jobs))
            out += [(job, job.period_s * (i * phases // len(jobs)) / phases) for i, job in enumerate(jobs)]
        return out

    async def _loop(self, job: _Job, offset: float) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + offset
        while not job.stopped:
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._polls(job) and (job.due is None or job.due()):
                await self._run_job(job)
            next_at += job.period_s
            now = loop.time()
            if next_at <= now:  # overran: skip the missed ticks, keep the grid
                next_at += (math.floor((now - next_at) / job.period_s) + 1) * job.period_s

    async def _run_job(self, job: _Job) -> None:
        async with job.lock:
            if job.stopped:
                return
            try:
                # A safety net over the library timeouts each poll sets itself.
                async with asyncio.timeout(self._timeout_s * 2 + 0.5):
                    await job.poll()
            except _Disabled:
                job.stopped = True
            except Exception as exc:
                job.failures += 1
                if job.ok is not False:
                    log.warning("telemetry poll failing", source=job.kind, target=job.target, error=_describe(exc))
                job.ok = False
            else:
                if job.ok is False:
                    log.warning(
                        "telemetry poll recovered", source=job.kind, target=job.target, failed_polls=job.failures
                    )
                job.ok = True
                job.failures = 0

    def _metrics_due(self, host: _Host) -> bool:
        """Every tick while the host has traffic; an idle one once per ``poll.idle_metrics_ms``."""
        state = host.state
        now = self._datastore.now()
        at = state.metrics_at
        if at is None or host.moved or state.in_flight(now) > 0:
            return True
        return now - at >= self._idle_metrics_s

    def _index_due(self, host: _Host) -> bool:
        """Every tick unless the metrics page confirms the index; then once per
        ``poll.confirmed_repository_ms``."""
        at = host.indexed_at
        return not host.confirmed or at is None or self._datastore.now() - at >= self._confirmed_index_s

    def _envoy_due(self) -> bool:
        """Every tick while anything is in flight or moving; while the fleet is idle once per
        ``poll.idle_envoy_admin_ms``. The picker's own picks count at once; those of other processes
        (workers, other gateways) show in Envoy's counts at the next idle poll, or in the hosts' counters.

        A follower (not scraping) has no counters of its own to see move, and needs none: its Envoy counts
        only its own gateway's requests, of which its own picks count at once and its workers' show in
        Envoy's counts at the next idle poll; other gateways' traffic never shows in its Envoy, and reaches
        its routing through the published Triton queues, which its in-flight estimates include."""
        at = self._envoy_polled_at
        if at is None or not self._envoy_quiet:
            return True
        now = self._datastore.now()
        if now - at >= self._idle_envoy_s:
            return True
        scraped = self._scraping  # a follower's ``host.moved`` says nothing: it scrapes no host
        return any((scraped and host.moved) or host.state.in_flight(now) > 0 for host in self._hosts)

    # -- the polls ------------------------------------------------------------------------------------

    async def _get(self, target: Target) -> bytes:
        async with asyncio.timeout(self._timeout_s):
            return await self._pages.get(target)

    async def _poll_metrics(self, host: _Host) -> None:
        body = await self._get(host.metrics)
        snapshot = parse_metrics(body.decode("utf-8", "replace"))
        now = self._datastore.now()
        envoy_at = host.state.envoy_at
        envoy_fresh = envoy_at is not None and now - envoy_at <= self._datastore.stale_after_s
        # Envoy's answered requests, against Triton's completions: this gateway's share of the host's traffic.
        answered = host.state.envoy.answered() if envoy_fresh else None
        load = derive_load(host.snapshot, snapshot, host.state.load, answered)
        if host.state is self._nvml_host and self._gpu is not None:
            _apply_gpu(load, self._gpu)
        last = host.snapshot
        host.moved = last is None or (snapshot.series != last.series and snapshot.totals != last.totals)
        host.snapshot = snapshot
        self._datastore.set_load(host.state, load, now)
        host.confirmed = host.indexed_at is not None and snapshot.model_versions() == _ready_versions(host.state)
        if host.confirmed:
            self._datastore.confirm_index(host.state, now)
        if not envoy_fresh:
            # Envoy's admin is unreachable: Triton's queue is the live view now, and our picks since the
            # last Envoy poll would otherwise pile up for ever.
            host.state.reset_estimate(load.pending, now)

    async def _poll_repository(self, host: _Host) -> None:
        host.indexed_at = None
        host.confirmed = False
        index = await host.repository.index(self._timeout_s)
        now = self._datastore.now()
        apply_index(self._datastore, host.state, index, now)
        host.indexed_at = now
        await self._read_batching(host)

    async def _read_batching(self, host: _Host) -> None:
        """Read the batching of models that became READY (once per load); forget unloaded ones. Until it
        is read, the scorers use their batch-agnostic estimate for that model."""
        state, seen = host.state, host.config_versions
        batching = {model: b for model, b in state.batching.items() if seen.get(model) == state.ready.get(model)}
        for model, versions in state.ready.items():
            if model not in batching:
                try:
                    batching[model] = await host.repository.batching(model, self._timeout_s)
                except InferenceServerException as exc:
                    log.debug("model config unreadable", host=state.name, model=model, error=_describe(exc))
                    continue
                seen[model] = versions
        self._datastore.set_batching(state, batching)

    async def _poll_envoy(self) -> None:
        self._envoy_polled_at = None
        endpoints = await self._envoy_endpoint_stats()
        if endpoints is None:
            endpoints = parse_clusters(json.loads(await self._get(self._envoy)))
        now = self._datastore.now()
        missing = frozenset(apply_envoy_view(self._datastore, endpoints, now))
        self._envoy_quiet = endpoints == self._envoy_endpoints and not any(
            status.rq_active or status.rq_pending_active for status in endpoints.values()
        )
        self._envoy_endpoints, self._envoy_polled_at = endpoints, now
        if self._on_envoy_poll is not None:
            self._on_envoy_poll()
        if missing != self._envoy_missing:
            if missing:
                log.warning("hosts missing from Envoy's triton clusters", hosts=sorted(missing))
            else:
                log.warning("every host is in Envoy's triton clusters again")
            self._envoy_missing = missing

    async def _envoy_endpoint_stats(self) -> dict[str, EndpointStatus] | None:
        """Envoy's counts from its per-endpoint stats, where they are the whole view: every host listed and
        every cluster member healthy. None: read ``/clusters`` (for why a host is unhealthy; or, for
        :data:`_ENVOY_STATS_RETRY_S`, because this Envoy's clusters keep no per-endpoint stats)."""
        now = self._datastore.now()
        if now < self._envoy_stats_after:
            return None
        try:
            body = await self._get(self._envoy_stats)
        except HttpError:
            self._envoy_stats_after = now + _ENVOY_STATS_RETRY_S
            return None
        stats = self._envoy_stats_view
        if stats is None or body != self._envoy_stats_body:
            stats = parse_endpoint_stats(body.decode("utf-8", "replace"), self._envoy_endpoint_keys)
            self._envoy_stats_body, self._envoy_stats_view = body, stats
        if not stats.endpoints:
            self._envoy_stats_after = now + _ENVOY_STATS_RETRY_S
            return None
        endpoints = stats.endpoints
        if not stats.all_healthy or not all(
            h.http_endpoint in endpoints or h.grpc_endpoint in endpoints for h in self._datastore.hosts.values()
        ):
            return None
        return endpoints

    async def _poll_nvml(self) -> None:
        assert self._nvml is not None and self._nvml_host is not None
        # A read that outlived its timeout is still running in its thread: wait for that one again
        # rather than start a second thread (NVML calls cannot be interrupted).
        if self._nvml_read is None:
            self._nvml_read = asyncio.ensure_future(asyncio.to_thread(self._nvml.read))
        try:
            reading = await asyncio.wait_for(asyncio.shield(self._nvml_read), self._timeout_s)
        except TimeoutError:
            self._gpu = None
            raise
        except Exception:
            self._nvml_read = None
            self._gpu = None
            raise
        self._nvml_read = None
        if reading is None:  # the reader disabled itself (no driver); it logged why
            self._gpu = None
            raise _Disabled
        self._gpu = reading
        load = dataclasses.replace(self._nvml_host.load)
        _apply_gpu(load, reading)
        self._datastore.set_load(self._nvml_host, load)


def _ready_versions(state: HostState) -> frozenset[tuple[str, str]]:
    return frozenset((model, version) for model, versions in state.ready.items() for version in versions)


def _apply_gpu(load: TritonLoad, reading: GpuReading) -> None:
    """NVML's reading replaces Triton's ``nv_gpu_*`` values for the sidecar host (NVML's are fresher)."""
    load.gpu_memory_used = reading.memory_used
    load.gpu_memory_total = reading.memory_total
    if reading.utilization is not None:
        load.gpu_utilization = reading.utilization
