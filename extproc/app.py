"""``extproc serve``: the picker process. Wires config → datastore → telemetry → scheduler → gRPC edge."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Literal

import grpc
import structlog
import uvloop
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from extproc.admin_key import read_admin_key
from extproc.build import compiled
from extproc.config import ConfigError, Fleet, HostSpec, file_stamp, load_fleet
from extproc.datastore import Datastore
from extproc.discovery import Discovery, effective_fleet
from extproc.handlers.server import Processor, add_to_server
from extproc.metrics import PickerMetrics
from extproc.scheduling.scheduler import Scheduler
from extproc.sharing import Publisher, Subscriber
from extproc.telemetry.collector import TelemetryCollector

log = structlog.get_logger(__name__)

# How often the picker looks at its fleet file's modification time.
_CONFIG_POLL_S = 1.0
# How long a new worker waits for the leader's first telemetry before serving (on empty data: 503s).
_FIRST_SNAPSHOT_S = 10.0
# How often a worker adds its decisions to the multiprocess directory the leader's /metrics reads.
_WORKER_METRICS_FLUSH_S = 1.0
# Health-checked service names: the server as a whole ("") and the ext_proc service.
_HEALTH_SERVICES = ("", "envoy.service.ext_proc.v3.ExternalProcessor")

GRPC_OPTIONS = [
    # Envoy opens one stream per request over a few connections; do not let gRPC cap them.
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.so_reuseport", 1),
]


Role = Literal["single", "leader", "worker"]


class Picker:
    """One picker process. ``single``: the ext_proc gRPC server, its telemetry and its HTTP endpoint
    (metrics, readiness, status, drain). With ``picker.workers > 1`` a ``leader`` keeps the telemetry and
    the HTTP endpoint and shares the telemetry with ``worker`` processes, which serve ext_proc."""

    def __init__(
        self, config: Fleet, role: Role = "single", worker: int = 0, discovery: Discovery | None = None
    ) -> None:
        """``config``: the fleet file. ``discovery`` (not for a worker, which learns the pools' hosts from its
        leader) resolves its pools; the picker routes over the file's hosts plus the pools' current hosts."""
        self.role = role
        self.config = config
        self.discovery = discovery
        self.discovered = discovery.hosts if discovery is not None else ()
        self.fleet = fleet = effective_fleet(self.config, self.discovered)
        self.datastore = Datastore(fleet)
        self.metrics = PickerMetrics(self.datastore, decisions=role != "leader")
        self.metrics.use_discovery(discovery)
        self.scheduler = self._scheduler(fleet, self.datastore)
        # Read at start and on reload, not by each collector: a change of the pools' hosts rebuilds the
        # collector, and that must not fail on a key file.
        self.admin_key = read_admin_key(config) if role != "worker" else None
        self.collector = (
            TelemetryCollector(fleet, self.datastore, admin_key=self.admin_key) if role != "worker" else None
        )
        share = Path(fleet.runtime_dir) / "telemetry.sock"
        self.publisher = Publisher(self.datastore, share, self.discovered) if role == "leader" else None
        self.subscriber = Subscriber(self.datastore, share, self._use_discovered) if role == "worker" else None
        # One switch of fleet at a time: a config reload and a change of the pools' hosts may race.
        self._switching = asyncio.Lock()
        self._discovering: asyncio.Task[None] | None = None
        self.processor = Processor(fleet, self.scheduler, self.metrics)
        self._server: grpc.aio.Server | None = None
        if role != "leader":
            self._server = grpc.aio.server(options=GRPC_OPTIONS)
            add_to_server(self.processor, self._server)
            # The standard gRPC health service (Kubernetes gRPC probes, grpc-health-probe, Envoy's gRPC
            # health checks): NOT_SERVING until the picker serves, and again from the start of a shutdown.
            self._health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
            self._server.add_insecure_port(fleet.picker.listen_addresses[worker])
        self._web: web.AppRunner | None = None
        self._telemetry: asyncio.Task[None] | None = None
        self._flushing: asyncio.Task[None] | None = None
        self.workers: WorkerPool | None = None
        self.ready = False

    def _scheduler(self, fleet: Fleet, datastore: Datastore) -> Scheduler:
        # A worker sees 1/N of the picks between two Envoy polls; count each as N (see Scheduler).
        return Scheduler(fleet, datastore, pick_weight=fleet.picker.workers if self.role == "worker" else 1)

    async def start(self) -> None:
        if self.role != "worker":
            await self._start_http()
        # Telemetry first, so the first requests are routed on data (until then, streams fail open).
        if self.collector is not None:
            await self.collector.refresh_once()
            self._telemetry = asyncio.create_task(self.collector.run(), name="telemetry")
        if self.publisher is not None:
            await self.publisher.start()
        if self.subscriber is not None:
            self._telemetry = asyncio.create_task(self.subscriber.run(), name="telemetry-subscriber")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.subscriber.received.wait(), timeout=_FIRST_SNAPSHOT_S)
        self._start_discovering()
        if self.role == "worker":
            self._flushing = asyncio.create_task(self._flush_metrics(), name="metrics-flush")
        if self._server is not None:
            await self._server.start()
            for service in _HEALTH_SERVICES:
                await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.ready = True
        log.info(
            "picker_started",
            role=self.role,
            listen=self.fleet.picker.listen,
            workers=self.fleet.picker.workers,
            metrics=f"http://{self.fleet.picker.metrics_address}:{self.fleet.picker.metrics_port}/metrics",
            hosts=len(self.fleet.hosts),
            pools=len(self.config.pools),
            compiled=compiled(),
        )

    async def _start_http(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/ready", self._ready_page)
        app.router.add_get("/status", self._status_page)
        app.router.add_post("/hosts/{name}/drain", self._drain)
        app.router.add_post("/hosts/{name}/undrain", self._drain)
        self._web = web.AppRunner(app, access_log=None)
        await self._web.setup()
        site = web.TCPSite(self._web, self.fleet.picker.metrics_address, self.fleet.picker.metrics_port)
        await site.start()

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(_WORKER_METRICS_FLUSH_S)
            self.metrics.flush()

    async def _metrics_page(self, _: web.Request) -> web.Response:
        self.metrics.flush()
        body = generate_latest(self.metrics.registry)
        if self.workers is not None:
            body += self.workers.metrics()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def is_ready(self) -> bool:
        return self.ready and (self.workers is None or self.workers.ready())

    async def _ready_page(self, _: web.Request) -> web.Response:
        ready = self.is_ready()
        return web.Response(status=200 if ready else 503, text="ready\n" if ready else "starting\n")

    async def _status_page(self, _: web.Request) -> web.Response:
        return web.json_response({"ready": self.is_ready(), "hosts": self.datastore.status()})

    async def _drain(self, request: web.Request) -> web.Response:
        """Stop (or resume) sending new requests to a host; sequences pinned there move. Workers learn it
        from the next snapshot."""
        name = request.match_info["name"]
        host = self.datastore.hosts.get(name)
        if host is None:
            return web.json_response({"error": f"no host named {name!r} in this fleet"}, status=404)
        host.draining = request.path.endswith("/drain")
        self.datastore.changed()
        log.info("host_draining" if host.draining else "host_undrained", host=name)
        return web.json_response({"host": name, "draining": host.draining})

    async def reload(self, fleet: Fleet) -> None:
        """Apply a new fleet file without dropping a request; the pools keep their hosts (see :meth:`_switch`)."""
        fixed = ("listen", "workers", "metrics_address", "metrics_port")
        needs_restart = [
            f"picker.{key}" for key in fixed if getattr(fleet.picker, key) != getattr(self.config.picker, key)
        ]
        if needs_restart:
            log.warning("config_reload_needs_restart", keys=needs_restart, note="kept the running values")
            fleet = fleet.model_copy(
                update={"picker": fleet.picker.model_copy(update={k: getattr(self.config.picker, k) for k in fixed})}
            )
        try:
            admin_key = read_admin_key(fleet) if self.role != "worker" else None
        except ConfigError as exc:
            log.warning(
                "config_reload_rejected", problems=str(exc).splitlines(), note="still serving the previous config"
            )
            return
        async with self._switching:
            self.config, self.admin_key = fleet, admin_key
            if self.role != "worker":
                await _cancel(self._discovering)
                self._discovering = None
                self.discovery = Discovery(fleet, self.discovery) if fleet.pools else None
                self.metrics.use_discovery(self.discovery)
                self.discovered = self.discovery.hosts if self.discovery is not None else ()
                self._start_discovering()
            await self._switch()
        log.info("config_reloaded", source=fleet.source, hosts=len(self.fleet.hosts), models=len(fleet.models))

    def _start_discovering(self) -> None:
        """Re-resolve the pools in the background, switching the fleet when their hosts change."""
        if self.discovery is not None:
            self._discovering = asyncio.create_task(self.discovery.run(self._rediscovered), name="discovery")

    async def _rediscovered(self) -> None:
        """The pools' hosts changed (discovery, in a single picker or a leader)."""
        assert self.discovery is not None
        async with self._switching:
            self.discovered = self.discovery.hosts
            await self._switch()

    async def _use_discovered(self, hosts: tuple[HostSpec, ...]) -> None:
        """The leader's pools' hosts, with each snapshot (a worker)."""
        if hosts == self.discovered:
            return
        async with self._switching:
            self.discovered = hosts
            await self._switch()

    async def _switch(self) -> None:
        """Route over the current config and discovered hosts: build the new datastore (keeping the live state
        of unchanged hosts), scheduler and telemetry, then switch over between two requests."""
        fleet = effective_fleet(self.config, self.discovered)
        datastore = Datastore(fleet)
        datastore.adopt(self.datastore)
        scheduler = self._scheduler(fleet, datastore)
        self.fleet, self.datastore, self.scheduler = fleet, datastore, scheduler
        self.processor.configure(fleet, scheduler)
        self.metrics.use(datastore)
        if self.publisher is not None:
            self.publisher.datastore, self.publisher.discovered = datastore, self.discovered
        if self.subscriber is not None:
            self.subscriber.datastore = datastore
        if self.collector is not None:
            old_collector, old_task = self.collector, self._telemetry
            self.collector = TelemetryCollector(fleet, datastore, admin_key=self.admin_key)
            self._telemetry = asyncio.create_task(self.collector.run(), name="telemetry")
            await _cancel(old_task)
            await old_collector.aclose()

    async def stop(self) -> None:
        self.ready = False
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace=1.0)
        await _cancel(self._discovering)
        await _cancel(self._telemetry)
        await _cancel(self._flushing)
        self.metrics.flush()
        if self.collector is not None:
            await self.collector.aclose()
        if self.publisher is not None:
            await self.publisher.stop()
        if self._web is not None:
            await self._web.cleanup()


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class WorkerPool:
    """The leader's worker processes: started with the same fleet file, restarted if one dies, and sharing a
    Prometheus multiprocess directory so the leader's ``/metrics`` sums their decisions."""

    def __init__(self, fleet: Fleet, config_path: Path, log_format: str) -> None:
        self._fleet = fleet
        self._config_path = config_path
        self._log_format = log_format
        self._metrics_dir = Path(fleet.runtime_dir) / "picker-metrics"
        self._processes: list[asyncio.subprocess.Process | None] = [None] * fleet.picker.workers
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        self._metrics_dir.mkdir(parents=True)
        for index in range(len(self._processes)):
            await self._spawn(index)
        self._task = asyncio.create_task(self._supervise(), name="workers")

    async def _spawn(self, index: int) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self._metrics_dir)}
        argv = ["-m", "extproc", "--log-format", self._log_format, "serve", "--config", str(self._config_path)]
        self._processes[index] = await asyncio.create_subprocess_exec(
            sys.executable, *argv, "--worker", str(index), env=env
        )

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            for index, process in enumerate(self._processes):
                if process is not None and process.returncode is not None and not self._stopping:
                    log.warning("picker_worker_exited", worker=index, code=process.returncode, note="restarting")
                    await self._spawn(index)

    def ready(self) -> bool:
        """Every worker runs and, on Unix sockets, listens."""
        addresses = self._fleet.picker.listen_addresses
        for index, process in enumerate(self._processes):
            if process is None or process.returncode is not None:
                return False
            if addresses[index].startswith("unix:") and not Path(addresses[index].removeprefix("unix:")).exists():
                return False
        return True

    def metrics(self) -> bytes:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._metrics_dir))  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for process in self._processes:
            if process is not None and process.returncode is None:
                process.terminate()
        for process in self._processes:
            if process is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), timeout=10)
                if process.returncode is None:
                    process.kill()
                    await process.wait()


