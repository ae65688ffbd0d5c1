"""``extproc serve``: the picker process. Wires config → datastore → telemetry → scheduler → gRPC edge."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import grpc
import structlog
import uvloop
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from extproc.config import ConfigError, Fleet, file_stamp, load_fleet
from extproc.datastore import Datastore
from extproc.handlers.server import Processor
from extproc.metrics import PickerMetrics
from extproc.scheduling.scheduler import Scheduler
from extproc.telemetry.collector import TelemetryCollector

log = structlog.get_logger(__name__)

# How often the picker looks at its fleet file's modification time.
_CONFIG_POLL_S = 1.0

_GRPC_OPTIONS = [
    # Envoy opens one stream per request over a few connections; do not let gRPC cap them.
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.so_reuseport", 1),
]


class Picker:
    """One picker process: the ext_proc gRPC server, its telemetry and its metrics/readiness endpoint."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.datastore = Datastore(fleet)
        self.metrics = PickerMetrics(self.datastore)
        self.scheduler = Scheduler(fleet, self.datastore)
        self.collector = TelemetryCollector(fleet, self.datastore)
        self._server = grpc.aio.server(options=_GRPC_OPTIONS)
        self.processor = Processor(fleet, self.scheduler, self.metrics)
        ep_grpc.add_ExternalProcessorServicer_to_server(self.processor, self._server)
        self._web: web.AppRunner | None = None
        self._telemetry: asyncio.Task[None] | None = None
        self.ready = False

    async def start(self) -> None:
        listen = self.fleet.picker.listen
        self._server.add_insecure_port(listen)
        await self._server.start()
        await self._start_http()
        # One round of telemetry before we call ourselves ready, so the first requests are routed on data.
        await self.collector.refresh_once()
        self._telemetry = asyncio.create_task(self.collector.run(), name="telemetry")
        self.ready = True
        log.info(
            "picker_started",
            listen=listen,
            metrics=f"http://{self.fleet.picker.metrics_address}:{self.fleet.picker.metrics_port}/metrics",
            hosts=len(self.fleet.hosts),
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

    async def _metrics_page(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _ready_page(self, _: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503, text="ready\n" if self.ready else "starting\n")

    async def _status_page(self, _: web.Request) -> web.Response:
        return web.json_response({"ready": self.ready, "hosts": self.datastore.status()})

    async def _drain(self, request: web.Request) -> web.Response:
        """Stop (or resume) sending new requests to a host; sequences pinned there move."""
        name = request.match_info["name"]
        host = self.datastore.hosts.get(name)
        if host is None:
            return web.json_response({"error": f"no host named {name!r} in this fleet"}, status=404)
        host.draining = request.path.endswith("/drain")
        log.info("host_draining" if host.draining else "host_undrained", host=name)
        return web.json_response({"host": name, "draining": host.draining})

    async def reload(self, fleet: Fleet) -> None:
        """Apply a new fleet without dropping a request: build the new datastore (keeping the live state of
        unchanged hosts), scheduler and telemetry, then switch over between two requests."""
        fixed = ("listen", "metrics_address", "metrics_port")
        needs_restart = [
            f"picker.{key}" for key in fixed if getattr(fleet.picker, key) != getattr(self.fleet.picker, key)
        ]
        if needs_restart:
            log.warning("config_reload_needs_restart", keys=needs_restart, note="kept the running values")
            fleet = fleet.model_copy(
                update={"picker": fleet.picker.model_copy(update={k: getattr(self.fleet.picker, k) for k in fixed})}
            )
        datastore = Datastore(fleet)
        datastore.adopt(self.datastore)
        scheduler = Scheduler(fleet, datastore)
        collector = TelemetryCollector(fleet, datastore)
        old_collector, old_task = self.collector, self._telemetry
        self.fleet, self.datastore, self.scheduler, self.collector = fleet, datastore, scheduler, collector
        self.processor.configure(fleet, scheduler)
        self.metrics.use(datastore)
        self._telemetry = asyncio.create_task(collector.run(), name="telemetry")
        if old_task is not None:
            old_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await old_task
        await old_collector.aclose()
        log.info("config_reloaded", source=fleet.source, hosts=len(fleet.hosts), models=len(fleet.models))

    async def stop(self) -> None:
        self.ready = False
        await self._server.stop(grace=1.0)
        if self._telemetry is not None:
            self._telemetry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._telemetry
        await self.collector.aclose()
        if self._web is not None:
            await self._web.cleanup()


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


async def serve(fleet: Fleet, config_path: Path | None = None) -> None:
    """Run the picker until SIGTERM or SIGINT; reload ``config_path`` on SIGHUP or change."""
    picker = Picker(fleet)
    stop, reload_now = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    await picker.start()
    watcher = asyncio.create_task(_watch_config(picker, config_path, reload_now)) if config_path else None
    try:
        await stop.wait()
    finally:
        log.info("picker_stopping")
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await picker.stop()


def run(fleet: Fleet, config_path: Path | None = None) -> None:
    socket_path = fleet.picker.unix_socket
    if socket_path is not None:
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        # A socket file left by a previous run would make bind fail.
        socket_path.unlink(missing_ok=True)
        # Only this user (and so the local Envoy) may connect: the socket inherits the umask.
        old_umask = os.umask(0o077)
    try:
        # uvloop: ~20% more ext_proc streams per second than the default loop (facts file).
        uvloop.run(serve(fleet, config_path))
    finally:
        if socket_path is not None:
            os.umask(old_umask)
            socket_path.unlink(missing_ok=True)