async def _watch_config(picker: Picker, path: Path, reload_now: asyncio.Event) -> None:
    """Reload on SIGHUP (``reload_now``) or when the file changes; an invalid file keeps the running config."""
    seen = file_stamp(path)
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reload_now.wait(), timeout=_CONFIG_POLL_S)
        current = file_stamp(path)
        if not reload_now.is_set() and current == seen:
            continue
        reload_now.clear()
        seen = current
        try:
            fleet = load_fleet(path)
        except ConfigError as exc:
            log.error(
                "config_reload_rejected", problems=str(exc).splitlines(), note="still serving the previous config"
            )
            continue
        await picker.reload(fleet)


async def serve(
    fleet: Fleet, config_path: Path | None = None, worker: int | None = None, log_format: str = "auto"
) -> None:
    """Run the picker until SIGTERM or SIGINT; reload ``config_path`` on SIGHUP or change."""
    role: Role = "single" if fleet.picker.workers == 1 else "worker" if worker is not None else "leader"
    discovery = Discovery(fleet) if fleet.pools and role != "worker" else None
    if discovery is not None:
        # Before serving, so the first requests are routed over the pools' hosts too.
        await discovery.refresh_once()
    picker = Picker(fleet, role, worker or 0, discovery)
    stop, reload_now = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    if role == "leader":
        if config_path is None:
            raise ValueError("several workers need the fleet file's path, to start them with it")
        # Before our own gRPC clients start threads: forking then makes gRPC skip its fork handlers.
        picker.workers = WorkerPool(fleet, config_path, log_format)
        await picker.workers.start()
    await picker.start()
    watcher = asyncio.create_task(_watch_config(picker, config_path, reload_now)) if config_path else None
    try:
        await stop.wait()
    finally:
        log.info("picker_stopping", role=role)
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if picker.workers is not None:
            await picker.workers.stop()
        await picker.stop()


def run(fleet: Fleet, config_path: Path | None = None, worker: int | None = None, log_format: str = "auto") -> None:
    """The ``extproc serve`` process: a single picker, a leader (``picker.workers > 1``), or worker ``worker``."""
    sockets = [Path(a.removeprefix("unix:")) for a in set(fleet.picker.listen_addresses) if a.startswith("unix:")]
    if worker is not None:
        sockets = [s for s in sockets if str(s) == fleet.picker.listen_addresses[worker].removeprefix("unix:")]
    elif fleet.picker.workers > 1:
        sockets = []  # each worker owns its socket
    for path in sockets:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A socket file left by a previous run would make bind fail.
        path.unlink(missing_ok=True)
    # Only this user (and so the local Envoy) may connect: sockets inherit the umask.
    old_umask = os.umask(0o077)
    try:
        # uvloop: ~20% more ext_proc streams per second than the default loop (facts file).
        uvloop.run(serve(fleet, config_path, worker, log_format))
    finally:
        os.umask(old_umask)
        for path in sockets:
            path.unlink(missing_ok=True)
